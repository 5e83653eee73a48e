"""Segmentation metrics under the DeepLab / PASCAL VOC evaluation protocol.

Everything starts from one confusion matrix (rows = ground truth, columns = prediction)
accumulated over the whole dataset: IoU is computed from the summed matrix, never averaged
per image, because that is what the papers and the VOC devkit report.

* ``confusion_matrix`` counts one batch; ``segmentation_scores`` turns a matrix into numbers.
* ``boundary_band`` / ``trimap_confusion`` give the boundary ("trimap") metric of DeepLab v1
  (fig. 5) and DeepLabv3+ (fig. 5a): mIoU measured only near label boundaries.
* ``MetricAccumulator`` streams over a dataset with memory bounded by ``K * K`` per band and
  sums across processes with ``all_reduce``.

Scores are fractions in [0, 1] (not percentages) and plain Python floats; a score that is
undefined (for instance the IoU of a class absent from both ground truth and prediction) is
``None`` rather than NaN, so the result dumps to strict JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "confusion_matrix",
    "segmentation_scores",
    "boundary_band",
    "trimap_confusion",
    "MetricAccumulator",
]


def _check_label_tensor(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices; got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold integer class indices; got dtype {x.dtype}. "
            f"For model output pass logits.argmax(dim=1), not the logits or probabilities."
        )


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")


def _out_of_range_error(name: str, values: Tensor, num_classes: int, ignore_index: int) -> ValueError:
    bad = torch.unique(values)
    shown = ", ".join(str(v) for v in bad[:5].tolist()) + (", ..." if bad.numel() > 5 else "")
    if name == "target":
        fix = (
            f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; "
            f"remap the dataset's labels, or pass the right num_classes / ignore_index"
        )
    else:
        fix = f"predictions must lie in [0, {num_classes}); check the model's num_classes"
    return ValueError(f"{name} holds value(s) {shown} outside [0, {num_classes}): {fix}")


def _confusion_from_valid(pred: Tensor, target: Tensor, valid: Tensor, *, num_classes: int,
                          ignore_index: int) -> Tensor:
    """Count (target, pred) pairs over pixels where ``valid`` is True with one bincount."""
    t = target[valid].long()
    p = pred[valid].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise _out_of_range_error("target", t[(t < 0) | (t >= num_classes)], num_classes, ignore_index)
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise _out_of_range_error("pred", p[(p < 0) | (p >= num_classes)], num_classes, ignore_index)
    # One bincount over flat (row, col) indices: linear in pixels, no K-loop, works on GPU.
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def confusion_matrix(pred: Tensor, target: Tensor, *, num_classes: int,
                     ignore_index: int = 255) -> Tensor:
    """Confusion matrix of one batch: int64 ``(K, K)``, rows = ground truth, columns = prediction.

    ``pred`` and ``target`` hold class indices and must have the same shape (any batch shape,
    e.g. ``(H, W)`` or ``(N, H, W)``). Pixels whose target equals ``ignore_index`` never count,
    whatever was predicted there. The matrix lives on the inputs' device.

    Raises:
        TypeError: if either tensor is not integer (e.g. logits were passed).
        ValueError: if the shapes differ, or a counted target / prediction lies outside
            ``[0, num_classes)``.
    """
    _check_num_classes(num_classes)
    _check_label_tensor("pred", pred)
    _check_label_tensor("target", target)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}; "
            f"pass class indices (logits.argmax(dim=1)) resized to the label's size"
        )
    valid = target != ignore_index
    return _confusion_from_valid(pred, target, valid, num_classes=num_classes,
                                 ignore_index=ignore_index)


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(
            f"got {len(names)} class_names for a {num_classes}x{num_classes} confusion matrix; "
            f"pass exactly one name per class"
        )
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class_names repeat {dupes}; names key the per-class dict, make them unique")
    return names


def segmentation_scores(conf: Tensor, *, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Scores of a confusion matrix (rows = ground truth, columns = prediction).

    Returns a JSON-serialisable dict of fractions in [0, 1]:

    * ``miou``: mean IoU over the classes present in ground truth **or** prediction. A class
      absent from both has an undefined IoU (0/0) and is left out of the mean, as the
      DeepLab / VOC protocol does; a class only predicted has IoU 0 and does count.
    * ``per_class_iou``: name -> IoU, ``None`` for a class absent from both.
    * ``per_class_accuracy``: name -> recall (TP / ground-truth pixels), ``None`` if no pixels.
    * ``pixel_accuracy``: correctly labelled pixels / all counted pixels.
    * ``mean_accuracy``: mean per-class accuracy over classes present in ground truth.
    * ``fw_iou``: IoU weighted by each class's ground-truth pixel frequency.
    * ``num_pixels``: counted pixels (int).

    Any score with nothing to average over is ``None``.
    """
    if not isinstance(conf, Tensor) or conf.dim() != 2 or conf.shape[0] != conf.shape[1]:
        shape = tuple(conf.shape) if isinstance(conf, Tensor) else type(conf).__name__
        raise ValueError(f"conf must be a square (K, K) tensor; got {shape}")
    num_classes = conf.shape[0]
    names = _class_names(class_names, num_classes)
    # float64 on CPU: counts over a large dataset exceed float32's exact integer range.
    c = conf.detach().to(device="cpu", dtype=torch.float64)
    tp = c.diagonal()
    gt = c.sum(dim=1)
    predicted = c.sum(dim=0)
    union = gt + predicted - tp
    total = float(c.sum())

    in_union = union > 0
    in_gt = gt > 0
    iou = torch.where(in_union, tp / union.clamp(min=1), torch.zeros_like(tp))
    acc = torch.where(in_gt, tp / gt.clamp(min=1), torch.zeros_like(tp))

    per_class_iou = {n: (float(iou[i]) if in_union[i] else None) for i, n in enumerate(names)}
    per_class_acc = {n: (float(acc[i]) if in_gt[i] else None) for i, n in enumerate(names)}
    return {
        "miou": float(iou[in_union].mean()) if in_union.any() else None,
        "per_class_iou": per_class_iou,
        "per_class_accuracy": per_class_acc,
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else None,
        "mean_accuracy": float(acc[in_gt].mean()) if in_gt.any() else None,
        # Only-predicted classes have zero ground-truth frequency, so they add nothing here.
        "fw_iou": float((gt / total * iou).sum()) if total > 0 else None,
        "num_pixels": int(conf.sum()),
    }


