"""Mixed precision: one training step of every backbone in every layout, under bf16 autocast against float32.

A bf16 step must not only run: the network must run in bf16, its loss must be the float32 loss (the float32 step of
the same weights on the same batch) to bf16 accuracy, and every gradient must reach the float32 parameters as
float32, finite. What the gradients are worth is checked by training: bf16 must learn as float32 does. CUDA runs the same matrix in bf16 and fp16 where a GPU is present.
"""

from __future__ import annotations

import copy

import pytest
import torch

from deeplab import ModelConfig, build_model
from deeplab.models.backbones import BACKBONES
from deeplab.training.losses import step_losses

# (decoder, separable): DeepLabv3+ with atrous separable ASPP and decoder, and plain DeepLabv3.
HEADS = {"v3plus-separable": (True, True), "v3-plain": (False, False)}
LAYOUTS = ("nchw", "channels_last")


def _batch(device: str, num_classes: int, *, size: int = 49, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, size, size, generator=g)
    masks = torch.randint(0, num_classes, (2, size, size), generator=g)
    masks[:, :4] = 255  # some ignored pixels, as real masks have
    return images.to(device), masks.to(device)


def _step(model, images, masks, *, amp: str, layout: str, **loss_options):
    """One training step's forward + backward (the library's own step_losses); the mean loss and the gradients."""
    model.zero_grad(set_to_none=True)
    loss_sum, count, point_sum, point_count = step_losses(
        model, images, masks, amp=amp, channels_last=layout == "channels_last", **loss_options
    )
    loss = loss_sum / count.clamp_min(1) + point_sum / point_count.clamp_min(1)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _check_against_float32(cfg: ModelConfig, *, device: str, amp: str, layout: str, size: int = 49,
                           **loss_options) -> None:
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    for m in model.modules():  # dropout draws differ between two steps; the comparison needs the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    images, masks = _batch(device, cfg.num_classes, size=size)
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    loss32, grads32 = _step(reference, images, masks, amp="off", layout=layout, **loss_options)
    torch.manual_seed(1)  # PointRend draws its training points: the same ones in both steps
    dtypes = []
    hook = model.backbone.register_forward_hook(lambda _m, _i, out: dtypes.append(out["out"].dtype))
    loss16, grads16 = _step(model, images, masks, amp=amp, layout=layout, **loss_options)
    hook.remove()
    amp_dtype = torch.bfloat16 if amp == "bf16" else torch.float16

    assert torch.isfinite(torch.tensor(loss16))
    assert abs(loss16 - loss32) <= 0.05 * abs(loss32) + 1e-3, (loss16, loss32)
    assert set(grads16) == set(grads32)
    missing = [n for n, g in grads16.items() if g is None]
    assert not missing, f"no gradient reached {missing[:3]}"
    assert all(g.dtype == torch.float32 for g in grads16.values()), "gradients must reach float32 parameters as float32"
    assert all(torch.isfinite(g).all() for g in grads16.values())
    assert dtypes and set(dtypes) == {amp_dtype}, f"the backbone ran in {dtypes}, not under {amp} autocast"
    assert len(dtypes) == (3 if loss_options.get("msc") else 1)  # MSC runs the network at three scales
    # Gradients are not compared layer by layer: the gradient of a randomly initialised network with training-mode
    # BatchNorm is chaotic at these sizes (a 1e-3 relative change of the input decorrelates the backbone's float32
    # gradient as much as bf16 rounding does). The layer that computes its own backward is compared exactly above;
    # test_bf16_training_learns_as_float32_does compares what the gradients do.
    # One SGD step moves the weights the same way it does in float32.
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("dilation", [2, 6])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_cpu_depthwise_backward_under_bf16_autocast_equals_autocast_through_conv2d(layout, dilation):
    # DepthwiseConv2d trains through its own autograd Function on CPU; under autocast it must compute what autocast
    # makes of a plain Conv2d (bf16 inputs and weights, float32 gradients for the float32 parameters).
    from deeplab.models.layers import DepthwiseConv2d

    torch.manual_seed(0)
    ours = DepthwiseConv2d(24, 24, 3, padding=dilation, dilation=dilation, groups=24, bias=True)
    plain = torch.nn.Conv2d(24, 24, 3, padding=dilation, dilation=dilation, groups=24, bias=True)
    plain.load_state_dict(ours.state_dict())
    memory = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 24, 21, 19).contiguous(memory_format=memory)
    results = []
    for conv in (ours, plain):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(xi)
        assert y.dtype == torch.bfloat16
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.float(), xi.grad, conv.weight.grad, conv.bias.grad))
    for a, b in zip(*results):
        assert a.dtype == b.dtype == torch.float32
        assert torch.allclose(a, b, rtol=0.02, atol=0.02 * float(b.abs().max())), float((a - b).abs().max())


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_a_bf16_training_step_matches_float32_on_cpu(backbone, layout, head, one_thread):
    decoder, separable = HEADS[head]
    cfg = ModelConfig(backbone=backbone, num_classes=5, decoder=decoder, separable=separable)
    # The VGG, DenseNet and ResNet-18/34/152 rows at 33x33: a third of the matrix, kept to a third of its time.
    size = 33 if backbone.startswith(("vgg", "densenet", "resnet18", "resnet34", "resnet152")) else 49
    _check_against_float32(cfg, device="cpu", amp="bf16", layout=layout, size=size)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backbone,head", [("vgg16", "v1-largefov"), ("vgg16_bn", "v2-aspp"), ("resnet18", "v2-aspp"),
                                           ("densenet121", "v1-largefov")])
