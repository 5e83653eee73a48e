"""MobileNet-EdgeTPU and the official DeepLab EdgeTPU-slim Cityscapes model (uint8 TFLite).

Shapes at odd sizes for every output stride and decoder, and a real forward/backward, come from the
parametrisations over `BACKBONES` in tests/test_models.py; this file pins what is particular to MobileNet-EdgeTPU,
the import of the official file, and its agreement with the official TF Lite runtime, which made the reference mask
in ../shared and, where `ai-edge-litert` is installed, runs here on street scenes the reference does not cover.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_fast import (
    _randomise_bn,  # shared with the fast path's tests (pytest puts tests/ on sys.path)
)
from torch import nn

from deeplab import ModelConfig, build_model
from deeplab.deploy.fast import optimize_for_inference
from deeplab.models.activation_rounding import round_like_uint8
from deeplab.models.backbones import BACKBONES
from deeplab.models.checkpoint import load

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EDGETPU_DIR = SHARED / "models" / "deeplab-edgetpu-slim-cityscapes-quant"
EDGETPU_FILE = EDGETPU_DIR / "deeplab_mobilenet_edgetpu_slim_cityscapes_quant.tflite"
REFERENCE = EDGETPU_DIR / "reference"
CAMVID_VAL = SHARED / "data" / "camvid" / "val"

needs_file = pytest.mark.skipif(
    not EDGETPU_FILE.is_file(), reason=f"official EdgeTPU-slim TFLite model not found at {EDGETPU_FILE}"
)


def _meta_backbone(**kw) -> nn.Module:
    with torch.device("meta"):
        return BACKBONES["mobilenet_edgetpu"](**kw)


def test_channels_at_multiplier_075_are_the_official_slim_models():
    # TF's V3_EDGETPU rows with depth multiplier 0.75 and make_divisible(c, 8), written out by hand:
    # outputs 16->12->16, 32->24, 48->36->40, 96->72, 160->120, 192->144; expansions make_divisible(input * ef, 8).
    b = _meta_backbone(depth_multiplier=0.75)
    assert b.stem.conv.out_channels == 24
    outs = [16] + [24] * 4 + [40] * 4 + [72] * 8 + [120] * 4 + [144]
    hidden = [24, 128, 96, 96, 96, 192, 160, 160, 160, 320, 288, 288, 288, 576, 288, 288, 288, 576, 480, 480, 480, 960]
    assert [blk.project.conv.out_channels for blk in b.blocks] == outs
    assert [blk.hidden_channels for blk in b.blocks] == hidden
    # Fused blocks: a full 3x3 conv expands (none in block 0, ef 1), no depthwise; the rest are inverted residuals.
    assert b.blocks[0].expand is None and b.blocks[0].depthwise is None
    assert all(blk.expand.conv.kernel_size == (3, 3) and blk.depthwise is None for blk in b.blocks[1:9])
    assert all(blk.expand.conv.kernel_size == (1, 1) and blk.depthwise is not None for blk in b.blocks[9:])
    assert [blk.depthwise.conv.kernel_size[0] for blk in b.blocks[9:]] == [3] * 8 + [5] * 4 + [3]
    # Residuals where stride 1 and widths agree, except block 13 (TF's residual=False).
    assert [i for i, blk in enumerate(b.blocks) if blk.use_residual] == [2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 16, 18, 19, 20]
    assert b.final.conv.out_channels == 1280 and b.channels == {"low_level": 24, "out": 1280}
    assert all(isinstance(m, nn.ReLU) for m in b.modules() if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardswish)))


def _spatial(backbone):
    convs = [blk.expand if blk.depthwise is None else blk.depthwise for blk in backbone.blocks if blk.expand is not None]
    return [(c.conv.stride[0], c.conv.dilation[0]) for c in convs]


@pytest.mark.parametrize(
    "output_stride,expected",
    [
        # Blocks 1-21 (block 0 has no spatial conv). Nominal strides at blocks 1, 5, 9, 17.
        (32, [(2, 1)] + [(1, 1)] * 3 + [(2, 1)] + [(1, 1)] * 3 + [(2, 1)] + [(1, 1)] * 7 + [(2, 1)] + [(1, 1)] * 4),
        # TF's rule: the k5 block's stride removed, that block at rate 1, the later ones at rate 2 (the official file).
        (16, [(2, 1)] + [(1, 1)] * 3 + [(2, 1)] + [(1, 1)] * 3 + [(2, 1)] + [(1, 1)] * 7 + [(1, 1)] + [(1, 2)] * 4),
        (8, [(2, 1)] + [(1, 1)] * 3 + [(2, 1)] + [(1, 1)] * 3 + [(1, 1)] + [(1, 2)] * 7 + [(1, 2)] + [(1, 4)] * 4),
    ],
)
def test_strides_become_dilations_by_tfs_rule(output_stride, expected):
    assert _spatial(_meta_backbone(output_stride=output_stride)) == expected


def test_fast_path_equals_plain_model_and_trains_with_one_image():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilenet_edgetpu", num_classes=5, decoder=True, separable=True, depth_multiplier=0.75)
    model = _randomise_bn(build_model(cfg))
    fast = optimize_for_inference(model)
    x = torch.randn(1, 3, 97, 129)
    with torch.no_grad():
        ref, out = model.eval()(x), fast(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    model.train()
    y = model(torch.randn(1, 3, 65, 65))
    y.logsumexp(1).mean().backward()
    assert model.backbone.blocks[1].expand.conv.weight.grad.abs().sum() > 0


def test_round_like_uint8_by_hand():
    # scale 0.5, zero point 10: q = clamp(round(x / 0.5) + 10, 0, 255), value (q - 10) * 0.5.
    x = torch.tensor([-6.0, -4.9, 0.26, 3.7, 200.0])
    expected = torch.tensor([-5.0, -5.0, 0.5, 3.5, 122.5])  # q = 0 (clamped), 0, 11, 17, 255 (clamped)
    assert torch.equal(round_like_uint8(x, 0.5, 10), expected)


# ---------------------------------------------------------------------------------------------- the official file


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    if not EDGETPU_FILE.is_file():
        pytest.skip(f"official EdgeTPU-slim TFLite model not found at {EDGETPU_FILE}")
    pytest.importorskip("tflite", reason="the `tflite` package is not installed: pip install 'deeplab[tflite]'")
    out = tmp_path_factory.mktemp("edgetpu") / "edgetpu.pt"
    cmd = [sys.executable, "-m", "deeplab", "convert", str(EDGETPU_FILE), str(out), "--labels", "cityscapes"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "mobilenet_edgetpu (depth multiplier 0.75), output stride 16" in done.stdout
    assert "activations rounded as the uint8 file rounds them (79 places)" in done.stdout
    return out


@needs_file
def test_official_file_converts_with_every_shape_read_from_it(converted):
    model = load(converted)
    cfg = model.config
    assert (cfg.backbone, cfg.depth_multiplier, cfg.output_stride, cfg.rates) == ("mobilenet_edgetpu", 0.75, 16, ())
    assert (cfg.num_classes, cfg.aspp_channels, cfg.image_pooling, cfg.decoder, cfg.align_corners) == (19, 128, True, False, True)
    assert model.class_names[:3] == ("road", "sidewalk", "building")
    assert model.preprocessing.mean == (128.0,) * 3 and model.preprocessing.std == (128.0,) * 3


@needs_file
def test_predict_agrees_with_the_official_cpu_runtime_on_the_reference_scene(converted, tmp_path):
    subprocess.run(
        [sys.executable, "-m", "deeplab", "predict", "--checkpoint", str(converted), "--quiet",
         str(REFERENCE / "cityscapes_segmentation.bmp"), "--out", str(tmp_path)],
        check=True, capture_output=True,
    )
    ours = np.asarray(Image.open(tmp_path / "cityscapes_segmentation.png"))
    runtime = np.asarray(Image.open(REFERENCE / "cityscapes_segmentation_cpu_runtime_argmax.png"))
    agreement = (ours == runtime).mean()
    assert agreement >= 0.97, f"{agreement:.4f}"  # 0.9907 measured


def _street_crop(path: Path) -> np.ndarray:
    """A 513x513 crop of a street scene: shorter side resized to 513, the centre kept."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    s = 513 / min(w, h)
    image = image.resize((round(w * s), round(h * s)), Image.BILINEAR)
    left, top = (image.size[0] - 513) // 2, (image.size[1] - 513) // 2
    return np.asarray(image.crop((left, top, left + 513, top + 513)))


