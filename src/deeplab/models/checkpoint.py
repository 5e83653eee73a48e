"""Checkpoints: one file holding the model config, weights, class names and preprocessing.

Written atomically (a temp file in the same folder, then `os.replace`), so an interrupted write never leaves a
broken checkpoint. Read with `torch.load(..., weights_only=True)`: a checkpoint can never run code.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .config import ModelConfig, Preprocessing
from .model import DeepLab, build_model

FORMAT = "deeplab-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a deeplab checkpoint, or one that does not fit the model asked for."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to `path` through a temp file and a rename: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the mode any new file would get
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise named_os_error(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def named_os_error(e: OSError, path: str | os.PathLike) -> OSError:
    """`e` with `path` as its file name when the writer that raised it (torch, PIL, a flush) gave none, so the one-line
    error can say which file could not be written."""
    return e if e.filename is not None else OSError(e.errno, e.strerror or str(e), str(path))


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(file)` on a temporary file beside `path`, then rename it to `path`: a reader, or a crash, sees the
    old file or the new one, never part of one; the temporary file is removed on any failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise named_os_error(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def checkpoint_dict(model: DeepLab, **extra: Any) -> dict[str, Any]:
    """The plain-data form of a model (tensors, str, numbers, lists, dicts): what `weights_only` loading accepts."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_config": model.config.to_dict(),
        "class_names": list(model.class_names),
        "preprocessing": model.preprocessing.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **({"activation_rounding": rounding} if (rounding := getattr(model, "activation_rounding", None)) else {}),
        **({"class_colors": [list(c) for c in colors]} if (colors := getattr(model, "class_colors", None)) else {}),
        **({"class_values": list(values)} if (values := getattr(model, "class_values", None)) else {}),
        **extra,
    }


def save_checkpoint(model: DeepLab, path: str | os.PathLike, **extra: Any) -> Path:
    """Write `model` (and any plain-data `extra`, e.g. optimizer state or step) to `path` atomically."""
    return atomic_save(checkpoint_dict(model, **extra), path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint's raw dict safely, with one clear error for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; pass the path of a .pt written by deeplab")
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


# Every field a command reads from a checkpoint, and what it must hold. The first four are in every checkpoint;
# the training state (`TRAINING_STATE`) only in a run's last.pt.
REQUIRED_FIELDS = {"state_dict": dict, "model_config": dict, "class_names": (list, tuple), "preprocessing": dict}
OPTIONAL_FIELDS = {"train_config": dict, "step": int, "optimizer": dict, "rng_state": torch.Tensor,
                   "best_miou": (int, float), "metrics": dict, "activation_rounding": dict, "source": str}
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
    bad = next((k for k, v in data["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:  # it would predict garbage (or one class) without a word
        raise CheckpointError(
            f"{source}: holds non-finite weights (NaN or inf, first in {bad}); it cannot predict. Use an earlier "
            "checkpoint of the run (best.pt, or a last.pt from before the run diverged)"
        )
    cfg, preprocessing = configs_of(data, source=source)
    model = build_model(cfg, class_names=data["class_names"], preprocessing=preprocessing,
                        class_colors=data.get("class_colors"), class_values=data.get("class_values"))
    load_state_dict_strict(model, data["state_dict"], source=source)
    if data.get("activation_rounding"):  # a converted uint8 TFLite model: round activations as the file does
        from .activation_rounding import attach_activation_rounding

        try:
            attach_activation_rounding(model, data["activation_rounding"], source=source)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    return model


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """load_state_dict that lists every unmatched key and shape mismatch on both sides in one error."""
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
    model.load_state_dict(state_dict)


def load(path: str | os.PathLike) -> DeepLab:
    """Open any checkpoint deeplab writes; the model comes back in eval mode with its config, class names and
    preprocessing (`model.config`, `model.class_names`, `model.preprocessing`)."""
    data = read_checkpoint(path)
    return model_from_checkpoint(data, source=str(path)).eval()


def unreadable_message(e: Exception, *, source: str) -> str:
    text = str(e)
    code = re.search(r"GLOBAL ([\w.]+)", text)
    if code:
        return (
            f"{source}: the file holds Python objects besides tensors ({code.group(1)}), and unpickling them could run "
            "code, so it is refused. If you trust the file, re-save just its weights: "
            "torch.save(torch.load(FILE, weights_only=False)['state_dict'], 'weights.pth')"
        )
    if "WeightsUnpickler error:" in text:  # the pickle stream itself is malformed: not a torch.save file
        text = text.split("WeightsUnpickler error:", 1)[1]
    detail = next((line.strip() for line in text.splitlines() if line.strip()), "empty or cut short")
    return (
        f"{source}: not a readable PyTorch weights file ({type(e).__name__}: {detail[:200]}); pass a .pth/.pt "
        "written by torch.save (a truncated download also ends up here: download it again)"
    )
