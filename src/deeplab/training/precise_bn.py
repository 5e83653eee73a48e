"""BatchNorm statistics that match the weights (detectron2's PreciseBN, computed exactly).

During training a BN layer's running statistics are an exponential average over past batches, computed with past
weights. With a slow average (TF's decay 0.9997, or the 0.99 of a fine-tuning recipe) and weights still moving, they
describe a network that no longer exists, and the eval-mode model can predict one class everywhere while the
training loss falls normally. `recompute_bn_statistics` replaces them with the statistics of the current weights:
every BN layer runs in training mode (so each normalises with its batch's statistics and the layers after it see
what they see in training), the rest of the model in eval mode (no dropout, no PointRend point sampling, no draw
from torch's random generator), and each layer's running mean and variance become the mean and the unbiased
variance of its input over all pixels of all the images given: pooled exactly (Chan et al.'s parallel formula in
float64), not an average of per-batch variances. Under torch.distributed the pools of all processes are combined.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["batchnorm_layers", "recompute_bn_statistics"]


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BN layers that keep running statistics, by name."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


class _Pool:
    """Count, mean and sum of squared deviations per channel, merged batch by batch in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        dims = [d for d in range(x.ndim) if d != 1]
        n_b = x.numel() // x.shape[1]
        var_b, mean_b = torch.var_mean(x.detach(), dim=dims, correction=0)
        mean_b, m2_b = mean_b.double(), var_b.double() * n_b
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * n_b / n)
        self.n = n


def _all_reduce_pool(pool: _Pool) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    device = pool.mean.device if dist.get_backend() != "gloo" else torch.device("cpu")
    local_n = torch.tensor([float(pool.n)], dtype=torch.float64, device=device)
    total = local_n.clone()
    dist.all_reduce(total)
    weighted = (pool.mean.to(device) * local_n)
    dist.all_reduce(weighted)
    mean = weighted / total
    # Each process's M2 about the global mean, summed: exact, no E[x^2] - mean^2 cancellation.
    m2 = pool.m2.to(device) + local_n * (pool.mean.to(device) - mean) ** 2
    dist.all_reduce(m2)
    pool.n, pool.mean, pool.m2 = int(total.item()), mean, m2


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every BN layer's running mean and variance to its input statistics over `batches` ((N, 3, H, W) images,
    already on the model's device and dtype); returns the number of images used. The model's training flags and
    every parameter are left as they were; only the BN buffers (and `num_batches_tracked`) change."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    pools = {name: _Pool() for name in layers}
    flags = {m: m.training for m in model.modules()}
    handles = [bn.register_forward_pre_hook(lambda _m, inp, name=name: pools[name].add(inp[0]))
               for name, bn in layers.items()]
    images = 0
    try:
        model.eval()
        for bn in layers.values():
            bn.train()
        for x in batches:
            model(x)
            images += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    for name, bn in layers.items():
        pool = pools[name]
        if pool.mean is None:  # a layer this forward does not reach (e.g. PointRend's head at inference)
            continue
        _all_reduce_pool(pool)
        bn.running_mean.copy_(pool.mean.to(bn.running_mean))
        bn.running_var.copy_((pool.m2 / max(pool.n - 1, 1)).to(bn.running_var))  # unbiased, as PyTorch keeps it
    return images
