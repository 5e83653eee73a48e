"""The TFLite importer against the official TF DeepLab MobileNetV2 files and the official runtime's own outputs.

Reads `../shared/models/` (see shared/README.md); skips with the reason when that folder or `tflite` is absent.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplab.convert.tflite import load_tflite, model_from_graph
from deeplab.convert.tflite_file import (
    TFLiteImportError,
    TFLiteOp,
    TFLiteTensor,
    read_tflite_graph,
)
from deeplab.models.checkpoint import load, save_checkpoint
from deeplab.models.config import Preprocessing
from deeplab.models.model import DeepLab

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FLOAT_DIR = SHARED / "models" / "deeplabv3-mnv2-dm05-voc"
FLOAT_FILE = FLOAT_DIR / "deeplabv3_257_mv_gpu.tflite"
REFERENCE = FLOAT_DIR / "reference"
QUANT_DIR = SHARED / "models" / "deeplabv3-mnv2-voc-quant"
QUANT_FILE = QUANT_DIR / "deeplabv3_mnv2_pascal_quant.tflite"
CITY_DIR = SHARED / "models" / "deeplab-edgetpu-slim-cityscapes-quant"
CITY_FILE = CITY_DIR / "deeplab_mobilenet_edgetpu_slim_cityscapes_quant.tflite"

tflite = pytest.importorskip("tflite", reason="the `tflite` package is not installed: pip install 'deeplab[tflite]'")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

needs_float = pytest.mark.skipif(not FLOAT_FILE.is_file(), reason=f"official float TFLite model not found at {FLOAT_FILE}")
needs_quant = pytest.mark.skipif(not QUANT_FILE.is_file(), reason=f"official quantized TFLite model not found at {QUANT_FILE}")


@pytest.fixture(scope="module")
def float_model() -> DeepLab:
    if not FLOAT_FILE.is_file():
        pytest.skip(f"official float TFLite model not found at {FLOAT_FILE}")
    return load_tflite(FLOAT_FILE)


@pytest.fixture(scope="module")
def float_graph():
    if not FLOAT_FILE.is_file():
        pytest.skip(f"official float TFLite model not found at {FLOAT_FILE}")
    return read_tflite_graph(FLOAT_FILE)


@pytest.fixture(scope="module")
def quant_model() -> DeepLab:
    if not QUANT_FILE.is_file():
        pytest.skip(f"official quantized TFLite model not found at {QUANT_FILE}")
    return load_tflite(QUANT_FILE)


def normalise(image: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """HWC uint8 RGB -> (1, 3, H, W) float as the model's preprocessing prescribes."""
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    return (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


# ------------------------------------------------------------------------------------------ what is read from the file


@needs_float
def test_graph_reader_gives_ops_in_order_with_options_and_float_constants(float_graph):
    g = float_graph
    assert len(g.ops) == 70 and g.inputs == ("sub_7",) and g.outputs == ("ResizeBilinear_3",)
    stem = g.ops[0]
    assert stem.type == "CONV_2D" and stem.inputs[0] == "sub_7" and stem.outputs == ("MobilenetV2/Conv/Relu6",)
    assert stem.options["stride"] == (2, 2) and stem.options["padding"] == "SAME" and stem.options["activation"] == "RELU6"
    assert g.tensors["MobilenetV2/Conv/weights"].shape == (16, 3, 3, 3)  # OHWI, 32 * 0.5 output channels
    assert g.constants["MobilenetV2/Conv/weights"].dtype == np.float32
    assert g.ops[-1].type == "RESIZE_BILINEAR" and g.ops[-1].options["align_corners"] is True
    dilations = [op.options["dilation"][0] for op in g.ops if op.type == "DEPTHWISE_CONV_2D"]
    assert max(dilations) == 4  # output stride 8: the last groups run atrous, not strided


@needs_float
def test_float_file_maps_to_the_documented_architecture(float_model):
    cfg = float_model.config
    assert (cfg.backbone, cfg.depth_multiplier, cfg.output_stride) == ("mobilenet_v2", 0.5, 8)
    assert cfg.rates == () and cfg.image_pooling and not cfg.decoder
    assert cfg.num_classes == 21 and cfg.align_corners is True
    assert float_model.preprocessing == Preprocessing(mean=(127.5,) * 3, std=(127.5,) * 3, input_size=(257, 257))
    # labelmap.txt beside the file names the classes
    assert float_model.class_names[:3] == ("background", "aeroplane", "bicycle") and len(float_model.class_names) == 21
    assert not float_model.training


@needs_quant
def test_quantized_file_maps_with_input_quantization_as_preprocessing(quant_model):
    cfg = quant_model.config
    assert (cfg.depth_multiplier, cfg.output_stride, cfg.rates, cfg.num_classes) == (1.0, 16, (), 21)
    # uint8 input, scale 1/128, zero point 128: real = (q - 128) / 128
    assert quant_model.preprocessing == Preprocessing(mean=(128.0,) * 3, std=(128.0,) * 3, input_size=(513, 513))


@needs_quant
def test_quantized_graph_is_dequantized_per_tensor():
    g = read_tflite_graph(QUANT_FILE)
    name = g.ops[0].inputs[1]
    t = g.tensors[name]
    assert t.dtype == "UINT8" and len(t.scale) == 1
    raw = _raw_buffer(QUANT_FILE, name)
    expected = (raw.astype(np.float64) - t.zero_point[0]) * t.scale[0]
    np.testing.assert_allclose(g.constants[name], expected.reshape(t.shape), rtol=1e-6)
    bias = g.tensors[g.ops[0].inputs[2]]
    assert bias.dtype == "INT32" and g.constants[bias.name].dtype == np.float32


def _raw_buffer(path: Path, tensor_name: str) -> np.ndarray:
    data = path.read_bytes()
    model = tflite.Model.GetRootAsModel(data, 0)
    sub = model.Subgraphs(0)
    for i in range(sub.TensorsLength()):
        t = sub.Tensors(i)
        if t.Name().decode() == tensor_name:
            return model.Buffers(t.Buffer()).DataAsNumpy()
    raise KeyError(tensor_name)


def test_per_channel_dequantization_scales_along_the_quantized_dimension():
    from deeplab.convert.tflite_file import _dequantize

    q = np.array([[[[10, 20]]], [[[10, 20]]]], dtype=np.int8)  # (2, 1, 1, 2), channels on dimension 0
    t = TFLiteTensor("w", q.shape, "INT8", scale=(0.5, 2.0), zero_point=(0, 10), quantized_dimension=0)
    out = _dequantize(t, q, "test")
    np.testing.assert_array_equal(out[0].ravel(), [5.0, 10.0])  # (q - 0) * 0.5
    np.testing.assert_array_equal(out[1].ravel(), [0.0, 20.0])  # (q - 10) * 2


# ------------------------------------------------------------------------------------------ numbers against the runtime

# Tensors the official runtime stored, and the module whose output is the same tensor (NHWC there, NCHW here).
CAPTURED = {
    "MobilenetV2/Conv/Relu6": "backbone.stem",
    "MobilenetV2/expanded_conv_16/project/BatchNorm/FusedBatchNorm": "backbone.blocks.16",
    "image_pooling/Relu": "aspp.pooling.act",  # after conv + ReLU, before the broadcast
    "aspp0/Relu": "aspp.branches.0",
    "concat_projection/Relu": "aspp.project",
    "logits/semantic/BiasAdd": "classifier",
}


@needs_float
@pytest.mark.parametrize("image", ["tfls_segmentation_input", "voc_1_image"])
def test_float_model_reproduces_every_stored_activation(float_model, image):
    if not (REFERENCE / "activations.npz").is_file():
        pytest.skip(f"reference activations not found in {REFERENCE}")
    ref = np.load(REFERENCE / "activations.npz")
    stored = {k.split("::", 1)[1] for k in ref.files if k.startswith(f"{image}::")}
    assert stored == set(CAPTURED) | {"sub_7", "ResizeBilinear_3"}, "the npz holds tensors this test does not check"
    modules = dict(float_model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        modules[m].register_forward_hook(lambda mod, i, o, k=k: captured.__setitem__(k, o.detach().clone()))
        for k, m in CAPTURED.items()
    ]
    try:
        x = torch.from_numpy(ref[f"{image}::sub_7"]).permute(2, 0, 1)[None]
        with torch.no_grad():
            y = float_model(x)
    finally:
        for h in hooks:
            h.remove()
    for name in CAPTURED:
        expected = ref[f"{image}::{name}"]
        ours = captured[name][0].permute(1, 2, 0).numpy()
        assert ours.shape == expected.shape, name
        # 1e-4 absolute, widened in proportion to the tensor's magnitude past 16: float32 rounding grows with it.
        # Evaluated in float64 on the same weights, the runtime's own backbone output on voc_1 is 1.005e-4 from the
        # exact value, so a flat 1e-4 on a tensor reaching 21 is below the reference's own rounding.
        tol = max(1e-4, 6e-6 * float(np.abs(expected).max()))
        err = float(np.abs(ours - expected).max())
        assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"
    # The stored final output is float16, i.e. rounded by up to half a float16 step; beyond that, ours may differ
    # by what the logits did (the resize only takes convex combinations of them).
    final = ref[f"{image}::ResizeBilinear_3"]
    logits = ref[f"{image}::logits/semantic/BiasAdd"]
    tol = max(1e-4, 6e-6 * float(np.abs(logits).max())) + 0.5 * np.spacing(np.abs(final)).astype(np.float32)
    err = np.abs(y[0].permute(1, 2, 0).numpy() - final.astype(np.float32))
    assert (err <= tol).all(), f"final output: max abs error {err.max():.3g}"


@needs_float
def test_float_model_matches_the_runtime_golden_mask_on_every_pixel(float_model):
    from PIL import Image

    image_path = REFERENCE / "tfls_segmentation_input.jpg"
    golden_path = REFERENCE / "tfls_segmentation_golden_x10.png"
    if not (image_path.is_file() and golden_path.is_file()):
        pytest.skip(f"golden pair not found in {REFERENCE}")
    image = read_rgb(image_path)
    assert image.shape == (257, 257, 3)  # already the model's input size: no resize to choose
    x = normalise(image, float_model.preprocessing)
    ref = REFERENCE / "activations.npz"
    if ref.is_file():  # PIL's JPEG decode gives exactly the runtime's preprocessed input
        np.testing.assert_array_equal(x[0].permute(1, 2, 0).numpy(), np.load(ref)["tfls_segmentation_input::sub_7"])
    with torch.no_grad():
        mask = float_model(x)[0].argmax(0).numpy()
    golden = np.asarray(Image.open(golden_path)).astype(np.int64) // 10
    assert set(np.unique(golden)) == {0, 13, 15}  # background, horse, person
    np.testing.assert_array_equal(mask, golden)


@needs_quant
def test_dequantized_model_agrees_with_the_accelerator_mask_on_the_bird(quant_model):
    from PIL import Image

    image = read_rgb(QUANT_DIR / "bird_segmentation.bmp")
    expected = np.asarray(Image.open(QUANT_DIR / "bird_segmentation_mask.bmp"))  # class indices (3 = bird)
    assert image.shape == (513, 513, 3) and expected.shape == (513, 513)
    with torch.no_grad():
        mask = quant_model(normalise(image, quant_model.preprocessing))[0].argmax(0).numpy()
    agreement = float((mask == expected).mean())
    # The mask is the uint8 model's output on an accelerator; ours runs the dequantized weights in float.
    assert agreement >= 0.97, f"pixel agreement {agreement:.4f}"
    bird = (mask == 3) & (expected == 3)
    assert bird.sum() / ((mask == 3) | (expected == 3)).sum() > 0.85


@needs_float
def test_checkpoint_round_trip_keeps_outputs_config_names_and_preprocessing(float_model, tmp_path):
    path = save_checkpoint(float_model, tmp_path / "m.pt")
    again = load(path)
    assert again.config == float_model.config
    assert again.class_names == float_model.class_names
    assert again.preprocessing == float_model.preprocessing
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        assert torch.equal(again(x), float_model(x))


# ------------------------------------------------------------------------------------------ class names


@needs_float
def test_class_names_come_from_labels_path_then_argument_then_labelmap_then_generic(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"c{i}" for i in range(21)) + "\n\n")
    assert load_tflite(FLOAT_FILE, labels_path=labels).class_names[20] == "c20"
    lone = tmp_path / "alone" / "m.tflite"  # no labelmap.txt beside it
    lone.parent.mkdir()
    shutil.copyfile(FLOAT_FILE, lone)
    assert load_tflite(lone).class_names[:2] == ("class_0", "class_1")
    names = [f"n{i}" for i in range(21)]
    assert load_tflite(lone, class_names=names).class_names == tuple(names)
    with pytest.raises(TFLiteImportError, match=re.escape(str(lone)) + r": 3 class names given for the file's 21 classes"):
        load_tflite(lone, class_names=["a", "b", "c"])
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    with pytest.raises(TFLiteImportError, match=re.escape(str(short)) + r": 2 labels for the 21 classes"):
        load_tflite(FLOAT_FILE, labels_path=short)


