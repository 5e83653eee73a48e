"""`deeplab eval` and `deeplab predict` (and their library functions) with the official TF DeepLab MobileNetV2 model
converted from TFLite, on three PASCAL VOC val images whose ground truth no one here made.

Reads `../shared/` (see shared/README.md); the tests that need it skip with the reason where it or `tflite` is
absent. The file-handling tests use a tiny random model and run everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import deeplab
from deeplab import ModelConfig, build_model, save_checkpoint
from deeplab.cli import main
from deeplab.data.palettes import palette_for
from deeplab.inference.evaluate import evaluate
from deeplab.inference.predict import expand_inputs, overlay, predict_files

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VOC_SAMPLES = SHARED / "data" / "voc-samples"
TFLITE = SHARED / "models" / "deeplabv3-mnv2-dm05-voc" / "deeplabv3_257_mv_gpu.tflite"

# The three samples' object classes and their VOC devkit colours; void is drawn (224, 224, 192).
OBJECTS = {"1": ("aeroplane", 1, (128, 0, 0)), "114": ("bird", 3, (128, 128, 0)), "23": ("sheep", 17, (128, 64, 0))}
VOID = (224, 224, 192)
FOLDER_FLAGS = [
    "--dataset", "folder", "--data-root", str(VOC_SAMPLES), "--image-dir", ".", "--mask-dir", ".",
    "--image-suffix", "_image.png", "--mask-suffix", "_target.png", "--palette", "voc",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[deeplab.DeepLab, Path]:
    if not TFLITE.is_file() or not VOC_SAMPLES.is_dir():
        pytest.skip(f"shared model or data not found ({TFLITE}, {VOC_SAMPLES}); see shared/README.md")
    pytest.importorskip("tflite", reason="the `tflite` package is not installed: pip install 'deeplab[tflite]'")
    from deeplab.convert import convert_file

    model = convert_file(TFLITE)
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "mnv2_voc.pt")
    return deeplab.load(path), path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def hand_object_iou(pred: np.ndarray, sample: str) -> float:
    """IoU of the sample's object class counted with numpy from the colour target (void pixels left out)."""
    _, index, colour = OBJECTS[sample]
    rgb = np.asarray(Image.open(VOC_SAMPLES / f"{sample}_target.png").convert("RGB"))
    gt = np.all(rgb == colour, axis=-1)
    void = np.all(rgb == VOID, axis=-1)
    background = np.all(rgb == (0, 0, 0), axis=-1)
    assert (gt | void | background).all(), "the target holds colours other than background, the object and void"
    assert gt.sum() > 10_000
    keep = ~void
    inter = ((pred == index) & gt & keep).sum()
    union = (((pred == index) | gt) & keep).sum()
    return float(inter / union)


def eval_json(capsys, ckpt: Path, *extra: str) -> dict:
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", str(ckpt), *FOLDER_FLAGS, "--per-image", "--json", "--quiet", *extra)
    assert code == 0
    return json.loads(out)


def object_ious(result: dict) -> dict[str, float]:
    out = {}
    for entry in result["per_image"]:
        sample = Path(entry["image"]).name.split("_")[0]
        out[sample] = entry["per_class_iou"][OBJECTS[sample][0]]
    return out


def test_eval_reports_each_images_object_iou_as_predict_and_a_hand_count_give(official, capsys):
    model, ckpt = official
    result = eval_json(capsys, ckpt)
    assert {"miou", "per_class_iou", "pixel_accuracy", "fw_iou", "trimap", "confusion_matrix"} <= set(result)
    assert list(result["per_class_iou"]) == list(model.class_names) and len(model.class_names) == 21
    reported = object_ious(result)
    assert set(reported) == set(OBJECTS)
    correct = counted = 0
    for sample in OBJECTS:
        pred = deeplab.predict(model, VOC_SAMPLES / f"{sample}_image.png")
        hand = hand_object_iou(pred, sample)
        # Measured: aeroplane 0.887, bird 0.925, sheep 0.871 (single scale, 257x257 model input).
        assert hand >= 0.85, f"{sample}: object IoU {hand:.3f}"
        assert reported[sample] == pytest.approx(hand, abs=0.01)
        rgb = np.asarray(Image.open(VOC_SAMPLES / f"{sample}_target.png").convert("RGB"))
        gt = np.where(np.all(rgb == OBJECTS[sample][2], axis=-1), OBJECTS[sample][1], 0)
        keep = ~np.all(rgb == VOID, axis=-1)
        correct += int(((pred == gt) & keep).sum())
        counted += int(keep.sum())
    assert result["pixel_accuracy"] == pytest.approx(correct / counted, abs=1e-3)
    assert result["num_pixels"] == counted


