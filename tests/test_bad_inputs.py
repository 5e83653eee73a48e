"""A corpus of bad inputs and faults run through the command line (`deeplab.cli.main`, the console script's path).

Each case asserts the exit status, stderr lines that name the file or flag (no traceback), and that nothing was
written that should not be (no output file, no partial file) and nothing already there was lost. Categories: models
and checkpoints, images and datasets, flags, a full disk (a 64 KiB tmpfs, where this machine lets us mount one), and
interrupts / memory. Cases already covered one by one elsewhere (tests/test_cli_errors.py, tests/test_own_data.py)
are not repeated here.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab import ModelConfig, build_model, save_checkpoint
from deeplab.cli import EXIT_FILES, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_MEMORY, main

TINY = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.5, num_classes=2, decoder=False, aspp_channels=8)
FOLDER = ["--dataset", "folder", "--image-dir", "image", "--mask-dir", "label", "--classes", "a,b"]
QUICK = ["--backbone", "mobilenet_v2", "--depth-multiplier", "0.5", "--no-decoder", "--aspp-channels", "8",
         "--crop-size", "33", "--min-scale", "1", "--max-scale", "1", "--batch-size", "2", "--steps", "1",
         "--val-limit", "1", "--val-images", "1", "--precise-bn-images", "0", "--quiet"]


class _Evil:
    """A pickle that would create a folder when unpickled with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _folder(root: Path, *, n: int = 6, size: int = 40, values=(0, 1)) -> Path:
    rng = np.random.default_rng(0)
    (root / "image").mkdir(parents=True)
    (root / "label").mkdir()
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "image" / f"{k}.png")
        mask = rng.choice(np.array(values, dtype=np.uint8), size=(size, size))
        Image.fromarray(mask, mode="L").save(root / "label" / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """The corpus' files, made once."""
    root = tmp_path_factory.mktemp("corpus")
    torch.manual_seed(0)
    model = build_model(TINY)
    save_checkpoint(model, root / "ckpt.pt")
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    save_checkpoint(model, root / "nan.pt")
    (root / "random.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    (root / "empty.pt").write_bytes(b"")
    (root / "text.pt").write_text("not a checkpoint\n")
    torch.save({"weight": torch.zeros(3)}, root / "statedict.pt")
    torch.save({"format": "deeplab", "payload": _Evil(root / "pwned")}, root / "evil.pt")
    good = root / "ckpt.pt"
    (root / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    (root / "fake.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + np.random.default_rng(2).bytes(2000))
    (root / "random.pth").write_bytes(np.random.default_rng(3).bytes(2000))
    (root / "images").mkdir()
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(root / "images" / "good.png")
    (root / "images" / "truncated.png").write_bytes((root / "images" / "good.png").read_bytes()[:60])
    (root / "images" / "text.png").write_text("hello")
    (root / "images" / "empty.png").write_bytes(b"")
    _folder(root / "data")
    missing = shutil.copytree(root / "data", root / "data_missing_mask")
    (missing / "label" / "3.png").unlink()
    sizes = shutil.copytree(root / "data", root / "data_sizes")
    Image.fromarray(np.zeros((20, 30), np.uint8), mode="L").save(sizes / "label" / "2.png")
    _folder(root / "data_values", values=(0, 7))
    (root / "data_empty" / "image").mkdir(parents=True)
    (root / "data_empty" / "label").mkdir()
    broken_run = root / "broken_run"
    broken_run.mkdir()
    (broken_run / "last.pt").write_bytes(good.read_bytes()[:500])
    (root / "a_file").write_text("x")
    return root


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# (case id, argv with {d} = corpus folder and {t} = this case's empty folder, exit status, what stderr must name)
CASES = [
    # models and checkpoints
    ("predict-missing-checkpoint", "predict --checkpoint {d}/none.pt {d}/images/good.png --out {t}/o", EXIT_INPUT, ["none.pt"]),
    ("predict-random-bytes", "predict --checkpoint {d}/random.pt {d}/images/good.png --out {t}/o", EXIT_INPUT, ["random.pt"]),
    ("predict-empty-file", "predict --checkpoint {d}/empty.pt {d}/images/good.png --out {t}/o", EXIT_INPUT, ["empty.pt"]),
    ("predict-text-file", "predict --checkpoint {d}/text.pt {d}/images/good.png --out {t}/o", EXIT_INPUT, ["text.pt"]),
    ("predict-plain-state-dict", "predict --checkpoint {d}/statedict.pt {d}/images/good.png --out {t}/o", EXIT_INPUT,
     ["statedict.pt", "deeplab convert"]),
    ("predict-malicious-pickle", "predict --checkpoint {d}/evil.pt {d}/images/good.png --out {t}/o", EXIT_INPUT,
     ["evil.pt"]),
    ("predict-truncated-checkpoint", "predict --checkpoint {d}/truncated.pt {d}/images/good.png --out {t}/o",
     EXIT_INPUT, ["truncated.pt"]),
    ("predict-nan-weights", "predict --checkpoint {d}/nan.pt {d}/images/good.png --out {t}/o", EXIT_INPUT,
     ["nan.pt", "non-finite"]),
    ("eval-random-bytes", "eval --checkpoint {d}/random.pt --dataset synthetic", EXIT_INPUT, ["random.pt"]),
    ("export-random-bytes", "export --checkpoint {d}/random.pt --format onnx --out {t}/m.onnx", EXIT_INPUT, ["random.pt"]),
    ("export-malicious-pickle", "export --checkpoint {d}/evil.pt --format torchscript --out {t}/m.ts", EXIT_INPUT,
     ["evil.pt"]),
    ("train-init-random-bytes", "train --init-checkpoint {d}/random.pt --out {t}/run", EXIT_INPUT, ["random.pt"]),
    ("train-init-malicious", "train --init-checkpoint {d}/evil.pt --out {t}/run", EXIT_INPUT, ["evil.pt"]),
    ("train-resume-nothing", "train --resume --out {t}/run", EXIT_INPUT, ["--resume", "last.pt"]),
    ("train-resume-truncated", "train --resume --out {d}/broken_run", EXIT_INPUT, ["last.pt"]),
    ("convert-fake-tflite", "convert {d}/fake.tflite {t}/x.pt", EXIT_INPUT, ["fake.tflite"]),
    ("convert-random-pth", "convert {d}/random.pth {t}/x.pt", EXIT_INPUT, ["random.pth"]),
    ("convert-missing", "convert {d}/none.tflite {t}/x.pt", EXIT_INPUT, ["none.tflite"]),
    ("convert-labels-missing", "convert {d}/fake.tflite {t}/x.pt --labels {d}/none.txt", EXIT_INPUT, ["none.txt"]),
    # images and datasets
    ("predict-missing-input", "predict --checkpoint {d}/ckpt.pt {d}/images/none.png --out {t}/o", 1, ["none.png"]),
    ("predict-truncated-image", "predict --checkpoint {d}/ckpt.pt {d}/images/truncated.png --out {t}/o", 1,
     ["truncated.png"]),
    ("predict-text-as-png", "predict --checkpoint {d}/ckpt.pt {d}/images/text.png --out {t}/o", 1, ["text.png"]),
    ("predict-empty-image", "predict --checkpoint {d}/ckpt.pt {d}/images/empty.png --out {t}/o", 1, ["empty.png"]),
    ("predict-out-is-a-file", "predict --checkpoint {d}/ckpt.pt {d}/images/good.png --out {d}/a_file", None, ["a_file"]),
    ("train-mask-missing", "train --data-root {d}/data_missing_mask --out {t}/run", EXIT_INPUT, ["3"]),
    ("train-mask-size", "train --data-root {d}/data_sizes --out {t}/run", EXIT_INPUT, ["2.png"]),
    ("train-mask-values", "train --data-root {d}/data_values --out {t}/run", EXIT_INPUT, ["--label-map"]),
    ("train-empty-folder", "train --data-root {d}/data_empty --out {t}/run", EXIT_INPUT, ["data_empty"]),
    ("train-camvid-missing", "train --dataset camvid --data-root {d}/none --out {t}/run", EXIT_INPUT, ["none"]),
    ("eval-folder-missing", "eval --checkpoint {d}/ckpt.pt --dataset folder --data-root {d}/none --image-dir image "
     "--mask-dir label", EXIT_INPUT, ["none"]),
    ("train-palette-missing", "train --data-root {d}/data --palette {d}/none.txt --out {t}/run", EXIT_INPUT,
     ["none.txt"]),
    ("train-label-map-syntax", "train --data-root {d}/data --label-map 0-0 --out {t}/run", EXIT_INPUT, ["--label-map"]),
    # flags
    ("train-class-weights-count", "train --data-root {d}/data --class-weights 1,2,3 --out {t}/run", EXIT_INPUT,
     ["--class-weights"]),
    ("train-batch-larger-than-data", "train --data-root {d}/data --batch-size 64 --out {t}/run", EXIT_INPUT,
     ["--batch-size"]),
    ("train-out-under-a-file", "train --data-root {d}/data --out {d}/a_file/run", None, ["a_file"]),
    ("predict-input-size", "predict --checkpoint {d}/ckpt.pt {d}/images/good.png --out {t}/o --input-size 3x", None,
     ["--input-size"]),
    ("export-check-sizes", "export --checkpoint {d}/ckpt.pt --format onnx --out {t}/m.onnx --check-sizes 7", None,
     ["--check-sizes"]),
    ("eval-scales-zero", "eval --checkpoint {d}/ckpt.pt --dataset synthetic --scales 0", None, ["--scales"]),
    ("predict-overlap", "predict --checkpoint {d}/ckpt.pt {d}/images/good.png --out {t}/o --window 65 --overlap 1.5",
     None, ["--overlap"]),
    ("export-pt2-format-typo", "export --checkpoint {d}/ckpt.pt --format onxx --out {t}/m.onnx", None, ["--format"]),
]


@pytest.mark.parametrize("case,argv,code,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(d, tmp_path, capsys, case, argv, code, names):
    command, rest = argv.format(d=d, t=tmp_path).split(" ", 1)
    extra = []  # the case's own flags come last, so they win over these
    if command == "train" and "--dataset" not in rest and "--resume" not in rest and "--init" not in rest:
        extra += FOLDER
    if command == "train":
        extra += QUICK
    if command in ("predict", "eval"):
        extra.append("--quiet")
    argv = " ".join([command, *extra, rest])
    before = sorted(p.relative_to(d) for p in d.rglob("*"))
    try:
        got = main(argv.split())
    except SystemExit as e:  # argparse: a flag's value refused where it is parsed (status 2)
        got = e.code
    lines = _stderr_lines(capsys)
    assert got == (code if code is not None else got) and got not in (0, None), (got, lines)
    assert got in (1, EXIT_INPUT, EXIT_FILES) or code is None
    assert lines and not any("Traceback" in line for line in lines), lines
    assert all(name in "\n".join(lines) for name in names), lines
    if got != 1:  # predict's per-input failures: one line each and a count; everything else: one line
        flag_error = [line for line in lines if not line.startswith("usage:") and not line.startswith(" ")]
        assert len(flag_error) == 1, lines
    assert not (d / "pwned").exists(), "a pickle ran code"
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a failed command left a file"
    assert sorted(p.relative_to(d) for p in d.rglob("*")) == before, "a failed command changed the corpus"


# -- a full disk -------------------------------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs, filled up: every write fails with ENOSPC."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8); the full-disk cases need one")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the full-disk cases need one")
    try:
        with open(mount / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


FULL_DISK_CASES = [
    ("predict", "predict --checkpoint {d}/ckpt.pt {d}/images/good.png --out {m}/out --quiet", EXIT_FILES),
    ("export", "export --checkpoint {d}/ckpt.pt --format torchscript --out {m}/m.ts", EXIT_FILES),
    ("convert", "convert {d}/ckpt.pt {m}/x.pt", None),
    ("train", "train --out {m}/run --dataset-options length=4 --batch-size 2 --steps 1 --quiet", EXIT_FILES),
]


@pytest.mark.parametrize("case,argv,code", FULL_DISK_CASES, ids=[c[0] for c in FULL_DISK_CASES])
def test_full_disk_is_one_line_and_leaves_no_partial_file(d, full_disk, capsys, case, argv, code):
    got = main(argv.format(d=d, m=full_disk).split())
    lines = _stderr_lines(capsys)
    assert got != 0 and (code is None or got == code), (got, lines)
    assert not any("Traceback" in line for line in lines) and lines, lines
    assert any("no space left" in line and str(full_disk) in line for line in lines) or case == "convert", lines
    left = sorted(str(p.relative_to(full_disk)) for p in full_disk.rglob("*") if p.is_file() and p.name != "filler")
    assert left == [], left


# -- interrupts and memory ---------------------------------------------------------------------------------------


def test_ctrl_c_during_predict_is_one_line_and_status_130(d, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["deeplab.inference.predict"], "predict_probs", interrupted)  # the module, not the function
    code = main(["predict", "--checkpoint", str(d / "ckpt.pt"), str(d / "images" / "good.png"), "--out",
                 str(tmp_path / "o"), "--quiet"])
    lines = _stderr_lines(capsys)
    assert code == EXIT_INTERRUPTED and len(lines) == 1 and "interrupted" in lines[0]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_out_of_memory_during_eval_is_one_line_with_the_fix(d, capsys, monkeypatch):
    def exhausted(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 96000000000 bytes.")

    monkeypatch.setattr(sys.modules["deeplab.inference.evaluate"], "segment_probs", exhausted)
    code = main(["eval", "--checkpoint", str(d / "ckpt.pt"), "--data-root", str(d / "data"), *FOLDER, "--split", "all",
                 "--limit", "1", "--quiet"])
    lines = _stderr_lines(capsys)
    assert code == EXIT_MEMORY and len(lines) == 1 and "--window" in lines[0]


def test_the_corpus_has_forty_cases():
    assert len(CASES) + len(FULL_DISK_CASES) + 2 >= 40
