"""Prediction on image files: the `deeplab.predict(model, image)` API, palettes, overlays, and `deeplab predict`.

Preprocessing comes from the checkpoint (`model.preprocessing`): the image is normalised with its mean / std, and
when it names an `input_size` (converted TF models: 257x257 or 513x513) the image is resized to that size for the
model and the logits resized back to the image's size, as the TF DeepLab demo feeds its fixed-size models.
Everything else (multi-scale, flip, sliding window) is `deeplab.inference.segment`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.base import image_to_rgb
from ..data.palettes import model_palette, palette_for
from ..deploy.runtimes import describe_runtime, prepare_model
from ..models.checkpoint import write_atomically
from .crf import dense_crf
from .options import InferenceOptions, resolve_input_size
from .segment import segment_probs, segment_probs_batch

if TYPE_CHECKING:
    from ..data.palettes import Palette

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
_GLOB_CHARS = "*?["

ImageLike = Union[Image.Image, str, os.PathLike, np.ndarray]

__all__ = [
    "ImageLike",
    "PredictReport",
    "expand_inputs",
    "load_image",
    "mask_of",
    "overlay",
    "palette_for",
    "predict",
    "predict_files",
    "predict_probs",
    "predict_probs_batch",
    "resolve_input_size",
    "save_mask_png",
]


def load_image(image: ImageLike) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from a PIL image, a path, or an (H, W, 3) uint8 array (grey, RGBA and 16-bit
    converted as the datasets convert them: `deeplab.data.base.image_to_rgb`).

    Raises ValueError naming the file for a missing or undecodable file, and for an array of the wrong shape / dtype.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image array must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}; "
                "convert with np.asarray(PIL.Image.open(path).convert('RGB'))"
            )
        return image
    if isinstance(image, Image.Image):
        return image_to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{path}: no such image file; check the path")
        try:
            with Image.open(path) as im:
                im.load()  # decode now: a truncated file fails here, by name
                return image_to_rgb(im)  # as training reads it: 16-bit scaled, not clipped
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ValueError(f"{path}: cannot read image ({exc}); pass a JPEG/PNG/BMP/TIFF/WebP file") from None
    raise TypeError(f"image must be a PIL image, a path or an (H, W, 3) uint8 array, got {type(image).__name__}")


def _normalised(model: nn.Module, image: np.ndarray) -> torch.Tensor:
    from ..data.transforms import normalize

    pre = getattr(model, "preprocessing", None)
    if pre is None:
        raise ValueError(
            f"{type(model).__name__} carries no `preprocessing` (mean/std); load models with deeplab.load(path)"
        )
    return normalize(image, mean=pre.mean, std=pre.std)[None]  # (1, 3, H, W)


def predict_probs(
    model: nn.Module, image: ImageLike, *, options: InferenceOptions | None = None, **inference: Any
) -> np.ndarray:
    """Class probabilities (K, H, W) float32 at the image's size; the arguments as for `predict`. The model runs as
    it is given (prepare it once with `deeplab.optimize_for_inference` for speed; `predict_files` does)."""
    opts = InferenceOptions.of(options, **inference)
    rgb = _model_bands(model, image)
    was_training = model.training
    model.eval()
    try:
        probs = segment_probs(
            model, _normalised(model, rgb), scales=opts.scales, flip=opts.flip, window=opts.window,
            overlap=opts.overlap, input_size=resolve_input_size(model, opts.input_size), amp=opts.amp,
        )
    finally:
        model.train(was_training)
    if opts.crf is not None:
        if rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError("--crf compares RGB colours; it applies to 8-bit RGB models only")
        return dense_crf(rgb, probs[0].cpu(), params=opts.crf, backend=opts.crf_backend).numpy()
    return probs[0].cpu().numpy()


def batchable(options: InferenceOptions) -> bool:
    """Whether `predict_probs_batch` runs images of one network input size as one batch under `options` (one scale,
    no flip, no sliding window, no CRF); otherwise it runs them one by one."""
    return options.scales == (1.0,) and not options.flip and options.window is None and options.crf is None


def network_size(model: nn.Module, shape: Sequence[int], *, options: InferenceOptions) -> tuple[int, int]:
    """The (H, W) the network sees for an image of `shape` (H, W, ...) under `options`: the model's fixed input size
    when it has one (`options.input_size`), else the image's."""
    size = resolve_input_size(model, options.input_size)
    return size if size is not None else (int(shape[0]), int(shape[1]))


