"""Every flag of every command says what it does, refuses an out-of-range count or size where it is parsed, and the
defaults that belong to the built-in preset's backbone follow the backbone a user picks."""

from __future__ import annotations

import argparse
import shutil
import sys

import pytest
import torch

from deeplab import ModelConfig, build_model
from deeplab.cli import EXIT_INPUT, build_parser, main
from deeplab.training.config import SYNTHETIC_MODEL, TrainConfig, presets
from deeplab.training.loop import resolve_for_device

# The arguments each command needs before a flag can be tried (files need not exist: parsing comes first).
REQUIRED = {
    "train": [], "eval": ["--checkpoint", "x.pt"], "predict": ["x.png", "--checkpoint", "x.pt", "--out", "o"],
    "data": ["--dataset", "synthetic"], "export": ["--checkpoint", "x.pt", "--format", "onnx", "--out", "m.onnx"],
    "quantize": ["--checkpoint", "x.pt", "--out", "q.onnx"], "convert": ["a.tflite", "b.pt"], "profile": [],
    "benchmark": ["--checkpoint", "x.pt"], "serve": ["--checkpoint", "x.pt"],
}
QUICK = ["--dataset-options", "length=8", "--batch-size", "4", "--steps", "1", "--precise-bn-images", "0", "--quiet"]


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _numeric(action: argparse.Action) -> bool:
    """An option whose value is a number or numbers (a count, a size, a rate, a fraction)."""
    if action.type is None or action.choices is not None:
        return False
    try:
        value = action.type("1")
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return False
    return isinstance(value, (int, float)) or (isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value))


def test_every_command_is_listed_with_its_required_arguments():
    assert set(_commands()) == set(REQUIRED)


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_every_flag_has_a_help_line_that_says_what_it_does(command):
    bare = [a.option_strings[0] for a in _options(_commands()[command])
            if not a.help or a.help.startswith("(") or len(a.help) < 12]
    assert not bare, f"deeplab {command}: flags without a help line: {bare}"


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_every_count_size_and_fraction_flag_refuses_minus_one_before_anything_is_read(command, capsys, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, here included
    numeric = [a.option_strings[0] for a in _options(_commands()[command]) if _numeric(a)]
    assert numeric or command == "data"
    for flag in numeric:
        try:
            code = main([command, *REQUIRED[command], flag, "-1"])
        except SystemExit as e:  # argparse's refusal: usage, then the one line naming the flag
            code = e.code
        err = capsys.readouterr().err
        assert code == EXIT_INPUT and flag in err.strip().splitlines()[-1] and "Traceback" not in err, (flag, err)
    assert not any(tmp_path.iterdir())


def test_choices_are_refused_by_name_and_shown_in_the_help():
    train = _commands()["train"]
    help_text = train.format_help()
    assert "one of auto, off, bf16, fp16" in help_text and "mobilenet_v2" in help_text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--backbone", "resnet999"])


def test_the_help_shows_the_synthetic_presets_value_beside_the_papers_default():
    text = " ".join(_commands()["train"].format_help().split())
    assert "(default 513; synthetic preset: 64)" in text  # --crop-size
    assert "(default 1.0; synthetic preset: 0.5)" in text  # --depth-multiplier


def test_the_presets_depth_multiplier_follows_another_backbone():
    model, _ = presets("synthetic", "resnet50")
    assert model.backbone == "resnet50" and model.depth_multiplier == 1.0
    assert model.aspp_channels == SYNTHETIC_MODEL.aspp_channels  # what does not belong to the backbone stays
    build_model(model.replace(num_classes=5))  # the combination builds (it raised before)
    assert presets("synthetic", "mobilenet_v2")[0] == SYNTHETIC_MODEL
    assert presets("synthetic")[0] == SYNTHETIC_MODEL
    model, train = presets("voc", "xception65")
    assert model == ModelConfig(backbone="xception65") and train == TrainConfig(dataset="voc")


def test_train_with_another_backbone_on_the_built_in_default_runs(tmp_path, capsys):
    code = main(["train", "--backbone", "resnet50", "--crop-size", "33", "--out", str(tmp_path / "run"), *QUICK])
    assert code == 0, capsys.readouterr().err
    assert "resnet50" in capsys.readouterr().out


def test_the_closing_line_lists_only_files_that_were_written(tmp_path, capsys, monkeypatch):
    # No plots: curves.png cannot be drawn (a None entry in sys.modules makes "import matplotlib..." raise).
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["train", "--out", str(tmp_path / "run"), *QUICK]) == 0
    out = capsys.readouterr().out
    assert "curves.png not drawn" in out
    listed = next(line for line in out.splitlines() if line.startswith("wrote ")).split(": ", 1)[1].split(", ")
    assert "curves.png" not in listed and "last.pt" in listed
    assert all((tmp_path / "run" / name).exists() for name in listed)


