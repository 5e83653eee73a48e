"""Exported graphs run by their runtimes: ONNX Runtime, OpenVINO and TF Lite runners over a file, the metadata a
`deeplab export` file carries, and `load_exported`, which opens such a file as a model-like module."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.config import ModelConfig, Preprocessing
from .artefacts import artefact_key, compiled_key, files_digest, read_entry, write_entry

EXTRA = {"onnxruntime": "onnx", "openvino": "openvino", "tflite": "litert"}


EXPORTED_SUFFIXES = (".onnx", ".xml", ".tflite")


OPENVINO_SHAPES = 4


def missing_runtime(runtime: str) -> str | None:
    """None when `runtime` can be imported here, else why not (with the install command)."""
    if runtime == "tflite":
        from .litert import missing

        return missing()
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(runtime)
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError:
        return f"{runtime} is not installed: pip install 'deeplab[{EXTRA[runtime]}]'"
    return None


class RuntimeModel(nn.Module):
    """An exported graph run by ONNX Runtime, OpenVINO or TF Lite, carrying what `eval` and `predict` read from a model."""

    def __init__(
        self, run: Callable[[np.ndarray], np.ndarray], *, runtime: str, config: ModelConfig,
        class_names: tuple[str, ...], preprocessing: Preprocessing, source: str, threads: int,
        metadata: dict[str, Any] | None = None, nhwc: bool = False, static_input: bool = False,
    ) -> None:
        super().__init__()
        self._run = run
        self.nhwc = nhwc
        self.runtime = runtime
        self.config = config
        self.class_names = tuple(class_names)
        self.preprocessing = preprocessing
        self.source = source
        self.threads = threads
        self.metadata = dict(metadata or {})
        self.activation_rounding = None
        self.class_colors: tuple | None = None  # an ArcGIS-trained model's own colours, from the metadata
        self.class_values: tuple | None = None
        self.static_input = static_input  # one input shape (a .tflite file): inference feeds it as is, unpadded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(np.asarray(self._run(np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())),
                                          dtype=np.float32))
        # NHWC logits come back as an (N, K, H, W) view in channels_last memory: no copy
        return out.permute(0, 3, 1, 2) if self.nhwc else out


Runner = tuple[Callable[[np.ndarray], np.ndarray], str]  # run(NCHW input) -> logits, and their layout


def thread_count(threads: int | None) -> int:
    return int(threads) if threads else torch.get_num_threads()


def onnxruntime_runner(path: str | os.PathLike, *, threads: int, layout: str = "NCHW") -> Runner:
    """ONNX Runtime on the CPU; the logits in the file's layout."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return run, layout


def openvino_runner(path: str | os.PathLike, *, threads: int, layout: str = "NCHW", precision: str = "f32",
                    cache_key: dict[str, Any] | None = None) -> Runner:
    """OpenVINO on the CPU in `precision` ("f32", or "bf16", OpenVINO's own default on CPUs with AMX or
    AVX512_BF16; an int8 file runs its quantized operations in int8 either way): a static-shape copy compiled for each of the first OPENVINO_SHAPES input shapes
    (faster than OpenVINO's dynamic-shape mode), one dynamic-shape copy for every shape after those (images of many
    sizes would otherwise compile once each); the logits NHWC: OpenVINO upsamples them NHWC inside, and asking for
    NCHW adds a reorder (1.6 ms of 19 for MobileNetV2 dm0.5 at 257x257, one thread here). With `cache_key` (the
    file's key in `deeplab.deploy.artefacts`) each compiled copy is kept there, and a later process imports it
    instead of compiling."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
              "NUM_STREAMS": 1}
    model = core.read_model(str(path))
    if layout == "NCHW":
        ppp = PrePostProcessor(model)
        ppp.output(0).model().set_layout(ov.Layout("NCHW"))
        ppp.output(0).tensor().set_layout(ov.Layout("NHWC"))
        model = ppp.build()
    compiled: dict[tuple[int, ...] | None, Any] = {}  # input shape (None: dynamic) -> infer request

    def compile_for(shape: tuple[int, ...] | None) -> Any:
        copy = model.clone()
        if shape is not None:
            copy.reshape({copy.input(0): ov.PartialShape(list(shape))})
        return core.compile_model(copy, "CPU", config)

    def run(x: np.ndarray) -> np.ndarray:
        shape = tuple(x.shape)
        if shape not in compiled and len(compiled) >= OPENVINO_SHAPES:
            shape = None
        request = compiled.get(shape)
        if request is None:
            key = None if cache_key is None else compiled_key(cache_key, shape=None if shape is None else list(shape),
                                                              threads=threads, precision=precision)
            request = compiled[shape] = _cached_compile(core, key, config, lambda: compile_for(shape)).create_infer_request()
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()

    return run, "NHWC"


def _cached_compile(core: Any, key: dict[str, Any] | None, config: dict[str, Any], compile_now: Callable[[], Any]) -> Any:
    """The compiled model kept under `key` (`deeplab.deploy.artefacts`), imported; else `compile_now()`, kept there."""
    entry = read_entry(key) if key is not None else None
    if entry is not None:
        try:
            return core.import_model((entry / "compiled.blob").read_bytes(), "CPU", config)
        except (OSError, RuntimeError):  # e.g. a blob this OpenVINO cannot import after all: compiled again
            pass
    model = compile_now()
    if key is not None:
        try:
            blob = model.export_model().getvalue()
        except RuntimeError:  # a plugin that cannot export: compiled in every process
            return model
        write_entry(key, {"compiled.blob": blob})
    return model


def tflite_runner(path: str | os.PathLike, *, threads: int, layout: str = "NHWC") -> Runner:
    """The TF Lite runtime (XNNPACK) on a file `deeplab export --format tflite` wrote: one static input shape."""
    from .litert import input_shape, interpreter

    content = Path(path).read_bytes()
    run_graph = interpreter(content, threads=threads)
    expected = input_shape(content)

    def run(x: np.ndarray) -> np.ndarray:
        if tuple(x.shape) != expected:
            raise ValueError(
                f"{path}: a TF Lite file runs at the one input size it was exported for, {expected[2]}x{expected[3]} "
                f"(batch {expected[0]}), not {x.shape[2]}x{x.shape[3]} (batch {x.shape[0]}): run it at that size "
                "(--scales 1 and no --window; --input-size model, the default, resizes each image to it) or export one "
                f"for {x.shape[2]}x{x.shape[3]} with deeplab export --format tflite --input-size {x.shape[2]}x{x.shape[3]}"
            )
        return run_graph(x)

    return run, "NHWC"


RUNNERS = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner, "tflite": tflite_runner}


# each: path -> (run, output layout)
FILE_RUNTIMES = {".onnx": ("onnxruntime", "openvino"), ".xml": ("openvino",), ".tflite": ("tflite",)}  # first: default


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `deeplab` metadata of an exported .onnx, OpenVINO .xml or .tflite file ({} when it has none)."""
    path = Path(path)
    if path.suffix.lower() == ".tflite":
        from .litert import read_tflite_metadata

        return read_tflite_metadata(path.read_bytes())
    if path.suffix.lower() == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        text = next((p.value for p in proto.metadata_props if p.key == "deeplab"), None)
    else:
        import openvino as ov

        model = ov.Core().read_model(str(path))
        text = model.get_rt_info(["deeplab"]).astype(str) if model.has_rt_info(["deeplab"]) else None
    return json.loads(text) if text else {}