def _boundary(target: Tensor, *, ignore_index: int) -> Tensor:
    """Pixels whose label differs from a 4-neighbour's, plus every void pixel."""
    b = target == ignore_index
    horiz = target[..., :, 1:] != target[..., :, :-1]
    vert = target[..., 1:, :] != target[..., :-1, :]
    # A label change marks both pixels of the pair, so the band is symmetric about the edge.
    b[..., :, 1:] |= horiz
    b[..., :, :-1] |= horiz
    b[..., 1:, :] |= vert
    b[..., :-1, :] |= vert
    return b


def _dilate(mask: Tensor, width: int) -> Tensor:
    """Chebyshev dilation of a bool ``(..., H, W)`` mask by ``width`` pixels."""
    if width == 0:
        return mask.clone()
    h, w = mask.shape[-2:]
    k = 2 * width + 1
    x = mask.reshape(-1, 1, h, w).to(torch.float32)
    # A square max-filter is separable: a row pass then a column pass is exact and costs
    # O(width) per pixel instead of O(width^2), which matters at the 40 px bands of the papers.
    x = F.max_pool2d(x, kernel_size=(1, k), stride=1, padding=(0, width))
    x = F.max_pool2d(x, kernel_size=(k, 1), stride=1, padding=(width, 0))
    return (x > 0).reshape(mask.shape)


def _check_width(width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        raise ValueError(f"trimap width must be a non-negative int (pixels); got {width!r}")


def boundary_band(target: Tensor, *, width: int, ignore_index: int = 255) -> Tensor:
    """Bool mask of the pixels within ``width`` pixels of a label boundary (the "trimap").

    A boundary pixel is one whose label differs from one of its 4-neighbours', or a void
    (``ignore_index``) pixel. Void counts because VOC draws void as a ~5 px band around every
    object, and DeepLab v1 builds its trimap from exactly that band; on VOC the two rules mark
    nearly the same pixels, and label changes make the metric usable on datasets without a
    void outline. The image border is not a boundary. Note that large void regions (e.g.
    padding filled with ``ignore_index``) also grow bands, so evaluate on unpadded labels.

    "Within ``width`` pixels" uses the Chebyshev (chessboard) distance: the band is the
    boundary dilated by a ``(2*width + 1)`` square, computed exactly with ``max_pool2d`` (no
    distance transform needed). ``width=0`` gives the boundary pixels themselves.

    ``target`` has shape ``(..., H, W)``; each image is handled separately, so bands never
    leak across a batch. The result has the same shape.
    """
    _check_label_tensor("target", target)
    _check_width(width)
    if target.dim() < 2:
        raise ValueError(f"target must have shape (..., H, W); got {tuple(target.shape)}")
    return _dilate(_boundary(target, ignore_index=ignore_index), width)


def trimap_confusion(pred: Tensor, target: Tensor, *, num_classes: int, widths: Iterable[int],
                     ignore_index: int = 255) -> dict[int, Tensor]:
    """One confusion matrix per band width, counting only pixels inside that band.

    Void pixels lie inside every band (they are boundaries) but, as everywhere, never count.
    Returns ``{width: (K, K) int64 matrix}`` in the order the widths were given.
    """
    _check_num_classes(num_classes)
    _check_label_tensor("pred", pred)
    _check_label_tensor("target", target)
    widths = list(widths)
    for w in widths:
        _check_width(w)
    if len(set(widths)) != len(widths):
        raise ValueError(f"trimap widths repeat: {widths}; pass each width once")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}; "
            f"pass class indices (logits.argmax(dim=1)) resized to the label's size"
        )
    if target.dim() < 2:
        raise ValueError(f"target must have shape (..., H, W); got {tuple(target.shape)}")
    not_void = target != ignore_index
    band = _boundary(target, ignore_index=ignore_index)
    confs: dict[int, Tensor] = {}
    done = 0
    # Square dilations compose (w1 then w2 - w1 gives w2), so grow one band through the
    # sorted widths: the cost follows the largest width, not the sum of all of them.
    for w in sorted(widths):
        band = _dilate(band, w - done)
        done = w
        confs[w] = _confusion_from_valid(pred, target, band & not_void,
                                         num_classes=num_classes, ignore_index=ignore_index)
    return {w: confs[w] for w in widths}


