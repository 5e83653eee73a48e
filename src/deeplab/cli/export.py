"""`deeplab export`: ONNX, OpenVINO, TorchScript, torch.export or TF Lite, checked against the eager model."""

from __future__ import annotations

import argparse
import sys

from .flags import number, size_arg, sizes_arg


def run(args: argparse.Namespace) -> int:
    from ..deploy.export import ExportCheckError, export_model
    from ..models.checkpoint import model_from_checkpoint, read_checkpoint

    from ..models.hub import checkpoint_path

    if args.format == "hub":
        return _hub(args)
    data = read_checkpoint(checkpoint_path(args.checkpoint))
    model = model_from_checkpoint(data, source=str(args.checkpoint)).eval()
    extra = {"train_config": data["train_config"]} if data.get("train_config") else None
    try:
        res = export_model(model, args.out, format=args.format, sizes=args.check_sizes, rtol=args.rtol,
                           opset=args.opset, dynamo=args.dynamo, metadata=extra,
                           output_layout="NHWC" if args.nhwc_logits else "NCHW", input_size=args.input_size)
    except ExportCheckError as e:
        print(f"deeplab export: FAILED: {e}", file=sys.stderr)
        return 1
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in res["max_rel_diff"].items())
    rounded = " without activation rounding (every rounding is in the file)" if model.activation_rounding else ""
    print(f"{args.checkpoint} -> {res['path']} ({args.format}, {res['seconds']:.1f} s); "
          f"max |exported - eager|{rounded} / logit range {diffs} (allowed {args.rtol:g})")
    return 0


def _hub(args: argparse.Namespace) -> int:
    from ..models.checkpoint import export_folder
    from ..models.hub import checkpoint_path

    res = export_folder(checkpoint_path(args.checkpoint), args.out, license=args.license)
    run = f"; its card shows the run {res['run']}" if res["run"] else ""
    print(f"{args.checkpoint} -> {res['path']} (model folder: config.json, model.safetensors, README.md; "
          f"{res['bytes'] / 1e6:.1f} MB, {res['tensors']} tensors read back bit-identical{run}). Use it as any "
          f"checkpoint (deeplab predict --checkpoint {res['path']}), or publish it: deeplab.push_to_hub(FOLDER, REPO_ID)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX, OpenVINO, TorchScript, torch.export or TF Lite, "
                       "verified against eager, or write it as a model folder to share (--format hub)")
    p.add_argument("--checkpoint", required=True,
                   help="deeplab checkpoint: a .pt, a model folder, or a Hub repo id owner/name (pip install "
                   "'deeplab[hub]'; with HF_HUB_OFFLINE=1 from the local cache only)")
    p.add_argument("--format", required=True, choices=["onnx", "openvino", "torchscript", "pt2", "tflite", "hub"],
                   help="the file format: onnx, openvino (an .xml + .bin pair), torchscript, pt2 (torch.export), "
                   "tflite, or hub: a model folder (config.json, model.safetensors, README.md model card)")
    p.add_argument("--out", required=True,
                   help="file to write (.onnx, OpenVINO .xml (+ .bin beside it), .pt, .pt2, .tflite), or the folder "
                   "for --format hub")
    p.add_argument("--license", default=None,
                   help="hub: the license of the weights for the model card's metadata, e.g. apache-2.0 (default other)")
    p.add_argument("--input-size", type=size_arg, default=None,
                   help="tflite: the file's fixed input size HxW (default: the checkpoint's input size, else 513x513)")
    p.add_argument("--dynamo", action="store_true", help="ONNX: the torch.export-based exporter (slower) instead of the legacy one")
    p.add_argument("--opset", type=number(int, 17, "17 or newer"), default=17, help="ONNX opset, 17 or newer (default %(default)s)")
    p.add_argument("--nhwc-logits", action="store_true",
                   help="ONNX: logits (N, H, W, classes), upsampled NHWC: faster in ONNX Runtime (metadata output_layout)")
    p.add_argument("--check-sizes", type=sizes_arg, default=((257, 257), (193, 321)),
                   help="input sizes to compare against eager (default 257x257,193x321)")
    p.add_argument(
        "--rtol", type=number(float, 0, "positive, e.g. 1e-4", strict=True), default=1e-4,
        help="largest allowed |exported - eager| as a fraction of the eager logits' range (default %(default)s)",
    )
    p.set_defaults(func=run)