# ------------------------------------------------------------------------------------------ measured agreement


def _convert(argv: list[str], capsys) -> tuple[str, dict]:
    from deeplab.cli import main
    from deeplab.models.checkpoint import read_checkpoint

    assert main(["convert", *argv]) == 0
    return capsys.readouterr().out, read_checkpoint(argv[1])


# (file, the photo measured on, the least agreement): what docs/weights.md reports was measured on each.
NO_RUNTIME = "the official TF Lite runtime is not installed: pip install 'deeplab[litert]'"
AGREEMENT_CASES = [
    (FLOAT_FILE, REFERENCE / "tfls_segmentation_input.jpg", 0.9995),
    (QUANT_FILE, QUANT_DIR / "bird_segmentation.bmp", 0.995),
    (CITY_FILE, CITY_DIR / "reference" / "cityscapes_segmentation.bmp", 0.99),
]


@pytest.mark.parametrize("src,photo,least", AGREEMENT_CASES, ids=["float-dm05", "uint8-voc", "uint8-edgetpu-city"])
def test_convert_measures_its_agreement_with_the_official_runtime_into_the_checkpoint_folder_and_card(
        tmp_path, capsys, src, photo, least):
    if not (src.is_file() and photo.is_file()):
        pytest.skip(f"official TF Lite model or its photo not found: {src}, {photo}")
    pytest.importorskip("ai_edge_litert.interpreter", reason=NO_RUNTIME)
    from deeplab.models.checkpoint import export_folder

    out, data = _convert([str(src), str(tmp_path / "m.pt"), "--check-image", str(photo)], capsys)
    conversion = data["conversion"]
    side = 257 if src == FLOAT_FILE else 513
    assert conversion["agreement"] >= least
    assert conversion["pixels"] == side * side and conversion["size"] == [side, side]
    assert conversion["images"] == [photo.name] and conversion["runtime"].startswith("ai-edge-litert ")
    assert len(conversion["runtime_classes"]) >= 2  # the photo shows something the model knows
    assert f"agreement with the official runtime {100 * conversion['agreement']:.2f}%" in out
    assert data["source"] == str(src)
    folder = export_folder(tmp_path / "m.pt", tmp_path / "m")["path"]
    assert json.loads((folder / "config.json").read_text())["conversion"] == json.loads(json.dumps(conversion))
    card = (folder / "README.md").read_text()
    assert f"Argmax agreement with the original runtime: {100 * conversion['agreement']:.2f}% (argmax on" in card


