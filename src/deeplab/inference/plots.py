"""Plots saved as PNG: confusion matrix, per-class IoU, mIoU against trimap width (evaluation); training curves
and the validation picture of a run folder (`plot_training_curves`, `draw_predictions`).

matplotlib is an optional extra (``pip install 'deeplab[plots]'``) and is imported inside each
function, so ``import deeplab.inference.plots`` never needs it. Figures are drawn on an explicit Agg
canvas instead of through ``pyplot``: no global backend switch, no figure registry to leak,
safe in headless jobs and threads. `draw_predictions` needs only Pillow.

Scores are taken as fractions in [0, 1], as ``deeplab.inference.metrics`` returns them, and drawn as
percentages, as the papers print them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["draw_predictions", "plot_confusion_matrix", "plot_per_class_iou", "plot_training_curves", "plot_trimap"]


def _new_figure(figsize: tuple[float, float]) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "deeplab.inference.plots needs matplotlib; install it with: pip install 'deeplab[plots]'"
        ) from err
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to fig; savefig then renders with Agg
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    """Through a temporary file and a rename: a run folder's pictures are redrawn while someone may look at them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)
    return path


def plot_confusion_matrix(conf: Tensor, *, path: str | Path,
                          class_names: Sequence[str] | None = None) -> Path:
    """Row-normalised confusion matrix (each ground-truth row sums to 100%) as a PNG.

    Rows are ground truth, columns prediction, as ``metrics.confusion_matrix`` returns them.
    Rows with no ground-truth pixel stay blank. Cells are annotated with percentages up to
    25 classes; beyond that the figure would be unreadable, so only the colours remain.
    Returns the path written.
    """
    if not isinstance(conf, Tensor) or conf.dim() != 2 or conf.shape[0] != conf.shape[1]:
        shape = tuple(conf.shape) if isinstance(conf, Tensor) else type(conf).__name__
        raise ValueError(f"conf must be a square (K, K) tensor; got {shape}")
    k = conf.shape[0]
    names = [str(i) for i in range(k)] if class_names is None else [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"got {len(names)} class_names for {k} classes; pass one name per class")

    c = conf.detach().to(device="cpu", dtype=torch.float64)
    rows = c.sum(dim=1, keepdim=True)
    # NaN (not 0) for empty rows so they render blank instead of claiming 0% recall.
    norm = torch.where(rows > 0, c / rows.clamp(min=1), torch.full_like(c, float("nan")))
    pct = (100.0 * norm).numpy()

    side = min(max(6.0, 0.45 * k + 2.0), 40.0)
    fig = _new_figure((side, side))
    ax = fig.add_subplot()
    im = ax.imshow(pct, cmap="Blues", vmin=0.0, vmax=100.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="% of ground-truth pixels")
    fontsize = 9 if k <= 25 else max(4, int(9 - (k - 25) / 15))
    ax.set_xticks(range(k), labels=names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(k), labels=names, fontsize=fontsize)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("Confusion matrix (row-normalised)")
    if k <= 25:
        for i in range(k):
            for j in range(k):
                v = pct[i, j]
                if v == v and v >= 0.5:  # skip NaN and near-zero cells to keep it legible
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if v > 50 else "black")
    return _save(fig, path)