def load_exported(path: str | os.PathLike, *, runtime: str | None = None, threads: int | None = None,
                  cache: bool = True) -> RuntimeModel:
    """Open an exported `.onnx` (ONNX Runtime by default; OpenVINO reads it too), OpenVINO `.xml` or `.tflite` file
    (the TF Lite runtime). `cache`: OpenVINO's compiled models are kept under the digest of the file's bytes
    (`deeplab.deploy.artefacts`), so a later process imports them instead of compiling."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXPORTED_SUFFIXES:
        raise ValueError(f"{path}: not an exported model (.onnx, .xml or .tflite)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass the file `deeplab export` or `deeplab quantize` wrote")
    readers = FILE_RUNTIMES[suffix]
    runtime = readers[0] if runtime in (None, "auto", "torch", "eager") else runtime
    if runtime not in readers:
        raise ValueError(f"{path}: a {suffix} file runs in {' or '.join(readers)}, not {runtime}; pass --runtime "
                         f"{readers[0]} (or auto)")
    why = missing_runtime(runtime)
    if why:
        raise ImportError(f"{path}: {why}")
    meta = read_metadata(path)
    if not meta.get("class_names") or meta.get("mean") is None:
        hint = (f"; an official TF DeepLab .tflite file: convert it first: deeplab convert {path} model.pt"
                if suffix == ".tflite" else "")
        raise ValueError(
            f"{path}: carries no deeplab metadata (class names, preprocessing); export it with `deeplab export` "
            f"from a deeplab checkpoint{hint}"
        )
    if meta.get("model_config"):
        config = ModelConfig.from_dict(meta["model_config"])
    else:  # an export without the model's config: what inference reads from it
        config = ModelConfig(num_classes=len(meta["class_names"]), align_corners=bool(meta.get("align_corners")))
    pre = Preprocessing(mean=meta["mean"], std=meta["std"], input_size=meta.get("input_size"))
    n = thread_count(threads)
    hint = {}
    if runtime == "openvino" and cache:
        files = [path, path.with_suffix(".bin")] if suffix == ".xml" else [path]
        hint["cache_key"] = artefact_key(digest=files_digest(files), kind="openvino-file")
    run, layout = RUNNERS[runtime](path, threads=n, layout=meta.get("output_layout", "NCHW"), **hint)
    model = RuntimeModel(
        run, runtime=runtime, config=config, class_names=meta["class_names"], preprocessing=pre, source=str(path),
        threads=n, metadata=meta, nhwc=layout == "NHWC", static_input=runtime == "tflite",
    )
    model.class_colors = tuple(tuple(c) for c in meta["class_colors"]) if meta.get("class_colors") else None
    model.class_values = tuple(meta["class_values"]) if meta.get("class_values") else None
    return model.eval()