def predict_probs_batch(model: nn.Module, images: Sequence[np.ndarray], *, options: InferenceOptions) -> Iterator[np.ndarray]:
    """`predict_probs` of each image, (H, W, 3) uint8 arrays, with one network call for all of them when `batchable`
    (their network inputs must then share one size: `network_size`). Yields each image's result in turn, what
    `predict_probs` computes for that image alone by the same steps; the network itself sees a batch."""
    if not batchable(options):
        for image in images:
            yield predict_probs(model, image, options=options)
        return
    was_training = model.training
    model.eval()
    try:
        batch = [_normalised(model, load_image(image)) for image in images]
        probs = segment_probs_batch(model, batch, input_size=resolve_input_size(model, options.input_size),
                                    amp=options.amp)
        for p in probs:
            yield p[0].cpu().numpy()
    finally:
        model.train(was_training)


def _model_bands(model: nn.Module, image: ImageLike) -> np.ndarray:
    """The image as the model reads it: (H, W, 3) uint8 RGB for RGB models (`load_image`); for a model of other bands
    an (H, W, bands) array of any numeric type as given, or every band of the file (`deeplab.data.bands.read_bands`)."""
    bands = int(getattr(getattr(model, "config", None), "in_channels", 3))
    if bands == 3 and not (isinstance(image, np.ndarray) and image.ndim == 3 and image.dtype != np.uint8):
        return load_image(image)
    if isinstance(image, np.ndarray):
        return image
    if isinstance(image, (str, os.PathLike)):
        from ..data.bands import read_bands

        return read_bands(Path(image), bands=bands)
    raise ValueError(f"a model of {bands} bands reads an (H, W, {bands}) array or an image file, not a "
                     f"{type(image).__name__}")

def predict(model: nn.Module, image: ImageLike, *, options: InferenceOptions | None = None, **inference: Any) -> np.ndarray:
    """Class indices (H, W) of `image` (PIL image, path, or (H, W, 3) uint8 RGB array; for a model of other bands or
    sample types, an (H, W, bands) array or a file of those bands) at the image's size.

    uint8 for up to 256 classes (int64 beyond). `options` (a `deeplab.inference.options.InferenceOptions`), or any of its
    fields as keywords: `scales` / `flip` average softmax probabilities over rescaled and mirrored copies; `window` /
    `overlap` tile large images (see `deeplab.inference.segment`); `input_size="model"` uses the checkpoint's fixed input
    size if it has one, `None` runs at the image's own size, (H, W) forces a size; `amp="bf16"` runs the network
    under bf16 autocast; `crf` (a `deeplab.inference.crf.CRFParams`) refines the probabilities with DeepLab v1/v2's dense CRF.
    The model runs as given: for many images, pass it through `deeplab.optimize_for_inference` once first (the
    fastest runtime installed, the same outputs to 1e-4 of the logit range).
    """
    probs = predict_probs(model, image, options=options, **inference)
    labels = probs.argmax(axis=0)
    return labels.astype(np.uint8) if probs.shape[0] <= 256 else labels.astype(np.int64)


# -- palettes and overlays -----------------------------------------------------------------------------------------


def overlay(image: ImageLike, mask: np.ndarray, *, palette: Palette | None = None, alpha: float = 0.5) -> Image.Image:
    """RGB image: `image` alpha-blended with the colours of `mask` (H, W); `alpha` is the colour's weight.

    `palette` is a `deeplab.data.Palette` (default: the VOC colormap). Pixels of the ignore label (255) get no colour.
    """
    from ..data.palettes import PALETTES

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    rgb = load_image(image).astype(np.float32)
    mask = np.asarray(mask)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from the image's {rgb.shape[:2]}; predict at the image's size")
    lut = (palette or PALETTES["voc"]).lut().astype(np.float32)  # (256, 3)
    colours = lut[np.clip(mask, 0, 255).astype(np.intp)]
    weight = np.where(mask == 255, 0.0, alpha)[..., None].astype(np.float32)
    blended = rgb * (1.0 - weight) + colours * weight
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), mode="RGB")


