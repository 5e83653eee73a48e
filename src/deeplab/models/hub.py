"""Model folders, the form models are shared in (as transformers and timm share theirs): `config.json` (a versioned
record of the architecture, preprocessing and classes), `model.safetensors` (the weights, nothing else) and
`README.md` (a model card with the YAML front matter the Hugging Face Hub reads), with `predictions.png` beside them
when the model comes from a training run.

Reading a folder never unpickles: config.json is JSON and safetensors holds a JSON header and raw tensor bytes.
`deeplab.models.checkpoint.read_checkpoint` reads a folder into the same dict a `.pt` gives (so every command that
takes a checkpoint takes a folder) and checks the weights against the config; this module holds the format itself,
with no import of the model code, so that `DeepLab.save_pretrained` can call it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .card import model_card
from .config import ModelConfig
from .files import CheckpointError

FOLDER_FORMAT = "deeplab-model"
# The major version of config.json's layout. A reader refuses a higher one ("upgrade deeplab"); fields added without
# a new major version are named in a warning by an older reader and ignored.
FOLDER_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
PICTURE_FILE = "predictions.png"
INT8_FILE = "model.int8.onnx"  # `deeplab quantize` writes a folder's int8 file inside it
# What a model folder may hold; writing into a folder holding anything else (a run folder, say) is refused, so a
# save never mixes with, or writes over, other files.
FOLDER_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, PICTURE_FILE, INT8_FILE)
# The checkpoint fields config.json carries beside the architecture (each only when the model has it).
CARRIED = ("class_colors", "class_values", "activation_rounding", "source", "conversion", "train_config", "metrics")
# Every field of config.json this deeplab reads or writes.
KNOWN_FIELDS = ("format", "version", "deeplab_version", "variant", "model_config", "preprocessing", "input_size", "bands",
                "class_names", *CARRIED)
# safetensors' dtype names of the dtypes a deeplab state dict holds.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
# A repo id on the Hub: "name" or "owner/name" (letters, digits, '-', '_', '.').
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# Names ending so are files (a checkpoint, an exported graph, weights), never repo ids.
FILE_SUFFIXES = (".pt", ".pth", ".pt2", ".bin", ".safetensors", ".onnx", ".xml", ".tflite")


def deeplab_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("deeplab")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def model_record(model: nn.Module) -> dict[str, Any]:
    """The plain-data form of a model (tensors, str, numbers, lists, dicts) without the file's format and version:
    what a checkpoint and a model folder both hold."""
    return {
        "model_config": model.config.to_dict(),
        "class_names": list(model.class_names),
        "preprocessing": model.preprocessing.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **({"activation_rounding": rounding} if (rounding := getattr(model, "activation_rounding", None)) else {}),
        **({"class_colors": [list(c) for c in colors]} if (colors := getattr(model, "class_colors", None)) else {}),
        **({"class_values": list(values)} if (values := getattr(model, "class_values", None)) else {}),
    }


def folder_config(data: dict[str, Any]) -> dict[str, Any]:
    """config.json for a checkpoint's dict: the architecture, preprocessing and classes, plus informative fields for
    readers without deeplab (variant, bands, input size: checked against the rest when read)."""
    cfg = ModelConfig.from_dict(data["model_config"])
    config = {
        "format": FOLDER_FORMAT,
        "version": FOLDER_VERSION,
        "deeplab_version": deeplab_version(),
        "variant": f"{cfg.variant} {cfg.backbone}",
        "model_config": cfg.to_dict(),
        "preprocessing": data["preprocessing"],
        "input_size": data["preprocessing"].get("input_size"),
        "bands": cfg.in_channels,
        "class_names": list(data["class_names"]),
    }
    for name in CARRIED:
        if data.get(name) is not None:
            config[name] = data[name]
    if isinstance(config.get("metrics"), dict):  # the summary; a 150-class confusion matrix is not for config.json
        config["metrics"] = {k: v for k, v in config["metrics"].items() if k not in ("confusion_matrix", "per_image")}
    return json.loads(json.dumps(config))  # tuples as lists: what a reader will see


def plain_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as safetensors stores them: on the CPU, contiguous, each with storage of its own (safetensors
    refuses tensors that share memory, e.g. tied weights or views), floating point in float32, the dtype a model is
    built in (a half-precision model is saved losslessly, and every folder reads back into a float32 model)."""
    out, seen = {}, set()
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu")
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.float()
        storage = t.untyped_storage().data_ptr()
        if not t.is_contiguous() or storage in seen or t.numel() == 0:
            t = t.clone(memory_format=torch.contiguous_format)
        else:
            seen.add(storage)
        out[name] = t
    return out


