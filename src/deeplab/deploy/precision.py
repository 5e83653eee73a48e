"""Numeric precision as a property of a runtime: what this CPU runs natively, which reduced-precision candidates
`auto` may consider, and the accuracy check each one must pass.

- **What the CPU has.** `cpu_flags()` reads the flags the kernel reports (/proc/cpuinfo), falling back to what
  PyTorch's own CPU probes report elsewhere. `native_bf16()` names the instructions that run bf16 arithmetic in
  hardware: AMX (``amx_bf16``: tile matrix multiplies, Sapphire Rapids and later Xeons) or AVX512_BF16 (bf16 dot
  products, Cooper Lake, AMD Zen 4/5). Without either, bf16 is emulated and slower than float32, so it is never a
  candidate there unless asked for.
- **The agreement check.** A reduced-precision candidate computes other logits; what a segmentation is judged on is
  their argmax. `agreement(out, reference)` is the share of pixels whose argmax equals float32's, and
  `check_reduced` refuses a candidate whose logits are not finite or whose agreement is below `MIN_AGREEMENT`
  (99.5%) on the check input.
- **A line for every figure.** `machine_line()` states the CPU model, its flags of note and the runtime versions, so
  a timing written anywhere says what it was measured on.
"""

from __future__ import annotations

import functools
import platform
from importlib import metadata
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "int8")
REDUCED = ("bf16", "int8")
MIN_AGREEMENT = 0.995  # argmax agreement with float32 a reduced-precision candidate needs on the check input
FLAGS_OF_NOTE = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
# (runtime, precision) pairs that exist: ONNX Runtime's CPU provider has no bf16 convolutions, TF Lite runs float
# graphs here (its uint8 files are imported, not written), the PyTorch fast path has no int8 kernels of its own.
SUPPORTED = {
    "fp32": ("torch", "onnxruntime", "openvino", "tflite"),
    "bf16": ("torch", "openvino"),
    "int8": ("onnxruntime", "openvino"),
}
RUNTIME_PACKAGES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino",
                    "ai-edge-litert": "ai-edge-litert"}


def _proc_cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux: /proc/cpuinfo; elsewhere what PyTorch's probes report, under the same names)."""
    _, flags = _proc_cpuinfo()
    if flags:
        return flags
    probes = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported", "avx512_vnni": "_is_vnni_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
    found = {name for name, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()}
    if "amx_tile" in found:  # PyTorch probes the tile unit; bf16 and int8 tiles come with it on every AMX CPU so far
        found |= {"amx_bf16", "amx_int8"}
    return frozenset(found)


@functools.cache
def cpu_model() -> str:
    return _proc_cpuinfo()[0] or platform.processor() or platform.machine()


def native_bf16(flags: frozenset[str] | None = None) -> str | None:
    """The instructions that run bf16 natively on this CPU ("AMX" or "AVX512_BF16"), or None (bf16 would be emulated)."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512_BF16"
    return None


def native_int8(flags: frozenset[str] | None = None) -> str | None:
    """The instructions that run int8 dot products natively ("AMX", "AVX512_VNNI", "AVX_VNNI"), or None."""
    flags = cpu_flags() if flags is None else flags
    for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX512_VNNI"), ("avx_vnni", "AVX_VNNI")):
        if flag in flags:
            return name
    return None


def runtime_versions() -> dict[str, str]:
    """Installed versions of the runtimes a timing depends on (absent ones left out)."""
    versions = {}
    for name, package in RUNTIME_PACKAGES.items():
        try:
            versions[name] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def machine_line(threads: int | None = None) -> str:
    """One line for every written figure: the CPU model, its flags of note, the threads and the runtime versions."""
    flags = [f for f in FLAGS_OF_NOTE if f in cpu_flags()]
    runtimes = ", ".join(f"{k} {v}" for k, v in runtime_versions().items())
    threads = f"; {threads} threads" if threads else ""
    return f"{cpu_model()}; flags {' '.join(flags) or 'none of note'}{threads}; {runtimes}"


def machine_key() -> dict[str, object]:
    """What a timing on this machine depends on besides the model (part of the runtime choice's cache key)."""
    return {"cpu": cpu_model(), "flags": sorted(f for f in FLAGS_OF_NOTE if f in cpu_flags()),
            "runtimes": runtime_versions()}


def agreement(out: torch.Tensor, reference: torch.Tensor) -> float:
    """The share of pixels (over the batch) whose argmax over classes equals the reference logits' argmax."""
    return float((out.float().argmax(1) == reference.float().argmax(1)).float().mean())


def check_reduced(out: torch.Tensor, reference: torch.Tensor, *, name: str,
                  min_agreement: float = MIN_AGREEMENT) -> float:
    """`agreement(out, reference)`; raises ValueError when `out` is not finite or agrees on fewer pixels than
    `min_agreement`."""
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} gives logits that are not finite on this input")
    share = agreement(out, reference)
    if share < min_agreement:
        raise ValueError(f"{name} agrees with float32 on {100 * share:.2f}% of the pixels (at least "
                         f"{100 * min_agreement:g}% needed)")
    return share


def candidates(precision: str, runtimes: tuple[str, ...], *, flags: frozenset[str] | None = None,
               int8: bool = False) -> list[tuple[str, str]]:
    """The (runtime, precision) pairs to consider for `precision` over `runtimes`: "fp32", "bf16" and "int8" give that
    precision on the runtimes that run it; "auto" gives float32 on all of them, bf16 where the CPU runs it natively
    (`native_bf16`) and int8 where an int8 file is at hand (`int8`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    wanted = {"auto": ["fp32"] + (["bf16"] if native_bf16(flags) else []) + (["int8"] if int8 else [])}.get(
        precision, [precision])
    return [(runtime, p) for p in wanted for runtime in runtimes if runtime in SUPPORTED[p]]


def label(runtime: str, precision: str) -> str:
    """A candidate's name: the runtime, with its precision when that is not float32 ("openvino-bf16")."""
    return runtime if precision == "fp32" else f"{runtime}-{precision}"