# -- files ---------------------------------------------------------------------------------------------------------


@dataclass
class PredictReport:
    """What `predict_files` did: the files written per input, and (input name, reason) for each input that failed."""

    written: dict[str, list[Path]] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # inputs whose outputs were complete (deeplab.inference.resume)
    runtime: str = ""  # which runtime and precision ran the model (deeplab.deploy.runtimes.describe_runtime)
    rasters: dict[str, Any] = field(default_factory=dict)  # input -> deeplab.inference.raster.RasterResult

    @property
    def ok(self) -> bool:
        return not self.failed

    @classmethod
    def merged(cls, reports: Sequence[PredictReport]) -> PredictReport:
        """One report of the reports of several processes that shared the inputs (`predict_files`'s `rank`): a raster
        shared by all of them counts its megapixels once each and the longest time."""
        import dataclasses

        total = cls(runtime=reports[0].runtime if reports else "")
        for report in reports:
            total.written.update(report.written)
            total.failed += report.failed
            total.skipped += [s for s in report.skipped if s not in total.skipped]
            for source, done in report.rasters.items():
                seen = total.rasters.get(source)
                total.rasters[source] = done if seen is None else dataclasses.replace(
                    seen, megapixels=seen.megapixels + done.megapixels, seconds=max(seen.seconds, done.seconds))
        return total


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Files, folders (searched recursively for images and videos) and glob patterns -> (path, output name) pairs.

    The output name is the file's stem, or its path relative to a given folder without the suffix (so a folder's
    tree is mirrored under the output folder). Clashing names get '-2', '-3', ... Returns (found, problems), where a
    problem is (input as given, message naming it): a missing path, an empty folder, a pattern matching nothing.
    """
    found: list[tuple[Path, str]] = []
    problems: list[tuple[str, str]] = []
    media = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in media)
            if not files:
                problems.append((text, f"{text}: folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})"))
            found += [(p, p.relative_to(path).with_suffix("").as_posix()) for p in files]
        elif path.is_file():
            found.append((path, path.stem))
        elif any(ch in text for ch in _GLOB_CHARS):
            files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not files:
                problems.append((text, f"{text}: no files match this pattern"))
            found += [(p, p.stem) for p in files]
        else:
            problems.append((text, f"{text}: no such file or folder"))
    seen: dict[str, int] = {}
    named = []
    for p, name in found:
        seen[name] = seen.get(name, 0) + 1
        named.append((p, name if seen[name] == 1 else f"{name}-{seen[name]}"))
    return named, problems


def _video_frames(path: Path):
    """Frames of a video as (H, W, 3) uint8, through the optional `imageio` package (with its pyav plugin)."""
    try:
        import imageio.v3 as iio
    except ImportError:
        raise ValueError(
            f"{path}: reading video needs the optional imageio package (pip install 'imageio[pyav]'); "
            "or extract the frames as images first"
        ) from None
    try:
        for frame in iio.imiter(path):
            yield np.ascontiguousarray(frame[..., :3]).astype(np.uint8)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: cannot read video ({exc})") from None


def mask_of(probs: np.ndarray) -> np.ndarray:
    """The class-index mask (H, W) uint8 of probabilities (K, H, W), as `deeplab predict` writes it."""
    return probs.argmax(axis=0).astype(np.uint8)


def save_mask_png(labels: np.ndarray, palette: Palette, f: Any) -> None:
    """Write `labels` to the open binary file `f` as `deeplab predict`'s NAME.png: an index PNG in `palette`'s
    colours (the service answers with the same bytes)."""
    from ..data.palettes import colorize

    colorize(labels, palette).save(f, "PNG")


def _write_outputs(
    rgb: np.ndarray,
    base: Path,
    *,
    palette: Palette,
    overlay_alpha: float | None,
    save_probs: bool,
    run: Callable[[np.ndarray], np.ndarray],
) -> list[Path]:
    probs = run(rgb)  # (K, H, W)
    labels = mask_of(probs)
    base.parent.mkdir(parents=True, exist_ok=True)
    # Each file through a temporary file and a rename: a full disk or a kill never leaves a truncated output.
    written = [write_atomically(base.with_name(base.name + ".png"), lambda f: save_mask_png(labels, palette, f))]
    if overlay_alpha is not None:
        blended = overlay(rgb, labels, palette=palette, alpha=overlay_alpha)
        written.append(write_atomically(base.with_name(base.name + "_overlay.png"), lambda f: blended.save(f, "PNG")))
    if save_probs:
        half = probs.astype(np.float16)
        written.append(write_atomically(base.with_name(base.name + "_probs.npy"), lambda f: np.save(f, half)))
    return written


def predict_files(
    model: nn.Module,
    inputs: Sequence[str | os.PathLike],
    *,
    out_dir: str | os.PathLike,
    overlay_alpha: float | None = None,
    save_probs: bool = False,
    progress: bool = False,
    options: InferenceOptions | None = None,
    tiling: Any = None,
    overwrite: bool = False,
    cog: bool = True,
    scale: float | None = None,
    resolution: float | None = None,
    rank: int = 0,
    world_size: int = 1,
    **inference: Any,
) -> PredictReport:
    """Predict every image that `inputs` names (files, folders, globs; see `expand_inputs`) into `out_dir`.

    For an input named NAME it writes NAME.png, an index PNG ('P' mode: the stored values are the class indices,
    the palette draws them in the dataset's colours), with `overlay_alpha` NAME_overlay.png (the image blended with
    the colours), and with `save_probs` NAME_probs.npy (float16, K x H x W). A video (only with the optional
    imageio package) writes NAME/frame_000000.png and so on. An input that cannot be read is recorded in the
    report's `failed` as (input, message naming it) and the others still run. The model runs as `options` (or the
    same fields as keywords) say, on `options.runtime` (`deeplab.deploy.runtimes`); `report.runtime` says which ran.

    A raster (GeoTIFF, .img, .jp2, .vrt: `deeplab.inference.raster.RASTER_SUFFIXES`) of any size is classified tile
    by tile into NAME.tif, georeferenced as its source, with NAME_probs.tif for `save_probs`
    (`deeplab.inference.raster.predict_raster`; `tiling` a `Tiling`, default the model's fixed input size or 512,
    each tile run at its own size; `scale` or `resolution` resample the raster for the model); rasters need the
    optional rasterio package (pip install 'deeplab[geo]') and get no overlay. `cog` (default): they are
    cloud-optimised GeoTIFFs with overviews; `cog=False`: tiled GeoTIFFs without overviews.

    Resumable: every output is written whole or not at all, and a record of each input's outputs goes to
    `out_dir/.deeplab-predict/` once they all exist (`deeplab.inference.resume`). An input whose outputs are complete
    and were made by the same model and options from the same file is skipped (`report.skipped`); `overwrite`
    predicts everything again.

    `rank` of `world_size` processes (torch.distributed, initialised by the caller, each calling this with the same
    arguments): the photos and videos are shared round robin over the inputs' order (process r takes inputs r, r + N,
    ...), and every raster is shared by bands of rows (`predict_raster`); each process's report holds its own inputs
    (`PredictReport.merged` joins them). The outputs are those of one process.
    """
    opts = InferenceOptions.of(options, **inference)
    class_names = getattr(model, "class_names", None)
    if not class_names:
        raise ValueError(f"{type(model).__name__} has no class_names; load models with deeplab.load(path)")
    if len(class_names) > 255:
        raise ValueError(f"index PNGs hold classes 0..254 (255 is the ignore label); this model has {len(class_names)}")
    if overlay_alpha is not None and not 0.0 <= overlay_alpha <= 1.0:
        raise ValueError(f"overlay alpha must lie in [0, 1], got {overlay_alpha!r}")
    from . import resume
    from .raster import RASTER_SUFFIXES, default_tiling, predict_raster

    raster_opts = opts  # a raster resolves "model" itself: tiles at their own size (`default_tiling`)
    opts = InferenceOptions.of(opts, input_size=resolve_input_size(model, opts.input_size))
    tiling = tiling or default_tiling(model)
    run_key = resume.run_key(model, raster_opts, overlay=overlay_alpha, probs=save_probs,
                             tiling=[tiling.tile, tiling.padding], cog=cog, scale=scale, resolution=resolution)
    palette = model_palette(model)
    model = prepare_model(model, opts)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: is a file; pass a folder for the predictions")
    files, problems = expand_inputs(inputs)
    report = PredictReport(failed=list(problems) if rank == 0 else [])
    # Every input, not only the current one: with a.jpg and a.png in one folder predicted into that folder, a.jpg's
    # mask would replace a.png before a.png is read.
    inputs_resolved = {path.resolve() for path, _ in files}
    rasters = [(p, n) for p, n in files if p.suffix.lower() in RASTER_SUFFIXES]
    photos = [(p, n) for p, n in files if p.suffix.lower() not in RASTER_SUFFIXES]
    if world_size > 1:  # rasters are shared: which are done is decided before any process writes, so all agree
        done_before = [str(p) for p, n in rasters if not overwrite and resume.done_outputs(out, n, p, run_key)]
        report.skipped += done_before if rank == 0 else []
        rasters = [(p, n) for p, n in rasters if str(p) not in done_before]
    mine = photos[rank::world_size] + rasters

    def run(rgb: np.ndarray) -> np.ndarray:
        return predict_probs(model, rgb, options=opts)

    from tqdm import tqdm

    for path, name in tqdm(mine, desc="predict", unit="image", disable=not progress or len(mine) == 1,
                           dynamic_ncols=True):
        shared = path.suffix.lower() in RASTER_SUFFIXES and world_size > 1
        if not shared and not overwrite and resume.done_outputs(out, name, path, run_key) is not None:
            report.skipped.append(str(path))
            continue
        if rank == 0 or not shared:
            resume.forget(out, name)
        try:
            if path.suffix.lower() in RASTER_SUFFIXES:
                target = out / f"{name}.tif"
                if target.resolve() in inputs_resolved or target.resolve() == path.resolve():
                    raise ValueError(f"{path}: its output {target} is an input of this command and would be "
                                     "overwritten; choose another --out")
                done = predict_raster(model, path, target, tiling=tiling, probs=save_probs, progress=progress,
                                      options=raster_opts, cog=cog, scale=scale, resolution=resolution, rank=rank,
                                      world_size=world_size)
                written = [done.path, done.path.with_name(done.path.name + ".aux.xml")]
                written += [done.probs_path] if done.probs_path is not None else []
                report.rasters[str(path)] = done
            elif path.suffix.lower() in VIDEO_EXTENSIONS:
                written: list[Path] = []
                for i, frame in enumerate(_video_frames(path)):
                    written += _write_outputs(
                        frame, out / name / f"frame_{i:06d}", palette=palette,
                        overlay_alpha=overlay_alpha, save_probs=save_probs, run=run,
                    )
            else:
                suffixes = [".png"] + ["_overlay.png"] * (overlay_alpha is not None) + ["_probs.npy"] * save_probs
                for target in (out / f"{name}{suffix}" for suffix in suffixes):
                    if target.resolve() in inputs_resolved:
                        raise ValueError(
                            f"{path}: its output {target} is an input of this command and would be overwritten before "
                            "it is read; choose another --out"
                        )
                written = _write_outputs(
                    load_image(path), out / name, palette=palette, overlay_alpha=overlay_alpha,
                    save_probs=save_probs, run=run,
                )
        except ValueError as exc:
            if rank == 0 or not shared:  # a shared raster fails alike in every process: reported once
                report.failed.append((str(path), str(exc)))
            continue
        if shared and rank != 0:  # process 0 wrote the file from every process's part
            report.rasters[str(path)] = done
            continue
        resume.write_record(out, name, path, run_key, written)  # only now: every output of the input is whole
        report.written[str(path)] = written
    report.runtime = describe_runtime(model)
    return report