def check_writable(directory: Path) -> None:
    """Refuse a folder that holds files other than a model folder's: a run folder's config.json must never be
    overwritten by a model's."""
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory}: a file, not a folder; choose a new folder for the model")
    if not directory.is_dir():
        return
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in FOLDER_FILES and not p.name.startswith("."))
    config = directory / CONFIG_FILE
    if not foreign and config.is_file():
        try:
            foreign = [] if json.loads(config.read_text(encoding="utf-8")).get("format") == FOLDER_FORMAT else [CONFIG_FILE]
        except (OSError, ValueError, AttributeError):
            foreign = [CONFIG_FILE]
    if foreign:
        raise FileExistsError(f"{directory} holds other files ({', '.join(foreign[:5])}), not a deeplab model folder; "
                              "choose a new or empty folder for the model")


def write_folder(data: dict[str, Any], directory: str | os.PathLike, *, run: str | os.PathLike | None = None,
                 card: dict[str, Any] | None = None, license: str | None = None) -> Path:
    """Write a checkpoint's dict (`checkpoint_dict`, `read_checkpoint`) as a model folder: model.safetensors,
    config.json, README.md and, from a run folder `run`, its predictions.png. Each file is written through a temporary
    file and a rename; config.json last, so a folder with a config has its weights. `card` adds what the card can
    not read from `run` (e.g. `seconds`, `device`, `hardware` of the training)."""
    from safetensors.torch import save

    from .files import write_atomically

    directory = Path(directory)
    check_writable(directory)
    config = folder_config(data)
    tensors = plain_tensors(data["state_dict"])
    directory.mkdir(parents=True, exist_ok=True)
    blob = save(tensors, metadata={"format": "pt", "library": "deeplab"})  # "pt": how the Hub labels the framework
    write_atomically(directory / WEIGHTS_FILE, lambda f: f.write(blob))
    del blob
    run = Path(run) if run is not None else None
    text = model_card({**data, "state_dict": tensors}, run=run, extra=card or {}, license=license, name=directory.name,
                      picture=run is not None and (run / PICTURE_FILE).is_file())
    write_atomically(directory / CARD_FILE, lambda f: f.write(text.encode("utf-8")))
    if run is not None and (run / PICTURE_FILE).is_file():
        shutil.copyfile(run / PICTURE_FILE, directory / PICTURE_FILE)
    else:  # a folder written over: its old picture showed other weights
        (directory / PICTURE_FILE).unlink(missing_ok=True)
    write_atomically(directory / CONFIG_FILE, lambda f: f.write((json.dumps(config, indent=2) + "\n").encode("utf-8")))
    return directory


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, run: str | os.PathLike | None = None,
                    license: str | None = None) -> Path:
    """Write `model` as a model folder (see the module docstring); `run`: the training run folder it came from, for
    the card."""
    return write_folder(model_record(model), directory, run=run, license=license)


