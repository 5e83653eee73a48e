"""Metrics against numbers worked out by hand (in the comments), not by the code under test."""

from __future__ import annotations

import json
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deeplab.inference.metrics import (
    MetricAccumulator,
    boundary_band,
    confusion_matrix,
    segmentation_scores,
    trimap_confusion,
)

V = 255  # the void / ignore label

# 3 x 4 labels, 3 classes, two void pixels that the prediction labels anyway.
TARGET = torch.tensor([
    [0, 0, 1, 1],
    [0, V, 1, 2],
    [2, 2, V, 2],
])
PRED = torch.tensor([
    [0, 1, 1, 1],
    [0, 2, 1, 2],
    [2, 0, 1, 2],
])
# (gt, pred) pairs, row by row, void skipped:
#   (0,0) (0,1) (1,1) (1,1) | (0,0) (1,1) (2,2) | (2,2) (2,0) (2,2)
# gt 0: pred 0 twice, pred 1 once; gt 1: pred 1 three times; gt 2: pred 2 three times, pred 0 once.
CONF = [
    [2, 1, 0],
    [0, 3, 0],
    [1, 0, 3],
]


def close(x: float | None, frac: Fraction) -> bool:
    return x is not None and abs(x - float(frac)) < 1e-12


# --------------------------------------------------------------------------- confusion matrix

def test_confusion_matrix_matches_hand_count_rows_gt_columns_pred():
    conf = confusion_matrix(PRED, TARGET, num_classes=3)
    assert conf.dtype == torch.int64
    assert conf.tolist() == CONF


def test_scores_of_hand_made_example_are_the_hand_computed_fractions():
    s = segmentation_scores(torch.tensor(CONF), class_names=["bg", "cat", "dog"])
    # IoU = TP / (gt + pred - TP); gt = row sums (3, 3, 4), pred = column sums (3, 4, 3).
    iou = {"bg": Fraction(2, 3 + 3 - 2), "cat": Fraction(3, 3 + 4 - 3), "dog": Fraction(3, 4 + 3 - 3)}
    assert iou == {"bg": Fraction(1, 2), "cat": Fraction(3, 4), "dog": Fraction(3, 4)}
    for name, frac in iou.items():
        assert close(s["per_class_iou"][name], frac)
    assert close(s["miou"], Fraction(2, 3))  # (1/2 + 3/4 + 3/4) / 3
    assert close(s["pixel_accuracy"], Fraction(8, 10))  # 2 + 3 + 3 correct of 10 counted
    assert close(s["mean_accuracy"], Fraction(29, 36))  # (2/3 + 3/3 + 3/4) / 3
    # gt frequencies 3/10, 3/10, 4/10 weight the IoUs: 3/20 + 9/40 + 3/10 = 27/40.
    assert close(s["fw_iou"], Fraction(27, 40))
    assert close(s["per_class_accuracy"]["dog"], Fraction(3, 4))
    assert s["num_pixels"] == 10 and isinstance(s["num_pixels"], int)


def test_ignore_pixels_never_count_even_when_predicted():
    # Change what is predicted on the two void pixels: the matrix must not move.
    pred = PRED.clone()
    pred[1, 1] = 0
    pred[2, 2] = 0
    assert confusion_matrix(pred, TARGET, num_classes=3).tolist() == CONF
    # An image that is all void counts nothing at all.
    all_void = torch.full((2, 3), V)
    assert confusion_matrix(torch.zeros(2, 3, dtype=torch.long), all_void,
                            num_classes=3).sum().item() == 0


def test_custom_ignore_index_is_honoured():
    target = TARGET.masked_fill(TARGET == V, -1)
    assert confusion_matrix(PRED, target, num_classes=3, ignore_index=-1).tolist() == CONF