def plot_per_class_iou(per_class_iou: Mapping[str, float | None], *, path: str | Path,
                       miou: float | None = None, sort: bool = False) -> Path:
    """Bar chart of per-class IoU (%) with a dashed line at the mIoU.

    ``per_class_iou`` is ``segmentation_scores(...)["per_class_iou"]``; classes whose IoU is
    ``None`` (absent from ground truth and prediction) get no bar and an "n/a" mark. ``miou``
    defaults to the mean of the defined IoUs, which is the protocol's mIoU. ``sort=True``
    orders bars from best to worst instead of class order. Returns the path written.
    """
    items = list(per_class_iou.items())
    if not items:
        raise ValueError("per_class_iou is empty; pass segmentation_scores(...)['per_class_iou']")
    defined = [v for _, v in items if v is not None]
    if miou is None and defined:
        miou = sum(defined) / len(defined)
    if sort:
        items.sort(key=lambda kv: -1.0 if kv[1] is None else kv[1], reverse=True)

    names = [str(n) for n, _ in items]
    values = [0.0 if v is None else 100.0 * v for _, v in items]
    fig = _new_figure((min(max(6.0, 0.35 * len(items) + 2.0), 40.0), 4.5))
    ax = fig.add_subplot()
    ax.bar(range(len(items)), values, color="tab:blue")
    for i, (_, v) in enumerate(items):
        if v is None:
            ax.text(i, 1.0, "n/a", ha="center", va="bottom", rotation=90, fontsize=7, color="gray")
    if miou is not None:
        ax.axhline(100.0 * miou, color="tab:red", linestyle="--", label=f"mIoU {100.0 * miou:.1f}%")
        ax.legend(loc="upper right")
    ax.set_xticks(range(len(items)), labels=names, rotation=90,
                  fontsize=9 if len(items) <= 40 else 6)
    ax.set_xlim(-0.6, len(items) - 0.4)
    ax.set_ylim(0.0, 100.0)
    ax.set_ylabel("IoU (%)")
    ax.set_title("Per-class IoU")
    return _save(fig, path)


