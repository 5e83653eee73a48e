"""torchvision / timm importers: names map one for one, and the converted models compute what those networks compute.

torchvision and timm are never imported. Their state-dict layouts are written out below from their source
(torchvision `models/resnet.py`, `models/segmentation/deeplabv3.py`, `fcn.py`, `_utils.IntermediateLayerGetter`;
timm `models/resnet.py`, `models/xception_aligned.py`, `layers/conv_bn_act.py`), filled with random weights, and
run through small functional forwards (F.conv2d / F.batch_norm / F.relu ...) that follow *their* forward code, so
the reference numbers do not come from deeplab's modules.
"""

from __future__ import annotations

import importlib.util
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from deeplab import CheckpointError, build_model
from deeplab.convert.torch_weights import (
    backbone_state_dict,
    load_torchvision_deeplabv3,
    torchvision_deeplabv3_state_dict,
)
from deeplab.models.backbones import BACKBONES

Layout = dict[str, tuple[int, ...]]

# --------------------------------------------------------------------------------------------------------------
# The libraries' layouts, written from their source
# --------------------------------------------------------------------------------------------------------------

RESNET_UNITS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _bn(layout: Layout, prefix: str, channels: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        layout[f"{prefix}{name}"] = (channels,)
    layout[f"{prefix}num_batches_tracked"] = ()


def torchvision_resnet_layout(depth: int, *, prefix: str = "", fc: bool = True) -> Layout:
    """torchvision ResNet-50/101 (== timm resnet50/101): 7x7 stem, bottlenecks, downsample.0/1 on each first unit."""
    lay: Layout = {f"{prefix}conv1.weight": (64, 3, 7, 7)}
    _bn(lay, f"{prefix}bn1.", 64)
    inplanes = 64
    for stage, (units, planes) in enumerate(zip(RESNET_UNITS[depth], (64, 128, 256, 512))):
        for i in range(units):
            p = f"{prefix}layer{stage + 1}.{i}."
            lay[p + "conv1.weight"] = (planes, inplanes, 1, 1)
            _bn(lay, p + "bn1.", planes)
            lay[p + "conv2.weight"] = (planes, planes, 3, 3)
            _bn(lay, p + "bn2.", planes)
            lay[p + "conv3.weight"] = (planes * 4, planes, 1, 1)
            _bn(lay, p + "bn3.", planes * 4)
            if i == 0:  # stride 2, or 64 -> 256 channels in layer1
                lay[p + "downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                _bn(lay, p + "downsample.1.", planes * 4)
            inplanes = planes * 4
    if fc:
        lay[f"{prefix}fc.weight"] = (1000, 2048)
        lay[f"{prefix}fc.bias"] = (1000,)
    return lay


def timm_resnet_d_layout(depth: int) -> Layout:
    """timm resnet50d/101d: deep stem conv1.0/1/3/4/6 (32, 32, 64) and average-pool shortcuts downsample.1/2."""
    lay: Layout = {"conv1.0.weight": (32, 3, 3, 3)}
    _bn(lay, "conv1.1.", 32)
    lay["conv1.3.weight"] = (32, 32, 3, 3)
    _bn(lay, "conv1.4.", 32)
    lay["conv1.6.weight"] = (64, 32, 3, 3)
    for k, v in torchvision_resnet_layout(depth).items():
        if k == "conv1.weight":
            continue
        k = k.replace(".downsample.1.", ".downsample.2.").replace(".downsample.0.", ".downsample.1.")
        lay[k] = v
    return lay


def torchvision_deeplabv3_layout(depth: int, *, num_classes: int = 21, aux: bool = True) -> Layout:
    """torchvision deeplabv3_resnet{depth}: IntermediateLayerGetter backbone (no fc), DeepLabHead, FCNHead aux."""
    lay = torchvision_resnet_layout(depth, prefix="backbone.", fc=False)
    a = "classifier.0."
    lay[a + "convs.0.0.weight"] = (256, 2048, 1, 1)
    _bn(lay, a + "convs.0.1.", 256)
    for j in (1, 2, 3):  # ASPPConv rates 12, 24, 36
        lay[a + f"convs.{j}.0.weight"] = (256, 2048, 3, 3)
        _bn(lay, a + f"convs.{j}.1.", 256)
    lay[a + "convs.4.1.weight"] = (256, 2048, 1, 1)  # ASPPPooling: 0 is AdaptiveAvgPool2d
    _bn(lay, a + "convs.4.2.", 256)
    lay[a + "project.0.weight"] = (256, 1280, 1, 1)
    _bn(lay, a + "project.1.", 256)
    lay["classifier.1.weight"] = (256, 256, 3, 3)
    _bn(lay, "classifier.2.", 256)
    lay["classifier.4.weight"] = (num_classes, 256, 1, 1)
    lay["classifier.4.bias"] = (num_classes,)
    if aux:  # FCNHead(1024, num_classes): conv 3x3 -> 256, BN, ReLU, Dropout, conv 1x1
        lay["aux_classifier.0.weight"] = (256, 1024, 3, 3)
        _bn(lay, "aux_classifier.1.", 256)
        lay["aux_classifier.4.weight"] = (num_classes, 256, 1, 1)
        lay["aux_classifier.4.bias"] = (num_classes,)
    return lay


# timm xception_aligned block_cfg: (in_chs, out_chs of the three separable convs, stride, start_with_relu, no_skip)
_MIDDLE = [(728, (728, 728, 728), 1, True, False)] * 16
_EXIT = [(728, (728, 1024, 1024), 2, True, False), (1024, (1536, 1536, 2048), 1, False, True)]
TIMM_XCEPTION_BLOCKS = {
    65: [
        (64, (128,) * 3, 2, True, False),
        (128, (256,) * 3, 2, True, False),
        (256, (728,) * 3, 2, True, False),
        *_MIDDLE,
        *_EXIT,
    ],
    71: [
        (64, (128,) * 3, 2, True, False),
        (128, (256,) * 3, 1, True, False),
        (256, (256,) * 3, 2, True, False),
        (256, (728,) * 3, 1, True, False),
        (728, (728,) * 3, 2, True, False),
        *_MIDDLE,
        *_EXIT,
    ],
}


def _timm_has_shortcut(in_chs: int, outs: tuple[int, ...], stride: int, no_skip: bool) -> bool:
    return not no_skip and (outs[-1] != in_chs or stride != 1)  # as built at timm's default output stride 32


def timm_xception_layout(depth: int) -> Layout:
    """timm xception65/71: stem ConvNormAct x2 (conv, bn), blocks.N.stack.convK SeparableConv2d, shortcut, head.fc."""
    lay: Layout = {"stem.0.conv.weight": (32, 3, 3, 3)}
    _bn(lay, "stem.0.bn.", 32)
    lay["stem.1.conv.weight"] = (64, 32, 3, 3)
    _bn(lay, "stem.1.bn.", 64)
    for i, (in_chs, outs, stride, _, no_skip) in enumerate(TIMM_XCEPTION_BLOCKS[depth]):
        c = in_chs
        for k, o in enumerate(outs, 1):
            p = f"blocks.{i}.stack.conv{k}."
            lay[p + "conv_dw.weight"] = (c, 1, 3, 3)
            _bn(lay, p + "bn_dw.", c)
            lay[p + "conv_pw.weight"] = (o, c, 1, 1)
            _bn(lay, p + "bn_pw.", o)
            c = o
        if _timm_has_shortcut(in_chs, outs, stride, no_skip):
            lay[f"blocks.{i}.shortcut.conv.weight"] = (outs[-1], in_chs, 1, 1)
            _bn(lay, f"blocks.{i}.shortcut.bn.", outs[-1])
    lay["head.fc.weight"] = (1000, 2048)
    lay["head.fc.bias"] = (1000,)
    return lay


def vgg16_layout() -> Layout:
    lay: Layout = {}
    cin = 3
    for idx, cout in zip((0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), (64, 64, 128, 128, 256, 256, 256, *(512,) * 6)):
        lay[f"features.{idx}.weight"] = (cout, cin, 3, 3)
        lay[f"features.{idx}.bias"] = (cout,)
        cin = cout
    for idx, (o, i) in zip((0, 3, 6), ((4096, 25088), (4096, 4096), (1000, 4096))):
        lay[f"classifier.{idx}.weight"] = (o, i)
        lay[f"classifier.{idx}.bias"] = (o,)
    return lay


def random_weights(layout: Layout, *, seed: int) -> dict[str, torch.Tensor]:
    """Weights of a plausible scale (He-normal convs, BN statistics near 1), so deep stacks stay finite."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1234)
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) == 4:
            out[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif k.endswith("weight") and len(shape) == 1:
            out[k] = 0.5 + 0.5 * torch.rand(shape, generator=g)
        else:  # BN bias / running_mean, fc
            out[k] = 0.1 * torch.randn(shape, generator=g)
    return out


def placeholder_weights(layout: Layout) -> dict[str, torch.Tensor]:
    """Right names and shapes, no memory: a zero broadcast to each shape (for name/shape-only checks)."""
    return {
        k: torch.zeros((), dtype=torch.long) if k.endswith("num_batches_tracked") else torch.zeros(()).expand(shape)
        for k, shape in layout.items()
    }


# --------------------------------------------------------------------------------------------------------------
# Reference forwards, following torchvision's and timm's forward code
# --------------------------------------------------------------------------------------------------------------


def _bn_f(x, sd, p, eps):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], False, 0.0, eps)


def reference_torchvision_resnet(sd, x, *, depth=50, replace_stride_with_dilation=(False, False, False), prefix=""):
    """torchvision ResNet forward up to layer4; `_make_layer` turns a stride into dilation, the first unit of a
    dilated layer keeping `previous_dilation`."""
    bn = lambda y, p: _bn_f(y, sd, prefix + p, 1e-5)  # noqa: E731
    x = F.relu(bn(F.conv2d(x, sd[prefix + "conv1.weight"], stride=2, padding=3), "bn1."))
    x = F.max_pool2d(x, 3, 2, 1)
    dilation = 1
    for stage, units in enumerate(RESNET_UNITS[depth]):
        stride = 1 if stage == 0 else 2
        previous_dilation = dilation
        if stage > 0 and replace_stride_with_dilation[stage - 1]:
            dilation *= stride
            stride = 1
        for i in range(units):
            p = f"layer{stage + 1}.{i}."
            d, s = (previous_dilation, stride) if i == 0 else (dilation, 1)
            out = F.relu(bn(F.conv2d(x, sd[prefix + p + "conv1.weight"]), p + "bn1."))
            out = F.relu(bn(F.conv2d(out, sd[prefix + p + "conv2.weight"], stride=s, padding=d, dilation=d), p + "bn2."))
            out = bn(F.conv2d(out, sd[prefix + p + "conv3.weight"]), p + "bn3.")
            identity = x
            if prefix + p + "downsample.0.weight" in sd:
                identity = bn(F.conv2d(x, sd[prefix + p + "downsample.0.weight"], stride=s), p + "downsample.1.")
            x = F.relu(out + identity)
    return x


def reference_torchvision_deeplab_aspp(sd, feat):
    """torchvision ASPP: [1x1, rate 12, 24, 36, pooling] concatenated in that order (pooling LAST), projected."""
    a = "classifier.0."
    bn = lambda y, p: _bn_f(y, sd, p, 1e-5)  # noqa: E731
    res = [F.relu(bn(F.conv2d(feat, sd[a + "convs.0.0.weight"]), a + "convs.0.1."))]
    for j, rate in zip((1, 2, 3), (12, 24, 36)):
        res.append(F.relu(bn(F.conv2d(feat, sd[a + f"convs.{j}.0.weight"], padding=rate, dilation=rate), a + f"convs.{j}.1.")))
    pooled = F.relu(bn(F.conv2d(F.adaptive_avg_pool2d(feat, 1), sd[a + "convs.4.1.weight"]), a + "convs.4.2."))
    res.append(F.interpolate(pooled, size=feat.shape[-2:], mode="bilinear", align_corners=False))
    return F.relu(bn(F.conv2d(torch.cat(res, dim=1), sd[a + "project.0.weight"]), a + "project.1."))  # Dropout: eval


def reference_torchvision_deeplabv3(sd, x, *, depth=50):
    """torchvision _SimpleSegmentationModel: backbone 'out' -> DeepLabHead -> bilinear to input size."""
    feat = reference_torchvision_resnet(sd, x, depth=depth, replace_stride_with_dilation=(False, True, True), prefix="backbone.")
    y = reference_torchvision_deeplab_aspp(sd, feat)
    y = F.relu(_bn_f(F.conv2d(y, sd["classifier.1.weight"], padding=1), sd, "classifier.2.", 1e-5))
    y = F.conv2d(y, sd["classifier.4.weight"], sd["classifier.4.bias"])
    return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def reference_timm_xception_stem(sd, x):
    for j, stride in ((0, 2), (1, 1)):  # ConvNormAct: conv, BN (eps 1e-3) + ReLU
        x = F.relu(_bn_f(F.conv2d(x, sd[f"stem.{j}.conv.weight"], stride=stride, padding=1), sd, f"stem.{j}.bn.", 1e-3))
    return x


def reference_timm_xception_block(sd, x, i, *, cfg, stride, dilation):
    """timm XceptionModule.forward: stack (ReLU before each SeparableConv2d when start_with_relu, else ReLU after each
    BN inside it), shortcut ConvNormAct without act, sum unless no_skip."""
    in_chs, outs, _, start_with_relu, no_skip = cfg
    skip = x
    for k in (1, 2, 3):
        p = f"blocks.{i}.stack.conv{k}."
        if start_with_relu:
            x = F.relu(x)
        s = stride if k == 3 else 1
        x = F.conv2d(x, sd[p + "conv_dw.weight"], stride=s, padding=dilation, dilation=dilation, groups=x.shape[1])
        x = _bn_f(x, sd, p + "bn_dw.", 1e-3)
        x = x if start_with_relu else F.relu(x)
        x = _bn_f(F.conv2d(x, sd[p + "conv_pw.weight"]), sd, p + "bn_pw.", 1e-3)
        x = x if start_with_relu else F.relu(x)
    if f"blocks.{i}.shortcut.conv.weight" in sd:
        skip = _bn_f(F.conv2d(skip, sd[f"blocks.{i}.shortcut.conv.weight"], stride=stride), sd, f"blocks.{i}.shortcut.bn.", 1e-3)
    return x if no_skip else x + skip


def reference_timm_xception(sd, x, *, depth=65, output_stride=32):
    """timm XceptionAligned.forward_features, with its rule for output stride (a removed stride dilates later blocks)."""
    x = reference_timm_xception_stem(sd, x)
    curr_stride, curr_dilation = 2, 1
    for i, cfg in enumerate(TIMM_XCEPTION_BLOCKS[depth]):
        stride, dilation = cfg[2], curr_dilation
        if stride > 1:
            if curr_stride * stride > output_stride:
                curr_dilation *= stride
                stride = 1
            else:
                curr_stride *= stride
        x = reference_timm_xception_block(sd, x, i, cfg=cfg, stride=stride, dilation=dilation)
    return x


def assert_same(ours: torch.Tensor, ref: torch.Tensor, *, rtol: float) -> None:
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    assert scale > 0 and torch.isfinite(ref).all()
    err = (ours - ref).abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3g} vs output scale {scale:.3g}"


# --------------------------------------------------------------------------------------------------------------
# Fixtures: one random torchvision DeepLabv3-ResNet-50 (its backbone doubles as the ImageNet ResNet-50)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tv_deeplabv3_r50() -> dict[str, torch.Tensor]:
    return random_weights(torchvision_deeplabv3_layout(50), seed=0)


@pytest.fixture(scope="module")
def tv_resnet50(tv_deeplabv3_r50) -> dict[str, torch.Tensor]:
    sd = {k[len("backbone."):]: v for k, v in tv_deeplabv3_r50.items() if k.startswith("backbone.")}
    sd["fc.weight"] = 0.01 * torch.randn(1000, 2048)
    sd["fc.bias"] = torch.zeros(1000)
    return sd


@pytest.fixture(scope="module")
def tv_resnet50_file(tv_resnet50, tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "resnet50-0676ba61.pth"
    torch.save(tv_resnet50, path)
    return path


@pytest.fixture(scope="module")
def tv_deeplabv3_r50_file(tv_deeplabv3_r50, tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "deeplabv3_resnet50_coco-cd0a2569.pth"
    torch.save(tv_deeplabv3_r50, path)
    return path


# --------------------------------------------------------------------------------------------------------------
# ResNet backbones
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_stride,dilate", [(32, (False, False, False)), (8, (False, True, True))])
def test_torchvision_resnet50_file_computes_torchvision_forward(tv_resnet50, tv_resnet50_file, output_stride, dilate):
    sd = backbone_state_dict(tv_resnet50_file, backbone="resnet50")
    assert "fc.weight" not in sd and "fc.bias" not in sd
    with torch.device("meta"):  # no random init to pay for: the file's tensors are assigned
        backbone = BACKBONES["resnet50"](output_stride=output_stride, multi_grid=(1, 1, 1))
    backbone.load_state_dict(sd, assign=True)  # strict: every one of our keys came from the file
    backbone.eval()
    x = torch.randn(1, 3, 45, 37, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference_torchvision_resnet(tv_resnet50, x, replace_stride_with_dilation=dilate)
        ours = backbone(x)["out"]
    assert ours.shape[-2:] == (math.ceil(45 / output_stride), math.ceil(37 / output_stride))
    assert_same(ours, ref, rtol=1e-5)


@pytest.mark.parametrize("depth", [50, 101])
def test_timm_and_torchvision_resnet_names_fill_every_key_of_ours(depth):
    # timm's plain resnet50/resnet101 keep torchvision's names (conv1, bn1, layerN.M.*, downsample.0/1, fc).
    state = placeholder_weights(torchvision_resnet_layout(depth))
    sd = backbone_state_dict(state, backbone=f"resnet{depth}")
    with torch.device("meta"):
        ours = BACKBONES[f"resnet{depth}"]().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert all(sd[k] is state[k] for k in sd)


def test_containers_and_ddp_prefixes_are_unwrapped():
    state = placeholder_weights(torchvision_resnet_layout(50))
    plain = backbone_state_dict(state, backbone="resnet50")
    ddp = {f"module.{k}": v for k, v in state.items()}
    for wrapped in ({"state_dict": ddp, "epoch": 3}, {"model": state}, {"model_state_dict": {"state_dict": state}}):
        assert backbone_state_dict(wrapped, backbone="resnet50").keys() == plain.keys()


def test_file_without_num_batches_tracked_loads_with_zero_counters():
    # torchvision's first ResNet files predate BatchNorm's num_batches_tracked buffer.
    state = {k: v for k, v in placeholder_weights(torchvision_resnet_layout(50)).items() if "num_batches_tracked" not in k}
    sd = backbone_state_dict(state, backbone="resnet50")
    assert sd["bn1.num_batches_tracked"].item() == 0 and "layer4.2.bn3.num_batches_tracked" in sd


def test_deep_stem_timm_resnet_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "resnet50d_ra2-464e36ba.pth"
    torch.save(placeholder_weights(timm_resnet_d_layout(50)), path)
    with pytest.raises(CheckpointError, match="deep-stem") as info:
        backbone_state_dict(path, backbone="resnet50")
    assert str(path) in str(info.value) and "downsample.1/2" in str(info.value)


def test_resnet_shape_and_depth_mismatches_list_every_key_in_one_error(tmp_path):
    four_channel = placeholder_weights(torchvision_resnet_layout(50))
    four_channel["conv1.weight"] = torch.zeros(()).expand(64, 4, 7, 7)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): conv1.weight: file \(64, 4, 7, 7\) vs model \(64, 3, 7, 7\)"):
        backbone_state_dict(four_channel, backbone="resnet50")

    path = tmp_path / "resnet50.pth"
    torch.save(placeholder_weights(torchvision_resnet_layout(50)), path)
    with pytest.raises(CheckpointError) as info:
        backbone_state_dict(path, backbone="resnet101")
    msg = str(info.value)
    assert str(path) in msg and "missing in the file (" in msg and "layer3.10.conv1.weight" in msg
    assert "not in the model" not in msg  # ResNet-50 is a strict subset of ResNet-101

    path101 = tmp_path / "resnet101.pth"
    torch.save(placeholder_weights(torchvision_resnet_layout(101)), path101)
    with pytest.raises(CheckpointError, match=r"not in the model \(\d+\): layer3.10.bn1.bias"):
        backbone_state_dict(path101, backbone="resnet50")


# --------------------------------------------------------------------------------------------------------------
# timm aligned Xception
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [65, 71])
def test_timm_xception_keys_map_one_for_one_dropping_only_head_fc(depth):
    state = placeholder_weights(timm_xception_layout(depth))
    sd = backbone_state_dict(state, backbone=f"xception{depth}")
    with torch.device("meta"):
        ours = BACKBONES[f"xception{depth}"]().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    used = {id(v) for v in sd.values() if v.ndim > 0}
    left = sorted(k for k, v in state.items() if v.ndim > 0 and id(v) not in used)
    assert left == ["head.fc.bias", "head.fc.weight"]
    assert len(sd) == len(state) - 2
    last = len(TIMM_XCEPTION_BLOCKS[depth]) - 1
    assert sd["stem.1.bn.running_var"] is state["stem.1.bn.running_var"]
    assert sd[f"blocks.{last}.convs.2.pointwise.bn.weight"] is state[f"blocks.{last}.stack.conv3.bn_pw.weight"]
    assert sd["blocks.5.convs.0.depthwise.conv.weight"] is state["blocks.5.stack.conv1.conv_dw.weight"]
    assert sd["blocks.1.shortcut.conv.weight"] is state["blocks.1.shortcut.conv.weight"]


def test_xception_file_with_deeplab_names_is_taken_as_it_is():
    with torch.device("meta"):
        ours = BACKBONES["xception65"]().state_dict()
    state = placeholder_weights({k: tuple(v.shape) for k, v in ours.items()})
    sd = backbone_state_dict({"state_dict": state}, backbone="xception65")
    assert sd.keys() == ours.keys() and all(sd[k] is state[k] for k in sd)


@pytest.fixture(scope="module")
def timm_xception65() -> dict[str, torch.Tensor]:
    return random_weights(timm_xception_layout(65), seed=2)


@pytest.fixture(scope="module")
def our_xception65(timm_xception65):
    sd = backbone_state_dict(timm_xception65, backbone="xception65")
    built = {}
    for output_stride in (32, 16):
        with torch.device("meta"):
            backbone = BACKBONES["xception65"](output_stride=output_stride)
        backbone.load_state_dict(sd, assign=True)
        built[output_stride] = backbone.eval()
    return built


def test_timm_xception65_stem_and_middle_flow_block_compute_timm_forward(timm_xception65, our_xception65):
    sd = timm_xception65
    backbone = our_xception65[32]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 29, 35, generator=g)
    with torch.no_grad():
        assert_same(backbone.stem(x), reference_timm_xception_stem(sd, x), rtol=1e-5)
        y = torch.randn(2, 728, 9, 7, generator=g)  # a middle-flow input (stride 16, 728 ch)
        i = 10
        assert_same(
            backbone.blocks[i](y),
            reference_timm_xception_block(sd, y, i, cfg=TIMM_XCEPTION_BLOCKS[65][i], stride=1, dilation=1),
            rtol=1e-5,
        )


def test_timm_xception65_whole_network_at_output_stride_16_computes_timm_forward_features(timm_xception65, our_xception65):
    # OS 16 exercises both a strided exit flow module and a dilated one (timm's rule, written out in the reference).
    x = torch.randn(1, 3, 49, 41, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = our_xception65[16](x)["out"]
        ref = reference_timm_xception(timm_xception65, x, depth=65, output_stride=16)
    assert_same(ours, ref, rtol=1e-5)


def test_preactivation_timm_xception_is_refused():
    state = {
        "stem.0.conv.weight": torch.zeros(()).expand(32, 3, 3, 3),
        "stem.1.weight": torch.zeros(()).expand(64, 32, 3, 3),
        "blocks.0.norm.weight": torch.zeros(()).expand(64),
        "blocks.0.stack.conv1.conv_dw.weight": torch.zeros(()).expand(64, 1, 3, 3),
    }
    with pytest.raises(CheckpointError, match="pre-activation Xception"):
        backbone_state_dict(state, backbone="xception65")


def test_backbones_without_a_torch_layout_are_a_value_error():
    with pytest.raises(ValueError, match="resnet50_beta"):
        backbone_state_dict({"w": torch.zeros(1)}, backbone="resnet50_beta")


# --------------------------------------------------------------------------------------------------------------
# torchvision DeepLabv3
# --------------------------------------------------------------------------------------------------------------


def test_torchvision_deeplabv3_aspp_with_pooling_last_matches_ours_with_pooling_first(tv_deeplabv3_r50, tv_deeplabv3_r50_file):
    sd, cfg = torchvision_deeplabv3_state_dict(tv_deeplabv3_r50_file)
    assert (cfg.backbone, cfg.output_stride, cfg.rates, cfg.multi_grid, cfg.decoder) == ("resnet50", 8, (12, 24, 36), (1, 1, 1), False)
    assert not any(k.startswith("aux_classifier") for k in sd)
    # Our concat is [pool, 1x1, r12, r24, r36]; torchvision's [1x1, r12, r24, r36, pool].
    tv_w = tv_deeplabv3_r50["classifier.0.project.0.weight"]
    assert torch.equal(sd["aspp.project.conv.weight"][:, :256], tv_w[:, 1024:])
    assert torch.equal(sd["aspp.project.conv.weight"][:, 256:], tv_w[:, :1024])

    # Numbers: our ASPP module vs torchvision's ASPP forward on a map tall enough for every rate to reach past the
    # centre tap (rate 36 needs more than 36 rows), so swapped rates or branches would show.
    with torch.device("meta"):
        model = build_model(cfg.replace(head_conv=False)).eval()
    model.aspp.load_state_dict({k[len("aspp."):]: v for k, v in sd.items() if k.startswith("aspp.")}, assign=True)
    feat = torch.randn(1, 2048, 39, 14, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_same(model.aspp(feat), reference_torchvision_deeplab_aspp(tv_deeplabv3_r50, feat), rtol=1e-5)


def test_torchvision_deeplabv3_backbone_names_pass_through_and_head_conv_gets_the_proposed_names(tv_deeplabv3_r50):
    # The backbone is IntermediateLayerGetter over torchvision's ResNet: our names with `backbone.` (its numbers at
    # output stride 8 are pinned by test_torchvision_resnet50_file_computes_torchvision_forward).
    sd, _ = torchvision_deeplabv3_state_dict(tv_deeplabv3_r50)
    backbone_keys = [k for k in tv_deeplabv3_r50 if k.startswith("backbone.")]
    assert len(backbone_keys) == len(torchvision_resnet_layout(50, fc=False)) and all(sd[k] is tv_deeplabv3_r50[k] for k in backbone_keys)
    assert sd["head_conv.conv.weight"] is tv_deeplabv3_r50["classifier.1.weight"]
    assert sd["head_conv.bn.running_var"] is tv_deeplabv3_r50["classifier.2.running_var"]
    assert sd["classifier.weight"] is tv_deeplabv3_r50["classifier.4.weight"]


def test_torchvision_deeplabv3_resnet101_without_aux_head_is_recognised():
    state = placeholder_weights(torchvision_deeplabv3_layout(101, num_classes=7, aux=False))
    sd, cfg = torchvision_deeplabv3_state_dict(state)
    assert cfg.backbone == "resnet101" and cfg.num_classes == 7
    assert sd["backbone.layer3.22.conv3.weight"] is state["backbone.layer3.22.conv3.weight"]


def test_torchvision_deeplabv3_file_computes_torchvision_logits(tv_deeplabv3_r50, tv_deeplabv3_r50_file):
    model = load_torchvision_deeplabv3(tv_deeplabv3_r50_file)
    assert not model.training and model.config.align_corners is False and model.config.dropout == 0.5
    assert model.class_names[0] == "background" and len(model.class_names) == 21
    assert model.preprocessing.mean == (123.675, 116.28, 103.53)
    x = torch.randn(1, 3, 57, 49, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_same(model(x), reference_torchvision_deeplabv3(tv_deeplabv3_r50, x), rtol=1e-4)


def test_torchvision_deeplabv3_with_other_num_classes_keeps_all_but_the_classifier(tv_deeplabv3_r50):
    model = load_torchvision_deeplabv3(tv_deeplabv3_r50, num_classes=5)
    assert model.classifier.weight.shape == (5, 256, 1, 1)
    assert torch.equal(model.head_conv.conv.weight, tv_deeplabv3_r50["classifier.1.weight"])


def test_fcn_file_given_as_deeplabv3_lists_unmatched_keys_on_both_sides(tmp_path):
    lay = {k: v for k, v in torchvision_deeplabv3_layout(50).items() if not k.startswith("classifier.")}
    lay |= {"classifier.0.weight": (512, 2048, 3, 3), "classifier.4.weight": (21, 512, 1, 1), "classifier.4.bias": (21,)}
    _bn(lay, "classifier.1.", 512)
    path = tmp_path / "fcn_resnet50_coco-1167a1af.pth"
    torch.save(placeholder_weights(lay), path)
    with pytest.raises(CheckpointError) as info:
        load_torchvision_deeplabv3(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "missing in the file" in msg and "classifier.0.convs.0.0.weight" in msg
    assert "not in the model" in msg and "classifier.0.weight" in msg
    assert "shape mismatches" in msg and "classifier.4.weight: file (21, 512, 1, 1) vs model (21, 256, 1, 1)" in msg


# --------------------------------------------------------------------------------------------------------------
# Files that are not what they should be
# --------------------------------------------------------------------------------------------------------------


def test_vgg_state_dict_is_one_error_listing_both_sides(tmp_path):
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(placeholder_weights(vgg16_layout()), path)
    for load in (lambda p: backbone_state_dict(p, backbone="resnet50"), load_torchvision_deeplabv3):
        with pytest.raises(CheckpointError) as info:
            load(path)
        msg = str(info.value)
        assert msg.startswith(str(path)) and "features.0.weight" in msg and "missing in the file" in msg


_payload_ran = []


def _mark_payload_ran():
    _payload_ran.append(True)


class _Payload:
    def __reduce__(self):
        return (_mark_payload_ran, ())


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", ["truncated", "random_bytes", "text", "empty", "pickle_with_code", "plain_pickle"])
def test_unreadable_files_raise_checkpoint_error_naming_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "truncated":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
        _write(path, path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "random_bytes":
        _write(path, torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(8)).numpy().tobytes())
    elif kind == "text":
        _write(path, b"<html>404 Not Found</html>\n")
    elif kind == "empty":
        _write(path, b"")
    elif kind == "pickle_with_code":
        torch.save({"state_dict": {"conv1.weight": _Payload()}}, path)
    else:
        _write(path, pickle.dumps({"conv1.weight": [1.0, 2.0]}))
    for load in (lambda p: backbone_state_dict(p, backbone="resnet50"), load_torchvision_deeplabv3):
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert str(path) in str(info.value)
    assert not _payload_ran  # the payload never ran
    if kind == "pickle_with_code":
        assert "_mark_payload_ran" in str(info.value) and "could run code" in str(info.value)


def test_missing_file_and_non_state_dicts_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        backbone_state_dict(tmp_path / "nope.pth", backbone="resnet50")
    path = tmp_path / "optimizer_only.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match="expected a state dict") as info:
        backbone_state_dict(path, backbone="resnet50")
    assert str(path) in str(info.value)


def test_safetensors_file_is_read_or_asks_for_the_package(tmp_path):
    path = tmp_path / "model.safetensors"
    state = random_weights(torchvision_resnet_layout(50, fc=False), seed=9)
    if importlib.util.find_spec("safetensors") is None:
        _write(path, b"\x00" * 16)
        with pytest.raises(CheckpointError, match="pip install safetensors"):
            backbone_state_dict(path, backbone="resnet50")
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
        sd = backbone_state_dict(path, backbone="resnet50")
        assert torch.equal(sd["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])

