"""A converted TF Lite model against the official TF Lite runtime (ai-edge-litert) running the original file: the
argmax agreement `deeplab convert` prints and records in the checkpoint's `conversion` field, which a model folder's
config.json and card carry.

The input is deterministic: by default one synthetic image at the file's input size (`synthetic_image`: a "dead
leaves" image, overlapping shaded discs of power-law sizes, which has the scale-invariant statistics of photographs),
or the user's own images (`deeplab convert --check-image`). Both sides get the same pixels: the runtime the file's
input (float, or uint8 quantized with the file's scale and zero point), the model its preprocessing of them. Which
classes the runtime predicted is recorded with the agreement: on an image with nothing the model knows, both sides
predict background everywhere and agree trivially.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

RUNTIME = "ai-edge-litert"
SYNTHETIC = "a synthetic image (dead leaves, seed 0)"


def runtime_missing() -> str | None:
    """None when the official TF Lite runtime is importable, else why not (with the install command)."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return f"{RUNTIME} is not installed: pip install 'deeplab[litert]'"
    return None


def _runtime_version() -> str:
    from importlib import metadata

    try:
        return f"{RUNTIME} {metadata.version(RUNTIME)}"
    except metadata.PackageNotFoundError:
        return RUNTIME


def synthetic_image(height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8: discs of random colour with a shading gradient and radii drawn from p(r) ~ r^-3,
    painted largest first until small ones cover the rest, plus mild noise (the dead leaves model of natural images)."""
    rng = np.random.default_rng(seed)
    r_min, r_max, count = 3.0, max(height, width) / 3, 2000
    radii = np.sort((r_min**-2 - rng.random(count) * (r_min**-2 - r_max**-2)) ** -0.5)[::-1]  # inverse CDF
    image = np.full((height, width, 3), 128.0, dtype=np.float32)
    for r in radii:
        cy, cx = rng.uniform(-r, height + r), rng.uniform(-r, width + r)
        colour, shading = rng.uniform(0, 255, 3), rng.normal(0, 20, 3)
        y0, y1 = max(0, int(cy - r)), min(height, int(cy + r) + 1)
        x0, x1 = max(0, int(cx - r)), min(width, int(cx + r) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32) - np.array([cy, cx], dtype=np.float32)[:, None, None]
        inside = dy**2 + dx**2 <= r * r
        image[y0:y1, x0:x1][inside] = (colour + (dy / r)[..., None] * shading)[inside]
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _check_images(paths: Sequence[str | os.PathLike] | None, size: tuple[int, int]) -> list[tuple[str, np.ndarray]]:
    """(name, (H, W, 3) uint8 at `size`) for each image, resized bilinearly; the synthetic image without any."""
    if not paths:
        return [(SYNTHETIC, synthetic_image(*size))]
    from PIL import Image

    from ..data.base import image_to_rgb

    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                rgb = image_to_rgb(im)
        except (OSError, ValueError) as e:
            raise ValueError(f"--check-image {path}: not a readable image ({type(e).__name__}: {e}); pass a "
                             "photo (PNG, JPEG, ...)") from None
        if rgb.shape[:2] != size:
            rgb = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))
        out.append((Path(path).name, rgb))
    return out


def _runtime_argmax(interpreter, x: torch.Tensor) -> np.ndarray:
    """The official runtime's class map (H, W) for the normalised (1, 3, H, W) input `x`."""
    detail = interpreter.get_input_details()[0]
    value = x.permute(0, 2, 3, 1).numpy()
    if detail["dtype"] != np.float32:  # a quantized input: the file's own integers for these values
        scale, zero = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        value = np.clip(np.round(value.astype(np.float64) / scale + zero), info.min, info.max)
    interpreter.set_tensor(detail["index"], value.astype(detail["dtype"]))
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]
    return out.argmax(-1) if out.ndim == 3 else out  # logits (H, W, K), or a file ending in ARG_MAX


def measure_agreement(model: nn.Module, src: str | os.PathLike, *,
                      images: Sequence[str | os.PathLike] | None = None) -> dict[str, Any]:
    """The share of pixels where `model` (converted from the .tflite `src`) and the official runtime running `src`
    give the same class, on `images` (default: the synthetic image). Returns the `conversion` record: `agreement`
    (None when not measured, `detail` saying why), `pixels`, `images`, `size`, `runtime`, `runtime_classes` (the
    runtime's pixel share of each class it predicted) and `detail` (one line for the card)."""
    why = runtime_missing()
    if why:
        return {"agreement": None, "detail": f"not measured: {why}"}
    from ai_edge_litert.interpreter import Interpreter

    from ..data.transforms import normalize

    interpreter = Interpreter(model_path=str(src), num_threads=max(1, torch.get_num_threads()))
    interpreter.allocate_tensors()
    _, height, width, _ = (int(n) for n in interpreter.get_input_details()[0]["shape"])
    pre = model.preprocessing
    same, total, counts = 0, 0, np.zeros(model.config.num_classes, dtype=np.int64)
    checked = _check_images(images, (height, width))
    for _, image in checked:
        x = normalize(image, mean=pre.mean, std=pre.std)[None]
        theirs = _runtime_argmax(interpreter, x)
        with torch.no_grad():
            ours = model(x)[0].argmax(0).numpy()
        if theirs.shape != ours.shape:
            return {"agreement": None, "detail": f"not measured: the runtime's output is {theirs.shape}, the "
                    f"model's {ours.shape}"}
        same, total = same + int((theirs == ours).sum()), total + ours.size
        counts += np.bincount(theirs.ravel().astype(np.int64), minlength=counts.size)[: counts.size]
    shares = {model.class_names[k]: round(float(counts[k] / total), 4) for k in np.flatnonzero(counts)}
    record = {"agreement": same / total, "pixels": total, "images": [name for name, _ in checked],
              "size": [height, width], "runtime": _runtime_version(), "runtime_classes": shares}
    record["detail"] = _detail(record)
    return record


def _detail(record: dict[str, Any]) -> str:
    images = record["images"]
    listed = ", ".join(images[:3]) + (", ..." if len(images) > 3 else "")
    what = images[0] if len(images) == 1 else f"{len(images)} images ({listed})"
    top = sorted(record["runtime_classes"].items(), key=lambda kv: -kv[1])
    classes = ", ".join(f"{name} {100 * share:.1f}%" for name, share in top[:4]) + (", ..." if len(top) > 4 else "")
    return (f"argmax on {record['pixels']} pixels of {what} at {record['size'][0]}x{record['size'][1]}, against "
            f"{record['runtime']}, which predicted {len(top)} class{'es' * (len(top) != 1)} there: {classes}")


__all__ = ["SYNTHETIC", "measure_agreement", "runtime_missing", "synthetic_image"]