class MetricAccumulator:
    """Streams confusion matrices over a dataset; memory is ``K * K`` per matrix.

    ``update`` once per batch, ``all_reduce`` once after the loop when evaluating with several
    processes (every rank must call it), then ``compute``. With ``trimap_widths`` one extra
    matrix per width counts only pixels in that boundary band (see ``boundary_band``).

    Matrices are kept on ``device`` (CPU by default); each batch is counted on its own device
    and the small ``(K, K)`` result is moved over.
    """

    def __init__(self, *, num_classes: int, ignore_index: int = 255,
                 trimap_widths: Iterable[int] = (), device: torch.device | str = "cpu") -> None:
        _check_num_classes(num_classes)
        widths = tuple(trimap_widths)
        for w in widths:
            _check_width(w)
        if len(set(widths)) != len(widths):
            raise ValueError(f"trimap_widths repeat: {list(widths)}; pass each width once")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.trimap_widths = widths
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Zero every matrix (to reuse the accumulator for another evaluation)."""
        k = self.num_classes
        self.confusion = torch.zeros(k, k, dtype=torch.int64, device=self.device)
        self.trimap = {w: torch.zeros(k, k, dtype=torch.int64, device=self.device)
                       for w in self.trimap_widths}

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch of class indices (same shape, ``(..., H, W)`` for trimap)."""
        self.confusion += confusion_matrix(pred, target, num_classes=self.num_classes,
                                           ignore_index=self.ignore_index).to(self.device)
        if self.trimap_widths:
            bands = trimap_confusion(pred, target, num_classes=self.num_classes,
                                     widths=self.trimap_widths, ignore_index=self.ignore_index)
            for w, conf in bands.items():
                self.trimap[w] += conf.to(self.device)

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Add ``other``'s counts into this accumulator in place; returns ``self``."""
        if not isinstance(other, MetricAccumulator):
            raise TypeError(f"can only merge a MetricAccumulator; got {type(other).__name__}")
        mine = (self.num_classes, self.ignore_index, self.trimap_widths)
        theirs = (other.num_classes, other.ignore_index, other.trimap_widths)
        if mine != theirs:
            raise ValueError(
                f"cannot merge accumulators with different (num_classes, ignore_index, "
                f"trimap_widths): {mine} vs {theirs}; build both with the same settings"
            )
        self.confusion += other.confusion.to(self.device)
        for w in self.trimap_widths:
            self.trimap[w] += other.trimap[w].to(self.device)
        return self

    def all_reduce(self) -> None:
        """Sum the matrices over all processes if ``torch.distributed`` is initialized.

        A no-op in a single process. It is a collective: every rank must call it, with the
        same settings, or the job hangs.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        # One collective for all matrices rather than one per band width.
        stacked = torch.stack([self.confusion, *(self.trimap[w] for w in self.trimap_widths)])
        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            stacked = stacked.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked = stacked.to(self.device)
        self.confusion = stacked[0].clone()
        self.trimap = {w: stacked[i + 1].clone() for i, w in enumerate(self.trimap_widths)}

    def compute(self, *, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """``segmentation_scores`` of the accumulated matrix plus ``"trimap": {width: miou}``.

        ``trimap`` is empty when no widths were given; a band with no counted pixel has mIoU
        ``None``. (``json.dump`` writes the integer widths as string keys.)
        """
        scores = segmentation_scores(self.confusion, class_names=class_names)
        scores["trimap"] = {w: segmentation_scores(self.trimap[w])["miou"]
                            for w in self.trimap_widths}
        return scores
