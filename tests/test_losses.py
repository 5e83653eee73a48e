"""`--loss ce | focal | dice | ce+dice | lovasz` and `--class-weights auto`, against values worked out by hand or by an
independent formula in the test (the Lovasz extension evaluated from its definition over the set function, not from
the cumulative-sum gradient the library uses)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deeplab.data.report import median_frequency_weights
from deeplab.training.config import SYNTHETIC_CLASS_WEIGHTS, TrainConfig
from deeplab.training.losses import (
    dice_loss,
    lovasz_softmax_loss,
    pixel_loss,
    step_losses,
)

IGNORE = 255


def _logits(rows: list[list[float]]) -> torch.Tensor:
    """(1, K, 1, P) logits from P rows of K values."""
    return torch.tensor(rows, dtype=torch.float32).t()[None, :, None, :]


def test_focal_loss_is_lin_et_al_with_gamma_2_by_hand():
    # Pixel 1: p(class 0) = 4 / (4 + 1) = 0.8, labelled 0; pixel 2: p = 0.5, labelled 1; pixel 3 ignored.
    logits = _logits([[math.log(4.0), 0.0], [0.0, 0.0], [5.0, -5.0]])
    target = torch.tensor([[[0, 1, IGNORE]]])
    total, count = pixel_loss(logits, target, loss="focal")
    by_hand = -(0.2 ** 2) * math.log(0.8) - (0.5 ** 2) * math.log(0.5)  # 0.0089257 + 0.1732868
    assert count == 2 and total.item() == pytest.approx(by_hand, rel=1e-6)
    weighted, _ = pixel_loss(logits, target, loss="focal", class_weights=torch.tensor([1.0, 3.0]))
    assert weighted.item() == pytest.approx(-(0.2 ** 2) * math.log(0.8) - 3 * (0.5 ** 2) * math.log(0.5), rel=1e-6)
    ce, _ = pixel_loss(logits, target, loss="ce")
    as_ce, _ = pixel_loss(logits, target, loss="focal", focal_gamma=0.0)
    assert as_ce.item() == pytest.approx(ce.item(), rel=1e-6) == pytest.approx(-math.log(0.8) - math.log(0.5))


def test_soft_dice_by_hand_leaves_out_ignored_pixels_and_absent_classes():
    # Three valid pixels, each p = (0.5, 0.5, ~0): labels 0, 0, 1. Class 0: 2 * 1.0 / (1.5 + 2) = 4/7; class 1:
    # 2 * 0.5 / (1.5 + 1) = 2/5; class 2 is in no label and is left out. Loss = mean(1 - 4/7, 1 - 2/5) = 18/35.
    logits = _logits([[0.0, 0.0, -40.0]] * 3 + [[9.0, -9.0, 3.0]])
    target = torch.tensor([[[0, 0, 1, IGNORE]]])
    assert dice_loss(logits, target).item() == pytest.approx(18 / 35, rel=1e-5)
    weighted = dice_loss(logits, target, class_weights=torch.tensor([1.0, 3.0, 7.0]))
    assert weighted.item() == pytest.approx((3 / 7 + 3 * 3 / 5) / 4, rel=1e-5)
    total, count = pixel_loss(logits, target, loss="dice")
    assert count == 3 and (total / count).item() == pytest.approx(18 / 35, rel=1e-5)
    both, _ = pixel_loss(logits, target, loss="ce+dice")
    assert (both / 3).item() == pytest.approx(math.log(2.0) + 18 / 35, rel=1e-5)  # ce of p = 0.5 is log 2


def _lovasz_by_definition(errors: np.ndarray, foreground: np.ndarray) -> float:
    """The Lovasz extension of the Jaccard set function Delta(M) = |M| / |F u M| (Berman et al., eq. 5 and 8), from its
    definition: errors sorted in decreasing order, each weighted by Delta's increment as its pixel joins M."""
    order = np.argsort(-errors, kind="stable")
    fg = set(np.flatnonzero(foreground).tolist())

    def delta(m: set[int]) -> float:
        return len(m) / len(fg | m) if (fg | m) else 0.0

    total, chosen, before = 0.0, set(), 0.0
    for i in order:
        chosen.add(int(i))
        now = delta(chosen)
        total += errors[i] * (now - before)
        before = now
    return total


def test_lovasz_softmax_matches_the_extension_evaluated_from_its_definition():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, :2] = IGNORE
    probs = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, 3).numpy().astype(np.float64)
    labels = target.reshape(-1).numpy()
    keep = labels != IGNORE
    per_class = []
    for c in range(3):
        fg = labels[keep] == c
        if fg.any():
            per_class.append(_lovasz_by_definition(np.abs(fg - probs[keep, c]), fg))
    assert lovasz_softmax_loss(logits, target).item() == pytest.approx(float(np.mean(per_class)), rel=1e-5)


