"""What the service does for one request, apart from HTTP: its settings, the model behind a dynamic batcher, and the
answers (the mask PNG `deeplab predict` writes, the overlay, the JSON summary).

The model is prepared exactly as `deeplab predict` prepares it (`deeplab.deploy.runtimes.prepare_model` with the
same `InferenceOptions`) and each image runs through `deeplab.inference.predict.predict_probs_batch`, which takes
the steps `predict_probs` takes; the PNG is written by the same function. So a served mask and a predicted one
cannot differ by more than the network's own batch arithmetic.
"""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ..data.palettes import model_palette
from ..deploy.runtimes import describe_runtime, prepare_model, runtime_name
from ..inference.options import InferenceOptions, resolve_input_size
from ..inference.predict import (
    batchable,
    mask_of,
    network_size,
    overlay,
    predict_probs_batch,
    save_mask_png,
)
from .batcher import Batcher
from .images import ServeError, encode_png
from .metrics import Metrics

# Per-request query parameters of POST /v1/segment, and what each takes.
QUERY = {"format": "png or json", "overlay": "0 or 1", "alpha": "a number in [0, 1]",
         "scales": "comma-separated positive numbers, e.g. 0.75,1.0,1.25", "flip": "0 or 1"}


@dataclass(frozen=True)
class ServeSettings:
    """How `deeplab serve` runs: the name clients address the model by, dynamic batching (`max_batch` requests at
    most per network call, waiting at most `batch_wait_ms` for company), backpressure (`max_queue` waiting requests,
    then 503), request limits (`max_bytes` of body, `max_pixels` per image, `read_timeout_s` to send the body), access
    (`api_key`: a bearer token every call but the health checks and the page needs; `cors`: origins allowed to call
    from a browser), `warmup_size` (H, W) of the image the model is warmed up and its runtime chosen on (None: the
    model's input size, else 513 x 513) and the default overlay `alpha`."""

    name: str = "deeplab"
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 64
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    read_timeout_s: float = 30.0
    api_key: str | None = None
    cors: tuple[str, ...] = ()
    warmup_size: tuple[int, int] | None = None
    alpha: float = 0.5

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_bytes", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if self.batch_wait_ms < 0 or self.read_timeout_s <= 0:
            raise ValueError(f"batch_wait_ms must be >= 0 and read_timeout_s > 0, got {self.batch_wait_ms!r}, "
                             f"{self.read_timeout_s!r}")


@dataclass
class Job:
    """One image for the model, with the options it runs under."""

    rgb: np.ndarray
    options: InferenceOptions