def test_multi_scale_and_flip_do_not_lower_the_object_iou(official, capsys):
    _, ckpt = official
    single = object_ious(eval_json(capsys, ckpt))
    multi_result = eval_json(capsys, ckpt, "--scales", "0.5,0.75,1.0,1.25,1.5,1.75", "--flip")
    multi = object_ious(multi_result)
    # Measured: aeroplane 0.887 -> 0.928, bird 0.925 -> 0.960, sheep 0.871 -> 0.924.
    for sample in OBJECTS:
        assert multi[sample] >= single[sample], f"{sample}: {single[sample]:.3f} -> {multi[sample]:.3f}"
    assert multi_result["settings"]["scales"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert multi_result["settings"]["flip"] is True


def test_eval_json_and_plots_for_several_checkpoints_with_trimap_widths(official, capsys, tmp_path):
    _, ckpt = official
    a, b = tmp_path / "run_a.pt", tmp_path / "run_b.pt"
    shutil.copy(ckpt, a)
    shutil.copy(ckpt, b)
    plots = tmp_path / "plots"
    code, out, _ = run_cli(
        capsys, "eval", "--checkpoint", str(a), "--checkpoint", str(b), *FOLDER_FLAGS, "--limit", "1",
        "--trimap", "1,5,40", "--plots", str(plots), "--eval-output-stride", "16", "--json", "--quiet",
    )
    assert code == 0
    result = json.loads(out)
    assert [r["checkpoint"] for r in result["checkpoints"]] == [str(a), str(b)]
    for r in result["checkpoints"]:
        assert list(r["trimap"]) == ["1", "5", "40"]
        assert all(0.0 <= v <= 1.0 for v in r["trimap"].values())
        assert r["num_images"] == 1 and r["settings"]["output_stride"] == 16
    assert result["checkpoints"][0]["miou"] == result["checkpoints"][1]["miou"]  # same weights
    expected = {f"{kind}_{run}.png" for kind in ("confusion_matrix", "per_class_iou") for run in ("run_a", "run_b")}
    assert {p.name for p in plots.iterdir()} == expected | {"trimap.png"}
    for p in plots.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5_000


def test_eval_text_output_lists_classes_scores_and_trimap(official, capsys):
    _, ckpt = official
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", str(ckpt), *FOLDER_FLAGS, "--limit", "1", "--trimap", "2",
                           "--quiet")
    assert code == 0
    assert "aeroplane" in out and "mIoU" in out and "pixel accuracy" in out and "trimap mIoU: 2 px" in out


def test_predict_writes_index_overlay_and_probs_and_reports_unreadable_inputs(official, capsys, tmp_path):
    _, ckpt = official
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    (images / "b").mkdir()
    loose = tmp_path / "loose"
    loose.mkdir()
    sizes = {"1": (200, 150), "23": (160, 240), "114": (257, 193)}  # (W, H): the outputs must follow each image
    Image.open(VOC_SAMPLES / "1_image.png").resize(sizes["1"]).save(images / "a" / "1.jpg", quality=95)
    Image.open(VOC_SAMPLES / "23_image.png").resize(sizes["23"]).save(images / "b" / "23.png")
    Image.open(VOC_SAMPLES / "114_image.png").resize(sizes["114"]).save(loose / "114.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        capsys, "predict", "--checkpoint", str(ckpt), str(images), str(loose / "*.png"), str(broken),
        str(tmp_path / "missing.jpg"), "--out", str(out), "--overlay", "--probs", "--quiet",
    )
    assert code == 1
    assert f"{broken}: cannot read image" in stderr
    assert f"{tmp_path / 'missing.jpg'}: no such file or folder" in stderr
    assert "2 of 5 inputs failed" in stderr
    assert "wrote 9 files for 3 inputs" in stdout
    voc_colours = {1: (128, 0, 0), 3: (128, 128, 0), 17: (128, 64, 0)}
    for name, sample in (("a/1", "1"), ("b/23", "23"), ("114", "114")):
        w, h = sizes[sample]
        index = Image.open(out / f"{name}.png")
        assert index.mode == "P" and index.size == (w, h)
        labels = np.asarray(index)
        cls = OBJECTS[sample][1]
        assert (labels == cls).mean() > 0.05, f"{name}: the object ({OBJECTS[sample][0]}) is barely predicted"
        assert tuple(index.getpalette()[3 * cls : 3 * cls + 3]) == voc_colours[cls]
        over = Image.open(out / f"{name}_overlay.png")
        assert over.mode == "RGB" and over.size == (w, h)
        probs = np.load(out / f"{name}_probs.npy")
        assert probs.dtype == np.float16 and probs.shape == (21, h, w)
        assert np.allclose(probs.astype(np.float32).sum(axis=0), 1.0, atol=1e-2)
        assert (probs.argmax(axis=0) == labels).mean() > 0.999  # float16 rounding may flip near-ties only
    assert not (out / "broken.png").exists()