def test_any_batch_shape_gives_the_same_counts():
    batch = torch.stack([TARGET, TARGET]).unsqueeze(1)  # (2, 1, 3, 4)
    pred = torch.stack([PRED, PRED]).unsqueeze(1)
    conf = confusion_matrix(pred, batch, num_classes=3)
    assert conf.tolist() == [[2 * v for v in row] for row in CONF]


def test_class_absent_from_gt_and_prediction_is_left_out_and_predicted_only_class_counts_zero():
    target = torch.tensor([[0, 0], [1, 1]])
    pred = torch.tensor([[0, 4], [1, 1]])
    s = segmentation_scores(confusion_matrix(pred, target, num_classes=5))
    iou = s["per_class_iou"]
    assert close(iou["0"], Fraction(1, 2))  # TP 1, gt 2, pred 1 -> 1 / 2
    assert close(iou["1"], Fraction(1))
    assert iou["2"] is None and iou["3"] is None  # never seen: left out of the mean
    assert iou["4"] == 0.0  # predicted once, never in gt: IoU 0, and it counts
    assert close(s["miou"], Fraction(1, 2))  # (1/2 + 1 + 0) / 3, not / 5
    assert close(s["mean_accuracy"], Fraction(3, 4))  # (1/2 + 1) / 2: gt classes only
    assert s["per_class_accuracy"]["4"] is None


def test_scores_are_strict_json_with_none_instead_of_nan():
    s = segmentation_scores(torch.zeros(3, 3, dtype=torch.int64))
    assert s["miou"] is None and s["pixel_accuracy"] is None and s["fw_iou"] is None
    text = json.dumps(s, allow_nan=False)
    assert json.loads(text)["per_class_iou"] == {"0": None, "1": None, "2": None}
    s = segmentation_scores(torch.tensor(CONF))
    assert all(type(v) is float for v in s["per_class_iou"].values())
    json.dumps(s, allow_nan=False)


def test_out_of_range_target_raises_naming_the_value_and_the_fix():
    target = TARGET.clone()
    target[0, 0] = 7
    with pytest.raises(ValueError, match=r"target holds value\(s\) 7 .*ignore_index=255"):
        confusion_matrix(PRED, target, num_classes=3)
    target[0, 0] = -3
    with pytest.raises(ValueError, match="-3"):
        confusion_matrix(PRED, target, num_classes=3)


def test_out_of_range_prediction_raises_but_is_ignored_on_void_pixels():
    pred = PRED.clone()
    pred[1, 1] = 9  # on a void pixel: irrelevant
    assert confusion_matrix(pred, TARGET, num_classes=3).tolist() == CONF
    pred[0, 0] = 9
    with pytest.raises(ValueError, match=r"pred holds value\(s\) 9"):
        confusion_matrix(pred, TARGET, num_classes=3)


def test_shape_mismatch_and_logits_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match=r"\(3, 4\).*argmax"):
        confusion_matrix(PRED[:, :3], TARGET, num_classes=3)
    with pytest.raises(TypeError, match="argmax"):
        confusion_matrix(PRED.float(), TARGET, num_classes=3)


def test_class_names_must_match_the_matrix():
    with pytest.raises(ValueError, match="2 class_names"):
        segmentation_scores(torch.tensor(CONF), class_names=["a", "b"])
    with pytest.raises(ValueError, match="repeat"):
        segmentation_scores(torch.tensor(CONF), class_names=["a", "b", "a"])


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_confusion_matrix_equals_a_pixel_by_pixel_count(data):
    k = data.draw(st.integers(1, 4))
    h = data.draw(st.integers(1, 5))
    w = data.draw(st.integers(1, 5))
    t = data.draw(st.lists(st.sampled_from([*range(k), V]), min_size=h * w, max_size=h * w))
    p = data.draw(st.lists(st.integers(0, k - 1), min_size=h * w, max_size=h * w))
    expected = [[0] * k for _ in range(k)]
    for gt, pr in zip(t, p):
        if gt != V:
            expected[gt][pr] += 1
    conf = confusion_matrix(torch.tensor(p).reshape(h, w), torch.tensor(t).reshape(h, w),
                            num_classes=k)
    assert conf.tolist() == expected


