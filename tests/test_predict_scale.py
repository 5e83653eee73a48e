"""`deeplab predict` at scale: resumable runs (a record per input), prediction shared across torchrun processes,
cloud-optimised GeoTIFFs, raster tiles that keep the model's scale, and memory for very wide rasters.

benchmarks/kill_predict.py runs the kill procedure with ten kills; this file with two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab import ModelConfig, build_model, save_checkpoint
from deeplab.cli import main
from deeplab.inference.predict import predict_files
from deeplab.inference.resume import RECORDS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from kill_predict import kill_and_rerun  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(num_classes: int = 3, **changes):
    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.25, num_classes=num_classes, output_stride=16,
                      decoder=False, atrous_rates=(2,), aspp_channels=16, **changes)
    torch.manual_seed(0)
    return build_model(cfg, class_names=[f"c{i}" for i in range(num_classes)]).eval()


def _images(folder: Path, n: int = 3, size=(24, 32)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"im{i}.png")
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(paths[-1])
    return paths


# -- resumable ---------------------------------------------------------------------------------------------------


def test_a_rerun_skips_complete_outputs_and_redoes_partial_stale_or_changed_ones(tmp_path):
    paths = _images(tmp_path / "in")
    out = tmp_path / "out"
    model = tiny_model()
    first = predict_files(model, [tmp_path / "in"], out_dir=out, overlay_alpha=0.5, runtime="eager")
    assert len(first.written) == 3 and first.skipped == []
    masks = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert sorted((out / RECORDS).iterdir()) == [out / RECORDS / f"im{i}.json" for i in range(3)]

    again = predict_files(model, [tmp_path / "in"], out_dir=out, overlay_alpha=0.5, runtime="eager")
    assert again.written == {} and sorted(again.skipped) == sorted(map(str, paths))

    (out / "im0_overlay.png").write_bytes(masks["im0_overlay.png"][:100])  # a truncated output: redone
    time.sleep(0.01)
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(paths[1])  # a changed input: redone
    (out / RECORDS / "im2.json").unlink()  # outputs without a record (killed before it): redone
    redo = predict_files(model, [tmp_path / "in"], out_dir=out, overlay_alpha=0.5, runtime="eager")
    assert sorted(redo.written) == sorted(map(str, paths)) and redo.skipped == []
    assert (out / "im0_overlay.png").read_bytes() == masks["im0_overlay.png"]

    other = predict_files(model, [tmp_path / "in"], out_dir=out, runtime="eager")  # other options: no overlay
    assert len(other.written) == 3
    changed = tiny_model()
    with torch.no_grad():
        next(changed.classifier.parameters()).add_(0.01)
    assert len(predict_files(changed, [tmp_path / "in"], out_dir=out, runtime="eager").written) == 3  # another model
    assert len(predict_files(changed, [tmp_path / "in"], out_dir=out, runtime="eager", overwrite=True).written) == 3


def test_the_cli_says_how_many_inputs_it_skipped(tmp_path, capsys):
    _images(tmp_path / "in", n=2)
    ckpt = save_checkpoint(tiny_model(), tmp_path / "m.pt")
    argv = ["predict", "--checkpoint", str(ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--runtime",
            "eager", "--quiet"]
    assert main(argv) == 0
    assert "skipped" not in capsys.readouterr().out
    assert main(argv) == 0
    assert "wrote 0 files for 0 inputs" in (text := capsys.readouterr().out) and "skipped 2 done before" in text
    assert main([*argv, "--overwrite"]) == 0
    assert "wrote 2 files for 2 inputs" in capsys.readouterr().out


def test_sigkill_at_random_moments_leaves_only_whole_outputs_and_the_rerun_skips_the_recorded(tmp_path):
    summary = kill_and_rerun(tmp_path, kills=2, seed=3)
    for result in summary["kill_results"]:
        assert result["wrong"] == [] and result["recorded_but_not_whole"] == [], result
        assert result["rerun_status"] == 0 and result["equal_to_clean_run"], result
        assert result["skipped_by_rerun"] == result["records"], result
        assert result["temporary_files_left"] == [], result
    assert any(r["records"] > 0 for r in summary["kill_results"])  # some kill came after outputs were recorded


# -- shared across processes -------------------------------------------------------------------------------------


def _rgb_raster(path: Path, *, height: int, width: int, seed: int = 0, nodata: bool = True) -> Path:
    rasterio = pytest.importorskip("rasterio", reason="rasters need rasterio: pip install 'deeplab[geo]'")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    image = np.stack([(xx * 3 + yy) % 255, (yy * 2) % 255, ((xx // 17 + yy // 13) % 2) * 200]).astype(np.uint8)
    image = np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8)
    if nodata:
        image[:, 40:70, 10:90] = 0
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=rasterio.Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000),
                       nodata=0 if nodata else None) as dst:
        dst.write(image)
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and RECORDS not in p.parts}


def test_two_torchrun_processes_write_the_bytes_of_one_and_report_every_input_once(tmp_path):
    import subprocess

    _images(tmp_path / "in", n=5)
    _rgb_raster(tmp_path / "in" / "big.tif", height=700, width=150)  # two bands of rows: 0..256, 256..700
    ckpt = save_checkpoint(tiny_model(), tmp_path / "m.pt")
    flags = ["predict", "--checkpoint", str(ckpt), str(tmp_path / "in"), "--probs", "--tile", "64", "--padding", "16",
             "--runtime", "eager", "--threads", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "deeplab", *flags, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "deeplab", *flags, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    expected = _files(tmp_path / "one")
    assert len(expected) == 5 * 2 + 3  # index PNG + probs per image; the GeoTIFF, its probabilities and .aux.xml
    assert _files(tmp_path / "two") == expected
    assert not list((tmp_path / "two").glob(".*part*")) and not list((tmp_path / "two").glob(".*partial"))
    summary = [line for line in two.stdout.splitlines() if line.startswith("wrote")]
    assert summary == [f"wrote 13 files for 6 inputs to {tmp_path / 'two'} (runtime eager, fp32)"], two.stdout
    assert len(list((tmp_path / "two" / RECORDS).iterdir())) == 6  # one record per input, the raster's included
    assert "0.1 Mpx" in two.stdout  # the raster's megapixels summed over both processes' bands (150 x 700)


def _torchrun(args: list[str], env: dict[str, str], *, processes: int = 2) -> subprocess.CompletedProcess:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
              if processes > 1 else [sys.executable])
    done = subprocess.run([*launch, "-m", "deeplab", *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", **extra}


def test_torchrun_processes_without_a_cached_runtime_choice_time_once_and_write_the_bytes_of_one(tmp_path):
    _images(tmp_path / "in", n=4)
    ckpt = save_checkpoint(tiny_model(), tmp_path / "m.pt")
    flags = ["predict", "--checkpoint", str(ckpt), str(tmp_path / "in"), "--runtime", "auto", "--precision", "fp32",
             "--threads", "1", "--quiet"]
    env = _env(DEEPLAB_CACHE_DIR=str(tmp_path / "cache"))
    two = _torchrun([*flags, "--out", str(tmp_path / "two")], env)
    assert len(list((tmp_path / "cache" / "runtime-choice").glob("*.json"))) == 1  # one process chose
    one = _torchrun([*flags, "--out", str(tmp_path / "one")], env, processes=1)  # takes that choice
    assert "timed on this machine before" in one.stdout
    assert _files(tmp_path / "two") == _files(tmp_path / "one") and len(_files(tmp_path / "one")) == 4
    runtime = one.stdout.split("(runtime ")[1].split(",")[0]
    assert f"(runtime {runtime}, fp32" in two.stdout


def test_eval_of_a_raster_under_torchrun_shares_its_rows_and_scores_exactly_as_one_process(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    _rgb_raster(tmp_path / "r.tif", height=600, width=90)  # two bands of rows: 0..256, 256..600
    truth = np.random.default_rng(3).choice(np.array([0, 1, 2, 255], np.uint8), (1, 600, 90))
    with rasterio.open(tmp_path / "r.tif") as src:
        profile = {**src.profile, "count": 1, "nodata": None}
    with rasterio.open(tmp_path / "truth.tif", "w", **profile) as dst:
        dst.write(truth)
    ckpt = save_checkpoint(tiny_model(), tmp_path / "m.pt")
    flags = ["eval", "--checkpoint", str(ckpt), "--raster", str(tmp_path / "r.tif"), "--labels",
             str(tmp_path / "truth.tif"), "--tile", "64", "--padding", "16", "--runtime", "eager", "--threads", "1",
             "--json", "--quiet"]
    one, two = (json.loads(_torchrun(flags, _env(), processes=n).stdout) for n in (1, 2))
    assert two == one  # scores, confusion matrix and settings
    counted = np.array(one["confusion_matrix"]).sum()
    assert counted > (truth[0, 256:] != 255).sum()  # the pixels of both bands, each counted once
    assert len(set(one["per_class_iou"].values())) > 1


def test_a_band_of_rows_is_that_band_of_the_whole_raster_prediction(tmp_path):
    from deeplab.inference.raster import Tiling, blended_strips, row_bands
    from deeplab.inference.options import InferenceOptions

    rasterio = pytest.importorskip("rasterio")
    _rgb_raster(tmp_path / "r.tif", height=600, width=90)
    model, tiling, opts = tiny_model(), Tiling(tile=48, padding=12), InferenceOptions(runtime="eager")
    assert row_bands(600, 3) == [(0, 256), (256, 512), (512, 600)] and row_bands(100, 2) == [(0, 0), (0, 100)]

    def labels(src, rows=None):
        out = np.full((src.height, src.width), 77, np.uint8)
        for strip in blended_strips(model, src, tiling, opts, rows=rows):
            h, w = strip.shape
            out[strip.row:strip.row + h, strip.column:strip.column + w] = strip.labels()
        return out

    with rasterio.open(tmp_path / "r.tif") as src:
        whole = labels(src)
        bands = [labels(src, rows) for rows in row_bands(600, 3)]
    assert len(np.unique(whole)) > 1
    for (r0, r1), band in zip(row_bands(600, 3), bands):
        np.testing.assert_array_equal(band[r0:r1], whole[r0:r1])
        assert (band[:r0] == 77).all() and (band[r1:] == 77).all()


# -- cloud-optimised GeoTIFF ---------------------------------------------------------------------------------------


def _red_decides(classes: int = 3):
    """A per-pixel model whose class follows the red band alone: 0 where it is dark, classes - 1 where it is bright."""
    from test_raster import Pointwise

    model = Pointwise(bands=3, classes=classes, mean=127.5, std=127.5)
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.bias.zero_()
        model.conv.weight[:, 0, 0, 0] = torch.linspace(-4, 4, classes)
    return model.eval()


def test_cog_output_has_overviews_of_real_classes_in_cog_layout_and_keeps_the_georeference(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from deeplab.inference.raster import Tiling, predict_raster

    height, width = 600, 1100
    image = np.zeros((3, height, width), np.uint8)
    image[0, :, 1::2] = 255  # classes 0, 2, 0, 2, ... by column: an average would make class 1 in the overviews
    image[1] = 100  # not NoData (0 in every band)
    image[:, :40, :100] = 0
    with rasterio.open(tmp_path / "in.tif", "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=rasterio.Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000), nodata=0
                       ) as dst:
        dst.write(image)
    model = _red_decides()
    done = predict_raster(model, tmp_path / "in.tif", tmp_path / "out.tif", probs=True, runtime="eager",
                          tiling=Tiling(tile=256))
    with rasterio.open(tmp_path / "in.tif") as src, rasterio.open(done.path) as out:
        assert (out.crs, out.transform, out.width, out.height) == (src.crs, src.transform, src.width, src.height)
        assert out.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert out.profile["tiled"] and out.block_shapes == [(512, 512)] and out.compression.name == "deflate"
        assert out.overviews(1) == [2, 4] and out.nodata == 255
        assert out.colormap(1)[2][:3] == model.class_colors[2] and out.tags(1)["class_1"] == "class1"
        full = out.read(1)
    assert set(np.unique(full[40:])) == {0, 2}
    with rasterio.open(done.path, overview_level=0) as half:
        assert (half.width, half.height) == (550, 300)
        assert set(np.unique(half.read(1))) <= {0, 2, 255}  # mode: classes that occur, never the average 1
    with rasterio.open(done.probs_path) as probs:
        assert probs.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and probs.overviews(1) == [2, 4]
        stored = probs.read()
    np.testing.assert_array_equal(stored, stored.astype(np.float16).astype(np.float32))  # float16 values
    with rasterio.open(done.probs_path, overview_level=0) as half:
        p = half.read(3)
    assert 0.3 < np.nanmean(p) < 0.7  # the average of columns near 0 and near 1
    plain = predict_raster(model, tmp_path / "in.tif", tmp_path / "plain.tif", runtime="eager", cog=False,
                           tiling=Tiling(tile=256))
    with rasterio.open(plain.path) as out:
        assert out.overviews(1) == [] and "LAYOUT" not in out.tags(ns="IMAGE_STRUCTURE")
        np.testing.assert_array_equal(out.read(1), full)


# -- tiles that keep the model's scale -----------------------------------------------------------------------------


class Recording(torch.nn.Module):
    """A model that records the input shapes it is given, around a real one."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner, self.shapes = inner, []
        for name in ("config", "class_names", "class_colors", "class_values", "preprocessing"):
            setattr(self, name, getattr(inner, name))

    def forward(self, x):
        self.shapes.append(tuple(x.shape[-2:]))
        return self.inner(x)


