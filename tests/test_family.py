"""The DeepLab family: v1's LargeFOV and v2's ASPP-L heads, and the VGG, DenseNet and ResNet-18/34/152 backbones.

Figures come from the papers (the v1 paper's 20.5 M parameters for DeepLab-LargeFOV, Table 2), the official Caffe
prototxts' layer settings, hand computation, and the atrous rule itself: a network whose strides are turned into
dilations must compute, on the strided network's positions, what the strided network computes.
"""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplab import ModelConfig, build_model
from deeplab.deploy.fast import optimize_for_inference
from deeplab.models.backbones import BACKBONES
from deeplab.models.backbones.densenet import DenseAveragePool
from deeplab.models.heads import ASPPL, LargeFOV

NEW_BACKBONES = ["resnet18", "resnet34", "resnet152", "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn",
                 "vgg16_bn", "vgg19_bn", "densenet121", "densenet161", "densenet169", "densenet201"]
# What `--head` accepts; "v3plus" is the v3 head with the decoder.
HEAD_NAMES = ["v1-largefov", "v2-aspp", "v3", "v3plus"]


def meta_model(**kw) -> nn.Module:
    with torch.device("meta"):
        return build_model(ModelConfig(**kw)).eval()


def _head_kwargs(head: str) -> dict:
    return {"head": "v3", "decoder": False} if head == "v3" else {"head": head}


# --------------------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------------------


def test_v1_largefov_on_vgg16_has_the_papers_20_5_million_parameters():
    # The v1 paper, Table 2: DeepLab-LargeFOV (fc6 3x3 at input stride 12, 1024 channels) has 20.5 M parameters.
    # By hand: VGG-16's 13 convs 14,714,688; fc6 512*1024*9 + 1024 = 4,719,616; fc7 1024*1024 + 1024 = 1,049,600;
    # fc8 1024*21 + 21 = 21,525; together 20,505,429.
    model = meta_model(backbone="vgg16", head="v1-largefov", output_stride=8, num_classes=21)
    params = sum(p.numel() for p in model.parameters())
    assert params == 20_505_429
    assert abs(params - 20.5e6) <= 0.01 * 20.5e6


def test_largefov_is_fc6_rate_12_then_fc7_then_fc8_with_dropout_half():
    model = meta_model(backbone="vgg16", head="v1-largefov", output_stride=8, num_classes=21)
    head = model.aspp
    assert isinstance(head, LargeFOV) and model.decoder is None and model.head_conv is None
    assert (head.fc6.kernel_size, head.fc6.dilation, head.fc6.padding) == ((3, 3), (12, 12), (12, 12))
    assert (head.fc6.in_channels, head.fc6.out_channels, head.fc7.kernel_size, head.fc7.out_channels) == (512, 1024, (1, 1), 1024)
    assert head.fc6.bias is not None and head.fc7.bias is not None  # Caffe's convolutions, no BatchNorm
    assert [type(m) for m in head] == [nn.Conv2d, nn.ReLU, nn.Dropout, nn.Conv2d, nn.ReLU, nn.Dropout]
    assert head.drop6.p == head.drop7.p == 0.5
    assert (model.classifier.in_channels, model.classifier.out_channels, model.classifier.kernel_size) == (1024, 21, (1, 1))


def test_vgg16_at_output_stride_8_is_the_v1_papers_network():
    # The DeepLab-LargeFOV prototxt: pool4 and pool5 3x3 stride 1 pad 1, conv5_1..conv5_3 at dilation 2; pool1-3 stride
    # 2 (torchvision's 2x2 here). torchvision's vgg16 features: convs at 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26,
    # 28; pools at 4, 9, 16, 23, 30.
    features = meta_model(backbone="vgg16", head="v1-largefov", output_stride=8).backbone.features
    pools = {i: (m.kernel_size, m.stride, m.padding) for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)}
    assert pools == {4: (2, 2, 0), 9: (2, 2, 0), 16: (2, 2, 0), 23: (3, 1, 1), 30: (3, 1, 1)}
    dilations = [m.dilation[0] for m in features if isinstance(m, nn.Conv2d)]
    assert dilations == [1] * 10 + [2] * 3
    os16 = meta_model(backbone="vgg16", output_stride=16).backbone.features
    assert [(os16[i].kernel_size, os16[i].stride) for i in (23, 30)] == [(2, 2), (3, 1)]
    assert [m.dilation[0] for m in os16 if isinstance(m, nn.Conv2d)] == [1] * 13


