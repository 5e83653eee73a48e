"""PointRend (Kirillov et al., "PointRend: Image Segmentation as Rendering", CVPR 2020) on DeepLab.

The DeepLab output is the *coarse* prediction (stride 16/8 for DeepLabv3, 4 for DeepLabv3+). A point head, a small
MLP run on individual points, predicts the labels of chosen points from two point-wise features, both sampled by
bilinear interpolation at the points' real-valued coordinates: the fine-grained stride-4 backbone feature (the
decoder's low-level tap) and the coarse prediction's K logits. As in the paper's semantic segmentation setting
(and detectron2's `StandardPointHead`), the MLP has three hidden layers of 256 channels (1x1 convolutions over the
points, ReLU), and the coarse logits are concatenated to the input of every layer.

Training (paper §3.1, "point selection"): over-generate k*N uniformly random points (k = 3), keep the beta*N
(beta = 0.75) most uncertain under the coarse prediction, and fill up with (1 - beta)*N uniform points. Uncertainty
is minus the gap between the two largest coarse logits. The point loss is the cross entropy at those points
against the ground truth label there (nearest sample, ignore label excluded), added to the main loss.

Inference (paper §3.1, "adaptive subdivision"): start from the coarse logits; at each step upsample 2x bilinearly,
pick the N most uncertain points of the upsampled map, recompute their logits with the point head and write them
in; stop at the input resolution, where the final map is resized to exactly the input size. Everything is batched.

Coordinates are normalised (x, y) in [0, 1] with pixel centres at (i + 0.5) / size, i.e. ``grid_sample`` with
``align_corners=False``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def point_sample(features: torch.Tensor, coords: torch.Tensor, *, mode: str = "bilinear") -> torch.Tensor:
    """Sample (N, C, H, W) `features` at (N, P, 2) normalised (x, y) `coords` in [0, 1] -> (N, C, P)."""
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(features.dtype)  # (N, P, 1, 2) in grid_sample's [-1, 1]
    return F.grid_sample(features, grid, mode=mode, padding_mode="border", align_corners=False).squeeze(3)


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Minus the gap between the two largest class logits along dim 1 (higher = more uncertain)."""
    if logits.shape[1] == 1:
        return -logits[:, 0].abs()
    top2 = logits.topk(2, dim=1).values
    return top2[:, 1] - top2[:, 0]


def training_points(
    coarse: torch.Tensor, num_points: int, *, oversample: float = 3.0, importance: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(N, P, 2) training points: the `importance` share most uncertain of `oversample`*P random ones, rest uniform."""
    n = coarse.shape[0]
    num_sampled = int(num_points * oversample)
    candidates = torch.rand(n, num_sampled, 2, device=coarse.device, generator=generator)
    scores = uncertainty(point_sample(coarse.detach().float(), candidates))  # (N, kP)
    num_uncertain = int(importance * num_points)
    idx = scores.topk(num_uncertain, dim=1).indices  # (N, beta*P)
    chosen = torch.gather(candidates, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        chosen = torch.cat([chosen, torch.rand(n, num_random, 2, device=coarse.device, generator=generator)], dim=1)
    return chosen


def point_labels(target: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """The (N, H, W) integer labels at (N, P, 2) points, nearest pixel -> (N, P) int64."""
    sampled = point_sample(target[:, None].float(), coords, mode="nearest")
    return sampled[:, 0].round().long()


class PointHead(nn.Module):
    """The point MLP: [fine feature, coarse logits] -> 256 -> 256 -> 256 -> K, coarse logits fed to every layer."""

    def __init__(self, fine_channels: int, num_classes: int, *, channels: int = 256, layers: int = 3) -> None:
        super().__init__()
        self.fcs = nn.ModuleList()
        c = fine_channels
        for _ in range(layers):
            self.fcs.append(nn.Conv1d(c + num_classes, channels, 1))
            c = channels
        self.predictor = nn.Conv1d(c + num_classes, num_classes, 1)
        for fc in self.fcs:
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """(N, C, P) fine features and (N, K, P) coarse logits at the same points -> (N, K, P) logits."""
        x = fine
        for fc in self.fcs:
            x = F.relu(fc(torch.cat([x, coarse], dim=1)))
        return self.predictor(torch.cat([x, coarse], dim=1))


def subdivision_steps(coarse_size: tuple[int, int], out_size: tuple[int, int]) -> int:
    """How many 2x upsamplings take the coarse map to at least the output size."""
    ratio = max(out_size[0] / coarse_size[0], out_size[1] / coarse_size[1])
    return max(0, math.ceil(math.log2(ratio) - 1e-9))


def subdivide(
    head: PointHead,
    coarse: torch.Tensor,
    fine: torch.Tensor,
    out_size: tuple[int, int],
    *,
    num_points: int = 8192,
    steps: int | None = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Adaptive subdivision: refine `coarse` (N, K, h, w) logits up to `out_size`; returns (N, K, *out_size).

    `steps` (default: as many 2x steps as reach `out_size`) bounds the refinement; at each step the `num_points`
    most uncertain points of the upsampled map are recomputed by the point head. The points' coarse features are
    sampled from the original coarse prediction, as in the paper.
    """
    logits = coarse
    steps = subdivision_steps(tuple(coarse.shape[-2:]), out_size) if steps is None else int(steps)
    n, k = coarse.shape[:2]
    for _ in range(steps):
        h, w = logits.shape[-2] * 2, logits.shape[-1] * 2
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=align_corners)
        p = min(num_points, h * w)
        flat_idx = uncertainty(logits).view(n, h * w).topk(p, dim=1).indices  # (N, P)
        ys = (flat_idx // w).to(coarse.dtype)
        xs = (flat_idx % w).to(coarse.dtype)
        coords = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], dim=-1)  # (N, P, 2) pixel centres
        refined = head(point_sample(fine, coords), point_sample(coarse, coords))  # (N, K, P)
        logits = logits.reshape(n, k, h * w).scatter(2, flat_idx.unsqueeze(1).expand(-1, k, -1), refined.to(logits.dtype))
        logits = logits.view(n, k, h, w)
    if tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=align_corners)
    return logits


def point_loss(
    point_logits: torch.Tensor, coords: torch.Tensor, target: torch.Tensor, *, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the cross entropy at the points, number of counted points), as `deeplab.training.loop.pixel_loss`."""
    labels = point_labels(target, coords)
    loss = F.cross_entropy(point_logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()