def test_a_fixed_input_size_sets_the_tile_and_tiles_run_at_their_own_size_or_at_the_asked_scale(tmp_path):
    from dataclasses import replace

    from deeplab.inference.raster import Tiling, predict_raster, tiling_note

    _rgb_raster(tmp_path / "r.tif", height=300, width=400)
    inner = tiny_model()
    inner.preprocessing = replace(inner.preprocessing, input_size=(96, 96))  # as a converted TF Lite model
    model = Recording(inner)
    predict_raster(model, tmp_path / "r.tif", tmp_path / "a.tif", runtime="eager", cog=False)
    assert set(model.shapes) == {(512, 512)}  # the default tile is 512 (docs/geo.md's study), never resized
    model.shapes.clear()
    model.static_input = True  # an exported .tflite runs its own size only: that is the tile
    predict_raster(model, tmp_path / "r.tif", tmp_path / "s.tif", runtime="eager", cog=False)
    assert set(model.shapes) == {(96, 96)}
    model.static_input = False
    model.shapes.clear()
    predict_raster(model, tmp_path / "r.tif", tmp_path / "b.tif", runtime="eager", cog=False,
                   tiling=Tiling(tile=128))
    assert set(model.shapes) == {(128, 128)}  # a tile of another size runs at its own size: the raster's resolution
    model.shapes.clear()
    predict_raster(model, tmp_path / "r.tif", tmp_path / "c.tif", runtime="eager", cog=False, scale=0.5,
                   tiling=Tiling(tile=96))
    assert set(model.shapes) == {(96, 96)}  # tiles of 192 raster pixels, shown to the model at half size
    assert tiling_note(Tiling(tile=128), "model") is None and tiling_note(Tiling(tile=96), (96, 96)) is None
    note = tiling_note(Tiling(tile=1024), (513, 513))
    assert "\n" not in note and "--tile 1024" in note and "0.50 x its resolution" in note


