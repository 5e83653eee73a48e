"""Training and inference against segmentation_models.pytorch (smp) on a GPU (or the CPU), and the CLI end to end.

One script for the checks a GPU machine runs (docs/performance.md keeps the table):

1. Train step (forward, loss, backward, SGD) of DeepLabv3+ ResNet-101, output stride 16, separable ASPP and decoder,
   against smp's `DeepLabV3Plus("resnet101", encoder_output_stride=16)`, in fp32 / bf16 autocast x NCHW /
   channels_last, and ours under `torch.compile`: images/s and peak memory (CUDA: max allocated; CPU: peak RSS).
   Each measurement runs in a process of its own (peak memory is per process), ours and smp alternating, in rounds.
2. Inference images/s at batch 1 and 16: our fast path (`optimize_for_inference(runtime="torch")`) against smp eager.
3. The CLI on the device: `deeplab train` (its start-up line; on CUDA also `--amp fp16`), `eval`, `predict`,
   `export`.
4. With `--camvid`: README's CamVid recipe, run as written there but on the device: wall time, val mIoU (scale 1.5 +
   flip, as the README evaluates), the command's img/s (median of log.csv) against the pure train step of the same
   model at the same batch and crop, and the CPU recipe's figure to compare with. It reads CamVid and the official
   EdgeTPU-slim Cityscapes TFLite file from shared/ in the checkout or ../shared (`--shared DIR`).

smp cannot be a dependency; install it beside the venv without letting pip touch torch:

    pip install --no-deps --target /tmp/smpdeps segmentation_models_pytorch timm torchvision==0.28.0 \\
        "huggingface_hub==0.26.5" safetensors requests urllib3 idna certifi charset_normalizer pyyaml filelock \\
        fsspec packaging
    PYTHONPATH=/tmp/smpdeps python benchmarks/gpu.py --device cuda

Budget on an H200: the default run (2 rounds, CLI) takes some minutes; run `--camvid --rounds 0 --no-cli` as a
second call when one call is limited to 10 minutes. Without smp the smp rows are skipped. `--smoke` runs everything
at a tiny size (what the test suite does on CPU).
Prints one JSON line per measurement and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (amp, channels_last, compile)
    "fp32-nchw": ("off", False, False), "fp32-cl": ("off", True, False), "bf16-nchw": ("bf16", False, False),
    "bf16-cl": ("bf16", True, False), "bf16-cl-compile": ("bf16", True, True),
}


def _import_smp():
    lib = torch.library.Library("torchvision", "DEF")  # torchvision's Python models import once these exist
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import segmentation_models_pytorch as smp

    return smp, lib


def _model(library: str, *, num_classes: int = 21, checkpoint: str | None = None) -> torch.nn.Module:
    if library == "smp":
        smp, _lib = _import_smp()
        return smp.DeepLabV3Plus("resnet101", encoder_weights=None, encoder_output_stride=16, classes=num_classes)
    import deeplab
    from deeplab import ModelConfig, build_model

    if checkpoint is not None:  # the model a run trained (its config and weights)
        return deeplab.load(checkpoint)
    return build_model(ModelConfig(backbone="resnet101", output_stride=16, separable=True, num_classes=num_classes))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_step_once(args: argparse.Namespace) -> dict:
    """In this process: `args.steps` timed train steps of one library in one variant (after 3 untimed ones)."""
    device = torch.device(args.device)
    amp, channels_last, compiled = VARIANTS[args.variant]
    if args.keep_freed_memory and device.type == "cpu":
        from deeplab import retain_freed_memory

        retain_freed_memory()
    torch.manual_seed(0)
    model = _model(args.library, checkpoint=args.checkpoint).to(device).train()
    for module in model.modules():  # as `deeplab train` sets them (--recompute, its default, or --no-recompute)
        if hasattr(type(module), "recompute"):
            module.recompute = args.recompute
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=memory)
    num_classes = model.config.num_classes if hasattr(model, "config") else 21
    y = torch.randint(0, num_classes, (args.batch, args.size, args.size), device=device)
    times = []
    for i in range(args.steps + 3):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            logits = step_model(x)
        loss = F.cross_entropy(logits.float(), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= 3:  # warm-up: allocator, cuDNN autotuning, compilation
            times.append(time.perf_counter() - t0)
    return {"kind": "train_step", "library": args.library, "variant": args.variant, "device": str(device),
            "recompute": args.recompute if args.library == "deeplab" else None,
            "batch": args.batch, "size": args.size, "images_per_s": round(args.batch / statistics.median(times), 2),
            "peak_mib": round(_peak_mib(device), 1)}


@torch.inference_mode()
def inference_once(args: argparse.Namespace) -> dict:
    """In this process: images/s of one library at one batch size (ours through its fast path)."""
    device = torch.device(args.device)
    amp = VARIANTS[args.variant][0]
    model = _model(args.library).to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if args.library == "deeplab":
        from deeplab import optimize_for_inference

        model = optimize_for_inference(model, runtime="torch")
    else:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(args.steps + 3):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            model(x)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return {"kind": "inference", "library": args.library, "variant": args.variant, "device": str(device),
            "batch": args.batch, "size": args.size, "images_per_s": round(args.batch / statistics.median(times), 2),
            "ms_per_batch": round(1000 * statistics.median(times), 2)}


def _child(args: argparse.Namespace, **changes) -> dict | None:
    """Run one measurement in a fresh process; its JSON line, or None (printed) when it failed."""
    argv = [sys.executable, __file__, "--one"]
    for key, value in {**vars(args), **changes}.items():
        if key in ("one", "smoke", "rounds", "variants", "cli", "libraries", "camvid", "shared") or value is None:
            continue
        flag = f"--{key.replace('_', '-')}"
        argv += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    done = subprocess.run(argv, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(json.dumps({"failed": changes, "error": tail[:300]}), flush=True)
        return None
    return json.loads(lines[-1])


def cli_end_to_end(device: str, *, smoke: bool) -> list[dict]:
    """deeplab train / eval / predict / export on `device` in a temporary folder; each step's time and outcome."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        steps = "4" if smoke else "60"
        commands = {
            "train": ["train", "--device", device, "--out", str(run), "--steps", steps, "--quiet",
                      "--dataset-options", "length=32", "--precise-bn-images", "8"],
            "eval": ["eval", "--checkpoint", str(run / "best.pt"), "--device", device, "--quiet"],
            "predict": ["predict", str(ROOT / "docs" / "camvid-trimap.png"), "--checkpoint", str(run / "best.pt"),
                        "--device", device, "--out", str(Path(tmp) / "pred"), "--runtime", "torch", "--quiet"],
            "export": ["export", "--checkpoint", str(run / "best.pt"), "--format", "onnx", "--out",
                       str(Path(tmp) / "m.onnx")],
        }
        if device.startswith("cuda"):  # bf16 is the CUDA default (where the GPU has it); fp16 is the other choice
            commands["train-fp16"] = [*commands["train"][:4], str(Path(tmp) / "run-fp16"), *commands["train"][5:],
                                      "--amp", "fp16"]
        for name, argv in commands.items():
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "deeplab", *argv], capture_output=True, text=True)
            out = done.stdout.strip().splitlines()
            start = next((line for line in out if line.startswith("model:")), "")
            how = start.split("; writing")[0].rsplit(" (", 1)[-1].rstrip(")") if start else ""
            rows.append({"kind": "cli", "command": name, "device": device, "exit": done.returncode,
                         "seconds": round(time.perf_counter() - t0, 1),
                         "says": how or (out or [""])[-1][:120],
                         "error": (done.stderr.strip().splitlines() or [""])[-1][:200] if done.returncode else ""})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def readme_camvid_recipe() -> list[str]:
    """The arguments of README's CamVid `deeplab train` command, as written there (environment and `deeplab` dropped)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^(?:\S+=\S+ )*deeplab train --dataset camvid(?:.*\\\n)*.*$", text, flags=re.M)
    if match is None:
        raise SystemExit("README.md has no `deeplab train --dataset camvid` command")
    words = shlex.split(match.group(0).replace("\\\n", " "))
    return words[words.index("train") + 1 :]


def _with(argv: list[str], **values: str) -> list[str]:
    """`argv` with the values of the given flags (--data-root as data_root) replaced."""
    argv = list(argv)
    for key, value in values.items():
        argv[argv.index(f"--{key.replace('_', '-')}") + 1] = value
    return argv


def camvid_on_device(args: argparse.Namespace) -> dict:
    """README's CamVid recipe on `args.device`: time, val mIoU, the command's img/s against the pure train step."""
    shared = Path(args.shared)
    data, tflite = shared / "data" / "camvid", shared / "models" / "deeplab-edgetpu-slim-cityscapes-quant"
    tflite = next(iter(sorted(tflite.glob("*.tflite"))), None)
    if not data.is_dir() or tflite is None:
        row = {"kind": "camvid", "skipped": f"needs {data} and the EdgeTPU-slim Cityscapes .tflite under {shared}/models"}
        print(json.dumps(row), flush=True)
        return row
    deeplab = [sys.executable, "-m", "deeplab"]
    with tempfile.TemporaryDirectory() as tmp:
        start, run = Path(tmp) / "cityscapes.pt", Path(tmp) / "run"
        subprocess.run([*deeplab, "convert", str(tflite), str(start), "--labels", "cityscapes"], check=True,
                       capture_output=True)
        recipe = _with(readme_camvid_recipe(), data_root=str(data), init_checkpoint=str(start), out=str(run))
        if args.smoke:
            recipe = _with(recipe, steps="4", val_every="4", crop_size="65", batch_size="2")
        t0 = time.perf_counter()
        done = subprocess.run([*deeplab, "train", *recipe, "--device", args.device, "--quiet"], capture_output=True,
                              text=True)
        train_s = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(f"the CamVid recipe failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        how = next((line for line in done.stdout.splitlines() if line.startswith("model:")), "")
        scored = subprocess.run([*deeplab, "eval", "--checkpoint", str(run / "last.pt"), "--scales", "1.5", "--flip",
                                 "--device", args.device, "--json", "--quiet"], capture_output=True, text=True,
                                check=True)
        miou = json.loads(scored.stdout.strip().splitlines()[-1])["miou"]
        with open(run / "log.csv", newline="") as f:
            rates = [float(row["images_per_s"]) for row in csv.DictReader(f) if row.get("images_per_s")]
        batch, crop = int(recipe[recipe.index("--batch-size") + 1]), int(recipe[recipe.index("--crop-size") + 1])
        variant = "bf16-cl" if args.device.startswith("cuda") else "fp32-cl"  # as the command ran (its start-up line)
        step = _child(args, library="deeplab", variant=variant, kind="train_step", batch=batch, size=crop,
                      checkpoint=str(run / "last.pt"))
    command_rate = statistics.median(rates[len(rates) // 10 :]) if rates else 0.0
    row = {"kind": "camvid", "device": args.device, "train_s": round(train_s, 1), "val_miou_s1.5_flip": round(miou, 4),
           "cpu_recipe_miou": 0.731, "command_images_per_s": round(command_rate, 1),
           "train_step_images_per_s": step and step["images_per_s"],
           "command_vs_step": step and round(command_rate / step["images_per_s"], 3), "says": how.split(" (")[-1]}
    print(json.dumps(row), flush=True)
    return row


def _table(rows: list[dict]) -> str:
    lines = ["| measurement | variant | batch | deeplab img/s | smp img/s | ratio | deeplab peak MiB | smp peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    keyed = {(r["kind"], r["variant"], r["batch"], r["library"]): r for r in rows if "library" in r}
    for kind, variant, batch in sorted({k[:3] for k in keyed}):
        ours, theirs = keyed.get((kind, variant, batch, "deeplab")), keyed.get((kind, variant, batch, "smp"))
        ratio = f"{ours['images_per_s'] / theirs['images_per_s']:.2f}x" if ours and theirs else "-"
        cell = lambda r, k: str(r[k]) if r and k in r else "-"  # noqa: E731
        lines.append(f"| {kind} | {variant} | {batch} | {cell(ours, 'images_per_s')} | {cell(theirs, 'images_per_s')} "
                     f"| {ratio} | {cell(ours, 'peak_mib')} | {cell(theirs, 'peak_mib')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ", ".join(VARIANTS))
    p.add_argument("--libraries", default="deeplab,smp")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each measures every library and variant once")
    p.add_argument("--cli", action=argparse.BooleanOptionalAction, default=True, help="also the CLI end to end")
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                   help="ours recomputes its early backbone stages in the backward pass, as deeplab train does by default")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: deeplab.retain_freed_memory() in both libraries' processes, as the deeplab command does")
    p.add_argument("--camvid", action="store_true", help="also README's CamVid recipe on the device (see above)")
    p.add_argument("--shared", default=str(next((d for d in (ROOT / "shared", ROOT.parent / "shared") if d.is_dir()),
                                                ROOT.parent / "shared")),
                   help="the folder with data/camvid and models/ (default: shared/ in the checkout, else ../shared)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round: the test suite's check on CPU")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--library", default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kind", default="train_step", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps((train_step_once if args.kind == "train_step" else inference_once)(args)), flush=True)
        return
    if args.smoke:
        args.batch, args.size, args.steps, args.rounds = 2, 65, 1, min(args.rounds, 1)
    libraries = args.libraries.split(",")
    if "smp" in libraries:
        try:
            _import_smp()
        except ImportError:
            print(json.dumps({"skipped": "smp", "why": "segmentation_models_pytorch is not importable (see --help)"}))
            libraries.remove("smp")
    rows = []
    variants = [v for v in args.variants.split(",") if v]
    for _ in range(args.rounds):
        for variant in variants:
            for library in libraries:
                if library == "smp" and variant.endswith("compile"):
                    continue
                row = _child(args, library=library, variant=variant, kind="train_step")
                if row:
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    for batch in (1, args.batch) if args.rounds else ():
        for library in libraries:
            row = _child(args, library=library, variant="bf16-cl", kind="inference", batch=batch)
            if row:
                print(json.dumps(row), flush=True)
                rows.append(row)
    best = {}
    for r in rows:  # the best round of each measurement
        key = (r["kind"], r["variant"], r["batch"], r["library"])
        if key not in best or r["images_per_s"] > best[key]["images_per_s"]:
            best[key] = r
    if args.cli:
        cli_end_to_end(args.device, smoke=args.smoke)
    if args.camvid:
        camvid_on_device(args)
    info = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else os.uname().machine,
            "torch": torch.__version__, "cuda": torch.version.cuda}
    print(json.dumps({"kind": "environment", **info}))
    print(_table(list(best.values())))


if __name__ == "__main__":
    main()
