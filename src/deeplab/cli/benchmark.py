"""`deeplab benchmark`: ms per image and images/s of a model on every installed runtime and thread count."""

from __future__ import annotations

import argparse
import json

from .flags import int_tuple, number, size_arg, str_tuple


def run(args: argparse.Namespace) -> int:
    from ..deploy.benchmark import benchmark, format_table

    from ..models.hub import checkpoint_path

    rows = benchmark(checkpoint_path(args.checkpoint), runtimes=args.runtimes, threads=args.threads_list,
                     size=args.size, runs=args.runs, progress=not args.quiet, precisions=args.precisions)
    print(json.dumps(rows) if args.json else format_table(rows))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("benchmark", help="ms per image and images/s of a model on every installed runtime and thread count")
    p.add_argument("--checkpoint", required=True,
                   help="deeplab checkpoint (.pt, model folder or Hub repo id owner/name), or an exported .onnx / "
                   "OpenVINO .xml / .tflite file")
    p.add_argument("--size", type=size_arg, default=None, help="input HxW (default: the model's input size, else 513x513)")
    p.add_argument("--runtimes", type=str_tuple, default=("torch", "onnxruntime", "openvino", "tflite"),
                   help="comma-separated, from torch, eager, onnxruntime, openvino, tflite (default: all but eager)")
    p.add_argument("--threads", dest="threads_list", type=int_tuple, default=None,
                   help="thread counts, e.g. 1,2 (default: 1 and PyTorch's default)")
    p.add_argument("--runs", type=number(int, 1, "a positive number of runs"), default=10,
                   help="timed runs per runtime and thread count, interleaved in rounds (default %(default)s)")
    p.add_argument("--precisions", type=str_tuple, default=None,
                   help="comma-separated, from fp32, bf16, int8 (default: fp32, bf16 where the CPU has AMX or "
                   "AVX512_BF16, int8 when deeplab quantize wrote CKPT_NAME.int8.onnx beside the checkpoint)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
