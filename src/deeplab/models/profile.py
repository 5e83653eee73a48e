"""Parameters and multiply-adds of a configuration, counted three ways, with no weights (on the meta device).

- `multiply_adds`: the work this implementation performs, one per multiply-accumulate of every convolution and
  linear layer (out_h * out_w * out_channels * in_channels / groups * kh * kw).
- `multiply_adds_effective`: the same, counting only filter taps that read inside the feature map (at large atrous
  rates most taps of a 3x3 read padding).
- `multiply_adds_paper`: the DeepLabv3+ paper's convention. TF ran atrous convolution as space-to-batch on a feature
  map padded up to a multiple of the rate, and its profiler counted that padded work: a dilated conv with rate r
  counts ceil(H / r) * r by ceil(W / r) * r output positions instead of H by W.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .config import ModelConfig
from .model import build_model

# The DeepLabv3+ paper's multiply-adds (billions) at 513x513 and 21 classes. Keys: (backbone, output stride,
# decoder, separable). ResNet-101: Table 3; Xception-65: Table 5.
PAPER_MULTIPLY_ADDS = {
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


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # "conv" or "linear"
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    multiply_adds: int
    multiply_adds_effective: int
    multiply_adds_paper: int


def _taps_inside(size_in: int, size_out: int, kernel: int, stride: int, dilation: int, padding: int) -> int:
    """Sum over kernel taps of the output positions whose input for that tap lies inside [0, size_in)."""
    total = 0
    for k in range(kernel):
        offset = k * dilation - padding
        # Output positions y with 0 <= y * stride + offset < size_in.
        lo = max(0, math.ceil(-offset / stride))
        hi = min(size_out - 1, (size_in - 1 - offset) // stride)
        total += max(0, hi - lo + 1)
    return total


def _conv_cost(name: str, m: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> LayerCost:
    n, c_in, h_in, w_in = x.shape
    _, c_out, h_out, w_out = y.shape
    kh, kw = m.kernel_size
    sh, sw = m.stride
    dh, dw = m.dilation
    ph, pw = m.padding if isinstance(m.padding, tuple) else (0, 0)
    per_tap = n * c_out * (c_in // m.groups)
    nominal = per_tap * h_out * w_out * kh * kw
    effective = per_tap * _taps_inside(h_in, h_out, kh, sh, dh, ph) * _taps_inside(w_in, w_out, kw, sw, dw, pw)
    # Space-to-batch pads the map to a multiple of the rate (per dimension; a rate of 1 pads nothing).
    hp = math.ceil(h_out / dh) * dh if dh > 1 else h_out
    wp = math.ceil(w_out / dw) * dw if dw > 1 else w_out
    paper = per_tap * hp * wp * kh * kw
    return LayerCost(
        name, "conv", tuple(x.shape), tuple(y.shape), (kh, kw), (sh, sw), (dh, dw), m.groups, nominal, effective, paper
    )


def _linear_cost(name: str, m: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> LayerCost:
    macs = x.numel() // m.in_features * m.in_features * m.out_features
    return LayerCost(name, "linear", tuple(x.shape), tuple(y.shape), (1, 1), (1, 1), (1, 1), 1, macs, macs, macs)


def layer_costs(model: nn.Module, *, size: tuple[int, int] = (513, 513), batch: int = 1) -> list[LayerCost]:
    """Run `model` once on a (batch, 3, H, W) input on the model's device and record every conv and linear layer."""
    costs: list[LayerCost] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(lambda m, i, o, n=name: costs.append(_conv_cost(n, m, i[0], o))))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(lambda m, i, o, n=name: costs.append(_linear_cost(n, m, i[0], o))))
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(batch, 3, *size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return costs


@dataclass(frozen=True)
class Profile:
    backbone: str
    output_stride: int
    head: str
    decoder: bool
    separable: bool
    size: tuple[int, int]
    num_classes: int
    params: int
    multiply_adds: int
    multiply_adds_effective: int
    multiply_adds_paper: int
    paper_reference: float | None  # billions, from the DeepLabv3+ paper, when the paper reports this configuration

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        if self.paper_reference is not None:
            d["paper_relative_error"] = self.multiply_adds_paper / (self.paper_reference * 1e9) - 1.0
        return d


def profile_model(cfg: ModelConfig, *, size: tuple[int, int] = (513, 513)) -> tuple[Profile, list[LayerCost]]:
    """Count parameters and multiply-adds of `cfg` on the meta device (no memory, no weights, well under a second)."""
    with torch.device("meta"):
        model = build_model(cfg)
    costs = layer_costs(model, size=size)
    key = (_paper_backbone(cfg.backbone), cfg.output_stride, cfg.decoder, cfg.separable)
    paper = PAPER_MULTIPLY_ADDS.get(key) if size == (513, 513) and cfg.num_classes == 21 and cfg.head == "v3" else None
    result = Profile(
        backbone=cfg.backbone,
        output_stride=cfg.output_stride,
        head=cfg.head,
        decoder=cfg.decoder,
        separable=cfg.separable,
        size=tuple(size),
        num_classes=cfg.num_classes,
        params=sum(p.numel() for p in model.parameters()),
        multiply_adds=sum(c.multiply_adds for c in costs),
        multiply_adds_effective=sum(c.multiply_adds_effective for c in costs),
        multiply_adds_paper=sum(c.multiply_adds_paper for c in costs),
        paper_reference=paper,
    )
    return result, costs


def _paper_backbone(name: str) -> str:
    # The paper's ResNet-101 is TF's resnet_v1_101_beta; only that layout is compared with its table.
    return name


def paper_table(*, size: tuple[int, int] = (513, 513)) -> list[dict]:
    """Every configuration the paper reports, with our counts beside the paper's figure."""
    rows = []
    for (backbone, os_, decoder, separable), paper in PAPER_MULTIPLY_ADDS.items():
        cfg = ModelConfig(backbone=backbone, output_stride=os_, decoder=decoder, separable=separable, num_classes=21)
        prof, _ = profile_model(cfg, size=size)
        rows.append(prof.to_dict())
    return rows
