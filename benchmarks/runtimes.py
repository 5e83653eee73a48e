"""The same DeepLab in deeplab's default inference path and in the runtimes people deploy with, side by side.

Rows: four models (the official MobileNetV2 dm0.5 257 float file and dm1.0 513 uint8 file from ../shared/models,
converted; Xception-65 and ResNet-101 separable DeepLabv3+ at output stride 16, 513x513, random weights). Columns:

    deeplab      deeplab.optimize_for_inference(model): the default path of `predict`, `eval` and the Python API
                 ("auto": the fastest (runtime, precision) candidate, bf16 ones included on CPUs with AMX or
                 AVX512_BF16, timed afresh unless --cached; the cell says which ran and its agreement)
    torch        the PyTorch fast path (deeplab.deploy.fast), fp32
    onnxruntime  ONNX Runtime on `deeplab export`'s ONNX file, through its own API (all graph optimizations)
    openvino     OpenVINO on `deeplab export --format openvino`'s IR, through its own API at its own default
                 precision (bf16 on CPUs with AMX or AVX512_BF16, f32 elsewhere; static shape, LATENCY)
    tflite       the official TF Lite runtime (ai-edge-litert, XNNPACK) on `deeplab export --format tflite`'s file
                 (fp32, NHWC input as a TF Lite user feeds it)
    official     the same runtime on the official .tflite file itself (the dm1.0 file is uint8: TF Lite runs it in
                 uint8, the other columns its fp32 conversion)
    with --int8: `deeplab quantize`'s int8 ONNX file (calibrated on random inputs: timing only) in ONNX Runtime
                 and in OpenVINO, and "deeplab+int8", the default path given that file (`int8=`)

Each cell: median ms [min], then the argmax agreement with the eager float32 model on the row's input. After each
row, one JSON line per thread count compares the deeplab column with the fastest of ONNX Runtime, OpenVINO (its
default) and TF Lite (`ratio`). The first line printed names the CPU, its flags of note and the runtime versions.

at 1 and 2 threads, batch 1. Every entry is built first (each exported-graph runtime checked against eager PyTorch
to 1e-4 of the logit range), warmed up twice, then timed in rounds (`deeplab.deploy.runtimes.time_in_rounds`, as `auto`
and `deeplab benchmark` time): each round runs every entry once, so the shared machine's drift hits all alike,
starting one entry later than the round before, so no entry always follows the same one. An entry's turn starts
with 50 ms idle (ONNX Runtime's worker threads spin for a while after each call: anything started right after,
PyTorch included, measured up to 2x slower); a call under 0.1 s then gets one untimed call (on this VM a worker
thread that slept through the idle can take milliseconds to run again) and is timed back to back for about 50 ms
(up to 5 calls). Printed: a Markdown table (median ms over all timed calls, min in brackets) and one JSON line per
entry. A runtime that is not installed is skipped with the reason.

    OMP_NUM_THREADS=2 python benchmarks/runtimes.py --models mnv2-dm05,mnv2-dm10 --rounds 20 --int8
    OMP_NUM_THREADS=2 python benchmarks/runtimes.py --models xception65,resnet101 --rounds 6 --int8
    python benchmarks/runtimes.py --models mnv2-dm05 --threads 1 --rounds 5     # quick
    OMP_NUM_THREADS=2 python benchmarks/runtimes.py --models resnet101 --threads 2 --rounds 8 --runtime openvino
    for i in $(seq 10); do python benchmarks/runtimes.py --models mnv2-dm05 --rounds 20 | grep ratio; done
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from deeplab import ModelConfig, build_model, retain_freed_memory
from deeplab.deploy.runners import missing_runtime
from deeplab.deploy.precision import machine_line
from deeplab.deploy.runtimes import describe_runtime, optimize_for_inference, time_in_rounds

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
MODELS = {
    "mnv2-dm05": SHARED / "deeplabv3-mnv2-dm05-voc" / "deeplabv3_257_mv_gpu.tflite",
    "mnv2-dm10": SHARED / "deeplabv3-mnv2-voc-quant" / "deeplabv3_mnv2_pascal_quant.tflite",
    "xception65": "xception65",
    "resnet101": "resnet101_beta",
}
PEERS = ("torch", "onnxruntime", "openvino", "tflite")  # the columns after deeplab's default path


def build(name: str):
    """(model, .tflite path or None, input size) for a row."""
    spec = MODELS[name]
    if isinstance(spec, Path):
        if not spec.is_file():
            return None, f"{spec} not found (see ../shared/README.md)", None
        from deeplab.convert import convert_file

        model = convert_file(spec, activation_rounding=False).eval()  # the fp32 conversion
        return model, spec, tuple(model.preprocessing.input_size)
    cfg = ModelConfig(backbone=spec, num_classes=21, output_stride=16, decoder=True, separable=True)
    torch.manual_seed(0)
    return build_model(cfg).eval(), None, (513, 513)


def tflite_entry(path: Path, threads: int, size):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=threads)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    rng = np.random.default_rng(0)
    if inp["dtype"] == np.uint8:
        x = rng.integers(0, 256, inp["shape"], dtype=np.uint8)
    else:
        x = rng.uniform(-1, 1, inp["shape"]).astype(np.float32)

    def run():
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        return interp.get_tensor(out["index"])

    return run


def int8_file(name: str, model, x: torch.Tensor, folder: str) -> Path:
    """`deeplab quantize`'s int8 file for the row's model (calibrated on random inputs: timing only)."""
    from deeplab.deploy.quantize import quantize_model

    path = Path(folder) / f"int8-{name}.onnx"
    if not path.exists():
        g = torch.Generator().manual_seed(1)
        quantize_model(model, [torch.randn(x.shape, generator=g) for _ in range(2)], path)
    return path


def int8_entry(path: Path, runtime: str, threads: int, x: torch.Tensor):
    from deeplab.deploy.runners import load_exported

    loaded = load_exported(path, runtime=runtime, threads=threads)
    return lambda: loaded(x)


def entries_for(name: str, threads_list, *, int8: bool, folder: str, skipped: list, runtime: str = "auto",
                retime: bool = True):
    """{(model, column, threads): (threads, fn, label)} and the row's input."""
    model, tfl, size = build(name)
    if model is None:
        skipped.append({"model": name, "skipped": tfl})
        return {}, None
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    entries = {}
    int8_path = int8_file(name, model, x, folder) if int8 and missing_runtime("onnxruntime") is None else None
    for threads in threads_list:
        torch.set_num_threads(threads)
        default = optimize_for_inference(model, runtime=runtime, threads=threads, example=x, retime=retime)
        entries[(name, "deeplab", threads)] = (threads, _no_grad(default, x), describe_runtime(default))
        torch_path = optimize_for_inference(model, runtime="torch", example=x)
        entries[(name, "torch", threads)] = (threads, _no_grad(torch_path, x), "torch")
        for runtime_ in ("onnxruntime", "openvino", "tflite"):
            why = missing_runtime(runtime_)
            if why:
                skipped.append({"model": name, "runtime": runtime_, "skipped": why})
                continue
            path = exported(model, name, runtime_, folder, size)
            entries[(name, runtime_, threads)] = (threads, peer_entry(runtime_, path, threads, x), runtime_)
        if tfl is not None and missing_runtime("tflite") is None:
            kind = "uint8" if "quant" in tfl.name else "float"
            entries[(name, "official", threads)] = (threads, tflite_entry(tfl, threads, size), f"tflite {kind}")
        if int8_path is not None:
            with_int8 = optimize_for_inference(model, runtime=runtime, threads=threads, example=x, retime=retime,
                                               int8=int8_path)
            entries[(name, "deeplab+int8", threads)] = (threads, _no_grad(with_int8, x), describe_runtime(with_int8))
            for runtime_ in ("onnxruntime", "openvino"):
                if missing_runtime(runtime_) is None:
                    entries[(name, f"int8 {runtime_}", threads)] = (
                        threads, int8_entry(int8_path, runtime_, threads, x), f"{runtime_} int8")
    return entries, (model, x)


