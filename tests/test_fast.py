"""The inference fast path (deeplab.deploy.fast): same outputs as the plain model, less work."""

from __future__ import annotations

import copy
import pickle
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deeplab import ModelConfig, build_model
from deeplab.deploy.fast import (
    FusedBottleneck,
    PackedConv2d,
    PooledProjectionASPP,
    TapSkippingConv2d,
    fold_conv_bn,
    optimize_for_inference,
    prepack_weights,
)


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
    [("resnet101", True, False), ("resnet50_beta", False, False), ("resnet50_beta", True, True),
     ("xception65", True, True), ("mobilenet_v2", False, False), ("mobilenet_v2", True, True),
     ("vgg16_bn", True, False), ("resnet34", True, False)],
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


def _conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    macs = []

    def count(conv, inputs, out):
        macs.append(out.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1])

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sum(macs)


def test_image_pooling_is_projected_once_per_image_not_at_every_position():
    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.5, num_classes=21, output_stride=8, atrous_rates=())
    torch.manual_seed(0)
    model = _randomise_bn(build_model(cfg))
    fast = optimize_for_inference(model, channels_last=False, prepacked_shapes=0)
    assert isinstance(fast.aspp, PooledProjectionASPP)
    x = torch.randn(2, 3, 257, 257)
    # 256 pooled channels x 256 outputs were projected at each of the 33x33 positions (per image); now once.
    assert _conv_macs(model, x) - _conv_macs(fast, x) == 2 * 256 * 256 * (33 * 33 - 1)
    with torch.no_grad():
        ref = model(x)
        assert float((fast(x) - ref).abs().max() / (ref.max() - ref.min())) < 1e-5


def test_an_observed_aspp_keeps_its_concatenation():
    """Hooks on the ASPP (a converted uint8 model rounds the concatenation as its file does) leave it literal."""
    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.25, num_classes=3, atrous_rates=(2,))
    model = build_model(cfg).eval()
    model.aspp.project.register_forward_pre_hook(lambda module, args: args)
    assert not isinstance(optimize_for_inference(model).aspp, PooledProjectionASPP)


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


# --- prepacked weights (PackedConv2d) ---------------------------------------------------------------------------

_CONV_CASES = [  # (in, out, kernel, stride, dilation, groups, map size)
    (32, 48, 1, 1, 1, 1, 17), (24, 16, 3, 1, 1, 1, 20), (16, 16, 3, 1, 4, 1, 9), (8, 24, 3, 2, 1, 1, 21),
    (32, 32, 3, 1, 1, 32, 13), (32, 32, 3, 1, 2, 32, 13), (40, 8, 1, 1, 1, 1, 1),
]


def _packed_pair(cin, cout, k, stride, dilation, groups, shapes=2):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, groups=groups)
    conv = conv.to(memory_format=torch.channels_last).requires_grad_(False)
    packed = copy.deepcopy(conv)
    assert prepack_weights(packed, shapes=shapes) == 1 and type(packed) is PackedConv2d
    return conv, packed


@pytest.mark.parametrize("cin, cout, k, stride, dilation, groups, hw", _CONV_CASES)
def test_prepacked_conv_equals_conv(cin, cout, k, stride, dilation, groups, hw):
    conv, packed = _packed_pair(cin, cout, k, stride, dilation, groups)
    x = torch.randn(2, cin, hw, hw + 3)  # NCHW: the prepacked path takes it channels_last, as F.conv2d does
    with torch.inference_mode():
        ref, out = conv(x), packed(x)
    assert len(packed._packed) == 1, "the prepacked path did not run"
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, rtol=0, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("k, groups", [(1, 1), (3, 1), (3, 16)])
def test_fused_activation_and_residual_equal_the_separate_ops_bit_for_bit(k, groups):
    # ReLU, ReLU6 (oneDNN's hardtanh 0..6) and a residual sum as post-ops of the prepacked conv: exactly what
    # the unfused conv followed by the separate ops gives, on the prepacked path and on the plain one.
    _, packed = _packed_pair(16, 16, k, 1, 1, groups)
    x = torch.randn(1, 16, 11, 13).contiguous(memory_format=torch.channels_last) * 4
    r = torch.randn(1, 16, 11, 13).contiguous(memory_format=torch.channels_last) * 4
    with torch.inference_mode():
        y = packed(x)
        expected = {
            ("relu", ()): (torch.relu(y), torch.relu(packed(x) + r)),
            ("hardtanh", (0.0, 6.0)): (y.clamp(0, 6), (packed(x) + r).clamp(0, 6)),
        }
        for (packed.activation, packed.activation_scalars), (ref, ref_residual) in expected.items():
            assert (ref == 0).any() and (ref_residual == 0).any(), "the activation must clip something"
            assert torch.equal(packed(x), ref)
            assert torch.equal(packed(x, residual=r), ref_residual)
            assert torch.equal(packed(x, residual=r[..., :: 1]), ref_residual)
        plain = copy.deepcopy(packed)
        plain.prepacked_shapes = 0
        conv = F.conv2d(x, plain.weight, plain.bias, 1, plain.padding, 1, groups)
        assert torch.equal(plain(x, residual=r), (conv + r).clamp(0, 6))


