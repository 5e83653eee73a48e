"""Inference on normalised image batches: one pass, sliding window, multi-scale + flip, fixed model input size.

Everything here takes a normalised ``(N, 3, H, W)`` float batch (what ``EvalTransform`` / ``normalize`` give) and
any module that maps such a batch to ``(N, K, h, w)`` logits at its input size, so the stitching and averaging can
be checked with hand-made fake models. ``evaluate.py`` and ``predict.py`` are the two callers.

The choices, written down once:

* **Multi-scale and flip average softmax probabilities**, as TF DeepLab's ``predict_labels_multi_scale`` does
  (it sums ``tf.nn.softmax(logits)`` over scales and the flipped copy, then takes the argmax). Each pass's logits
  are resized bilinearly to the output size *before* the softmax, also as TF does.
* **Scaled sizes** follow the model's ``align_corners``: ``(d - 1) * s + 1`` (truncated) when it is True, so a
  16k+1 crop stays of that form as TF's ``scale_dimension`` keeps it; ``round(d * s)`` otherwise.
* **Aligned network input** (models with ``align_corners=True``, TF's convention): the network runs on the image
  padded at the bottom / right with 0 (the mean pixel once normalised) to the next size of the form
  ``output_stride * k + 1``, and its logits are cropped back, as TF DeepLab's eval and vis pad every image to
  ``eval_crop_size`` (513, 1025 x 2049: all ``16k + 1``). Only at those sizes do the strided features fall on input
  pixels ``0, 16, 32, ...`` that ``align_corners=True`` upsampling assumes; at other sizes the upsampled logits drift
  by up to half a feature cell across the image (on CamVid val at 1.5x, 540 x 720 frames, a DeepLabv3+
  MobileNet-EdgeTPU trained on 385-pixel crops scored 6.1 mIoU points lower unpadded: docs/evaluation.md). A static graph
  (``static_input``: an exported ``.tflite`` file) runs its own size only and is not padded; an image already of
  that form (a fixed input size of 513 or 257) is not changed.
* **Sliding window**: tiles of ``window x window`` start every ``floor(window * (1 - overlap))`` pixels; the last
  tile of a row or column is shifted back to end at the border, so tiles never hang over the image. An image
  side shorter than the window is padded at the bottom / right with 0 (the mean pixel once normalised), so the
  model always sees ``window x window``. The logits of overlapping tiles are summed and divided by how many tiles
  cover each pixel. With scales, each scaled image is tiled with the same window (the window is in model pixels).
* **Fixed input size** (``input_size``, e.g. the 257x257 of a converted TFLite model): the image is resized to it
  before anything else and every pass's logits are resized straight back to the image's size. This is how the TF
  DeepLab demo feeds fixed-size models; scales are then relative to ``input_size``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "aligned_size",
    "model_align_corners",
    "network_multiple",
    "run_network",
    "scaled_size",
    "segment",
    "segment_probs",
    "segment_probs_batch",
    "sliding_window_logits",
    "window_starts",
]


def model_align_corners(model: nn.Module) -> bool:
    """The model's resize convention (``model.config.align_corners``); False for modules without a config."""
    return bool(getattr(getattr(model, "config", None), "align_corners", False))


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


def check_options(*, scales: Sequence[float], window: int | Sequence[int] | None, overlap: float) -> tuple[float, ...]:
    """Validate the inference options shared by eval and predict; returns the scales as a tuple of floats."""
    scales = tuple(float(s) for s in scales)
    if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise ValueError(f"scales must be one or more positive numbers, e.g. 0.5,0.75,1.0; got {scales!r}")
    if window is not None:
        _pair(window, "window")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1) (a fraction of the window), got {overlap!r}; e.g. 0.33")
    return scales


def scaled_size(size: tuple[int, int], scale: float, *, align_corners: bool) -> tuple[int, int]:
    """The (H, W) an image of `size` has at `scale` (see the module docstring); at least 1 x 1."""
    if align_corners:
        return tuple(max(1, int((d - 1) * scale + 1)) for d in size)  # type: ignore[return-value]
    return tuple(max(1, int(round(d * scale))) for d in size)  # type: ignore[return-value]