def exported(model, name: str, runtime: str, folder: str, size) -> Path:
    """`deeplab export`'s file for `runtime` (ONNX, OpenVINO IR, or TF Lite at the row's size), written once per
    model and verified."""
    from deeplab.deploy.export import export_model

    fmt, suffix = {"onnxruntime": ("onnx", ".onnx"), "openvino": ("openvino", ".xml"), "tflite": ("tflite", ".tflite")}[runtime]
    path = Path(folder) / f"{name}{suffix}"
    if not path.exists():
        export_model(model, path, format=fmt, input_size=size if fmt == "tflite" else None)
    return path


def peer_entry(runtime: str, path: Path, threads: int, x: torch.Tensor):
    """The exported file in the runtime's own Python API, set up as its documentation says for CPU latency:
    ONNX Runtime with all graph optimizations and `threads` intra-op threads; OpenVINO compiled for this input
    shape (static), LATENCY hint, f32, `threads` threads; TF Lite with `threads` threads (XNNPACK), fed NHWC. Logits
    as the file gives them."""
    data = x.numpy()
    if runtime == "tflite":
        return tflite_entry(path, threads, x.shape[-2:])
    if runtime == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return lambda: session.run(None, {"image": data})[0]
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({model.input(0): ov.PartialShape(list(data.shape))})
    # OpenVINO's default precision: bf16 on CPUs with AMX or AVX512_BF16, f32 elsewhere
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    request = core.compile_model(model, "CPU", config).create_infer_request()

    def run():
        request.infer({0: data})
        return request.get_output_tensor(0).data

    return run


