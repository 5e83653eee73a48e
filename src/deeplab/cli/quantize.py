"""`deeplab quantize`: int8 post-training quantization calibrated on a dataset's images."""

from __future__ import annotations

import argparse

from .eval import eval_data
from .flags import add_folder_flags, float_tuple, number


def _spread(count: int, total: int, offset: float = 0.0) -> list[int]:
    """`count` indices spread evenly over range(total) (shifted by `offset` of a step)."""
    count = min(count, total)
    step = total / max(count, 1)
    return sorted({min(total - 1, int((i + offset) * step)) for i in range(count)})


def _calibration_and_check(count: int, calibration: int, check: int) -> tuple[list[int], list[int]]:
    """Indices of `calibration` images spread over `count`, and of up to `check` others spread over the rest, for
    the int8-vs-float agreement on images the calibration did not see (none when it used them all)."""
    chosen = _spread(calibration, count)
    taken = set(chosen)
    rest = [i for i in range(count) if i not in taken]
    return chosen, [rest[j] for j in _spread(check, len(rest), offset=0.5)] if rest else []


def run(args: argparse.Namespace) -> int:
    from ..deploy.quantize import int8_path, quantize_model
    from ..inference.evaluate import build_eval_dataset
    from ..inference.predict import resolve_input_size
    from ..inference.segment import _resize, scaled_size
    from ..models.checkpoint import model_from_checkpoint, read_checkpoint
    from ..models.hub import checkpoint_path, is_repo_id

    if args.out is None and is_repo_id(args.checkpoint):  # its default home would be inside the Hugging Face cache
        raise ValueError(f"--checkpoint {args.checkpoint}: a Hub repo, read from the Hugging Face cache, where the "
                         "int8 file does not belong; pass --out FILE.int8.onnx, or copy the model to a local folder first "
                         f"(deeplab export --checkpoint {args.checkpoint} --format hub --out DIR)")
    data = read_checkpoint(checkpoint_path(args.checkpoint))
    model = model_from_checkpoint(data, source=str(args.checkpoint)).eval()
    trained = data.get("train_config") or {}
    scales = args.scales or tuple(trained.get("val_scales") or (1.0,))
    size = resolve_input_size(model, "model")
    align = bool(model.config.align_corners)

    def scaled(x):
        x = x if size is None else _resize(x, size, align_corners=align)
        base = tuple(x.shape[-2:])
        return [x if s == 1.0 else _resize(x, scaled_size(base, s, align_corners=align), align_corners=align)
                for s in scales]

    if args.images:  # any image files: no masks needed to calibrate
        from ..inference.predict import _normalised, expand_inputs, load_image

        files = [path for path, _ in expand_inputs(args.images)[0]]
        if not files:
            raise ValueError(f"--images {' '.join(args.images)}: no image files found")
        name, split, count = "image", ",".join(args.images), len(files)
        load = lambda i: _normalised(model, load_image(files[i]))  # noqa: E731
    else:
        name, root, split, seed, options = eval_data(args, trained, source=str(args.checkpoint))
        if args.split is None and split != "all":  # calibrate on training images, not on the ones scored later
            split = trained.get("train_split", "train")
        dataset = build_eval_dataset(model, name, root=root, split=split, seed=seed, **options)
        count = len(dataset)
        load = lambda i: dataset[i][0][None]  # noqa: E731
    chosen, others = _calibration_and_check(count, args.calibration_images, args.check_images)
    calibration = [x for i in chosen for x in scaled(load(i))]
    held = [x for i in others for x in scaled(load(i))]
    extra = {"train_config": data["train_config"]} if data.get("train_config") else {}
    extra["calibration"] = {"dataset": name, "split": split, "images": len(calibration), "scales": list(scales)}
    out = args.out or int8_path(args.checkpoint)
    res = quantize_model(model, calibration, out, held_out=held, metadata=extra)
    agreement = "" if res["agreement"] is None else (
        f"; argmax agreement with the float model on {len(held)} other {split} images: {100 * res['agreement']:.2f}%")
    print(f"{args.checkpoint} -> {res['path']} (int8, {res['quantized_convs']} convolutions, calibrated on "
          f"{len(calibration)} {name} {split} images at scale {','.join(f'{v:g}' for v in scales)}, "
          f"{res['seconds']:.0f} s){agreement}. In float: the image-pooling branch, the classifier's output and the last "
          f"upsampling. Score it: deeplab eval --checkpoint {res['path']}"
          + ("; beside its checkpoint, predict and eval --precision auto consider it (--precision int8 runs it)"
             if args.out is None else ""))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="int8 post-training quantization (ONNX Runtime), calibrated on a dataset's images")
    p.add_argument("--checkpoint", required=True, help="deeplab checkpoint (float; .pt, model folder or Hub repo id "
                   "owner/name, which needs --out)")
    p.add_argument("--out", default=None, help="the int8 ONNX file to write (.onnx; default CKPT_NAME.int8.onnx beside "
                   "the checkpoint, DIR/model.int8.onnx in a model folder, where predict / eval --precision auto find "
                   "it); run any with --checkpoint FILE")
    p.add_argument("--images", nargs="+", default=None, help="calibrate on these image files, folders or globs "
                   "(no masks needed) instead of a dataset")
    p.add_argument("--dataset", default=None, help="calibration images: voc, cityscapes, ade20k, camvid, folder (default: "
                   "the checkpoint's training data)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the checkpoint's training data)")
    p.add_argument("--split", default=None, help="split to calibrate on (default: the training split)")
    add_folder_flags(p, "as for deeplab eval")
    p.add_argument("--calibration-images", type=number(int, 1, "a positive number of images"), default=64,
                   help="images to measure activation ranges on, spread over the split (default %(default)s)")
    p.add_argument("--check-images", type=number(int, 0, "0 or more images"), default=8,
                   help="other images of the split to report int8-vs-float argmax agreement on (default %(default)s)")
    p.add_argument("--scales", type=float_tuple, default=None,
                   help="image scales to calibrate at (default: the scales the checkpoint was validated at)")
    p.set_defaults(func=run)