def test_predict_api_takes_a_path_a_pil_image_or_an_array_alike(official):
    model, _ = official
    path = VOC_SAMPLES / "114_image.png"
    from_path = deeplab.predict(model, path)
    assert from_path.shape == (513, 513) and from_path.dtype == np.uint8
    pil = Image.open(path)
    assert np.array_equal(deeplab.predict(model, pil), from_path)
    assert np.array_equal(deeplab.predict(model, np.asarray(pil.convert("RGB"))), from_path)
    with pytest.raises(ValueError, match="nope.png: no such image file"):
        deeplab.predict(model, VOC_SAMPLES / "nope.png")


def test_palette_for_matches_the_tf_voc_labelmap_and_falls_back_to_a_default():
    from deeplab.data import PALETTES

    tf_labelmap = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
                   "train", "tv"]
    voc = palette_for(tf_labelmap)
    assert voc.colors == PALETTES["voc"].colors and voc.class_names == tuple(tf_labelmap)
    assert voc.colors[1] == (128, 0, 0) and voc.colors[17] == (128, 64, 0)
    city = palette_for(list(PALETTES["cityscapes"].class_names))
    assert city.colors[0] == (128, 64, 128)  # road
    other = palette_for(["sky", "rock", "lichen"])
    assert len(other.colors) == 3 and other.class_names == ("sky", "rock", "lichen")


def test_overlay_blends_the_class_colour_with_alpha_and_leaves_void_alone():
    from deeplab.data import PALETTES

    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    mask = np.array([[0, 1, 255], [1, 1, 0]], dtype=np.uint8)
    out = np.asarray(overlay(image, mask, palette=PALETTES["voc"], alpha=0.5))
    # VOC class 1 is (128, 0, 0): 0.5 * 100 + 0.5 * (128, 0, 0) = (114, 50, 50); class 0 is black: (50, 50, 50).
    assert out[0, 1].tolist() == [114, 50, 50]
    assert out[0, 0].tolist() == [50, 50, 50]
    assert out[0, 2].tolist() == [100, 100, 100]


def test_expand_inputs_mirrors_folders_expands_globs_and_numbers_clashing_names(tmp_path):
    for rel in ("dir/x.png", "dir/sub/y.jpg", "dir/notes.txt", "other/x.png", "g/p1.png", "g/p2.png", "g/q.bmp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found, problems = expand_inputs(
        [tmp_path / "dir", tmp_path / "other" / "x.png", str(tmp_path / "g" / "p*.png"), str(tmp_path / "none*.png"),
         tmp_path / "missing.png"]
    )
    names = [(p.relative_to(tmp_path).as_posix(), name) for p, name in found]
    assert names == [("dir/sub/y.jpg", "sub/y"), ("dir/x.png", "x"), ("other/x.png", "x-2"), ("g/p1.png", "p1"),
                     ("g/p2.png", "p2")]
    assert [item for item, _ in problems] == [str(tmp_path / "none*.png"), str(tmp_path / "missing.png")]
    assert "no files match" in problems[0][1] and "no such file" in problems[1][1]


