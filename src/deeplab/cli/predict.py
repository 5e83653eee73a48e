"""`deeplab predict`: index PNGs, overlays and probabilities for image files, folders or globs, and classified
GeoTIFFs of rasters; under torchrun the inputs are shared between the processes and process 0 prints the totals."""

from __future__ import annotations

import argparse
import sys

from .flags import (
    add_inference_flags,
    add_raster_flags,
    inference_options,
    load_for_inference,
    number,
    raster_note,
    raster_tiling,
    resolve_device,
)


def run(args: argparse.Namespace) -> int:
    import torch

    from pathlib import Path

    from ..data.bands import RASTER_SUFFIXES
    from ..inference.predict import PredictReport, predict_files
    from ..training.distributed import init_distributed

    device = resolve_device(args.device)
    dist_info = init_distributed(device_type=device.type)  # under torchrun: the inputs are shared out
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    model, _ = load_for_inference(args.checkpoint, args)
    if next(model.parameters(), None) is not None:
        model = model.to(device)
    note = raster_note(args, model)
    if note and dist_info.is_main and any(str(i).lower().endswith(RASTER_SUFFIXES) or Path(i).is_dir()
                                         for i in args.inputs):
        print(f"deeplab predict: {note}", file=sys.stderr)
    report = predict_files(
        model, args.inputs, out_dir=args.out, overlay_alpha=args.alpha if args.overlay else None, save_probs=args.probs,
        progress=not args.quiet and dist_info.is_main, options=inference_options(args), tiling=raster_tiling(args, model),
        overwrite=args.overwrite, cog=args.cog, scale=args.scale, resolution=args.resolution, rank=dist_info.rank, world_size=dist_info.world_size,
    )
    if dist_info.enabled:
        import torch.distributed as dist

        reports: list = [None] * dist_info.world_size
        dist.all_gather_object(reports, report)
        report = PredictReport.merged(reports)
        dist.destroy_process_group()
        if not dist_info.is_main:
            return 0 if report.ok else 1
    for source, done in report.rasters.items():
        print(f"{source}: {done.megapixels:.1f} Mpx in {done.seconds:.1f} s ({done.megapixels_per_second:.2f} Mpx/s) "
              f"-> {done.path}")
    for _name, message in report.failed:
        print(f"deeplab predict: {message}", file=sys.stderr)
    files = sum(len(v) for v in report.written.values())
    skipped = f", skipped {len(report.skipped)} done before (--overwrite redoes them)" if report.skipped else ""
    print(f"wrote {files} files for {len(report.written)} inputs to {args.out}{skipped} (runtime {report.runtime})")
    if report.failed:
        total = len(report.written) + len(report.skipped) + len(report.failed)
        print(f"deeplab predict: {len(report.failed)} of {total} inputs failed", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="segment image files, folders or globs into index PNGs (+ overlays, probabilities), "
                       "and rasters of any size (GeoTIFF) into classified GeoTIFFs")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns; videos "
                   "(.mp4, .avi, .mov, .mkv, .webm) only with the optional imageio package (pip install 'imageio[pyav]'), "
                   "otherwise they are reported as failed")
    p.add_argument("--checkpoint", required=True, help="deeplab checkpoint (.pt, model folder, or a Hub repo id "
                   "owner/name: pip install 'deeplab[hub]', with HF_HUB_OFFLINE=1 from the local cache only), or a "
                   ".onnx / OpenVINO .xml file from `deeplab export` or `deeplab quantize`")
    p.add_argument("--out", required=True, help="output folder: NAME.png index PNGs in the dataset's palette; for a "
                   "raster NAME.tif, NAME.tif: class indices with the source's georeference, NoData 255")
    p.add_argument("--overlay", action="store_true", help="also NAME_overlay.png, the image blended with the colours "
                   "(photos only)")
    p.add_argument("--alpha", type=number(float, 0, "in [0, 1], e.g. 0.5", below=1, below_inclusive=True), default=0.5, help="overlay colour weight (default %(default)s)")
    p.add_argument("--probs", action="store_true", help="also NAME_probs.npy, class probabilities float16 (C, H, W); "
                   "for a raster NAME_probs.tif, one 16-bit float band per class")
    add_inference_flags(p)
    add_raster_flags(p)
    p.add_argument("--cog", action=argparse.BooleanOptionalAction, default=True,
                   help="rasters: write cloud-optimised GeoTIFFs (512-pixel tiles, internal overviews: mode of the "
                   "classes, average of the probabilities; DEFLATE), the default; --no-cog: tiled GeoTIFFs of "
                   "256-pixel tiles without overviews, one pass less")
    p.add_argument("--overwrite", action="store_true", help="predict every input again; by default an input whose "
                   "outputs in --out are complete and were made by the same checkpoint and options is skipped (a "
                   "record per input in OUT/.deeplab-predict/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
