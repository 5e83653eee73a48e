"""Rasters of any size in `deeplab predict` and `deeplab eval`: GeoTIFF in, a classified GeoTIFF out, tile by tile.

The stitching is checked exactly with a per-pixel model (every tiling must reproduce the whole-image argmax on every
pixel), and against a real model: the official TF DeepLab VOC model on the shared VOC samples, tiled vs whole
(`../shared`, skipped when absent). The GeoTIFF tests write their own rasters with rasterio (CRS, transform, NoData,
4 bands, uint16) and check the georeference and NoData exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deeplab import ModelConfig, build_model, save_checkpoint
from deeplab.cli import main
from deeplab.models.config import Preprocessing

rasterio = pytest.importorskip("rasterio", reason="rasters need rasterio: pip install 'deeplab[geo]'")
from rasterio.transform import Affine  # noqa: E402

from deeplab.inference.raster import (  # noqa: E402
    Tiling,
    evaluate_raster,
    predict_raster,
    tile_weight,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VOC_TFLITE = SHARED / "models" / "deeplabv3-mnv2-dm05-voc" / "deeplabv3_257_mv_gpu.tflite"
VOC_SAMPLES = SHARED / "data" / "voc-samples"
CRS = "EPSG:32633"
TRANSFORM = Affine(0.25, 0.0, 500_000.0, 0.0, -0.25, 4_000_000.0)  # 25 cm pixels, north up

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Pointwise(nn.Module):
    """A 1x1 convolution with what predict reads from a model: every pixel's class depends on that pixel alone, so any
    tiling must give the whole image's prediction exactly."""

    def __init__(self, *, bands: int = 4, classes: int = 5, mean: float = 100.0, std: float = 50.0) -> None:
        super().__init__()
        self.config = ModelConfig(num_classes=classes, in_channels=bands)
        self.preprocessing = Preprocessing(mean=(mean,) * bands, std=(std,) * bands)
        self.class_names = tuple(f"class{i}" for i in range(classes))
        self.class_colors = tuple((10 * i, 255 - 10 * i, 7 * i) for i in range(classes))
        self.class_values = None
        self.conv = nn.Conv2d(bands, classes, 1)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _write(path: Path, data: np.ndarray, **profile) -> Path:
    base = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype,
                crs=CRS, transform=TRANSFORM)
    with rasterio.open(path, "w", **{**base, **profile}) as dst:
        dst.write(data)
    return path


def _raster(path: Path, *, height: int = 301, width: int = 257, bands: int = 4, nodata: int | None = 0) -> np.ndarray:
    image = np.random.default_rng(0).integers(1, 255, (bands, height, width)).astype(np.uint16)
    if nodata is not None:
        image[:, 50:80, 100:200] = nodata  # a NoData hole crossing tile borders
    _write(path, image, nodata=nodata)
    return image


def _whole(model: Pointwise, image: np.ndarray) -> np.ndarray:
    x = (torch.from_numpy(image.astype(np.float32)) - model.preprocessing.mean[0]) / model.preprocessing.std[0]
    with torch.no_grad():
        return model(x[None]).argmax(1)[0].numpy().astype(np.uint8)


@pytest.mark.parametrize("tile, padding, batch", [(64, 16, 3), (100, 7, 1), (512, None, 4), (31, 0, 2), (40, 19, 5)])
def test_any_tiling_reproduces_a_per_pixel_model_exactly_and_nodata_is_255(tmp_path, tile, padding, batch):
    model = Pointwise().eval()
    image = _raster(tmp_path / "in.tif")
    expected = _whole(model, image)
    expected[(image == 0).all(0)] = 255
    done = predict_raster(model, tmp_path / "in.tif", tmp_path / "out.tif", runtime="eager",
                          tiling=Tiling(tile=tile, padding=padding, batch=batch))
    with rasterio.open(done.path) as out:
        np.testing.assert_array_equal(out.read(1), expected)


def test_tile_weight_is_sin_squared_and_crossfades_to_one_at_half_a_tile_stride():
    w = tile_weight(64)[32].double()  # a row through the centre: sin^2(pi (i + 0.5) / 64) * the centre column's
    i = np.arange(64)
    one_d = np.maximum(np.sin(np.pi * (i + 0.5) / 64) ** 2, 1e-3)
    np.testing.assert_allclose(w.numpy(), one_d * one_d[32], rtol=1e-6)
    np.testing.assert_allclose(one_d[32:] + one_d[:32], 1.0, atol=1e-3)  # neighbours at stride 32 sum to one


