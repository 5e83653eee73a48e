"""torchvision ImageNet files for the family's backbones: ResNet-18/34/152, VGG-11/13/16/19 (with and without BN) and
DenseNet-121/161/169/201 (also with its first files' dotted names).

As in tests/test_convert_torch.py, torchvision is not imported by the tests CI runs: its state-dict layouts are written
out below from its source (`models/resnet.py`, `models/vgg.py` `make_layers` and `cfgs`, `models/densenet.py`), filled
with random weights, and run through functional forwards (F.conv2d, F.batch_norm, ...) that follow torchvision's
forward code. The last test builds torchvision's own modules where torchvision can be imported (installed beside the
venv: `pip install --no-deps --target DIR torchvision==0.28.0` and `PYTHONPATH=DIR`).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_convert_torch import (
    Layout,
    _bn,
    _bn_f,
    assert_same,
    placeholder_weights,
    random_weights,
)

from deeplab import CheckpointError
from deeplab.cli import main
from deeplab.convert import convert_file
from deeplab.convert.torch_weights import backbone_state_dict
from deeplab.models.backbones import BACKBONES

RESNET_UNITS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 152: (3, 8, 36, 3)}
# torchvision's `cfgs` (A, B, D, E): conv widths, "M" for a max pool.
VGG_CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
# growth rate, layers per block, stem width
DENSENET_CFGS = {121: (32, (6, 12, 24, 16), 64), 161: (48, (6, 12, 36, 24), 96), 169: (32, (6, 12, 32, 32), 64),
                 201: (32, (6, 12, 48, 32), 64)}


# --------------------------------------------------------------------------------------------------------------
# Layouts, written from torchvision's source
# --------------------------------------------------------------------------------------------------------------


def torchvision_resnet_layout(depth: int) -> Layout:
    """torchvision ResNet-18/34 (BasicBlock: conv1, conv2) or -152 (Bottleneck: conv1-3), downsample.0/1, fc."""
    basic = depth in (18, 34)
    expansion = 1 if basic else 4
    lay: Layout = {"conv1.weight": (64, 3, 7, 7)}
    _bn(lay, "bn1.", 64)
    inplanes = 64
    for stage, (units, planes) in enumerate(zip(RESNET_UNITS[depth], (64, 128, 256, 512))):
        for i in range(units):
            p = f"layer{stage + 1}.{i}."
            if basic:
                lay[p + "conv1.weight"] = (planes, inplanes, 3, 3)
                lay[p + "conv2.weight"] = (planes, planes, 3, 3)
                for j in (1, 2):
                    _bn(lay, p + f"bn{j}.", planes)
            else:
                lay[p + "conv1.weight"] = (planes, inplanes, 1, 1)
                lay[p + "conv2.weight"] = (planes, planes, 3, 3)
                lay[p + "conv3.weight"] = (planes * 4, planes, 1, 1)
                for j, c in ((1, planes), (2, planes), (3, planes * 4)):
                    _bn(lay, p + f"bn{j}.", c)
            if i == 0 and (stage > 0 or inplanes != planes * expansion):
                lay[p + "downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                _bn(lay, p + "downsample.1.", planes * expansion)
            inplanes = planes * expansion
    lay["fc.weight"] = (1000, 512 * expansion)
    lay["fc.bias"] = (1000,)
    return lay


def torchvision_vgg_layout(depth: int, *, batch_norm: bool) -> Layout:
    """torchvision `make_layers`: features.N is conv (weight, bias), [BN], ReLU or a pool; the ImageNet classifier."""
    lay: Layout = {}
    index, cin = 0, 3
    for v in VGG_CFGS[depth]:
        if v == "M":
            index += 1
            continue
        lay[f"features.{index}.weight"] = (v, cin, 3, 3)
        lay[f"features.{index}.bias"] = (v,)
        if batch_norm:
            _bn(lay, f"features.{index + 1}.", v)
        index += 3 if batch_norm else 2
        cin = v
    for idx, (o, i) in zip((0, 3, 6), ((4096, 25088), (4096, 4096), (1000, 4096))):
        lay[f"classifier.{idx}.weight"] = (o, i)
        lay[f"classifier.{idx}.bias"] = (o,)
    return lay


def torchvision_densenet_layout(depth: int, *, dotted: bool = False) -> Layout:
    """torchvision DenseNet: features.conv0/norm0, denseblockK.denselayerJ.norm1/conv1/norm2/conv2, transitionK.norm/conv,
    norm5, classifier. `dotted`: the first files' names, `norm.1` for `norm1` (inside dense layers only)."""
    growth, blocks, width = DENSENET_CFGS[depth]
    lay: Layout = {"features.conv0.weight": (width, 3, 7, 7)}
    _bn(lay, "features.norm0.", width)
    c = width
    for k, count in enumerate(blocks, start=1):
        for j in range(count):
            p = f"features.denseblock{k}.denselayer{j + 1}."
            n1, c1, n2, c2 = ("norm.1.", "conv.1.", "norm.2.", "conv.2.") if dotted else ("norm1.", "conv1.", "norm2.", "conv2.")
            cin = c + j * growth
            _bn(lay, p + n1, cin)
            lay[p + c1 + "weight"] = (4 * growth, cin, 1, 1)
            _bn(lay, p + n2, 4 * growth)
            lay[p + c2 + "weight"] = (growth, 4 * growth, 3, 3)
        c += count * growth
        if k < 4:
            _bn(lay, f"features.transition{k}.norm.", c)
            lay[f"features.transition{k}.conv.weight"] = (c // 2, c, 1, 1)
            c //= 2
    _bn(lay, "features.norm5.", c)
    lay["classifier.weight"] = (1000, c)
    lay["classifier.bias"] = (1000,)
    return lay


def torchvision_layout(backbone: str) -> Layout:
    if backbone.startswith("resnet"):
        return torchvision_resnet_layout(int(backbone[6:]))
    if backbone.startswith("vgg"):
        return torchvision_vgg_layout(int(backbone[3:5]), batch_norm=backbone.endswith("_bn"))
    return torchvision_densenet_layout(int(backbone[8:]))


FAMILY = ["resnet18", "resnet34", "resnet152", "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn",
          "vgg19_bn", "densenet121", "densenet161", "densenet169", "densenet201"]


# --------------------------------------------------------------------------------------------------------------
# Reference forwards, following torchvision's forward code
# --------------------------------------------------------------------------------------------------------------


def reference_resnet(sd, x, *, depth, replace_stride_with_dilation=(False, False, False)):
    """torchvision ResNet up to layer4 (BasicBlock or Bottleneck); `_make_layer`'s dilation rule (Bottleneck only:
    torchvision's BasicBlock refuses dilation)."""
    bn = lambda y, p: _bn_f(y, sd, p, 1e-5)  # noqa: E731
    x = F.max_pool2d(F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1.")), 3, 2, 1)
    dilation = 1
    for stage, units in enumerate(RESNET_UNITS[depth]):
        stride = 1 if stage == 0 else 2
        previous = dilation
        if stage > 0 and replace_stride_with_dilation[stage - 1]:
            dilation, stride = dilation * stride, 1
        for i in range(units):
            p = f"layer{stage + 1}.{i}."
            d, s = (previous, stride) if i == 0 else (dilation, 1)
            if depth in (18, 34):
                out = F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"], stride=s, padding=1), p + "bn1."))
                out = bn(F.conv2d(out, sd[p + "conv2.weight"], padding=1), p + "bn2.")
            else:
                out = F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"]), p + "bn1."))
                out = F.relu(bn(F.conv2d(out, sd[p + "conv2.weight"], stride=s, padding=d, dilation=d), p + "bn2."))
                out = bn(F.conv2d(out, sd[p + "conv3.weight"]), p + "bn3.")
            if p + "downsample.0.weight" in sd:
                x = bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=s), p + "downsample.1.")
            x = F.relu(out + x)
    return x


