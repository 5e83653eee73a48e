"""One inference callable, whatever runs underneath: the PyTorch fast path, ONNX Runtime, OpenVINO or TF Lite.

`optimize_for_inference(model, runtime=...)` returns an `nn.Module` that maps a normalised (N, 3, H, W) float batch
to (N, K, H, W) logits and carries the model's `config`, `class_names` and `preprocessing`, so `eval`, `predict`
and the Python API run it like the model itself:

- ``"torch"``: `deeplab.deploy.fast` (BatchNorm folded, channels_last, prepacked oneDNN weights, fused activations).
- ``"onnxruntime"`` / ``"openvino"`` (optional extras ``deeplab[onnx]`` / ``deeplab[openvino]``): the model exported
  to ONNX (BatchNorm folded, image pooling projected once per image, full kernels; `deeplab.deploy.export`) and run by that
  runtime on the CPU, fp32 (OpenVINO is told f32 explicitly: on CPUs with bf16 it would otherwise compute in bf16).
  Both hand back NHWC logits, upsampled NHWC (faster in both), which come out as an (N, K, H, W) view in
  channels_last memory. OpenVINO compiles one static-shape copy for each of the first four input shapes, which runs
  faster than its dynamic-shape mode, and one dynamic-shape copy for any other shape.
- ``"tflite"`` (optional extra ``deeplab[litert]``): the graph written as a TF Lite flatbuffer (`deeplab.deploy.litert`) and
  run by the official TF Lite runtime (ai-edge-litert, XNNPACK), NHWC inside and out. TF Lite graphs are static: one
  is written for each of the first four input shapes (a second or so each); any other shape runs in the PyTorch
  fast path (under "auto": in the fastest of the other runtimes).
- ``"auto"`` (the default): on the first call, every runtime that is installed and can run the model is built,
  checked against the eager model on that input, and timed on it in interleaved rounds (about 1.5 seconds, 3 to
  10 rounds; `time_in_rounds`: a short call is timed back to back after an untimed one), then the ones within 5%
  of the fastest are timed as long again; the lowest median is kept for every later call and `choice` records the
  figures. Which one wins depends on the model and the machine (docs/deploy.md has the measurements).
- ``"eager"``: the model as it is.

Every runtime other than eager is checked when it is built: on the first input its logits must equal the eager
model's to `rtol` (1e-4) of the eager logits' range, or it is refused (named, with the difference). Models that only
PyTorch runs (a CUDA device, activation rounding of converted uint8 files, PointRend subdivision, autocast) get the
PyTorch fast path under "auto" and a clear error when another runtime is asked for.

`load_exported(path)` opens a file `deeplab export` wrote (`.onnx`, OpenVINO's `.xml`, `.tflite`) as the same kind of module,
with the metadata the file carries (class names, preprocessing, model config), so `deeplab predict --checkpoint
model.onnx` needs nothing else.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.config import Preprocessing
from .runners import EXTRA, RUNNERS, RuntimeModel, missing_runtime, thread_count

RUNTIMES = ("torch", "onnxruntime", "openvino", "tflite")
DEFAULT_RTOL = 1e-4
AUTO_BUDGET_S = 1.5  # seconds `auto` spends timing the candidates on the first input (at least 3 rounds)
AUTO_CLOSE = 0.05  # candidates within 5% of the fastest median are timed again before `auto` picks
BLOCK_S = 0.05  # `time_in_rounds` times a call shorter than this back to back for about this long, in each round
BLOCK_CALLS = 5  # at most this many calls in one block

__all__ = [
    "RUNTIMES",
    "RuntimeModel",
    "missing_runtime",
    "optimize_for_inference",
    "prepare_model",
    "runtime_name",
    "torch_only_reason",
]


def torch_only_reason(model: nn.Module, *, amp: str = "off") -> str | None:
    """Why only PyTorch can run `model` (None when an exported graph can)."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cpu":
        return f"the model is on {param.device} (ONNX Runtime, OpenVINO and TF Lite run here on the CPU)"
    if amp != "off":
        return f"amp {amp} is PyTorch autocast"
    if getattr(model, "activation_rounding", None):
        return "activation rounding (a converted uint8 model) runs in PyTorch only; convert with --float-activations"
    cfg = getattr(model, "config", None)
    if getattr(cfg, "pointrend", False) and getattr(cfg, "pointrend_steps", None) != 0:
        return "PointRend's adaptive subdivision runs in PyTorch only"
    return None


def runtime_name(model: nn.Module) -> str:
    """Which runtime a prepared model runs: torch, eager, onnxruntime, openvino, tflite (auto: once it has
    chosen)."""
    if isinstance(model, AutoRuntime):
        return model.runtime or "auto (not run yet)"
    if isinstance(getattr(model, "runtime", None), str):
        return model.runtime
    return "torch" if getattr(model, "fast_path", None) else "eager"