def _resize(x: torch.Tensor, size: tuple[int, int], *, align_corners: bool) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Tile offsets along one side: 0, stride, 2*stride, ..., and a last tile ending exactly at `length`.

    A side no longer than the window gets one tile at 0 (the caller pads it up to the window).
    """
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def network_multiple(model: nn.Module, *, align_corners: bool) -> int | None:
    """The stride whose multiples plus one the network input is padded to (the module docstring's aligned input):
    the model's output stride when it resizes with align_corners=True and takes any input size, else None."""
    if not align_corners or getattr(model, "static_input", False):
        return None
    stride = getattr(getattr(model, "config", None), "output_stride", None)
    return int(stride) if stride else None


def aligned_size(length: int, multiple: int | None) -> int:
    """The smallest `multiple * k + 1` >= `length` (`length` itself without a multiple)."""
    if not multiple:
        return length
    return -(-(length - 1) // multiple) * multiple + 1


def run_network(model: nn.Module, x: torch.Tensor, *, multiple: int | None = None) -> torch.Tensor:
    """`model(x)` with `x` padded at the bottom / right with 0 to `aligned_size` on both sides and the logits cropped
    back to `x`'s size (no padding without a multiple, or when `x` is already of that size)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ph, pw = aligned_size(h, multiple), aligned_size(w, multiple)
    if (ph, pw) == (h, w):
        return model(x)
    return model(F.pad(x, (0, pw - w, 0, ph - h), value=0.0))[:, :, :h, :w]


def sliding_window_logits(
    model: nn.Module, x: torch.Tensor, *, window: int | Sequence[int], overlap: float = 0.33,
    multiple: int | None = None,
) -> torch.Tensor:
    """Logits of `x` (N, 3, H, W) stitched from window x window tiles (see the module docstring).

    Returns (N, K, H, W): at each pixel the mean of the logits of every tile covering it. Tiles run one at a time
    (`run_network`: padded to `multiple * k + 1` when given), so memory holds one tile's activations plus the
    (N, K, H, W) sums.
    """
    wh, ww = _pair(window, "window")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1) (a fraction of the window), got {overlap!r}; e.g. 0.33")
    n, _, h, w = x.shape
    ph, pw = max(h, wh), max(w, ww)
    if (ph, pw) != (h, w):
        # 0 is the mean pixel after normalisation: the padding looks like nothing to the model.
        x = F.pad(x, (0, pw - w, 0, ph - h), value=0.0)
    stride_h = max(1, int(wh * (1.0 - overlap)))
    stride_w = max(1, int(ww * (1.0 - overlap)))
    sums: torch.Tensor | None = None
    count = torch.zeros(1, 1, ph, pw, dtype=x.dtype, device=x.device)
    for top in window_starts(ph, wh, stride_h):
        for left in window_starts(pw, ww, stride_w):
            out = run_network(model, x[:, :, top : top + wh, left : left + ww], multiple=multiple)  # (N, K, wh, ww)
            if sums is None:
                sums = out.new_zeros(n, out.shape[1], ph, pw)
            sums[:, :, top : top + wh, left : left + ww] += out
            count[:, :, top : top + wh, left : left + ww] += 1
    assert sums is not None  # at least one tile always runs
    return (sums / count)[:, :, :h, :w]


def autocast(device_type: str, amp: str):
    """torch.autocast for ``amp`` = "off", "bf16" (CPU or CUDA) or "fp16" (CUDA only)."""
    if amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"amp must be 'off', 'bf16' or 'fp16', got {amp!r}")
    if amp == "off":
        return torch.autocast(device_type, enabled=False)
    if amp == "fp16" and device_type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; on CPU use amp='bf16'")
    return torch.autocast(device_type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _logits(
    model: nn.Module, x: torch.Tensor, *, window: int | Sequence[int] | None, overlap: float, amp: str,
    multiple: int | None,
) -> torch.Tensor:
    with autocast(x.device.type, amp):
        out = (run_network(model, x, multiple=multiple) if window is None else
               sliding_window_logits(model, x, window=window, overlap=overlap, multiple=multiple))
    return out.float()  # resize and softmax in float32 whatever the autocast dtype


@torch.no_grad()
def segment_probs(
    model: nn.Module,
    x: torch.Tensor,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int | Sequence[int] | None = None,
    overlap: float = 0.33,
    input_size: Sequence[int] | None = None,
    align_corners: bool | None = None,
    amp: str = "off",
) -> torch.Tensor:
    """Class probabilities (N, K, H, W) of a normalised batch `x` (N, C, H, W; C the model's bands), at `x`'s size.

    The softmax of every (scale, flip) pass is averaged (TF DeepLab's rule; see the module docstring). `flip` adds
    each scale's horizontally mirrored image, whose output is mirrored back. `window` tiles each pass (sliding
    window, `overlap` a fraction of the window). `input_size` (H, W) resizes the image before everything else.
    `align_corners` defaults to the model's own (`model.config.align_corners`). `amp="bf16"` runs the network under
    bf16 autocast (resizing and softmax stay float32). The model should be in eval mode.
    """
    scales = check_options(scales=scales, window=window, overlap=overlap)
    bands = int(getattr(getattr(model, "config", None), "in_channels", 3))
    if x.dim() != 4 or x.shape[1] != bands:
        raise ValueError(f"x must be a normalised (N, {bands}, H, W) batch (the model's bands), got shape {tuple(x.shape)}")
    ac = model_align_corners(model) if align_corners is None else bool(align_corners)
    multiple = network_multiple(model, align_corners=ac)
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    out_size = (int(x.shape[-2]), int(x.shape[-1]))
    base = x if input_size is None else _resize(x, _pair(input_size, "input_size"), align_corners=ac)
    base_size = (int(base.shape[-2]), int(base.shape[-1]))
    total: torch.Tensor | None = None
    passes = 0
    for scale in scales:
        xs = base if scale == 1.0 else _resize(base, scaled_size(base_size, scale, align_corners=ac), align_corners=ac)
        for mirrored in (False, True) if flip else (False,):
            logits = _logits(model, xs.flip(-1) if mirrored else xs, window=window, overlap=overlap, amp=amp,
                             multiple=multiple)
            if mirrored:
                logits = logits.flip(-1)
            logits = _resize(logits, out_size, align_corners=ac)  # (N, K, H, W)
            probs = logits.float().softmax(dim=1)
            total = probs if total is None else total.add_(probs)
            passes += 1
    assert total is not None
    return total.div_(passes)


def segment_probs_batch(
    model: nn.Module,
    xs: Sequence[torch.Tensor],
    *,
    input_size: Sequence[int] | None = None,
    align_corners: bool | None = None,
    amp: str = "off",
) -> Iterator[torch.Tensor]:
    """`segment_probs` at one scale, without flip or window, of several images in one network call: `xs` are
    normalised (1, C, H, W) images whose network inputs share one size (all of one size, or any sizes with a fixed
    `input_size`). Yields each image's (1, K, H, W) probabilities, what `segment_probs` gives for that image alone, by
    the same steps; only the network sees a batch (the service's dynamic batching). One at a time: a caller that keeps
    only the argmax holds one image's probabilities, not the batch's."""
    if not xs:
        return
    ac = model_align_corners(model) if align_corners is None else bool(align_corners)
    param = next(model.parameters(), None)
    if param is not None:
        xs = [x.to(device=param.device, dtype=param.dtype) for x in xs]
    size = None if input_size is None else _pair(input_size, "input_size")
    bases = [x if size is None else _resize(x, size, align_corners=ac) for x in xs]
    if len({tuple(b.shape[1:]) for b in bases}) > 1:
        raise ValueError(f"one batch needs one network input size, got {sorted({tuple(b.shape[-2:]) for b in bases})}")
    with torch.no_grad():
        logits = _logits(model, torch.cat(bases), window=None, overlap=0.0, amp=amp,
                         multiple=network_multiple(model, align_corners=ac))  # (N, K, h, w)
    del bases
    for i, x in enumerate(xs):
        with torch.no_grad():
            resized = _resize(logits[i : i + 1], (int(x.shape[-2]), int(x.shape[-1])), align_corners=ac)
            probs = resized.float().softmax(dim=1)
        del resized
        yield probs


def segment(
    model: nn.Module,
    x: torch.Tensor,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int | Sequence[int] | None = None,
    overlap: float = 0.33,
    input_size: Sequence[int] | None = None,
    align_corners: bool | None = None,
    amp: str = "off",
) -> torch.Tensor:
    """Class indices (N, H, W) int64: the argmax of `segment_probs` (same arguments)."""
    probs = segment_probs(
        model, x, scales=scales, flip=flip, window=window, overlap=overlap, input_size=input_size,
        align_corners=align_corners, amp=amp,
    )
    return probs.argmax(dim=1)
