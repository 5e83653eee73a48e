"""Where a run's weights start: a deeplab checkpoint (e.g. a converted TF model, with its folded BatchNorms
recalibrated), ImageNet backbone weights, or random initialisation."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..models.checkpoint import CheckpointError, configs_of, load_state_dict_strict
from ..models.config import ModelConfig, Preprocessing
from ..models.model import DeepLab, build_model
from .config import TrainConfig


def run_preprocessing(resume_state: dict[str, Any] | None, init_data: dict[str, Any] | None) -> Preprocessing:
    if resume_state is not None:
        return configs_of(resume_state, source="last.pt")[1]
    if init_data is not None:
        # The imported normalisation stays; a fixed input size (a TF Lite graph's) does not: training is at any size.
        return replace(configs_of(init_data, source="--init-checkpoint")[1], input_size=None)
    return Preprocessing()


def fit_to_data(model_cfg: ModelConfig, train_cfg: TrainConfig, preprocessing: Preprocessing, train_ds, val_ds,
                report: dict[str, Any] | None, *, say: Callable[[str], None]
                ) -> tuple[ModelConfig, TrainConfig, Preprocessing]:
    """What a new run takes from its data: the model's input bands (the dataset's `num_bands`, 3 for photos), their
    normalisation (the data report's per-band mean and std, for anything but 8-bit RGB; the datasets' transforms are
    updated to it), and `--class-weights auto` (`deeplab.data.report.median_frequency_weights` of the report's
    pixel shares)."""
    from ..data.report import median_frequency_weights

    bands = int(getattr(train_ds, "num_bands", 3))
    if train_cfg.bands is not None and train_cfg.bands != bands:
        raise ValueError(f"--bands {train_cfg.bands}: {train_ds.description} has {bands}-band images; drop --bands "
                         "or point --data-root at the data you mean")
    if train_cfg.rgb_bands is not None and max(train_cfg.rgb_bands) >= bands:
        raise ValueError(f"--rgb-bands {','.join(map(str, train_cfg.rgb_bands))}: the data has {bands} bands "
                         f"(0..{bands - 1})")
    model_cfg = model_cfg.replace(in_channels=bands)
    stats = (report or {}).get("band_stats")
    if stats and (bands != 3 or stats["dtype"] != "uint8"):
        std = tuple(s if s > 0 else 1.0 for s in stats["std"])  # a constant band: centred, not scaled
        preprocessing = replace(preprocessing, mean=tuple(stats["mean"]), std=std)
        for ds in (train_ds, val_ds):
            ds.transform = replace(ds.transform, mean=preprocessing.mean, std=preprocessing.std)
        say(f"normalising the {bands} bands ({stats['dtype']}) with the training images' mean "
            f"{', '.join(f'{v:.4g}' for v in preprocessing.mean)} and std {', '.join(f'{v:.4g}' for v in std)}")
    elif preprocessing.bands != bands:
        raise ValueError(f"{train_ds.description}: {bands}-band images but the normalisation has {preprocessing.bands} "
                         "values and the data report measured none; run `deeplab data` on it to see why")
    if train_cfg.class_weights == "auto":
        weights = tuple(round(w, 4) for w in median_frequency_weights(report["class_pixel_shares"]))
        train_cfg = replace(train_cfg, class_weights=weights)
        say("class weights (--class-weights auto, sqrt(median(f) / f_c) of the pixel shares): "
            + ", ".join(f"{n} {w:g}" for n, w in zip(train_ds.class_names, weights)))
    return model_cfg, train_cfg, preprocessing


def _rgb_positions(train_cfg: TrainConfig, train_ds, bands: int) -> tuple[int, int, int] | None:
    """Where red, green and blue are among the bands: --rgb-bands, else the export's band names, else the first three
    (None for fewer than 3 bands)."""
    if train_cfg.rgb_bands is not None:
        return tuple(train_cfg.rgb_bands)  # type: ignore[return-value]
    named = getattr(getattr(train_ds, "export", None), "rgb_bands", None)
    if named is not None:
        return named
    return (0, 1, 2) if bands >= 3 else None


def _adapted_input_conv(model: DeepLab, weights: dict[str, Any], *, prefix: str, rgb, source: str,
                        say: Callable[[str], None]) -> dict[str, Any]:
    """`weights` with an RGB first-conv kernel adapted to the model's bands (`deeplab.models.input_conv`)."""
    from ..models.input_conv import adapt_input_conv, input_conv_name

    bands = model.config.in_channels
    key = prefix + input_conv_name(model.backbone)
    theirs = weights.get(key)
    if bands == 3 or theirs is None or theirs.dim() != 4 or theirs.shape[1] != 3:
        return weights
    say(f"{source}: its first convolution ({key}) reads RGB; adapted to {bands} bands: the red, green and blue filters "
        f"for bands {', '.join(map(str, rgb))} and their mean for the others, all scaled by 3/{bands}" if rgb else
        f"{source}: its first convolution ({key}) reads RGB; adapted to {bands} band(s): the mean of the RGB filters "
        f"scaled by 3/{bands}")
    return {**weights, key: adapt_input_conv(theirs, bands=bands, rgb=rgb)}