def reference_vgg(sd, x, *, depth, batch_norm, deeplab_v1=False):
    """torchvision VGG `features` (2x2 max pools, stride 2): (output, block 3's last ReLU). `deeplab_v1`: the
    DeepLab-LargeFOV prototxt's changes, pool4 and pool5 3x3 stride 1 pad 1 and conv5 at dilation 2."""
    index, pools, low_level = 0, 0, None
    for v in VGG_CFGS[depth]:
        if v == "M":
            pools += 1
            if pools == 3:
                low_level = x
            x = F.max_pool2d(x, 3, 1, 1) if deeplab_v1 and pools >= 4 else F.max_pool2d(x, 2, 2)
            index += 1
            continue
        d = 2 if deeplab_v1 and pools == 4 else 1
        x = F.conv2d(x, sd[f"features.{index}.weight"], sd[f"features.{index}.bias"], padding=d, dilation=d)
        if batch_norm:
            x = _bn_f(x, sd, f"features.{index + 1}.", 1e-5)
        x = F.relu(x)
        index += 3 if batch_norm else 2
    return x, low_level


def reference_densenet(sd, x, *, depth):
    """torchvision DenseNet: `features` (stem, dense blocks, transitions with 2x2 average pooling, norm5), then the
    ReLU of its `forward`: (output, dense block 1's output)."""
    bn = lambda y, p: _bn_f(y, sd, "features." + p, 1e-5)  # noqa: E731
    growth, blocks, _ = DENSENET_CFGS[depth]
    x = F.relu(bn(F.conv2d(x, sd["features.conv0.weight"], stride=2, padding=3), "norm0."))
    x = F.max_pool2d(x, 3, 2, 1)
    low_level = None
    for k, count in enumerate(blocks, start=1):
        features = [x]
        for j in range(count):
            p = f"denseblock{k}.denselayer{j + 1}."
            y = F.conv2d(F.relu(bn(torch.cat(features, 1), p + "norm1.")), sd[f"features.{p}conv1.weight"])
            features.append(F.conv2d(F.relu(bn(y, p + "norm2.")), sd[f"features.{p}conv2.weight"], padding=1))
        x = torch.cat(features, 1)
        if k == 1:
            low_level = x
        if k < 4:
            t = f"transition{k}."
            x = F.avg_pool2d(F.conv2d(F.relu(bn(x, t + "norm.")), sd[f"features.{t}conv.weight"]), 2, 2)
    return F.relu(bn(x, "norm5.")), low_level