def plot_trimap(curves: Mapping[str, Mapping[int, float | None]], *, path: str | Path,
                title: str | None = None) -> Path:
    """mIoU (%) against trimap band width (px), one line per checkpoint (DeepLabv3+ fig. 5a).

    ``curves`` maps a label (e.g. a checkpoint name) to ``{width: miou}`` as returned by
    ``MetricAccumulator.compute()["trimap"]``; widths may be ints or their string form (as
    read back from JSON). ``None`` points (no pixel in the band) are skipped. Returns the
    path written.
    """
    if not curves:
        raise ValueError("curves is empty; pass {label: {width: miou}} for at least one model")
    fig = _new_figure((6.0, 4.5))
    ax = fig.add_subplot()
    for label, curve in curves.items():
        points = sorted((int(w), 100.0 * v) for w, v in curve.items() if v is not None)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=str(label))
    ax.set_xlabel("trimap width (pixels)")
    ax.set_ylabel("mean IoU (%)")
    ax.set_title(title or "Accuracy near object boundaries")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def _read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_training_curves(log_csv: str | Path, val_csv: str | Path, path: str | Path) -> Path | None:
    """curves.png of a run folder: training loss against step (with a moving average) and validation mIoU and pixel
    accuracy against step. Returns None (and draws nothing) without matplotlib."""
    try:
        fig = _new_figure((11, 4))
    except ImportError:
        return None
    steps = [(int(r["step"]), float(r["loss"])) for r in _read_csv(Path(log_csv))]
    vals = [(int(r["step"]), r["miou"], r["pixel_accuracy"]) for r in _read_csv(Path(val_csv))]
    ax_loss, ax_val = fig.subplots(1, 2)
    if steps:
        x, y = zip(*steps)
        ax_loss.plot(x, y, color="0.75", linewidth=0.8, label="per step")
        k = max(1, len(y) // 50)
        if k > 1:
            smooth = [sum(y[max(0, i - k + 1) : i + 1]) / len(y[max(0, i - k + 1) : i + 1]) for i in range(len(y))]
            ax_loss.plot(x, smooth, color="C0", linewidth=1.5, label=f"mean of {k} steps")
        ax_loss.legend(loc="upper right")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("Training loss")
    ax_loss.grid(alpha=0.3)
    points = [(s, float(m), float(a)) for s, m, a in vals if m != "-"]
    if points:
        x, miou, acc = zip(*points)
        ax_val.plot(x, [100 * v for v in miou], marker="o", color="C1", label="mIoU")
        ax_val.plot(x, [100 * v for v in acc], marker=".", linestyle="--", color="C2", label="pixel accuracy")
        for s, m in zip(x, miou):
            ax_val.annotate(f"{100 * m:.1f}", (s, 100 * m), textcoords="offset points", xytext=(0, 6), ha="center",
                            fontsize=8)
        ax_val.legend(loc="lower right")
    ax_val.set_xlim(left=0, right=max([s for s, _ in steps] + [1]))
    ax_val.set_ylim(0, 100)
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("%")
    ax_val.set_title("Validation")
    ax_val.grid(alpha=0.3)
    return _save(fig, path)


_TILE = 320  # pixels on the longer side of each picture in predictions.png


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


@torch.no_grad()
def draw_predictions(model: Any, dataset: Any, path: str | Path, *, count: int, device: Any = "cpu",
                     step: int | None = None) -> Path | None:
    """predictions.png: one row per validation image (image | ground truth | prediction, each about 320 px on its
    longer side, named with the image's file and mIoU), column titles, and a legend of the classes shown."""
    import numpy as np
    from PIL import Image, ImageDraw

    from ..data import colorize
    from ..data.bands import display_rgb
    from .metrics import confusion_matrix, segmentation_scores

    n = min(count, len(dataset))
    if n == 0:
        return None
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    files = getattr(dataset, "files", None) or []
    rows, shown = [], set()
    ignore = getattr(dataset, "ignore_index", 255)
    try:
        for i in range(n):
            image, gt = dataset.load(i)
            x, _ = dataset[i]
            pred = model(x[None].to(device, dtype=dtype)).argmax(1)[0].cpu().numpy().astype(np.uint8)
            scores = segmentation_scores(
                confusion_matrix(torch.from_numpy(pred)[None].long(), torch.from_numpy(gt)[None].long(),
                                 num_classes=len(dataset.class_names), ignore_index=ignore),
                class_names=dataset.class_names)
            shown |= set(np.unique(gt).tolist()) | set(np.unique(pred).tolist())
            name = Path(files[i][0]).name if i < len(files) else f"sample {i}"
            miou = "-" if scores["miou"] is None else f"{100 * scores['miou']:.1f}%"
            rgb = getattr(getattr(dataset, "export", None), "rgb_bands", None)
            rows.append((f"{name}   mIoU {miou}", [Image.fromarray(display_rgb(image, rgb=rgb)).convert("RGB")]
                         + [colorize(m, dataset.palette).convert("RGB") for m in (gt, pred)]))
    finally:
        model.train(was_training)
    sizes = [(max(1, round(t[0].width * _TILE / max(t[0].size))), max(1, round(t[0].height * _TILE / max(t[0].size))))
             for _, t in rows]
    tile_w = max(sw for sw, _ in sizes)
    font, small = _font(18), _font(14)
    pad, title_h, caption_h = 8, 28, 22
    names = list(dataset.class_names)
    legend = [(names[c], tuple(dataset.palette.colors[c])) for c in sorted(shown) if c < len(names)]
    if ignore in shown:
        legend.append(("ignore", tuple(dataset.palette.void_color)))
    width = 3 * tile_w + 4 * pad
    per_line = max(1, width // 170)
    legend_h = 24 * ((len(legend) + per_line - 1) // per_line) + pad
    height = title_h + sum(caption_h + sh + pad for _, sh in sizes) + legend_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    titles = ("image", "ground truth", "prediction" + (f" (step {step})" if step is not None else ""))
    for j, title in enumerate(titles):
        draw.text((pad + j * (tile_w + pad), 4), title, fill="black", font=font)
    y = title_h
    for (caption, tiles), (sw, sh) in zip(rows, sizes):
        draw.text((pad, y + 2), caption, fill=(60, 60, 60), font=small)
        y += caption_h
        for j, tile in enumerate(tiles):
            # Masks keep hard edges; the image is resampled smoothly when it shrinks.
            method = Image.Resampling.LANCZOS if (j == 0 and sw < tile.width) else Image.Resampling.NEAREST
            canvas.paste(tile.resize((sw, sh), method), (pad + j * (tile_w + pad), y))
        y += sh + pad
    for k, (label, color) in enumerate(legend):
        lx, ly = pad + (k % per_line) * 170, y + (k // per_line) * 24
        draw.rectangle((lx, ly + 2, lx + 16, ly + 18), fill=color, outline="black")
        draw.text((lx + 22, ly + 1), label[:18], fill="black", font=small)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path
