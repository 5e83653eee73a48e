"""One inference callable, whatever runs underneath: the PyTorch fast path, ONNX Runtime, OpenVINO or TF Lite.

`optimize_for_inference(model, runtime=...)` returns an `nn.Module` that maps a normalised (N, 3, H, W) float batch
to (N, K, H, W) logits and carries the model's `config`, `class_names` and `preprocessing`, so `eval`, `predict`
and the Python API run it like the model itself:

- ``"torch"``: `deeplab.deploy.fast` (BatchNorm folded, channels_last, prepacked oneDNN weights, fused activations).
- ``"onnxruntime"`` / ``"openvino"`` (optional extras ``deeplab[onnx]`` / ``deeplab[openvino]``): the model exported
  to ONNX (BatchNorm folded, image pooling projected once per image, full kernels; `deeplab.deploy.export`) and run by that
  runtime on the CPU, fp32 (OpenVINO is told its precision explicitly: on CPUs with bf16 its default is bf16).
  Both hand back NHWC logits, upsampled NHWC (faster in both), which come out as an (N, K, H, W) view in
  channels_last memory. OpenVINO compiles one static-shape copy for each of the first four input shapes, which runs
  faster than its dynamic-shape mode, and one dynamic-shape copy for any other shape.
- ``"tflite"`` (optional extra ``deeplab[litert]``): the graph written as a TF Lite flatbuffer (`deeplab.deploy.litert`) and
  run by the official TF Lite runtime (ai-edge-litert, XNNPACK), NHWC inside and out. TF Lite graphs are static: one
  is written for each of the first four input shapes (a second or so each); any other shape runs in the PyTorch
  fast path (under "auto": in the fastest of the other runtimes).
- ``"auto"`` (the default): on the first call, every (runtime, precision) candidate that is installed and can run
  the model is built, checked on that input, and timed on it in interleaved rounds (about 2 seconds, 5 to 40
  rounds; `time_rounds`: a short call is timed back to back after an untimed one); the ones within 5% of the
  fastest are timed as long again, and the fastest in paired rounds is kept (`deeplab.deploy.choice`: each
  candidate's median over rounds of its time over the round's fastest). The choice is cached per machine and model
  in the user's cache folder, so a later process builds only the chosen candidate and checks it (``retime=True``,
  ``--retime``, times again); processes that choose at the same time time once (`choice.choosing`). What ONNX
  Runtime, OpenVINO and TF Lite build from the model (exported graph, compiled model) is kept beside the choice
  (`deeplab.deploy.artefacts`), so a later process loads it instead of exporting and compiling. `choice` records the
  figures. Which one wins depends on the model and the machine
  (docs/deploy.md has the measurements).
- ``"eager"``: the model as it is.

**Precision** (`precision=`, ``--precision``; `deeplab.deploy.precision`): "fp32" runs float32 only, every candidate
checked against the eager model: its logits must equal the eager model's to `rtol` (1e-4) of the eager logits'
range, or it is refused (named, with the difference). "auto" (the default) with runtime "auto" adds, on a CPU that
runs bf16 natively (AMX or AVX512_BF16), the PyTorch fast path in bf16 and OpenVINO compiled for bf16, and, when an
int8 file `deeplab quantize` wrote for the model is at hand (`int8=`), that file in ONNX Runtime and OpenVINO; a
reduced-precision candidate is kept only if its logits are finite and their argmax agrees with float32 on at least
99.5% of the check input's pixels. "auto" with a named runtime is float32. "bf16" and "int8" run that precision
(its agreement is measured on the first input and reported, not enforced). Models that only PyTorch runs (a CUDA
device, activation rounding of converted uint8 files, PointRend subdivision, autocast) get the PyTorch fast path
under "auto" and a clear error when another runtime is asked for.

`load_exported(path)` opens a file `deeplab export` wrote (`.onnx`, OpenVINO's `.xml`, `.tflite`) as the same kind of module,
with the metadata the file carries (class names, preprocessing, model config), so `deeplab predict --checkpoint
model.onnx` needs nothing else.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.config import Preprocessing
from .artefacts import artefact_key, read_entry, write_entry
from .choice import choice_key, choosing, fastest_paired, model_digest, read_choice, scores, write_choice
from .precision import MIN_AGREEMENT, PRECISIONS, SUPPORTED, candidates, check_reduced, label
from .runners import RUNNERS, RuntimeModel, load_exported, missing_runtime, thread_count

RUNTIMES = ("torch", "onnxruntime", "openvino", "tflite")
DEFAULT_RTOL = 1e-4
AUTO_BUDGET_S = 2.0  # seconds `auto` spends timing the candidates on the first input, once per machine and model
AUTO_MIN_ROUNDS, AUTO_MAX_ROUNDS = 5, 40  # rounds `auto` times, whatever the budget
AUTO_CLOSE = 0.05  # candidates within 5% of the fastest (paired score) are timed again before `auto` picks
BLOCK_S = 0.05  # `time_in_rounds` times a call shorter than this back to back for about this long, in each round
BLOCK_CALLS = 5  # at most this many calls in one block

__all__ = [
    "PRECISIONS",
    "RUNTIMES",
    "describe_runtime",
    "precision_name",
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
    if isinstance(model, _CheckedOnFirstCall):
        return runtime_name(model.prepared)
    if isinstance(getattr(model, "runtime", None), str):
        return model.runtime
    return "torch" if getattr(model, "fast_path", None) else "eager"


# -- exported graphs ------------------------------------------------------------------------------------------------


# -- building a runtime for a model -------------------------------------------------------------------------------


def _rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    span = float(ref.max() - ref.min()) or 1.0
    return float((out.float() - ref.float()).abs().max()) / span


def _exported_runtime(model: nn.Module, runtime: str, *, threads: int, folder: str, precision: str = "fp32",
                      digest: str | None = None) -> RuntimeModel:
    """`model` exported as `deeplab export` does (BatchNorm folded, image pooling projected once) in `runtime`,
    the logits NHWC (ONNX Runtime: `export.nhwc_logits`; OpenVINO: see `openvino_runner`, compiled for
    `precision`). With the model's `digest` the graph (and OpenVINO's compiled copies) are kept in the cache
    (`deeplab.deploy.artefacts`) and taken from there when present."""
    layout = "NHWC" if runtime == "onnxruntime" else "NCHW"
    key = artefact_key(digest=digest, kind=f"{runtime}-graph", layout=layout) if digest else None
    path = _exported_graph(model, runtime, layout=layout, folder=Path(folder), key=key)
    hint = {"precision": {"fp32": "f32", "bf16": "bf16"}[precision], "cache_key": key} if runtime == "openvino" else {}
    run, layout = RUNNERS[runtime](path, threads=threads, layout=layout, **hint)
    prepared = _in_memory(model, run, layout=layout, runtime=runtime, threads=threads)
    prepared.precision = precision
    return prepared


def _exported_graph(model: nn.Module, runtime: str, *, layout: str, folder: Path, key: dict[str, Any] | None) -> Path:
    """The graph file `runtime` reads: the one kept under `key` when it is there whole, else exported into `folder`
    (and kept under `key`)."""
    names = ("model.onnx",) if runtime == "onnxruntime" else ("model.xml", "model.bin")
    entry = read_entry(key) if key is not None else None
    if entry is not None and all((entry / name).is_file() for name in names):
        return entry / names[0]
    from .export import export_onnx
    from .fast import optimize_for_inference as torch_fast_path

    path = folder / "model.onnx"
    graph = torch_fast_path(model, channels_last=False, skip_taps=False, prepacked_shapes=0)
    export_onnx(graph, path, output_layout=layout)
    if runtime == "openvino":
        import openvino as ov

        ov.save_model(ov.convert_model(str(path)), str(folder / "model.xml"), compress_to_fp16=False)
    if key is not None:
        write_entry(key, {name: folder / name for name in names})
    return folder / names[0]


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


def _litert_runtime(model: nn.Module, *, threads: int, digest: str | None = None) -> RuntimeModel:
    """`model` in the TF Lite runtime (`deeplab.deploy.litert`): a graph written per input shape for the first
    `litert.SHAPES` shapes (kept in the cache with the model's `digest`), the PyTorch fast path for any other."""
    from .fast import optimize_for_inference as torch_fast_path
    from .litert import litert_runner

    other_shapes: dict[str, nn.Module] = {}  # `auto` puts its runner-up here (see AutoRuntime._choose)
    key = artefact_key(digest=digest, kind="tflite-graph") if digest else None
    run, layout = litert_runner(model, threads=threads, cache_key=key,
                                fallback=lambda: other_shapes.get("runtime") or torch_fast_path(model))
    prepared = _in_memory(model, run, layout=layout, runtime="tflite", threads=threads)
    prepared.other_shapes = other_shapes
    return prepared


def build_runtime(model: nn.Module, runtime: str, *, threads: int | None = None, precision: str = "fp32",
                  int8: str | os.PathLike | None = None, digest: str | None = None) -> nn.Module:
    """`model` prepared for `runtime` ("torch", "onnxruntime", "openvino", "tflite" or "eager") in `precision`
    ("fp32"; "bf16": the PyTorch fast path in bf16 or OpenVINO compiled for bf16; "int8": the `int8` file
    `deeplab quantize` wrote, in ONNX Runtime or OpenVINO); not checked (see `check_candidate`). `digest`: the
    model's (`choice.model_digest`), to keep what ONNX Runtime, OpenVINO and TF Lite build from it in the cache
    (`deeplab.deploy.artefacts`); None builds it all here."""
    from .fast import optimize_for_inference as torch_fast_path

    if runtime not in SUPPORTED.get(precision, ()) and not (runtime == "eager" and precision == "fp32"):
        raise ValueError(f"--runtime {runtime} does not run {precision} here; {precision} runs in "
                         f"{', '.join(SUPPORTED.get(precision, ()))}")
    if runtime == "eager":
        return model.eval()
    if runtime == "torch":
        return torch_fast_path(model, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    why = missing_runtime(runtime) or torch_only_reason(model)
    if why:
        raise ValueError(f"--runtime {runtime}: {why}; use --runtime torch")
    if precision == "int8":
        if int8 is None:
            raise ValueError("int8 needs the file deeplab quantize wrote for this model")
        return load_exported(int8, runtime=runtime, threads=thread_count(threads), cache=digest is not None)
    if runtime == "tflite":
        return _litert_runtime(model.eval(), threads=thread_count(threads), digest=digest)
    with tempfile.TemporaryDirectory(prefix="deeplab-runtime-") as folder:
        # ONNX Runtime and OpenVINO read the file into memory: the folder can go once the session exists.
        return _exported_runtime(model.eval(), runtime, threads=thread_count(threads), folder=folder,
                                 precision=precision, digest=digest)


def check_against_eager(candidate: nn.Module, eager: nn.Module, x: torch.Tensor, *, runtime: str,
                        rtol: float = DEFAULT_RTOL, reference: torch.Tensor | None = None) -> float:
    """The largest |candidate - eager| / eager logit range on `x`; raises ValueError above `rtol`."""
    with torch.no_grad():
        ref = eager(x.float()) if reference is None else reference
        diff = _rel_diff(candidate(x), ref)
    if not diff <= rtol:
        raise ValueError(
            f"runtime {runtime} differs from the eager model by {diff:.2e} of the logit range (allowed {rtol:g}); "
            "use --runtime torch"
        )
    return diff


def time_rounds(entries: dict[Any, tuple[int, Any]], *, runs: int, progress: bool = False,
                desc: str = "benchmark", gap_s: float = 0.05, budget_s: float | None = None,
                warm: bool = False, min_runs: int = 3) -> dict[Any, list[list[float]]]:
    """Milliseconds per call of each entry {key: (threads, fn)}, round by round: `[r]` holds the calls of round r.

    Timed in `runs` interleaved rounds after two warm-up calls each (one when `warm`: the entries have run before).
    PyTorch's thread count is set to the entry's before it runs. In each round every entry runs one block (`_block`):
    `gap_s` idle (ONNX Runtime's threads spin after a call and would slow whatever runs next), then, for a call under
    2 * BLOCK_S, one untimed call (it wakes the entry's own worker threads), then back-to-back timed calls for about
    BLOCK_S (1 to BLOCK_CALLS); each round starts one entry later than the one before. With `budget_s`, as many
    rounds as fit in it by the warm-up calls' times, at least `min_runs` and at most `runs`."""
    from tqdm import tqdm

    rounds: dict[Any, list[list[float]]] = {key: [] for key in entries}
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
        runs = max(min_runs, min(runs, int(budget_s / max(round_s, 1e-6))))
    items = list(entries.items())
    for r in tqdm(range(runs), desc=desc, unit="round", disable=not progress, dynamic_ncols=True):
        # each round starts one entry later than the last: what ran just before an entry (another runtime's
        # threads still spinning, a cold cache) is not always the same one
        for key, (threads, fn) in items[r % len(items):] + items[: r % len(items)]:
            torch.set_num_threads(threads)
            calls, settle = blocks[key]
            rounds[key].append(_block(fn, calls=calls, gap_s=gap_s, settle=settle))
    return rounds


def time_in_rounds(entries: dict[Any, tuple[int, Any]], **kwargs: Any) -> dict[Any, list[float]]:
    """`time_rounds`' calls, all rounds together: {key: ms of every timed call}."""
    return {key: [t for calls in rounds for t in calls] for key, rounds in time_rounds(entries, **kwargs).items()}


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


def reduced_reason(model: nn.Module, precision: str) -> str | None:
    """Why `model` cannot run in reduced `precision` at all (None when it may be tried)."""
    if precision == "fp32":
        return None
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cpu":
        return f"{precision} candidates are for the CPU (the model is on {param.device}: use --amp there)"
    if getattr(model, "activation_rounding", None):
        return "activation rounding (a converted uint8 model) is float32 arithmetic"
    return None


def check_candidate(candidate: nn.Module, eager: nn.Module, x: torch.Tensor, *, runtime: str, precision: str,
                    rtol: float = DEFAULT_RTOL, reference: torch.Tensor | None = None,
                    min_agreement: float = MIN_AGREEMENT) -> float:
    """float32: `check_against_eager` (returns the difference); bf16 / int8: the argmax agreement with the eager
    model on `x` (`precision.check_reduced`, returns the agreement)."""
    if precision == "fp32":
        return check_against_eager(candidate, eager, x, runtime=runtime, rtol=rtol, reference=reference)
    with torch.no_grad():
        ref = eager(x.float()) if reference is None else reference
        return check_reduced(candidate(x), ref, name=f"{runtime} {precision}", min_agreement=min_agreement)


class AutoRuntime(nn.Module):
    """Picks the fastest (runtime, precision) candidate on the first input (see the module docstring), then runs only
    that one; the choice is kept per machine and model (`deeplab.deploy.choice`)."""

    def __init__(self, model: nn.Module, *, threads: int | None = None,
                 candidates: list[tuple[str, str]] | None = None, rtol: float = DEFAULT_RTOL,
                 int8: str | os.PathLike | None = None, cache: bool = True, retime: bool = False) -> None:
        super().__init__()
        self.eager = model.eval()
        self.config = getattr(model, "config", None)
        self.class_names = getattr(model, "class_names", ())
        self.preprocessing = getattr(model, "preprocessing", None)
        self.activation_rounding = getattr(model, "activation_rounding", None)
        self.class_colors = getattr(model, "class_colors", None)
        self.class_values = getattr(model, "class_values", None)
        self.threads = threads
        self.candidates = list(candidates or [(name, "fp32") for name in RUNTIMES])
        self.rtol = rtol
        self.int8 = int8
        self.cache = cache
        self.retime = retime
        self.chosen: nn.Module | None = None
        self.runtime: str | None = None
        self.precision: str | None = None
        self.choice: dict[str, Any] = {}

    def _build(self, name: str, precision: str, x: torch.Tensor, reference: torch.Tensor,
               digest: str | None) -> tuple[nn.Module, float]:
        """The candidate built (from the cached artefacts of the model of `digest` where there are some) and checked;
        raises with the reason when it cannot run or does not match."""
        why = None if name == "torch" else (missing_runtime(name) or torch_only_reason(self.eager))
        why = why or reduced_reason(self.eager, precision)
        if why:
            raise ValueError(why)
        candidate = build_runtime(self.eager, name, threads=self.threads, precision=precision, int8=self.int8,
                                  digest=digest)
        check = check_candidate(candidate, self.eager, x, runtime=name, precision=precision, rtol=self.rtol,
                                reference=reference)
        return candidate, check

    def _choose(self, x: torch.Tensor) -> None:
        """The cached choice when its key matches (`deeplab.deploy.choice`) and it still passes its check on `x`;
        otherwise, holding the machine's lock on this model's choice (`choice.choosing`), time the candidates
        (`_time_all`). A process that waited for the lock takes the choice the holder just made."""
        threads = thread_count(self.threads)
        labels = {label(*pair): pair for pair in self.candidates}
        with torch.no_grad():
            reference = self.eager(x.float())
            digest = model_digest(self.eager) if self.cache else None
            key = None if digest is None else choice_key(digest=digest, shape=tuple(x.shape), threads=threads,
                                                         candidates=list(labels))
            before = read_choice(key) if key is not None else None
            if before is not None and not self.retime and self._take(before, labels, x, reference, digest):
                return
            with choosing(key):
                after = read_choice(key) if key is not None else None
                if after is not None and after != before and self._take(after, labels, x, reference, digest):
                    return  # made by another process while this one waited (with --retime too: it is new)
                self._time_all(labels, x, reference, digest, key)

    def _take(self, cached: dict[str, Any], labels: dict[str, tuple[str, str]], x: torch.Tensor,
              reference: torch.Tensor, digest: str | None) -> bool:
        """Keep the cached choice when it is a candidate and passes its check on `x`; False otherwise."""
        if cached["label"] not in labels:
            return False
        try:
            chosen, check = self._build(*labels[cached["label"]], x, reference, digest)
        except Exception:  # noqa: BLE001 - e.g. an input on which bf16 agrees less: choose again
            return False
        self._keep(cached["label"], labels, {cached["label"]: chosen}, checks={cached["label"]: check})
        self.choice.update(cached=True, ms=cached.get("ms", {}), score=cached.get("score", {}))
        return True

    def _time_all(self, labels: dict[str, tuple[str, str]], x: torch.Tensor, reference: torch.Tensor,
                  digest: str | None, key: dict[str, Any] | None) -> None:
        """Build and check every candidate, time them (`_time`), keep the fastest in paired rounds and write the
        choice under `key`."""
        built: dict[str, nn.Module] = {}
        checks: dict[str, float] = {}
        skipped: dict[str, str] = {}
        for name, (runtime, precision) in labels.items():
            try:
                built[name], checks[name] = self._build(runtime, precision, x, reference, digest)
            except Exception as e:  # a runtime that cannot run or match the model is not chosen; say why
                skipped[name] = (str(e).splitlines() or [type(e).__name__])[0]
        if not built:
            raise ValueError("no runtime can run this model: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        rounds = self._time(built, x) if len(built) > 1 else {}
        finalists = {k: v for k, v in rounds.items() if len(v) == max(map(len, rounds.values()))}
        winner = fastest_paired(finalists) if rounds else next(iter(built))
        ms = {name: statistics.median(t for calls in r for t in calls) for name, r in rounds.items()}
        self._keep(winner, labels, built, checks=checks, skipped=skipped, ms=ms)
        score = scores(finalists) if rounds else {}
        self.choice.update(cached=False, ms=ms, score=score, rounds=len(rounds.get(winner, [])),
                           calls=sum(len(c) for c in rounds.get(winner, [])))
        if key is not None and rounds:
            write_choice(key, {"label": winner, "ms": ms, "score": score, "agreement": self.choice["agreement"]})

    def _keep(self, winner: str, labels: dict[str, tuple[str, str]], built: dict[str, nn.Module], *,
              checks: dict[str, float], skipped: dict[str, str] | None = None,
              ms: dict[str, float] | None = None) -> None:
        self.runtime, self.precision = labels[winner]
        self.chosen = built[winner]
        others = [n for n in (ms or {}) if labels[n][0] != "tflite"]
        if self.runtime == "tflite" and others:  # shapes beyond TF Lite's static graphs: the fastest of the others
            self.chosen.other_shapes["runtime"] = built[min(others, key=ms.get)]
        agreement = {n: c for n, c in checks.items() if labels[n][1] != "fp32"}
        self.choice = {"runtime": self.runtime, "precision": self.precision, "label": winner,
                       "agreement": agreement, "skipped": dict(skipped or {}), "shape": [], "threads": None}

    def _time(self, built: dict[str, nn.Module], x: torch.Tensor) -> dict[str, list[list[float]]]:
        """ms per call of each built candidate on `x`, in interleaved rounds (`time_rounds`, about AUTO_BUDGET_S
        seconds, at least AUTO_MIN_ROUNDS); the ones whose paired score is within AUTO_CLOSE of the fastest are timed
        for as long again, so that the noise of a few rounds does not decide between candidates a few percent
        apart."""
        threads = thread_count(self.threads)
        entries = {name: (threads, lambda c=c: c(x)) for name, c in built.items()}
        rounds = time_rounds(entries, runs=AUTO_MAX_ROUNDS, budget_s=AUTO_BUDGET_S, min_runs=AUTO_MIN_ROUNDS)
        close = {name: entries[name] for name, s in scores(rounds).items() if s <= 1 + AUTO_CLOSE}
        if len(close) > 1:
            more = time_rounds(close, runs=AUTO_MAX_ROUNDS, budget_s=AUTO_BUDGET_S, min_runs=AUTO_MIN_ROUNDS,
                               warm=True)
            rounds = {name: rounds[name] + more.get(name, []) for name in rounds}
        return rounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chosen is None:
            self._choose(x)
            self.choice.update(shape=list(x.shape), threads=thread_count(self.threads))
        return self.chosen(x)


def _pairs(runtime: str, precision: str, *, int8: bool) -> list[tuple[str, str]]:
    """The (runtime, precision) candidates for the flags: precision "auto" with a named runtime is float32 (name the
    precision to get another); with runtime "auto" it adds bf16 on CPUs that run it natively and int8 when an int8
    file is at hand (`deeplab.deploy.precision.candidates`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if runtime == "eager":
        if precision not in ("auto", "fp32"):
            raise ValueError(f"--precision {precision}: the eager model runs float32 (use --amp for autocast, or "
                             "--runtime auto)")
        return [("eager", "fp32")]
    if precision == "int8" and not int8:
        raise ValueError("--precision int8 needs an int8 file: make one with deeplab quantize --checkpoint CKPT (it "
                         "writes CKPT_NAME.int8.onnx beside the checkpoint, where predict and eval find it)")
    runtimes = RUNTIMES if runtime == "auto" else (runtime,)
    pairs = candidates(precision if runtime == "auto" or precision != "auto" else "fp32", runtimes, int8=int8)
    if not pairs:
        raise ValueError(f"--runtime {runtime} does not run {precision} here; {precision} runs in "
                         f"{', '.join(SUPPORTED[precision])}")
    return pairs


def optimize_for_inference(
    model: nn.Module, *, runtime: str = "auto", precision: str = "auto", threads: int | None = None,
    example: torch.Tensor | None = None, rtol: float = DEFAULT_RTOL, int8: str | os.PathLike | None = None,
    retime: bool = False, cache: bool = True,
) -> nn.Module:
    """`model` as a module that maps a normalised (N, 3, H, W) batch to logits on `runtime` in `precision` (see the
    module docstring); `model` itself is untouched. `threads`: CPU threads for ONNX Runtime / OpenVINO (default
    torch.get_num_threads(); PyTorch uses its own setting). `example`: an input to check the runtime on now (and,
    for "auto", to choose on); without it the check (and the choice) happens on the first call. `int8`: the int8
    ONNX file `deeplab quantize` wrote for this model (an int8 candidate). `retime`: time the candidates again
    instead of taking the choice cached for this machine and model; `cache` False: neither read nor write it, nor the
    exported graphs and compiled models kept beside it (`deeplab.deploy.artefacts`)."""
    if runtime not in RUNTIME_CHOICES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {runtime!r}")
    if isinstance(model, (RuntimeModel, AutoRuntime, _CheckedOnFirstCall)) or getattr(model, "fast_path", None):
        return model  # already prepared
    pairs = _pairs(runtime, precision, int8=int8 is not None)
    if runtime == "auto":
        prepared: nn.Module = AutoRuntime(model, threads=threads, rtol=rtol, candidates=pairs, int8=int8,
                                          cache=cache, retime=retime)
        if example is not None:
            prepared(example)
        return prepared
    (name, chosen_precision), = pairs
    why = reduced_reason(model, chosen_precision)
    if why:
        raise ValueError(f"--precision {chosen_precision}: {why}")
    kept = cache and name in ("onnxruntime", "openvino", "tflite") and chosen_precision != "int8"
    prepared = build_runtime(model, name, threads=threads, precision=chosen_precision, int8=int8,
                             digest=model_digest(model) if kept else None)
    if name in ("torch", "eager") and chosen_precision == "fp32":
        return prepared  # PyTorch: the fast path is checked by its own tests, eager is the reference
    checked = _CheckedOnFirstCall(prepared, model, rtol=rtol, precision=chosen_precision)
    if example is not None:
        checked(example)
    return checked


def prepare_model(model: nn.Module, options: Any) -> nn.Module:
    """`model` ready to run `options` (an `InferenceOptions`): its PointRend options applied, then on
    `options.runtime` in `options.precision` (autocast runs in PyTorch: "auto" with amp means the PyTorch fast
    path). A model that is already prepared (or an exported file's) is returned as it is."""
    from ..models.model import with_pointrend_options

    if isinstance(model, (RuntimeModel, AutoRuntime, _CheckedOnFirstCall)) or getattr(model, "fast_path", None):
        return model
    model = with_pointrend_options(model, pointrend=options.pointrend, points=options.pointrend_points,
                                   steps=options.pointrend_steps)
    runtime = options.runtime
    if runtime == "auto" and (options.amp != "off" or torch_only_reason(model)):
        runtime = "torch"
    int8 = getattr(model, "int8_file", None) if options.precision in ("auto", "int8") else None
    return optimize_for_inference(model, runtime=runtime, precision=options.precision, threads=options.threads,
                                  int8=int8, retime=options.retime)


class _CheckedOnFirstCall(nn.Module):
    """A runtime compared with the eager model on its first input before it is trusted: float32 to `rtol` of the
    logit range; bf16 / int8 by argmax agreement (recorded in `agreement`; refused only when not finite, since the
    precision was asked for by name)."""

    def __init__(self, prepared: nn.Module, eager: nn.Module, *, rtol: float, precision: str = "fp32") -> None:
        super().__init__()
        self.eager = eager.eval()  # first: the parameters a caller looks at for the input's dtype are float32
        self.prepared = prepared
        self.rtol = rtol
        self.checked = False
        self.precision = precision
        self.agreement: float | None = None
        self.runtime = runtime_name(prepared)
        self.config = getattr(eager, "config", None)
        self.class_names = getattr(eager, "class_names", ())
        self.preprocessing, self.activation_rounding = getattr(eager, "preprocessing", None), None
        self.class_colors = getattr(eager, "class_colors", None)
        self.class_values = getattr(eager, "class_values", None)
        self.threads = getattr(prepared, "threads", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.checked:
            if self.precision == "fp32":
                check_against_eager(self.prepared, self.eager, x, runtime=self.runtime, rtol=self.rtol)
            else:
                self.agreement = check_candidate(self.prepared, self.eager, x, runtime=self.runtime,
                                                 precision=self.precision, min_agreement=0.0)
            self.checked = True
        return self.prepared(x)


def precision_name(model: nn.Module) -> str:
    """The precision a prepared model runs in: fp32, bf16 or int8 ("auto (not run yet)" before `auto` has chosen)."""
    if isinstance(model, AutoRuntime):
        return model.precision or "auto (not run yet)"
    if isinstance(model, _CheckedOnFirstCall):
        return model.precision
    if isinstance(model, RuntimeModel):
        return "int8" if model.metadata.get("int8") else getattr(model, "precision", "fp32")
    dtype = (getattr(model, "fast_path", None) or {}).get("dtype", "float32")
    return {"bfloat16": "bf16"}.get(dtype, "fp32")


def describe_runtime(model: nn.Module) -> str:
    """What ran, for the line `predict` and `eval` print: "openvino, bf16 (argmax as float32 on 99.93% of the first
    input's pixels; chosen on this machine earlier)"."""
    text = f"{runtime_name(model)}, {precision_name(model)}"
    agreement = None
    if isinstance(model, AutoRuntime) and model.chosen is not None:
        agreement = model.choice.get("agreement", {}).get(model.choice.get("label"))
    elif isinstance(model, _CheckedOnFirstCall):
        agreement = model.agreement
    notes = [f"argmax as float32 on {100 * agreement:.2f}% of the first input's pixels"] if agreement is not None else []
    if isinstance(model, AutoRuntime) and model.choice.get("cached"):
        notes.append("timed on this machine before; --retime times again")
    return text + (f" ({'; '.join(notes)})" if notes else "")


# "auto": the fastest of the runtimes below that can run the model, measured on the first input (deeplab.deploy.runtimes);
# "torch": the PyTorch fast path (deeplab.deploy.fast); "eager": the model as built, no fast path.
RUNTIME_CHOICES = ("auto", "torch", "eager", "onnxruntime", "openvino", "tflite")
