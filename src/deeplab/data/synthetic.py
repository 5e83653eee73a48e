"""SyntheticShapes: a segmentation task generated on the fly, the built-in default dataset.

Each 64x64 image holds one to three large shapes (disc, square, ring, cross) over a dark, smooth
background with clutter. Every shape class has its own texture family (disc: solid, square:
stripes, ring: checkerboard, cross: speckle noise), drawn in random colours, so a network has
two cues, outline and texture pattern, and neither is a colour:

- every shape colour (a random base and a partner that differs from it by a random amount) is
  drawn from the same distribution whatever the class, so no per-pixel colour statistic
  identifies a class; the stripe and checker periods and angles are random too;
- the background is darker than the shapes (channels below 70, shapes at least 150 away in
  RGB), which makes "object or background" quick to learn, but clutter (small blobs and thin
  line segments) is drawn in the shapes' colours and belongs to the background, so brightness
  alone does not give the mask either;
- shapes overlap in random z-order and the mask shows the top one (occlusion); they are
  rotated at random and may be cut off by the frame; sizes come from one range for every class.

The design is deliberately easy enough for a MobileNetV2 DeepLab trained from scratch on two
CPU cores to reach a useful mIoU in about three minutes; ``render_shapes``'s arguments make it
harder (smaller shapes, more of them, weaker texture contrast, brighter backgrounds).

A sample is a pure function of ``(seed, split, index)``: it is regenerated, never stored.
``train``, ``val`` and ``test`` draw from disjoint seed streams.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import Transform
from .palettes import SYNTHETIC
from .transforms import EvalTransform

# A constant first word keeps the generation streams apart from the augmentation streams
# ``default_rng([seed, epoch, index])`` that the datasets hand to transforms.
_STREAM_TAG = 0x5D47_0001
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
_DEFAULT_LENGTH = {"train": 2000, "val": 200, "test": 200}

BACKGROUND, DISC, SQUARE, RING, CROSS = range(5)

_TEXTURE_PERIOD = (4.0, 8.0)  # stripe and checker periods in pixels

# Each class's texture family (see _texture): solid, stripes, checker, noise.
_CLASS_TEXTURE = {DISC: 0, SQUARE: 1, RING: 2, CROSS: 3}


def _colors(
    rng: np.random.Generator, avoid: np.ndarray | None, min_distance: float, contrast: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """A texture's two colours: a base colour and a partner at most ``contrast`` away per channel.

    The base is uniform in RGB; with ``avoid`` it is redrawn (from the same uniform) until it
    is at least ``min_distance`` from ``avoid``. The rule is the same for every class, so the
    colour distribution stays class-independent while shapes keep an edge against the ground.
    """
    candidates = rng.uniform(0.0, 255.0, size=(8, 3)).astype(np.float32)
    base = candidates[0]
    if avoid is not None:
        far = np.linalg.norm(candidates - avoid, axis=1) >= min_distance
        base = candidates[int(np.argmax(far))] if far.any() else candidates[0]
    partner = np.clip(base + rng.uniform(-1.0, 1.0, size=3).astype(np.float32) * rng.uniform(*contrast), 0.0, 255.0)
    return base, partner.astype(np.float32)


def _texture(
    rng: np.random.Generator, kind: int, ys: np.ndarray, xs: np.ndarray, c0: np.ndarray, c1: np.ndarray
) -> np.ndarray:
    """(h, w, 3) float32 texture ``kind`` over the grid ``ys`` (h, 1) x ``xs`` (1, w), mixing c0 and c1.

    Kinds: 0 solid, 1 stripes, 2 checker, 3 noise, 4 linear gradient (the background's).
    """
    h, w = ys.shape[0], xs.shape[1]
    if kind == 0:  # solid
        return np.broadcast_to(c0, (h, w, 3))
    angle = rng.uniform(0.0, math.pi)
    period = rng.uniform(*_TEXTURE_PERIOD)
    if kind == 1:  # stripes
        t = (((xs * math.cos(angle) + ys * math.sin(angle)) / period) % 1.0 < 0.5).astype(np.float32)
    elif kind == 2:  # checker
        t = ((np.floor(xs / period) + np.floor(ys / period)) % 2.0).astype(np.float32)
    elif kind == 3:  # noise
        t = rng.random((h, w), dtype=np.float32)
    else:  # linear gradient across the region
        proj = xs * math.cos(angle) + ys * math.sin(angle)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    return c0 + t[..., None] * (c1 - c0)


def _shape_mask(cls: int, dy: np.ndarray, dx: np.ndarray, r: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of shape ``cls`` with size ``r`` on offsets ``dy`` (h, 1), ``dx`` (1, w)."""
    ca, sa = math.cos(angle), math.sin(angle)
    u = dx * ca + dy * sa
    v = dy * ca - dx * sa
    if cls == DISC:
        return u * u + v * v <= r * r
    if cls == RING:
        inner = r * rng.uniform(0.45, 0.6)
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= inner * inner)
    if cls == SQUARE:
        half = 0.8 * r
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if cls == CROSS:
        arm = r * rng.uniform(0.27, 0.37)
        au, av = np.abs(u), np.abs(v)
        return ((au <= r) & (av <= arm)) | ((av <= r) & (au <= arm))
    raise ValueError(f"unknown shape class {cls}")


