"""SIGKILL `deeplab predict` at random moments and rerun it over the same inputs and --out after each kill.

After every kill, every output file that exists under its own name equals the output of an uninterrupted run byte for
byte (outputs are written under temporary names and renamed when whole), and so does every output an input's record
names (`deeplab.inference.resume`). The rerun after each kill (into the same --out) skips exactly the inputs
recorded as done, and leaves every output equal to the uninterrupted run's and no temporary file. Each kill is a
fresh --out folder.

    python benchmarks/kill_predict.py --kills 10          # one JSON line per kill, then a summary line

tests/test_predict_scale.py runs three kills of the same procedure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECORDS = ".deeplab-predict"
OUTPUTS_PER_IMAGE = 3  # NAME.png, NAME_overlay.png, NAME_probs.npy


def make_inputs(work: Path, *, images: int = 80, size: tuple[int, int] = (64, 96)) -> tuple[Path, Path]:
    """A tiny checkpoint (3 classes) and `images` random RGB PNGs; returns (checkpoint, image folder)."""
    import numpy as np
    import torch
    from PIL import Image

    from deeplab import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.25, num_classes=3, output_stride=16, decoder=False,
                      atrous_rates=(2,), aspp_channels=16)
    ckpt = save_checkpoint(build_model(cfg, class_names=["a", "b", "c"]).eval(), work / "model.pt")
    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return ckpt, folder


def predict_cmd(ckpt: Path, images: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "deeplab", "predict", "--checkpoint", str(ckpt), str(images), "--out", str(out),
            "--overlay", "--probs", "--runtime", "eager", "--threads", "1", "--quiet"]


def visible_files(out: Path) -> dict[str, bytes]:
    """Every file under `out` but the records and temporary (dot) files, by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)}


def check_after_kill(out: Path, reference: dict[str, bytes]) -> dict:
    """Outputs present and recorded after a kill, and any that differ from the uninterrupted run's."""
    present = visible_files(out) if out.is_dir() else {}
    wrong = sorted(name for name, data in present.items() if reference.get(name) != data)
    records = sorted((out / RECORDS).rglob("*.json")) if (out / RECORDS).is_dir() else []
    missing = []
    for record in records:
        for name in json.loads(record.read_text())["outputs"]:
            if present.get(name) != reference[name]:
                missing.append(name)
    return {"outputs": len(present), "records": len(records), "wrong": wrong, "recorded_but_not_whole": missing}


def wait_for_first_record(proc: subprocess.Popen, out: Path, *, timeout: float = 120.0) -> float:
    """The time (perf_counter) at which `out` first holds a record, polled every 5 ms; at once if `proc` ended."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end and proc.poll() is None:
        if (out / RECORDS).is_dir() and next((out / RECORDS).iterdir(), None) is not None:
            break
        time.sleep(0.005)
    return time.perf_counter()


def kill_and_rerun(work: Path, *, kills: int, seed: int, echo=None) -> dict:
    rng = random.Random(seed)
    ckpt, images = make_inputs(work)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    proc = subprocess.Popen(predict_cmd(ckpt, images, work / "reference"), stdout=subprocess.DEVNULL, env=env)
    first_s = wait_for_first_record(proc, work / "reference") - started
    if proc.wait() != 0:
        raise SystemExit("the uninterrupted deeplab predict run failed")
    clean_s = time.perf_counter() - started
    reference = visible_files(work / "reference")
    results = []
    for k in range(kills):
        out = work / f"out{k}"
        # Once the first input is recorded (past the imports), anywhere in the rest of a clean run's time: kills
        # before, between and during the writes of one input's files.
        delay = rng.uniform(0.0, 0.95) * (clean_s - first_s)
        proc = subprocess.Popen(predict_cmd(ckpt, images, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env)
        wait_for_first_record(proc, out)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        after_kill = check_after_kill(out, reference)
        rerun = subprocess.run(predict_cmd(ckpt, images, out), capture_output=True, text=True, env=env)
        match = re.search(r"skipped (\d+)", rerun.stdout)
        result = {"kill": k, "after_s": round(delay, 2), **after_kill, "rerun_status": rerun.returncode,
                  "skipped_by_rerun": int(match.group(1)) if match else 0,
                  "equal_to_clean_run": visible_files(out) == reference,
                  "temporary_files_left": sorted(p.name for p in out.rglob("*.partial"))}
        results.append(result)
        if echo:
            echo(result)
    return {
        "kills": kills, "clean_run_s": round(clean_s, 1), "first_record_s": round(first_s, 1),
        "killed_mid_run": sum(0 < r["records"] < len(reference) // OUTPUTS_PER_IMAGE for r in results),
        "wrong_after_any_kill": sum(len(r["wrong"]) + len(r["recorded_but_not_whole"]) for r in results),
        "reruns_skipping_exactly_the_recorded": sum(r["skipped_by_rerun"] == r["records"] for r in results),
        "reruns_equal_to_clean_run": sum(r["equal_to_clean_run"] and r["rerun_status"] == 0 for r in results),
        "temporary_files_left": sum(len(r["temporary_files_left"]) for r in results),
        "kill_results": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        summary = kill_and_rerun(Path(tmp), kills=args.kills, seed=args.seed,
                                 echo=lambda r: print(json.dumps(r), flush=True))
    summary.pop("kill_results")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
