"""Datasets, palettes and paired transforms: label mapping, the DeepLab augmentation protocol,
loud errors on bad files, and a synthetic task that colour alone cannot solve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab.data import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PALETTES,
    TF_MEAN,
    TF_STD,
    DatasetError,
    EvalTransform,
    SyntheticShapes,
    TrainTransform,
    build_dataset,
    colorize,
    colors_to_index,
    eval_transform,
    random_scale,
    train_transform,
    voc_colormap,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# -- fixture helpers ------------------------------------------------------------------------


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _save_mask(path: Path, labels: np.ndarray, *, mode: str = "L") -> Path:
    """An index mask PNG: 'L' (grey values) or 'P' (palette indices, as VOC stores them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        colorize(labels, PALETTES["voc"]).save(path)
    else:
        Image.fromarray(labels.astype(np.uint8), mode="L").save(path)
    return path


def _label_grid(h: int, w: int, values: list[int]) -> np.ndarray:
    """Vertical bands of the given label values, so every value is present."""
    mask = np.zeros((h, w), dtype=np.uint8)
    for k, v in enumerate(values):
        mask[:, k * w // len(values) : (k + 1) * w // len(values)] = v
    return mask


def _make_voc(root: Path, *, labels: list[int] = (0, 15, 255), n: int = 3) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    ids = [f"2007_{i:06d}" for i in range(n)]
    for k, stem in enumerate(ids):
        _save_image(voc / "JPEGImages" / f"{stem}.jpg", _image(12, 16, k))
        _save_mask(voc / "SegmentationClass" / f"{stem}.png", _label_grid(12, 16, list(labels)), mode="P")
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(ids) + "\n")
    (sets / "val.txt").write_text(ids[0] + "\n")
    return voc


# -- palettes -------------------------------------------------------------------------------


def test_voc_colormap_matches_devkit_colours():
    cmap = voc_colormap()
    assert tuple(cmap[1]) == (128, 0, 0)  # aeroplane
    assert tuple(cmap[15]) == (192, 128, 128)  # person
    assert tuple(cmap[255]) == (224, 224, 192)  # void boundary
    assert PALETTES["voc"].void_color == (224, 224, 192)


@pytest.mark.parametrize(
    ("name", "num_classes", "index", "color"),
    [
        ("voc", 21, 20, (0, 64, 128)),  # tvmonitor
        ("cityscapes", 19, 13, (0, 0, 142)),  # car
        ("ade20k", 150, 0, (120, 120, 120)),  # wall
        ("camvid", 11, 4, (60, 40, 222)),  # Pavement
    ],
)
def test_palettes_give_one_official_colour_per_class(name, num_classes, index, color):
    palette = PALETTES[name]
    assert len(palette.class_names) == len(palette.colors) == num_classes
    assert palette.colors[index] == color
    # Distinct, so colour masks decode unambiguously; the official ADE20K table itself gives
    # road (6) and skyscraper (48) the same grey, and we keep the official table.
    assert len(set(palette.colors)) == num_classes - (name == "ade20k")


def test_colorize_png_stores_labels_and_shows_palette_colours(tmp_path):
    mask = _label_grid(4, 8, [0, 1, 20, 255])
    image = colorize(mask, PALETTES["voc"])
    assert image.mode == "P"
    image.save(tmp_path / "m.png")
    reloaded = Image.open(tmp_path / "m.png")
    np.testing.assert_array_equal(np.asarray(reloaded), mask)  # index values survive a PNG round trip
    rgb = np.asarray(reloaded.convert("RGB"))
    assert tuple(rgb[0, 0]) == (0, 0, 0) and tuple(rgb[0, 2]) == (128, 0, 0)
    assert tuple(rgb[0, -1]) == (224, 224, 192)


def test_colors_to_index_inverts_colorize_and_reports_unknown_colours():
    mask = _label_grid(4, 8, [0, 3, 15, 255])
    rgb = np.asarray(colorize(mask, PALETTES["voc"]).convert("RGB")).copy()
    index, unknown = colors_to_index(rgb, PALETTES["voc"])
    np.testing.assert_array_equal(index, mask)
    assert len(unknown) == 0
    rgb[0, 0] = (1, 2, 3)
    _, unknown = colors_to_index(rgb, PALETTES["voc"])
    assert [tuple(c) for c in unknown] == [(1, 2, 3)]


# -- transforms -----------------------------------------------------------------------------


def test_random_scale_keeps_mask_values_in_the_original_label_set():
    rng = np.random.default_rng(0)
    labels = np.array([0, 10, 200], dtype=np.uint8)
    # Per-pixel random labels: any interpolation between neighbours would invent new values.
    mask = labels[rng.integers(0, 3, size=(37, 53))]
    t = TrainTransform(crop_size=(64, 64), scale_range=(0.5, 2.0), scale_step=0, ignore_index=255)
    seen: set[int] = set()
    for seed in range(20):
        _, out = t(_image(37, 53, seed), mask, np.random.default_rng(seed))
        seen |= set(out.unique().tolist())
    assert seen <= {0, 10, 200, 255}
    assert {0, 10, 200} <= seen


def test_scale_resizes_image_and_mask_by_the_drawn_factor():
    image, mask = _image(20, 30), np.ones((20, 30), dtype=np.uint8)
    t = TrainTransform(crop_size=(100, 100), scale_range=(2.0, 2.0), flip=False)
    _, out = t(image, mask, np.random.default_rng(0))
    valid = out != 255
    assert valid.sum().item() == 40 * 60
    assert valid[:40, :60].all()


def test_padding_fills_mask_with_ignore_and_image_with_mean_which_normalizes_to_zero():
    image = _image(20, 30)
    mask = np.full((20, 30), 3, dtype=np.uint8)
    t = TrainTransform(crop_size=(48, 64), scale_range=(1.0, 1.0), flip=False, ignore_index=255)
    out_image, out_mask = t(image, mask, np.random.default_rng(0))
    assert out_image.shape == (3, 48, 64) and out_mask.shape == (48, 64)
    # TF pads at the bottom/right; with a crop larger than the image the image stays at (0, 0).
    assert (out_mask[:20, :30] == 3).all()
    assert (out_mask[20:, :] == 255).all() and (out_mask[:, 30:] == 255).all()
    assert torch.count_nonzero(out_image[:, 20:, :]) == 0
    assert torch.count_nonzero(out_image[:, :, 30:]) == 0
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    torch.testing.assert_close(out_image[:, :20, :30], expected)


def test_same_rng_seed_gives_the_same_sample_and_different_seeds_differ():
    image = _image(60, 80)
    mask = _label_grid(60, 80, [0, 1, 2, 3])
    t = TrainTransform(crop_size=(33, 33), scale_step=0)
    a = t(image, mask, np.random.default_rng([7, 0, 3]))
    b = t(image, mask, np.random.default_rng([7, 0, 3]))
    c = t(image, mask, np.random.default_rng([7, 1, 3]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_flip_mirrors_image_and_mask_together():
    image = _image(16, 24)
    mask = np.tile(np.arange(24, dtype=np.uint8), (16, 1))  # label = column, so a flip is visible
    reference = EvalTransform()(image, mask)
    t = TrainTransform(crop_size=(16, 24), scale_range=(1.0, 1.0), flip=True)
    flipped = 0
    for seed in range(32):
        out_image, out_mask = t(image, mask, np.random.default_rng(seed))
        is_flipped = torch.equal(out_mask, reference[1].flip(-1))
        assert is_flipped or torch.equal(out_mask, reference[1])
        expected_image = reference[0].flip(-1) if is_flipped else reference[0]
        torch.testing.assert_close(out_image, expected_image)
        flipped += is_flipped
    assert 0 < flipped < 32  # p = 0.5: both outcomes occur


def test_random_crop_moves_within_a_larger_image():
    image = _image(64, 64)
    mask = np.arange(64 * 64, dtype=np.int64).reshape(64, 64) % 200
    t = TrainTransform(crop_size=(16, 16), scale_range=(1.0, 1.0), flip=False)
    corners = {int(t(image, mask, np.random.default_rng(s))[1][0, 0]) for s in range(10)}
    assert len(corners) > 1


def test_scale_step_draws_from_tf_grid_of_scales():
    rng = np.random.default_rng(0)
    draws = {random_scale(rng, scale_range=(0.5, 2.0), scale_step=0.25) for _ in range(300)}
    assert draws == {0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0}


def test_tf_normalization_maps_pixels_to_minus_one_one():
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[0, 0] = 255
    out, _ = eval_transform(image, np.zeros((2, 2), dtype=np.uint8), mean=TF_MEAN, std=TF_STD)
    assert out[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert out[:, 1, 1].tolist() == [-1.0, -1.0, -1.0]


def test_eval_transform_keeps_native_size_and_labels_and_returns_float32_int64():
    image = _image(31, 47)
    mask = _label_grid(31, 47, [0, 5, 255])
    out_image, out_mask = eval_transform(image, mask, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert out_image.shape == (3, 31, 47) and out_image.dtype == torch.float32
    assert out_mask.dtype == torch.int64
    np.testing.assert_array_equal(out_mask.numpy(), mask)


def test_eval_transform_pads_with_mean_and_ignore_label():
    out_image, out_mask = EvalTransform(pad_to=(8, 10))(_image(5, 6), np.zeros((5, 6), dtype=np.uint8))
    assert out_image.shape == (3, 8, 10)
    assert (out_mask[5:] == 255).all() and (out_mask[:, 6:] == 255).all() and (out_mask[:5, :6] == 0).all()
    assert torch.count_nonzero(out_image[:, 5:]) == 0


def test_train_transform_function_form_matches_the_class_and_needs_a_generator():
    image, mask = _image(40, 40), _label_grid(40, 40, [0, 1])
    a = train_transform(image, mask, rng=np.random.default_rng(1), crop_size=(33, 33))
    b = TrainTransform(crop_size=(33, 33))(image, mask, np.random.default_rng(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        TrainTransform()(image, mask, None)


def test_transform_rejects_mismatched_mask_with_shapes_in_message():
    with pytest.raises(ValueError, match=r"\(10, 10\)"):
        EvalTransform()(_image(10, 10), np.zeros((9, 10), dtype=np.uint8))


# -- PASCAL VOC -----------------------------------------------------------------------------


def test_voc_reads_palette_png_indices_as_labels(tmp_path):
    _make_voc(tmp_path, labels=[0, 15, 255])
    ds = build_dataset("voc", root=tmp_path, split="train")
    assert len(ds) == 3 and ds.num_classes == 21 and ds.class_names[15] == "person"
    image, mask = ds.load(1)
    assert image.shape == (12, 16, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(mask, _label_grid(12, 16, [0, 15, 255]))
    x, y = ds[1]
    assert x.shape == (3, 12, 16) and y.dtype == torch.int64
    assert len(build_dataset("voc", root=tmp_path / "VOCdevkit" / "VOC2012", split="val")) == 1


def test_voc_train_aug_uses_sbd_masks_and_explains_what_is_missing(tmp_path):
    voc = _make_voc(tmp_path)
    with pytest.raises(DatasetError, match="SegmentationClassAug"):
        build_dataset("voc", root=voc, split="train_aug")
    stem = "2007_000001"
    _save_mask(voc / "SegmentationClassAug" / f"{stem}.png", _label_grid(12, 16, [0, 7]))
    # DrSleep's list format: image and mask paths on one line.
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        f"/JPEGImages/{stem}.jpg /SegmentationClassAug/{stem}.png\n"
    )
    ds = build_dataset("voc", root=voc, split="trainaug")
    assert ds.files[0][1] == voc / "SegmentationClassAug" / f"{stem}.png"
    assert set(np.unique(ds.load(0)[1])) == {0, 7}


def test_voc_unknown_split_names_the_missing_list(tmp_path):
    voc = _make_voc(tmp_path)
    with pytest.raises(DatasetError, match="test.txt"):
        build_dataset("voc", root=voc, split="test")


# -- Cityscapes -----------------------------------------------------------------------------


def _make_cityscapes(root: Path, label_ids: list[int]) -> Path:
    for k, city in enumerate(["aachen", "bremen"]):
        stem = f"{city}_000000_000019"
        _save_image(root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png", _image(8, 12, k))
        _save_mask(root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png", _label_grid(8, 12, label_ids))
    return root


def test_cityscapes_maps_label_ids_to_the_19_train_ids(tmp_path):
    ds = build_dataset("cityscapes", root=_make_cityscapes(tmp_path, [7, 26, 0, 33, 24, 4]), split="train")
    assert len(ds) == 2 and ds.num_classes == 19
    _, mask = ds.load(0)
    # road 7 -> 0, car 26 -> 13, unlabeled 0 -> 255, bicycle 33 -> 18, person 24 -> 11, static 4 -> 255
    np.testing.assert_array_equal(mask, _label_grid(8, 12, [0, 13, 255, 18, 11, 255]))
    assert ds.class_names[13] == "car"


def test_cityscapes_rejects_values_that_are_not_label_ids(tmp_path):
    ds = build_dataset("cityscapes", root=_make_cityscapes(tmp_path, [7, 40]), split="train")
    with pytest.raises(DatasetError, match=r"aachen_000000_000019_gtFine_labelIds\.png.*40.*labelIds"):
        ds.load(0)


# -- ADE20K ---------------------------------------------------------------------------------


def _make_ade(root: Path, values: list[int]) -> Path:
    base = root / "ADEChallengeData2016"
    for k in range(2):
        stem = f"ADE_train_{k:08d}"
        _save_image(base / "images" / "training" / f"{stem}.jpg", _image(10, 10, k))
        _save_mask(base / "annotations" / "training" / f"{stem}.png", _label_grid(10, 10, values))
    return root


def test_ade20k_ignores_zero_and_shifts_labels_down_by_one(tmp_path):
    ds = build_dataset("ade20k", root=_make_ade(tmp_path, [0, 1, 150]), split="train")
    assert len(ds) == 2 and ds.num_classes == 150 and ds.class_names[0] == "wall"
    np.testing.assert_array_equal(ds.load(1)[1], _label_grid(10, 10, [255, 0, 149]))


def test_ade20k_rejects_label_above_150(tmp_path):
    ds = build_dataset("ade20k", root=_make_ade(tmp_path, [1, 151]), split="training")
    with pytest.raises(DatasetError, match=r"ADE_train_00000000\.png.*151"):
        ds.load(0)


# -- CamVid ---------------------------------------------------------------------------------


def _make_camvid(root: Path, values: list[int]) -> Path:
    lines = []
    for k in range(2):
        name = f"0001TP_{k:06d}.png"
        _save_image(root / "train" / name, _image(9, 12, k))
        _save_mask(root / "trainannot" / name, _label_grid(9, 12, values))
        # SegNet's lists hold absolute paths from SegNet's own machine.
        lines.append(f"/SegNet/CamVid/train/{name} /SegNet/CamVid/trainannot/{name}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def test_camvid_resolves_segnet_paths_and_ignores_label_11(tmp_path):
    ds = build_dataset("camvid", root=_make_camvid(tmp_path, [0, 10, 11]), split="train")
    assert len(ds) == 2 and ds.num_classes == 11 and ds.class_names[10] == "Bicyclist"
    assert ds.files[0] == (tmp_path / "train" / "0001TP_000000.png", tmp_path / "trainannot" / "0001TP_000000.png")
    np.testing.assert_array_equal(ds.load(0)[1], _label_grid(9, 12, [0, 10, 255]))


def test_camvid_rejects_label_12(tmp_path):
    ds = build_dataset("camvid", root=_make_camvid(tmp_path, [0, 12]), split="train")
    with pytest.raises(DatasetError, match=r"0001TP_000000\.png.*12"):
        ds.load(0)


@pytest.mark.skipif(not (SHARED_DATA / "camvid").is_dir(), reason=f"shared CamVid copy not found at {SHARED_DATA / 'camvid'}")
def test_shared_camvid_loads_in_segnet_layout():
    root = SHARED_DATA / "camvid"
    train = build_dataset("camvid", root=root, split="train")
    val = build_dataset("camvid", root=root, split="val")
    assert len(train) == 367 and len(val) == 101  # SegNet's split
    for ds in (train, val):
        image, mask = ds.load(0)
        assert image.shape == (360, 480, 3) and mask.shape == (360, 480)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(11)) | {255} and len(values) > 3


# -- generic folder -------------------------------------------------------------------------


def _make_folder(root: Path, *, n: int = 3, values: list[int] = (0, 1, 2)) -> Path:
    for k in range(n):
        _save_image(root / "images" / f"img{k}.jpg", _image(10, 14, k))
        _save_mask(root / "masks" / f"img{k}.png", _label_grid(10, 14, list(values)))
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    return root


def test_folder_pairs_images_and_masks_by_stem_with_classes_txt(tmp_path):
    ds = build_dataset("folder", root=_make_folder(tmp_path), split="all")
    assert len(ds) == 3 and ds.class_names == ("background", "cat", "dog")
    assert ds.files[2] == (tmp_path / "images" / "img2.jpg", tmp_path / "masks" / "img2.png")
    np.testing.assert_array_equal(ds.load(0)[1], _label_grid(10, 14, [0, 1, 2]))


def test_folder_split_file_selects_stems_train_is_its_complement_and_a_missing_split_explains_the_fix(tmp_path):
    root = _make_folder(tmp_path)
    (root / "splits").mkdir()
    (root / "splits" / "val.txt").write_text("img2\nimg0.jpg\n")
    ds = build_dataset("folder", root=root, split="val")
    assert [f[0].name for f in ds.files] == ["img2.jpg", "img0.jpg"]
    assert [f[0].name for f in build_dataset("folder", root=root, split="train").files] == ["img1.jpg"]
    with pytest.raises(DatasetError, match=r"test\.txt.*--split all"):
        build_dataset("folder", root=root, split="test")


def test_folder_reads_colour_masks_through_palette_txt(tmp_path):
    root = tmp_path
    colors = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    labels = _label_grid(6, 9, [0, 1, 2])
    rgb = np.array(colors, dtype=np.uint8)[labels]
    rgb[0, 0] = (255, 255, 255)  # the void colour, listed after the class colours
    _save_image(root / "images" / "a.png", _image(6, 9))
    _save_image(root / "masks" / "a.png", rgb)
    (root / "classes.txt").write_text("bg\nred\ngreen\n")
    (root / "palette.txt").write_text("0 0 0\n255,0,0\n0 255 0\n255 255 255\n")
    ds = build_dataset("folder", root=root, split="all")
    expected = labels.copy()
    expected[0, 0] = 255
    np.testing.assert_array_equal(ds.load(0)[1], expected)


def test_folder_rejects_colours_missing_from_the_palette(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[1, 1] = (9, 8, 7)
    _save_image(tmp_path / "images" / "a.png", _image(4, 4))
    _save_image(tmp_path / "masks" / "a.png", rgb)
    ds = build_dataset("folder", root=tmp_path, split="all", palette="voc")
    with pytest.raises(DatasetError, match=r"a\.png.*\(9, 8, 7\).*palette"):
        ds.load(0)


def test_folder_loads_suffix_named_pairs_sharing_one_folder(tmp_path):
    labels = _label_grid(8, 8, [0, 12, 255])
    _save_image(tmp_path / "5_image.png", _image(8, 8))
    _save_image(tmp_path / "5_target.png", np.asarray(colorize(labels, PALETTES["voc"]).convert("RGB")))
    ds = build_dataset(
        "folder", root=tmp_path, split="all", image_dir=".", mask_dir=".",
        image_suffix="_image.png", mask_suffix="_target.png", palette="voc",
    )  # fmt: skip
    assert len(ds) == 1 and ds.class_names[12] == "dog"
    np.testing.assert_array_equal(ds.load(0)[1], labels)


@pytest.mark.skipif(
    not (SHARED_DATA / "voc-samples").is_dir(), reason=f"shared VOC samples not found at {SHARED_DATA / 'voc-samples'}"
)
def test_shared_voc_samples_load_as_a_folder_dataset_with_the_voc_palette():
    ds = build_dataset(
        "folder", root=SHARED_DATA / "voc-samples", split="all", image_dir=".", mask_dir=".",
        image_suffix="_image.png", mask_suffix="_target.png", palette="voc",
    )  # fmt: skip
    assert [f[0].name for f in ds.files] == ["1_image.png", "114_image.png", "23_image.png"]
    # Each target shows one object class (aeroplane, bird, sheep) on background with void edges.
    for i, cls in enumerate([1, 3, 17]):
        _, mask = ds.load(i)
        assert set(np.unique(mask).tolist()) == {0, cls, 255}
    assert ds.validate() == []


# -- bad input ------------------------------------------------------------------------------


def test_corrupt_image_error_names_the_file(tmp_path):
    root = _make_folder(tmp_path)
    (root / "images" / "img1.jpg").write_bytes(b"definitely not a jpeg")
    ds = build_dataset("folder", root=root, split="all")
    with pytest.raises(DatasetError, match=r"img1\.jpg.*cannot decode image.*--skip-bad"):
        ds.load(1)


def test_truncated_image_error_names_the_file(tmp_path):
    root = _make_folder(tmp_path)
    path = root / "masks" / "img0.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = build_dataset("folder", root=root, split="all")
    with pytest.raises(DatasetError, match=r"img0\.png.*cannot decode mask"):
        ds.load(0)


def test_missing_mask_error_names_the_expected_path(tmp_path):
    root = _make_folder(tmp_path)
    (root / "masks" / "img2.png").unlink()
    ds = build_dataset("folder", root=root, split="all")
    with pytest.raises(DatasetError, match=r"masks/img2\.png: mask file not found"):
        ds.load(2)


def test_mask_size_mismatch_error_gives_both_sizes(tmp_path):
    root = _make_folder(tmp_path)
    _save_mask(root / "masks" / "img0.png", np.zeros((9, 14), dtype=np.uint8))
    ds = build_dataset("folder", root=root, split="all")
    with pytest.raises(DatasetError, match=r"img0\.png: mask size 14x9 .*img0\.jpg 14x10"):
        ds.load(0)


def test_label_outside_the_classes_error_names_file_and_value(tmp_path):
    _make_voc(tmp_path, labels=[0, 21, 30])
    ds = build_dataset("voc", root=tmp_path, split="train")
    with pytest.raises(DatasetError, match=r"2007_000000\.png: label value\(s\) 21, 30 .*21 classes"):
        ds.load(0)


def test_empty_split_is_an_error_naming_the_list(tmp_path):
    voc = _make_voc(tmp_path)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(DatasetError, match=r"val\.txt: the split is empty"):
        build_dataset("voc", root=voc, split="val")


def test_skip_bad_warns_counts_and_falls_back_to_the_next_good_sample(tmp_path):
    root = _make_folder(tmp_path)
    (root / "images" / "img1.jpg").write_bytes(b"garbage")
    ds = build_dataset("folder", root=root, split="all", skip_bad=True, transform=EvalTransform())
    with pytest.warns(UserWarning, match=r"img1\.jpg"):
        x, _ = ds[1]
    torch.testing.assert_close(x, ds[2][0])  # deterministic substitute: the next index
    assert ds.bad_count == 1
    assert [p.name for p, _ in ds.bad_files] == ["img1.jpg"]


def test_validate_scans_everything_and_raises_or_reports(tmp_path):
    root = _make_folder(tmp_path)
    (root / "images" / "img1.jpg").write_bytes(b"garbage")
    (root / "masks" / "img2.png").unlink()
    with pytest.raises(DatasetError, match=r"(?s)2 of 3 samples are bad.*img1\.jpg.*img2\.png"):
        build_dataset("folder", root=root, split="all").validate()
    lenient = build_dataset("folder", root=root, split="all", skip_bad=True)
    with pytest.warns(UserWarning):
        problems = lenient.validate()
    assert [p.name for p, _ in problems] == ["img1.jpg", "img2.jpg"]
    assert lenient.bad_count == 2
    torch.testing.assert_close(lenient[1][0], lenient[0][0])  # wraps around to the only good sample


def test_build_dataset_names_unknown_datasets_and_the_choices():
    with pytest.raises(ValueError, match=r"'pascal'.*'ade20k'.*'voc'"):
        build_dataset("pascal", root=".", split="train")
    with pytest.raises(ValueError, match="root"):
        build_dataset("voc", split="train")
    assert set(DATASETS) == {"voc", "cityscapes", "ade20k", "camvid", "folder", "classified-tiles", "synthetic"}


# -- seeding --------------------------------------------------------------------------------


def test_sample_is_a_pure_function_of_seed_epoch_and_index(tmp_path):
    root = _make_voc(tmp_path)
    t = TrainTransform(crop_size=(9, 9), scale_step=0)

    def sample(seed, epoch, index):
        ds = build_dataset("voc", root=root, split="train", transform=t, seed=seed)
        ds.set_epoch(epoch)
        return ds[index]

    a, b = sample(0, 3, 1), sample(0, 3, 1)  # a fresh dataset, as after resuming
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], sample(0, 4, 1)[0])  # the epoch changes the augmentation
    assert not torch.equal(a[0], sample(1, 3, 1)[0])  # so does the seed


# -- synthetic ------------------------------------------------------------------------------


def test_synthetic_is_deterministic_by_seed_and_index_with_disjoint_splits():
    a, b = SyntheticShapes(seed=0), SyntheticShapes(seed=0)
    for i in (0, 17):
        np.testing.assert_array_equal(a.load(i)[0], b.load(i)[0])
        np.testing.assert_array_equal(a.load(i)[1], b.load(i)[1])
    assert not np.array_equal(a.load(0)[0], SyntheticShapes(seed=1).load(0)[0])
    assert not np.array_equal(a.load(0)[0], SyntheticShapes(seed=0, split="val").load(0)[0])
    assert (len(a), len(SyntheticShapes(split="val"))) == (2000, 200)


def test_synthetic_samples_have_declared_size_dtype_and_all_classes():
    ds = SyntheticShapes(image_size=(96, 112), length=60)
    k = ds.num_classes
    assert k == 5
    counts = np.zeros(k, dtype=np.int64)
    for i in range(len(ds)):
        image, mask = ds.load(i)
        assert image.shape == (96, 112, 3) and image.dtype == np.uint8 and mask.shape == (96, 112)
        counts += np.bincount(mask.ravel(), minlength=k)[:k]
        assert mask.max() < k
    assert (counts > 0).all()
    x, y = build_dataset("synthetic", split="val", length=3)[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64


def _pixels(ds: SyntheticShapes, indices: range) -> tuple[np.ndarray, np.ndarray]:
    images, masks = zip(*(ds.load(i) for i in indices))
    return np.concatenate([im.reshape(-1, 3) for im in images]), np.concatenate([m.ravel() for m in masks])


def test_synthetic_colour_is_no_shortcut_to_the_class():
    ds = SyntheticShapes(length=200)
    colors, labels = _pixels(ds, range(0, 120))
    test_colors, test_labels = _pixels(ds, range(120, 200))
    shapes = test_labels > 0
    # Nearest class-mean colour, the simplest per-pixel colour classifier.
    k = ds.num_classes
    means = np.stack([colors[labels == c].mean(0) for c in range(k)])
    dist = ((test_colors[shapes, None, :].astype(np.float64) - means[None]) ** 2).sum(-1)
    nearest_mean_accuracy = (dist.argmin(1) == test_labels[shapes]).mean()
    # The best per-pixel colour rule among the four shape classes: Bayes on an 8x8x8 colour histogram.
    bins = lambda c: (c[:, 0] // 32) * 64 + (c[:, 1] // 32) * 8 + c[:, 2] // 32  # noqa: E731
    hist = np.zeros((512, k))
    np.add.at(hist, (bins(colors[labels > 0]), labels[labels > 0]), 1)
    bayes_accuracy = (hist[bins(test_colors[shapes])].argmax(1) == test_labels[shapes]).mean()
    # Always answering the most common shape is the no-information baseline (about 0.3);
    # a colour shortcut would push either classifier far above it.
    majority = np.bincount(test_labels[shapes]).max() / shapes.sum()
    assert nearest_mean_accuracy < majority + 0.05, (nearest_mean_accuracy, majority)
    assert bayes_accuracy < majority + 0.05, (bayes_accuracy, majority)


def test_synthetic_preset_class_weights_are_sqrt_median_frequency_of_the_train_split():
    from deeplab.training.config import SYNTHETIC_TRAIN

    ds = SyntheticShapes(split="train", length=400)  # the first 400 of the 2000 training images
    counts = sum(np.bincount(ds.load(i)[1].ravel(), minlength=5) for i in range(len(ds)))
    freq = counts / counts.sum()
    expected = np.sqrt(np.median(freq) / freq)
    np.testing.assert_allclose(SYNTHETIC_TRAIN.class_weights, expected, atol=0.03)
    assert 0.6 < freq[0] < 0.75 and (freq[1:] > 0.05).all()  # background dominates; no shape class is rare


def test_folder_label_map_reads_black_and_white_binary_masks(tmp_path):
    _save_image(tmp_path / "image" / "0.png", _image(6, 6)[..., 0])  # greyscale image, read as RGB
    _save_mask(tmp_path / "label" / "0.png", _label_grid(6, 6, [0, 255]))
    ds = build_dataset(
        "folder", root=tmp_path, split="all", image_dir="image", mask_dir="label",
        classes=("membrane", "cell"), label_map={0: 0, 255: 1},
    )  # fmt: skip
    image, mask = ds.load(0)
    assert image.shape == (6, 6, 3)
    np.testing.assert_array_equal(mask, _label_grid(6, 6, [0, 1]))
    # A stored value the map does not list is an error that points at label_map.
    _save_mask(tmp_path / "label" / "0.png", _label_grid(6, 6, [0, 128]))
    with pytest.raises(DatasetError, match=r"0\.png: label value\(s\) 128 .*--label-map"):
        ds.load(0)
