"""One error path for the command line: expected failures end in one line on stderr naming the flag or file, with a
distinct exit status; --debug / DEEPLAB_DEBUG=1 shows the traceback instead; Ctrl-C in training says how to resume."""

from __future__ import annotations

import errno

import pytest
import torch

import deeplab.train
from deeplab import ModelConfig, build_model, save_checkpoint
from deeplab.cli import EXIT_FILES, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_MEMORY, failure_line, main

QUICK = ["--dataset-options", "length=8", "--batch-size", "4", "--steps", "1", "--quiet"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_failures_map_to_exit_status_and_one_line_naming_file_and_fix():
    assert failure_line(OSError(errno.ENOSPC, "No space left on device", "run/last.pt")) == (
        EXIT_FILES, "error: run/last.pt: no space left on the device; free some or write elsewhere (--out)")
    code, line = failure_line(PermissionError(errno.EACCES, "Permission denied", "/ro/run"))
    assert code == EXIT_FILES and line.startswith("error: /ro/run: permission denied")
    assert failure_line(MemoryError())[0] == EXIT_MEMORY
    assert failure_line(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9 GB"))[0] == EXIT_MEMORY
    assert failure_line(KeyboardInterrupt()) == (EXIT_INTERRUPTED, "interrupted")
    assert failure_line(ValueError("--lr must be positive"))[0] == EXIT_INPUT
    assert failure_line(ZeroDivisionError()) is None  # a bug: the traceback is shown


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line_naming_the_flag(tmp_path, capsys):
    code = main(["train", "--device", "cuda", "--out", str(tmp_path / "run"), *QUICK])
    line = _one_line(capsys)
    assert code == EXIT_INPUT and "--device" in line and "--device cpu" in line


def test_ctrl_c_in_training_says_what_to_resume_from(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(deeplab.train, "fit", interrupted)
    assert main(["train", "--out", str(tmp_path / "a"), *QUICK]) == EXIT_INTERRUPTED
    assert "no checkpoint was written yet" in _one_line(capsys)
    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.5, num_classes=5, decoder=False, aspp_channels=8)
    save_checkpoint(build_model(cfg), tmp_path / "b" / "last.pt", step=40)
    assert main(["train", "--out", str(tmp_path / "b"), *QUICK]) == EXIT_INTERRUPTED
    line = _one_line(capsys)
    assert "holds step 40" in line and f"deeplab train --out {tmp_path / 'b'} --resume" in line


def test_debug_shows_the_traceback_instead(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("DEEPLAB_DEBUG", "1")
    with pytest.raises(NotADirectoryError):
        main(["train", "--out", str(tmp_path / "f" / "run"), *QUICK])
    monkeypatch.delenv("DEEPLAB_DEBUG")
    with pytest.raises(NotADirectoryError):
        main(["--debug", "train", "--out", str(tmp_path / "f" / "run"), *QUICK])


def test_an_out_folder_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code = main(["train", "--out", str(tmp_path / "f" / "run"), *QUICK])
    line = _one_line(capsys)
    assert code in (EXIT_INPUT, EXIT_FILES) and str(tmp_path / "f") in line


@pytest.mark.parametrize("flag,value", [
    ("--lr", "-1"), ("--momentum", "5"), ("--weight-decay", "-1"), ("--ignore-index", "300"), ("--seed", "-1"),
    ("--checkpoint-every", "0"), ("--val-limit", "0"), ("--crop-size", "3"), ("--batch-size", "0"),
    ("--hard-pixel-fraction", "0"), ("--class-weights", "-1,2"), ("--val-fraction", "1.5"), ("--steps", "0"),
])
def test_train_refuses_out_of_range_numbers_naming_the_flag_before_anything_is_read(tmp_path, capsys, flag, value):
    code = main(["train", f"{flag}={value}", "--out", str(tmp_path / "run"), "--quiet"]
                + (["--dataset", "folder", "--data-root", str(tmp_path)] if flag == "--val-fraction" else []))
    line = _one_line(capsys)
    assert code == EXIT_INPUT and flag in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [
    ["profile", "--size", "0"], ["eval", "--checkpoint", "x.pt", "--window", "3"],
    ["eval", "--checkpoint", "x.pt", "--limit", "0"], ["export", "--checkpoint", "x.pt", "--format", "onnx",
                                                        "--out", "x.onnx", "--rtol", "-1"],
    ["predict", "--checkpoint", "x.pt", "a.png", "--out", "o", "--alpha", "2"],
])
def test_other_commands_refuse_out_of_range_numbers_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_INPUT and f"argument {argv[-2]}" in err and "Traceback" not in err


def test_plots_without_matplotlib_fail_before_the_evaluation(tmp_path, capsys, monkeypatch):
    import sys

    import deeplab.checkpoint

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    read = []
    monkeypatch.setattr(deeplab.checkpoint, "read_checkpoint", lambda *a, **k: read.append(a) or {})
    code = main(["eval", "--checkpoint", str(tmp_path / "x.pt"), "--dataset", "synthetic", "--plots", str(tmp_path)])
    line = _one_line(capsys)
    assert code == EXIT_INPUT and "--plots needs matplotlib" in line and not read
