"""Checkpoints: one file holding the model config, weights, class names and preprocessing, or a model folder
(config.json + model.safetensors, `deeplab.models.hub`) holding the same.

Written atomically (a temp file in the same folder, then `os.replace`), so an interrupted write never leaves a
broken checkpoint. A .pt is read with `torch.load(..., weights_only=True)` and a folder as JSON and safetensors:
neither can run code. Both read into the same dict, so every command that reads one reads the other.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .card import training_run_of
from .config import ModelConfig, Preprocessing
from .files import CheckpointError, atomic_save, named_os_error, write_atomically  # noqa: F401 - their old home
from .hub import (
    CARD_FILE,
    CONFIG_FILE,
    PICTURE_FILE,
    WEIGHTS_FILE,
    first_mismatch,
    model_record,
    plain_tensors,
    read_config,
    read_weights,
    resolve_folder,
    weights_header,
    write_folder,
)
from .model import DeepLab, build_model

FORMAT = "deeplab-checkpoint"
VERSION = 1


def checkpoint_dict(model: DeepLab, **extra: Any) -> dict[str, Any]:
    """The plain-data form of a model (tensors, str, numbers, lists, dicts): what `weights_only` loading accepts."""
    return {"format": FORMAT, "version": VERSION, **model_record(model), **extra}


def save_checkpoint(model: DeepLab, path: str | os.PathLike, **extra: Any) -> Path:
    """Write `model` (and any plain-data `extra`, e.g. optimizer state or step) to `path` atomically."""
    return atomic_save(checkpoint_dict(model, **extra), path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint's raw dict safely (a .pt, or a model folder: `read_model_folder`), with one clear error for
    anything that is not one."""
    path = Path(path)
    if path.is_dir():
        return read_model_folder(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or model folder; pass a .pt or a model folder written "
                              "by deeplab")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "not a checkpoint we can read safely"
        # torch's own text would suggest weights_only=False, i.e. running the file's code; say what is refused.
        raise CheckpointError(
            unreadable_message(e, source=str(path)) + "; deeplab checkpoints are written by `deeplab train` or "
            "`deeplab convert`"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        kind = type(data).__name__ if not isinstance(data, dict) else f"dict with keys {sorted(data)[:8]}"
        raise CheckpointError(
            f"{path}: not a deeplab checkpoint (found a {kind}); "
            "to import weights from torchvision, timm or TFLite use `deeplab convert SRC OUT.pt`"
        )
    if not isinstance(data.get("version", 0), int):
        raise CheckpointError(f"{path}: its version field is {data['version']!r}, not a number; the file was edited "
                              "or not written by deeplab")
    if data.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {data['version']} is newer than this deeplab ({VERSION}); upgrade deeplab")
    check_fields(data, source=str(path))
    return data


def read_model_folder(path: Path) -> dict[str, Any]:
    """A model folder (`deeplab.models.hub`) as the dict a .pt gives, its weights checked against its config before
    they are read: a missing or extra tensor, a wrong shape or dtype is refused in one line naming the first."""
    data = read_config(path)
    config_source, weights = str(path / CONFIG_FILE), path / WEIGHTS_FILE
    check_fields({**data, "state_dict": {}}, source=config_source)
    cfg, preprocessing = configs_of(data, source=config_source)
    try:
        with torch.device("meta"):  # the names, shapes and dtypes a model of this config has, without its memory
            expected = build_model(cfg, class_names=data["class_names"], preprocessing=preprocessing,
                                   class_colors=data.get("class_colors"), class_values=data.get("class_values"))
        expected = expected.float()  # folders hold float32 whatever torch's default dtype is here
    except ValueError as e:
        raise CheckpointError(f"{config_source}: {e}; the file was edited or not written by deeplab") from None
    mismatch = first_mismatch(expected.state_dict(), weights_header(weights))
    if mismatch:
        raise CheckpointError(f"{weights}: {mismatch}; the weights do not fit {CONFIG_FILE} beside them (files of two "
                              "models mixed, or one edited): write the folder again with deeplab export --format hub")
    data = {"format": FORMAT, "version": VERSION, **data, "state_dict": read_weights(weights)}
    check_fields(data, source=str(path))
    return data


# Every field a command reads from a checkpoint, and what it must hold. The first four are in every checkpoint;
# the training state (`TRAINING_STATE`) only in a run's last.pt.
REQUIRED_FIELDS = {"state_dict": dict, "model_config": dict, "class_names": (list, tuple), "preprocessing": dict}
OPTIONAL_FIELDS = {"train_config": dict, "step": int, "optimizer": dict, "rng_state": torch.Tensor,
                   "best_miou": (int, float), "metrics": dict, "activation_rounding": dict, "source": str,
                   "conversion": dict}
TRAINING_STATE = ("step", "optimizer", "rng_state")


def check_fields(data: dict[str, Any], *, source: str) -> None:
    """Refuse, naming the file and the field, a checkpoint whose fields are missing or of the wrong kind (a file
    edited by hand, or written by something else), before any command reads them."""
    for name, kind in REQUIRED_FIELDS.items():
        if name not in data:
            raise CheckpointError(f"{source}: has no {name}; it is not a whole deeplab checkpoint (written by "
                                  "`deeplab train` or `deeplab convert`)")
    for name, kind in {**REQUIRED_FIELDS, **OPTIONAL_FIELDS}.items():
        value = data.get(name)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise CheckpointError(f"{source}: its {name} is a {type(value).__name__}, not what deeplab writes there; "
                                  "the file was edited or not written by deeplab")
    bad = next((k for k, v in data["state_dict"].items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))),
               None)
    if bad is not None:
        raise CheckpointError(f"{source}: its state_dict entry {bad!r} is not a named tensor; the file was edited or "
                              "not written by deeplab")
    if not all(isinstance(n, str) for n in data["class_names"]):
        raise CheckpointError(f"{source}: its class_names are not all text; the file was edited or not written by deeplab")