def tiny_model(num_classes: int = 3) -> deeplab.DeepLab:
    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.25, num_classes=num_classes, output_stride=16,
                      decoder=False, atrous_rates=(2,), aspp_channels=16)
    torch.manual_seed(0)
    return build_model(cfg, class_names=[f"c{i}" for i in range(num_classes)]).eval()


def test_video_needs_imageio_and_with_it_writes_one_index_png_per_frame(tmp_path, monkeypatch):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not decoded here")
    monkeypatch.setitem(sys.modules, "imageio", None)  # import fails as when it is not installed
    monkeypatch.setitem(sys.modules, "imageio.v3", None)
    report = predict_files(tiny_model(), [video], out_dir=tmp_path / "out")
    assert report.written == {} and len(report.failed) == 1 and "needs the optional imageio" in report.failed[0][1]

    frames = [np.full((20, 30, 3), v, dtype=np.uint8) for v in (0, 255)]
    v3 = types.ModuleType("imageio.v3")
    v3.imiter = lambda path: iter(frames)
    package = types.ModuleType("imageio")
    package.v3 = v3
    monkeypatch.setitem(sys.modules, "imageio", package)
    monkeypatch.setitem(sys.modules, "imageio.v3", v3)
    report = predict_files(tiny_model(), [video], out_dir=tmp_path / "out")
    assert report.ok
    assert [p.relative_to(tmp_path / "out").as_posix() for p in report.written[str(video)]] == [
        "clip/frame_000000.png", "clip/frame_000001.png"]
    assert Image.open(tmp_path / "out" / "clip" / "frame_000001.png").size == (30, 20)


def test_predict_never_overwrites_an_input_image_with_its_result(tmp_path):
    Image.fromarray(np.zeros((24, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.zeros((24, 32, 3), dtype=np.uint8)).save(tmp_path / "y.jpg")
    before = (tmp_path / "x.png").read_bytes()
    report = predict_files(tiny_model(), [tmp_path], out_dir=tmp_path)
    assert report.failed == [(str(tmp_path / "x.png"), f"{tmp_path / 'x.png'}: its output {tmp_path / 'x.png'} is an "
                              "input of this command and would be overwritten before it is read; choose another --out")]
    assert (tmp_path / "x.png").read_bytes() == before
    assert [p.name for p in report.written[str(tmp_path / "y.jpg")]] == ["y.png"]


def test_predict_never_overwrites_another_input_of_the_same_command(tmp_path):
    # a.jpg's mask is a.png; with a.png an input too it must not replace a.png before a.png is read.
    Image.fromarray(np.full((24, 32, 3), 7, dtype=np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(np.full((24, 32, 3), 9, dtype=np.uint8)).save(tmp_path / "a.png")
    before = (tmp_path / "a.png").read_bytes()
    report = predict_files(tiny_model(), [tmp_path], out_dir=tmp_path, overlay_alpha=0.5)
    assert (tmp_path / "a.png").read_bytes() == before
    assert str(tmp_path / "a.jpg") in {f for f, _ in report.failed}
    assert all("is an input of this command" in message for _, message in report.failed)


def _eval_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from deeplab.data import build_dataset

        model = tiny_model(6)
        dataset = build_dataset("synthetic", split="val", length=5, image_size=48)
        result = evaluate(model, dataset, per_image=True, trimap_widths=(1, 3))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_eval_split_over_two_processes_gives_the_one_process_result(tmp_path):
    import torch.multiprocessing as mp

    from deeplab.data import build_dataset

    torch.set_num_threads(1)
    dataset = build_dataset("synthetic", split="val", length=5, image_size=48)
    alone = evaluate(tiny_model(6), dataset, per_image=True, trimap_widths=(1, 3))
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        together = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert together["confusion_matrix"] == alone["confusion_matrix"]
        assert together["trimap"] == alone["trimap"]
        assert together["per_image"] == alone["per_image"]
        assert together["num_images"] == 5 and len(together["per_image"]) == 5
    assert sum(map(sum, alone["confusion_matrix"])) == 5 * 48 * 48


def test_predict_leaves_no_truncated_output_when_a_write_fails(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((24, 32, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")

    def disk_full(f, array):
        f.write(b"\x93NUMPY half of it")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    with pytest.raises(OSError):
        predict_files(tiny_model(), [tmp_path / "x.jpg"], out_dir=tmp_path / "out", save_probs=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.png"]  # the mask, whole; no .npy, no partial