def test_aspp_l_on_vgg16_has_four_fc_branches_at_rates_6_12_18_24():
    model = meta_model(backbone="vgg16", head="v2-aspp", output_stride=8, num_classes=21)
    head = model.aspp
    assert isinstance(head, ASPPL) and isinstance(model.classifier, nn.Identity)
    assert [b.fc6.dilation[0] for b in head.branches] == [6, 12, 18, 24]
    for b in head.branches:
        assert [type(m) for m in b] == [nn.Conv2d, nn.ReLU, nn.Dropout, nn.Conv2d, nn.ReLU, nn.Dropout, nn.Conv2d]
        assert (b.fc6.out_channels, b.fc7.out_channels, b.fc8.out_channels, b.fc8.kernel_size) == (1024, 1024, 21, (1, 1))
        assert b.drop6.p == b.drop7.p == 0.5


def test_aspp_l_on_resnet101_is_four_3x3_convs_from_res5_to_the_classes_summed():
    model = meta_model(backbone="resnet101", head="v2-aspp", output_stride=8, num_classes=21)
    branches = model.aspp.branches
    assert [len(b) for b in branches] == [1] * 4  # no BN, no ReLU, no dropout
    assert [(b.conv.in_channels, b.conv.out_channels, b.conv.kernel_size, b.conv.dilation[0]) for b in branches] == [
        (2048, 21, (3, 3), r) for r in (6, 12, 18, 24)
    ]
    # The sum, computed here from the weights: a map tall enough that every rate reaches past the centre tap.
    torch.manual_seed(0)
    head = ASPPL(8, 3, rates=(1, 2, 5, 7), fc=False)
    x = torch.randn(2, 8, 17, 15)
    expected = sum(F.conv2d(x, b.conv.weight, b.conv.bias, padding=r, dilation=r) for b, r in zip(head.branches, (1, 2, 5, 7)))
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "head,rates", [("v1-largefov", {8: (12,), 16: (6,), 32: (3,)}), ("v2-aspp", {8: (6, 12, 18, 24), 16: (3, 6, 9, 12), 32: (1, 3, 4, 6)})]
)
def test_v1_and_v2_rates_are_the_papers_at_output_stride_8_and_follow_the_stride(head, rates):
    for output_stride, expected in rates.items():
        model = meta_model(backbone="resnet50", head=head, output_stride=output_stride)
        convs = [model.aspp.fc6] if head == "v1-largefov" else [b.conv for b in model.aspp.branches]
        assert tuple(c.dilation[0] for c in convs) == expected == model.config.rates
    torch.manual_seed(0)
    m8 = build_model(ModelConfig(backbone="resnet18", head=head, output_stride=8, num_classes=3))
    assert m8.with_output_stride(16).config.rates == rates[16]


def test_head_names_and_what_belongs_to_the_v3_head():
    plus = ModelConfig(head="v3plus", decoder=False)
    assert (plus.head, plus.decoder) == ("v3", True)
    v1 = ModelConfig(head="v1-largefov", separable=True)  # decoder defaults to True: both recorded False
    assert (v1.decoder, v1.separable) == (False, False)
    assert ModelConfig.from_dict(v1.to_dict()) == v1
    old = ModelConfig().to_dict()
    del old["head"]  # a checkpoint written before heads were selectable
    assert ModelConfig.from_dict(old).head == "v3"
    with pytest.raises(ValueError, match="head must be one of .*v1-largefov.*got 'v4'"):
        ModelConfig(head="v4")
    with pytest.raises(ValueError, match="head_conv belongs to the v3 head"):
        ModelConfig(head="v2-aspp", head_conv=True)
    with pytest.raises(ValueError, match="one rate"):
        ModelConfig(head="v1-largefov", atrous_rates=(6, 12))
    from deeplab.training.config import default_weight_decay

    assert default_weight_decay("vgg16") == 5e-4  # DeepLab v1/v2's Caffe solvers


def test_v1_and_v2_logits_layers_start_as_the_prototxts_fc8():
    # fc8 (v1, v2 on VGG) and v2's ResNet branches: Gaussian std 0.01, zero bias; the first loss is then log(classes).
    torch.manual_seed(0)
    for cfg in (ModelConfig(backbone="vgg11", head="v1-largefov", num_classes=5),
                ModelConfig(backbone="resnet18", head="v2-aspp", num_classes=5)):
        model = build_model(cfg)
        logits = [model.classifier] if cfg.head == "v1-largefov" else model.aspp.logits_layers()
        for conv in logits:
            assert 0.008 < conv.weight.std() < 0.012 and torch.count_nonzero(conv.bias) == 0
        loss = F.cross_entropy(model.train()(torch.randn(2, 3, 33, 33)), torch.randint(0, 5, (2, 33, 33)))
        assert abs(loss.item() - math.log(5)) < 0.2


