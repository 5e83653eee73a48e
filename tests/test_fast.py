"""The inference fast path (deeplab.fast): same outputs as the plain model, less work."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deeplab import ModelConfig, build_model, optimize_for_inference
from deeplab.fast import TapSkippingConv2d, fold_conv_bn


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.6)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def test_fold_conv_bn_by_hand():
    # One input channel, one output channel, a 1x1 kernel: every number can be checked on paper.
    conv = nn.Conv2d(1, 1, 1, bias=False)
    conv.weight.data.fill_(2.0)
    bn = nn.BatchNorm2d(1, eps=0.0)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    bn.weight.data.fill_(3.0)
    bn.bias.data.fill_(0.5)
    fused = fold_conv_bn(conv, bn)
    # bn(conv(x)) = (2x - 1) / 2 * 3 + 0.5 = 3x - 1
    assert fused.weight.item() == pytest.approx(3.0)
    assert fused.bias.item() == pytest.approx(-1.0)
    x = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]]])
    assert torch.allclose(fused(x), torch.tensor([[[[-1.0, 2.0], [5.0, -4.0]]]]))


@pytest.mark.parametrize(
    "backbone, decoder, separable",
    [("resnet101", True, False), ("resnet50_beta", False, False), ("xception65", True, True),
     ("mobilenet_v2", False, False), ("mobilenet_v2", True, True)],
)
def test_fast_path_equals_plain_model(backbone, decoder, separable):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, num_classes=5, decoder=decoder, separable=separable, output_stride=16)
    model = _randomise_bn(build_model(cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules()), "a BatchNorm was left unfolded"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the original model changed"
    x = torch.randn(1, 3, 97, 129)
    with torch.no_grad():
        ref, out = model(x), fast(x)
    assert out.shape == ref.shape
    # Folding reassociates products: equal up to float rounding, relative to the logits' range.
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_padding_only_taps_cost_nothing_and_change_nothing():
    # Output stride 16 on a 161x161 input: an 11x11 map, so ASPP's rates 12 and 18 read only padding off-centre.
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilenet_v2", num_classes=3, output_stride=16, atrous_rates=(6, 12, 18))
    model = _randomise_bn(build_model(cfg))
    x = torch.randn(1, 3, 161, 161)
    plain = optimize_for_inference(model, skip_taps=False)
    fast = optimize_for_inference(model)
    assert all(isinstance(fast.aspp.branches[k].conv, TapSkippingConv2d) for k in (1, 2, 3))
    with torch.no_grad(), FlopCounterMode(display=False) as slow_count:
        ref = plain(x)
    with torch.no_grad(), FlopCounterMode(display=False) as fast_count:
        out = fast(x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    # Rates 12 and 18 drop 8 of their 9 taps on the 11x11 map, rate 6 none: 2 * 8 * (320 -> 256) per pixel saved.
    saved = 2 * 8 * 320 * 256 * 11 * 11 * 2
    assert slow_count.get_total_flops() - fast_count.get_total_flops() == saved


@pytest.mark.parametrize("size, dilation", [((33, 33), (6, 6)), ((33, 33), (18, 18)), ((7, 40), (12, 4)), ((5, 5), (6, 6))])
def test_shifted_depthwise_equals_conv(size, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=dilation, dilation=dilation, groups=16, bias=True)
    skip = TapSkippingConv2d(16, 16, 3, padding=dilation, dilation=dilation, groups=16, bias=True)
    skip.load_state_dict(conv.state_dict())
    x = torch.randn(2, 16, *size).contiguous(memory_format=torch.channels_last)
    out = skip(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, conv(x.contiguous()), atol=1e-5)


def test_tap_skipping_conv_matches_conv_on_thin_maps():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=5, dilation=5, bias=True)
    skip = TapSkippingConv2d(4, 6, 3, padding=5, dilation=5, bias=True)
    skip.load_state_dict(conv.state_dict())
    for h, w in [(5, 9), (9, 5), (3, 3), (6, 6)]:  # rows only, columns only, both, neither
        x = torch.randn(2, 4, h, w)
        assert torch.allclose(skip(x), conv(x), atol=1e-6)
