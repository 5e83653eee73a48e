"""MobileNetV3-Large/Small in torchvision's layout, and torchvision's deeplabv3_mobilenet_v3_large converted.

torchvision is never imported. Its layouts are written out below from its source (`models/mobilenetv3.py`
`_mobilenet_v3_conf` / `InvertedResidual` / `MobileNetV3`, `ops/misc.py` `Conv2dNormActivation` /
`SqueezeExcitation`, `models/segmentation/deeplabv3.py` `_deeplabv3_mobilenetv3` / `DeepLabHead` / `ASPP`,
`fcn.py` `FCNHead`, `lraspp.py`), filled with random weights, and run through a functional forward that follows
*their* forward code, so the reference numbers do not come from deeplab's modules.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

# Shared with the ResNet importer's tests and the fast path's (pytest puts tests/ on sys.path).
from test_convert_torch import _bn_f, placeholder_weights, random_weights  # noqa: E402
from test_fast import _randomise_bn  # noqa: E402
from torch import nn

from deeplab import CheckpointError, ModelConfig, build_model
from deeplab.convert import convert_file
from deeplab.convert.torch_weights import (
    backbone_state_dict,
    load_torchvision_deeplabv3,
    torchvision_deeplabv3_state_dict,
)
from deeplab.deploy.fast import optimize_for_inference
from deeplab.models.backbones import BACKBONES

Layout = dict[str, tuple[int, ...]]

# --------------------------------------------------------------------------------------------------------------
# torchvision's MobileNetV3, written from its source
# --------------------------------------------------------------------------------------------------------------


def tv_make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision `_make_divisible`."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def tv_mobilenet_v3_conf(arch: str, *, dilated: bool, reduced_tail: bool = False) -> list[tuple]:
    """torchvision `_mobilenet_v3_conf`: (input, kernel, expanded, out, use_se, activation, stride, dilation)."""
    r = 2 if reduced_tail else 1
    d = 2 if dilated else 1
    if arch == "large":
        return [
            (16, 3, 16, 16, False, "RE", 1, 1),
            (16, 3, 64, 24, False, "RE", 2, 1),
            (24, 3, 72, 24, False, "RE", 1, 1),
            (24, 5, 72, 40, True, "RE", 2, 1),
            (40, 5, 120, 40, True, "RE", 1, 1),
            (40, 5, 120, 40, True, "RE", 1, 1),
            (40, 3, 240, 80, False, "HS", 2, 1),
            (80, 3, 200, 80, False, "HS", 1, 1),
            (80, 3, 184, 80, False, "HS", 1, 1),
            (80, 3, 184, 80, False, "HS", 1, 1),
            (80, 3, 480, 112, True, "HS", 1, 1),
            (112, 3, 672, 112, True, "HS", 1, 1),
            (112, 5, 672, 160 // r, True, "HS", 2, d),
            (160 // r, 5, 960 // r, 160 // r, True, "HS", 1, d),
            (160 // r, 5, 960 // r, 160 // r, True, "HS", 1, d),
        ]
    return [
        (16, 3, 16, 16, True, "RE", 2, 1),
        (16, 3, 72, 24, False, "RE", 2, 1),
        (24, 3, 88, 24, False, "RE", 1, 1),
        (24, 5, 96, 40, True, "HS", 2, 1),
        (40, 5, 240, 40, True, "HS", 1, 1),
        (40, 5, 240, 40, True, "HS", 1, 1),
        (40, 5, 120, 48, True, "HS", 1, 1),
        (48, 5, 144, 48, True, "HS", 1, 1),
        (48, 5, 288, 96 // r, True, "HS", 2, d),
        (96 // r, 5, 576 // r, 96 // r, True, "HS", 1, d),
        (96 // r, 5, 576 // r, 96 // r, True, "HS", 1, d),
    ]


def _bn(layout: Layout, prefix: str, channels: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        layout[f"{prefix}{name}"] = (channels,)
    layout[f"{prefix}num_batches_tracked"] = ()


def tv_features_layout(arch: str, *, prefix: str, reduced_tail: bool = False) -> Layout:
    """`MobileNetV3.features`: 0 stem Conv2dNormActivation (0 conv, 1 BN), then InvertedResidual `block.{j}`, then
    the last 1x1 Conv2dNormActivation to 6x channels."""
    lay: Layout = {f"{prefix}0.0.weight": (16, 3, 3, 3)}
    _bn(lay, f"{prefix}0.1.", 16)
    conf = tv_mobilenet_v3_conf(arch, dilated=False, reduced_tail=reduced_tail)
    for i, (inp, k, exp, out, se, _, _, _) in enumerate(conf, 1):
        p, j = f"{prefix}{i}.block.", 0
        if exp != inp:
            lay[f"{p}{j}.0.weight"] = (exp, inp, 1, 1)
            _bn(lay, f"{p}{j}.1.", exp)
            j += 1
        lay[f"{p}{j}.0.weight"] = (exp, 1, k, k)
        _bn(lay, f"{p}{j}.1.", exp)
        j += 1
        if se:
            sq = tv_make_divisible(exp // 4, 8)
            lay[f"{p}{j}.fc1.weight"], lay[f"{p}{j}.fc1.bias"] = (sq, exp, 1, 1), (sq,)
            lay[f"{p}{j}.fc2.weight"], lay[f"{p}{j}.fc2.bias"] = (exp, sq, 1, 1), (exp,)
            j += 1
        lay[f"{p}{j}.0.weight"] = (out, exp, 1, 1)
        _bn(lay, f"{p}{j}.1.", out)
    last_in = conf[-1][3]
    n = len(conf) + 1
    lay[f"{prefix}{n}.0.weight"] = (6 * last_in, last_in, 1, 1)
    _bn(lay, f"{prefix}{n}.1.", 6 * last_in)
    return lay


def tv_imagenet_layout(arch: str) -> Layout:
    lay = tv_features_layout(arch, prefix="features.")
    last, hidden = (960, 1280) if arch == "large" else (576, 1024)
    lay |= {"classifier.0.weight": (hidden, last), "classifier.0.bias": (hidden,)}
    lay |= {"classifier.3.weight": (1000, hidden), "classifier.3.bias": (1000,)}
    return lay


def tv_deeplabv3_mobilenet_layout(*, num_classes: int = 21, aux: bool = True, reduced_tail: bool = False) -> Layout:
    """`deeplabv3_mobilenet_v3_large`: IntermediateLayerGetter over `features` (keys backbone.{i}), DeepLabHead(960),
    FCNHead(40) on features.4 (stage_indices[-4])."""
    lay = tv_features_layout("large", prefix="backbone.", reduced_tail=reduced_tail)
    c_in = 480 if reduced_tail else 960
    a = "classifier.0."
    lay[a + "convs.0.0.weight"] = (256, c_in, 1, 1)
    _bn(lay, a + "convs.0.1.", 256)
    for j in (1, 2, 3):
        lay[a + f"convs.{j}.0.weight"] = (256, c_in, 3, 3)
        _bn(lay, a + f"convs.{j}.1.", 256)
    lay[a + "convs.4.1.weight"] = (256, c_in, 1, 1)
    _bn(lay, a + "convs.4.2.", 256)
    lay[a + "project.0.weight"] = (256, 1280, 1, 1)
    _bn(lay, a + "project.1.", 256)
    lay["classifier.1.weight"] = (256, 256, 3, 3)
    _bn(lay, "classifier.2.", 256)
    lay["classifier.4.weight"] = (num_classes, 256, 1, 1)
    lay["classifier.4.bias"] = (num_classes,)
    if aux:  # FCNHead(40, num_classes): 3x3 conv to 40 // 4, BN, ReLU, Dropout, 1x1 conv
        lay["aux_classifier.0.weight"] = (10, 40, 3, 3)
        _bn(lay, "aux_classifier.1.", 10)
        lay["aux_classifier.4.weight"] = (num_classes, 10, 1, 1)
        lay["aux_classifier.4.bias"] = (num_classes,)
    return lay


def tv_lraspp_layout(num_classes: int = 21) -> Layout:
    """`lraspp_mobilenet_v3_large`: LRASPPHead(low 40, high 960, inter 128)."""
    lay = tv_features_layout("large", prefix="backbone.")
    lay["classifier.cbr.0.weight"] = (128, 960, 1, 1)
    _bn(lay, "classifier.cbr.1.", 128)
    lay["classifier.scale.1.weight"] = (128, 960, 1, 1)
    for name, c_in in (("low_classifier", 40), ("high_classifier", 128)):
        lay[f"classifier.{name}.weight"], lay[f"classifier.{name}.bias"] = (num_classes, c_in, 1, 1), (num_classes,)
    return lay


# --------------------------------------------------------------------------------------------------------------
# Reference forwards, following torchvision's forward code
# --------------------------------------------------------------------------------------------------------------


def reference_tv_mobilenet_v3_features(sd, x, *, arch: str, dilated: bool, prefix: str):
    """`MobileNetV3.features(x)`: BN eps 0.001; InvertedResidual with `stride = 1 if dilation > 1 else stride`,
    padding (k - 1) // 2 * dilation, SE = x * hardsigmoid(fc2(relu(fc1(adaptive_avg_pool2d(x, 1))))), residual when
    the configured stride is 1 and the channels agree."""
    bn = lambda y, p: _bn_f(y, sd, prefix + p, 1e-3)  # noqa: E731
    x = F.hardswish(bn(F.conv2d(x, sd[prefix + "0.0.weight"], stride=2, padding=1), "0.1."))
    conf = tv_mobilenet_v3_conf(arch, dilated=dilated)
    for i, (inp, k, exp, out, se, act_name, stride, dilation) in enumerate(conf, 1):
        act = F.hardswish if act_name == "HS" else F.relu
        p, j = f"{i}.block.", 0
        y = x
        if exp != inp:
            y = act(bn(F.conv2d(y, sd[f"{prefix}{p}{j}.0.weight"]), f"{p}{j}.1."))
            j += 1
        s = 1 if dilation > 1 else stride
        w = sd[f"{prefix}{p}{j}.0.weight"]
        y = F.conv2d(y, w, stride=s, padding=(k - 1) // 2 * dilation, dilation=dilation, groups=exp)
        y = act(bn(y, f"{p}{j}.1."))
        j += 1
        if se:
            q = f"{prefix}{p}{j}."
            scale = F.adaptive_avg_pool2d(y, 1)
            scale = F.relu(F.conv2d(scale, sd[q + "fc1.weight"], sd[q + "fc1.bias"]))
            scale = F.conv2d(scale, sd[q + "fc2.weight"], sd[q + "fc2.bias"])
            y = F.hardsigmoid(scale) * y
            j += 1
        y = bn(F.conv2d(y, sd[f"{prefix}{p}{j}.0.weight"]), f"{p}{j}.1.")
        x = y + x if stride == 1 and inp == out else y
    n = len(conf) + 1
    return F.hardswish(bn(F.conv2d(x, sd[f"{prefix}{n}.0.weight"]), f"{n}.1."))


def reference_tv_deeplabv3_mobilenet(sd, x):
    """_SimpleSegmentationModel: backbone 'out' (features.16, dilated) -> DeepLabHead -> bilinear to input size."""
    feat = reference_tv_mobilenet_v3_features(sd, x, arch="large", dilated=True, prefix="backbone.")
    a = "classifier.0."
    bn = lambda y, p: _bn_f(y, sd, p, 1e-5)  # noqa: E731 - the head's BatchNorm2d defaults
    res = [F.relu(bn(F.conv2d(feat, sd[a + "convs.0.0.weight"]), a + "convs.0.1."))]
    for j, rate in zip((1, 2, 3), (12, 24, 36)):
        w = sd[a + f"convs.{j}.0.weight"]
        res.append(F.relu(bn(F.conv2d(feat, w, padding=rate, dilation=rate), a + f"convs.{j}.1.")))
    pooled = F.relu(bn(F.conv2d(F.adaptive_avg_pool2d(feat, 1), sd[a + "convs.4.1.weight"]), a + "convs.4.2."))
    res.append(F.interpolate(pooled, size=feat.shape[-2:], mode="bilinear", align_corners=False))
    y = F.relu(bn(F.conv2d(torch.cat(res, dim=1), sd[a + "project.0.weight"]), a + "project.1."))  # Dropout: eval
    y = F.relu(bn(F.conv2d(y, sd["classifier.1.weight"], padding=1), "classifier.2."))
    y = F.conv2d(y, sd["classifier.4.weight"], sd["classifier.4.bias"])
    return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def assert_same(ours: torch.Tensor, ref: torch.Tensor, *, rtol: float) -> None:
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    assert scale > 0 and torch.isfinite(ref).all()
    err = (ours - ref).abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3g} vs output scale {scale:.3g}"


def _meta_backbone(name: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return BACKBONES[name](**kw)


def _count(layout_or_module) -> int:
    if isinstance(layout_or_module, nn.Module):
        return sum(p.numel() for p in layout_or_module.parameters())
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(s) for k, s in layout_or_module.items() if not k.endswith(buffers))


# --------------------------------------------------------------------------------------------------------------
# The backbones
# --------------------------------------------------------------------------------------------------------------


def test_parameter_counts_match_torchvisions_published_counts():
    # torchvision's weights tables: mobilenet_v3_large 5,483,032 and mobilenet_v3_small 2,542,856 parameters, less
    # the classifier DeepLab drops (Linear 960->1280, Linear 1280->1000; Linear 576->1024, Linear 1024->1000);
    # deeplabv3_mobilenet_v3_large 11,029,328 (with its aux head), which the layout written above must reproduce.
    large = 5_483_032 - (960 * 1280 + 1280) - (1280 * 1000 + 1000)
    small = 2_542_856 - (576 * 1024 + 1024) - (1024 * 1000 + 1000)
    assert _count(tv_imagenet_layout("large")) == 5_483_032 and _count(tv_imagenet_layout("small")) == 2_542_856
    assert _count(_meta_backbone("mobilenet_v3_large")) == large == 2_971_952
    assert _count(_meta_backbone("mobilenet_v3_small")) == small == 927_008
    assert _count(tv_deeplabv3_mobilenet_layout()) == 11_029_328
    _, cfg = torchvision_deeplabv3_state_dict(placeholder_weights(tv_deeplabv3_mobilenet_layout()))
    with torch.device("meta"):
        ours = build_model(cfg)
    aux = 10 * 40 * 9 + 2 * 10 + 21 * 10 + 21
    assert _count(ours) + aux == 11_029_328


@pytest.mark.parametrize("arch", ["large", "small"])
def test_names_and_shapes_are_torchvisions_features(arch):
    ours = _meta_backbone(f"mobilenet_v3_{arch}").state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == tv_features_layout(arch, prefix="features.")


def _depthwise(backbone):
    convs = [m for name, m in backbone.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    return [(c.stride[0], c.dilation[0], c.padding[0]) for c in convs]


@pytest.mark.parametrize(
    "arch,output_stride,expected",
    [
        # torchvision dilated=False: every configured stride, rate 1.
        ("large", 32, [(s, 1) for s in (1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1)]),
        # torchvision dilated=True: the last stage (features.13-15) at stride 1, rate 2, its first unit included.
        ("large", 16, [(s, 1) for s in (1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1)] + [(1, 2)] * 3),
        # The same rule one stage earlier: features.7-12 at rate 2, features.13-15 at rate 4.
        ("large", 8, [(s, 1) for s in (1, 2, 1, 2, 1, 1)] + [(1, 2)] * 6 + [(1, 4)] * 3),
        ("small", 32, [(s, 1) for s in (2, 2, 1, 2, 1, 1, 1, 1, 2, 1, 1)]),
        ("small", 16, [(s, 1) for s in (2, 2, 1, 2, 1, 1, 1, 1)] + [(1, 2)] * 3),
        ("small", 8, [(s, 1) for s in (2, 2, 1)] + [(1, 2)] * 5 + [(1, 4)] * 3),
    ],
)
def test_strides_and_dilations_follow_torchvision(arch, output_stride, expected):
    got = _depthwise(_meta_backbone(f"mobilenet_v3_{arch}", output_stride=output_stride))
    assert [(s, d) for s, d, _ in got] == expected
    kernels = [k for _, k, *_ in tv_mobilenet_v3_conf(arch, dilated=False)]
    assert [p for _, _, p in got] == [(k - 1) // 2 * d for k, (_, d) in zip(kernels, expected)]


def test_feature_contract_channels_and_low_level_tap():
    large, small = _meta_backbone("mobilenet_v3_large"), _meta_backbone("mobilenet_v3_small")
    assert large.channels == {"low_level": 24, "out": 960} and large.low_level_index == 3
    assert small.channels == {"low_level": 16, "out": 576} and small.low_level_index == 1
    assert large.reductions == {"low_level": 4, "out": 16}
    with pytest.raises(ValueError, match="no multi-grid"):
        BACKBONES["mobilenet_v3_large"](multi_grid=(1, 2, 4))


@pytest.mark.parametrize("arch,output_stride", [("large", 32), ("large", 16), ("small", 16)])
def test_torchvision_imagenet_file_computes_torchvision_features(arch, output_stride):
    sd_tv = random_weights(tv_imagenet_layout(arch), seed=1)
    sd = backbone_state_dict(sd_tv, backbone=f"mobilenet_v3_{arch}")
    assert len(sd) == len(sd_tv) - 4  # classifier.0/3 weight and bias dropped
    backbone = _meta_backbone(f"mobilenet_v3_{arch}", output_stride=output_stride)
    backbone.load_state_dict(sd, assign=True)
    backbone.eval()
    x = torch.randn(1, 3, 67, 53, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = backbone(x)
        ref = reference_tv_mobilenet_v3_features(sd_tv, x, arch=arch, dilated=output_stride == 16, prefix="features.")
    assert ours["out"].shape[-2:] == (math.ceil(67 / output_stride), math.ceil(53 / output_stride))
    assert_same(ours["out"], ref, rtol=1e-5)
    assert ours["low_level"].shape[-2:] == (17, 14)


@pytest.mark.parametrize(
    "backbone,decoder,separable", [("mobilenet_v3_large", True, True), ("mobilenet_v3_small", False, False)]
)
def test_fast_path_equals_plain_model(backbone, decoder, separable):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, num_classes=5, decoder=decoder, separable=separable, output_stride=16)
    model = _randomise_bn(build_model(cfg))
    fast = optimize_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(1, 3, 97, 129)
    with torch.no_grad():
        ref, out = model(x), fast(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("backbone", ["mobilenet_v3_large", "mobilenet_v3_small"])
def test_trains_with_one_image_per_batch(backbone):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, num_classes=3, output_stride=16)).train()
    y = model(torch.randn(1, 3, 65, 65))
    assert y.shape == (1, 3, 65, 65)
    y.logsumexp(1).mean().backward()
    se = model.backbone.features[-2].block[2]  # the last block's squeeze-excitation
    assert se.fc1.weight.grad is not None and se.fc1.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------
# torchvision deeplabv3_mobilenet_v3_large
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tv_deeplabv3_mnv3() -> dict[str, torch.Tensor]:
    return random_weights(tv_deeplabv3_mobilenet_layout(), seed=3)


@pytest.fixture(scope="module")
def tv_deeplabv3_mnv3_file(tv_deeplabv3_mnv3, tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "deeplabv3_mobilenet_v3_large-fc3c493d.pth"
    torch.save(tv_deeplabv3_mnv3, path)
    return path


def test_deeplabv3_mobilenet_v3_large_config_and_names(tv_deeplabv3_mnv3):
    sd, cfg = torchvision_deeplabv3_state_dict(tv_deeplabv3_mnv3)
    assert (cfg.backbone, cfg.output_stride, cfg.rates, cfg.decoder, cfg.head_conv) == (
        "mobilenet_v3_large", 16, (12, 24, 36), False, True
    )
    assert cfg.aspp_channels == 256 and cfg.dropout == 0.5 and cfg.align_corners is False
    assert not any(k.startswith("aux_classifier") for k in sd)
    assert sd["backbone.features.13.block.2.fc1.weight"] is tv_deeplabv3_mnv3["backbone.13.block.2.fc1.weight"]
    assert sd["backbone.features.16.1.running_var"] is tv_deeplabv3_mnv3["backbone.16.1.running_var"]
    assert sd["head_conv.conv.weight"] is tv_deeplabv3_mnv3["classifier.1.weight"]
    # Pooling branch first in ours, last in torchvision's concatenation.
    tv_w = tv_deeplabv3_mnv3["classifier.0.project.0.weight"]
    assert torch.equal(sd["aspp.project.conv.weight"][:, :256], tv_w[:, 1024:])
    assert torch.equal(sd["aspp.project.conv.weight"][:, 256:], tv_w[:, :1024])


def test_deeplabv3_mobilenet_v3_large_file_computes_torchvision_logits(tv_deeplabv3_mnv3, tv_deeplabv3_mnv3_file):
    model = convert_file(tv_deeplabv3_mnv3_file)
    assert not model.training and model.config.backbone == "mobilenet_v3_large"
    assert model.class_names[0] == "background" and model.preprocessing.mean == (123.675, 116.28, 103.53)
    # 593 rows: a 38-row map at output stride 16, so the rate-36 branch reads past its centre tap (swapped rates or
    # branches would show); 65 columns keep it cheap.
    x = torch.randn(1, 3, 593, 65, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, ref = model(x), reference_tv_deeplabv3_mobilenet(tv_deeplabv3_mnv3, x)
    assert_same(ours, ref, rtol=1e-5)


def test_deeplabv3_mobilenet_v3_large_without_aux_and_other_classes():
    state = placeholder_weights(tv_deeplabv3_mobilenet_layout(num_classes=7, aux=False))
    sd, cfg = torchvision_deeplabv3_state_dict(state)
    assert cfg.num_classes == 7 and sd["classifier.weight"] is state["classifier.4.weight"]
    model = load_torchvision_deeplabv3(random_weights(tv_deeplabv3_mobilenet_layout(), seed=5), num_classes=4)
    assert model.classifier.weight.shape == (4, 256, 1, 1)


def _one_line_error(load, src) -> str:
    with pytest.raises(CheckpointError) as info:
        load(src)
    msg = str(info.value)
    assert "\n" not in msg and "missing in the file" not in msg and "shape mismatches" not in msg
    assert "not supported" in msg
    return msg


def test_lraspp_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "lraspp_mobilenet_v3_large-d234d4ea.pth"
    torch.save(placeholder_weights(tv_lraspp_layout()), path)
    for load in (convert_file, load_torchvision_deeplabv3):
        msg = _one_line_error(load, path)
        assert msg.startswith(str(path)) and "lraspp_mobilenet_v3_large" in msg


def test_deeplabv3_on_a_reduced_tail_mobilenet_is_refused_in_one_line():
    state = placeholder_weights(tv_deeplabv3_mobilenet_layout(reduced_tail=True))
    msg = _one_line_error(load_torchvision_deeplabv3, state)
    assert "MobileNetV3" in msg and "480 channels" in msg and "mobilenet_v3_large" in msg


def test_fcn_file_is_refused_in_one_line_by_convert(tmp_path):
    path = tmp_path / "fcn_resnet50_coco-1167a1af.pth"
    lay: Layout = {"backbone.conv1.weight": (64, 3, 7, 7), "backbone.layer4.2.conv3.weight": (2048, 512, 1, 1)}
    lay |= {"classifier.0.weight": (512, 2048, 3, 3), "classifier.4.weight": (21, 512, 1, 1)}
    lay["classifier.4.bias"] = (21,)
    _bn(lay, "classifier.1.", 512)
    torch.save(placeholder_weights(lay), path)
    assert "fcn_resnet50/101" in _one_line_error(convert_file, path)


def test_small_imagenet_file_given_as_large_names_the_right_backbone():
    state = placeholder_weights(tv_imagenet_layout("small"))
    with pytest.raises(CheckpointError, match=r"mobilenet_v3_small \(13 feature layers\), not mobilenet_v3_large;"):
        backbone_state_dict(state, backbone="mobilenet_v3_large")


def test_deeplabv3_mobilenet_file_missing_a_tensor_lists_it():
    state = placeholder_weights(tv_deeplabv3_mobilenet_layout())
    del state["backbone.13.block.2.fc1.weight"]
    with pytest.raises(CheckpointError, match=r"missing in the file \(1\): backbone.13.block.2.fc1.weight"):
        torchvision_deeplabv3_state_dict(state)


def test_convert_builds_a_deeplab_on_a_torchvision_imagenet_mobilenet_v3(tmp_path):
    path = tmp_path / "mobilenet_v3_small-047dcff4.pth"
    state = random_weights(tv_imagenet_layout("small"), seed=6)
    torch.save(state, path)
    model = convert_file(path, backbone="mobilenet_v3_small", num_classes=5)
    assert model.config.backbone == "mobilenet_v3_small" and model.classifier.out_channels == 5
    assert model.preprocessing.mean == (123.675, 116.28, 103.53)  # torchvision's ImageNet normalisation
    assert torch.equal(model.backbone.features[9].block[2].fc2.weight, state["features.9.block.2.fc2.weight"])