@pytest.mark.parametrize("backbone,head,output_stride", list(itertools.product(sorted(BACKBONES), ["v1-largefov", "v2-aspp"], (8, 32))))
def test_v1_and_v2_heads_on_every_backbone_return_logits_at_input_size(backbone, head, output_stride):
    model = meta_model(backbone=backbone, head=head, output_stride=output_stride, num_classes=7)
    assert tuple(model(torch.empty(1, 3, 65, 97, device="meta")).shape) == (1, 7, 65, 97)


# --------------------------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone,grid", [("resnet18", (1, 1)), ("resnet34", (1, 1, 1)), ("densenet121", None)])
def test_dilated_network_computes_the_strided_networks_features_on_its_positions(backbone, grid):
    # The atrous rule the DeepLab papers rest on: with the same weights, the output-stride-8 network's output, read
    # every 4th position, is the output-stride-32 network's output. It holds exactly (up to float rounding) for the
    # BasicBlock's two dilated convs and for DenseNet's stride-1 transition pooling, at even and odd sizes.
    torch.manual_seed(0)
    kw = {} if grid is None else {"multi_grid": grid}
    strided = BACKBONES[backbone](output_stride=32, **kw).eval()
    for m in strided.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    dilated = BACKBONES[backbone](output_stride=8, **kw).eval()
    dilated.load_state_dict(strided.state_dict())
    for size in [(64, 96), (65, 49)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            ref, out = strided(x)["out"], dilated(x)["out"]
        assert out.shape[-2:] == (math.ceil(size[0] / 8), math.ceil(size[1] / 8))
        assert (out[..., ::4, ::4] - ref).abs().max() <= 1e-5 * ref.abs().max()


def _basic_rates(model, layer):
    return [(u.conv1.stride[0], u.conv1.dilation[0], u.conv2.dilation[0]) for u in getattr(model.backbone, layer)]


def test_resnet18_basic_blocks_dilate_both_convs():
    # (stride, conv1 rate, conv2 rate). The unit whose stride is removed: conv1 at the previous rate, conv2 at the new
    # one. Multi-grid (1, 2) on the two units of layer4.
    m8 = meta_model(backbone="resnet18", output_stride=8)
    assert _basic_rates(m8, "layer2") == [(2, 1, 1), (1, 1, 1)]
    assert _basic_rates(m8, "layer3") == [(1, 1, 2), (1, 2, 2)]
    assert _basic_rates(m8, "layer4") == [(1, 2, 4), (1, 4 * 2, 4 * 2)]
    m32 = meta_model(backbone="resnet18", output_stride=32)
    assert _basic_rates(m32, "layer4") == [(2, 1, 1), (1, 2, 2)]
    assert m8.backbone.channels == {"low_level": 64, "out": 512}
    assert [type(u).__name__ for u in m8.backbone.layer1] == ["BasicBlock"] * 2
    assert m8.backbone.layer1[0].downsample is None and m8.backbone.layer2[0].downsample is not None


def test_densenet_transitions_keep_their_pools_until_the_output_stride_then_dilate():
    b8 = meta_model(backbone="densenet121", output_stride=8).backbone.features
    assert isinstance(b8.transition1.pool, nn.AvgPool2d) and b8.transition1.pool.stride == 2
    assert [getattr(b8, f"transition{k}").pool.dilation for k in (2, 3)] == [1, 2]
    rates = [{layer.conv2.dilation[0] for layer in getattr(b8, f"denseblock{k}").values()} for k in (1, 2, 3, 4)]
    assert rates == [{1}, {1}, {2}, {4}]
    b16 = meta_model(backbone="densenet161", output_stride=16).backbone
    assert isinstance(b16.features.transition2.pool, nn.AvgPool2d) and b16.features.transition3.pool.dilation == 1
    assert b16.channels == {"low_level": 96 + 6 * 48, "out": 2208}


def test_dense_average_pool_by_hand():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    # Strided ceil-mode 2x2 pool of [[0 1 2] [3 4 5] [6 7 8]]: mean(0,1,3,4) = 2, mean(2,5) = 3.5, mean(6,7) = 6.5, 8.
    assert F.avg_pool2d(x, 2, 2, ceil_mode=True).flatten().tolist() == [2.0, 3.5, 6.5, 8.0]
    dense = DenseAveragePool(dilation=1)(x)
    assert dense.shape == x.shape
    assert dense[0, 0, ::2, ::2].flatten().tolist() == [2.0, 3.5, 6.5, 8.0]
    assert dense[0, 0, 1].tolist() == [5.0, 6.0, 6.5]  # mean(3,4,6,7), mean(4,5,7,8), mean(5,8)
    # Dilation 2 on a 1x5 row [0 1 2 3 4]: taps 2 apart, mean(0,2), mean(1,3), mean(2,4), then 3 and 4 alone.
    row = torch.arange(5.0).view(1, 1, 1, 5)
    assert DenseAveragePool(dilation=2)(row).flatten().tolist() == [1.0, 2.0, 3.0, 3.0, 4.0]


# --------------------------------------------------------------------------------------------------------------
# Every new backbone with every head: builds, trains a step, exports to ONNX, runs the fast path
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone,head", list(itertools.product(NEW_BACKBONES, HEAD_NAMES)))
def test_every_new_backbone_with_every_head_trains_exports_and_runs_the_fast_path(backbone, head, one_thread):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from test_fast import _randomise_bn

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, num_classes=3, output_stride=16, **_head_kwargs(head)))
    assert model.config.decoder == (head == "v3plus")
    # One SGD step: finite loss, a gradient into the first and the last layer.
    model.train()
    loss = F.cross_entropy(model(torch.randn(2, 3, 33, 33)), torch.randint(0, 3, (2, 33, 33)))
    loss.backward()
    first = next(model.backbone.parameters())
    assert torch.isfinite(loss) and first.grad is not None and first.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.01).step()

    model = _randomise_bn(model)
    f = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 3, 33, 33),), f, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}}, dynamo=False, do_constant_folding=False)
    x = torch.randn(1, 3, 41, 35)  # a size the export never saw
    with torch.no_grad():
        expected = model(x)
        fast = optimize_for_inference(model)(x)
    got = torch.from_numpy(ort.InferenceSession(f.getvalue()).run(None, {"image": x.numpy()})[0])
    scale = expected.abs().max()
    assert got.shape == fast.shape == expected.shape == (1, 3, 41, 35)
    assert (got - expected).abs().max() <= 1e-4 * scale and (fast - expected).abs().max() <= 1e-5 * scale