@dataclass
class Answer:
    """The result of one request: its mask and the times (ms) it took."""

    mask: np.ndarray
    ms: float
    model_ms: float = 0.0
    batch: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class Service:
    """The model behind a batcher, and everything the routes need to answer."""

    def __init__(self, model: nn.Module, *, options: InferenceOptions, settings: ServeSettings) -> None:
        names = list(getattr(model, "class_names", None) or [])
        if not names:
            raise ValueError(f"{type(model).__name__} has no class_names; load models with deeplab.load(path)")
        if len(names) > 255:
            raise ValueError(f"index PNGs hold classes 0..254 (255 is the ignore label); this model has {len(names)}")
        bands = int(getattr(getattr(model, "config", None), "in_channels", 3))
        if bands != 3:
            raise ValueError(f"this model reads {bands} bands; the service takes RGB images (use `deeplab predict` "
                             "for multispectral rasters)")
        self.options = InferenceOptions.of(options, input_size=resolve_input_size(model, options.input_size))
        self.settings = settings
        self.palette = model_palette(model)
        self.model = prepare_model(model, self.options)
        self.metrics = Metrics()
        self.batcher = Batcher(self._run, max_batch=settings.max_batch, wait_s=settings.batch_wait_ms / 1000,
                               max_queue=settings.max_queue, on_batch=self.metrics.batch_done,
                               arriving=lambda: self.arriving)
        self.arriving = 0  # requests received and still being read or decoded: company a batch may wait for
        self.ready = False
        self.failure: str | None = None  # why the warm-up failed: the service then answers 503 with it
        self.runtime = "not run yet"

    def _run(self, jobs: list[Job]) -> list[tuple[np.ndarray, float, int]]:
        """The model thread: one network call for the batch; (mask, ms, batch size) per job."""
        started = time.perf_counter()
        masks = [mask_of(p) for p in predict_probs_batch(self.model, [j.rgb for j in jobs], options=jobs[0].options)]
        ms = 1000 * (time.perf_counter() - started)
        return [(mask, ms, len(jobs)) for mask in masks]

    def key(self, job: Job) -> Any:
        """Requests that may share a network call: one network input size and the same options."""
        if not batchable(job.options):
            return object()  # a key of its own
        return (network_size(self.model, job.rgb.shape, options=job.options), job.options)

    async def segment(self, job: Job) -> Answer:
        started = time.perf_counter()
        mask, model_ms, batch = await self.batcher.submit(job, key=self.key(job))
        return Answer(mask=mask, ms=1000 * (time.perf_counter() - started), model_ms=model_ms, batch=batch)

    async def warm_up(self) -> None:
        """One image through the batcher, so the runtime is chosen and compiled before /readyz says ready, then a
        batch of `max_batch` copies: the synthetic shapes of `deeplab train`'s default dataset, at `warmup_size`."""
        from ..data.synthetic import render_shapes

        size = self.settings.warmup_size or resolve_input_size(self.model, "model") or (513, 513)
        rgb, _ = render_shapes(np.random.default_rng(0), height=size[0], width=size[1])
        job = Job(rgb=rgb, options=self.options)
        try:
            await self.segment(job)
            if runtime_name(self.model) == "tflite":  # static graphs of batch 1: batches would run another runtime
                self.batcher.max_batch = 1
            elif self.settings.max_batch > 1 and batchable(self.options):
                # The largest batch once: the runtime sizes its buffers (and the allocator its arenas) for it now,
                # not under load, so memory is level from the first request and no request pays for a new shape.
                await self.batcher.run_now([job] * self.settings.max_batch)
        except Exception as e:  # noqa: BLE001 - kept and shown by /readyz and every request, the server stays up
            self.failure = f"the model failed on its warm-up image ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
            return
        self.runtime = describe_runtime(self.model)
        self.ready = True

    def check_ready(self) -> None:
        """ServeError 503 unless the model is warmed up (with the warm-up's failure when it failed)."""
        if self.failure:
            raise ServeError(503, self.failure)
        if not self.ready:
            raise ServeError(503, "the model is still warming up; try again in a few seconds",
                             headers={"Retry-After": "2"})

    def options_for(self, query: dict[str, str]) -> InferenceOptions:
        """The inference options of one request: the server's, with `scales` and `flip` from the query."""
        changes: dict[str, Any] = {}
        if "scales" in query:
            try:
                changes["scales"] = tuple(float(v) for v in query["scales"].split(",") if v.strip())
            except ValueError:
                raise ServeError(400, f"scales={query['scales']!r} is not a list of numbers; send e.g. "
                                 "scales=0.75,1.0,1.25") from None
        if "flip" in query:
            changes["flip"] = flag(query, "flip")
        try:
            return InferenceOptions.of(self.options, **changes)
        except ValueError as e:
            raise ServeError(400, str(e)) from None

    def png(self, mask: np.ndarray) -> bytes:
        """The bytes `deeplab predict` writes to NAME.png for this mask."""
        buf = io.BytesIO()
        save_mask_png(mask, self.palette, buf)
        return buf.getvalue()

    def overlay_png(self, rgb: np.ndarray, mask: np.ndarray, *, alpha: float) -> bytes:
        return encode_png(overlay(rgb, mask, palette=self.palette, alpha=alpha))

    def summary(self, answer: Answer, *, with_overlay: bytes | None) -> dict[str, Any]:
        """The JSON answer: the mask PNG in base64, class names, each class's share of the pixels, the size, the
        model, the runtime and the times."""
        counts = np.bincount(answer.mask.ravel(), minlength=len(self.palette.class_names))
        total = max(int(answer.mask.size), 1)
        out = {
            "mask": base64.b64encode(self.png(answer.mask)).decode("ascii"),
            "classes": {str(i): n for i, n in enumerate(self.palette.class_names)},
            "shares": {n: round(int(counts[i]) / total, 6) for i, n in enumerate(self.palette.class_names)
                       if counts[i]},
            "height": int(answer.mask.shape[0]), "width": int(answer.mask.shape[1]),
            "model": self.settings.name, "runtime": self.runtime,
            "ms": round(answer.ms, 2), "model_ms": round(answer.model_ms, 2), "batch": answer.batch,
        }
        if with_overlay is not None:
            out["overlay"] = base64.b64encode(with_overlay).decode("ascii")
        return out

    def summary_json(self, answer: Answer, *, with_overlay: bytes | None) -> bytes:
        """`summary` as the bytes of the JSON answer."""
        return json.dumps(self.summary(answer, with_overlay=with_overlay), separators=(",", ":")).encode()

    def describe(self) -> dict[str, Any]:
        """GET /v1/model: what the model is, what it expects and how it runs."""
        model = self.model
        pre = getattr(model, "preprocessing", None)
        config = getattr(model, "config", None)
        colors = self.palette.colors
        return {
            "name": self.settings.name,
            "classes": [{"index": i, "name": n, "color": list(colors[i])}
                        for i, n in enumerate(self.palette.class_names)],
            "input_size": list(resolve_input_size(model, "model") or []) or None,
            "preprocessing": pre.to_dict() if hasattr(pre, "to_dict") else None,
            "config": config.to_dict() if hasattr(config, "to_dict") else None,
            "options": self.options.settings(),
            "runtime": self.runtime, "ready": self.ready,
            "limits": {"max_bytes": self.settings.max_bytes, "max_pixels": self.settings.max_pixels,
                       "max_batch": self.settings.max_batch, "max_queue": self.settings.max_queue},
        }


def flag(query: dict[str, str], name: str) -> bool:
    value = query[name].strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ServeError(400, f"{name}={query[name]!r} is not a yes/no value; send {name}=1 or {name}=0")
