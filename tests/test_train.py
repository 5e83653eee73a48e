"""Training: the protocol's pieces by hand, a run that learns, exact resume after SIGKILL, divergence, DDP."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import deeplab
from deeplab import ModelConfig
from deeplab.data import SyntheticShapes
from deeplab.training.batches import epoch_batches
from deeplab.training.config import TrainConfig
from deeplab.training.loop import TrainingDiverged, fit, poly_lr
from deeplab.training.losses import pixel_loss

TINY_MODEL = ModelConfig(
    backbone="mobilenet_v2", depth_multiplier=0.5, num_classes=6, decoder=True, separable=True,
    aspp_channels=32, decoder_channels=32, low_level_channels=16, bn_momentum=0.1,
)
TINY_TRAIN = TrainConfig(
    dataset="synthetic", crop_size=64, min_scale=0.5, max_scale=0.75, scale_step=0.0, batch_size=4, steps=6,
    lr=0.02, weight_decay=4e-5, checkpoint_every=2, val_limit=4, val_images=2,
)


def read_log(path: Path) -> dict[int, float]:
    with open(path, newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_poly_learning_rate_by_hand():
    assert poly_lr(0.007, 0, 100) == pytest.approx(0.007)
    assert poly_lr(0.007, 50, 100) == pytest.approx(0.007 * 0.5**0.9)
    assert poly_lr(0.007, 99, 100) == pytest.approx(0.007 * 0.01**0.9)
    assert poly_lr(0.007, 100, 100) == 0.0


def test_loss_ignores_the_ignore_label():
    # Two pixels, uniform logits over 4 classes: each costs log(4); the 255 pixel never counts.
    logits = torch.zeros(1, 4, 1, 3)
    target = torch.tensor([[[0, 255, 3]]])
    total, count = pixel_loss(logits, target)
    assert int(count) == 2 and float(total) == pytest.approx(2 * math.log(4))


def test_hard_pixel_mining_keeps_the_hardest_fraction():
    # Per-pixel losses -log softmax: pixel 0 confident and right, pixel 1 uniform, pixels 2, 3 confidently wrong.
    logits = torch.tensor([[[[5.0, 0.0, -5.0, -5.0]], [[0.0, 0.0, 5.0, 5.0]]]])  # (1, 2 classes, 1, 4)
    target = torch.tensor([[[0, 0, 0, 255]]])
    total, count = pixel_loss(logits, target, hard_pixel_fraction=0.5)
    # Valid pixels 0..2 -> ceil(0.5 * 3) = 2 hardest: pixel 2 (-log sigmoid(-10)) and pixel 1 (log 2).
    expected = -torch.nn.functional.logsigmoid(torch.tensor(-10.0)) + math.log(2)
    assert int(count) == 2 and float(total) == pytest.approx(float(expected), rel=1e-5)


def test_class_weights_scale_each_pixel():
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    total, count = pixel_loss(logits, target, class_weights=torch.tensor([1.0, 3.0]))
    assert float(total) == pytest.approx(4 * math.log(2)) and int(count) == 2


def test_epoch_batches_are_a_seeded_permutation():
    a = epoch_batches(10, 3, seed=0, epoch=0)
    assert len(a) == 3 and all(len(b) == 3 for b in a)
    flat = [i for b in a for i in b]
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    assert a == epoch_batches(10, 3, seed=0, epoch=0)
    assert a != epoch_batches(10, 3, seed=0, epoch=1) and a != epoch_batches(10, 3, seed=1, epoch=0)


def test_a_short_run_learns_and_writes_its_outputs(tmp_path):
    cfg = replace(TINY_TRAIN, steps=20, lr=0.05, val_every=10, checkpoint_every=10, batch_size=4, val_limit=4)
    result = fit(TINY_MODEL, cfg, out_dir=tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for name in ("config.json", "last.pt", "best.pt", "metrics.json", "log.csv", "predictions.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"miou", "per_class_iou", "pixel_accuracy", "step"} <= set(metrics) and metrics["step"] == 20
    assert set(metrics["per_class_iou"]) == set(SyntheticShapes.class_names)
    losses = read_log(run / "log.csv")
    assert sorted(losses) == list(range(1, 21))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(16, 21)) / 5
    assert last < 0.8 * first  # it learns
    model = deeplab.load(run / "best.pt")
    assert model.class_names == SyntheticShapes.class_names and not model.training
    assert result.step == 20


def test_an_existing_run_is_never_overwritten(tmp_path):
    fit(TINY_MODEL, replace(TINY_TRAIN, steps=2), out_dir=tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        fit(TINY_MODEL, replace(TINY_TRAIN, steps=2), out_dir=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_a_finished_run_without_last_pt_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"the user's best model")
    (run / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"already holds a run \(best.pt, metrics.json\): it has no last.pt"):
        fit(TINY_MODEL, replace(TINY_TRAIN, steps=2), out_dir=run, progress=False)
    assert (run / "best.pt").read_bytes() == b"the user's best model"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "metrics.json"]  # the lock file is gone too


def test_a_second_run_on_a_busy_run_folder_is_refused_naming_the_holder(tmp_path, capsys):
    from deeplab.cli import main
    from deeplab.training.run_folder import RunFolderLock

    lock = RunFolderLock(tmp_path / "run")
    try:
        code = main(["train", "--out", str(tmp_path / "run"), "--steps", "2", "--quiet"])
    finally:
        lock.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"in use by another deeplab train (PID {os.getpid()})" in err[0]
    assert not (tmp_path / "run").exists()  # the holder left nothing, so its folder is gone


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    cfg = replace(TINY_TRAIN, steps=40, lr=1e6, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match=r"at step \d+") as info:
        fit(TINY_MODEL, cfg, out_dir=tmp_path / "run", progress=False)
    step = int(str(info.value).split("at step ")[1].split()[0])
    data = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert data["step"] in (step - 1, step)  # the checkpoint of the last good step survives
    assert all(torch.isfinite(v).all() for v in data["state_dict"].values() if v.is_floating_point())


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "deeplab", "train", "--out", str(out), "--quiet",
        "--backbone", "mobilenet_v2", "--depth-multiplier", "0.5", "--aspp-channels", "32", "--decoder-channels", "32",
        "--low-level-channels", "16", "--crop-size", "64", "--min-scale", "0.5", "--max-scale", "0.75",
        "--batch-size", "4", "--steps", "10", "--checkpoint-every", "3", "--val-limit", "2", "--val-images", "1",
        *extra,
    ]


def test_resume_after_sigkill_repeats_the_uninterrupted_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cmd(tmp_path / "full"), check=True, env=env, capture_output=True, timeout=300)
    full = read_log(tmp_path / "full" / "log.csv")
    assert sorted(full) == list(range(1, 11))

    proc = subprocess.Popen(_train_cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = tmp_path / "killed" / "log.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(read_log(log)) >= 5:  # past the checkpoint at step 3, mid-way to step 6
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(read_log(log))
    assert killed_at < 10, "the run finished before it could be killed"
    ckpt_step = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["step"]
    assert ckpt_step in (3, 6, 9)

    subprocess.run(_train_cmd(tmp_path / "killed", "--resume"), check=True, env=env, capture_output=True, timeout=300)
    resumed = read_log(log)
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A modest learning rate: at init a large one makes the first steps chaotic, amplifying rounding differences.
# Whole 64x64 images (scale 1): at half scale the deepest map is 2x2 and BN over so few values amplifies
# float64 rounding to ~1e-9 in three steps.
# float64 throughout, to compare one process with two exactly: no autocast (--amp auto is bf16 on CPUs with AMX)
DDP_TRAIN = replace(TINY_TRAIN, steps=3, checkpoint_every=3, lr=2e-3, min_scale=1.0, max_scale=1.0, amp="off")


def _ddp_worker(rank: int, world: int, port: int, out: str, pointrend: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    model = replace(TINY_MODEL, dropout=0.0, pointrend=pointrend, pointrend_train_points=64, pointrend_points=256)
    fit(model, DDP_TRAIN, out_dir=out, progress=False)
    torch.distributed.destroy_process_group()


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp

    # Both runs in float64: a freshly initialised deep BN network amplifies float32 rounding (in any batch layout)
    # to percent-level differences within a few steps, which would hide a real mistake as well as it hides noise.
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    try:
        fit(replace(TINY_MODEL, dropout=0.0), DDP_TRAIN, out_dir=tmp_path / "one", progress=False)
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert one["step"] == two["step"] == 3
    for key, a in one["state_dict"].items():
        b = two["state_dict"][key]
        if a.is_floating_point():
            assert a.dtype == torch.float64 and torch.allclose(a, b, rtol=1e-7, atol=1e-9), (key, (a - b).abs().max())
    assert read_log(tmp_path / "one" / "log.csv") == pytest.approx(read_log(tmp_path / "two" / "log.csv"), abs=1e-6)


def test_pointrend_trains_under_ddp_and_reloads_from_its_checkpoint(tmp_path):
    import torch.multiprocessing as mp

    # PointRend's points are drawn per process, so two processes do not repeat one process exactly; what must hold
    # is that DDP runs (every point-head parameter gets a gradient on every rank) and the checkpoint reloads.
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two"), True), nprocs=2, join=True)
    losses = read_log(tmp_path / "two" / "log.csv")
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    model = deeplab.load(tmp_path / "two" / "last.pt")
    assert model.config.pointrend and model.point_head is not None
    with torch.no_grad():
        out = model(torch.randn(1, 3, 70, 90, dtype=next(model.parameters()).dtype))
    assert out.shape == (1, model.config.num_classes, 70, 90)


def test_backbone_weights_start_training_from_an_imagenet_file(tmp_path):
    # A file in torchvision's ResNet-50 layout (our resnet50 uses its names) plus its classifier, which is dropped.
    torch.manual_seed(123)
    source = deeplab.build_model(ModelConfig(backbone="resnet50", num_classes=6)).backbone.state_dict()
    weights = {**source, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    torch.save(weights, tmp_path / "resnet50-imagenet.pth")
    model = ModelConfig(backbone="resnet50", num_classes=6, aspp_channels=32, decoder_channels=32, low_level_channels=16)
    cfg = replace(TINY_TRAIN, steps=1, lr=0.0, crop_size=32, batch_size=2, val_limit=1, val_images=1,
                  backbone_weights=str(tmp_path / "resnet50-imagenet.pth"))
    fit(model, cfg, out_dir=tmp_path / "run", progress=False)
    trained = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state_dict"]
    for key, value in source.items():
        if "running" not in key and "num_batches" not in key:  # lr 0: parameters stay what the file holds
            assert torch.equal(trained[f"backbone.{key}"], value), key


def test_folded_batchnorms_get_measured_statistics_without_changing_the_model():
    # A TF Lite import stores each BN as an identity carrying the folded bias. Re-measured, inference must be
    # unchanged exactly, and training-mode BN on the very images it was measured on must equal inference: batch
    # statistics then equal the stored ones, layer by layer.
    from deeplab.training.warm_start import (
        folded_batchnorms,
        recalibrate_folded_batchnorms,
    )

    torch.manual_seed(0)
    model = deeplab.build_model(replace(TINY_MODEL, dropout=0.0)).eval()
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            state.update({f"{name}.weight": torch.ones_like(m.weight), f"{name}.bias": torch.randn_like(m.bias),
                          f"{name}.running_mean": torch.zeros_like(m.running_mean),
                          f"{name}.running_var": torch.full_like(m.running_var, 1.0 - m.eps)})
    model.load_state_dict(state, strict=False)
    names = folded_batchnorms(model, state)
    assert len(names) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    images = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        before = model(images)
    # The first BN's input, by hand: the stem conv's output moments over all pixels of the four images.
    stem_out = model.backbone.stem.conv(images)
    recalibrate_folded_batchnorms(model, names, iter(images))
    with torch.no_grad():
        after = model(images)
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
        model.train()
        trained_mode = model(images)
    torch.testing.assert_close(trained_mode, before, rtol=1e-3, atol=1e-3)
    stem_bn = model.backbone.stem.bn
    torch.testing.assert_close(stem_bn.running_mean, stem_out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stem_bn.running_var, stem_out.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)
    # A BN that was not folded (ordinary statistics) is left alone.
    assert folded_batchnorms(deeplab.build_model(TINY_MODEL), deeplab.build_model(TINY_MODEL).state_dict()) == []


def test_resume_applies_more_steps_refuses_other_changes_and_repairs_a_damaged_log(tmp_path):
    run = tmp_path / "run"
    cfg = replace(TINY_TRAIN, steps=2, checkpoint_every=1)
    fit(TINY_MODEL, cfg, out_dir=run, progress=False)
    with pytest.raises(ValueError, match=r"--resume: --lr 0.5 \(the run has 0.02\).*another --out"):
        fit(TINY_MODEL, cfg, out_dir=run, resume=True, progress=False, resume_changes={"lr": 0.5})
    with pytest.raises(ValueError, match="already at step 2"):
        fit(TINY_MODEL, cfg, out_dir=run, resume=True, progress=False, resume_changes={"steps": 1})
    # What a power cut leaves: a half-written last row and NUL bytes; and a temp file of a killed checkpoint write.
    with open(run / "log.csv", "ab") as f:
        f.write(b"3,0,0.123" + b"\x00" * 64)
    (run / ".last.pt.abc123.tmp").write_bytes(b"partial")
    said: list[str] = []
    result = fit(TINY_MODEL, cfg, out_dir=run, resume=True, progress=False, echo=said.append,
                 resume_changes={"steps": 4, "lr": 0.02})  # the same lr is no change
    assert result.step == 4 and sorted(read_log(run / "log.csv")) == [1, 2, 3, 4]
    assert any("--steps 4 (was 2)" in line for line in said)
    assert any("log.csv: dropped 1 damaged row(s) and 64 NUL byte(s)" in line for line in said)
    assert not list(run.glob(".*.tmp"))
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4


def test_loader_workers_give_the_same_run_as_loading_in_the_process(tmp_path):
    # One DataLoader serves the whole run (persistent workers, prefetch): each sample's augmentation is still seeded
    # by (seed, epoch, index), so the losses do not depend on who loads. 5 steps of 2 cross an epoch boundary.
    cfg = replace(TINY_TRAIN, steps=5, batch_size=4, dataset_options=("length=8",), checkpoint_every=5,
                  precise_bn_images=4, val_every=0)
    fit(TINY_MODEL, replace(cfg, workers=0), out_dir=tmp_path / "main", progress=False)
    fit(TINY_MODEL, replace(cfg, workers=2), out_dir=tmp_path / "workers", progress=False)
    main, workers = read_log(tmp_path / "main" / "log.csv"), read_log(tmp_path / "workers" / "log.csv")
    assert sorted(main) == list(range(1, 6))
    assert workers == pytest.approx(main, rel=1e-6, abs=1e-7)
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("main", "workers"))
    assert a["miou"] == pytest.approx(b["miou"], abs=1e-6)  # PreciseBN drew the same images too