# --------------------------------------------------------------------------- trimap band

# 9 x 9 background with a 3 x 3 object (label 1) at rows 3-5, columns 3-5.
SQUARE = torch.zeros(9, 9, dtype=torch.long)
SQUARE[3:6, 3:6] = 1

# Width 0: pixels with a 4-neighbour of another label; both sides of the edge, not the
# object's centre (4, 4), not the diagonal corners (2, 2) etc. (no 4-neighbour differs).
BAND0 = [
    "000000000",
    "000000000",
    "000111000",
    "001111100",
    "001101100",
    "001111100",
    "000111000",
    "000000000",
    "000000000",
]
# Width 1: within Chebyshev distance 1 of BAND0 (the centre now included).
BAND1 = [
    "000000000",
    "001111100",
    "011111110",
    "011111110",
    "011111110",
    "011111110",
    "011111110",
    "001111100",
    "000000000",
]
# Width 2: (0, 0) is at distance 3 from the nearest boundary pixel (2, 3); (0, 1) at 2.
BAND2 = [
    "011111110",
    "111111111",
    "111111111",
    "111111111",
    "111111111",
    "111111111",
    "111111111",
    "111111111",
    "011111110",
]


def as_mask(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r] for r in rows])


@pytest.mark.parametrize("width,rows", [(0, BAND0), (1, BAND1), (2, BAND2)])
def test_band_around_a_square_matches_the_hand_drawn_band(width, rows):
    band = boundary_band(SQUARE, width=width)
    assert band.dtype == torch.bool
    assert torch.equal(band, as_mask(rows))


def test_void_pixels_are_boundaries_and_grow_the_band():
    target = torch.zeros(5, 5, dtype=torch.long)
    target[2, 2] = V
    # The void pixel and its four neighbours (whose label differs from it) are boundaries.
    plus = ["00000", "00100", "01110", "00100", "00000"]
    assert torch.equal(boundary_band(target, width=0), as_mask(plus))
    square = ["01110", "11111", "11111", "11111", "01110"]
    assert torch.equal(boundary_band(target, width=1), as_mask(square))


def test_voc_style_void_outline_alone_makes_the_band():
    # VOC draws void between object and background; no two real labels ever touch.
    target = torch.zeros(7, 7, dtype=torch.long)
    target[1:6, 1:6] = V
    target[2:5, 2:5] = 1
    # The ring, pixels 4-adjacent to it on both sides; not the image corners (diagonal
    # only) nor the object's centre (all neighbours are object).
    expected = [
        "0111110",
        "1111111",
        "1111111",
        "1110111",
        "1111111",
        "1111111",
        "0111110",
    ]
    assert torch.equal(boundary_band(target, width=0), as_mask(expected))


def test_uniform_mask_has_no_band_the_image_border_is_not_a_boundary():
    assert not boundary_band(torch.full((6, 7), 3), width=4).any()


def test_band_does_not_leak_between_images_of_a_batch():
    batch = torch.stack([SQUARE, torch.zeros(9, 9, dtype=torch.long)])  # (2, 9, 9)
    band = boundary_band(batch, width=2)
    assert torch.equal(band[0], as_mask(BAND2))
    assert not band[1].any()


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_band_equals_brute_force_chebyshev_distance(data):
    h = data.draw(st.integers(1, 7))
    w = data.draw(st.integers(1, 7))
    width = data.draw(st.integers(0, 4))
    labels = data.draw(st.lists(st.sampled_from([0, 1, 2, V]), min_size=h * w, max_size=h * w))
    t = np.array(labels).reshape(h, w)
    boundary = t == V
    for i in range(h):
        for j in range(w):
            for di, dj in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                a, b = i + di, j + dj
                if 0 <= a < h and 0 <= b < w and t[a, b] != t[i, j]:
                    boundary[i, j] = True
    expected = np.zeros((h, w), dtype=bool)
    for i, j in zip(*np.nonzero(boundary)):
        expected[max(0, i - width):i + width + 1, max(0, j - width):j + width + 1] = True
    got = boundary_band(torch.from_numpy(t), width=width).numpy()
    assert (got == expected).all()