@needs_float
def test_convert_measures_on_a_synthetic_image_by_default_and_says_when_it_shows_one_class(tmp_path, capsys):
    pytest.importorskip("ai_edge_litert.interpreter", reason=NO_RUNTIME)
    from deeplab.convert.tflite_check import SYNTHETIC, synthetic_image

    image = synthetic_image(257, 257)
    assert image.shape == (257, 257, 3) and image.dtype == np.uint8 and np.array_equal(image, synthetic_image(257, 257))
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 1000
    assert not np.array_equal(image, synthetic_image(257, 257, seed=1))
    out, data = _convert([str(FLOAT_FILE), str(tmp_path / "m.pt")], capsys)
    assert data["conversion"]["images"] == [SYNTHETIC] and data["conversion"]["agreement"] == 1.0
    assert data["conversion"]["runtime_classes"] == {"background": 1.0}  # nothing a VOC model knows in it
    assert "one class only, so this says little: pass --check-image PHOTO" in out


@needs_float
def test_convert_without_the_runtime_says_the_agreement_was_not_measured(tmp_path, capsys, monkeypatch):
    from deeplab.models.checkpoint import export_folder

    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # makes `import ai_edge_litert...` raise ImportError
    out, data = _convert([str(FLOAT_FILE), str(tmp_path / "m.pt")], capsys)
    assert data["conversion"]["agreement"] is None
    assert "agreement with the official runtime not measured: ai-edge-litert is not installed: pip install " in out
    card = (export_folder(tmp_path / "m.pt", tmp_path / "m")["path"] / "README.md").read_text()
    assert "Agreement with the original runtime: not measured: ai-edge-litert is not installed" in card


