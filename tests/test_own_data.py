"""A user's own data from the command line: the folder flags in train / eval / data, label maps, the held-out split,
the data report's warnings, BatchNorm statistics re-measured before validation, and the run folder's files."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deeplab import ModelConfig
from deeplab.cli import build_parser, main
from deeplab.data import DatasetError, build_dataset, held_out_stems, parse_label_map
from deeplab.data.base import image_to_rgb
from deeplab.data.report import data_report
from deeplab.training.config import TrainConfig
from deeplab.training.loop import DataCheckError, fit
from deeplab.training.precise_bn import recompute_bn_statistics

TINY_MODEL = ModelConfig(
    backbone="mobilenet_v2", depth_multiplier=0.5, num_classes=2, decoder=True, separable=True,
    aspp_channels=16, decoder_channels=16, low_level_channels=8, bn_momentum=0.1,
)


def _membranes(root: Path, *, n: int = 10, size: int = 40, seed: int = 0) -> Path:
    """An ISBI-like folder: grayscale images, masks 0 (membrane, thin lines) and 255 (cell), no classes.txt."""
    rng = np.random.default_rng(seed)
    (root / "image").mkdir(parents=True)
    (root / "label").mkdir()
    for k in range(n):
        mask = np.full((size, size), 255, dtype=np.uint8)
        for _ in range(3):
            mask[int(rng.integers(2, size - 2)), :] = 0
            mask[:, int(rng.integers(2, size - 2))] = 0
        image = np.where(mask == 0, 40, 200).astype(np.uint8) + rng.integers(0, 30, (size, size), dtype=np.uint8)
        Image.fromarray(image, mode="L").save(root / "image" / f"{k}.png")
        Image.fromarray(mask, mode="L").save(root / "label" / f"{k}.png")
    return root


MEMBRANE_FLAGS = ["--dataset", "folder", "--image-dir", "image", "--mask-dir", "label", "--classes", "membrane,cell"]


def _tiny_train(root: Path, **changes) -> TrainConfig:
    base = dict(dataset="folder", data_root=str(root), image_dir="image", mask_dir="label",
                classes=("membrane", "cell"), label_map="0:0,255:1", crop_size=33, min_scale=1.0, max_scale=1.0,
                scale_step=0.0, batch_size=4, steps=4, lr=0.01, checkpoint_every=2, val_every=2, val_images=2,
                precise_bn_images=8)
    return TrainConfig(**{**base, **changes})


# -- flags ------------------------------------------------------------------------------------


def test_every_tuple_valued_train_flag_parses_comma_separated_values():
    args = build_parser().parse_args([
        "train", "--dataset-options", "image_size=64,length=8", "--classes", "membrane, cell",
        "--class-weights", "0.5,2", "--atrous-rates", "6,12,18", "--multi-grid", "1,2,4",
    ])
    assert args.dataset_options == ("image_size=64", "length=8")  # was split into characters
    assert args.classes == ("membrane", "cell")
    assert args.class_weights == (0.5, 2.0)
    assert args.atrous_rates == (6, 12, 18) and args.multi_grid == (1, 2, 4)


def test_folder_flags_are_the_same_in_train_eval_and_data():
    parser = build_parser()
    flags = ["--image-dir", "im", "--mask-dir", "lb", "--image-suffix", "_i.png", "--mask-suffix", "_m.png",
             "--palette", "voc", "--mask-mode", "index", "--classes", "a,b", "--label-map", "0:0,255:1",
             "--val-fraction", "0.25"]
    expected = {"image_dir": "im", "mask_dir": "lb", "image_suffix": "_i.png", "mask_suffix": "_m.png",
                "palette": "voc", "mask_mode": "index", "classes": ("a", "b"), "label_map": "0:0,255:1",
                "val_fraction": 0.25}
    for command in (["train"], ["eval", "--checkpoint", "x.pt"], ["data", "--dataset", "folder"]):
        args = parser.parse_args(command + flags)
        assert {k: getattr(args, k) for k in expected} == expected, command


def test_label_map_parses_classes_and_ignore_and_names_the_flag_when_wrong():
    assert parse_label_map("0:0,255:1") == {0: 0, 255: 1}
    assert parse_label_map("0:ignore, 1:0,2:1") == {0: 255, 1: 0, 2: 1}
    for bad in ("0-0", "300:1", "0:x", "", "1:0,1:1"):
        with pytest.raises(DatasetError, match="--label-map"):
            parse_label_map(bad)


def test_folder_options_with_another_dataset_name_the_flag():
    with pytest.raises(ValueError, match="--label-map apply to --dataset folder only"):
        TrainConfig(dataset="camvid", data_root="x", label_map="0:0")


# -- images --------------------------------------------------------------------------------------


def test_grayscale_rgba_and_16_bit_images_become_rgb_without_clipping():
    grey = np.array([[0, 128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(image_to_rgb(Image.fromarray(grey, mode="L")), np.repeat(grey[..., None], 3, 2))
    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(image_to_rgb(Image.fromarray(rgba, mode="RGBA")), rgba[..., :3])
    wide = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    out = image_to_rgb(Image.fromarray(wide))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])  # value / 257, not clipped at 255


def test_16_bit_png_files_load_scaled_through_the_folder_dataset(tmp_path):
    root = _membranes(tmp_path, n=2)
    wide = (np.arange(40 * 40, dtype=np.uint32).reshape(40, 40) * 40).astype(np.uint16)
    Image.fromarray(wide).save(root / "image" / "0.png")
    ds = build_dataset("folder", root=root, split="all", image_dir="image", mask_dir="label",
                       classes=("membrane", "cell"), label_map="0:0,255:1")
    image, _ = ds.load(0)
    np.testing.assert_array_equal(image[..., 0], np.rint(wide / 257.0).astype(np.uint8))


# -- the held-out split ---------------------------------------------------------------------------


def test_val_fraction_split_is_deterministic_disjoint_and_follows_the_seed(tmp_path):
    root = _membranes(tmp_path, n=10)
    kw = dict(image_dir="image", mask_dir="label", classes=("membrane", "cell"), label_map="0:0,255:1")

    def stems(split, seed=0, fraction=None):
        ds = build_dataset("folder", root=root, split=split, seed=seed, val_fraction=fraction, **kw)
        return [Path(f[0]).stem for f in ds.files]

    train, val = stems("train"), stems("val")
    assert len(val) == 2 and len(train) == 8  # the default fraction 0.2
    assert not set(train) & set(val) and sorted(train + val) == sorted(str(k) for k in range(10))
    assert (train, val) == (stems("train"), stems("val"))  # deterministic
    assert len(stems("val", fraction=0.5)) == 5
    assert any(stems("val", seed=s) != val for s in range(1, 6))  # the seed picks another split
    # Independent of the listing order and stable when an image is added: the choice is a hash of (seed, stem).
    assert held_out_stems([str(k) for k in range(10)], fraction=0.2, seed=0) == set(val)
    assert held_out_stems([str(k) for k in reversed(range(10))], fraction=0.2, seed=0) == set(val)
    with pytest.raises(DatasetError, match="--val-fraction 1.5"):
        held_out_stems(["a", "b"], fraction=1.5, seed=0)


# -- the data report ----------------------------------------------------------------------------


def _report_of(root: Path, **kw):
    splits = {s: build_dataset("folder", root=root, split=s, image_dir="image", mask_dir="label", **kw)
              for s in ("train", "val")}
    return data_report(splits)


def _folder(root: Path, masks: list[np.ndarray], classes: str) -> Path:
    (root / "image").mkdir(parents=True)
    (root / "label").mkdir()
    for k, mask in enumerate(masks):
        Image.fromarray(np.full(mask.shape + (3,), 90, np.uint8)).save(root / "image" / f"{k}.png")
        Image.fromarray(mask.astype(np.uint8), mode="L").save(root / "label" / f"{k}.png")
    (root / "classes.txt").write_text(classes)
    return root


def _stops(report) -> list[str]:
    return [w["message"] for w in report["warnings"] if w["stop"]]


def test_report_of_black_and_white_masks_names_the_label_map_to_add(tmp_path):
    report = _report_of(_membranes(tmp_path), classes=("membrane", "cell"))
    train = report["splits"]["train"]
    assert set(train["stored_values"]) == {0, 255} and train["class_pixels"][1] == 0
    (stop,) = _stops(report)
    assert "--label-map 0:0,255:1" in stop and "cell" in stop
    fixed = _report_of(tmp_path, classes=("membrane", "cell"), label_map="0:0,255:1")
    assert fixed["warnings"] == [] and fixed["splits"]["train"]["ignore_pixels"] == 0
    # The counts by hand: every stored 255 is a cell pixel.
    assert fixed["splits"]["train"]["class_pixels"][1] == train["stored_values"][255]


def test_report_warns_when_most_labelled_pixels_are_ignored(tmp_path):
    masks = [np.full((8, 8), 255) for _ in range(5)]
    for m in masks:
        m[:2, :2], m[2:4, :2], m[4:6, :2] = 0, 1, 2  # 12 of 64 pixels labelled, all three classes present
    (stop,) = _stops(_report_of(_folder(tmp_path, masks, "a\nb\nc\n")))
    assert "81.2% of the labelled pixels" in stop and "--label-map" in stop


def test_report_stops_on_a_declared_class_without_pixels_and_on_values_outside_the_classes(tmp_path):
    masks = [np.zeros((8, 8)) for _ in range(5)]
    for m in masks:
        m[:4] = 1
    (stop,) = _stops(_report_of(_folder(tmp_path / "a", masks, "a\nb\nc\n")))
    assert "class(es) c have no pixels" in stop and "--classes" in stop
    masks = [np.zeros((8, 8)) for _ in range(5)]
    for m in masks:
        m[:4] = 38  # values of a mask saved as 0/38/75 grey levels
        m[:2] = 75
    stops = _stops(_report_of(_folder(tmp_path / "b", masks, "a\nb\nc\n")))
    assert len(stops) == 2 and stops[0].startswith("train:") and stops[1].startswith("val:")
    assert all("38, 75" in s and "--label-map 0:0,38:1,75:2" in s for s in stops)


def test_report_warns_about_single_value_masks_and_stops_when_every_mask_is_one_value(tmp_path):
    masks = [np.zeros((8, 8)) for _ in range(5)]
    masks[0][:4] = 1
    masks[1][:4] = 1
    masks[3][:4] = 1
    report = _report_of(_folder(tmp_path / "a", masks, "a\nb\n"))
    single = [w for w in report["warnings"] if "single value" in w["message"]]
    assert single and not any(w["stop"] for w in single)
    report = _report_of(_folder(tmp_path / "b", [np.zeros((8, 8)) for _ in range(5)], "a\nb\n"))
    assert any("every mask is one value" in m for m in _stops(report))


# -- precise BatchNorm ---------------------------------------------------------------------------


def test_precise_bn_sets_the_pooled_statistics_of_each_layers_input_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU())
    model.train()
    model[1].running_mean.fill_(100.0)  # corrupted statistics
    model[1].running_var.fill_(1e-4)
    batches = [torch.randn(2, 3, 9, 7) * 3 + 1, torch.randn(3, 3, 5, 6) - 2]  # unequal batches and sizes
    params = {k: v.clone() for k, v in model.named_parameters()}
    rng = torch.get_rng_state()
    assert recompute_bn_statistics(model, batches) == 5
    with torch.no_grad():
        feats = torch.cat([model[0](b).permute(1, 0, 2, 3).reshape(4, -1) for b in batches], dim=1).double()
    torch.testing.assert_close(model[1].running_mean, feats.mean(1).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, feats.var(1, unbiased=True).float(), rtol=1e-5, atol=1e-6)
    assert model.training and model[1].training and model[2].training  # flags restored
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # dropout ran in eval mode: no draw


def test_precise_bn_restores_a_deeplab_whose_running_statistics_were_corrupted():
    torch.manual_seed(0)
    from deeplab import build_model

    model = build_model(TINY_MODEL).eval()
    images = [torch.randn(2, 3, 33, 33) for _ in range(3)]
    fresh = build_model(TINY_MODEL).eval()
    fresh.load_state_dict(model.state_dict())
    recompute_bn_statistics(fresh, images)
    reference = fresh(images[0])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(5.0)
            m.running_var.fill_(1e-3)
    assert not torch.allclose(model(images[0]), reference, atol=1e-2)
    recompute_bn_statistics(model, images)
    torch.testing.assert_close(model(images[0]), reference)


# -- training, eval and the run folder ----------------------------------------------------------


def test_train_refuses_raw_black_and_white_masks_before_any_step_naming_the_flag(tmp_path, capsys):
    root = _membranes(tmp_path / "data")
    out = tmp_path / "run"
    code = main(["train", *MEMBRANE_FLAGS, "--data-root", str(root), "--out", str(out), "--quiet", "--steps", "2",
                 "--batch-size", "2", "--crop-size", "33"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--label-map 0:0,255:1" in err[0] and "--ignore-data-warnings" in err[0]
    assert not (out / "log.csv").exists() and not (out / "last.pt").exists()
    with pytest.raises(DataCheckError):
        fit(TINY_MODEL, _tiny_train(root, label_map=None), out_dir=tmp_path / "run2", progress=False)


def test_a_folder_run_writes_its_story_and_eval_reuses_its_classes_labels_and_held_out_split(tmp_path, capsys):
    root = _membranes(tmp_path / "data")
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        result = fit(TINY_MODEL, _tiny_train(root, val_flip=True), out_dir=out, progress=False)
    finally:
        os.umask(old)
    for name in ("config.json", "data_report.json", "last.pt", "best.pt", "metrics.json", "log.csv", "val.csv",
                 "curves.png", "predictions.png"):
        assert (out / name).is_file(), name
    for name in ("last.pt", "best.pt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name  # readable by the group, not 0600
    with open(out / "val.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "4"] and {"iou_membrane", "iou_cell"} <= set(rows[0])
    assert float(rows[-1]["miou"]) == pytest.approx(result.metrics["miou"], abs=1e-4)
    assert result.metrics["precise_bn_images"] == 8
    with Image.open(out / "predictions.png") as im:
        assert im.width >= 900 and im.height >= 2 * 320
    report = json.loads((out / "data_report.json").read_text())
    assert report["warnings"] == [] and report["splits"]["val"]["images"] == 2
    # eval with nothing but the checkpoint: the training's folder, label map, class names and held-out images.
    code = main(["eval", "--checkpoint", str(out / "last.pt"), "--json", "--per-image"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["split"] == "val" and res["num_images"] == 2
    assert res["settings"]["flip"] and res["miou"] == pytest.approx(result.metrics["miou"], abs=1e-6)
    val_stems = held_out_stems([str(k) for k in range(10)], fraction=0.2, seed=0)
    assert {Path(e["image"]).stem for e in res["per_image"]} == val_stems
    assert list(res["per_class_iou"]) == ["membrane", "cell"]


def test_predict_reads_16_bit_images_as_training_does():
    from deeplab.inference.predict import load_image

    wide = np.array([[0, 257, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(load_image(Image.fromarray(wide))[0, :, 1], [0, 1, 255])


def test_eval_with_skip_bad_counts_each_good_image_once_and_no_bad_one(tmp_path):
    from deeplab import build_model
    from deeplab.inference.evaluate import evaluate

    root = _membranes(tmp_path, n=5)
    (root / "image" / "2.png").write_bytes(b"not a png")
    ds = build_dataset("folder", root=root, split="all", image_dir="image", mask_dir="label",
                       classes=("membrane", "cell"), label_map="0:0,255:1", skip_bad=True)
    with pytest.warns(UserWarning, match="2.png"):
        res = evaluate(build_model(TINY_MODEL).eval(), ds, input_size=None)
    assert res["num_images"] == 4  # was 5: the bad image's neighbour counted twice
    assert sum(map(sum, res["confusion_matrix"])) == 4 * 40 * 40
    assert [Path(p).name for p, _ in ds.bad_files] == ["2.png"]


def test_a_checkpoint_with_nan_weights_is_refused_by_name(tmp_path, capsys):
    from deeplab import build_model, save_checkpoint

    model = build_model(TINY_MODEL)
    with torch.no_grad():
        model.classifier.weight[0, 0, 0, 0] = float("nan")
    save_checkpoint(model, tmp_path / "nan.pt")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    code = main(["predict", "--checkpoint", str(tmp_path / "nan.pt"), str(tmp_path / "a.png"), "--out",
                 str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "non-finite weights" in err[0] and "classifier.weight" in err[0]
    assert not (tmp_path / "out").exists()