def square_prediction() -> torch.Tensor:
    # The object predicted one column too wide (column 6, on the boundary), plus one far
    # false positive at (0, 0) that lies outside the width-0 and width-1 bands.
    pred = SQUARE.clone()
    pred[3:6, 6] = 1
    pred[0, 0] = 1
    return pred


def test_trimap_confusion_counts_only_band_pixels():
    bands = trimap_confusion(square_prediction(), SQUARE, num_classes=2, widths=[0, 1])
    assert list(bands) == [0, 1]
    # Width 0: 20 band pixels, 8 object (all but the centre) + 12 background, of which the
    # 3 pixels of column 6 are predicted as object.
    assert bands[0].tolist() == [[9, 3], [0, 8]]
    # Width 1: 45 band pixels, all 9 object pixels + 36 background, the same 3 errors.
    assert bands[1].tolist() == [[33, 3], [0, 9]]
    # Whole image for contrast: 72 background (4 wrong: column 6 and (0, 0)) + 9 object.
    assert confusion_matrix(square_prediction(), SQUARE, num_classes=2).tolist() == [[68, 4], [0, 9]]


def test_trimap_ignores_void_pixels_inside_the_band():
    target = SQUARE.clone()
    target[4, 8] = V  # a void pixel: it widens the band but must itself never count
    pred = square_prediction()
    pred[4, 8] = 1
    conf = trimap_confusion(pred, target, num_classes=2, widths=[1])[1]
    band = boundary_band(target, width=1)
    assert band[4, 8] and conf.sum().item() == int((band & (target != V)).sum())
    assert conf[0, 1].item() == 3  # the void pixel's "error" is not among the false positives


def test_trimap_rejects_bad_widths():
    with pytest.raises(ValueError, match="-1"):
        trimap_confusion(SQUARE, SQUARE, num_classes=2, widths=[-1])
    with pytest.raises(ValueError, match="repeat"):
        trimap_confusion(SQUARE, SQUARE, num_classes=2, widths=[2, 2])


# --------------------------------------------------------------------------- accumulator

def test_accumulator_trimap_miou_is_the_hand_computed_value():
    acc = MetricAccumulator(num_classes=2, trimap_widths=(0, 1))
    acc.update(square_prediction(), SQUARE)
    out = acc.compute(class_names=["background", "object"])
    # Width 0: IoU bg 9 / (12 + 12 - 9) = 3/4, object 8 / (8 + 11 - 8) = 8/11.
    assert close(out["trimap"][0], (Fraction(3, 4) + Fraction(8, 11)) / 2)  # 65/88
    # Width 1: IoU bg 33 / 36 = 11/12, object 9 / 12 = 3/4 -> 5/6.
    assert close(out["trimap"][1], Fraction(5, 6))
    # Whole image: bg 68 / 72 = 17/18, object 9 / 13.
    assert close(out["miou"], (Fraction(17, 18) + Fraction(9, 13)) / 2)
    assert close(out["per_class_iou"]["object"], Fraction(9, 13))
    json.dumps(out, allow_nan=False)