def test_bf16_v1_and_v2_heads_train_on_cpu(backbone, head, layout, one_thread):
    _check_against_float32(ModelConfig(backbone=backbone, head=head, num_classes=5), device="cpu", amp="bf16",
                           layout=layout)


def test_bf16_msc_training_step_on_cpu(one_thread):
    # DeepLab v2's multi-scale training: three forward passes under autocast, the fused logits' loss in float32.
    _check_against_float32(ModelConfig(backbone="resnet18", head="v2-aspp", num_classes=5), device="cpu", amp="bf16",
                           layout="channels_last", msc=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_pointrend_and_hard_pixel_mining_train_on_cpu(layout, one_thread):
    cfg = ModelConfig(backbone="mobilenet_v2", num_classes=5, separable=True, pointrend=True,
                      pointrend_train_points=256)
    _check_against_float32(cfg, device="cpu", amp="bf16", layout=layout, hard_pixel_fraction=0.25)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_a_mixed_precision_training_step_matches_float32_on_cuda(backbone, layout, head, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    decoder, separable = HEADS[head]
    cfg = ModelConfig(backbone=backbone, num_classes=5, decoder=decoder, separable=separable)
    _check_against_float32(cfg, device="cuda", amp=amp, layout=layout)


@needs_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_pointrend_and_hard_pixel_mining_train_on_cuda(amp):
    cfg = ModelConfig(backbone="mobilenet_v2", num_classes=5, separable=True, pointrend=True,
                      pointrend_train_points=256)
    _check_against_float32(cfg, device="cuda", amp=amp, layout="channels_last", hard_pixel_fraction=0.25)


def test_bf16_training_learns_as_float32_does(tmp_path, one_thread):
    # The same run (same seed, same batches) in float32 and under bf16 autocast, MobileNetV2 with the separable
    # head: the dilated depthwise convs train through the library's own backward. bf16 must learn: its loss falls as
    # far as float32's (within 10% of it over the last steps).
    from dataclasses import replace

    from deeplab.training.config import TrainConfig
    from deeplab.training.loop import fit

    model = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.5, num_classes=6, separable=True,
                        aspp_channels=32, decoder_channels=32, low_level_channels=16, bn_momentum=0.1)
    base = TrainConfig(dataset="synthetic", crop_size=64, min_scale=1.0, max_scale=1.0, scale_step=0.0, batch_size=4,
                       steps=24, lr=0.05, weight_decay=4e-5, checkpoint_every=24, val_limit=2, val_images=1,
                       precise_bn_images=0, channels_last=True)
    curves = {}
    for amp in ("off", "bf16"):
        fit(model, replace(base, amp=amp), out_dir=tmp_path / amp, progress=False)
        with open(tmp_path / amp / "log.csv") as f:
            import csv

            curves[amp] = [float(r["loss"]) for r in csv.DictReader(f)]
    first, last = (sum(c[:4]) / 4 for c in curves.values()), (sum(c[-6:]) / 6 for c in curves.values())
    (first32, first16), (last32, last16) = first, last
    assert abs(first16 - first32) < 0.02 * first32  # the same start
    assert last32 < 0.8 * first32 and last16 < 0.8 * first16  # both learn
    assert abs(last16 - last32) < 0.15 * last32, (last16, last32)


def test_train_amp_bf16_from_the_command_line(tmp_path, capsys):
    from deeplab.cli import main

    quick = ["--dataset-options", "length=8", "--batch-size", "4", "--steps", "2", "--precise-bn-images", "4",
             "--quiet"]
    for layout in ("--channels-last", "--no-channels-last"):
        out = tmp_path / layout.strip("-")
        assert main(["train", "--amp", "bf16", layout, "--out", str(out), *quick]) == 0
        assert (out / "last.pt").is_file()
    assert "Traceback" not in capsys.readouterr().err
