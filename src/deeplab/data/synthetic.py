"""SyntheticShapes: a segmentation task generated on the fly, the built-in default dataset.

Each image holds a few textured shapes (disc, square, triangle, ring, cross) over a textured,
cluttered background. The task is built so that only shape solves it:

- every colour (shapes, background, clutter) is drawn from the same distribution whatever the
  class, and every texture (solid, stripes, checker, noise, gradient) is equally likely for
  every class, so no per-pixel colour or texture statistic identifies a class;
- shapes overlap in random z-order and the mask shows the top one (occlusion);
- small blobs and thin lines in the same colours are part of the background (clutter), so
  "anything that differs from the background" is not the answer either;
- sizes come from one range for every class.

It stays learnable by a small network in minutes: shapes are 23-54 px across at 128x128, a
shape's two texture colours are closer to each other than to the background's, and images carry
mild sensor noise only.

A sample is a pure function of ``(seed, split, index)``: it is regenerated, never stored.
``train``, ``val`` and ``test`` draw from disjoint seed streams.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from deeplab.data.base import Transform
from deeplab.data.palettes import SYNTHETIC
from deeplab.data.transforms import EvalTransform

# A constant first word keeps the generation streams apart from the augmentation streams
# ``default_rng([seed, epoch, index])`` that the datasets hand to transforms.
_STREAM_TAG = 0x5D47_0001
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
_DEFAULT_LENGTH = {"train": 2000, "val": 200, "test": 200}

BACKGROUND, DISC, SQUARE, TRIANGLE, RING, CROSS = range(6)


def _colors(
    rng: np.random.Generator, avoid: np.ndarray | None, min_distance: float, contrast: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """A texture's two colours: a base colour and a partner close to it.

    The base is uniform in RGB; with ``avoid`` it is redrawn (from the same uniform) until it
    is at least ``min_distance`` from ``avoid``. The rule is the same for every class, so the
    colour distribution stays class-independent while shapes keep an edge against the ground.
    """
    candidates = rng.uniform(0.0, 255.0, size=(8, 3)).astype(np.float32)
    base = candidates[0]
    if avoid is not None:
        far = np.linalg.norm(candidates - avoid, axis=1) >= min_distance
        base = candidates[int(np.argmax(far))] if far.any() else candidates[0]
    # The partner differs by at most `contrast` per channel: texture stays weaker than the edge.
    partner = np.clip(base + rng.uniform(-1.0, 1.0, size=3).astype(np.float32) * rng.uniform(*contrast), 0.0, 255.0)
    return base, partner.astype(np.float32)


def _texture(
    rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, c0: np.ndarray, c1: np.ndarray
) -> np.ndarray:
    """(h, w, 3) float32 texture over the grid ``ys`` (h, 1) x ``xs`` (1, w), mixing c0 and c1."""
    kind = int(rng.integers(5))
    h, w = ys.shape[0], xs.shape[1]
    if kind == 0:  # solid
        return np.broadcast_to(c0, (h, w, 3))
    angle = rng.uniform(0.0, math.pi)
    period = rng.uniform(4.0, 10.0)
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
    if cls == TRIANGLE:
        # Equilateral, circumradius 1.2 r: three half-planes at the inradius (half of it).
        big = 1.2 * r
        inside = u <= big / 2
        for k in (1, 2):
            a = 2.0 * math.pi * k / 3.0
            inside &= u * math.cos(a) + v * math.sin(a) <= big / 2
        return inside
    if cls == CROSS:
        arm = r * rng.uniform(0.27, 0.37)
        au, av = np.abs(u), np.abs(v)
        return ((au <= r) & (av <= arm)) | ((av <= r) & (au <= arm))
    raise ValueError(f"unknown shape class {cls}")


def render_shapes(
    rng: np.random.Generator,
    *,
    height: int = 128,
    width: int = 128,
    shapes_per_image: tuple[int, int] = (2, 5),
    size_range: tuple[float, float] = (0.18, 0.42),
    max_clutter: int = 8,
    max_noise_std: float = 8.0,
    min_contrast: float = 90.0,
    texture_contrast: tuple[float, float] = (20.0, 80.0),
    rotate: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One sample: image (H, W, 3) uint8 and mask (H, W) uint8 with classes 0..5.

    ``size_range`` is a shape's diameter as a fraction of the shorter side (23-54 px at 128).
    ``min_contrast`` is the least RGB distance between a shape's base colour and the mean
    background colour; ``texture_contrast`` bounds the per-channel difference between the two
    colours of any texture. Lower the first or raise the second for a harder task.
    """
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    side = min(height, width)

    bg0, bg1 = _colors(rng, None, 0.0, texture_contrast)
    image = np.array(_texture(rng, ys, xs, bg0, bg1), dtype=np.float32)  # (H, W, 3)
    mask = np.zeros((height, width), dtype=np.uint8)
    bg_mean = (bg0 + bg1) / 2

    # Clutter first: it belongs to the background, so shapes may cover it.
    for _ in range(int(rng.integers(max_clutter + 1))):
        color, _ = _colors(rng, None, 0.0, texture_contrast)
        y, x = rng.uniform(0, height), rng.uniform(0, width)
        if rng.random() < 0.5:  # blob
            r = rng.uniform(1.5, 0.03 * side + 1.5)
            y0, y1 = max(0, int(y - r)), min(height, int(y + r) + 2)
            x0, x1 = max(0, int(x - r)), min(width, int(x + r) + 2)
            region = (ys[y0:y1] - y) ** 2 + (xs[:, x0:x1] - x) ** 2 <= r * r
        else:  # thin line segment
            length, angle = rng.uniform(0.06, 0.25) * side, rng.uniform(0.0, math.pi)
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
        cls = int(rng.integers(1, 6))
        r = rng.uniform(*size_range) * side / 2
        # Centres keep at least 40% of the radius inside the frame: shapes may be cut off.
        cy = rng.uniform(0.4 * r, height - 0.4 * r)
        cx = rng.uniform(0.4 * r, width - 0.4 * r)
        # Unrotated: squares and crosses axis-aligned, triangles flat side down (vertex up).
        angle = rng.uniform(0.0, 2.0 * math.pi) if rotate else math.pi / 2
        reach = 1.25 * r + 1
        y0, y1 = max(0, int(cy - reach)), min(height, int(cy + reach) + 1)
        x0, x1 = max(0, int(cx - reach)), min(width, int(cx + reach) + 1)
        region = _shape_mask(cls, ys[y0:y1] - cy, xs[:, x0:x1] - cx, r, angle, rng)
        c0, c1 = _colors(rng, bg_mean, min_contrast, texture_contrast)
        texture = _texture(rng, ys[y0:y1], xs[:, x0:x1], c0, c1)
        # copyto with where= writes through the slice views, faster than boolean indexing.
        np.copyto(image[y0:y1, x0:x1], texture, where=region[..., None])
        np.copyto(mask[y0:y1, x0:x1], np.uint8(cls), where=region)

    sigma = rng.uniform(0.0, max_noise_std)
    if sigma > 0:
        # Grey (luminance) noise: one draw per pixel, a third of the cost of per-channel noise.
        image += rng.standard_normal((height, width, 1), dtype=np.float32) * np.float32(sigma)
    np.clip(image, 0.0, 255.0, out=image)
    return image.astype(np.uint8), mask


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
        image_size: int | tuple[int, int] = 128,
        seed: int = 0,
        transform: Transform | None = None,
        skip_bad: bool = False,
        shapes_per_image: tuple[int, int] = (2, 5),
        size_range: tuple[float, float] = (0.18, 0.42),
        max_clutter: int = 8,
        max_noise_std: float = 8.0,
        min_contrast: float = 90.0,
        texture_contrast: tuple[float, float] = (20.0, 80.0),
        rotate: bool = True,
    ) -> None:
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
        lo, hi = shapes_per_image
        if not 0 <= lo <= hi:
            raise ValueError(f"shapes_per_image must be (min, max) with 0 <= min <= max, got {shapes_per_image!r}")
        if not 0 < size_range[0] <= size_range[1] <= 1:
            raise ValueError(f"size_range must be fractions 0 < min <= max <= 1 of the shorter side, got {size_range!r}")
        self.split = split
        self.length = length
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self.transform = transform if transform is not None else EvalTransform()
        self.shapes_per_image = (int(lo), int(hi))
        self.size_range = (float(size_range[0]), float(size_range[1]))
        self.max_clutter = int(max_clutter)
        self.max_noise_std = float(max_noise_std)
        self.min_contrast = float(min_contrast)
        self.texture_contrast = (float(texture_contrast[0]), float(texture_contrast[1]))
        self.rotate = bool(rotate)
        self.epoch = 0
        self.files: list[tuple[Path, Path]] = []  # nothing on disk

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
        rng = np.random.default_rng([_STREAM_TAG, self.seed, _SPLIT_STREAMS[self.split], index])
        return render_shapes(
            rng,
            height=self.image_size[0],
            width=self.image_size[1],
            shapes_per_image=self.shapes_per_image,
            size_range=self.size_range,
            max_clutter=self.max_clutter,
            max_noise_std=self.max_noise_std,
            min_contrast=self.min_contrast,
            texture_contrast=self.texture_contrast,
            rotate=self.rotate,
        )

    def rng_for(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += self.length
        image, mask = self.load(index)
        return self.transform(image, mask, self.rng_for(index))