# -- exported graphs ------------------------------------------------------------------------------------------------


# -- building a runtime for a model -------------------------------------------------------------------------------


def _rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    span = float(ref.max() - ref.min()) or 1.0
    return float((out.float() - ref.float()).abs().max()) / span


def _exported_runtime(model: nn.Module, runtime: str, *, threads: int, folder: str) -> RuntimeModel:
    """`model` exported as `deeplab export` does (BatchNorm folded, image pooling projected once) in `runtime`,
    the logits NHWC (ONNX Runtime: `export.nhwc_logits`; OpenVINO: see `openvino_runner`)."""
    from .export import export_onnx
    from .fast import optimize_for_inference as torch_fast_path

    path = Path(folder) / f"model-{runtime}.onnx"
    graph = torch_fast_path(model, channels_last=False, skip_taps=False, prepacked_shapes=0)
    layout = "NHWC" if runtime == "onnxruntime" else "NCHW"
    export_onnx(graph, path, output_layout=layout)
    if runtime == "openvino":
        import openvino as ov

        xml = path.with_suffix(".xml")
        ov.save_model(ov.convert_model(str(path)), str(xml), compress_to_fp16=False)
        path = xml
    run, layout = RUNNERS[runtime](path, threads=threads, layout=layout)
    return _in_memory(model, run, layout=layout, runtime=runtime, threads=threads)


def _in_memory(model: nn.Module, run, *, layout: str, runtime: str, threads: int) -> RuntimeModel:
    """A graph made from `model` in this process, run by `runtime`, carrying the model's attributes."""
    prepared = RuntimeModel(
        run, runtime=runtime, config=getattr(model, "config", None),
        class_names=getattr(model, "class_names", ()), preprocessing=getattr(model, "preprocessing", Preprocessing()),
        source="exported in memory", threads=threads, nhwc=layout == "NHWC",
    ).eval()
    prepared.class_colors = getattr(model, "class_colors", None)
    prepared.class_values = getattr(model, "class_values", None)
    return prepared


def _litert_runtime(model: nn.Module, *, threads: int) -> RuntimeModel:
    """`model` in the TF Lite runtime (`deeplab.deploy.litert`): a graph written per input shape for the first
    `litert.SHAPES` shapes, the PyTorch fast path for any other."""
    from .fast import optimize_for_inference as torch_fast_path
    from .litert import litert_runner

    other_shapes: dict[str, nn.Module] = {}  # `auto` puts its runner-up here (see AutoRuntime._choose)
    run, layout = litert_runner(model, threads=threads,
                                fallback=lambda: other_shapes.get("runtime") or torch_fast_path(model))
    prepared = _in_memory(model, run, layout=layout, runtime="tflite", threads=threads)
    prepared.other_shapes = other_shapes
    return prepared


def build_runtime(model: nn.Module, runtime: str, *, threads: int | None = None) -> nn.Module:
    """`model` prepared for `runtime` ("torch", "onnxruntime", "openvino", "tflite" or "eager"); not checked (see
    `check_against_eager`)."""
    from .fast import optimize_for_inference as torch_fast_path

    if runtime == "eager":
        return model.eval()
    if runtime == "torch":
        return torch_fast_path(model)
    why = missing_runtime(runtime) or torch_only_reason(model)
    if why:
        raise ValueError(f"--runtime {runtime}: {why}; use --runtime torch")
    if runtime == "tflite":
        return _litert_runtime(model.eval(), threads=thread_count(threads))
    with tempfile.TemporaryDirectory(prefix="deeplab-runtime-") as folder:
        # ONNX Runtime and OpenVINO read the file into memory: the folder can go once the session exists.
        return _exported_runtime(model.eval(), runtime, threads=thread_count(threads), folder=folder)


def check_against_eager(candidate: nn.Module, eager: nn.Module, x: torch.Tensor, *, runtime: str,
                        rtol: float = DEFAULT_RTOL, reference: torch.Tensor | None = None) -> float:
    """The largest |candidate - eager| / eager logit range on `x`; raises ValueError above `rtol`."""
    with torch.no_grad():
        ref = eager(x) if reference is None else reference
        diff = _rel_diff(candidate(x), ref)
    if not diff <= rtol:
        raise ValueError(
            f"runtime {runtime} differs from the eager model by {diff:.2e} of the logit range (allowed {rtol:g}); "
            "use --runtime torch"
        )
    return diff