def random_batches(seed: int, sizes: list[int], k: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        target = torch.randint(0, k, (n, 11, 13), generator=g)
        target[torch.rand(n, 11, 13, generator=g) < 0.1] = V
        pred = torch.randint(0, k, (n, 11, 13), generator=g)
        out.append((pred, target))
    return out


def test_streaming_batches_equals_one_big_confusion_matrix():
    batches = random_batches(0, [1, 3, 2, 2])
    acc = MetricAccumulator(num_classes=4, trimap_widths=(1, 3))
    for pred, target in batches:
        acc.update(pred, target)
    pred_all = torch.cat([p for p, _ in batches])
    target_all = torch.cat([t for _, t in batches])
    assert torch.equal(acc.confusion, confusion_matrix(pred_all, target_all, num_classes=4))
    whole = trimap_confusion(pred_all, target_all, num_classes=4, widths=(1, 3))
    assert torch.equal(acc.trimap[1], whole[1]) and torch.equal(acc.trimap[3], whole[3])
    assert acc.compute()["num_pixels"] == int((target_all != V).sum())


def test_merging_two_accumulators_equals_one_that_saw_everything():
    batches = random_batches(1, [2, 1, 3])
    whole = MetricAccumulator(num_classes=4, trimap_widths=(2,))
    left = MetricAccumulator(num_classes=4, trimap_widths=(2,))
    right = MetricAccumulator(num_classes=4, trimap_widths=(2,))
    for i, (pred, target) in enumerate(batches):
        whole.update(pred, target)
        (left if i == 0 else right).update(pred, target)
    assert left.merge(right) is left
    assert torch.equal(left.confusion, whole.confusion)
    assert torch.equal(left.trimap[2], whole.trimap[2])
    assert left.compute() == whole.compute()


def test_merge_refuses_accumulators_with_different_settings():
    with pytest.raises(ValueError, match="same settings"):
        MetricAccumulator(num_classes=4).merge(MetricAccumulator(num_classes=5))


def test_all_reduce_without_a_process_group_leaves_counts_unchanged():
    acc = MetricAccumulator(num_classes=3, trimap_widths=(1,))
    acc.update(PRED, TARGET)
    before = acc.confusion.clone(), acc.trimap[1].clone()
    acc.all_reduce()
    assert torch.equal(acc.confusion, before[0]) and torch.equal(acc.trimap[1], before[1])


def _all_reduce_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        acc = MetricAccumulator(num_classes=4, trimap_widths=(1,))
        pred, target = random_batches(10 + rank, [2])[0]
        acc.update(pred, target)
        acc.all_reduce()
        if rank == 0:
            torch.save({"confusion": acc.confusion, "trimap": acc.trimap[1]}, result_file)
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_counts_across_processes(tmp_path):
    import torch.multiprocessing as mp

    result = tmp_path / "result.pt"
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(result)), nprocs=2)
    got = torch.load(result)
    expected = MetricAccumulator(num_classes=4, trimap_widths=(1,))
    for rank in range(2):
        expected.update(*random_batches(10 + rank, [2])[0])
    assert torch.equal(got["confusion"], expected.confusion)
    assert torch.equal(got["trimap"], expected.trimap[1])


# --------------------------------------------------------------------------- plots

def _is_png(path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    from deeplab.inference.plots import (
        plot_confusion_matrix,
        plot_per_class_iou,
        plot_trimap,
    )

    names = ["bg", "cat", "dog"]
    out = plot_confusion_matrix(torch.tensor(CONF), class_names=names, path=tmp_path / "conf.png")
    assert out == tmp_path / "conf.png" and _is_png(out)

    scores = segmentation_scores(torch.tensor(CONF), class_names=names)
    per_class = {**scores["per_class_iou"], "absent": None}
    assert _is_png(plot_per_class_iou(per_class, path=tmp_path / "iou.png", sort=True))

    curves = {"os16": {0: 0.55, 2: 0.6, 5: 0.66, 10: 0.7}, "os8": {"0": 0.58, "2": 0.63, "5": None}}
    assert _is_png(plot_trimap(curves, path=tmp_path / "sub" / "trimap.png"))


def test_plots_without_matplotlib_say_how_to_install_it(tmp_path, monkeypatch):
    from deeplab.inference.plots import plot_trimap

    # A None entry in sys.modules makes "import matplotlib..." raise ImportError.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'deeplab\[plots\]'"):
        plot_trimap({"a": {1: 0.5}}, path=tmp_path / "x.png")
