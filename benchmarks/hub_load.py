"""Loading a model from a model folder (config.json + model.safetensors) against loading it from a .pt: the same
model saved both ways, `deeplab.load(PT)` and `deeplab.from_pretrained(DIR)` timed interleaved (the order alternates
each round), medians printed, with the machine line.

Two figures per form: `read` (the file into the checkpoint dict: torch.load with weights_only, or the JSON config, the
header check against a meta-device model and safetensors) and `load` (read, build the model on the meta device, hand
it the weights). A third, `load pt, initialised`, is the load that builds a randomly initialised model and copies the
weights into it, for comparison. Both files are in the page cache after the first round: this times the parsing and
copying, not the disk.

    OMP_NUM_THREADS=1 python benchmarks/hub_load.py --backbone resnet101 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import deeplab
from deeplab import ModelConfig, build_model
from deeplab.deploy.precision import machine_line
from deeplab.models.checkpoint import configs_of, read_checkpoint, save_checkpoint


def _timed(fn, arg) -> float:
    started = time.perf_counter()
    out = fn(arg)
    seconds = time.perf_counter() - started
    del out
    return seconds


def _initialised_load(path):
    """read, build a randomly initialised model, copy the weights into it: what loading skips."""
    data = read_checkpoint(path)
    cfg, preprocessing = configs_of(data, source=str(path))
    model = build_model(cfg, class_names=data["class_names"], preprocessing=preprocessing)
    model.load_state_dict(data["state_dict"])
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet101", help="backbone of the DeepLabv3+ model (default resnet101)")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = p.parse_args()
    print(machine_line(torch.get_num_threads()))
    model = build_model(ModelConfig(backbone=args.backbone, num_classes=args.num_classes)).eval()
    params = sum(t.numel() for t in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        pt = save_checkpoint(model, Path(tmp) / "model.pt")
        folder = model.save_pretrained(Path(tmp) / "model")
        del model
        sizes = {"pt": pt.stat().st_size, "folder": (folder / "model.safetensors").stat().st_size}
        cases = {"pt": (deeplab.load, pt), "folder": (deeplab.from_pretrained, folder)}
        times = {f"{kind} {form}": [] for kind in ("read", "load") for form in cases}
        times["load pt, initialised"] = []
        for r in range(args.rounds):
            for form in (("pt", "folder", "initialised") if r % 2 == 0 else ("initialised", "folder", "pt")):
                if form == "initialised":
                    times["load pt, initialised"].append(_timed(_initialised_load, pt))
                    continue
                fn, path = cases[form]
                times[f"read {form}"].append(_timed(read_checkpoint, path))
                times[f"load {form}"].append(_timed(fn, path))
    for name, values in times.items():
        print(json.dumps({"case": name, "median_s": round(statistics.median(values), 3),
                          "min_s": round(min(values), 3), "max_s": round(max(values), 3), "rounds": len(values)}))
    load = {form: statistics.median(times[f"load {form}"]) for form in (*cases, "pt, initialised")}
    print(f"DeepLabv3+ {args.backbone}, {params / 1e6:.1f} M parameters ({sizes['pt'] / 1e6:.0f} MB .pt, "
          f"{sizes['folder'] / 1e6:.0f} MB model.safetensors): median load {load['pt']:.2f} s from the .pt, "
          f"{load['folder']:.2f} s from the folder (folder / .pt = {load['folder'] / load['pt']:.2f}), "
          f"{load['pt, initialised']:.2f} s from the .pt into a randomly initialised model, over {args.rounds} "
          "interleaved rounds")


if __name__ == "__main__":
    main()