def test_output_keeps_georeference_and_nodata_exactly_with_colours_names_and_probabilities(tmp_path):
    model = Pointwise().eval()
    image = _raster(tmp_path / "ortho.tif", height=300, width=520)
    done = predict_raster(model, tmp_path / "ortho.tif", tmp_path / "out" / "ortho.tif", probs=True, runtime="eager",
                          tiling=Tiling(tile=128, batch=2))
    hole = (image == 0).all(0)
    with rasterio.open(tmp_path / "ortho.tif") as src, rasterio.open(done.path) as out:
        assert (out.crs, out.transform, out.width, out.height) == (src.crs, src.transform, src.width, src.height)
        assert out.count == 1 and out.dtypes == ("uint8",) and out.nodata == 255
        assert out.profile["tiled"] and out.block_shapes == [(512, 512)] and out.compression.name == "deflate"  # a COG
        labels = out.read(1)
        assert (labels[hole] == 255).all() and (labels[~hole] < 5).all()
        colormap = out.colormap(1)
        assert [colormap[i][:3] for i in range(5)] == list(model.class_colors)
        assert out.tags(1)["class_3"] == "class3"
    categories = ET.parse(str(done.path) + ".aux.xml").findall("./PAMRasterBand/CategoryNames/Category")
    assert [c.text for c in categories] == list(model.class_names)
    with rasterio.open(done.probs_path) as probs:
        assert probs.count == 5 and probs.crs == out.crs and probs.transform == out.transform
        p = probs.read()
    assert np.isnan(p[:, hole]).all()
    np.testing.assert_array_equal(p[:, ~hole], p[:, ~hole].astype(np.float16).astype(np.float32))  # stored as float16
    np.testing.assert_allclose(p[:, ~hole].sum(0), 1.0, atol=3e-3)
    top = np.take_along_axis(p, np.where(hole, 0, labels)[None].astype(np.int64), 0)[0]
    np.testing.assert_array_equal(top[~hole], p.max(0)[~hole])  # the class is the most probable (ties in float16)


def test_an_alpha_band_masks_the_raster_instead_of_being_read_as_a_band(tmp_path):
    model = Pointwise(bands=3).eval()
    rgb = np.random.default_rng(1).integers(0, 255, (3, 90, 70)).astype(np.uint8)
    alpha = np.full((1, 90, 70), 255, np.uint8)
    alpha[0, :20] = 0
    with rasterio.open(tmp_path / "rgba.tif", "w", driver="GTiff", width=70, height=90, count=4, dtype="uint8",
                       crs=CRS, transform=TRANSFORM, photometric="RGB", alpha="YES") as dst:
        dst.write(np.concatenate([rgb, alpha]))
    done = predict_raster(model, tmp_path / "rgba.tif", tmp_path / "out.tif", runtime="eager", tiling=Tiling(tile=32))
    with rasterio.open(done.path) as out:
        labels = out.read(1)
    assert (labels[:20] == 255).all()
    np.testing.assert_array_equal(labels[20:], _whole(model, rgb)[20:])


def test_a_raster_with_other_bands_than_the_model_is_one_line(tmp_path):
    _raster(tmp_path / "in.tif", bands=2)
    with pytest.raises(ValueError, match="in.tif: 2 image band\\(s\\) but the model reads 4"):
        predict_raster(Pointwise().eval(), tmp_path / "in.tif", tmp_path / "out.tif", runtime="eager")


def test_tiled_prediction_agrees_with_whole_image_prediction_of_the_official_voc_model(tmp_path):
    if not VOC_TFLITE.is_file() or not VOC_SAMPLES.is_dir():
        pytest.skip(f"shared model or data not found ({VOC_TFLITE}, {VOC_SAMPLES}); see shared/README.md")
    pytest.importorskip("tflite", reason="the `tflite` package is not installed: pip install 'deeplab[tflite]'")
    from PIL import Image

    from deeplab.convert import convert_file
    from deeplab.data.transforms import normalize
    from deeplab.inference.segment import segment_probs

    model = convert_file(VOC_TFLITE)  # MobileNetV2 DeepLabv3, trained at 513 (its file's input is 257)
    for name in ("1", "23", "114"):
        rgb = np.asarray(Image.open(VOC_SAMPLES / f"{name}_image.png").convert("RGB"))
        _write(tmp_path / f"{name}.tif", rgb.transpose(2, 0, 1).copy())
        x = normalize(rgb, mean=model.preprocessing.mean, std=model.preprocessing.std)[None]
        whole = segment_probs(model, x).argmax(1)[0].numpy()
        done = predict_raster(model, tmp_path / f"{name}.tif", tmp_path / f"{name}_out.tif", runtime="eager",
                              input_size=None, tiling=Tiling(tile=257))  # 4 to 9 tiles of 257, padding 64
        with rasterio.open(done.path) as out:
            tiled = out.read(1)
        assert (whole > 0).mean() > 0.1  # the object is found: the comparison is not of two all-background masks
        assert (tiled == whole).mean() >= 0.97, name


def _checkpoint(tmp_path: Path) -> Path:
    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.5, num_classes=3, separable=True, aspp_channels=16,
                      decoder_channels=16, low_level_channels=8, in_channels=4)
    torch.manual_seed(0)
    model = build_model(cfg, class_names=["water", "field", "forest"], class_values=[1, 3, 7],
                        class_colors=[(0, 0, 255), (200, 200, 0), (0, 128, 0)],
                        preprocessing=Preprocessing(mean=(1000.0,) * 4, std=(500.0,) * 4))
    return save_checkpoint(model.eval(), tmp_path / "model.pt")


