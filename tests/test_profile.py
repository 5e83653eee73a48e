"""Multiply-add counts against the DeepLabv3+ paper's tables (numbers no one here produced) and by hand."""

from __future__ import annotations

import json

import pytest
from torch import nn

from deeplab import ModelConfig
from deeplab.cli import main
from deeplab.models.profile import PAPER_MULTIPLY_ADDS, layer_costs, profile_model

# (backbone, output stride, decoder, separable) -> billions of multiply-adds at 513x513, 21 classes.
# ResNet-101: DeepLabv3+ paper Table 3. Xception-65: Table 5. Written out here, not imported, so a typo in the
# library's copy cannot make the test agree with itself.
PAPER = {
    ("resnet101_beta", 16, False, False): 81.02,
    ("resnet101_beta", 8, False, False): 276.18,
    ("resnet101_beta", 16, True, False): 101.28,
    ("resnet101_beta", 8, True, False): 297.92,
    ("resnet101_beta", 32, False, False): 52.43,
    ("resnet101_beta", 32, True, False): 74.20,
    ("xception65", 16, False, False): 68.00,
    ("xception65", 16, True, False): 89.76,
    ("xception65", 16, True, True): 54.17,
}


@pytest.mark.parametrize("key", sorted(PAPER))
def test_paper_convention_reproduces_the_papers_multiply_adds_within_2_percent(key):
    backbone, os_, decoder, separable = key
    prof, _ = profile_model(
        ModelConfig(backbone=backbone, output_stride=os_, decoder=decoder, separable=separable, num_classes=21)
    )
    assert prof.multiply_adds_paper / 1e9 == pytest.approx(PAPER[key], rel=0.02)
    assert PAPER_MULTIPLY_ADDS[key] == PAPER[key]
    # The padded (paper) count is never below the nominal one, and the effective one never above it.
    assert prof.multiply_adds_effective <= prof.multiply_adds <= prof.multiply_adds_paper


def test_conv_counts_by_hand():
    # 3x3 conv 4 -> 8 channels, rate 2, padding 2 on a 5x5 map: nominal 5*5*8*4*9 = 7200 MACs.
    conv = nn.Conv2d(4, 8, 3, padding=2, dilation=2, bias=False)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), conv)
    (c1, c2) = layer_costs(model, size=(5, 5))
    assert c1.multiply_adds == 5 * 5 * 4 * 3
    assert c2.multiply_adds == 7200
    # Paper convention: the 5x5 map padded to a multiple of the rate, 6x6.
    assert c2.multiply_adds_paper == 6 * 6 * 8 * 4 * 9
    # Effective: per dimension the taps at offsets -2, 0, +2 read inside the map for 3, 5, 3 outputs = 11 of 15.
    assert c2.multiply_adds_effective == 11 * 11 * 8 * 4


def test_effective_count_sees_only_the_centre_tap_when_the_rate_exceeds_the_map():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(4, 4, 3, padding=6, dilation=6, bias=False))
    _, c = layer_costs(model, size=(5, 5))
    assert c.multiply_adds == 5 * 5 * 4 * 4 * 9
    assert c.multiply_adds_effective == 5 * 5 * 4 * 4  # the 1x1 it equals


def test_profile_runs_on_the_meta_device_without_weights():
    prof, costs = profile_model(ModelConfig(backbone="mobilenet_v2", output_stride=16, num_classes=21))
    assert prof.params > 0 and prof.multiply_adds > 0 and costs
    assert prof.paper_reference is None


def test_cli_profile_json(capsys):
    assert main(["profile", "--backbone", "xception65", "--output-stride", "16", "--separable", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"params", "multiply_adds", "multiply_adds_paper"} <= set(out)
    assert out["multiply_adds_paper"] / 1e9 == pytest.approx(54.17, rel=0.02)
    assert main(["profile", "--backbone", "resnet101_beta", "--no-decoder", "--output-stride", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["multiply_adds_paper"] / 1e9 == pytest.approx(276.18, rel=0.02)


def test_cli_profile_paper_table(capsys):
    assert main(["profile", "--paper"]) == 0
    text = capsys.readouterr().out
    assert "81.02 B" in text and "54.17 B" in text and text.count("%") >= 9


def test_cli_rejects_unknown_backbone(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--backbone", "vgg17"])
    assert "invalid choice" in capsys.readouterr().err


def test_profile_counts_batch_and_linear_layers():
    model = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.Flatten(), nn.Linear(2 * 4 * 4, 10))
    costs = layer_costs(model, size=(4, 4), batch=2)
    assert costs[0].multiply_adds == 2 * 4 * 4 * 2 * 3
    assert costs[1].kind == "linear" and costs[1].multiply_adds == 2 * 32 * 10
