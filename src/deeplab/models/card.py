"""The model card (README.md) of a model folder, written from what the model and its training run recorded.

YAML front matter the Hugging Face Hub reads (library_name, tags, pipeline_tag, license, datasets, model-index with
the validation mIoU), then for people: the model line, the classes, how to load it, the training command, the data,
the final and best validation metrics with per-class IoU, the evaluation protocol, the hardware and time, and for a
converted official model its source file. A field nobody recorded is left out rather than guessed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .config import ModelConfig

# The Hub's names for the public datasets deeplab reads (its `datasets` metadata); the others (a folder of the
# user's, the synthetic shapes, an ArcGIS export) have none.
HUB_DATASETS = {"voc": "pascal-voc-2012", "cityscapes": "cityscapes", "ade20k": "ade20k", "camvid": "camvid"}
DATASET_NAMES = {"voc": "PASCAL VOC 2012", "cityscapes": "Cityscapes", "ade20k": "ADE20K", "camvid": "CamVid",
                 "synthetic": "synthetic shapes (built in)", "folder": "a folder of images and masks",
                 "classified-tiles": "an ArcGIS Classified Tiles export"}


def model_line(cfg: ModelConfig) -> str:
    """`deeplab profile`'s summary of an architecture: variant, backbone, output stride, rates."""
    rates = "fc6 rate" if cfg.head == "v1-largefov" else "ASPP rates"
    width = f" (depth multiplier {cfg.depth_multiplier:g})" if cfg.depth_multiplier != 1.0 else ""
    return (f"{cfg.variant} {cfg.backbone}{width}, output stride {cfg.output_stride}, {rates} {cfg.rates}"
            f"{', separable' if cfg.separable else ''}{', PointRend' if cfg.pointrend else ''}")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _best_row(path: Path) -> dict[str, str] | None:
    """The row of val.csv with the highest mIoU (the validation best.pt was saved at)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r.get("miou") not in (None, "", "-")]
        return max(rows, key=lambda r: float(r["miou"])) if rows else None
    except (OSError, ValueError, KeyError):
        return None


def _q(value: Any) -> str:
    """A YAML scalar: JSON's double-quoted strings and numbers are YAML too."""
    return json.dumps(value)


def _pct(v: Any) -> str:
    return "-" if v is None or v == "-" else f"{100 * float(v):.2f}"


def training_run_of(checkpoint: Path) -> Path | None:
    """The training run folder a checkpoint file lies in (`deeplab train` writes best.pt and last.pt beside its
    config.json), or None."""
    config = _json(checkpoint.parent / "config.json") if checkpoint.is_file() else None
    return checkpoint.parent if isinstance(config, dict) and "train" in config and "model" in config else None


def run_record(run: Path | None) -> dict[str, Any]:
    """What a training run folder recorded: its config.json, metrics.json (final validation), the best row of
    val.csv and data_report.json; missing files are left out."""
    if run is None:
        return {}
    record = {"config": _json(run / "config.json"), "final": _json(run / "metrics.json"),
              "best_row": _best_row(run / "val.csv"), "report": _json(run / "data_report.json")}
    return {k: v for k, v in record.items() if v}


def front_matter(data: dict[str, Any], *, name: str, license: str | None, train: dict[str, Any],
                 best: dict[str, Any] | None) -> list[str]:
    cfg = ModelConfig.from_dict(data["model_config"])
    tags = ["semantic-segmentation", "deeplab", cfg.variant.lower().replace(" ", "-").replace("+", "plus"),
            cfg.backbone, "pytorch", "safetensors"]
    lines = ["---", "library_name: deeplab", f"license: {_q(license or 'other')}", "pipeline_tag: image-segmentation",
             "tags:"] + [f"- {_q(t)}" for t in dict.fromkeys(tags)]
    dataset = train.get("dataset")
    if dataset in HUB_DATASETS:
        lines += ["datasets:", f"- {_q(HUB_DATASETS[dataset])}"]
    if best and best.get("miou") is not None and dataset:
        metrics = [("mean_iou", "mIoU", best["miou"]), ("accuracy", "pixel accuracy", best.get("pixel_accuracy"))]
        lines += [
            "model-index:", f"- name: {_q(name)}", "  results:", "  - task:", "      type: image-segmentation",
            "      name: Semantic Segmentation", "    dataset:", f"      type: {_q(HUB_DATASETS.get(dataset, dataset))}",
            f"      name: {_q(DATASET_NAMES.get(dataset, dataset))}", f"      split: {_q(train.get('val_split', 'val'))}",
            "    metrics:",
        ]
        for kind, label, value in metrics:
            if value is not None:
                lines += [f"    - type: {kind}", f"      name: {_q(label)}", f"      value: {round(float(value), 4)}"]
    return lines + ["---", ""]


