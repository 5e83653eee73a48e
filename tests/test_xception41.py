"""Xception-41: TF DeepLab's `xception_41` (Xception-65's entry and exit flows, 8 middle-flow modules instead of 16).

Shapes at odd sizes for every output stride and decoder, and a real forward/backward, come from the
parametrisations over `BACKBONES` in tests/test_models.py; this file pins what is particular to the 41.
"""

from __future__ import annotations

import pytest
import torch
from test_fast import (
    _randomise_bn,  # shared with the fast path's tests (pytest puts tests/ on sys.path)
)
from torch import nn

from deeplab import CheckpointError, ModelConfig, build_model
from deeplab.convert.torch_weights import backbone_state_dict
from deeplab.deploy.fast import optimize_for_inference
from deeplab.models.backbones import BACKBONES


def _meta_backbone(name: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return BACKBONES[name](**kw)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _hand_count_aligned_xception(middle_flow_modules: int) -> int:
    """Parameters of TF's aligned Xception written out from the architecture (TF `core/xception.py`, DeepLabv3+
    Fig. 4): conv weights have no bias, every BN has a scale and an offset (2 per channel)."""

    def separable(c_in: int, c_out: int) -> int:  # depthwise 3x3 + BN, pointwise 1x1 + BN
        return c_in * 9 + 2 * c_in + c_in * c_out + 2 * c_out

    def module(c_in: int, depths: tuple[int, int, int], shortcut_conv: bool) -> int:
        total = separable(c_in, depths[0]) + separable(depths[0], depths[1]) + separable(depths[1], depths[2])
        return total + (c_in * depths[2] + 2 * depths[2] if shortcut_conv else 0)

    stem = 3 * 32 * 9 + 2 * 32 + 32 * 64 * 9 + 2 * 64  # entry_flow/conv1_1 (3x3, 32), conv1_2 (3x3, 64)
    entry = module(64, (128,) * 3, True) + module(128, (256,) * 3, True) + module(256, (728,) * 3, True)
    middle = middle_flow_modules * module(728, (728,) * 3, False)
    exit_ = module(728, (728, 1024, 1024), True) + module(1024, (1536, 1536, 2048), False)
    return stem + entry + middle + exit_


def test_xception41_parameter_count_matches_the_architecture_and_timms_model_card():
    by_hand = _hand_count_aligned_xception(8)
    assert by_hand == 24_920_560
    assert _count(_meta_backbone("xception41")) == by_hand
    # timm's model card for xception41.tf_in1k (TF DeepLab's ImageNet weights) states "Params (M): 27.0", counting
    # its 2048 -> 1000 classifier, which DeepLab drops; likewise xception65.tf_in1k "Params (M): 39.9".
    fc = 2048 * 1000 + 1000
    assert round((by_hand + fc) / 1e6, 1) == 27.0
    assert round((_hand_count_aligned_xception(16) + fc) / 1e6, 1) == 39.9
    assert _count(_meta_backbone("xception65")) == _hand_count_aligned_xception(16)


def _rates(backbone):
    return [[c.depthwise.conv.dilation[0] for c in blk.convs] for blk in backbone.blocks]


def _strides(backbone):
    return [blk.convs[2].depthwise.conv.stride[0] for blk in backbone.blocks]


def test_xception41_is_xception65_with_eight_middle_flow_modules():
    b41, b65 = _meta_backbone("xception41"), _meta_backbone("xception65")
    assert len(b41.blocks) == 3 + 8 + 2
    assert all(blk.skip == "sum" for blk in b41.blocks[3:11])
    assert [blk.skip for blk in b41.blocks[11:]] == ["conv", "none"]
    # Entry flow and exit flow hold the same tensors as Xception-65's, module for module.
    shapes = lambda blk: [tuple(v.shape) for v in blk.state_dict().values()]  # noqa: E731
    for i41, i65 in [(0, 0), (1, 1), (2, 2), (3, 3), (11, 19), (12, 20)]:
        assert shapes(b41.blocks[i41]) == shapes(b65.blocks[i65])
    # TF's decoder end point is entry_flow/block2 for both, 256 channels at stride 4.
    assert b41.low_level_index == 1 and b41.channels == {"low_level": 256, "out": 2048}
    assert [blk.relu_inside for c in b41.blocks for blk in c.convs] == [False] * 36 + [True] * 3


@pytest.mark.parametrize(
    "output_stride,strides,middle_rate,exit_rates",
    [
        (32, [2, 2, 2] + [1] * 8 + [2, 1], 1, ([1, 1, 1], [1, 1, 1])),
        (16, [2, 2, 2] + [1] * 8 + [1, 1], 1, ([1, 1, 1], [2, 2, 2])),
        (8, [2, 2, 1] + [1] * 8 + [1, 1], 2, ([2, 2, 2], [4, 4, 4])),
    ],
)
def test_xception41_strides_and_dilations_at_each_output_stride(output_stride, strides, middle_rate, exit_rates):
    # TF's stack_blocks_dense, worked by hand: the stem has stride 2, the entry flow reaches 16; the module whose
    # stride is removed keeps the previous rate, the modules after it run at rate * that stride.
    b = _meta_backbone("xception41", output_stride=output_stride)
    assert _strides(b) == strides
    rates = _rates(b)
    assert rates[:2] == [[1, 1, 1]] * 2 and rates[3:11] == [[middle_rate] * 3] * 8
    assert tuple(rates[11:]) == exit_rates
    grid = _meta_backbone("xception41", output_stride=16, multi_grid=(1, 2, 4))
    assert _rates(grid)[12] == [2, 4, 8]


def test_xception41_fast_path_equals_plain_model():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="xception41", num_classes=5, decoder=True, separable=True, output_stride=16)
    model = _randomise_bn(build_model(cfg))
    fast = optimize_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        ref, out = model(x), fast(x)
    assert out.shape == ref.shape == (1, 5, 65, 97)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_xception41_trains_with_one_image_per_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="xception41", num_classes=3, output_stride=16)).train()
    y = model(torch.randn(1, 3, 33, 45))
    assert y.shape == (1, 3, 33, 45)
    y.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.backbone.blocks[5].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def _timm_xception_layout(*, middle_flow_modules: int = 8) -> dict[str, tuple[int, ...]]:
    """timm `xception41` / `xception65` (xception_aligned.py): stem.{0,1}.conv/bn,
    blocks.N.stack.convK.conv_dw/bn_dw/conv_pw/bn_pw,
    blocks.N.shortcut.conv/bn where channels or stride change, head.fc."""
    lay: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            lay[prefix + name] = (c,)
        lay[prefix + "num_batches_tracked"] = ()

    lay["stem.0.conv.weight"] = (32, 3, 3, 3)
    bn("stem.0.bn.", 32)
    lay["stem.1.conv.weight"] = (64, 32, 3, 3)
    bn("stem.1.bn.", 64)
    blocks = [(64, (128,) * 3, True), (128, (256,) * 3, True), (256, (728,) * 3, True)]
    blocks += [(728, (728,) * 3, False)] * middle_flow_modules
    blocks += [(728, (728, 1024, 1024), True), (1024, (1536, 1536, 2048), False)]
    for i, (c_in, outs, shortcut) in enumerate(blocks):
        c = c_in
        for k, o in enumerate(outs, 1):
            p = f"blocks.{i}.stack.conv{k}."
            lay[p + "conv_dw.weight"] = (c, 1, 3, 3)
            bn(p + "bn_dw.", c)
            lay[p + "conv_pw.weight"] = (o, c, 1, 1)
            bn(p + "bn_pw.", o)
            c = o
        if shortcut:
            lay[f"blocks.{i}.shortcut.conv.weight"] = (outs[-1], c_in, 1, 1)
            bn(f"blocks.{i}.shortcut.bn.", outs[-1])
    lay["head.fc.weight"] = (1000, 2048)
    lay["head.fc.bias"] = (1000,)
    return lay


def test_timm_xception41_file_fills_every_key_of_ours():
    layout = _timm_xception_layout()
    state = {k: torch.zeros(()).expand(s) if s else torch.zeros((), dtype=torch.long) for k, s in layout.items()}
    sd = backbone_state_dict(state, backbone="xception41")
    ours = _meta_backbone("xception41").state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert len(sd) == len(state) - 2  # all but head.fc.weight / head.fc.bias
    assert sd["blocks.12.convs.2.pointwise.bn.weight"] is state["blocks.12.stack.conv3.bn_pw.weight"]
    assert sd["blocks.7.convs.1.depthwise.conv.weight"] is state["blocks.7.stack.conv2.conv_dw.weight"]



def test_timm_xception65_file_given_as_xception41_names_the_right_backbone():
    layout = _timm_xception_layout(middle_flow_modules=16)
    state = {k: torch.zeros(()).expand(s) if s else torch.zeros((), dtype=torch.long) for k, s in layout.items()}
    assert backbone_state_dict(state, backbone="xception65").keys() == _meta_backbone("xception65").state_dict().keys()
    with pytest.raises(CheckpointError, match=r"looks like xception65 \(21 Xception modules\), not xception41; pass"):
        backbone_state_dict(state, backbone="xception41")