def random_features(layout: Layout, *, seed: int) -> dict[str, torch.Tensor]:
    """`random_weights` for everything but the ImageNet classifier, which holds placeholders: VGG's fc6-fc8 alone are
    124 M numbers that no test reads."""
    head = ("fc.", "classifier.")
    state = random_weights({k: v for k, v in layout.items() if not k.startswith(head)}, seed=seed)
    return state | placeholder_weights({k: v for k, v in layout.items() if k.startswith(head)})


def _ours(state, backbone: str, **kw):
    sd = backbone_state_dict(state, backbone=backbone)
    with torch.device("meta"):  # no random init to pay for: the file's tensors are assigned
        module = BACKBONES[backbone](**kw)
    module.load_state_dict(sd, assign=True)  # strict: every one of our keys came from the file
    return module.eval()


# --------------------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", FAMILY)
def test_torchvision_names_fill_every_key_and_only_the_classifier_is_left(backbone):
    state = placeholder_weights(torchvision_layout(backbone))
    sd = backbone_state_dict(state, backbone=backbone)
    with torch.device("meta"):
        ours = BACKBONES[backbone]().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert all(sd[k] is state[k] for k in sd)
    head = "fc." if backbone.startswith("resnet") else "classifier."
    assert sorted(set(state) - set(sd)) == sorted(k for k in state if k.startswith(head))


@pytest.mark.parametrize("depth", [121, 161])
def test_densenet_dotted_names_of_the_first_files_load(depth):
    new = placeholder_weights(torchvision_densenet_layout(depth))
    old = placeholder_weights(torchvision_densenet_layout(depth, dotted=True))
    assert "features.denseblock1.denselayer1.norm.1.weight" in old and "features.transition1.norm.weight" in old
    sd_old = backbone_state_dict(old, backbone=f"densenet{depth}")
    assert sd_old.keys() == backbone_state_dict(new, backbone=f"densenet{depth}").keys()
    assert sd_old["features.denseblock2.denselayer3.conv2.weight"] is old["features.denseblock2.denselayer3.conv.2.weight"]