def model_card(data: dict[str, Any], *, run: Path | None = None, extra: dict[str, Any] | None = None,
               license: str | None = None, picture: bool = False, name: str = "deeplab-model") -> str:
    """README.md for a model folder holding `data` (a checkpoint's dict, `state_dict` included for the parameter
    count); `run`: the training run folder it came from; `extra`: `command`, `seconds`, `device`, `hardware` of the
    training when the caller knows them."""
    extra = extra or {}
    rec = run_record(run)
    cfg = ModelConfig.from_dict(data["model_config"])
    pre = data["preprocessing"]
    train = data.get("train_config") or (rec.get("config") or {}).get("train") or {}
    best = data.get("metrics") or None
    final = rec.get("final")
    params = sum(t.numel() for k, t in data["state_dict"].items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    out = front_matter(data, name=name, license=license, train=train, best=best or final)
    kind = (", converted from an official model" if data.get("source") else ", trained with deeplab" if train
            else "")
    out += [f"# {name}", "", f"A {cfg.variant} semantic segmentation model ({cfg.num_classes} classes){kind}.", "",
            "## Model", "",
            f"- {model_line(cfg)}; {cfg.num_classes} classes, {cfg.in_channels} input bands; "
            f"{params / 1e6:.2f} M parameters",
            f"- input: (x - mean) / std per band in 0-255 units, mean {_nums(pre['mean'])}, std {_nums(pre['std'])}; "
            + (f"fixed input size {pre['input_size'][0]}x{pre['input_size'][1]}" if pre.get("input_size")
               else "any input size"),
            f"- align_corners={cfg.align_corners}" + ("; activations rounded as the uint8 TF Lite file rounds them"
                                                      if data.get("activation_rounding") else ""),
            "", "| index | class | value | colour |", "|---:|---|---:|---|"]
    colors, values = data.get("class_colors"), data.get("class_values")
    for i, cls in enumerate(data["class_names"]):
        value = values[i] if values else i
        colour = "-" if not colors or min(colors[i]) < 0 else "#{:02x}{:02x}{:02x}".format(*colors[i])
        out.append(f"| {i} | {cls} | {value} | {colour} |")
    out += ["", "## Use", "", "```python", "import deeplab", "", f'model = deeplab.from_pretrained("{name}")  '
            "# a local folder, or a Hub repo id (pip install 'deeplab[hub]')", "```", "", "```",
            f"deeplab predict --checkpoint {name} IMAGES --out masks/", "```", ""]
    if data.get("source"):
        out += ["## Source", "", f"Converted with `deeplab convert` from `{Path(str(data['source'])).name}`."]
        conversion = data.get("conversion") or {}
        if conversion.get("agreement") is not None:
            out.append(f"Argmax agreement with the original runtime: {100 * float(conversion['agreement']):.2f}%"
                       + (f" ({conversion['detail']})" if conversion.get("detail") else "") + ".")
        elif conversion.get("detail"):  # the conversion said why it measured nothing
            out.append(f"Agreement with the original runtime: {conversion['detail']}.")
        out.append("")
    out += _training(train, rec, extra)
    out += _evaluation(train, best, final, rec.get("best_row"), data["class_names"])
    if picture:
        out += ["## Predictions", "", "Validation images: image | ground truth | prediction.", "",
                "![validation predictions](predictions.png)", ""]
    return "\n".join(out)


def _nums(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _training(train: dict[str, Any], rec: dict[str, Any], extra: dict[str, Any]) -> list[str]:
    if not train:
        return []
    command = extra.get("command") or (rec.get("config") or {}).get("command")
    dataset = train.get("dataset", "?")
    out = ["## Training", ""]
    if command:
        out += ["```", command, "```", ""]
    out.append(f"- data: {DATASET_NAMES.get(dataset, dataset)} (`--dataset {dataset}`), trained on split "
               f"{train.get('train_split', 'train')}, validated on {train.get('val_split', 'val')}")
    out.append(f"- {train.get('steps')} steps of {train.get('batch_size')} images, crop {train.get('crop_size')}, "
               f"learning rate {train.get('lr')} (poly), loss {train.get('loss', 'ce')}"
               + (", class weights " + _nums(train["class_weights"]) if isinstance(train.get("class_weights"), list)
                  else ""))
    final = rec.get("final") or {}
    seconds = extra.get("seconds", final.get("train_seconds"))
    hardware = extra.get("hardware", final.get("hardware"))
    if seconds is not None or hardware:
        out.append("- trained" + (f" in {float(seconds) / 60:.1f} min" if seconds is not None else "")
                   + (f" on {hardware}" if hardware else ""))
    report = rec.get("report")
    if report:
        shares = report.get("class_pixel_shares") or []
        out.append("- class pixel shares (training masks): " + ", ".join(
            f"{n} {100 * s:.1f}%" for n, s in zip(report.get("classes", []), shares)))
        out.append("- splits: " + ", ".join(f"{name} {st.get('images')} images"
                                            for name, st in (report.get("splits") or {}).items()))
    return out + [""]


def _evaluation(train: dict[str, Any], best: dict[str, Any] | None, final: dict[str, Any] | None,
                best_row: dict[str, str] | None, class_names: list[str]) -> list[str]:
    columns = []  # (title, {"miou", "pixel_accuracy", "per_class_iou"})
    if final and final.get("miou") is not None:
        columns.append((f"final (step {final.get('step', '?')})", final))
    if best and best.get("miou") is not None and (not final or best.get("step") != final.get("step")):
        columns.append((f"best (step {best.get('step', '?')}), these weights", best))
    elif best_row and not best and (not final or str(final.get("step")) != best_row.get("step")):
        row = {"miou": best_row["miou"], "pixel_accuracy": best_row.get("pixel_accuracy"),
               "per_class_iou": {n: best_row.get(f"iou_{n}") for n in class_names}}
        columns.append((f"best (step {best_row.get('step')})", row))
    if not columns:
        return []
    settings = (columns[0][1].get("settings") or {})
    scales = settings.get("scales") or train.get("val_scales") or [1.0]
    flip = settings.get("flip", train.get("val_flip", False))
    split = train.get("val_split", "val")
    out = ["## Evaluation", "",
           f"Validation split {split}, at scales {', '.join(f'{float(s):g}' for s in scales)}"
           f"{' with flipping' if flip else ', no flipping'}"
           + (f", output stride {settings['output_stride']}" if settings.get("output_stride") else "")
           + (f", {columns[0][1]['num_images']} images" if columns[0][1].get("num_images") else "") + ". IoU in %.",
           "", "| | " + " | ".join(t for t, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    out.append("| **mIoU** | " + " | ".join(_pct(m.get("miou")) for _, m in columns) + " |")
    out.append("| pixel accuracy | " + " | ".join(_pct(m.get("pixel_accuracy")) for _, m in columns) + " |")
    for n in class_names:
        out.append(f"| {n} | " + " | ".join(_pct((m.get("per_class_iou") or {}).get(n)) for _, m in columns) + " |")
    return out + [""]


__all__ = ["model_card", "model_line", "run_record", "training_run_of"]
