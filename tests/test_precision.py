"""Inference precision as a choice of the runtime (`deeplab.deploy.precision`), and `auto`'s choice made in paired
rounds and cached per machine and model (`deeplab.deploy.choice`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deeplab import ModelConfig, build_model, save_checkpoint
from deeplab.cli import main
from deeplab.deploy.choice import cache_dir, fastest_paired, model_digest, scores
from deeplab.deploy.fast import optimize_for_inference as fast_path
from deeplab.deploy.precision import (
    MIN_AGREEMENT,
    agreement,
    candidates,
    check_reduced,
    cpu_flags,
    machine_line,
    native_bf16,
)
from deeplab.deploy.runtimes import AutoRuntime, describe_runtime, optimize_for_inference, precision_name
from deeplab.inference.options import InferenceOptions

AVX2 = frozenset({"avx2", "fma"})
ZEN4 = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
SAPPHIRE_RAPIDS = ZEN4 | {"amx_tile", "amx_bf16", "amx_int8"}


def tiny(backbone: str = "mobilenet_v2", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=backbone, num_classes=3, output_stride=16, **kw)).eval()


def test_bf16_is_a_candidate_only_where_the_cpu_runs_it_natively():
    runtimes = ("torch", "onnxruntime", "openvino", "tflite")
    fp32 = [(r, "fp32") for r in runtimes]
    assert native_bf16(AVX2) is None and native_bf16(ZEN4) == "AVX512_BF16" and native_bf16(SAPPHIRE_RAPIDS) == "AMX"
    assert candidates("auto", runtimes, flags=AVX2) == fp32
    bf16 = [("torch", "bf16"), ("openvino", "bf16")]  # ONNX Runtime's CPU provider and TF Lite have no bf16 convs
    assert candidates("auto", runtimes, flags=ZEN4) == fp32 + bf16
    assert candidates("auto", runtimes, flags=SAPPHIRE_RAPIDS, int8=True) == fp32 + bf16 + [
        ("onnxruntime", "int8"), ("openvino", "int8")]
    assert candidates("fp32", runtimes, flags=SAPPHIRE_RAPIDS, int8=True) == fp32  # today's exactness, nothing else
    assert candidates("bf16", ("onnxruntime",), flags=SAPPHIRE_RAPIDS) == []
    with pytest.raises(ValueError, match="precision must be one of"):
        candidates("fp16", runtimes)


def test_agreement_is_the_share_of_pixels_whose_argmax_is_float32s_and_refuses_below_99_5_percent():
    ref = torch.zeros(1, 2, 20, 10)
    ref[:, 1] = 1.0  # class 1 everywhere: 200 pixels
    out = ref.clone()
    out[0, 0, 0, 0] = 2.0  # one pixel flips: 199 / 200 = 99.5%
    assert agreement(out, ref) == pytest.approx(0.995)
    assert check_reduced(out, ref, name="x") == pytest.approx(0.995) and MIN_AGREEMENT == 0.995
    out[0, 0, 0, 1] = 2.0  # two pixels: 99.0%
    with pytest.raises(ValueError, match=r"agrees with float32 on 99.00% of the pixels \(at least 99.5% needed\)"):
        check_reduced(out, ref, name="x")
    out = ref.clone()
    out[0, 1, 3, 3] = float("nan")  # one pixel's logit: argmax may still agree, the candidate may not
    with pytest.raises(ValueError, match="not finite"):
        check_reduced(out, ref, name="x")


@pytest.mark.parametrize("backbone", ["resnet50", "xception65", "mobilenet_v2", "mobilenet_v3_large",
                                      "mobilenet_edgetpu", "vgg16", "densenet121"])
def test_the_bf16_fast_path_runs_every_backbone_in_bf16_with_float32_logits(backbone, one_thread):
    model = tiny(backbone, decoder=backbone != "vgg16", separable=True)
    x = torch.randn(1, 3, 65, 97)
    bf16 = fast_path(model, dtype=torch.bfloat16)
    assert bf16.backbone.parameters().__next__().dtype == torch.bfloat16
    assert next(bf16.classifier.parameters()).dtype == torch.float32  # logits not rounded to 8 bits before argmax
    with torch.no_grad():
        ref, out = model(x), bf16(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape and torch.isfinite(out).all()
    # bf16 keeps 8 bits of mantissa: logits within a few percent of their range, nearly every argmax the same
    assert float((out - ref).abs().max() / (ref.max() - ref.min())) < 0.05
    assert agreement(out, ref) > 0.97
    assert precision_name(bf16) == "bf16" and precision_name(fast_path(model)) == "fp32"


def test_the_bf16_fast_path_runs_on_prepacked_onednn_weights(monkeypatch, one_thread):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 kernels on this CPU")
    calls = []
    real = torch.ops.mkldnn._reorder_convolution_weight

    def reorder(weight, *args):
        calls.append(weight.dtype)
        return real(weight, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_convolution_weight", reorder)
    bf16 = fast_path(tiny("resnet50"), dtype=torch.bfloat16)
    with torch.no_grad():
        bf16(torch.randn(1, 3, 33, 33))
    # every convolution packed for oneDNN's bf16 kernels but the classifier, which stays float32
    assert calls.count(torch.bfloat16) > 50 and calls.count(torch.float32) == 1


def test_paired_rounds_cancel_a_slow_stretch_that_plain_medians_would_take_for_a_difference():
    # the machine slowed down in round 2 while B ran and in round 3 while A ran: B's overall median is lower,
    # but in every round but one A ran at or ahead of B
    rounds = {"A": [[10.0], [20.0], [30.0]], "B": [[12.0], [18.0], [36.0]]}
    assert scores(rounds) == pytest.approx({"A": 1.0, "B": 1.2})
    assert fastest_paired(rounds) == "A"
    # one noisy first round (a slow second at the start) does not decide
    rounds = {"A": [[50.0], [10.0], [10.0], [10.0], [10.0]], "B": [[11.0], [11.0], [11.0], [11.0], [11.0]]}
    assert fastest_paired(rounds) == "A"


def test_auto_caches_its_choice_per_machine_and_model_and_retimes_on_request(monkeypatch, one_thread):
    import deeplab.deploy.runtimes as rt

    timed, built = [], []
    real_build = rt.build_runtime

    def build(model, runtime, **kwargs):
        built.append(runtime)
        return real_build(model, runtime, **kwargs)

    def time_rounds(entries, **kwargs):
        timed.append(sorted(entries))
        return {name: [[{"torch": 10.0, "onnxruntime": 5.0}.get(name, 20.0)]] * 5 for name in entries}

    monkeypatch.setattr(rt, "build_runtime", build)
    monkeypatch.setattr(rt, "time_rounds", time_rounds)
    model, x = tiny(), torch.randn(1, 3, 33, 33)
    first = optimize_for_inference(model, precision="fp32", example=x)
    assert first.choice["label"] == "onnxruntime" and not first.choice["cached"] and len(timed) == 1
    files = list((cache_dir() / "runtime-choice").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["label"] == "onnxruntime"
    built.clear()
    again = optimize_for_inference(model, precision="fp32", example=x)  # a later process: no timing, one build
    assert again.choice["cached"] and again.runtime == "onnxruntime" and built == ["onnxruntime"] and len(timed) == 1
    assert "timed on this machine before" in describe_runtime(again)
    with torch.no_grad():
        assert torch.allclose(again(x), model(x), atol=1e-4)
    optimize_for_inference(model, precision="fp32", example=x, retime=True)
    assert len(timed) == 2
    optimize_for_inference(model, precision="fp32", example=torch.randn(1, 3, 41, 41))  # another input shape
    assert len(timed) == 3
    other = tiny()
    with torch.no_grad():
        other.classifier.weight.add_(0.1)  # other weights: another model digest
    assert model_digest(other) != model_digest(model)
    optimize_for_inference(other, precision="fp32", example=x)
    assert len(timed) == 4


def test_a_cached_choice_that_fails_its_check_is_chosen_again(monkeypatch, one_thread):
    import deeplab.deploy.runtimes as rt

    timed = []

    def time_rounds(entries, **kwargs):
        timed.append(sorted(entries))
        return {name: [[{"onnxruntime": 5.0}.get(name, 20.0)]] * 5 for name in entries}

    monkeypatch.setattr(rt, "time_rounds", time_rounds)
    model, x = tiny(), torch.randn(1, 3, 33, 33)
    optimize_for_inference(model, precision="fp32", example=x)
    real_build = rt.build_runtime

    def broken(model, runtime, **kwargs):
        built = real_build(model, runtime, **kwargs)
        if runtime == "onnxruntime":  # e.g. a runtime upgraded to compute something else: never trusted from cache
            built._run = lambda a: np.zeros((a.shape[0], a.shape[2], a.shape[3], 3), np.float32)
        return built

    monkeypatch.setattr(rt, "build_runtime", broken)
    again = optimize_for_inference(model, precision="fp32", example=x)
    assert not again.choice["cached"] and again.runtime != "onnxruntime" and "onnxruntime" not in timed[1]
    assert "differs from the eager model" in again.choice["skipped"]["onnxruntime"]


def test_auto_keeps_a_bf16_candidate_only_when_it_agrees_and_says_why_not(monkeypatch, one_thread):
    import deeplab.deploy.precision as pr
    import deeplab.deploy.runtimes as rt

    monkeypatch.setattr(pr, "cpu_flags", lambda: SAPPHIRE_RAPIDS)
    monkeypatch.setattr(rt, "time_rounds", lambda entries, **kw: {
        n: [[{"torch-bf16": 1.0}.get(n, 9.0)]] * 5 for n in entries})
    model, x = tiny(), torch.randn(1, 3, 33, 33)
    auto = optimize_for_inference(model, example=x)
    assert isinstance(auto, AutoRuntime)
    labels = set(auto.choice["ms"]) | set(auto.choice["skipped"])
    assert {"torch-bf16", "openvino-bf16"} <= labels
    if "torch-bf16" in auto.choice["skipped"]:  # random weights at 33x33: near-ties that bf16 may flip
        assert "agrees with float32 on" in auto.choice["skipped"]["torch-bf16"]
        assert auto.precision == "fp32"
    else:
        assert auto.choice["label"] == "torch-bf16" and auto.choice["agreement"]["torch-bf16"] >= MIN_AGREEMENT
        assert "bf16 (argmax as float32 on" in describe_runtime(auto)
    monkeypatch.setattr(pr, "cpu_flags", lambda: AVX2)
    avx2 = optimize_for_inference(model, example=x, retime=True)
    assert not any(label.endswith("bf16") for label in set(avx2.choice["ms"]) | set(avx2.choice["skipped"]))


def test_an_int8_file_beside_the_checkpoint_is_found_used_and_refused_when_made_from_other_weights(tmp_path, capsys):
    pytest.importorskip("onnxruntime.quantization", reason="int8 quantization needs pip install 'deeplab[onnx]'")
    from PIL import Image

    model = tiny()
    ckpt = save_checkpoint(model, tmp_path / "m.pt")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(images / f"{i}.png")
    assert main(["quantize", "--checkpoint", str(ckpt), "--images", str(images), "--calibration-images", "2",
                 "--check-images", "1"]) == 0
    assert (tmp_path / "m.int8.onnx").is_file() and "predict and eval --precision auto consider it" in \
        capsys.readouterr().out
    from deeplab.deploy.quantize import int8_beside
    from deeplab.deploy.runners import read_metadata

    meta = read_metadata(tmp_path / "m.int8.onnx")["int8"]
    assert meta["model_digest"] == model_digest(model) and 0 <= meta["agreement"] <= 1
    assert int8_beside(ckpt, model) == tmp_path / "m.int8.onnx"
    assert main(["predict", "--checkpoint", str(ckpt), str(images), "--out", str(tmp_path / "p"), "--quiet",
                 "--runtime", "onnxruntime", "--precision", "int8"]) == 0
    assert "(runtime onnxruntime, int8 (argmax as float32 on" in capsys.readouterr().out
    other = tiny()
    with torch.no_grad():
        other.classifier.weight.mul_(2)
    save_checkpoint(other, ckpt)  # retrained: the int8 file beside it is stale
    with pytest.warns(UserWarning, match="made from other weights"):
        assert int8_beside(ckpt, other) is None
    assert main(["predict", "--checkpoint", str(ckpt), str(images), "--out", str(tmp_path / "q"), "--quiet",
                 "--precision", "int8"]) != 0
    assert "--precision int8 needs an int8 file: make one with deeplab quantize" in capsys.readouterr().err


def test_precision_flags_are_checked_like_the_others():
    with pytest.raises(ValueError, match="precision must be one of"):
        InferenceOptions(precision="fp16")
    with pytest.raises(ValueError, match="use one of them"):
        InferenceOptions(amp="bf16", precision="bf16")
    with pytest.raises(ValueError, match="does not run bf16 here; bf16 runs in torch, openvino"):
        optimize_for_inference(tiny(), runtime="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="the eager model runs float32"):
        optimize_for_inference(tiny(), runtime="eager", precision="bf16")


def test_predict_says_which_precision_ran_and_the_agreement_measured(tmp_path, capsys, one_thread):
    from PIL import Image

    ckpt = save_checkpoint(tiny(), tmp_path / "m.pt")
    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "in/a.png")
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                 "--quiet", "--runtime", "torch", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "(runtime torch, bf16 (argmax as float32 on " in out and "% of the first input's pixels)" in out


def test_the_machine_line_names_the_cpu_its_flags_of_note_and_the_runtime_versions():
    line = machine_line(threads=2)
    assert "2 threads" in line and f"torch {torch.__version__}" in line
    for flag in ("avx2", "avx512_bf16", "amx_bf16", "amx_int8"):
        assert (flag in line.split("; ")[1].split()) == (flag in cpu_flags())


def test_benchmark_times_each_precision_and_reports_the_agreement_of_the_reduced_ones(tmp_path, capsys, one_thread):
    ckpt = save_checkpoint(tiny(), tmp_path / "m.pt")
    assert main(["benchmark", "--checkpoint", str(ckpt), "--size", "65x65", "--runs", "2", "--threads", "1",
                 "--runtimes", "torch,onnxruntime", "--precisions", "fp32,bf16", "--json", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # ONNX Runtime's CPU provider runs no bf16: it is not timed in bf16, nor reported as if it were
    assert {(r["runtime"], r["precision"]) for r in rows} == {("torch", "fp32"), ("torch", "bf16"),
                                                              ("onnxruntime", "fp32")}
    bf16 = next(r for r in rows if r["precision"] == "bf16")
    assert 0.9 < bf16["agreement"] <= 1 and all(r["agreement"] is None for r in rows if r["precision"] == "fp32")
    assert main(["benchmark", "--checkpoint", str(ckpt), "--size", "65x65", "--runs", "1", "--threads", "1",
                 "--runtimes", "torch", "--precisions", "fp32", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0] == machine_line() and "| torch | fp32 | 1 | 65x65 |" in table
    assert main(["benchmark", "--checkpoint", str(ckpt), "--precisions", "fp16", "--quiet"]) != 0
    assert "'fp16' is not one of fp32, bf16, int8" in capsys.readouterr().err