def test_resuming_a_last_pt_that_holds_weights_only_is_one_line_naming_the_way_on(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), *QUICK]) == 0
    capsys.readouterr()
    shutil.copy(tmp_path / "run" / "best.pt", tmp_path / "run" / "last.pt")
    code = main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_INPUT and len(err) == 1 and "Traceback" not in err[0]
    assert "weights only" in err[0] and "--init-checkpoint" in err[0] and "last.pt" in err[0]


AVX2 = frozenset({"avx2"})
ZEN4 = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
SAPPHIRE_RAPIDS = ZEN4 | {"amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize("flags, backbone, amp, why", [
    (AVX2, "resnet101", "off", "no native bf16"),
    (ZEN4, "resnet101", "bf16", "AVX512_BF16, which speeds up resnet101"),
    (ZEN4, "xception65", "bf16", "AVX512_BF16"),
    (ZEN4, "mobilenet_v2", "off", "does not speed up mobilenet_v2's depthwise"),
    (SAPPHIRE_RAPIDS, "resnet101", "bf16", "has AMX"),
    (SAPPHIRE_RAPIDS, "mobilenet_v2", "bf16", "has AMX"),
])
def test_amp_auto_on_a_cpu_follows_its_bf16_instructions_and_says_why(flags, backbone, amp, why):
    cpu, said = resolve_for_device(TrainConfig(), torch.device("cpu"), backbone=backbone, flags=flags)
    assert cpu.amp == amp and why in said and said.startswith("--amp auto, ")
    forced, said = resolve_for_device(TrainConfig(amp="off"), torch.device("cpu"), backbone=backbone, flags=flags)
    assert forced.amp == "off" and said == ""


def test_auto_choices_are_made_for_the_device(monkeypatch):
    cpu, _ = resolve_for_device(TrainConfig(), torch.device("cpu"), flags=AVX2)
    assert (cpu.amp, cpu.channels_last, cpu.workers) == ("off", True, 0)
    kept, _ = resolve_for_device(TrainConfig(amp="bf16", channels_last=True, workers=3), torch.device("cpu"))
    assert (kept.amp, kept.channels_last, kept.workers) == ("bf16", True, 3)
    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device"):
        resolve_for_device(TrainConfig(amp="fp16"), torch.device("cpu"))
    # The CUDA branch, on any machine: bf16 where the GPU has it, fp16 (with the gradient scaler) where not.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    gpu, _ = resolve_for_device(TrainConfig(), torch.device("cuda", 0))
    assert (gpu.amp, gpu.channels_last, gpu.workers) == ("bf16", True, 8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    old, _ = resolve_for_device(TrainConfig(amp="auto", channels_last=False), torch.device("cuda", 0))
    assert (old.amp, old.channels_last, old.workers) == ("fp16", False, 3)


@pytest.mark.parametrize("field, value", [
    ("model_config", {"backbone": "mobilenet_v2", "num_classes": "five"}),
    ("class_names", "background"),
    ("state_dict", {"a": 1}),
    ("preprocessing", None),
    ("train_config", {"crop_size": "big"}),
])
def test_a_checkpoint_with_an_edited_field_is_one_line_naming_the_file(tmp_path, capsys, field, value):
    from deeplab.models.checkpoint import checkpoint_dict

    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.5, num_classes=2, decoder=False, aspp_channels=8)
    data = checkpoint_dict(build_model(cfg))
    data["train_config"] = TrainConfig().to_dict()
    data[field] = value
    path = tmp_path / "edited.pt"
    torch.save(data, path)
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (20, 20)).save(image)
    command = (["eval", "--checkpoint", str(path), "--dataset", "synthetic", "--quiet"] if field == "train_config"
               else ["predict", str(image), "--checkpoint", str(path), "--out", str(tmp_path / "o")])
    code = main(command)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_INPUT and len(err) == 1 and "Traceback" not in err[0] and "bug" not in err[0], err
    assert "edited.pt" in err[0]


def test_resuming_a_last_pt_whose_optimizer_state_does_not_fit_is_one_line(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), *QUICK]) == 0
    capsys.readouterr()
    last = tmp_path / "run" / "last.pt"
    data = torch.load(last, weights_only=True)
    data["optimizer"]["param_groups"] = data["optimizer"]["param_groups"][:1]  # another run's optimizer
    data["step"] = 0
    torch.save(data, last)
    code = main(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "2", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_INPUT and len(err) == 1 and "Traceback" not in err[0] and "bug" not in err[0], err
    assert "last.pt" in err[0] and "optimizer" in err[0]
