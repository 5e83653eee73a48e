"""What each training step reads: the datasets of a run, the seeded batch order of every epoch, and the keys that let
one DataLoader (persistent workers) serve a whole run while each sample's augmentation stays seeded by (seed, epoch,
index)."""

from __future__ import annotations

import torch

from ..models.config import Preprocessing
from .config import TrainConfig


def epoch_batches(num_samples: int, batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a permutation seeded by (seed, epoch), cut into full batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_samples, generator=g).tolist()
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(num_samples // batch_size)]


def build_datasets(train_cfg: TrainConfig, preprocessing: Preprocessing):
    from ..data import EvalTransform, TrainTransform, build_dataset

    train_tf = TrainTransform(
        crop_size=(train_cfg.crop_size, train_cfg.crop_size),
        scale_range=(train_cfg.min_scale, train_cfg.max_scale),
        scale_step=train_cfg.scale_step,
        mean=preprocessing.mean,
        std=preprocessing.std,
        ignore_index=train_cfg.ignore_index,
        flip=train_cfg.flip,
    )
    eval_tf = EvalTransform(mean=preprocessing.mean, std=preprocessing.std, ignore_index=train_cfg.ignore_index)
    common = dict(root=train_cfg.data_root, seed=train_cfg.seed, skip_bad=train_cfg.skip_bad,
                  **train_cfg.dataset_kwargs())
    train_ds = build_dataset(train_cfg.dataset, split=train_cfg.train_split, transform=train_tf, **common)
    val_ds = build_dataset(train_cfg.dataset, split=train_cfg.val_split, transform=eval_tf, **common)
    return train_ds, val_ds


class EpochSamples(torch.utils.data.Dataset):
    """The training set addressed by (epoch, index) packed as one key, epoch * len + index, so one DataLoader (with
    persistent workers) serves the whole run while each sample's augmentation stays seeded by (seed, epoch, index)
    inside the dataset, in whichever worker loads it."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int):
        epoch, index = divmod(key, len(self.dataset))
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


class RunBatches:
    """This process's share of every global batch from `step` to `steps`: epoch by epoch, each a permutation seeded
    by (seed, epoch) (`epoch_batches`), as keys of `EpochSamples`."""

    def __init__(self, *, size: int, batch_size: int, seed: int, step: int, steps: int, rank: int, per_rank: int):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.step, self.steps, self.rank, self.per_rank = step, steps, rank, per_rank

    def __len__(self) -> int:
        return self.steps - self.step

    def __iter__(self):
        per_epoch = self.size // self.batch_size
        step = self.step
        while step < self.steps:
            epoch, first = divmod(step, per_epoch)
            for batch in epoch_batches(self.size, self.batch_size, seed=self.seed, epoch=epoch)[first:]:
                if step >= self.steps:
                    return
                yield [epoch * self.size + i for i in batch[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]]
                step += 1