def time_in_rounds(entries: dict[Any, tuple[int, Any]], *, runs: int, progress: bool = False,
                   desc: str = "benchmark", gap_s: float = 0.05, budget_s: float | None = None,
                   warm: bool = False) -> dict[Any, list[float]]:
    """Milliseconds per call of each entry {key: (threads, fn)}, timed in `runs` interleaved rounds after two
    warm-up calls each (one when `warm`: the entries have run before). PyTorch's thread count is set to the entry's
    before it runs. In each round every entry runs one block (`_block`): `gap_s` idle (ONNX Runtime's threads spin
    after a call and would slow whatever runs next), then, for a call under 2 * BLOCK_S, one untimed call (it wakes
    the entry's own worker threads), then back-to-back timed calls for about BLOCK_S (1 to BLOCK_CALLS); each round
    starts one entry later than the one before. With `budget_s`, as many rounds as fit in it by the warm-up calls'
    times, at least 3 and at most `runs`."""
    from tqdm import tqdm

    times: dict[Any, list[float]] = {key: [] for key in entries}
    blocks: dict[Any, tuple[int, bool]] = {}  # calls per round, and whether an untimed call precedes them
    round_s = 0.0
    for key, (threads, fn) in entries.items():
        torch.set_num_threads(threads)
        if not warm:
            fn()
        t0 = time.perf_counter()
        fn()
        call_s = time.perf_counter() - t0
        blocks[key] = max(1, min(BLOCK_CALLS, round(BLOCK_S / max(call_s, 1e-6)))), call_s < 2 * BLOCK_S
        round_s += gap_s + call_s * sum(blocks[key])
    if budget_s is not None:
        runs = max(3, min(runs, int(budget_s / max(round_s, 1e-6))))
    items = list(entries.items())
    for r in tqdm(range(runs), desc=desc, unit="round", disable=not progress, dynamic_ncols=True):
        # each round starts one entry later than the last: what ran just before an entry (another runtime's
        # threads still spinning, a cold cache) is not always the same one
        for key, (threads, fn) in items[r % len(items):] + items[: r % len(items)]:
            torch.set_num_threads(threads)
            calls, settle = blocks[key]
            times[key] += _block(fn, calls=calls, gap_s=gap_s, settle=settle)
    return times


def _block(fn: Callable[[], Any], *, calls: int, gap_s: float, settle: bool) -> list[float]:
    """ms of `calls` back-to-back calls of `fn` after `gap_s` idle and, when `settle`, one untimed call. On a VM,
    a worker thread that slept through the idle can take milliseconds to run again (its vCPU was given away): a short
    call right after idle measures that, not the runtime (MobileNetV2 dm0.5 257 at 2 threads here, TF Lite: 8.5 ms
    back to back, 13 ms median after 50 ms idle: benchmarks/idle.py, docs/deploy.md)."""
    time.sleep(gap_s)
    if settle:
        fn()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


class AutoRuntime(nn.Module):
    """Picks the fastest runtime on the first input (see the module docstring), then runs only that one."""

    def __init__(self, model: nn.Module, *, threads: int | None = None, candidates: tuple[str, ...] = RUNTIMES,
                 rtol: float = DEFAULT_RTOL) -> None:
        super().__init__()
        self.eager = model.eval()
        self.config = getattr(model, "config", None)
        self.class_names = getattr(model, "class_names", ())
        self.preprocessing = getattr(model, "preprocessing", None)
        self.activation_rounding = getattr(model, "activation_rounding", None)
        self.class_colors = getattr(model, "class_colors", None)
        self.class_values = getattr(model, "class_values", None)
        self.threads = threads
        self.candidates = candidates
        self.rtol = rtol
        self.chosen: nn.Module | None = None
        self.runtime: str | None = None
        self.choice: dict[str, Any] = {}

    def _choose(self, x: torch.Tensor) -> None:
        """Build and check every candidate, time them (`_time`) and keep the one with the lowest median."""
        built: dict[str, nn.Module] = {}
        skipped: dict[str, str] = {}
        only_torch = torch_only_reason(self.eager)
        with torch.no_grad():
            reference = self.eager(x)
            for name in self.candidates:
                why = None if name == "torch" else (missing_runtime(name) or only_torch)
                if why:
                    skipped[name] = why
                    continue
                try:
                    candidate = build_runtime(self.eager, name, threads=self.threads)
                    check_against_eager(candidate, self.eager, x, runtime=name, rtol=self.rtol, reference=reference)
                except Exception as e:  # a runtime that cannot run or match the model is not chosen; say why
                    skipped[name] = str(e).splitlines()[0]
                    continue
                built[name] = candidate
            times = self._time(built, x)
        timings = {name: statistics.median(t) for name, t in times.items()}
        self.runtime = min(timings, key=timings.get)  # the torch fast path always builds
        self.chosen = built[self.runtime]
        if self.runtime == "tflite":  # shapes beyond TF Lite's static graphs: the fastest of the others
            runner_up = min((n for n in timings if n != "tflite"), key=timings.get)
            self.chosen.other_shapes["runtime"] = built[runner_up]
        self.choice = {"runtime": self.runtime, "ms": timings, "skipped": skipped, "shape": list(x.shape),
                       "calls": len(times[self.runtime])}

    def _time(self, built: dict[str, nn.Module], x: torch.Tensor) -> dict[str, list[float]]:
        """ms per call of each built candidate on `x`, interleaved (`time_in_rounds`, about AUTO_BUDGET_S seconds);
        the ones within AUTO_CLOSE of the fastest median are timed for as long again, so that the noise of a few
        rounds does not decide between runtimes a few percent apart (large models get 3 rounds in the budget)."""
        threads = thread_count(self.threads)
        entries = {name: (threads, lambda c=c: c(x)) for name, c in built.items()}
        times = time_in_rounds(entries, runs=10, budget_s=AUTO_BUDGET_S)
        best = min(statistics.median(t) for t in times.values())
        close = {name: entries[name] for name, t in times.items() if statistics.median(t) <= best * (1 + AUTO_CLOSE)}
        if len(close) > 1:
            more = time_in_rounds(close, runs=10, budget_s=AUTO_BUDGET_S, warm=True)
            for name, t in more.items():
                times[name] += t
        return times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chosen is None:
            self._choose(x)
        return self.chosen(x)