def test_a_sibling_file_is_named_in_the_error():
    with pytest.raises(CheckpointError, match="looks like torchvision's vgg16, not vgg16_bn; pass --backbone vgg16"):
        backbone_state_dict(placeholder_weights(torchvision_vgg_layout(16, batch_norm=False)), backbone="vgg16_bn")
    with pytest.raises(CheckpointError, match="looks like torchvision's vgg19_bn, not vgg13_bn"):
        backbone_state_dict(placeholder_weights(torchvision_vgg_layout(19, batch_norm=True)), backbone="vgg13_bn")
    with pytest.raises(CheckpointError, match=r"looks like densenet121 \(24 layers in dense block 3\), not densenet169"):
        backbone_state_dict(placeholder_weights(torchvision_densenet_layout(121)), backbone="densenet169")
    with pytest.raises(CheckpointError, match="missing in the file") as info:  # a ResNet-34 file is no ResNet-18
        backbone_state_dict(placeholder_weights(torchvision_resnet_layout(18)), backbone="resnet34")
    assert "layer1.2.conv1.weight" in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# Numbers: our backbone with the file's weights computes torchvision's forward
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, 34, 152])
def test_torchvision_resnet_files_compute_torchvision_forward(depth):
    state = random_features(torchvision_resnet_layout(depth), seed=depth)
    x = torch.randn(1, 3, 45, 37, generator=torch.Generator().manual_seed(1))
    grid = (1, 1) if depth == 18 else (1, 1, 1)
    with torch.no_grad():
        assert_same(_ours(state, f"resnet{depth}", output_stride=32, multi_grid=grid)(x)["out"],
                    reference_resnet(state, x, depth=depth), rtol=1e-5)
        if depth == 152:  # torchvision's own dilation rule, which its BasicBlock does not have
            ours = _ours(state, "resnet152", output_stride=8, multi_grid=grid)(x)["out"]
            assert_same(ours, reference_resnet(state, x, depth=152, replace_stride_with_dilation=(False, True, True)),
                        rtol=1e-5)


@pytest.mark.parametrize("backbone", ["vgg16", "vgg16_bn", "vgg11_bn", "vgg19"])
def test_torchvision_vgg_files_compute_torchvision_features_and_deeplab_v1s_network(backbone):
    depth, batch_norm = int(backbone[3:5]), backbone.endswith("_bn")
    state = random_features(torchvision_vgg_layout(depth, batch_norm=batch_norm), seed=depth)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))  # multiples of 32: torchvision's pools
    with torch.no_grad():
        ours = _ours(state, backbone, output_stride=32)(x)
        ref, ref_low = reference_vgg(state, x, depth=depth, batch_norm=batch_norm)
        assert_same(ours["out"], ref, rtol=1e-5)
        assert_same(ours["low_level"], ref_low, rtol=1e-5)
        v1 = _ours(state, backbone, output_stride=8)(x)["out"]
        assert_same(v1, reference_vgg(state, x, depth=depth, batch_norm=batch_norm, deeplab_v1=True)[0], rtol=1e-5)