@needs_file
@pytest.mark.skipif(not CAMVID_VAL.is_dir(), reason=f"CamVid not found at {CAMVID_VAL}")
def test_agreement_with_the_official_runtime_holds_on_other_street_scenes(converted):
    litert = pytest.importorskip("ai_edge_litert.interpreter", reason="pip install ai-edge-litert (the official runtime)")
    interpreter = litert.Interpreter(model_path=str(EDGETPU_FILE), num_threads=1)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    model = load(converted)
    fast = optimize_for_inference(model)
    plain = load(converted)
    plain._forward_hooks.clear()
    for m in plain.modules():  # the same weights without the file's activation rounding
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    rows = []
    for path in sorted(CAMVID_VAL.glob("*.png"))[::20]:  # six scenes of a city CamVid's Cityscapes model never saw
        image = _street_crop(path).copy()
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        runtime = interpreter.get_tensor(out["index"])[0]
        x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() - 128) / 128
        with torch.no_grad():
            rows.append([(m(x).argmax(1)[0].numpy() == runtime).mean() for m in (model, fast, plain)])
    rows = np.array(rows)
    print("agreement with the runtime (rounded eager, rounded fast, plain float):", rows.round(4).tolist())
    assert rows[:, :2].min() >= 0.97, rows  # rounded: 0.974-0.987 measured (eager and fast path)
    assert rows[:, 2].mean() < rows[:, 0].mean(), rows  # plain float agrees less (0.930-0.981 measured)