def render_shapes(
    rng: np.random.Generator,
    *,
    height: int = 64,
    width: int = 64,
    shapes_per_image: tuple[int, int] = (1, 3),
    size_range: tuple[float, float] = (0.4, 0.7),
    max_clutter: int = 6,
    max_noise_std: float = 6.0,
    min_contrast: float = 150.0,
    texture_contrast: tuple[float, float] = (90.0, 150.0),
    background_max: float = 70.0,
    rotate: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One sample: image (H, W, 3) uint8 and mask (H, W) uint8 with classes 0..4.

    ``size_range`` is a shape's diameter as a fraction of the shorter side (26-45 px at 64).
    The background is a solid or linear-gradient mix of two colours with channels below
    ``background_max``; ``min_contrast`` is the least RGB distance between a shape's (or a
    clutter item's) base colour and the mean background colour; ``texture_contrast`` bounds the
    per-channel difference between the two colours of a shape's texture. Lower the contrasts,
    raise ``background_max`` or shrink the shapes for a harder task.
    """
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    side = min(height, width)

    bg0 = rng.uniform(0.0, background_max, size=3).astype(np.float32)
    bg1 = rng.uniform(0.0, background_max, size=3).astype(np.float32)
    bg_kind = 4 if rng.random() < 0.7 else 0  # gradient or solid
    image = np.array(_texture(rng, bg_kind, ys, xs, bg0, bg1), dtype=np.float32)  # (H, W, 3)
    mask = np.zeros((height, width), dtype=np.uint8)
    bg_mean = (bg0 + bg1) / 2

    # Clutter first, in the shapes' colours: it belongs to the background, so shapes may cover it.
    for _ in range(int(rng.integers(max_clutter + 1))):
        color, _ = _colors(rng, bg_mean, min_contrast, texture_contrast)
        y, x = rng.uniform(0, height), rng.uniform(0, width)
        if rng.random() < 0.5:  # blob
            r = rng.uniform(1.0, 0.04 * side + 1.0)
            y0, y1 = max(0, int(y - r)), min(height, int(y + r) + 2)
            x0, x1 = max(0, int(x - r)), min(width, int(x + r) + 2)
            region = (ys[y0:y1] - y) ** 2 + (xs[:, x0:x1] - x) ** 2 <= r * r
        else:  # thin line segment
            length, angle = rng.uniform(0.1, 0.35) * side, rng.uniform(0.0, math.pi)
            half_t = rng.uniform(0.5, 1.0)
            ex, ey = x + length * math.cos(angle), y + length * math.sin(angle)
            y0, y1 = max(0, int(min(y, ey)) - 2), min(height, int(max(y, ey)) + 3)
            x0, x1 = max(0, int(min(x, ex)) - 2), min(width, int(max(x, ex)) + 3)
            if y0 >= y1 or x0 >= x1:
                continue
            py, px = ys[y0:y1] - y, xs[:, x0:x1] - x
            dy, dx = ey - y, ex - x
            t = np.clip((px * dx + py * dy) / (dx * dx + dy * dy), 0.0, 1.0)
            region = (px - t * dx) ** 2 + (py - t * dy) ** 2 <= half_t * half_t
        np.copyto(image[y0:y1, x0:x1], color, where=region[..., None])

    # Shapes in drawing order = z-order: a later shape covers an earlier one, mask included.
    lo, hi = shapes_per_image
    for _ in range(int(rng.integers(lo, hi + 1))):
        cls = int(rng.integers(1, 5))
        r = rng.uniform(*size_range) * side / 2
        # Centres keep at least 60% of the radius inside the frame: shapes may be cut off.
        cy = rng.uniform(0.6 * r, height - 0.6 * r)
        cx = rng.uniform(0.6 * r, width - 0.6 * r)
        # Unrotated: squares and crosses axis-aligned.
        angle = rng.uniform(0.0, 2.0 * math.pi) if rotate else math.pi / 2
        reach = 1.25 * r + 1
        y0, y1 = max(0, int(cy - reach)), min(height, int(cy + reach) + 1)
        x0, x1 = max(0, int(cx - reach)), min(width, int(cx + reach) + 1)
        region = _shape_mask(cls, ys[y0:y1] - cy, xs[:, x0:x1] - cx, r, angle, rng)
        c0, c1 = _colors(rng, bg_mean, min_contrast, texture_contrast)
        texture = _texture(rng, _CLASS_TEXTURE[cls], ys[y0:y1], xs[:, x0:x1], c0, c1)
        # copyto with where= writes through the slice views, faster than boolean indexing.
        np.copyto(image[y0:y1, x0:x1], texture, where=region[..., None])
        np.copyto(mask[y0:y1, x0:x1], np.uint8(cls), where=region)

    sigma = rng.uniform(0.0, max_noise_std)
    if sigma > 0:
        # Grey (luminance) noise: one draw per pixel, a third of the cost of per-channel noise.
        image += rng.standard_normal((height, width, 1), dtype=np.float32) * np.float32(sigma)
    np.clip(image, 0.0, 255.0, out=image)
    return image.astype(np.uint8), mask


# The options SyntheticShapes passes on to render_shapes (everything but the generator and the image size).
_RENDER_OPTIONS = frozenset(inspect.signature(render_shapes).parameters) - {"rng", "height", "width"}


class SyntheticShapes(Dataset):
    """Shapes on clutter, generated on the fly; no download. See the module docstring.

    Same interface as the file datasets: ``class_names``, ``palette``, ``ignore_index``,
    ``num_classes``, ``files`` (empty), ``load(i)``, ``set_epoch``, ``validate()``, and
    ``__getitem__(i)`` applying ``transform(image, mask, default_rng([seed, epoch, i]))``.
    The image content depends on ``(seed, split, i)`` only; the epoch changes the augmentation.
    """

    class_names = SYNTHETIC.class_names
    palette = SYNTHETIC
    ignore_index = 255

    def __init__(
        self,
        *,
        root: str | Path | None = None,
        split: str = "train",
        length: int | None = None,
        image_size: int | tuple[int, int] = 64,
        seed: int = 0,
        transform: Transform | None = None,
        skip_bad: bool = False,
        **render_options: Any,
    ) -> None:
        """``render_options``: ``render_shapes``'s keyword arguments (its defaults are the dataset's)."""
        # root and skip_bad are accepted so every dataset takes the same arguments; nothing is
        # read from disk and a generated sample cannot be bad.
        del root, skip_bad
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"unknown synthetic split {split!r}; choose from {sorted(_SPLIT_STREAMS)}")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 16:
            raise ValueError(f"image_size must be an int or (height, width) of at least 16 px, got {image_size!r}")
        length = _DEFAULT_LENGTH[split] if length is None else int(length)
        if length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        unknown = sorted(set(render_options) - _RENDER_OPTIONS)
        if unknown:
            raise ValueError(f"unknown synthetic option(s) {unknown}; choose from {sorted(_RENDER_OPTIONS)}")
        if "shapes_per_image" in render_options:
            lo, hi = render_options["shapes_per_image"]
            if not 0 <= lo <= hi:
                raise ValueError(f"shapes_per_image must be (min, max) with 0 <= min <= max, got {(lo, hi)!r}")
        if "size_range" in render_options:
            lo, hi = render_options["size_range"]
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"size_range must be fractions 0 < min <= max <= 1 of the shorter side, got {(lo, hi)!r}")
        self.split = split
        self.length = length
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self.transform = transform if transform is not None else EvalTransform()
        self.render_options = render_options  # passed on to render_shapes by load()
        self.epoch = 0
        self.files: list[tuple[Path, Path]] = []  # nothing on disk
        # Rendered samples, kept: a sample never changes, and rendering costs about as much as a training step's
        # share per image of the small default model. 2000 64x64 samples take 33 MB.
        self._rendered: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def bad_count(self) -> int:
        return 0  # generated samples cannot be bad

    @property
    def bad_files(self) -> list[tuple[Path, str]]:
        return []

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        h, w = self.image_size
        return f"SyntheticShapes(split={self.split!r}, {self.length} samples, {h}x{w}, seed={self.seed})"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def validate(self, *, progress: bool = False) -> list[tuple[Path, str]]:
        return []

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        sample = self._rendered.get(index)
        if sample is None:
            rng = np.random.default_rng([_STREAM_TAG, self.seed, _SPLIT_STREAMS[self.split], index])
            sample = render_shapes(rng, height=self.image_size[0], width=self.image_size[1], **self.render_options)
            if self.image_size[0] * self.image_size[1] * self.length <= 2**25:  # cache up to 128 MB of samples
                self._rendered[index] = sample
        return sample[0].copy(), sample[1].copy()  # callers may write into what they get

    def rng_for(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += self.length
        image, mask = self.load(index)
        return self.transform(image, mask, self.rng_for(index))