def agreements(entries: dict, model, x: torch.Tensor) -> dict:
    """Each entry's argmax agreement with the eager float32 model on the row's input (NHWC outputs read as such)."""
    from deeplab.deploy.precision import agreement

    with torch.no_grad():
        ref = model(x)
    out = {}
    for key, (threads, fn, _) in entries.items():
        torch.set_num_threads(threads)
        y = fn()
        y = torch.as_tensor(np.asarray(y, dtype=np.float32)) if not isinstance(y, torch.Tensor) else y.float()
        if y.dim() != 4:  # an official uint8 file's argmax map
            continue
        if y.shape[1] != ref.shape[1]:  # NHWC
            y = y.permute(0, 3, 1, 2)
        if y.shape[-2:] != ref.shape[-2:]:  # an official file's own output size
            continue
        out[key] = agreement(y, ref)
    return out


def _no_grad(model, x):
    def run():
        with torch.no_grad():
            return model(x)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--int8", action="store_true", help="also time deeplab quantize's int8 file in ONNX Runtime")
    p.add_argument("--runtime", default="auto",
                   help="what the deeplab column runs (default auto; e.g. openvino: deeplab's wrapper against the "
                        "runtime's own API in the same rounds)")
    p.add_argument("--cached", action="store_true", help="let the deeplab column take the runtime choice cached for "
                   "this machine and model, as a later `deeplab predict` does (default: it times the candidates again)")
    p.add_argument("--json-out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args()
    retain_freed_memory()  # as the deeplab command does
    threads_list = [int(t) for t in args.threads.split(",")]
    skipped: list[dict] = []
    print(f"# {machine_line()}; {torch.get_num_threads()} torch threads by default, rounds {args.rounds}", flush=True)
    columns = ["deeplab", *PEERS, "official"] + (["deeplab+int8", "int8 onnxruntime", "int8 openvino"]
                                                  if args.int8 else [])
    lines = ["| model | threads | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    records = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            entries, (model, x) = entries_for(name, threads_list, int8=args.int8, folder=folder, skipped=skipped,
                                              runtime=args.runtime, retime=not args.cached)
            if not entries:
                continue
            agree = agreements(entries, model, x)
            times = time_in_rounds({k: (t, fn) for k, (t, fn, _) in entries.items()}, runs=args.rounds, gap_s=0.05)
            for threads in threads_list:
                cells = []
                for col in columns:
                    key = (name, col, threads)
                    if key not in times:
                        cells.append("-")
                        continue
                    med, low = statistics.median(times[key]), min(times[key])
                    label = entries[key][2]
                    records.append({"model": name, "column": col, "runs": label, "threads": threads,
                                    "ms_median": round(med, 2), "ms_min": round(low, 2), "rounds": args.rounds,
                                    "calls": len(times[key]), "agreement": agree.get(key)})
                    note = f" ({label})" if col.startswith("deeplab") else ""
                    share = f" {100 * agree[key]:.2f}%" if key in agree else ""
                    cells.append(f"{med:.1f} [{low:.1f}]{share}{note}")
                lines.append(f"| {name} | {threads} | " + " | ".join(cells) + " |")
                peers = {c: statistics.median(times[(name, c, threads)]) for c in ("onnxruntime", "openvino", "tflite")
                         if (name, c, threads) in times}
                if peers and (name, "deeplab", threads) in times:
                    fastest = min(peers, key=peers.get)
                    ours = statistics.median(times[(name, "deeplab", threads)])
                    records.append({"model": name, "threads": threads, "deeplab_ms": round(ours, 2),
                                    "deeplab_runs": entries[(name, "deeplab", threads)][2], "fastest_peer": fastest,
                                    "fastest_peer_ms": round(peers[fastest], 2),
                                    "ratio": round(ours / peers[fastest], 4)})
            print("\n".join(lines[-len(threads_list):]), flush=True)
    print("\n" + "\n".join(lines))
    for r in records + skipped:
        print(json.dumps(r))
    if args.json_out:
        with open(args.json_out, "a") as f:
            for r in records + skipped:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    sys.exit(main())