def test_lovasz_of_a_hard_prediction_is_one_minus_the_iou_averaged_over_present_classes():
    pred = torch.tensor([[0, 0, 1, 1, 2, 2, 0, 1]])
    target = torch.tensor([[0, 1, 1, 1, 0, 2, IGNORE, IGNORE]])
    logits = F.one_hot(pred, 3).permute(0, 2, 1)[:, :, None, :].float() * 60.0  # (1, 3, 1, 8): softmax ~ one-hot
    # Valid pixels: pred 0,0,1,1,2,2 vs truth 0,1,1,1,0,2. IoU: class 0 1/3, class 1 2/3, class 2 1/2.
    expected = ((1 - 1 / 3) + (1 - 2 / 3) + (1 - 1 / 2)) / 3
    assert lovasz_softmax_loss(logits, target[:, None, :]).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("loss", ["ce", "focal", "dice", "ce+dice", "lovasz"])
def test_every_loss_ignores_the_ignore_label_whatever_its_logits(loss):
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 6, 6)
    target = torch.randint(0, 4, (2, 6, 6))
    target[:, :2] = IGNORE
    changed = logits.clone()
    changed[:, :, :2] = torch.randn(2, 4, 2, 6) * 50
    weights = torch.tensor([0.5, 1.0, 2.0, 1.5])
    a, n = pixel_loss(logits, target, loss=loss, class_weights=weights)
    b, m = pixel_loss(changed, target, loss=loss, class_weights=weights)
    assert n == m == 48 and a.item() == pytest.approx(b.item(), rel=1e-6)


@pytest.mark.parametrize("loss", ["ce", "focal", "dice", "ce+dice", "lovasz"])
def test_every_loss_is_computed_in_float32_from_bf16_logits(loss):
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 5, 5).to(torch.bfloat16)
    target = torch.randint(0, 3, (2, 5, 5))
    got, _ = pixel_loss(logits, target, loss=loss)
    expected, _ = pixel_loss(logits.float(), target, loss=loss)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("loss", ["focal", "dice", "ce+dice", "lovasz"])
def test_a_training_step_under_bf16_autocast_has_finite_gradients(loss):
    from deeplab import ModelConfig, build_model

    torch.manual_seed(3)
    model = build_model(ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.5, num_classes=3, separable=True,
                                    aspp_channels=16, decoder_channels=16, low_level_channels=8)).train()
    images, masks = torch.randn(2, 3, 33, 33), torch.randint(0, 3, (2, 33, 33))
    masks[0, :4] = IGNORE
    total, count, _, _ = step_losses(model, images, masks, amp="bf16", loss=loss, class_weights=torch.ones(3))
    (total / count).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(total) and grads and all(torch.isfinite(g).all() for g in grads)


def test_region_losses_refuse_hard_pixel_mining_by_flag():
    with pytest.raises(ValueError, match="--hard-pixel-fraction .* --loss lovasz"):
        TrainConfig(loss="lovasz", hard_pixel_fraction=0.25)
    with pytest.raises(ValueError, match="--loss tversky: choose one of ce, focal, dice, ce\\+dice, lovasz"):
        TrainConfig(loss="tversky")
    with pytest.raises(ValueError, match="--class-weights median: give one weight per class"):
        TrainConfig(class_weights="median")


def test_auto_class_weights_reproduce_the_readmes_isbi_weights_and_the_synthetic_preset():
    # README: membrane 22%, cell 78% -> --class-weights 1.5,0.8.
    assert [round(w, 1) for w in median_frequency_weights([0.22, 0.78])] == [1.5, 0.8]
    from deeplab.data import SyntheticShapes
    from deeplab.data.report import data_report

    ds = SyntheticShapes(split="train", length=400)  # the first 400 of the preset's 2000 training images
    report = data_report({"train": ds}, max_masks=None)
    np.testing.assert_allclose(median_frequency_weights(report["class_pixel_shares"]), SYNTHETIC_CLASS_WEIGHTS,
                               atol=0.03)
    assert median_frequency_weights([0.5, 0.0, 0.5])[1] == 0.0  # a class without pixels cannot be balanced


def test_class_weights_flag_takes_numbers_or_auto():
    from deeplab.cli import build_parser

    assert build_parser().parse_args(["train", "--class-weights", "auto"]).class_weights == "auto"
    assert build_parser().parse_args(["train", "--class-weights", "0.5,2"]).class_weights == (0.5, 2.0)
    assert build_parser().parse_args(["train", "--loss", "ce+dice"]).loss == "ce+dice"
