"""The benchmark scripts run and print what their docstrings promise (figures themselves are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_latency_prints_interleaved_results_and_flatness():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--configs", "mobilenet_v2:16:nodec",
         "--sizes", "65,97", "--runs", "2", "--warmup", "0"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [d["kind"] for d in lines] == ["peak", "latency", "latency", "flatness"]
    small, large = lines[1], lines[2]
    assert (small["size"], large["size"]) == (65, 97)
    for d in (small, large):
        assert d["min_ms"] <= d["median_ms"] <= d["max_ms"]
        # Each percentage is the achieved rate over the peak measured in the same rounds.
        assert abs(d["percent_of_peak"] - 100 * d["gflops"] / d["peak_gflops_median"]) < 0.2
        assert d["peak_gflops_best"] >= d["peak_gflops_median"]
        megapixels = d["size"] ** 2 / 1e6
        # median_ms is rounded to 0.1 ms, ms_per_megapixel to 0.1 as well
        assert abs(d["ms_per_megapixel"] - d["median_ms"] / megapixels) <= 0.05 / megapixels + 0.06
    flat = lines[3]
    per_mp = flat["ms_per_megapixel"]
    assert per_mp == [small["ms_per_megapixel"], large["ms_per_megapixel"]]
    assert abs(flat["spread_per_megapixel"] - (max(per_mp) / min(per_mp) - 1)) < 1e-3


def test_raster_memory_prints_speed_and_peak_memory_of_a_geotiff_prediction():
    import pytest

    pytest.importorskip("rasterio", reason="rasters need rasterio: pip install 'deeplab[geo]'")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "raster_memory.py"), "--size", "300", "--tile", "128",
         "--backbone", "mobilenet_v3_small", "--classes", "3", "--threads", "1"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["raster"] == "300x300 RGB uint8" and result["padding"] == 32
    assert 0 < result["megapixels_per_second"] and 100 < result["peak_rss_mib"] < 4000
    assert abs(result["megapixels_per_second"] - 0.09 / result["predict_seconds"]) < 0.01


def test_gpu_benchmark_runs_each_measurement_in_its_own_process_and_prints_a_table():
    # The CPU smoke run of benchmarks/gpu.py (what a GPU machine runs in full): a train step and inference of ours,
    # each in a process of its own, peak memory per process, and the Markdown table.
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--device", "cpu", "--variants", "fp32-cl",
         "--libraries", "deeplab", "--no-cli"],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    train = [r for r in rows if r.get("kind") == "train_step"]
    assert len(train) == 1 and train[0]["variant"] == "fp32-cl" and train[0]["recompute"] is True
    assert train[0]["images_per_s"] > 0 and train[0]["peak_mib"] > 0
    assert sorted(r["batch"] for r in rows if r.get("kind") == "inference") == [1, 2]
    assert "| train_step | fp32-cl | 2 |" in out


def test_gpu_benchmark_runs_readmes_camvid_recipe_as_written():
    # benchmarks/gpu.py --camvid runs the README's CamVid command on the device: the arguments it reads must be that
    # command's, with only the data, start and output paths replaced.
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    recipe = gpu.readme_camvid_recipe()
    assert recipe[:4] == ["--dataset", "camvid", "--data-root", "data/camvid"]
    assert recipe[recipe.index("--batch-size") + 1] == "8" and recipe[recipe.index("--steps") + 1] == "1800"
    assert recipe[-2:] == ["--out", "runs/camvid"] and "--class-weights" in recipe
    mine = gpu._with(recipe, data_root="/d", init_checkpoint="/s.pt", out="/o")
    assert mine[3] == "/d" and mine[-1] == "/o" and mine[mine.index("--init-checkpoint") + 1] == "/s.pt"
    assert len(mine) == len(recipe)


def test_serve_load_runs_a_bounded_load_test_and_the_offline_baseline(tmp_path):
    import pytest

    pytest.importorskip("uvicorn", reason="deeplab serve needs the [serve] extra")
    import torch

    from deeplab.models.checkpoint import save_checkpoint
    from deeplab.models.config import ModelConfig
    from deeplab.models.model import build_model

    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.25, num_classes=3, output_stride=16, decoder=False,
                      atrous_rates=(2,), aspp_channels=16)
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(cfg, class_names=["a", "b", "c"]), tmp_path / "m.pt")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--checkpoint", str(ckpt), "--requests", "12",
         "--concurrency", "1,3", "--runtime", "torch", "--threads", "1", "--offline-runs", "3"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert "machine" in rows[0] and rows[-1] == {"server_exit": 0}
    runs = rows[1:-1]
    assert [r["concurrency"] for r in runs] == [1, 3]
    for r in runs:
        assert r["statuses"] == {"200": 12} and sum(r["batches"].values()) >= 4
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["img_per_s"] > 0
        assert abs(r["ratio_to_offline"] - r["img_per_s"] / r["offline_img_per_s"]) < 0.01
        assert set(r["server_ms"]) == {"read", "decode", "queue", "model", "encode", "total"}
        assert r["server_ms"]["total"]["p99"] <= r["p99_ms"]  # the server's part of what the client waited
    assert runs[0]["batches"] == {"<=1": 12}  # one client: never company


def test_hub_load_times_the_pt_and_the_folder_interleaved():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hub_load.py"), "--backbone", "mobilenet_v2",
                          "--rounds", "2"], capture_output=True, text=True, check=True, timeout=300).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == ["read pt", "read folder", "load pt", "load folder", "load pt, initialised"]
    assert all(r["rounds"] == 2 and r["min_s"] <= r["median_s"] <= r["max_s"] for r in rows)
    assert out.splitlines()[0].count(";") >= 2 and "folder / .pt = " in out.splitlines()[-1]  # machine line, summary


def test_predict_processes_times_each_split_and_compares_the_outputs(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from deeplab.models.checkpoint import save_checkpoint
    from deeplab.models.config import ModelConfig
    from deeplab.models.model import build_model

    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.25, num_classes=3, output_stride=16, decoder=False,
                      atrous_rates=(2,), aspp_channels=16)
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(cfg, class_names=["a", "b", "c"]), tmp_path / "m.pt")
    (tmp_path / "in").mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{i}.png")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "predict_processes.py"), "--checkpoint", str(ckpt), "--folder",
         str(tmp_path / "in"), "--splits", "1x1,2x1", "--rounds", "1", "--runtime", "eager"],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert "machine" in rows[0]
    runs, summary = rows[1:-1], rows[-1]
    assert [r["split"] for r in runs] == ["1x1", "2x1"] and all(r["images"] == 4 and r["identical"] for r in runs)
    assert summary["speedup_over_1x1"]["1x1"] == 1.0 and set(summary["img_per_s_after_startup"]) == {"1x1", "2x1"}


def test_tiling_study_scores_whole_frames_and_tiles_on_georeferenced_camvid_mosaics(tmp_path, one_thread):
    # Two CamVid frames (a third dropped by the 1x2 grid) as one georeferenced mosaic, a tiny random 11-class model
    # without image pooling at scale 1.5: every configuration scores the same pixels, and the tiled scores are
    # exactly what `evaluate_raster` (deeplab eval --raster) gives for that tiling.
    import pytest

    rasterio = pytest.importorskip("rasterio", reason="the mosaics are GeoTIFFs: pip install 'deeplab[geo]'")
    camvid = ROOT.parent / "shared" / "data" / "camvid"
    if not (camvid / "val").is_dir():
        pytest.skip(f"{camvid} absent: the study reads the CamVid val frames from ../shared")
    import torch

    import deeplab
    from deeplab.inference.raster import Tiling, evaluate_raster
    from deeplab.models.checkpoint import save_checkpoint
    from deeplab.models.config import ModelConfig
    from deeplab.models.model import build_model

    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.25, num_classes=11, output_stride=16, decoder=False,
                      atrous_rates=(2,), aspp_channels=16, image_pooling=False)
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(cfg, class_names=[f"c{i}" for i in range(11)]), tmp_path / "m.pt")
    work = tmp_path / "work"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tiling_study.py"), "--checkpoint", str(ckpt), "--frames", "3",
         "--grid", "1x2", "--scale", "1.5", "--tiles", "129", "--paddings", "0,q", "--threads", "1",
         "--workdir", str(work), "--json", str(tmp_path / "rows.jsonl")],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert "machine" in lines[0] and lines[1]["size"] == "360x960" and (lines[1]["frames"], lines[1]["dropped"]) == (2, 1)
    assert lines[2]["image_pooling"] is False and lines[2]["classes"] == 11
    rows = lines[3:]
    assert [r["config"] for r in rows] == ["whole", "frames", "t129/p0", "t129/p32"]
    assert rows[0]["agreement_with_whole"] == 1.0 and all(0 < r["agreement_with_whole"] <= 1 for r in rows)
    assert (rows[3]["raster_tile"], rows[3]["raster_padding"]) == (86, 21)  # model pixels / 1.5
    with rasterio.open(work / "mosaic-0_labels.tif") as src:
        assert src.crs.to_epsg() == 32630 and src.res == (0.1, 0.1) and src.nodata == 255
        scored = int((src.read(1) != 255).sum())
    assert all(r["pixels_scored"] == scored and len(r["per_class_iou"]) == 11 for r in rows)
    reference = evaluate_raster(deeplab.load(ckpt), work / "mosaic-0.tif", work / "mosaic-0_labels.tif",
                                tiling=Tiling(tile=129, padding=32), scale=1.5, runtime="torch")
    assert rows[3]["confusion_matrix"] == reference["confusion_matrix"]
    assert abs(rows[3]["miou"] - reference["miou"]) < 1e-12
    assert f"| {tmp_path.name}/m.pt | no | t129/p32 |" in out
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 1 + len(rows)