def check_training_state(data: dict[str, Any], *, source: str) -> None:
    """Refuse to resume from a checkpoint without the state a resume needs (step, optimizer, RNG), e.g. a best.pt
    or a converted model copied over last.pt."""
    missing = [name for name in TRAINING_STATE if data.get(name) is None]
    if missing or not isinstance(data.get("train_config"), dict):
        raise CheckpointError(
            f"{source}: holds weights only, no training state ({', '.join(missing or ['train_config'])} missing: e.g. "
            "a best.pt or a converted model copied over last.pt), so the run cannot be resumed from it. Start a new "
            f"run from its weights instead: deeplab train --init-checkpoint {source} --out NEW_FOLDER"
        )


def configs_of(data: dict[str, Any], *, source: str) -> tuple[ModelConfig, Preprocessing]:
    """The ModelConfig and Preprocessing a checkpoint records, refused in one line naming the file when either is
    not a valid record."""
    try:
        return ModelConfig.from_dict(data["model_config"]), Preprocessing.from_dict(data["preprocessing"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{source}: its model_config or preprocessing is not valid ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0]}); the file was edited or not written by deeplab") from None


def model_from_checkpoint(data: dict[str, Any], *, source: str = "checkpoint") -> DeepLab:
    """The model a checkpoint's dict describes, holding its weights. Built without random initialisation (on the meta
    device, then given the dict's tensors: `load_state_dict_strict(assign=True)`): initialising a ResNet-101 took
    most of its load (docs/hub.md). The model takes the dict's tensors (`assignable_tensors`), not copies of them."""
    bad = first_non_finite(data["state_dict"])
    if bad is not None:  # it would predict garbage (or one class) without a word
        raise CheckpointError(
            f"{source}: holds non-finite weights (NaN or inf, first in {bad}); it cannot predict. Use an earlier "
            "checkpoint of the run (best.pt, or a last.pt from before the run diverged)"
        )
    cfg, preprocessing = configs_of(data, source=source)
    kwargs = {"class_names": data["class_names"], "preprocessing": preprocessing,
              "class_colors": data.get("class_colors"), "class_values": data.get("class_values")}
    with torch.device("meta"):  # shapes only: every tensor the model has is about to be the checkpoint's
        model = build_model(cfg, **kwargs)
    load_state_dict_strict(model, data["state_dict"], source=source, assign=True)
    if tensors_on_meta(model):  # a tensor no state dict holds (a non-persistent buffer): build it in full
        model = build_model(cfg, **kwargs)
        load_state_dict_strict(model, data["state_dict"], source=source)
    if data.get("activation_rounding"):  # a converted uint8 TFLite model: round activations as the file does
        from .activation_rounding import attach_activation_rounding

        try:
            attach_activation_rounding(model, data["activation_rounding"], source=source)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    return model