def test_scale_halves_a_raster_that_is_a_twice_enlarged_copy_back_to_the_original_prediction(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from deeplab.inference.raster import Tiling, predict_raster

    _rgb_raster(tmp_path / "small.tif", height=160, width=200, nodata=False)
    with rasterio.open(tmp_path / "small.tif") as src:
        small, profile = src.read(), src.profile
    big = small.repeat(2, axis=1).repeat(2, axis=2)  # every pixel 2 x 2: the same scene at twice the resolution
    t = profile["transform"]
    profile.update(width=400, height=320, transform=rasterio.Affine(t.a / 2, 0, t.c, 0, t.e / 2, t.f))
    with rasterio.open(tmp_path / "big.tif", "w", **profile) as dst:
        dst.write(big)
    model = tiny_model()
    kw = dict(runtime="eager", cog=False)
    predict_raster(model, tmp_path / "small.tif", tmp_path / "p_small.tif", tiling=Tiling(tile=64), **kw)
    predict_raster(model, tmp_path / "big.tif", tmp_path / "p_half.tif", tiling=Tiling(tile=64), scale=0.5, **kw)
    predict_raster(model, tmp_path / "big.tif", tmp_path / "p_res.tif", tiling=Tiling(tile=64),
                   resolution=abs(t.a), **kw)  # the small raster's GSD: the same factor, from the transform
    predict_raster(model, tmp_path / "big.tif", tmp_path / "p_full.tif", tiling=Tiling(tile=64), **kw)
    read = {name: rasterio.open(tmp_path / f"p_{name}.tif").read(1) for name in ("small", "half", "res", "full")}
    expected = read["small"].repeat(2, axis=0).repeat(2, axis=1)
    assert len(np.unique(expected)) > 1
    agree_half = (read["half"] == expected).mean()
    np.testing.assert_array_equal(read["res"], read["half"])
    # Measured 82% against 67% at the raster's own resolution: the rest is where the model's probabilities, resized
    # back bilinearly, cross between the 2 x 2 copies of a small pixel (a random model's classes change often).
    assert agree_half > 0.78 and agree_half > (read["full"] == expected).mean() + 0.1, agree_half


def test_resolution_needs_a_raster_in_metres_and_says_so_in_one_line(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from deeplab.inference.raster import predict_raster

    with rasterio.open(tmp_path / "geo.tif", "w", driver="GTiff", width=40, height=40, count=3, dtype="uint8",
                       crs="EPSG:4326", transform=rasterio.Affine(1e-5, 0, 10, 0, -1e-5, 50)) as dst:
        dst.write(np.full((3, 40, 40), 100, np.uint8))
    with pytest.raises(ValueError, match=r"geo.tif: --resolution 0.3 \(metres\) needs a raster in a projected CRS "
                       r"in metres, this one has EPSG:4326") as err:
        predict_raster(tiny_model(), tmp_path / "geo.tif", tmp_path / "o.tif", runtime="eager", resolution=0.3)
    assert "\n" not in str(err.value)


def test_the_cli_prints_one_line_when_input_size_would_rescale_the_tiles(tmp_path, capsys):
    _rgb_raster(tmp_path / "r.tif", height=80, width=90)
    ckpt = save_checkpoint(tiny_model(), tmp_path / "m.pt")
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "r.tif"), "--out", str(tmp_path / "o"),
                 "--tile", "64", "--input-size", "32", "--runtime", "eager", "--quiet", "--no-cog"]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("deeplab predict: --tile 64 with --input-size 32x32: every tile is resized") and "\n" not in err
