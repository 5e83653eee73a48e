"""int8 against fp32 on the official MobileNetV2 dm1.0 VOC model: argmax agreement on the VOC sample images.

The official uint8 file (../shared/models/deeplabv3-mnv2-voc-quant) is converted to a float model
(`--float-activations`: the fp32 conversion), which `deeplab quantize`'s code quantizes to int8, calibrated on
images that are not scored (CamVid train street scenes by default, resized to the model's 513x513 input). Scored: the
three VOC samples and the bird image shipped with the model, each at the model's input size as `deeplab predict`
runs them. Printed per image and pooled: the share of pixels where the int8 model's argmax equals the fp32
conversion's, and the same for the official TF Lite runtime on the uint8 file itself (the zoo's own 8-bit model),
for comparison.

    python benchmarks/int8_voc.py --calibration-images 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "deeplabv3-mnv2-voc-quant" / "deeplabv3_mnv2_pascal_quant.tflite"
IMAGES = sorted((SHARED / "data" / "voc-samples").glob("*_image.png")) + [MODEL.parent / "bird_segmentation.bmp"]


def tflite_argmax(rgb: np.ndarray) -> np.ndarray:
    """The official runtime's argmax on the uint8 file, at the image's size (resize in, nearest out, as its demo)."""
    from ai_edge_litert.interpreter import Interpreter
    from PIL import Image

    interp = Interpreter(model_path=str(MODEL), num_threads=torch.get_num_threads())
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    h, w = inp["shape"][1:3]
    x = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR), dtype=np.uint8)[None]
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    labels = interp.get_tensor(out["index"])[0]
    labels = labels.argmax(-1) if labels.ndim == 3 else labels
    return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(rgb.shape[1::-1], Image.NEAREST))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", default=str(SHARED / "data" / "camvid" / "train"), help="folder of images")
    p.add_argument("--calibration-images", type=int, default=64)
    args = p.parse_args()
    if not MODEL.is_file():
        sys.exit(f"{MODEL} not found (see ../shared/README.md)")
    from deeplab.convert import convert_file
    from deeplab.deploy.quantize import quantize_model
    from deeplab.deploy.runners import load_exported
    from deeplab.inference.predict import (
        _normalised,
        expand_inputs,
        load_image,
        predict,
    )
    from deeplab.inference.segment import _resize

    model = convert_file(MODEL, activation_rounding=False).eval()
    size = tuple(model.preprocessing.input_size)
    files = [path for path, _ in expand_inputs([args.calibration])[0]]
    step = max(1, len(files) // args.calibration_images)
    calibration = [_resize(_normalised(model, load_image(f)), size, align_corners=True)
                   for f in files[::step][: args.calibration_images]]
    rows, same, same_tfl, total = [], 0, 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        res = quantize_model(model, calibration, Path(tmp) / "voc-int8.onnx")
        int8 = load_exported(res["path"])
        for path in IMAGES:
            rgb = load_image(path)
            ref = predict(model, rgb)
            got = predict(int8, rgb)
            tfl = tflite_argmax(rgb)
            rows.append({"image": path.name, "pixels": int(ref.size), "int8_agreement": float((got == ref).mean()),
                         "tflite_uint8_agreement": float((tfl == ref).mean())})
            same += int((got == ref).sum())
            same_tfl += int((tfl == ref).sum())
            total += ref.size
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"pooled_int8_agreement": same / total, "pooled_tflite_uint8_agreement": same_tfl / total,
                      "calibration_images": len(calibration), "calibration": args.calibration,
                      "quantize_seconds": round(res["seconds"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
