"""SIGKILL a small training run at random moments, some aimed at checkpoint writes, resuming after each kill.

After every kill: last.pt (if any) is a whole checkpoint that loads, and nothing but the run's own files (and the
temporary file of a write in flight, removed by the next start) is in the folder. At the end: the resumed run's
loss at every step and its final weights equal an uninterrupted run's, and no temporary file is left.

    python benchmarks/kill_resume.py --kills 10          # one JSON line per kill, then a summary line

tests/test_faults.py runs three kills of the same procedure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deeplab.models.checkpoint import read_checkpoint

STEPS = 40
RUN_NAMES = {"last.pt", "best.pt", "config.json", "data_report.json", "metrics.json", "log.csv", "val.csv",
             "curves.png", "predictions.png", ".lock", "best"}  # best/: the model folder written at the end


def train_cmd(out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [
        sys.executable, "-m", "deeplab", "train", "--out", str(out), "--quiet",
        "--backbone", "mobilenet_v2", "--depth-multiplier", "0.5", "--aspp-channels", "32", "--decoder-channels", "32",
        "--low-level-channels", "16", "--crop-size", "64", "--min-scale", "0.5", "--max-scale", "0.75",
        "--batch-size", "4", "--steps", str(steps), "--checkpoint-every", "1", "--val-every", "6", "--val-limit", "2",
        "--val-images", "1", *extra,
    ]


def losses(path: Path) -> dict[int, float]:
    """step -> loss of the intact rows of a log.csv (a killed write can leave a partial last row)."""
    rows = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    rows[int(row["step"])] = float(row["loss"])
                except (TypeError, ValueError, KeyError):
                    break
    except FileNotFoundError:
        pass
    return rows


def stray_files(out: Path, *, allow_tmp: bool) -> list[str]:
    names = [p.name for p in out.iterdir()] if out.exists() else []
    return sorted(n for n in names if n not in RUN_NAMES and not (allow_tmp and n.startswith(".") and n.endswith(".tmp")))


def _kill_once(out: Path, rng: random.Random, *, aim_at_write: bool, env: dict) -> dict:
    resume = (out / "last.pt").is_file()
    if not resume and out.exists():
        shutil.rmtree(out)  # killed before its first checkpoint: the user starts that run again
    proc = subprocess.Popen(train_cmd(out, *(["--resume"] if resume else [])), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    logged = len(losses(out / "log.csv"))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(losses(out / "log.csv")) <= logged:
        time.sleep(0.005)  # until this process has trained a step: a kill during start-up tests nothing new
    delay = rng.uniform(0.0, 1.0)
    started = time.time()
    during_write = False
    while proc.poll() is None and time.time() - started < (3.0 if aim_at_write else delay):
        if aim_at_write and any(out.glob(".last.pt*.tmp")):
            during_write = True
            break
        time.sleep(0.001)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    record = {"resumed": resume, "aimed_at_write": aim_at_write, "killed_during_write": during_write,
              "finished_before_kill": finished, "logged_steps": len(losses(out / "log.csv"))}
    if (out / "last.pt").is_file():
        record["checkpoint_step"] = int(read_checkpoint(out / "last.pt")["step"])  # raises if it is corrupt
    record["stray"] = stray_files(out, allow_tmp=True)
    return record


def kill_and_resume(work: Path, *, kills: int, seed: int, echo=None) -> dict:
    """Run the procedure in `work`; returns the summary (and echoes one dict per kill)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(train_cmd(work / "full"), check=True, env=env, capture_output=True, timeout=600)
    rng = random.Random(seed)
    out = work / "killed"
    records = []
    for k in range(kills):
        record = _kill_once(out, rng, aim_at_write=k % 2 == 1, env=env)
        records.append(record)
        if echo:
            echo({"kill": k + 1, **record})
        if record["stray"]:
            break
    done = subprocess.run(train_cmd(out, "--resume") if (out / "last.pt").is_file() else train_cmd(out),
                          env=env, capture_output=True, text=True, timeout=600)
    full, resumed = losses(work / "full" / "log.csv"), losses(out / "log.csv")
    a = torch.load(work / "full" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "last.pt", weights_only=True)["state_dict"]
    weights_equal = all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a if a[k].is_floating_point())
    return {
        "kills": len(records),
        "during_write": sum(r["killed_during_write"] for r in records),
        "corrupt_or_stray": sum(bool(r["stray"]) for r in records),
        "final_exit": done.returncode,
        "steps_logged": sorted(resumed) == list(range(1, STEPS + 1)),
        "max_loss_difference": max((abs(full[s] - resumed.get(s, float("inf"))) for s in full), default=None),
        "weights_equal": weights_equal,
        "stray_at_end": stray_files(out, allow_tmp=False),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        summary = kill_and_resume(Path(tmp), kills=args.kills, seed=args.seed, echo=lambda r: print(json.dumps(r), flush=True))
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
