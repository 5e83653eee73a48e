"""Paired image/mask transforms: the DeepLab training protocol and plain evaluation.

Training follows TF DeepLab's ``input_preprocess.preprocess_image_and_label``:
random scale -> pad to the crop size (image with the mean pixel, mask with the ignore label,
at the bottom/right) -> random crop -> random left-right flip -> normalize.

Every random draw comes from the ``numpy.random.Generator`` passed in, never from global
state, so a sample is a pure function of that generator's seed. Draws happen in a fixed order
(scale, crop row, crop column, flip) so the same seed always gives the same sample.

Inputs are ``image`` (H, W, C) and ``mask`` (H, W) integer labels; outputs are ``image`` float32 (C, H', W') and
``mask`` int64 (H', W'). C is 3 for RGB photos (uint8); multispectral images have any number of bands and any sample
type (uint16 counts, float reflectance), normalised per band with ``mean`` / ``std`` of one value per band.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Per-channel statistics in 0..255 pixel units, defined once in config (TF_* scale to [-1, 1]).
from ..models.config import IMAGENET_MEAN, IMAGENET_STD


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        pair = (int(value), int(value))
    else:
        pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


def _per_band(value: Sequence[float], name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in value)
    if not values:
        raise ValueError(f"{name} needs one value per band (3 for RGB), got {value!r}")
    return values


def _check_image(image: np.ndarray, bands: int) -> None:
    if (not isinstance(image, np.ndarray) or image.ndim != 3 or image.dtype.kind not in "uif"
            or image.dtype == np.float16):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be an (H, W, {bands}) numpy array (uint8 RGB, or integer / float bands), got {got}")
    if image.shape[2] != bands:
        raise ValueError(f"the image has {image.shape[2]} bands but the normalisation has a mean and std for {bands} "
                         f"(the model's bands, --bands); got an image of shape {image.shape}")


def _check_pair(image: np.ndarray, mask: np.ndarray, bands: int = 3) -> None:
    _check_image(image, bands)
    if not isinstance(mask, np.ndarray) or mask.shape != image.shape[:2]:
        got = mask.shape if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"mask must be an (H, W) array matching the image {image.shape[:2]}, got {got}")


def _tensor(array: np.ndarray) -> torch.Tensor:
    # torch warns on read-only arrays (e.g. np.asarray of a PIL image); copy those once.
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # A uint8 image stays uint8 (a (C, H, W) view of the HWC array) until it is cropped: resizing uint8 is about 4x
    # faster than float, and only the crop is ever converted. Other sample types (16-bit, float) resize as float32.
    if image.dtype != np.uint8:
        image = image.astype(np.float32)
    img = _tensor(image).permute(2, 0, 1)  # (C, H, W)
    msk = _tensor(mask.astype(np.int64, copy=False))  # (H, W)
    return img, msk


def _resize(img: torch.Tensor, msk: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear for the image, nearest for the mask (labels are never blended)."""
    if tuple(img.shape[-2:]) == size:
        return img, msk
    # align_corners=False with 'nearest-exact' keeps image and mask on the same pixel-centre
    # grid; TF uses align_corners=True for both, which differs by under half a pixel. A uint8
    # image comes back rounded to uint8 (an error under half a grey level).
    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
    # Labels are exact in float32 (below 2**24), so the round trip through float loses nothing.
    msk = F.interpolate(msk[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return img, msk


def _normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (img - m) / s


def normalize(
    image: np.ndarray,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """(H, W, C) -> normalized float32 (C, H, W), one mean and std per band; for inference without a mask."""
    mean, std = _per_band(mean, "mean"), _per_band(std, "std")
    _check_image(image, len(mean))
    img = _tensor(image).permute(2, 0, 1).float()
    return _normalize(img, mean, std).contiguous()


def denormalize(image: torch.Tensor, preprocessing) -> np.ndarray:
    """A normalised (3, H, W) image back to (H, W, 3) uint8 RGB with `preprocessing`'s mean and std (for the CRF)."""
    m = torch.tensor(preprocessing.mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(preprocessing.std, dtype=torch.float32).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * s + m).round_().clamp_(0, 255)
    return rgb.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def random_scale(rng: np.random.Generator, *, scale_range: tuple[float, float], scale_step: float) -> float:
    """TF DeepLab's ``get_random_scale``: uniform in the range, or uniform over its steps.

    With ``scale_step > 0`` the choices are ``linspace(min, max, (max - min) / step + 1)``
    (0.5, 0.75, ..., 2.0 for the defaults), as TF draws them.
    """
    lo, hi = scale_range
    if lo == hi:
        return float(lo)
    if scale_step == 0:
        return float(rng.uniform(lo, hi))
    # The epsilon guards (2.0 - 0.5) / 0.25 landing at 5.999... and losing the last step.
    num_steps = int(np.floor((hi - lo) / scale_step + 1 + 1e-9))
    return float(np.linspace(lo, hi, num_steps)[rng.integers(num_steps)])


@dataclass(frozen=True, kw_only=True)
class TrainTransform:
    """The DeepLab training augmentation. Call as ``t(image, mask, rng)``.

    Defaults are TF DeepLab's ``train.py`` flags: crop 513x513, scale 0.5..2.0 in steps of 0.25
    (``scale_step=0`` draws the scale continuously), flip with p=0.5. ``mean``/``std`` are in
    0..255 units; use ``TF_MEAN``/``TF_STD`` for models converted from TF checkpoints.
    """

    crop_size: tuple[int, int] = (513, 513)
    scale_range: tuple[float, float] = (0.5, 2.0)
    scale_step: float = 0.25
    mean: tuple[float, ...] = IMAGENET_MEAN  # one per band
    std: tuple[float, ...] = IMAGENET_STD
    ignore_index: int = 255
    flip: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_size", _pair(self.crop_size, "crop_size"))
        object.__setattr__(self, "mean", _per_band(self.mean, "mean"))
        object.__setattr__(self, "std", _per_band(self.std, "std"))
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std need one value per band each, got {self.mean!r} and {self.std!r}")
        lo, hi = (float(v) for v in self.scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {self.scale_range!r}")
        object.__setattr__(self, "scale_range", (lo, hi))
        if self.scale_step < 0:
            raise ValueError(f"scale_step must be >= 0 (0 = continuous), got {self.scale_step!r}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive per channel, got {self.std!r}")

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(image, mask, len(self.mean))
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), got {type(rng).__name__}"
            )
        img, msk = _to_tensors(image, mask)
        h, w = image.shape[:2]

        scale = random_scale(rng, scale_range=self.scale_range, scale_step=self.scale_step)
        # TF truncates the scaled size (tf.cast to int32).
        sh, sw = max(1, int(h * scale)), max(1, int(w * scale))
        img, msk = _resize(img, msk, (sh, sw))

        # Pad bottom/right to at least the crop (as TF's pad_to_bounding_box at offset 0, 0),
        # then crop: done as one copy of the visible window into a canvas pre-filled with the
        # mean pixel and the ignore label, which is the same thing without the padded copy.
        ch, cw = self.crop_size
        ph, pw = max(sh, ch), max(sw, cw)
        top = int(rng.integers(ph - ch + 1))
        left = int(rng.integers(pw - cw + 1))
        do_flip = self.flip and bool(rng.random() < 0.5)

        bands = len(self.mean)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(bands, 1, 1)
        out_img = mean.expand(bands, ch, cw).clone()
        out_msk = torch.full((ch, cw), self.ignore_index, dtype=torch.int64)
        vh, vw = min(ch, sh - top), min(cw, sw - left)
        if vh > 0 and vw > 0:
            out_img[:, :vh, :vw] = img[:, top : top + vh, left : left + vw].float()
            out_msk[:vh, :vw] = msk[top : top + vh, left : left + vw]
        if do_flip:
            out_img = out_img.flip(-1)
            out_msk = out_msk.flip(-1)
        # The padded region is exactly the mean, so it is exactly 0 after this.
        out_img = _normalize(out_img, self.mean, self.std)
        return out_img.contiguous(), out_msk.contiguous()


@dataclass(frozen=True, kw_only=True)
class EvalTransform:
    """Evaluation: no augmentation. Call as ``t(image, mask, rng=None)``; ``rng`` is unused.

    By default the full image at its native size, only normalized. ``resize_to`` (H, W) resizes
    (image bilinear, mask nearest); ``pad_to`` (H, W) pads bottom/right up to at least that size
    with the mean pixel / ignore label, as TF DeepLab pads eval images to its eval crop.
    """

    mean: tuple[float, ...] = IMAGENET_MEAN  # one per band
    std: tuple[float, ...] = IMAGENET_STD
    resize_to: tuple[int, int] | None = None
    pad_to: tuple[int, int] | None = None
    ignore_index: int = 255

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _per_band(self.mean, "mean"))
        object.__setattr__(self, "std", _per_band(self.std, "std"))
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std need one value per band each, got {self.mean!r} and {self.std!r}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive per channel, got {self.std!r}")
        if self.resize_to is not None:
            object.__setattr__(self, "resize_to", _pair(self.resize_to, "resize_to"))
        if self.pad_to is not None:
            object.__setattr__(self, "pad_to", _pair(self.pad_to, "pad_to"))

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(image, mask, len(self.mean))
        img, msk = _to_tensors(image, mask)
        if self.resize_to is not None:
            img, msk = _resize(img, msk, self.resize_to)
        img = _normalize(img.float(), self.mean, self.std)
        if self.pad_to is not None:
            h, w = img.shape[-2:]
            pad_h, pad_w = max(0, self.pad_to[0] - h), max(0, self.pad_to[1] - w)
            if pad_h or pad_w:
                # After normalization the mean pixel is 0, so pad the image with 0.
                img = F.pad(img, (0, pad_w, 0, pad_h), value=0.0)
                msk = F.pad(msk, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return img.contiguous(), msk.contiguous()


def train_transform(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    rng: np.random.Generator,
    crop_size: tuple[int, int] = (513, 513),
    scale_range: tuple[float, float] = (0.5, 2.0),
    scale_step: float = 0.25,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = 255,
    flip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Function form of :class:`TrainTransform`."""
    t = TrainTransform(
        crop_size=crop_size,
        scale_range=scale_range,
        scale_step=scale_step,
        mean=tuple(mean),  # type: ignore[arg-type]
        std=tuple(std),  # type: ignore[arg-type]
        ignore_index=ignore_index,
        flip=flip,
    )
    return t(image, mask, rng)


def eval_transform(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize_to: tuple[int, int] | None = None,
    pad_to: tuple[int, int] | None = None,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Function form of :class:`EvalTransform`."""
    t = EvalTransform(
        mean=tuple(mean),  # type: ignore[arg-type]
        std=tuple(std),  # type: ignore[arg-type]
        resize_to=resize_to,
        pad_to=pad_to,
        ignore_index=ignore_index,
    )
    return t(image, mask)