def test_pointrend_on_a_v2_head_and_a_stride_4_tap_of_a_new_backbone():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="vgg11_bn", head="v2-aspp", num_classes=3, pointrend=True,
                                    pointrend_train_points=64))
    out = model.train()(torch.randn(2, 3, 49, 49))
    assert out["logits"].shape == (2, 3, 49, 49) and out["point_logits"].shape == (2, 3, 64)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 49, 49)).shape == (1, 3, 49, 49)


# --------------------------------------------------------------------------------------------------------------
# DeepLab v2's multi-scale training (MSC)
# --------------------------------------------------------------------------------------------------------------


def test_msc_fuses_by_elementwise_max_and_sums_the_four_mean_losses():
    from deeplab.training.losses import msc_fused_logits, msc_pixel_loss

    g = torch.Generator().manual_seed(0)
    full = torch.randn(1, 2, 5, 5, generator=g)
    # Constant maps at 3/4 and 1/2 size: resizing them changes nothing, so the fusion is max(full, constant) per class.
    three_quarter = torch.tensor([0.5, -0.2]).view(1, 2, 1, 1).expand(1, 2, 4, 4).clone()
    half = torch.tensor([-0.3, 0.4]).view(1, 2, 1, 1).expand(1, 2, 3, 3).clone()
    fused = msc_fused_logits([full, three_quarter, half])
    assert torch.equal(fused[0, 0], full[0, 0].clamp_min(0.5)) and torch.equal(fused[0, 1], full[0, 1].clamp_min(0.4))

    masks = torch.tensor([[[0, 1, 1, 0, 255], [1, 1, 0, 0, 1], [0, 255, 1, 1, 0], [1, 0, 0, 1, 1], [0, 1, 255, 0, 1]]])
    # Labels at 4x4 and 3x3, corners aligned: rows and columns round(i * 4 / 3) = 0, 1, 3, 4 and 0, 2, 4.
    at_4 = masks[:, [0, 1, 3, 4]][:, :, [0, 1, 3, 4]]
    at_3 = masks[:, ::2, ::2]
    expected = sum(
        F.cross_entropy(y, t, ignore_index=255) for y, t in ((full, masks), (three_quarter, at_4), (half, at_3), (fused, masks))
    )
    total, count = msc_pixel_loss([full, three_quarter, half], masks)
    assert count == 22  # the 5x5 map's valid pixels
    assert total / count == pytest.approx(expected.item(), rel=1e-6)


