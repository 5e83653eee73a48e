"""`deeplab predict` over a folder in one process or several (torchrun): time, images/s, and byte-identical outputs.

    python benchmarks/predict_processes.py                       # 200 CamVid frames, the official MobileNetV2 dm0.5
    python benchmarks/predict_processes.py --images 200 --rounds 2 --splits 1x1,2x1,1x2
    python benchmarks/predict_processes.py --checkpoint best.pt --folder my_images/

Each split PxT runs `deeplab predict` (P processes under `torch.distributed.run --standalone`, T threads each) over
the same folder into a fresh output folder, timed from launch to exit (start-up included, as a user sees it), and
the same command on one image (start-up, loading and the runtime's preparation); the splits alternate within each
round. Before the rounds, one process predicts the first image at each thread count
so that `--runtime auto` has chosen its runtime and kept what it builds (docs/geo.md, "Start-up"): every run of the
rounds then finds both in the cache, as any run after the first on a machine does. Prints the machine line, one JSON line per run and a summary with each
split's median and its speed-up over 1x1; the outputs of every run are compared byte for byte with the first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_load import official_checkpoint  # noqa: E402

SHARED = ROOT.parent / "shared"
CAMVID = SHARED / "data" / "camvid"


def _folder(args, work: Path) -> Path:
    if args.folder:
        return Path(args.folder)
    folder = work / "images"
    folder.mkdir()
    frames = sorted((CAMVID / "val").glob("*.png")) + sorted((CAMVID / "train").glob("*.png"))
    if not frames:
        sys.exit(f"{CAMVID} absent: pass --folder")
    for frame in frames[: args.images]:
        shutil.copy(frame, folder / frame.name)
    return folder


def _command(split: str, ckpt: Path, inputs: list[str], out: Path, runtime: str) -> list[str]:
    processes, threads = (int(v) for v in split.split("x"))
    predict = ["--checkpoint", str(ckpt), *inputs, "--out", str(out), "--threads", str(threads), "--runtime", runtime,
               "--quiet", "--overwrite"]
    if processes == 1:
        return [sys.executable, "-m", "deeplab", "predict", *predict]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m",
            "deeplab", "predict", *predict]


def _digest(out: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(out.rglob("*.png")):
        h.update(p.relative_to(out).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the official MobileNetV2 dm0.5 VOC model, converted")
    p.add_argument("--folder", default=None, help="default: the first --images CamVid frames")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--splits", default="1x1,2x1,1x2", help="PROCESSESxTHREADS, comma-separated")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runtime", default="auto")
    args = p.parse_args()
    from deeplab.deploy.precision import machine_line

    splits = args.splits.split(",")
    print(json.dumps({"machine": machine_line(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))}),
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "DEEPLAB_CACHE_DIR": str(work / "cache"), "OMP_NUM_THREADS": "1"}
        ckpt, folder = official_checkpoint(args, work), _folder(args, work)
        first = sorted(folder.iterdir())[0]
        for threads in sorted({s.split("x")[1] for s in splits}):  # choose (and cache) the runtime once
            subprocess.run(_command(f"1x{threads}", ckpt, [str(first)], work / "warm", args.runtime), env=env,
                           check=True, capture_output=True)
        seconds: dict[str, list[float]] = {s: [] for s in splits}
        startup: dict[str, list[float]] = {s: [] for s in splits}
        reference = None
        for r in range(args.rounds):
            for split in splits:
                out = work / f"out-{split}-{r}"
                startup[split].append(_timed(_command(split, ckpt, [str(first)], work / "one", args.runtime), env))
                seconds[split].append(_timed(_command(split, ckpt, [str(folder)], out, args.runtime), env))
                digest = _digest(out)
                reference = reference or digest
                n = len(list(out.rglob("*.png")))
                print(json.dumps({"split": split, "round": r, "seconds": round(seconds[split][-1], 2), "images": n,
                                  "img_per_s": round(n / seconds[split][-1], 2),
                                  "one_image_seconds": round(startup[split][-1], 2), "identical": digest == reference}),
                      flush=True)
                shutil.rmtree(out)
        print(json.dumps(_summary(seconds, startup, splits[0], images=n)), flush=True)


def _timed(command: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def _summary(seconds: dict[str, list[float]], startup: dict[str, list[float]], base: str, *, images: int) -> dict:
    """Medians, the speed-up over `base` as the user sees it (start-up included), and once the processes run: the
    time of a one-image run (start-up, loading, the runtime's preparation) taken off."""
    wall = {s: statistics.median(v) for s, v in seconds.items()}
    running = {s: statistics.median(a - b for a, b in zip(seconds[s], startup[s])) for s in seconds}
    return {"median_seconds": {s: round(v, 2) for s, v in wall.items()},
            "median_one_image_seconds": {s: round(statistics.median(v), 2) for s, v in startup.items()},
            f"speedup_over_{base}": {s: round(wall[base] / v, 2) for s, v in wall.items()},
            f"speedup_over_{base}_after_startup": {s: round(running[base] / v, 2) for s, v in running.items()},
            "img_per_s_after_startup": {s: round((images - 1) / v, 2) for s, v in running.items()}}


if __name__ == "__main__":
    main()
