"""Evaluation plots saved as PNG: confusion matrix, per-class IoU, mIoU against trimap width.

matplotlib is an optional extra (``pip install 'deeplab[plots]'``) and is imported inside each
function, so ``import deeplab.plots`` never needs it. Figures are drawn on an explicit Agg
canvas instead of through ``pyplot``: no global backend switch, no figure registry to leak,
safe in headless jobs and threads.

Scores are taken as fractions in [0, 1], as ``deeplab.metrics`` returns them, and drawn as
percentages, as the papers print them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["plot_confusion_matrix", "plot_per_class_iou", "plot_trimap"]


def _new_figure(figsize: tuple[float, float]) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "deeplab.plots needs matplotlib; install it with: pip install 'deeplab[plots]'"
        ) from err
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to fig; savefig then renders with Agg
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
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