def test_msc_training_step_runs_the_model_at_the_v2_scales():
    from deeplab.training.losses import msc_pixel_loss, scaled_size, step_losses

    assert (scaled_size(513, 0.75), scaled_size(513, 0.5), scaled_size(321, 0.75), scaled_size(321, 0.5)) == (385, 257, 241, 161)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    sizes = []
    conv.register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[-2:])))
    images, masks = torch.randn(2, 3, 9, 13), torch.randint(0, 4, (2, 9, 13))
    loss_sum, count, point_sum, _ = step_losses(conv, images, masks, msc=True)
    assert sizes == [(9, 13), (7, 10), (5, 7)]
    with torch.no_grad():
        outs = [conv(images)] + [conv(F.interpolate(images, size=s, mode="bilinear", align_corners=True)) for s in [(7, 10), (5, 7)]]
        ref_sum, ref_count = msc_pixel_loss(outs, masks)
    assert count == ref_count == 2 * 9 * 13 and loss_sum.item() == pytest.approx(ref_sum.item(), rel=1e-6)
    assert point_sum.item() == 0
    plain, _, _, _ = step_losses(conv, images, masks)
    assert loss_sum.item() > 3 * plain.item()  # four terms of similar size


def test_train_v2_aspp_with_msc_and_v1_largefov_from_the_command_line(tmp_path, capsys, one_thread):
    import csv
    import json

    from deeplab.cli import main

    quick = ["--dataset-options", "length=4", "--batch-size", "2", "--steps", "2", "--crop-size", "33",
             "--precise-bn-images", "0", "--val-limit", "2", "--lr", "0.001", "--quiet"]
    runs = {"v2": ["--head", "v2-aspp", "--backbone", "resnet18", "--msc", "--output-stride", "8"],
            "v1": ["--head", "v1-largefov", "--backbone", "vgg11"],
            "v3": ["--head", "v3", "--backbone", "resnet18"]}
    for name, flags in runs.items():
        assert main(["train", *flags, *quick, "--out", str(tmp_path / name)]) == 0
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        with open(tmp_path / name / "log.csv") as f:
            assert all(math.isfinite(float(r["loss"])) for r in csv.DictReader(f))
        assert cfg["model"]["head"] == {"v2": "v2-aspp", "v1": "v1-largefov", "v3": "v3"}[name]
        assert cfg["model"]["decoder"] is False  # --head v3 alone is DeepLabv3
        assert cfg["model"]["depth_multiplier"] == 1.0  # the synthetic preset's 0.5 is its MobileNetV2's
    assert cfg["train"]["msc"] is False and json.loads((tmp_path / "v2" / "config.json").read_text())["train"]["msc"]
    out = capsys.readouterr().out
    assert "model: DeepLab v2 ASPP-L (MSC training) resnet18, output stride 8" in out
    assert "model: DeepLab v1 LargeFOV vgg11" in out and "model: DeepLabv3 resnet18" in out
    assert main(["train", "--head", "v1-largefov", "--decoder", *quick, "--out", str(tmp_path / "x")]) == 2
    assert "--head v1-largefov has no decoder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--head", "v4"])
    assert "invalid choice: 'v4'" in capsys.readouterr().err


def test_profile_prints_the_v1_and_v2_heads(capsys):
    import json

    from deeplab.cli import main

    assert main(["profile", "--head", "v1-largefov", "--backbone", "vgg16", "--output-stride", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["head"], out["params"], out["paper_reference"]) == ("v1-largefov", 20_505_429, None)
    assert main(["profile", "--head", "v2-aspp", "--backbone", "resnet101", "--output-stride", "8"]) == 0
    text = capsys.readouterr().out
    # ResNet-101 (42,500,160) and four 3x3 convs 2048 -> 21 with biases (4 * 387,093).
    assert "DeepLab v2 ASPP-L resnet101, output stride 8, ASPP rates (6, 12, 18, 24)" in text and "44.05 M" in text
