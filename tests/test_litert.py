"""DeepLabs written as TF Lite flatbuffers (deeplab.deploy.litert) and run by the official TF Lite runtime (ai-edge-litert):
the runtime's logits against eager PyTorch and against the official model's stored outputs, the padding rules, the
fused activations, the static-shape handling, and `deeplab export --format tflite`.

Skips with the reason when ai-edge-litert or tflite is absent (pip install 'deeplab[litert]').
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deeplab import ModelConfig, build_model, save_checkpoint
from deeplab.cli import main
from deeplab.deploy.export import export_model
from deeplab.deploy.litert import (
    UnsupportedOp,
    _padding,
    interpreter,
    missing,
    read_tflite_metadata,
    tflite_bytes,
)
from deeplab.deploy.runners import load_exported
from deeplab.deploy.runtimes import optimize_for_inference, runtime_name
from deeplab.models.config import Preprocessing

if missing():
    pytest.skip(missing(), allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FLOAT_DIR = SHARED / "models" / "deeplabv3-mnv2-dm05-voc"


def tiny(backbone: str = "mobilenet_v2", *, align_corners: bool = False, input_size=None, **kw) -> nn.Module:
    options = {"depth_multiplier": 0.25} if backbone in ("mobilenet_v2", "mobilenet_edgetpu") else {}
    cfg = ModelConfig(backbone=backbone, num_classes=3, decoder=True, atrous_rates=(2, 3), aspp_channels=16,
                      decoder_channels=16, low_level_channels=8, align_corners=align_corners, **options, **kw)
    torch.manual_seed(0)
    model = build_model(cfg, class_names=["sky", "road", "car"], preprocessing=Preprocessing(input_size=input_size))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def run_tflite(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    run = interpreter(tflite_bytes(model, x.shape), threads=1)
    return torch.from_numpy(run(x.numpy())).permute(0, 3, 1, 2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.max() - b.min()))


def _ops(content: bytes) -> list[str]:
    import tflite

    names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
    m = tflite.Model.GetRootAs(content, 0)
    g = m.Subgraphs(0)
    return [names[m.OperatorCodes(g.Operators(i).OpcodeIndex()).BuiltinCode()] for i in range(g.OperatorsLength())]


@pytest.mark.parametrize("size", [(65, 97), (64, 96)])  # 16k+1 (SAME padding) and even (explicit PAD)
@pytest.mark.parametrize("backbone,align", [
    ("mobilenet_v2", True), ("mobilenet_v2", False), ("resnet50_beta", False), ("xception41", True),
    ("mobilenet_v3_small", False),
])
def test_the_tflite_runtime_computes_the_eager_logits(backbone, align, size):
    if backbone == "xception41" and size == (64, 96):
        pytest.skip("one size is enough for the slowest backbone here")
    model = tiny(backbone, align_corners=align)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    assert _rel(run_tflite(model, x), ref) < 1e-4


def test_padding_follows_tf_same_where_it_reads_the_same_rows():
    # (input, kernel, stride, dilation, PyTorch pad, PyTorch output size) -> TF Lite padding
    assert _padding(257, 3, 2, 1, 1, 129) == "SAME"  # SAME pads 1 before, 1 after
    assert _padding(256, 3, 2, 1, 1, 128) == "EXPLICIT"  # SAME would pad 0 before and 1 after
    assert _padding(33, 3, 1, 4, 4, 33) == "SAME"  # atrous rate 4: SAME pads 4 and 4
    assert _padding(33, 1, 1, 1, 0, 33) == "VALID"
    assert _padding(129, 7, 2, 1, 3, 65) == "SAME"  # ResNet's stem at 16k+1
    assert _padding(128, 7, 2, 1, 3, 64) == "EXPLICIT"


def test_relu_and_relu6_become_the_fused_activation_of_the_operator_before_them():
    ops = _ops(tflite_bytes(tiny(), (1, 3, 65, 65)))
    assert "RELU" not in ops and "RELU6" not in ops  # every one follows a convolution or an addition
    assert ops.count("RESIZE_BILINEAR") == 2 and ops.count("MEAN") == 1  # decoder + logits; image pooling


def test_an_operator_without_a_tflite_equivalent_is_named_and_auto_does_without_it():
    model = tiny()
    model.classifier = nn.Sequential(nn.GELU(), model.classifier)
    with pytest.raises(UnsupportedOp, match="operator gelu"):
        tflite_bytes(model, (1, 3, 65, 65))
    x = torch.randn(1, 3, 65, 65)
    auto = optimize_for_inference(model, runtime="auto", example=x)
    assert "operator gelu" in auto.choice["skipped"]["tflite"] and runtime_name(auto) != "tflite"


def test_the_first_shapes_get_a_graph_each_and_later_ones_the_pytorch_fast_path(monkeypatch):
    import deeplab.deploy.litert as lt

    monkeypatch.setattr(lt, "SHAPES", 2)
    written = []
    real = lt.tflite_bytes
    monkeypatch.setattr(lt, "tflite_bytes", lambda m, shape, **kw: written.append(tuple(shape)) or real(m, shape, **kw))
    model = tiny()
    prepared = optimize_for_inference(model, runtime="tflite")
    with torch.no_grad():
        for shape in [(1, 3, 40, 56), (2, 3, 48, 64), (1, 3, 40, 56), (1, 3, 33, 47)]:
            x = torch.randn(shape)
            assert _rel(prepared(x), model(x)) < 1e-4
    assert written == [(1, 3, 40, 56), (2, 3, 48, 64)] and runtime_name(prepared) == "tflite"


def test_tflite_export_carries_metadata_runs_alone_and_names_the_size_it_runs_at(tmp_path):
    model = tiny(align_corners=True, input_size=(65, 97))
    path = tmp_path / "m.tflite"
    res = export_model(model, path, format="tflite", metadata={"train_config": {"dataset": "camvid"}})
    assert list(res["max_rel_diff"]) == ["65x97"]
    meta = read_tflite_metadata(path.read_bytes())
    assert meta["class_names"] == ["sky", "road", "car"] and meta["input_size"] == [65, 97]
    assert meta["input_layout"] == "NHWC" and meta["output_layout"] == "NHWC" and meta["align_corners"] is True
    assert ModelConfig.from_dict(meta["model_config"]) == model.config and meta["train_config"]["dataset"] == "camvid"
    loaded = load_exported(path)
    assert loaded.runtime == "tflite" and loaded.class_names == model.class_names
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        assert _rel(loaded(x), model(x)) < 1e-4
        with pytest.raises(ValueError, match=r"m.tflite: a TF Lite file runs at the one input size.*65x97.*--scales 1.*--input-size 64x64"):
            loaded(torch.randn(1, 3, 64, 64))
    export_model(model, tmp_path / "s.tflite", format="tflite", input_size=(33, 49))
    assert read_tflite_metadata((tmp_path / "s.tflite").read_bytes())["input_size"] == [33, 49]
    with pytest.raises(ValueError, match="--input-size applies to --format tflite"):
        export_model(model, tmp_path / "m.onnx", format="onnx", input_size=(33, 49))


def test_predict_runs_an_exported_tflite_file_and_says_so(tmp_path, capsys):
    from PIL import Image

    ckpt = save_checkpoint(tiny(input_size=(65, 65)), tmp_path / "m.pt")
    assert main(["export", "--checkpoint", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m.tflite")]) == 0
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "m.tflite"),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "(runtime tflite, fp32)" in capsys.readouterr().out
    mask = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert mask.shape == (50, 70)  # resized to the file's 65x65 and the logits back to the image


def test_a_tflite_file_without_deeplab_metadata_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "official.tflite"
    path.write_bytes(tflite_bytes(tiny(), (1, 3, 33, 33)))  # no metadata, as the official files have none
    with pytest.raises(ValueError, match="carries no deeplab metadata.*deeplab convert"):
        load_exported(path)


@pytest.mark.skipif(not (FLOAT_DIR / "reference" / "activations.npz").is_file(),
                    reason=f"official MobileNetV2 dm0.5 model and its stored outputs not found in {FLOAT_DIR}")
def test_the_official_model_written_back_reproduces_the_official_runtimes_output():
    """The official dm0.5 file, converted, written again by deeplab.deploy.litert and run by the official runtime: its
    upsampled logits equal what the official runtime computed from the official file (stored in ../shared)."""
    from PIL import Image

    from deeplab.convert import convert_file

    model = convert_file(FLOAT_DIR / "deeplabv3_257_mv_gpu.tflite", activation_rounding=False).eval()
    image = np.asarray(Image.open(FLOAT_DIR / "reference" / "tfls_segmentation_input.jpg").convert("RGB"))
    pre = model.preprocessing
    x = ((torch.from_numpy(image.astype(np.float32)) - torch.tensor(pre.mean)) / torch.tensor(pre.std))
    x = x.permute(2, 0, 1)[None]
    out = run_tflite(model, x)[0].permute(1, 2, 0).numpy()
    final = np.load(FLOAT_DIR / "reference" / "activations.npz")["tfls_segmentation_input::ResizeBilinear_3"]
    final = final.astype(np.float32)
    # The stored output is float16: rounded by up to half a float16 step, plus float noise of the logits' size.
    tol = 1e-4 * float(np.abs(final).max()) + 0.5 * np.spacing(np.abs(final).astype(np.float16)).astype(np.float32)
    assert (np.abs(out - final.reshape(out.shape)) <= tol).all()
    golden = np.asarray(Image.open(FLOAT_DIR / "reference" / "tfls_segmentation_golden_x10.png")).astype(np.int64) // 10
    np.testing.assert_array_equal(out.argmax(-1), golden)


def test_auto_choosing_tflite_runs_other_shapes_in_the_runner_up(monkeypatch):
    import deeplab.deploy.litert as lt
    import deeplab.deploy.runtimes as rt

    monkeypatch.setattr(lt, "SHAPES", 1)
    fake_ms = {"torch": 30.0, "onnxruntime": 20.0, "openvino": 25.0, "tflite": 10.0}
    monkeypatch.setattr(rt, "time_rounds", lambda entries, **kw: {n: [[fake_ms[n]]] * 3 for n in entries})
    model = tiny()
    auto = optimize_for_inference(model, runtime="auto", precision="fp32", example=torch.randn(1, 3, 49, 49))
    assert auto.runtime == "tflite"
    runner_up = "onnxruntime" if "onnxruntime" in auto.choice["ms"] else "torch"
    assert runtime_name(auto.chosen.other_shapes["runtime"]) == runner_up
    x = torch.randn(1, 3, 41, 57)  # a second shape: no TF Lite graph for it
    with torch.no_grad():
        assert _rel(auto(x), model(x)) < 1e-4


def test_what_tflite_would_compute_differently_is_refused_not_written():
    import torch.nn.functional as F

    class Resize(nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.scale = scale

        def forward(self, x):
            return F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)

    class AddRow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("row", torch.randn(33))  # broadcast along W in NCHW, along C in NHWC

        def forward(self, x):
            return x + self.row

    x = torch.randn(1, 3, 33, 33)
    # 33 -> 49 by 1.5: PyTorch maps pixels by 1 / 1.5, TF Lite by 33 / 49
    with pytest.raises(UnsupportedOp, match=r"scale factors \[1.5, 1.5\]"):
        tflite_bytes(Resize(1.5), x.shape, fold_bn=False)
    with pytest.raises(UnsupportedOp, match=r"1-d constant of shape \[33\]"):
        tflite_bytes(AddRow(), x.shape, fold_bn=False)
    run = interpreter(tflite_bytes(Resize(2.0), x.shape, fold_bn=False), threads=1)  # 33 -> 66: the same mapping
    out = torch.from_numpy(run(x.numpy())).permute(0, 3, 1, 2)
    assert _rel(out, Resize(2.0)(x)) < 1e-5


def test_an_activation_is_not_fused_into_a_convolution_whose_output_is_read_elsewhere():
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y.clone()) + y  # the ReLU reads the convolution through a copy; the sum reads it raw

    torch.manual_seed(0)
    model, x = Branches().eval(), torch.randn(1, 3, 17, 17)
    run = interpreter(tflite_bytes(model, x.shape, fold_bn=False), threads=1)
    with torch.no_grad():
        assert _rel(torch.from_numpy(run(x.numpy())).permute(0, 3, 1, 2), model(x)) < 1e-5