def test_check_image_for_a_file_that_is_not_tflite_is_refused_in_one_line(tmp_path, capsys):
    from deeplab.cli import main

    (tmp_path / "w.pth").write_bytes(b"not a tflite")
    assert main(["convert", str(tmp_path / "w.pth"), str(tmp_path / "m.pt"), "--check-image", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "--check-image: " in err and "is not a .tflite file" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------ bad files


def _assert_import_error_names(path: Path, **kw: object) -> TFLiteImportError:
    with pytest.raises(TFLiteImportError) as info:
        load_tflite(path, **kw)
    assert str(path) in str(info.value), str(info.value)
    # One error, not a chain: no parser exception rides along as its cause or context.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    return info.value


@needs_float
@pytest.mark.parametrize("keep", [0.5, 0.99, 100 / 2779264])
def test_truncated_file_gives_one_import_error_naming_it(tmp_path, keep):
    data = FLOAT_FILE.read_bytes()
    path = tmp_path / "truncated.tflite"
    path.write_bytes(data[: int(len(data) * keep)])
    err = _assert_import_error_names(path)
    assert "truncated or corrupted" in str(err)


def test_random_bytes_empty_file_text_file_and_missing_file_are_refused_by_name(tmp_path):
    rnd = tmp_path / "random.tflite"
    rnd.write_bytes(random.Random(0).randbytes(4096))
    assert "not a TFLite flatbuffer" in str(_assert_import_error_names(rnd))
    empty = tmp_path / "empty.tflite"
    empty.write_bytes(b"")
    assert "0 bytes" in str(_assert_import_error_names(empty))
    text = tmp_path / "model.tflite"
    text.write_text("this is a text file, not a model\n" * 10)
    assert "not a TFLite flatbuffer" in str(_assert_import_error_names(text))
    assert "no such file" in str(_assert_import_error_names(tmp_path / "missing.tflite"))


@needs_float
def test_unsupported_op_code_is_named_with_its_op_index_and_tensor(tmp_path):
    data = bytearray(FLOAT_FILE.read_bytes())
    model = tflite.Model.GetRootAsModel(bytes(data), 0)
    # Patch the AVERAGE_POOL_2D operator code (used by op 61 alone) to HARD_SWISH, an op no DeepLab uses.
    code = next(model.OperatorCodes(i) for i in range(model.OperatorCodesLength()) if model.OperatorCodes(i).BuiltinCode() == 1)
    assert code._tab.Offset(10) == 0  # this file keeps only the int8 deprecated_builtin_code field
    data[code._tab.Pos + code._tab.Offset(4)] = tflite.BuiltinOperator.HARD_SWISH
    path = tmp_path / "patched.tflite"
    path.write_bytes(bytes(data))
    err = str(_assert_import_error_names(path))
    assert "op 61 (HARD_SWISH)" in err and "'AvgPool2D/AvgPool'" in err and "not supported" in err


# ------------------------------------------------------------------------------------------ graphs that do not map


def _replace_op(graph, index: int, **changes):
    ops = list(graph.ops)
    ops[index] = dataclasses.replace(ops[index], **changes)
    return dataclasses.replace(graph, ops=tuple(ops))


@needs_float
def test_unexpected_channel_count_is_named_with_op_and_tensor(float_graph):
    # Make block 5's projection output 24 channels where MobileNetV2 at dm 0.5 has 16.
    op = next(op for op in float_graph.ops if op.outputs[0].startswith("MobilenetV2/expanded_conv_5/project/"))
    weight = op.inputs[1]
    w = float_graph.constants[weight]
    wide = np.concatenate([w, w[:8]], axis=0)
    tensors = dict(float_graph.tensors)
    tensors[weight] = dataclasses.replace(tensors[weight], shape=wide.shape)
    g = dataclasses.replace(float_graph, tensors=tensors, constants={**float_graph.constants, weight: wide})
    with pytest.raises(TFLiteImportError, match=rf"op {op.index} \(CONV_2D\) producing tensor '{re.escape(op.outputs[0])}'"):
        model_from_graph(g)


@needs_float
def test_op_outside_the_deeplab_structure_is_refused(float_graph):
    # An op reading only constants: nothing in the walk from the input reaches it, so it must be reported.
    size = next(op.inputs[1] for op in float_graph.ops if op.type == "RESIZE_BILINEAR")
    extra = TFLiteOp(70, "ADD", (size, size), ("stray",), {"activation": "NONE"})
    g = dataclasses.replace(float_graph, ops=float_graph.ops + (extra,))
    with pytest.raises(TFLiteImportError, match=r"op 70 \(ADD\) producing tensor 'stray' .*not part of the DeepLab"):
        model_from_graph(g)


@needs_float
def test_residual_add_with_a_fused_activation_is_refused(float_graph):
    index = next(op.index for op in float_graph.ops if op.type == "ADD")
    g = _replace_op(float_graph, index, options={"activation": "RELU"})
    with pytest.raises(TFLiteImportError, match=rf"op {index} \(ADD\).*fuses activation RELU"):
        model_from_graph(g)


@needs_float
def test_projection_follows_the_files_concatenation_order(float_model, float_graph):
    # The quantized file computes aspp0 before image pooling; only the concatenation order decides the projection's
    # input channels. Swap the order and the projection's channel blocks: the model must not change.
    concat = next(op for op in float_graph.ops if op.type == "CONCATENATION")
    g = _replace_op(float_graph, concat.index, inputs=concat.inputs[::-1])
    proj = next(op for op in g.ops if op.inputs and op.inputs[0] == concat.outputs[0])
    w = g.constants[proj.inputs[1]]
    g = dataclasses.replace(g, constants={**g.constants, proj.inputs[1]: np.concatenate([w[..., 256:], w[..., :256]], -1)})
    swapped = model_from_graph(g)
    for key, value in float_model.state_dict().items():
        assert torch.equal(swapped.state_dict()[key], value), key


@needs_float
def test_a_3x3_atrous_branch_in_the_file_becomes_an_aspp_rate(float_graph):
    # Add a 3x3 conv branch at dilation 12 (zero weights, so the projection's extra columns change nothing).
    g = float_graph
    backbone_out = "MobilenetV2/expanded_conv_16/project/BatchNorm/FusedBatchNorm"
    concat = next(op for op in g.ops if op.type == "CONCATENATION")
    proj = next(op for op in g.ops if op.inputs and op.inputs[0] == concat.outputs[0])
    tensors, constants = dict(g.tensors), dict(g.constants)
    for name, shape in (("aspp1/weights", (256, 3, 3, 160)), ("aspp1/bias", (256,))):
        tensors[name] = TFLiteTensor(name, shape, "FLOAT32")
        constants[name] = np.zeros(shape, np.float32)
    tensors["aspp1/Relu"] = TFLiteTensor("aspp1/Relu", (1, 33, 33, 256), "FLOAT32")
    w = constants[proj.inputs[1]]
    constants[proj.inputs[1]] = np.concatenate([w, np.zeros_like(w[..., :256])], -1)
    tensors[proj.inputs[1]] = dataclasses.replace(tensors[proj.inputs[1]], shape=constants[proj.inputs[1]].shape)
    branch = TFLiteOp(
        0, "CONV_2D", (backbone_out, "aspp1/weights", "aspp1/bias"), ("aspp1/Relu",),
        {"stride": (1, 1), "dilation": (12, 12), "padding": "SAME", "activation": "RELU"},
    )
    ops = [dataclasses.replace(op, index=op.index + (op.index >= concat.index)) for op in g.ops]
    ops.insert(concat.index, dataclasses.replace(branch, index=concat.index))
    ops[concat.index + 1] = dataclasses.replace(ops[concat.index + 1], inputs=concat.inputs + ("aspp1/Relu",))
    model = model_from_graph(dataclasses.replace(g, ops=tuple(ops), tensors=tensors, constants=constants))
    assert model.config.rates == (12,)
    assert model.aspp.branches[1][0].dilation == (12, 12)
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        reference = model_from_graph(g)(x)
        torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-5)


def test_missing_tflite_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tflite", None)  # makes `import tflite` raise ImportError
    with pytest.raises(ImportError, match=re.escape("pip install 'deeplab[tflite]'")):
        read_tflite_graph(tmp_path / "any.tflite")


# ------------------------------------------------------------------------------------------ fuzz


@needs_float
@settings(
    max_examples=50,
    deadline=10_000,
    derandomize=True,  # the same examples on every run: a CI failure is reproducible
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kind=st.sampled_from(["flip", "overwrite", "truncate"]),
    # The tables sit in the first 852 and last ~23 KiB of the file (weights in between); aim there mostly.
    where=st.one_of(st.integers(0, 1023), st.integers(-24 * 1024, -1), st.integers(0, 2_779_263)),
    payload=st.binary(min_size=1, max_size=8),
)
def test_mutated_file_gives_a_model_or_an_import_error_never_another_exception(tmp_path, kind, where, payload):
    data = bytearray(FLOAT_FILE.read_bytes())
    pos = where % len(data)
    if kind == "flip":
        data[pos] ^= payload[0] or 1
    elif kind == "overwrite":
        data[pos : pos + len(payload)] = payload[: len(data) - pos]
    else:
        del data[pos:]
    path = tmp_path / "fuzzed.tflite"
    path.write_bytes(bytes(data))
    try:
        model = load_tflite(path)
    except TFLiteImportError as e:
        assert str(path) in str(e)
    else:
        assert isinstance(model, DeepLab) and model.config.backbone == "mobilenet_v2"
