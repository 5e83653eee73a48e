"""`InferenceOptions`: how `eval`, `predict`, `export` and `benchmark` run a model, in one object."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from ..deploy.precision import PRECISIONS
from ..deploy.runtimes import RUNTIME_CHOICES
from .segment import check_options

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class InferenceOptions:
    """How `eval`, `predict`, `export` and `benchmark` run a model: one object, so an option is added once.

    scales, flip: softmax probabilities averaged over rescaled and mirrored copies (TF DeepLab's rule).
    window, overlap: sliding-window tiles of `window` pixels (None: the whole image), overlapping by `overlap`.
    input_size: "model" (the checkpoint's fixed input size, if any), None (the image's own size) or (H, W).
    runtime: one of RUNTIME_CHOICES; threads: CPU threads for it (None: torch.get_num_threads()).
    precision: auto, fp32, bf16 or int8 (`deeplab.deploy.precision`); retime: choose the runtime again instead of
    taking the choice cached for this machine and model (`deeplab.deploy.choice`).
    amp: "off", "bf16" or "fp16" autocast (PyTorch runtimes only). crf, crf_backend: dense-CRF refinement
    (`deeplab.inference.crf.CRFParams`). pointrend (None: the checkpoint's default; False: the coarse prediction only),
    pointrend_points, pointrend_steps: PointRend checkpoints' subdivision.
    """

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window: int | tuple[int, int] | None = None
    overlap: float = 0.33
    input_size: tuple[int, int] | str | None = "model"
    runtime: str = "auto"
    threads: int | None = None
    precision: str = "auto"
    retime: bool = False
    amp: str = "off"
    crf: Any = None  # deeplab.inference.crf.CRFParams or None
    crf_backend: str = "torch"
    pointrend: bool | None = None
    pointrend_points: int | None = None
    pointrend_steps: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", check_options(scales=self.scales, window=self.window, overlap=self.overlap))
        if self.runtime not in RUNTIME_CHOICES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {self.runtime!r}")
        if self.threads is not None and int(self.threads) < 1:
            raise ValueError(f"threads must be a positive number, got {self.threads!r}")
        if self.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"amp must be 'off', 'bf16' or 'fp16', got {self.amp!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.amp != "off" and self.precision not in ("auto", "fp32"):
            raise ValueError(f"amp={self.amp!r} is autocast of a float32 model; precision={self.precision!r} is "
                             "another way to reduce precision: use one of them")
        if self.amp != "off" and self.runtime in ("onnxruntime", "openvino", "tflite"):
            raise ValueError(f"amp={self.amp!r} is autocast, a PyTorch feature; use it with runtime 'torch' or 'eager'")
        if self.crf_backend not in ("torch", "pydensecrf"):
            raise ValueError(f"crf_backend must be 'torch' or 'pydensecrf', got {self.crf_backend!r}")

    @classmethod
    def of(cls, options: "InferenceOptions | None" = None, **changes: Any) -> "InferenceOptions":
        """`options` (default: the defaults) with `changes`, which must be field names (a clear error otherwise)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown inference option(s) {', '.join(unknown)}; the options are {', '.join(sorted(names))}")
        return replace(options or cls(), **changes)

    def settings(self) -> dict[str, Any]:
        """JSON-ready summary for results files."""
        return {
            "scales": list(self.scales), "flip": self.flip, "window": self.window,
            "overlap": self.overlap if self.window else None, "runtime": self.runtime, "threads": self.threads,
            "precision": self.precision,
            "amp": self.amp, "crf": None if self.crf is None else {**vars(self.crf), "backend": self.crf_backend},
        }


def resolve_input_size(model: nn.Module, input_size: Sequence[int] | str | None) -> tuple[int, int] | None:
    """`"model"` -> the checkpoint's `preprocessing.input_size` (None when it has none); None -> native size."""
    if isinstance(input_size, str):
        if input_size != "model":
            raise ValueError(f"input_size must be 'model', None (native size) or (H, W), got {input_size!r}")
        pre = getattr(model, "preprocessing", None)
        size = getattr(pre, "input_size", None)
        return None if size is None else (int(size[0]), int(size[1]))
    if input_size is None:
        return None
    size = tuple(int(v) for v in input_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"input_size must be (height, width) with positive values, got {input_size!r}")
    return size  # type: ignore[return-value]
