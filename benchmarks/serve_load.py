"""A bounded load test of `deeplab serve` on loopback, and the same model's offline `deeplab predict` in the same run.

    python benchmarks/serve_load.py                                  # the official MobileNetV2 dm0.5 (converted)
    python benchmarks/serve_load.py --requests 5000 --concurrency 16 --max-queue 64
    python benchmarks/serve_load.py --checkpoint run/best.pt --image photo.jpg --concurrency 1,8

It starts `deeplab serve` in a process of its own on 127.0.0.1 (a free port), waits for /readyz, then for each
concurrency C sends --requests POST /v1/segment requests from C concurrent clients (one asyncio process, httpx), and
stops by itself. Between the runs it measures the offline throughput and latency of the same model, runtime and
threads as `deeplab predict` runs it (decode, `predict_probs`, argmax, the PNG; in this process, the server idle).
Prints one JSON line per run: throughput, p50 / p95 / p99 latency, status counts, batch sizes (from the server's
/metrics), the server's own p50 / p99 per stage (its Server-Timing header: read, decode, queue, model, encode,
total), the server's resident memory at the 10% mark and at the end, and the ratio to offline; the first line is
the machine (CPU model, flags of note, runtime versions). Nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TFLITE = SHARED / "models" / "deeplabv3-mnv2-dm05-voc" / "deeplabv3_257_mv_gpu.tflite"
VOC_IMAGE = SHARED / "data" / "voc-samples" / "1_image.png"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024


def official_checkpoint(args, tmp: Path) -> Path:
    """`--checkpoint`, or the official MobileNetV2 dm0.5 VOC model from ../shared converted into `tmp`."""
    if args.checkpoint:
        return Path(args.checkpoint)
    if not TFLITE.is_file():
        sys.exit(f"{TFLITE} absent: pass --checkpoint")
    from deeplab.convert import convert_file
    from deeplab.models.checkpoint import save_checkpoint

    return save_checkpoint(convert_file(TFLITE), tmp / "mnv2-dm05-voc.pt")


def _image(args, tmp: Path) -> bytes:
    if args.image:
        return Path(args.image).read_bytes()
    if VOC_IMAGE.is_file():
        return VOC_IMAGE.read_bytes()
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((360, 480, 3)) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


def start_server(ckpt: Path, args) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "deeplab", "serve", "--checkpoint", str(ckpt), "--port", str(port),
           "--runtime", args.runtime, "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
           "--max-queue", str(args.max_queue)] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"deeplab serve did not come up: {proc.communicate()[1][-2000:]}")


async def load(url: str, body: bytes, *, requests: int, concurrency: int, pid: int) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    sent = 0
    trace: list[float] = []  # the server's resident MB after each tenth of the requests
    stages: dict[str, list[float]] = {}  # the server's own ms per stage (its Server-Timing header)
    mark = max(requests // 10, 1)

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests:
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/segment", content=body, headers={"content-type": "image/png"})
                statuses[r.status_code] += 1
                for name, ms in re.findall(r"(\w+);dur=([\d.]+)", r.headers.get("server-timing", "")):
                    stages.setdefault(name, []).append(float(ms))
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1
                continue
            latencies.append(1000 * (time.perf_counter() - t0))
            if len(latencies) % mark == 0:
                trace.append(round(_rss_mb(pid), 1))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    end = _rss_mb(pid)
    ok = sorted(latencies)
    q = statistics.quantiles(ok, n=100, method="inclusive") if len(ok) > 1 else ok * 99
    return {"concurrency": concurrency, "requests": requests, "seconds": round(seconds, 2),
            "img_per_s": round(statuses[200] / seconds, 2), "p50_ms": round(q[49], 1), "p95_ms": round(q[94], 1),
            "p99_ms": round(q[98], 1), "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "rss_mb_at_10pct": trace[0] if trace else None, "rss_mb_end": round(end, 1), "rss_mb_trace": trace,
            "server_ms": {name: {"p50": round(_quantile(v, 50), 1), "p99": round(_quantile(v, 99), 1)}
                          for name, v in stages.items()}}


def _quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def batch_sizes(url: str) -> dict[str, int]:
    import httpx

    text = httpx.get(url + "/metrics").text
    cumulative = {m.group(1): int(m.group(2)) for m in re.finditer(r'deeplab_batch_size_bucket\{le="([^"]+)"\} (\d+)', text)}
    out, previous = {}, 0
    for bound, n in cumulative.items():
        if n - previous:
            out[f"<={bound}"] = n - previous
        previous = n
    return out


def offline(ckpt: Path, body: bytes, args, *, runs: int) -> dict:
    """What `deeplab predict` does per image, in this process: decode, predict_probs, argmax, the PNG."""
    import numpy as np  # noqa: F401 - predict's own imports

    import deeplab
    from deeplab.data.palettes import model_palette
    from deeplab.deploy.runtimes import describe_runtime, prepare_model
    from deeplab.inference.options import InferenceOptions, resolve_input_size
    from deeplab.inference.predict import load_image, mask_of, predict_probs, save_mask_png
    from PIL import Image

    model = deeplab.load(ckpt)
    opts = InferenceOptions(runtime=args.runtime, threads=args.threads)
    opts = InferenceOptions.of(opts, input_size=resolve_input_size(model, opts.input_size))
    palette = model_palette(model)
    prepared = prepare_model(model, opts)

    def one() -> None:
        rgb = load_image(Image.open(io.BytesIO(body)))
        save_mask_png(mask_of(predict_probs(prepared, rgb, options=opts)), palette, io.BytesIO())

    for _ in range(3):
        one()
    times = []
    t_all = time.perf_counter()
    for _ in range(runs):
        t0 = time.perf_counter()
        one()
        times.append(1000 * (time.perf_counter() - t0))
    seconds = time.perf_counter() - t_all
    p99 = statistics.quantiles(times, n=100, method="inclusive")[98] if len(times) > 1 else times[0]
    return {"offline_img_per_s": round(runs / seconds, 2), "offline_median_ms": round(statistics.median(times), 1),
            "offline_p99_ms": round(p99, 1), "offline_runtime": describe_runtime(prepared)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the official MobileNetV2 dm0.5 VOC model, converted")
    p.add_argument("--image", default=None, help="the image every request sends (default: a VOC sample)")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", default="1,8", help="comma-separated client counts, e.g. 1,8,16")
    p.add_argument("--runtime", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--offline-runs", type=int, default=100)
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from deeplab.deploy.fast import retain_freed_memory
    from deeplab.deploy.precision import machine_line

    retain_freed_memory()  # the offline baseline runs as the `deeplab predict` process does

    import torch

    print(json.dumps({"machine": machine_line(torch.get_num_threads())}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DEEPLAB_CACHE_DIR", str(Path(tmp) / "cache"))  # server and offline share the choice
        ckpt = official_checkpoint(args, Path(tmp))
        body = _image(args, Path(tmp))
        proc, url = start_server(ckpt, args)
        try:
            import httpx

            runtime = httpx.get(url + "/v1/model").json()["runtime"]
            base = offline(ckpt, body, args, runs=args.offline_runs)
            for c in (int(v) for v in args.concurrency.split(",")):
                before = batch_sizes(url)
                row = asyncio.run(load(url, body, requests=args.requests, concurrency=c, pid=proc.pid))
                after = batch_sizes(url)
                row["batches"] = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) - before.get(k, 0)}
                row.update(base, runtime=runtime)
                row["ratio_to_offline"] = round(row["img_per_s"] / base["offline_img_per_s"], 3)
                row["p99_minus_offline_median_ms"] = round(row["p99_ms"] - base["offline_median_ms"], 1)
                row["p99_minus_offline_p99_ms"] = round(row["p99_ms"] - base["offline_p99_ms"], 1)
                print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            code = proc.wait(timeout=120)
            print(json.dumps({"server_exit": code}), flush=True)


if __name__ == "__main__":
    main()