def read_config(directory: Path) -> dict[str, Any]:
    """config.json of a model folder as checkpoint fields (no state_dict), refused in one line when it is not one or
    is of a newer major version; fields this deeplab does not know are named in a warning and ignored."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir())[:6] if directory.is_dir() else []
        hint = (f"; pass {directory / 'best.pt'} or {directory / 'best'}" if "best.pt" in found
                else "; pass a folder written by `deeplab export --format hub` or `model.save_pretrained`, or a .pt")
        raise CheckpointError(f"{directory}: a folder without {CONFIG_FILE} (it holds {', '.join(found) or 'nothing'}), "
                              f"not a deeplab model folder{hint}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({type(e).__name__}: {str(e)[:120]}); copy the model "
                              "folder again") from None
    if isinstance(config, dict) and "train" in config and "model" in config:
        raise CheckpointError(f"{directory}: a training run folder, not a model folder; pass {directory / 'best'} (the "
                              f"model folder the run wrote) or {directory / 'best.pt'}")
    if not isinstance(config, dict) or config.get("format") != FOLDER_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{path}: not a deeplab model config (format {found!r}, not {FOLDER_FORMAT!r}); a "
                              "deeplab model folder is written by `deeplab export --format hub`")
    major = _major(config.get("version"), source=str(path))
    if major > FOLDER_VERSION:
        raise CheckpointError(f"{path}: model folder version {config['version']} (written by deeplab "
                              f"{config.get('deeplab_version', '?')}) is newer than this deeplab reads "
                              f"({FOLDER_VERSION}); upgrade deeplab: pip install -U deeplab")
    unknown = sorted(set(config) - set(KNOWN_FIELDS))
    if unknown:
        warnings.warn(f"{path}: fields this deeplab does not know ({', '.join(unknown)}; written by deeplab "
                      f"{config.get('deeplab_version', '?')}) are ignored; upgrade deeplab to use them", stacklevel=4)
    for name in ("model_config", "preprocessing", "class_names"):
        if name not in config:
            raise CheckpointError(f"{path}: has no {name}; the file was edited or not written by deeplab")
    data = {name: config[name] for name in ("model_config", "preprocessing", "class_names", *CARRIED) if name in config}
    _check_mirrors(config, source=str(path))
    return data


def _major(version: Any, *, source: str) -> int:
    text = str(version)
    if isinstance(version, bool) or not re.fullmatch(r"\d+(\.\d+)*", text):
        raise CheckpointError(f"{source}: its version field is {version!r}, not a number; the file was edited or not "
                              "written by deeplab")
    return int(text.split(".")[0])


def _check_mirrors(config: dict[str, Any], *, source: str) -> None:
    """bands and input_size repeat model_config.in_channels and preprocessing.input_size for readers without
    deeplab; a file where they disagree was edited, and which one is meant cannot be known."""
    model, pre = config.get("model_config"), config.get("preprocessing")
    if not isinstance(model, dict) or not isinstance(pre, dict):
        return  # refused with the file's name by the checkpoint field checks
    for name, value, truth in (("bands", config.get("bands"), model.get("in_channels", 3)),
                               ("input_size", config.get("input_size"), pre.get("input_size"))):
        if name in config and value != truth:
            raise CheckpointError(f"{source}: {name} is {value!r} but the model config says {truth!r}; the file was "
                                  "edited by hand: make both agree, or write the folder again")


def weights_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (safetensors dtype, shape)} from a safetensors file's JSON header, read without its tensor data; one
    line for anything that is not a safetensors file (a pickle renamed, a cut-off download)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a model folder holds its weights in {WEIGHTS_FILE} beside "
                              f"{CONFIG_FILE} (copy the whole folder)")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = struct.unpack("<Q", f.read(8))[0] if size >= 8 else -1
            if not 2 <= length <= size - 8:
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        entries = {k: (str(v["dtype"]), tuple(int(n) for n in v["shape"])) for k, v in header.items()
                   if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({type(e).__name__}: {str(e)[:100]}); it is never "
                              "unpickled. Copy the model folder again, or write it with `deeplab export --format "
                              "hub`") from None
    return entries


def first_mismatch(expected: dict[str, torch.Tensor], found: dict[str, tuple[str, tuple[int, ...]]]) -> str | None:
    """The first difference between the tensors a model built from the config has and those in the file."""
    for name, tensor in expected.items():
        if name not in found:
            return f"has no tensor {name} (shape {tuple(tensor.shape)}), which the config's model has"
        dtype, shape = found[name]
        if shape != tuple(tensor.shape):
            return f"{name} has shape {shape}, the config's model {tuple(tensor.shape)}"
        if dtype != SAFETENSORS_DTYPES.get(tensor.dtype):
            return f"{name} is {dtype}, the config's model {SAFETENSORS_DTYPES.get(tensor.dtype, tensor.dtype)}"
    extra = [name for name in found if name not in expected]
    if extra:
        return f"holds {len(extra)} tensor(s) the config's model has not, first {extra[0]}"
    return None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each copied straight from the memory-mapped file into memory of its own
    (reading the file into bytes first and decoding them, safetensors' `load`, makes a second copy and was several
    times slower for ResNet-101). `load_file`'s own tensors stay mapped to the file: a model holding them would die of
    SIGBUS when the file is rewritten in place (`cp` over it) while it runs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return {name: tensor.clone() for name, tensor in load_file(path).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors ({type(e).__name__}: {str(e)[:120]}); copy the model "
                              "folder again") from None


def resolve_folder(name: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                   token: str | bool | None = None) -> Path:
    """A local path as it is; otherwise a Hub repo id, fetched (or found in the cache, which is all that
    HF_HUB_OFFLINE=1 allows) with huggingface_hub, the optional extra `deeplab[hub]`."""
    path = Path(name)
    if path.exists():
        return path
    text = str(name)
    if not REPO_ID.fullmatch(text) or Path(text).suffix.lower() in FILE_SUFFIXES:
        raise CheckpointError(f"{text}: no such file or folder; pass a deeplab .pt, a model folder or a Hub repo id "
                              "(owner/name)")
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"{text}: no such file or folder here; to fetch it as a Hub repo id install "
                              "huggingface_hub: pip install 'deeplab[hub]'") from None
    from huggingface_hub import utils as errors  # the exceptions' home in every release since 0.14

    try:
        return Path(huggingface_hub.snapshot_download(
            text, revision=revision, cache_dir=cache_dir, token=token, library_name="deeplab",
            library_version=deeplab_version(), allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, INT8_FILE]))
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        raise CheckpointError(f"{text}: no such local file or folder, and as a Hub repo id not in the local Hugging "
                              "Face cache while the Hub cannot be reached or HF_HUB_OFFLINE is set; fetch it once "
                              "online, or pass a local model folder") from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.HFValidationError) as e:
        raise CheckpointError(f"{text}: no such local file or folder, and no such model on the Hub "
                              f"({type(e).__name__}); check the path or the repo id, or log in (hf auth login) for a "
                              "private one") from None


def is_repo_id(name: str | os.PathLike) -> bool:
    """Whether a command's --checkpoint names a Hub repo: "owner/name", with no such local path and not ending like a
    file. A bare "name" stays a local path (a typo of one is refused as missing, not looked up on the Hub)."""
    text = str(name)
    return (text.count("/") == 1 and REPO_ID.fullmatch(text) is not None
            and Path(text).suffix.lower() not in FILE_SUFFIXES and not Path(text).exists())


def checkpoint_path(name: str | os.PathLike) -> Path:
    """What a --checkpoint (or --init-checkpoint) names: a local path as it is (a missing one is refused by its
    reader, by name), or a Hub repo id (`is_repo_id`) as its folder in huggingface_hub's cache (`resolve_folder`)."""
    return resolve_folder(name) if is_repo_id(name) else Path(name)


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                commit_message: str = "Upload deeplab model", revision: str | None = None) -> str:
    """Publish a model folder as the Hub repo `repo_id` (created if missing); returns the commit's URL. Only the
    model folder's own files are uploaded."""
    folder = Path(folder)
    read_config(folder)  # a folder that is not a deeplab model folder is refused before anything is sent
    weights_header(folder / WEIGHTS_FILE)
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise CheckpointError("push_to_hub needs huggingface_hub: pip install 'deeplab[hub]'") from None
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             revision=revision, allow_patterns=list(FOLDER_FILES))
    return str(getattr(info, "commit_url", info))


__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "FOLDER_FORMAT",
    "FOLDER_VERSION",
    "INT8_FILE",
    "WEIGHTS_FILE",
    "checkpoint_path",
    "folder_config",
    "is_repo_id",
    "model_record",
    "push_to_hub",
    "read_config",
    "resolve_folder",
    "save_pretrained",
    "write_folder",
]