def dataset_colors(dataset) -> tuple[tuple[int, ...], ...] | None:
    """The colours the model will draw its classes in: the dataset's own (an ArcGIS export's), else its palette's
    (VOC, Cityscapes, ADE20K, CamVid, `--palette`), so that predictions, overlays and the model card show the
    training data's colours."""
    colors = getattr(dataset, "class_colors", None)
    palette = getattr(dataset, "palette", None)
    if not colors and palette is not None and len(palette.colors) == len(dataset.class_names):
        colors = palette.colors
    return tuple(tuple(int(v) for v in c) for c in colors) if colors else None


def initial_model(model_cfg: ModelConfig, train_cfg: TrainConfig, train_ds, preprocessing: Preprocessing,
                  init_data: dict[str, Any] | None, *, fresh: bool, say: Callable[[str], None]) -> DeepLab:
    """The model before the first step: random, from a deeplab checkpoint, or with an ImageNet backbone. Starting
    from RGB weights, a model of other bands gets its first convolution adapted (`deeplab.models.input_conv`)."""
    model = build_model(model_cfg, class_names=train_ds.class_names, preprocessing=preprocessing,
                        class_colors=dataset_colors(train_ds), class_values=getattr(train_ds, "class_values", None))
    rgb = _rgb_positions(train_cfg, train_ds, model_cfg.in_channels)
    if init_data is not None:
        source = str(train_cfg.init_checkpoint)
        init_data = {**init_data, "state_dict": _adapted_input_conv(model, init_data["state_dict"], prefix="backbone.",
                                                                    rgb=rgb, source=source, say=say)}
        matched = _load_init(model, init_data, source=source, say=say)
        folded = folded_batchnorms(model, matched)
        if folded and not train_cfg.freeze_bn:
            count = min(len(train_ds), max(train_cfg.batch_size, 32))
            recalibrate_folded_batchnorms(model, folded, (train_ds[i][0] for i in range(count)))
            say(f"{len(folded)} BatchNorms of {train_cfg.init_checkpoint} were folded into their convs; "
                f"their statistics were re-measured on {count} training crops so that training-mode BN keeps "
                "the imported function")
    if train_cfg.backbone_weights and fresh:
        from ..convert.torch_weights import backbone_state_dict

        weights = backbone_state_dict(train_cfg.backbone_weights, backbone=model_cfg.backbone)
        weights = _adapted_input_conv(model, weights, prefix="", rgb=rgb, source=str(train_cfg.backbone_weights),
                                      say=say)
        load_state_dict_strict(model.backbone, weights, source=str(train_cfg.backbone_weights))
        say(f"backbone weights loaded from {train_cfg.backbone_weights}")
    return model


def _load_init(model: DeepLab, data: dict[str, Any], *, source: str, say: Callable[[str], None]) -> dict[str, Any]:
    """Start from another deeplab checkpoint: every tensor whose name and shape match; a new classifier otherwise."""
    own = model.state_dict()
    theirs = data["state_dict"]
    matched = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in own if k not in matched)
    if not any(k.startswith("backbone.") for k in matched):
        raise CheckpointError(
            f"{source}: none of its backbone weights fit this model ({model.config.backbone}); "
            "pass the same --backbone (and --depth-multiplier) the checkpoint was built with"
        )
    own.update(matched)
    model.load_state_dict(own)
    say(f"initialised from {source}: {len(matched)} tensors loaded, {len(skipped)} left at random init"
        + (f" ({', '.join(skipped[:6])}{' ...' if len(skipped) > 6 else ''})" if skipped else ""))
    return matched


def folded_batchnorms(model: nn.Module, loaded: dict[str, Any]) -> list[str]:
    """BatchNorms loaded as identities carrying a folded bias (weight 1, mean 0, variance 1 - eps): TF Lite imports."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and f"{name}.running_var" in loaded:
            identity = (
                bool((module.weight == 1).all()) and bool((module.running_mean == 0).all())
                and torch.allclose(module.running_var, torch.full_like(module.running_var, 1.0 - module.eps))
            )
            if identity:
                names.append(name)
    return names


@torch.no_grad()
def recalibrate_folded_batchnorms(model: nn.Module, names: list[str], images: Iterable[torch.Tensor]) -> None:
    """Give folded (identity) BatchNorms the statistics of their inputs without changing what the model computes.

    A BN-folded graph computes conv(x) + b. As an identity BN that is exact at inference, but training-mode BN would
    normalise each channel by its batch statistics and the imported features would be rescaled. With the measured
    input mean m and variance v: running_mean = m, running_var = v, weight = sqrt(v + eps), bias = b + m. Inference
    is unchanged exactly; in training the batch statistics approximate (m, v), so the function is kept and BN
    trains in its usual parametrisation.
    """
    modules = dict(model.named_modules())
    sums: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}  # per BN: sum, sum of squares, count

    def hook(name):
        def record(_module, inputs):
            x = inputs[0].detach().double().transpose(0, 1).flatten(1).cpu()  # (C, pixels)
            s1, s2, n = sums.get(name, (0.0, 0.0, 0))
            sums[name] = (s1 + x.sum(1), s2 + (x * x).sum(1), n + x.shape[1])
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for image in images:
            model(image.unsqueeze(0).to(device, dtype=next(model.parameters()).dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name in names:
        s1, s2, n = sums[name]
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        bn = modules[name]
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.bias.add_(mean.to(bn.bias.dtype))
        bn.weight.copy_(torch.sqrt(var + bn.eps))