def optimize_for_inference(
    model: nn.Module, *, runtime: str = "auto", threads: int | None = None, example: torch.Tensor | None = None,
    rtol: float = DEFAULT_RTOL,
) -> nn.Module:
    """`model` as a module that maps a normalised (N, 3, H, W) batch to logits on `runtime` (see the module
    docstring); `model` itself is untouched. `threads`: CPU threads for ONNX Runtime / OpenVINO (default
    torch.get_num_threads(); PyTorch uses its own setting). `example`: an input to check the runtime on now (and,
    for "auto", to choose on); without it the check (and the choice) happens on the first call."""
    if runtime not in RUNTIME_CHOICES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {runtime!r}")
    if isinstance(model, (RuntimeModel, AutoRuntime)) or getattr(model, "fast_path", None):
        return model  # already prepared
    if runtime == "auto":
        prepared: nn.Module = AutoRuntime(model, threads=threads, rtol=rtol)
        if example is not None:
            prepared(example)
        return prepared
    prepared = build_runtime(model, runtime, threads=threads)
    if runtime not in EXTRA:  # PyTorch: the fast path is checked by its own tests, eager is the reference
        return prepared
    if example is None:
        return _CheckedOnFirstCall(prepared, model, rtol=rtol)
    check_against_eager(prepared, model, example, runtime=runtime, rtol=rtol)
    return prepared


def prepare_model(model: nn.Module, options: Any) -> nn.Module:
    """`model` ready to run `options` (an `InferenceOptions`): its PointRend options applied, then on
    `options.runtime` (autocast runs in PyTorch: "auto" with amp means the PyTorch fast path). A model that is
    already prepared (or an exported file's) is returned as it is."""
    from ..models.model import with_pointrend_options

    if isinstance(model, (RuntimeModel, AutoRuntime, _CheckedOnFirstCall)) or getattr(model, "fast_path", None):
        return model
    model = with_pointrend_options(model, pointrend=options.pointrend, points=options.pointrend_points,
                                   steps=options.pointrend_steps)
    runtime = options.runtime
    if runtime == "auto" and (options.amp != "off" or torch_only_reason(model)):
        runtime = "torch"
    return optimize_for_inference(model, runtime=runtime, threads=options.threads)


class _CheckedOnFirstCall(nn.Module):
    """An exported-graph runtime that is compared with the eager model on its first input before it is trusted."""

    def __init__(self, prepared: RuntimeModel, eager: nn.Module, *, rtol: float) -> None:
        super().__init__()
        self.prepared = prepared
        self.eager = eager.eval()
        self.rtol = rtol
        self.checked = False
        self.runtime = prepared.runtime
        self.config, self.class_names = prepared.config, prepared.class_names
        self.preprocessing, self.activation_rounding = prepared.preprocessing, None
        self.class_colors = getattr(eager, "class_colors", None)
        self.class_values = getattr(eager, "class_values", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.checked:
            check_against_eager(self.prepared, self.eager, x, runtime=self.runtime, rtol=self.rtol)
            self.checked = True
        return self.prepared(x)


# "auto": the fastest of the runtimes below that can run the model, measured on the first input (deeplab.deploy.runtimes);
# "torch": the PyTorch fast path (deeplab.deploy.fast); "eager": the model as built, no fast path.
RUNTIME_CHOICES = ("auto", "torch", "eager", "onnxruntime", "openvino", "tflite")
