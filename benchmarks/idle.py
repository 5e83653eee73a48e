"""How idle time before a call changes each runtime's time: each runtime alone, `--calls` calls after 0, 10 and 50 ms
of idle each, at one thread count.

Why `time_in_rounds` (and so `auto`, `deeplab benchmark` and benchmarks/runtimes.py) times a short call back to back
after one untimed call instead of right after idle: on a VM a worker thread that slept through the idle can take
milliseconds to run again, and a 10 ms call at 2 threads then runs at close to 1-thread speed, in some calls and not
others. The rows: ONNX Runtime, OpenVINO and TF Lite on `deeplab export`'s files, and TF Lite on the official file
(`benchmarks/runtimes.py` builds them the same way). Printed per runtime and gap: median, min and 75th percentile ms.

    OMP_NUM_THREADS=2 python benchmarks/idle.py --model mnv2-dm05 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtimes import build, exported, peer_entry, tflite_entry  # noqa: E402  (this folder's benchmark)

from deeplab import retain_freed_memory  # noqa: E402
from deeplab.deploy.runners import missing_runtime  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnv2-dm05", help="a row of benchmarks/runtimes.py (default mnv2-dm05)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=30, help="timed calls per runtime and gap (default 30)")
    args = p.parse_args()
    retain_freed_memory()
    torch.set_num_threads(args.threads)
    model, tfl, size = build(args.model)
    if model is None:
        sys.exit(f"skipped: {tfl}")
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        fns = {}
        for runtime in ("onnxruntime", "openvino", "tflite"):
            why = missing_runtime(runtime)
            if why:
                print(f"skipped {runtime}: {why}")
                continue
            fns[runtime] = peer_entry(runtime, exported(model, args.model, runtime, folder, size), args.threads, x)
        if tfl is not None and "tflite" in fns:
            fns["official"] = tflite_entry(tfl, args.threads, size)
        print(f"# {args.model}, {args.threads} threads, {args.calls} calls per cell: median [min, 75th percentile] ms")
        for gap_s in (0.0, 0.01, 0.05):
            cells = []
            for name, fn in fns.items():
                fn(), fn()
                time.sleep(0.3)
                ms = []
                for _ in range(args.calls):
                    time.sleep(gap_s)
                    t0 = time.perf_counter()
                    fn()
                    ms.append((time.perf_counter() - t0) * 1e3)
                cells.append(f"{name} {statistics.median(ms):.1f} [{min(ms):.1f}, {np.percentile(ms, 75):.1f}]")
            print(f"idle {gap_s * 1e3:2.0f} ms: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
