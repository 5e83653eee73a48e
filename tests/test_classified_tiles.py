"""ArcGIS Pro "Classified Tiles" exports: `--dataset classified-tiles --data-root DIR` in data, train and eval.

Each test writes its own small export (tests/conftest.py `classified_tiles`) with exactly the files ArcGIS Pro writes,
and checks what the files say travels: class names and colours from the .emd, class Values (not consecutive) to
class indices, NoData (0) to the ignore label, the held-out split, and the one-line error of a broken export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import deeplab
from deeplab.cli import main
from deeplab.data import DatasetError, build_dataset, held_out_stems
from deeplab.data.palettes import default_palette

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL_RUN = ["--backbone", "mobilenet_v2", "--depth-multiplier", "0.5", "--aspp-channels", "16", "--decoder-channels",
             "16", "--low-level-channels", "8", "--separable", "--crop-size", "33", "--min-scale", "1", "--max-scale",
             "1", "--batch-size", "4", "--steps", "3", "--val-every", "0", "--precise-bn-images", "4", "--val-images",
             "1", "--quiet"]


def test_classes_come_from_the_emd_with_their_colours_values_and_nodata_as_ignore(tmp_path, classified_tiles):
    root = classified_tiles(tmp_path / "export", values=(1, 3, 7))
    ds = build_dataset("classified-tiles", root=root, split="all")
    assert ds.class_names == ("water", "field", "forest")
    assert ds.class_values == (1, 3, 7)
    # The .emd's colours; [-1, -1, -1] ("no colour") takes the default palette's colour of that class index.
    assert ds.palette.colors == ((0, 0, 255), default_palette(ds.class_names).colors[1], (0, 128, 0))
    image, mask = ds.load(0)
    assert image.shape == (32, 32, 4) and image.dtype == np.uint16
    from PIL import Image

    raw = np.asarray(Image.open(ds.files[0][1]))  # the label chip as stored: Values 0, 1, 3, 7
    assert set(np.unique(raw)) == {0, 1, 3, 7}
    expected = np.select([raw == 1, raw == 3, raw == 7], [0, 1, 2], default=255)
    np.testing.assert_array_equal(mask, expected)  # 7 -> class 2, NoData 0 -> 255 (ignored)
    assert (mask[:2] == 255).all()


def test_map_txt_windows_paths_and_val_fraction_split_by_the_folders_hash(tmp_path, classified_tiles):
    root = classified_tiles(tmp_path / "export", n=10)
    assert "\\" in (root / "map.txt").read_text()
    train = build_dataset("classified-tiles", root=root, split="train", seed=3, val_fraction=0.3)
    val = build_dataset("classified-tiles", root=root, split="val", seed=3, val_fraction=0.3)
    stems = [f"{k:09d}" for k in range(10)]
    assert {p.stem for p, _ in val.files} == held_out_stems(stems, fraction=0.3, seed=3)
    assert sorted(p.stem for p, _ in train.files + val.files) == stems
    assert all(label.parent.name == "labels" and label.stem == image.stem for image, label in train.files)


def test_an_rgb_png_export_reads_as_8_bit_rgb(tmp_path, classified_tiles):
    root = classified_tiles(tmp_path / "export", bands=3, dtype="uint8", chip=".png")
    ds = build_dataset("classified-tiles", root=root, split="all")
    image, mask = ds.load(0)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and ds.num_bands == 3
    assert set(np.unique(mask)) == {0, 1, 2, 255}


@pytest.mark.parametrize("break_it, named", [
    (lambda r: (r / "esri_model_definition.emd").unlink(), "esri_model_definition.emd: not found"),
    (lambda r: (r / "map.txt").unlink(), "map.txt: not found"),
    (lambda r: (r / "esri_accumulated_stats.json").write_text("{not json"), "esri_accumulated_stats.json: not valid JSON"),
    (lambda r: (r / "labels" / "000000003.tif").unlink(), "map.txt:4: lists 'labels\\000000003.tif', but "),
    (lambda r: _edit_json(r / "esri_accumulated_stats.json", NumClasses=5),
     "esri_accumulated_stats.json: NumClasses is 5"),
    (lambda r: _edit_json(r / "esri_accumulated_stats.json", Classes=[{"ClassValue": 1, "ClassName": "lake"}]),
     "esri_accumulated_stats.json: its Classes"),
    (lambda r: _edit_json(r / "esri_accumulated_stats.json", MetaDataMode="PASCAL_VOC_rectangles"),
     "MetaDataMode is 'PASCAL_VOC_rectangles'"),
])
def test_a_missing_or_inconsistent_file_is_one_line_naming_it(tmp_path, classified_tiles, break_it, named):
    root = classified_tiles(tmp_path / "export")
    break_it(root)
    with pytest.raises(DatasetError, match=re.escape(named)) as caught:
        build_dataset("classified-tiles", root=root, split="all")
    assert "\n" not in str(caught.value)


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_chip_with_other_bands_than_numbands_is_named_when_read(tmp_path, classified_tiles):
    root = classified_tiles(tmp_path / "export")
    _edit_json(root / "esri_accumulated_stats.json", NumBands=3)
    ds = build_dataset("classified-tiles", root=root, split="all")
    with pytest.raises(DatasetError, match="000000000.tif: 4 bands, but esri_accumulated_stats.json says NumBands 3"):
        ds.load(0)


def test_data_report_measures_each_band_and_counts_nodata_as_ignore(tmp_path, classified_tiles, capsys):
    root = classified_tiles(tmp_path / "export", n=6)
    code = main(["data", "--dataset", "classified-tiles", "--data-root", str(root), "--splits", "all", "--json",
                 "--quiet"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report["warnings"]
    ds = build_dataset("classified-tiles", root=root, split="all")
    pixels = np.stack([ds.load_image(p).reshape(-1, 4) for p, _ in ds.files]).reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(report["band_stats"]["mean"], pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(report["band_stats"]["std"], pixels.std(0), rtol=1e-6)
    st = report["splits"]["all"]
    assert st["ignore_pixels"] == 6 * 2 * 32  # the NoData rows
    assert set(st["stored_values"]) == {"0", "1", "3", "7"}  # JSON keys: the Values as stored


def test_train_with_only_dataset_and_data_root_trains_and_the_checkpoint_carries_the_export(
        tmp_path, classified_tiles, capsys):
    root = classified_tiles(tmp_path / "export")
    out = tmp_path / "run"
    code = main(["train", "--dataset", "classified-tiles", "--data-root", str(root), "--out", str(out), *SMALL_RUN])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    model = deeplab.load(out / "last.pt")
    assert model.class_names == ("water", "field", "forest") and model.class_values == (1, 3, 7)
    assert model.class_colors[0] == (0, 0, 255) and model.class_colors[2] == (0, 128, 0)
    assert model.config.in_channels == 4 and model.config.num_classes == 3
    report = json.loads((out / "data_report.json").read_text())
    # Normalised with the training chips' own per-band statistics, in their 16-bit units.
    np.testing.assert_allclose(model.preprocessing.mean, report["band_stats"]["mean"])
    assert 1000 < model.preprocessing.mean[0] < 3000
    # deeplab eval with no dataset flags: the same export and held-out chips, its class names.
    code = main(["eval", "--checkpoint", str(out / "last.pt"), "--json", "--runtime", "eager"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and list(result["per_class_iou"]) == ["water", "field", "forest"]
    assert result["num_images"] == 2  # round(0.2 * 8) held out


def test_class_weights_auto_are_the_sqrt_median_frequency_of_the_reports_pixel_shares(tmp_path, classified_tiles,
                                                                                      capsys):
    root = classified_tiles(tmp_path / "export")
    out = tmp_path / "run"
    code = main(["train", "--dataset", "classified-tiles", "--data-root", str(root), "--out", str(out),
                 "--class-weights", "auto", "--loss", "ce+dice", *SMALL_RUN])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    shares = np.array(json.loads((out / "data_report.json").read_text())["splits"]["train"]["class_pixels"], float)
    shares /= shares.sum()
    expected = np.sqrt(np.median(shares) / shares)  # 3 classes: the median is the middle share
    np.testing.assert_allclose(config["train"]["class_weights"], expected, atol=1e-4)
    assert config["train"]["loss"] == "ce+dice"


def test_eval_on_an_export_of_other_class_values_is_refused_by_name(tmp_path, classified_tiles, capsys):
    root = classified_tiles(tmp_path / "export")
    other = classified_tiles(tmp_path / "other", values=(2, 4, 6))
    out = tmp_path / "run"
    assert main(["train", "--dataset", "classified-tiles", "--data-root", str(root), "--out", str(out),
                 *SMALL_RUN]) == 0
    capsys.readouterr()
    code = main(["eval", "--checkpoint", str(out / "last.pt"), "--dataset", "classified-tiles", "--data-root",
                 str(other), "--runtime", "eager", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Values [2, 4, 6] but the model was trained on Values [1, 3, 7]" in err
