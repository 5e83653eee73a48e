"""Multi-process training helpers: process-group set-up from torchrun's environment, and synchronized BatchNorm.

torch's SyncBatchNorm runs on GPUs only; `GlooSyncBatchNorm` does the same job on CPU (gloo): batch statistics are
summed across processes with a differentiable all-reduce, so every process normalises with the global batch's mean
and variance and gradients flow through the statistics exactly as in one process with the whole batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(*, device_type: str) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); one process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None or "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=_attempt_store(restart, world_size), world_size=world_size,
                                    rank=int(os.environ["RANK"]))
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _attempt_store(restart: str, world_size: int) -> dist.Store:
    """torchrun's store, with keys of their own for each attempt of the group. After torchrun restarts a failed
    group, gloo's default keys would still hold the addresses the previous attempt's workers published, and a
    restarted worker would try to connect to a dead one (`connectFullMesh ... Connection refused`)."""
    from datetime import timedelta

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent serves the store
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=int(os.environ["RANK"]) == 0 and not agent_store, timeout=timedelta(minutes=30),
    )
    return dist.PrefixStore(f"deeplab/attempt-{restart}/", store)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (no gradient); identity in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batch of every process (works on CPU and GPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # differentiable

        c = x.shape[1]
        xf = x if x.dtype == torch.float64 else x.float()
        # Two passes, as BatchNorm's own kernels centre before squaring: E[x^2] - E[x]^2 loses digits that the
        # backward pass through a deep stack of BNs then amplifies.
        first = all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), xf.new_tensor([x.numel() // c])]))
        n = first[c]
        mean = first[:c] / n
        centred = xf - mean.view(1, c, 1, 1)
        var = all_reduce(centred.square().sum(dim=(0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        y = centred * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, *, device_type: str) -> nn.Module:
    """Replace every BatchNorm2d: torch's SyncBatchNorm on CUDA, GlooSyncBatchNorm elsewhere."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if type(module) is nn.BatchNorm2d:
        new = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, device_type=device_type)
        if new_child is not child:
            setattr(module, name, new_child)
    return module