def test_fast_path_fuses_activations_but_not_into_the_low_level_tap():
    # The decoder reads the low-level feature before its ReLU (TF's end points): the convs producing it must not
    # apply one. Everything else that a ReLU follows directly carries it.
    for backbone in ("xception65", "resnet50_beta"):
        cfg = ModelConfig(backbone=backbone, num_classes=3, decoder=True, output_stride=16)
        model = _randomise_bn(build_model(cfg))
        fast = optimize_for_inference(model)
        x = torch.randn(1, 3, 65, 65)
        with torch.no_grad():
            ref, out = model.backbone(x)["low_level"], fast.backbone(x.contiguous(memory_format=torch.channels_last))
        assert (ref < 0).any() and torch.allclose(out["low_level"], ref, atol=1e-5 * ref.abs().max().item())
        if backbone == "xception65":
            tap_block = fast.backbone.blocks[fast.backbone.low_level_index]
            assert tap_block.convs[1].pointwise.conv.activation == "none" and tap_block.convs[2].relu_on_input
            assert tap_block.convs[0].pointwise.conv.activation == "relu" and not tap_block.convs[1].relu_on_input
            middle = fast.backbone.blocks[5]
            assert [c.relu_on_input for c in middle.convs] == [True, False, False]  # the first also feeds the sum
        else:
            units = list(fast.backbone.layer1)
            assert type(units[fast.backbone.low_level_unit]) is not FusedBottleneck
            assert sum(type(u) is FusedBottleneck for u in fast.backbone.modules()) == 3 + 4 + 6 + 3 - 1
    mnv2 = optimize_for_inference(build_model(ModelConfig(backbone="mobilenet_v2", num_classes=3)).eval())
    assert not any(type(m) is nn.ReLU6 for m in mnv2.modules()), "a ReLU6 after a conv was left unfused"
    xception = build_model(ModelConfig(backbone="xception65", num_classes=3)).eval()
    assert optimize_for_inference(xception, prepacked_shapes=0).backbone.blocks[5].convs[1].relu_on_input


def test_prepacked_conv_keeps_the_last_shapes_and_follows_weight_changes():
    conv, packed = _packed_pair(16, 16, 3, 1, 1, 1, shapes=2)
    xs = [torch.randn(1, 16, h, h).contiguous(memory_format=torch.channels_last) for h in (9, 10, 11)]
    with torch.no_grad():
        for x in xs + [xs[1]]:
            assert torch.allclose(packed(x), conv(x), atol=1e-5)
        assert [key[0][-1] for key in packed._packed] == [11, 10], "least recently used first, at most 2 shapes"
        # A weight changed in place (load_state_dict, an optimizer step) is packed again, not served stale.
        for m in (conv, packed):
            m.weight.mul_(-2.0)
        assert torch.allclose(packed(xs[2]), conv(xs[2]), atol=1e-5)
        assert len(packed._packed) == 2


def test_prepacked_conv_stands_aside_where_the_op_does_not_apply():
    conv, packed = _packed_pair(8, 8, 3, 1, 1, 1)
    x = torch.randn(1, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed(x).dtype == torch.bfloat16
    with torch.no_grad(), FlopCounterMode(display=False) as count:  # a dispatch mode sees a conv it can count
        packed(x)
    assert count.get_total_flops() == 2 * 8 * 8 * 9 * 12 * 12
    xg = x.clone().requires_grad_(True)
    packed(xg).sum().backward()  # gradients: a plain conv, differentiable
    assert xg.grad is not None
    assert not getattr(packed, "_packed", {}), "the prepacked path ran where it must not"


def test_fast_model_copies_and_pickles_without_its_packed_weights():
    cfg = ModelConfig(backbone="mobilenet_v2", num_classes=3, output_stride=16)
    fast = optimize_for_inference(build_model(cfg).eval(), prepacked_shapes=2)
    x = torch.randn(1, 3, 65, 65)
    with torch.inference_mode():
        ref = fast(x)
    convs = [m for m in fast.modules() if isinstance(m, PackedConv2d)]
    assert convs and all(m._packed for m in convs)
    for twin in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert not any(getattr(m, "_packed", None) for m in twin.modules())
        with torch.inference_mode():
            assert torch.equal(twin(x), ref)
    plain = optimize_for_inference(build_model(cfg).eval(), prepacked_shapes=0)
    assert not any(m.prepacked_shapes for m in plain.modules() if isinstance(m, PackedConv2d))
    with pytest.raises(ValueError, match="prepacked_shapes=-1"):
        optimize_for_inference(fast, prepacked_shapes=-1)


_FAULTS = """
import ctypes, resource, sys
from deeplab import retain_freed_memory
kept = retain_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)
before = faults()
p = libc.malloc(size); ctypes.memset(p, 1, size)
print(kept, faults() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="retain_freed_memory acts on glibc's malloc only")
def test_retain_freed_memory_stops_page_faults_on_reallocation():
    # In child processes: the setting is process-wide, and the test process should keep glibc's defaults.
    def run(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        kept, faults = out.stdout.split()
        return kept == "True", int(faults)

    kept, faults_kept = run("keep")
    _, faults_default = run("default")
    assert kept
    # 64 MiB is 16384 pages of 4 KiB: by default each is faulted in (and zeroed) again; kept, the heap reuses them.
    assert faults_default > 8000, f"glibc default: {faults_default} page faults (expected ~16384)"
    assert faults_kept < 1000, f"with retain_freed_memory: {faults_kept} page faults"
