"""The model family: shapes at odd sizes, stride/dilation wiring, ASPP rates, image pooling, the decoder contract."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from deeplab import ModelConfig, build_model, default_atrous_rates
from deeplab.models.backbones import BACKBONES, atrous_plan
from deeplab.models.backbones.xception import SeparableConv
from deeplab.models.heads import ASPP, ImagePooling

ALL_BACKBONES = sorted(BACKBONES)


def meta_model(**kw) -> nn.Module:
    with torch.device("meta"):
        return build_model(ModelConfig(**kw)).eval()


@pytest.mark.parametrize(
    "backbone,output_stride,decoder", list(itertools.product(ALL_BACKBONES, (8, 16, 32), (False, True)))
)
@pytest.mark.parametrize("size", [(65, 97), (513, 513)])
def test_every_configuration_returns_logits_at_input_size(backbone, output_stride, decoder, size):
    model = meta_model(backbone=backbone, output_stride=output_stride, decoder=decoder, num_classes=7)
    x = torch.empty(2, 3, *size, device="meta")
    feats = model.backbone(x)
    # The feature contract: stride-4 low-level and output-stride features with the declared channel counts.
    ceil = lambda n, s: -(-n // s)  # noqa: E731 - 'same' padding rounds up at every stride
    assert tuple(feats["low_level"].shape) == (2, model.backbone.channels["low_level"], ceil(size[0], 4), ceil(size[1], 4))
    assert tuple(feats["out"].shape) == (
        2, model.backbone.channels["out"], ceil(size[0], output_stride), ceil(size[1], output_stride)
    )
    assert tuple(model(x).shape) == (2, 7, *size)


# The VGG / DenseNet / ResNet-18/34/152 family trains at an odd size with every head in tests/test_family.py and with
# the separable head in tests/test_amp.py; one of each kind is enough here.
FAMILY_REPEATS = {"resnet34", "resnet152", "vgg11", "vgg13", "vgg16", "vgg19", "vgg13_bn", "vgg16_bn", "vgg19_bn",
                  "densenet161", "densenet169", "densenet201"}


@pytest.mark.parametrize("backbone", [b for b in ALL_BACKBONES if b not in FAMILY_REPEATS])
def test_real_forward_and_backward_at_odd_size(backbone):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, output_stride=16, decoder=True, num_classes=3, separable=True))
    model.train()
    x = torch.randn(2, 3, 65, 97)
    y = model(x)
    assert y.shape == (2, 3, 65, 97) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert model.backbone.channels and all(p.grad is not None for p in model.classifier.parameters())


def test_atrous_plan_follows_tf_stack_blocks_dense():
    # Hand-worked: strides [2, 2, 2] after a stride-4 stem. OS 8: the second unit's stride is removed and that unit
    # keeps rate 1 (the previous dilation); the third unit then runs at rate 2 with its stride removed too.
    assert atrous_plan([2, 2, 2], output_stride=32, current_stride=4) == [(2, 1), (2, 1), (2, 1)]
    assert atrous_plan([2, 2, 2], output_stride=16, current_stride=4) == [(2, 1), (2, 1), (1, 1)]
    assert atrous_plan([2, 2, 2], output_stride=8, current_stride=4) == [(2, 1), (1, 1), (1, 2)]
    with pytest.raises(ValueError, match="output_stride must be one of"):
        atrous_plan([2], output_stride=4, current_stride=4)


def _resnet_rates(model, layer):
    return [(u.conv2.stride[0], u.conv2.dilation[0]) for u in getattr(model.backbone, layer)]


def test_resnet_beta_dilations_at_each_output_stride():
    # TF resnet_v1_101_beta: the stride sits on each block's last unit; multi-grid (1, 2, 4) on block4.
    m16 = meta_model(backbone="resnet101_beta", output_stride=16)
    assert _resnet_rates(m16, "layer3")[-1] == (1, 1)  # the unit whose stride was removed keeps rate 1
    assert _resnet_rates(m16, "layer3")[:-1] == [(1, 1)] * 22
    assert _resnet_rates(m16, "layer4") == [(1, 2), (1, 4), (1, 8)]
    m8 = meta_model(backbone="resnet101_beta", output_stride=8)
    assert _resnet_rates(m8, "layer2") == [(1, 1), (1, 1), (1, 1), (1, 1)]
    assert _resnet_rates(m8, "layer3") == [(1, 2)] * 23
    assert _resnet_rates(m8, "layer4") == [(1, 4), (1, 8), (1, 16)]
    m32 = meta_model(backbone="resnet101_beta", output_stride=32)
    assert _resnet_rates(m32, "layer3")[-1] == (2, 1)
    assert _resnet_rates(m32, "layer4") == [(1, 1), (1, 2), (1, 4)]


def test_resnet_torchvision_layout_dilations():
    # torchvision: stride on the first unit, which keeps the previous dilation when the stride is removed.
    m16 = meta_model(backbone="resnet50", output_stride=16)
    assert _resnet_rates(m16, "layer3")[0] == (2, 1)
    assert _resnet_rates(m16, "layer4") == [(1, 1 * 1), (1, 2 * 2), (1, 2 * 4)]
    m8 = meta_model(backbone="resnet50", output_stride=8)
    assert _resnet_rates(m8, "layer3") == [(1, 1)] + [(1, 2)] * 5
    assert _resnet_rates(m8, "layer4") == [(1, 2 * 1), (1, 4 * 2), (1, 4 * 4)]
    # Multi-grid is configurable; (1, 1, 1) gives torchvision's replace_stride_with_dilation exactly.
    plain = meta_model(backbone="resnet50", output_stride=8, multi_grid=(1, 1, 1))
    assert _resnet_rates(plain, "layer4") == [(1, 2), (1, 4), (1, 4)]


def test_resnet_shortcuts_match_each_layout():
    beta = meta_model(backbone="resnet50_beta", output_stride=32).backbone
    assert [u.shortcut for u in beta.layer1] == ["conv", "identity", "subsample"]
    assert beta.layer1[2].downsample is None and beta.layer1[2].conv2.stride == (2, 2)
    assert [m.conv.kernel_size for m in list(beta.stem)[:3]] == [(3, 3)] * 3
    assert [m.conv.out_channels for m in list(beta.stem)[:3]] == [64, 64, 128]
    tv = meta_model(backbone="resnet50", output_stride=32).backbone
    assert tv.conv1.kernel_size == (7, 7)
    assert [u.shortcut for u in tv.layer2] == ["conv", "identity", "identity", "identity"]
    assert tv.layer2[0].conv2.stride == (2, 2)


def test_backbone_parameter_counts_match_torchvision():
    # torchvision's published parameter counts minus their classification heads (fc: 2048*1000+1000, ResNet-18/34
    # 512*1000+1000; MobileNetV2: classifier 1280*1000+1000 and the final 1x1 conv 320->1280 + BN, which DeepLab drops;
    # MobileNetV3: classifier Linear 960->1280 / 576->1024 and Linear ->1000; its last 1x1 conv is kept, as in
    # torchvision's DeepLabV3; VGG: classifier fc6 25088->4096, fc7 4096->4096, fc8 4096->1000 = 123,642,856;
    # DenseNet: Linear C->1000 on the final C channels).
    vgg_fc = 25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
    expected = {"resnet18": 11_689_512 - 513_000, "resnet34": 21_797_672 - 513_000, "resnet152": 60_192_808 - 2_049_000,
                "vgg11": 132_863_336 - vgg_fc, "vgg13": 133_047_848 - vgg_fc, "vgg16": 138_357_544 - vgg_fc,
                "vgg19": 143_667_240 - vgg_fc, "vgg11_bn": 132_868_840 - vgg_fc, "vgg13_bn": 133_053_736 - vgg_fc,
                "vgg16_bn": 138_365_992 - vgg_fc, "vgg19_bn": 143_678_248 - vgg_fc,
                "densenet121": 7_978_856 - 1025 * 1000, "densenet161": 28_681_000 - 2209 * 1000,
                "densenet169": 14_149_480 - 1665 * 1000, "densenet201": 20_013_928 - 1921 * 1000,
                "resnet50": 25_557_032 - 2_049_000, "resnet101": 44_549_160 - 2_049_000,
                "mobilenet_v2": 3_504_872 - 1_281_000 - 320 * 1280 - 2 * 1280,
                "mobilenet_v3_large": 5_483_032 - (960 * 1280 + 1280) - (1280 * 1000 + 1000),
                "mobilenet_v3_small": 2_542_856 - (576 * 1024 + 1024) - (1024 * 1000 + 1000)}
    for name, count in expected.items():
        backbone = meta_model(backbone=name).backbone
        assert sum(p.numel() for p in backbone.parameters()) == count, name


def test_mobilenet_v2_channels_follow_tf_depth_multiplier_rules():
    # Output channels of the 17 inverted residuals in the official dm=0.5 TFLite model (read off the file's
    # tensor shapes) and in the standard dm=1.0 network.
    official_dm05 = [8, 12, 12, 16, 16, 16, 32, 32, 32, 32, 48, 48, 48, 80, 80, 80, 160]
    official_expansions = [16, 48, 72, 72, 96, 96, 96, 192, 192, 192, 192, 288, 288, 288, 480, 480, 480]
    b = meta_model(backbone="mobilenet_v2", depth_multiplier=0.5).backbone
    assert b.stem.conv.out_channels == 16
    assert [blk.project.conv.out_channels for blk in b.blocks] == official_dm05
    assert [blk.hidden_channels for blk in b.blocks] == official_expansions
    b1 = meta_model(backbone="mobilenet_v2").backbone
    assert [b1.blocks[i].project.conv.out_channels for i in (0, 2, 5, 9, 12, 15, 16)] == [16, 24, 32, 64, 96, 160, 320]
    assert b1.channels == {"low_level": 144, "out": 320}


def test_mobilenet_v2_dilations_match_the_official_os8_model():
    # (stride, dilation) of every depthwise conv in deeplabv3_257_mv_gpu.tflite (output stride 8), read off the file.
    official = [(1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 1), (1, 1)] + [(1, 2)] * 7 + [(1, 4)] * 3
    b = meta_model(backbone="mobilenet_v2", depth_multiplier=0.5, output_stride=8).backbone
    assert [(blk.depthwise.conv.stride[0], blk.depthwise.conv.dilation[0]) for blk in b.blocks] == official


def _xception_rates(model):
    return [[c.depthwise.conv.dilation[0] for c in blk.convs] for blk in model.backbone.blocks]


def test_xception65_layout_and_dilations():
    m = meta_model(backbone="xception65", output_stride=16)
    blocks = m.backbone.blocks
    assert len(blocks) == 3 + 16 + 2
    assert [blk.convs[2].depthwise.conv.stride[0] for blk in blocks[:3]] == [2, 2, 2]
    assert [blk.convs[-1].pointwise.conv.out_channels for blk in blocks[:3]] == [128, 256, 728]
    assert all(blk.skip == "sum" for blk in blocks[3:19])
    assert blocks[19].convs[2].depthwise.conv.stride == (1, 1)  # exit flow's stride became a dilation
    assert _xception_rates(m)[19] == [1, 1, 1] and _xception_rates(m)[20] == [2, 2, 2]
    m8 = meta_model(backbone="xception65", output_stride=8)
    assert _xception_rates(m8)[2] == [1, 1, 1] and blocks[2].convs[2].depthwise.conv.stride == (2, 2)
    assert all(r == [2, 2, 2] for r in _xception_rates(m8)[3:20]) and _xception_rates(m8)[20] == [4, 4, 4]
    grid = meta_model(backbone="xception65", output_stride=16, multi_grid=(1, 2, 4))
    assert _xception_rates(grid)[20] == [2, 4, 8]


def test_xception71_entry_flow_and_low_level_tap():
    m = meta_model(backbone="xception71", output_stride=16)
    blocks = m.backbone.blocks
    assert len(blocks) == 5 + 16 + 2
    assert [blk.convs[2].depthwise.conv.stride[0] for blk in blocks[:5]] == [2, 1, 2, 1, 2]
    assert m.backbone.low_level_index == 2  # TF: entry_flow/block3/unit_1/.../separable_conv2_pointwise
    assert meta_model(backbone="xception65").backbone.low_level_index == 1  # entry_flow/block2


def test_xception_relu_placement_follows_the_tf_reference():
    # TF xception: ReLU *before* each separable conv (BN after depthwise and pointwise, no ReLU inside) except in the
    # last exit-flow module, which has BN + ReLU after both the depthwise and the pointwise conv.
    m = build_model(ModelConfig(backbone="xception65", num_classes=2))
    seps = [c for c in m.modules() if isinstance(c, SeparableConv)]
    assert len(seps) == 21 * 3
    for sep in seps[:-3]:
        assert not sep.relu_inside and list(sep.depthwise) == [sep.depthwise.conv, sep.depthwise.bn]
    for sep in seps[-3:]:
        assert sep.relu_inside and isinstance(sep.depthwise.act, nn.ReLU) and isinstance(sep.pointwise.act, nn.ReLU)
    # Behaviour, not just structure: a module with relu_inside=False ignores negative inputs entirely.
    sep = SeparableConv(4, 4, stride=1, dilation=1, relu_inside=False).eval()
    x = -torch.rand(1, 4, 5, 5)
    assert torch.allclose(sep(x), sep(torch.zeros_like(x)))


@pytest.mark.parametrize("output_stride,rates", [(8, (12, 24, 36)), (16, (6, 12, 18)), (32, (3, 6, 9))])
def test_aspp_rates_follow_the_output_stride(output_stride, rates):
    assert default_atrous_rates(output_stride) == rates
    m = meta_model(backbone="resnet50_beta", output_stride=output_stride)
    assert tuple(b.conv.dilation[0] for b in m.aspp.branches[1:]) == rates
    assert m.aspp.branches[0].conv.kernel_size == (1, 1)


def test_aspp_rates_override_and_only_1x1_branch():
    m = meta_model(backbone="mobilenet_v2", atrous_rates=())
    assert len(m.aspp.branches) == 1 and m.aspp.project.conv.in_channels == 2 * 256
    m = meta_model(backbone="resnet50", atrous_rates=(3, 5))
    assert tuple(b.conv.dilation[0] for b in m.aspp.branches[1:]) == (3, 5)
    no_pool = meta_model(backbone="resnet50", image_pooling=False)
    assert no_pool.aspp.pooling is None and no_pool.aspp.project.conv.in_channels == 4 * 256


def test_separable_aspp_and_decoder_are_depthwise_then_pointwise():
    m = meta_model(backbone="xception65", separable=True)
    for branch in list(m.aspp.branches[1:]) + list(m.decoder.fuse):
        dw, pw = branch.depthwise, branch.pointwise
        assert dw.conv.groups == dw.conv.in_channels and dw.conv.kernel_size == (3, 3)
        assert isinstance(dw.bn, nn.BatchNorm2d) and isinstance(dw.act, nn.ReLU)
        assert pw.conv.kernel_size == (1, 1) and isinstance(pw.bn, nn.BatchNorm2d) and isinstance(pw.act, nn.ReLU)
    assert [b.depthwise.conv.dilation[0] for b in m.aspp.branches[1:]] == [6, 12, 18]


def test_decoder_is_the_papers_best_configuration():
    m = meta_model(backbone="resnet101_beta", decoder=True, num_classes=21)
    d = m.decoder
    assert d.project.conv.kernel_size == (1, 1) and d.project.conv.out_channels == 48
    assert [c.conv.kernel_size for c in d.fuse] == [(3, 3), (3, 3)]
    assert [c.conv.out_channels for c in d.fuse] == [256, 256] and d.fuse[0].conv.in_channels == 256 + 48
    assert m.classifier.kernel_size == (1, 1) and m.classifier.out_channels == 21
    assert m.aspp.dropout.p == pytest.approx(0.1)
    assert meta_model(backbone="resnet101_beta", decoder=False).decoder is None


def test_logits_layer_starts_as_tf_does_small_normal_and_zero_bias():
    # TF DeepLab's get_branch_logits: weights_initializer=truncated_normal_initializer(stddev=0.01), biases zero.
    # A He-initialised 1x1 classifier instead starts at a loss of several nats (measured: 5.8 on the synthetic
    # default), and that costs the three-minute default run about 0.15 mIoU.
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.5, num_classes=5))
    w = model.classifier.weight
    assert w.abs().max() <= 0.02 and 0.007 < w.std() < 0.011  # truncation at 2 sigma: std 0.0088
    assert torch.count_nonzero(model.classifier.bias) == 0
    logits = model.train()(torch.randn(4, 3, 64, 64))
    loss = nn.functional.cross_entropy(logits, torch.randint(0, 5, (4, 64, 64)))
    assert abs(loss.item() - torch.log(torch.tensor(5.0)).item()) < 0.1


def test_image_pooling_trains_with_one_image_per_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.5, num_classes=3, decoder=False)).train()
    pool = model.aspp.pooling
    before = pool.bn.running_mean.clone()
    loss = model(torch.randn(1, 3, 65, 65)).logsumexp(1).mean()
    loss.backward()
    assert torch.isfinite(loss) and pool.conv.weight.grad is not None and pool.conv.weight.grad.abs().sum() > 0
    assert torch.equal(pool.bn.running_mean, before)  # batch of 1: running statistics neither used from nor updated
    model(torch.randn(2, 3, 65, 65))
    assert not torch.equal(pool.bn.running_mean, before)  # batch of 2: ordinary batch norm


def test_image_pooling_is_a_global_mean_broadcast():
    torch.manual_seed(0)
    pool = ImagePooling(4, 3).eval()
    x = torch.randn(2, 4, 5, 7)
    y = pool(x)
    assert y.shape == (2, 3, 5, 7)
    by_hand = torch.relu(pool.bn(pool.conv(x.mean(dim=(2, 3), keepdim=True))))
    assert torch.allclose(y, by_hand.expand(-1, -1, 5, 7))


def test_aspp_concatenates_pooling_first_as_tf_does():
    torch.manual_seed(0)
    aspp = ASPP(8, 4, rates=(2,), dropout=0.0).eval()
    x = torch.randn(1, 8, 9, 9)
    pooled, b0, b1 = aspp.pooling(x), aspp.branches[0](x), aspp.branches[1](x)
    assert torch.allclose(aspp(x), aspp.project(torch.cat([pooled, b0, b1], 1)), atol=1e-6)


def test_align_corners_is_a_model_option():
    torch.manual_seed(0)
    a = build_model(ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.5, num_classes=2, align_corners=True)).eval()
    b = build_model(ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.5, num_classes=2, align_corners=False)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert ya.shape == yb.shape == (1, 2, 65, 65) and not torch.allclose(ya, yb)


def test_output_stride_switch_keeps_weights_and_doubles_rates():
    torch.manual_seed(0)
    m16 = build_model(ModelConfig(backbone="resnet50_beta", output_stride=16, num_classes=3)).eval()
    m8 = m16.with_output_stride(8)
    assert m8.config.output_stride == 8 and m8.config.rates == (12, 24, 36)
    assert [b.conv.dilation[0] for b in m8.aspp.branches[1:]] == [12, 24, 36]
    assert all(torch.equal(a, b) for a, b in zip(m16.state_dict().values(), m8.state_dict().values()))
    assert not m8.training
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        assert m8(x).shape == m16(x).shape == (1, 3, 65, 65)


def test_bad_configurations_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match="unknown backbone 'resnet200'.*choose from"):
        build_model(ModelConfig(backbone="resnet200"))
    with pytest.raises(ValueError, match="output_stride must be one of"):
        ModelConfig(output_stride=4)
    with pytest.raises(ValueError, match="multi_grid needs 3"):
        build_model(ModelConfig(backbone="resnet50", multi_grid=(1, 2)))
    with pytest.raises(ValueError, match="depth_multiplier=0.5 applies to mobilenet_v2 and mobilenet_edgetpu only"):
        build_model(ModelConfig(backbone="resnet50", depth_multiplier=0.5))
    with pytest.raises(ValueError, match="class names"):
        build_model(ModelConfig(num_classes=3), class_names=["a", "b"])


@pytest.mark.parametrize(
    "backbone,extra,export_size,check_size",
    [
        ("mobilenet_v2", {"depth_multiplier": 0.5}, (65, 97), (129, 64)),
        ("mobilenet_v3_large", {}, (65, 97), (129, 64)),
        ("mobilenet_edgetpu", {}, (65, 97), (129, 64)),
        ("xception41", {"output_stride": 16}, (65, 65), (49, 81)),
        ("densenet121", {"output_stride": 8}, (65, 65), (49, 81)),  # stride-1 transition pools, rate 2
        ("vgg11_bn", {"output_stride": 8, "head": "v1-largefov"}, (65, 97), (129, 64)),
    ],
)
def test_onnx_export_with_dynamic_height_and_width(backbone, extra, export_size, check_size):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import io

    from test_fast import _randomise_bn

    torch.manual_seed(0)
    model = _randomise_bn(build_model(ModelConfig(backbone=backbone, num_classes=3, **extra))).eval()
    f = io.BytesIO()
    torch.onnx.export(
        model, (torch.randn(1, 3, *export_size),), f, input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}}, dynamo=False,
    )
    session = ort.InferenceSession(f.getvalue())
    for size in [export_size, check_size]:  # the second size was never seen at export
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == expected.shape
        assert abs(got - expected).max() <= 1e-4 * max(1.0, abs(expected).max())


@pytest.mark.parametrize("size,dilation", [((5, 7), 1), ((9, 6), 2), ((4, 4), 2), ((4, 5), 6), ((17, 17), 6)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_backward_equals_autograd_through_conv2d(size, dilation, channels_last):
    # The stride-1 depthwise 3x3 trains through its own backward (deeplab.models.layers._DepthwiseConv3x3); its gradients
    # must be torch's own, here in float64, including taps that only read padding (dilation >= the map size).
    from deeplab.models.layers import DepthwiseConv2d

    torch.manual_seed(0)
    c = 6
    conv = DepthwiseConv2d(c, c, 3, padding=dilation, dilation=dilation, groups=c, bias=True).double()
    x = torch.randn(3, c, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(3, c, *size, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = conv(x1)
    y.backward(g)
    ours = (x1.grad, conv.weight.grad.clone(), conv.bias.grad.clone())
    conv.zero_grad()
    ref_y = nn.functional.conv2d(x2, conv.weight, conv.bias, 1, dilation, dilation, c)
    ref_y.backward(g)
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours, (x2.grad, conv.weight.grad, conv.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Every dilated stride-1 depthwise 3x3 of a model uses it; the others stay plain convolutions.
    model = build_model(ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.5, separable=True))
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert all((type(m) is DepthwiseConv2d) == (m.stride == (1, 1) and m.dilation[0] > 1) for m in depthwise)
    assert sum(type(m) is DepthwiseConv2d for m in depthwise) == 3 + 3  # blocks 14-16 at rate 2; ASPP 6, 12, 18


@pytest.mark.parametrize("backbone, output_stride", [("resnet50", 16), ("resnet50_beta", 8)])
def test_recomputing_the_early_resnet_stages_keeps_gradients_and_statistics_and_keeps_less(backbone, output_stride):
    # Training recomputes the stem, layer1 and layer2 in the backward pass (deeplab.models.layers.recomputed): the
    # gradients, the BN running statistics (updated once, not twice) and the dropout draw must be those of the plain
    # model, and the tensors kept for the backward pass must be fewer.
    import copy

    torch.manual_seed(0)
    plain = build_model(ModelConfig(backbone=backbone, output_stride=output_stride, num_classes=5, separable=True,
                                    bn_momentum=0.1)).train()
    lean = copy.deepcopy(plain)
    lean.backbone.recompute = True
    x, y = torch.randn(2, 3, 49, 49), torch.randint(0, 5, (2, 49, 49))
    kept = {}
    for name, model in (("plain", plain), ("lean", lean)):
        storages = {}
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t, storages=storages, weights=weights):
            if t.untyped_storage().data_ptr() not in weights:  # activations only
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        torch.manual_seed(3)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        kept[name] = sum(storages.values())
    assert kept["lean"] < 0.8 * kept["plain"], kept  # 24% and 31% fewer bytes here; about 40% at 512x512
    for (n, p), (_, q) in zip(plain.named_parameters(), lean.named_parameters()):
        assert torch.equal(p.grad, q.grad), n
    for (k, a), (_, b) in zip(plain.state_dict().items(), lean.state_dict().items()):
        assert torch.equal(a, b), k  # running statistics and batch counters moved once
