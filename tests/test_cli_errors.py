"""One error path for the command line: expected failures end in one line on stderr naming the flag or file, with a
distinct exit status; --debug / DEEPLAB_DEBUG=1 shows the traceback instead; Ctrl-C in training says how to resume."""

from __future__ import annotations

import errno

import pytest
import torch

import deeplab.training.loop
from deeplab import ModelConfig, build_model, save_checkpoint
from deeplab.cli import (
    EXIT_BUG,
    EXIT_FILES,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_MEMORY,
    failure_line,
    main,
)

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
    code, line = failure_line(ZeroDivisionError("division by zero"))  # a bug: one line that says so and how to see more
    assert code == EXIT_BUG and line.startswith("bug: ZeroDivisionError: division by zero") and "--debug" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line_naming_the_flag(tmp_path, capsys):
    code = main(["train", "--device", "cuda", "--out", str(tmp_path / "run"), *QUICK])
    line = _one_line(capsys)
    assert code == EXIT_INPUT and "--device" in line and "--device cpu" in line


def test_ctrl_c_in_training_says_what_to_resume_from(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(deeplab.training.loop, "fit", interrupted)
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

    import deeplab.models.checkpoint

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    read = []
    monkeypatch.setattr(deeplab.models.checkpoint, "read_checkpoint", lambda *a, **k: read.append(a) or {})
    code = main(["eval", "--checkpoint", str(tmp_path / "x.pt"), "--dataset", "synthetic", "--plots", str(tmp_path)])
    line = _one_line(capsys)
    assert code == EXIT_INPUT and "--plots needs matplotlib" in line and not read


def test_any_failed_allocation_is_the_memory_line_naming_what_was_asked_and_the_flags():
    # The words of PyTorch's CUDA and CPU allocators, oneDNN / the C++ runtime, numpy and the OS.
    cuda = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 139.8 GiB total capacity; ...)")
    code, line = failure_line(cuda)
    assert code == EXIT_MEMORY and "GPU memory" in line and "2.00 GiB" in line
    assert "--batch-size" in line and "--crop-size" in line
    code, line = failure_line(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9663676416 bytes."))
    assert code == EXIT_MEMORY and "9.00 GiB" in line
    for message in ("std::bad_alloc", "Unable to allocate 3.2 GiB for an array with shape (1, 2)",
                    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer"):
        assert failure_line(RuntimeError(message))[0] == EXIT_MEMORY, message
    assert failure_line(OSError(errno.ENOMEM, "Cannot allocate memory"))[0] == EXIT_MEMORY


def test_an_error_inside_training_is_never_blamed_on_the_device_flag():
    # What a dtype mismatch on a GPU says: a bug to report, not a reason to give up --device cuda.
    code, line = failure_line(RuntimeError(
        "Input type (CUDABFloat16Type) and weight type (torch.cuda.FloatTensor) should be the same"))
    assert code == EXIT_BUG and "--device" not in line.split("--debug")[0] and line.startswith("bug: RuntimeError")
    code, line = failure_line(AssertionError("Torch not compiled with CUDA enabled"))
    assert code == EXIT_INPUT and "--device" in line


def test_a_value_error_from_a_library_call_is_a_bug_and_one_of_deeplabs_refusals_is_not():
    import numpy as np

    try:
        np.zeros(3).reshape(2, 2)
    except ValueError as e:
        code, line = failure_line(e)
    assert code == EXIT_BUG and "--debug" in line
    try:
        ModelConfig(output_stride=5)
    except ValueError as e:
        code, line = failure_line(e)
    assert code == EXIT_INPUT and "output_stride" in line


def test_a_dataloader_workers_failure_is_read_through_its_wrapper():
    wrapped = ValueError(
        "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "/x/site-packages/deeplab/data/base.py", line 10, in __getitem__\n    raise DatasetError(msg)\n'
        "deeplab.data.base.DatasetError: data/masks/a.png: mask is 40x41 but the image is 40x40; fix the files\n")
    code, line = failure_line(wrapped)
    assert code == EXIT_INPUT and line == "error: data/masks/a.png: mask is 40x41 but the image is 40x40; fix the files"


def test_predict_in_a_process_of_its_own_ends_when_done_keeping_its_status_lines_and_exit_handlers(tmp_path):
    # `deeplab predict` and `eval` end their process as soon as they return (cli._end_now), without the interpreter's
    # teardown: the exit status, everything printed and the exit handlers (logging, multiprocessing) must survive.
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.25, num_classes=3, output_stride=16,
                                    decoder=False, atrous_rates=(2,), aspp_channels=16), class_names=["a", "b", "c"])
    ckpt = save_checkpoint(model.eval(), tmp_path / "m.pt")
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"not a png")
    script = ("import atexit, sys; atexit.register(lambda: print('exit handlers ran', flush=True)); "
              "from deeplab.cli import run; sys.argv = ['deeplab', *sys.argv[1:]]; sys.exit(run())")
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, "predict", "--checkpoint", str(ckpt), str(tmp_path / "in"),
                           "--out", str(tmp_path / "out"), "--runtime", "eager", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]  # one input failed
    assert done.stdout.splitlines()[-2:] == [f"wrote 1 files for 1 inputs to {tmp_path / 'out'} (runtime eager, fp32)",
                                             "exit handlers ran"]
    assert "bad.png" in done.stderr and "1 of 2 inputs failed" in done.stderr
    assert (tmp_path / "out" / "good.png").is_file()