def test_predict_and_eval_commands_on_a_geotiff_score_what_the_output_file_holds(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    image = _raster(tmp_path / "ortho.tif", height=140, width=150)
    image = (image.astype(np.int64) * 12).astype(np.uint16)  # counts around the model's mean
    image[:, 50:80, 100:150] = 0
    _write(tmp_path / "ortho.tif", image, nodata=0)
    truth = np.random.default_rng(2).choice(np.array([0, 1, 3, 7, 9], np.uint8), (1, 140, 150))
    _write(tmp_path / "truth.tif", truth)
    flags = ["--tile", "64", "--padding", "16", "--tile-batch", "2", "--runtime", "eager", "--quiet"]
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "ortho.tif"), "--out", str(tmp_path / "pred"),
                 *flags]) == 0
    assert "Mpx/s" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(ckpt), "--raster", str(tmp_path / "ortho.tif"), "--labels",
                 str(tmp_path / "truth.tif"), "--json", *flags]) == 0
    result = json.loads(capsys.readouterr().out)
    with rasterio.open(tmp_path / "pred" / "ortho.tif") as out:
        pred = out.read(1)
    # The class Values of the checkpoint (1, 3, 7) are the labels; 0 (NoData), 9 (no class) and the image's NoData
    # are not counted.
    target = np.select([truth[0] == 1, truth[0] == 3, truth[0] == 7], [0, 1, 2], default=255)
    counted = (target != 255) & (pred != 255)
    expected = np.zeros((3, 3), np.int64)
    np.add.at(expected, (target[counted], pred[counted]), 1)
    assert result["confusion_matrix"] == expected.tolist()
    assert list(result["per_class_iou"]) == ["water", "field", "forest"]


def test_evaluate_raster_refuses_a_label_raster_on_another_grid(tmp_path):
    _raster(tmp_path / "in.tif", height=40, width=40)
    _write(tmp_path / "truth.tif", np.zeros((1, 40, 40), np.uint8), transform=Affine(1.0, 0.0, 10.0, 0.0, -1.0, 10.0))
    with pytest.raises(ValueError, match="truth.tif: its CRS / transform differ"):
        evaluate_raster(Pointwise().eval(), tmp_path / "in.tif", tmp_path / "truth.tif", runtime="eager")


def test_without_rasterio_a_raster_input_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path)
    _raster(tmp_path / "in.tif", height=20, width=20)
    monkeypatch.setitem(sys.modules, "rasterio", None)  # import rasterio now raises ImportError
    code = main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "in.tif"), "--out", str(tmp_path / "o"),
                 "--runtime", "eager", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "in.tif" in err and "pip install 'deeplab[geo]'" in err


MEMORY_SCRIPT = r"""
import resource, sys
import numpy as np, rasterio, torch
from rasterio.windows import Window
sys.path.insert(0, sys.argv[2])
import deeplab.inference.raster as raster
from test_raster import Pointwise
torch.set_num_threads(1)
raster.GDAL_CACHE_MB = 8  # GDAL's block cache is bounded anyway; small, so that both rasters fill it


def write(name, height, width=768):
    with rasterio.open(f"{sys.argv[1]}/{name}", "w", driver="GTiff", width=width, height=height, count=3,
                       dtype="uint8", tiled=True, crs="EPSG:3857", transform=rasterio.Affine(1, 0, 0, 0, -1, 0)) as dst:
        for row in range(0, height, 512):  # block row by block row: the raster is never in memory whole
            dst.write(np.random.default_rng(row).integers(0, 255, (3, 512, width), dtype=np.uint8),
                      window=Window(0, row, width, 512))


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


model = Pointwise(bands=3, classes=8).eval()
tiling = raster.Tiling(tile=256, batch=4)
write("warm.tif", 512)
raster.predict_raster(model, f"{sys.argv[1]}/warm.tif", f"{sys.argv[1]}/warm_out.tif", runtime="eager", tiling=tiling)
peaks = [peak_mib()]
for name, height in (("small.tif", 3072), ("large.tif", 12288)):
    write(name, height)
    raster.predict_raster(model, f"{sys.argv[1]}/{name}", f"{sys.argv[1]}/out_{name}", runtime="eager", tiling=tiling)
    peaks.append(peak_mib())
print(peaks[1] - peaks[0], peaks[2] - peaks[1])
"""


def test_peak_memory_grows_with_the_tile_strip_not_with_the_raster(tmp_path):
    """Two rasters 768 pixels wide, 3072 and 12288 tall, of 8 classes: the larger one's probabilities alone would take
    288 MiB (float32). Predicting it after the smaller must not raise the peak resident memory further (everything
    held is a strip of tiles across the width: 8 x 256 x 768 x 4 bytes = 6 MiB of blended sums), and the first must
    raise it by far less than a raster's probabilities."""
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    first, more = (float(v) for v in run.stdout.split())
    assert first < 100, f"the peak RSS grew by {first:.0f} MiB predicting 768 x 3072 pixels"
    assert more < 16, f"a raster 4x as tall raised the peak RSS by {more:.0f} MiB more"