@pytest.mark.parametrize("depth,dotted", [(121, False), (121, True), (161, False)])
def test_torchvision_densenet_files_compute_torchvision_features(depth, dotted):
    # Output stride 32 at sizes that are multiples of 32, where torchvision's floor-mode pools are ours; the dilated
    # strides are pinned by test_family.py (the dilated network computes the strided network's features).
    state = random_features(torchvision_densenet_layout(depth, dotted=dotted), seed=depth)
    plain = {k.replace("norm.1.", "norm1.").replace("norm.2.", "norm2.").replace("conv.1.", "conv1.").replace("conv.2.", "conv2."): v
             for k, v in state.items()}
    x = torch.randn(1, 3, 64, 96 if depth == 121 else 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = _ours(state, f"densenet{depth}", output_stride=32)(x)
        ref, ref_low = reference_densenet(plain, x, depth=depth)
    assert_same(ours["out"], ref, rtol=1e-5)
    assert_same(ours["low_level"], ref_low, rtol=1e-5)


def test_convert_builds_a_v1_largefov_model_on_a_torchvision_vgg16_file(tmp_path, capsys):
    path = tmp_path / "vgg16-397923af.pth"
    state = random_features(torchvision_vgg_layout(16, batch_norm=False), seed=5)
    torch.save(state, path)
    model = convert_file(path, backbone="vgg16", head="v1-largefov", output_stride=8, num_classes=21)
    assert (model.config.head, model.config.output_stride, model.config.rates, model.config.decoder) == ("v1-largefov", 8, (12,), False)
    assert torch.equal(model.backbone.features[28].weight, state["features.28.weight"])
    assert sum(p.numel() for p in model.parameters()) == 20_505_429
    out = tmp_path / "v1.pt"
    assert main(["convert", str(path), str(out), "--backbone", "vgg16", "--head", "v2-aspp", "--output-stride", "8"]) == 0
    assert "head v2-aspp, rates (6, 12, 18, 24), no decoder" in capsys.readouterr().out
    dense = tmp_path / "densenet121-a639ec97.pth"
    torch.save(placeholder_weights(torchvision_densenet_layout(121, dotted=True)), dense)
    assert main(["convert", str(dense), str(out), "--backbone", "densenet121", "--head", "v3"]) == 0
    assert "head v3, rates (6, 12, 18), no decoder" in capsys.readouterr().out
    assert main(["convert", str(dense), str(out), "--backbone", "densenet121", "--head", "v1-largefov", "--decoder"]) == 2
    assert "--head v1-largefov has no decoder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# torchvision's own modules, where torchvision can be imported
# --------------------------------------------------------------------------------------------------------------


def _import_torchvision():
    """torchvision's Python modules, on a CPU-only torch whose build its compiled ops do not match: they import once
    the two operator schemas its `_meta_registrations` refers to exist (defined here, never by the library)."""
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    try:
        import torchvision.models
    except Exception as e:  # not installed, or not importable on this torch
        pytest.skip(f"torchvision cannot be imported here ({type(e).__name__}: {str(e)[:80]})")
    return torchvision.models, lib


@pytest.fixture(scope="module")
def tv_models():
    models, lib = _import_torchvision()
    yield models
    del lib


def _torchvision_features(net, name, x, dilated=False):
    if name.startswith("vgg"):
        return net.features(x)
    if name.startswith("densenet"):
        return F.relu(net.features(x))
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn", "densenet121", "densenet161", "resnet18", "resnet34", "resnet152"])
def test_torchvision_modules_with_random_weights_convert_to_the_same_features(name, tv_models, tmp_path):
    torch.manual_seed(0)
    dilated = name == "resnet152"
    kw = {"replace_stride_with_dilation": [False, True, True]} if dilated else {}
    net = getattr(tv_models, name)(weights=None, **kw).eval()
    for m in net.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    path = tmp_path / f"{name}.pth"
    torch.save(net.state_dict(), path)
    grid = {"multi_grid": (1,) * len(net.layer4)} if name.startswith("resnet") else {}
    ours = _ours(path, name, output_stride=8 if dilated else 32, **grid)
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        ref, out = _torchvision_features(net, name, x), ours(x)["out"]
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"{name}: max |ours - torchvision| / max |torchvision| = {err:.2e}")
    assert out.shape == ref.shape and err <= 1e-5
    assert out.shape[-2:] == (math.ceil(96 / (8 if dilated else 32)), math.ceil(64 / (8 if dilated else 32)))
    if not (dilated or name.startswith("vgg")):
        # At output stride 8 (which torchvision's DenseNet and BasicBlock cannot build), every 4th position.
        with torch.no_grad():
            out8 = _ours(path, name, output_stride=8, **grid)(x)["out"][..., ::4, ::4]
        err8 = ((out8 - ref).abs().max() / ref.abs().max()).item()
        print(f"{name} at output stride 8, every 4th position: {err8:.2e}")
        assert err8 <= 1e-5