def first_non_finite(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None. A sum is finite only when
    every term is, so one sum per tensor clears it (ten times faster than `isfinite(t).all()`); a sum that overflows
    is checked element by element."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            return name
    return None


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, source: str,
                           assign: bool = False) -> None:
    """load_state_dict that lists every unmatched key and shape mismatch on both sides in one error. `assign`: the
    model (built on the meta device) takes the tensors themselves (`assignable_tensors`) instead of copies."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [f"{source}: the weights do not fit the model"]
        if missing:
            parts.append(f"missing in the file ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(
                f"not in the model ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}"
            )
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:20])}")
        raise CheckpointError("\n  ".join(parts))
    if assign:
        model.load_state_dict(assignable_tensors(state_dict, own), assign=True)
    else:
        model.load_state_dict(state_dict)


def assignable_tensors(state_dict: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as a model should take them (`load_state_dict(assign=True)`): in the dtype of the model's own
    tensor `own[name]` (float64 under a float64 default dtype, as a copy into it would give), contiguous, each with
    aligned memory of its own (a view, a shared storage or a storage with other data is copied), so the model
    computes exactly what a model the tensors were copied into computes."""
    out, seen = {}, set()
    for name, tensor in state_dict.items():
        t = tensor.detach().to(dtype=own[name].dtype)
        storage = t.untyped_storage()
        whole = t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        if not (whole and t.is_contiguous()) or t.numel() == 0 or storage.data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def tensors_on_meta(model: torch.nn.Module) -> list[str]:
    """Names of the tensors of `model` still on the meta device: parameters and buffers, and tensors kept as plain
    attributes of a module."""
    names = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    for prefix, module in model.named_modules():
        names += [f"{prefix}.{k}".lstrip(".") for k, v in vars(module).items()
                  if isinstance(v, torch.Tensor) and v.is_meta]
    return names


def load(path: str | os.PathLike) -> DeepLab:
    """Open any checkpoint deeplab writes (a .pt or a model folder); the model comes back in eval mode with its
    config, class names and preprocessing (`model.config`, `model.class_names`, `model.preprocessing`)."""
    data = read_checkpoint(path)
    return model_from_checkpoint(data, source=str(path)).eval()


def from_pretrained(name_or_path: str | os.PathLike, *, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, token: str | bool | None = None) -> DeepLab:
    """`load` a model folder (or .pt) by its path, or a Hub repo id ("owner/name") fetched with huggingface_hub
    (`pip install 'deeplab[hub]'`; with HF_HUB_OFFLINE=1, from the local cache only)."""
    return load(resolve_folder(name_or_path, revision=revision, cache_dir=cache_dir, token=token))


def export_folder(src: str | os.PathLike, out: str | os.PathLike, *, license: str | None = None,
                  card: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write any checkpoint (a run's best.pt, a converted model, a model folder) as a model folder at `out`, then
    read it back and check every tensor is bit-identical to the source's. A checkpoint in a training run folder
    gets the run's metrics, data report and predictions.png on its card; a folder's card is copied as it is.
    Returns {"path", "tensors", "bytes", "run"}."""
    src, out = Path(src), Path(out)
    if src.is_dir() and out.resolve() == src.resolve():
        raise ValueError(f"--out {out}: the model folder being read; choose another folder")
    data = read_checkpoint(src)
    run = training_run_of(src)
    write_folder(data, out, run=run, license=license, card=card)
    if src.is_dir():  # the same weights: their card (with what the run recorded) still describes them
        for name in (CARD_FILE, PICTURE_FILE):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
    back = read_checkpoint(out)["state_dict"]
    expected = plain_tensors(data["state_dict"])
    differ = next((k for k, v in expected.items() if not torch.equal(v, back[k])), None)
    if differ is not None:  # a bug, never a user's doing: say which tensor
        raise RuntimeError(f"{out / WEIGHTS_FILE}: {differ} reads back different from {src}; do not use the folder")
    return {"path": out, "tensors": len(back), "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
            "run": run}


def unreadable_message(e: Exception, *, source: str) -> str:
    text = str(e)
    code = re.search(r"GLOBAL ([\w.]+)", text)
    if code:
        return (
            f"{source}: the file holds Python objects besides tensors ({code.group(1)}), and unpickling them could run "
            "code, so it is refused. If you trust the file, re-save just its weights: "
            "torch.save(torch.load(FILE, weights_only=False)['state_dict'], 'weights.pth'). Model folders (`deeplab "
            "export --format hub`) hold tensors only and never need this"
        )
    if "WeightsUnpickler error:" in text:  # the pickle stream itself is malformed: not a torch.save file
        text = text.split("WeightsUnpickler error:", 1)[1]
    detail = next((line.strip() for line in text.splitlines() if line.strip()), "empty or cut short")
    return (
        f"{source}: not a readable PyTorch weights file ({type(e).__name__}: {detail[:200]}); pass a .pth/.pt "
        "written by torch.save (a truncated download also ends up here: download it again)"
    )