@needs_file
def test_tile_that_is_not_a_broadcast_is_refused():
    from deeplab.convert.tflite import model_from_graph
    from deeplab.convert.tflite_file import TFLiteImportError, read_tflite_graph

    graph = read_tflite_graph(EDGETPU_FILE)
    tile = next(op for op in graph.ops if op.type == "TILE")
    multiples = tile.inputs[1]
    g = dataclasses.replace(graph, constants={**graph.constants, multiples: np.array([1, 33, 1, 1], np.int32)})
    with pytest.raises(TFLiteImportError, match=rf"op {tile.index} \(TILE\).*image pooling tiles 1x1 to 33x33"):
        model_from_graph(g)


@needs_file
def test_float_activations_convert_without_rounding(tmp_path):
    out = tmp_path / "float.pt"
    subprocess.run(
        [sys.executable, "-m", "deeplab", "convert", str(EDGETPU_FILE), str(out), "--float-activations"],
        check=True, capture_output=True,
    )
    model = load(out)
    assert model.activation_rounding is None
    assert not any(m._forward_hooks for m in model.modules())
    assert re.fullmatch(r"class_\d+", model.class_names[0])  # no labelmap.txt beside the file, no --labels


@needs_file
def test_onnx_export_keeps_every_rounding_and_reproduces_the_model_on_the_reference(converted, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "edgetpu.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "deeplab", "export", "--checkpoint", str(converted), "--format", "onnx", "--out", str(out)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node) == 79
    model = load(converted)
    image = np.asarray(Image.open(REFERENCE / "cityscapes_segmentation.bmp").convert("RGB")).copy()
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() - 128) / 128
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        eager = model(x).numpy()
    assert (got.argmax(1) == eager.argmax(1)).mean() >= 0.98  # 0.990 measured (onnxruntime runs the roundings as int8)
    refused = subprocess.run(
        [sys.executable, "-m", "deeplab", "export", "--checkpoint", str(converted), "--format", "pt2",
         "--out", str(tmp_path / "x.pt2")], capture_output=True, text=True,
    )
    assert refused.returncode == 2 and "--float-activations" in refused.stderr and not (tmp_path / "x.pt2").exists()
