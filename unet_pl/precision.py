"""Which arithmetic the network runs in: float32, or bfloat16 where the hardware computes it.

Training (``train.py --precision auto``) and prediction (``Settings.precision``, ``predict.py
--precision``) both take "auto" to mean bfloat16 autocast where the chip computes bfloat16 in its
own instructions (AVX512-BF16 or AMX on a CPU; a CUDA GPU of the Ampere generation or later), and
float32 elsewhere: emulated bfloat16 is slower than float32, up to 12x (docs/performance.md).
Nothing here imports Lightning.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: train.py --help stays quick
    import torch

#: ``Settings.precision`` / ``predict.py --precision``: "auto", float32 ("32") or bfloat16 autocast ("bf16").
PREDICT_PRECISIONS = ("auto", "32", "bf16")


def native_bf16(gpu: bool) -> bool:
    """Whether bfloat16 autocast runs on hardware support (faster than float32) on this machine."""
    import torch

    if gpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    # mkldnn's own "bf16 supported" only asks for AVX512-BW, where bf16 is emulated and slower:
    # ask for the instructions that compute it (AVX512-BF16, or AMX tiles).
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def check_precision(precision: str) -> str:
    if precision not in PREDICT_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PREDICT_PRECISIONS)}")
    return precision


def _native_on(device: torch.device | str) -> bool:
    import torch

    kind = torch.device(device).type
    return kind in ("cpu", "cuda") and native_bf16(gpu=kind == "cuda")


def resolve(precision: str, device: torch.device | str) -> str:
    """"auto" -> "bf16" where ``device``'s hardware computes bfloat16 (a CPU or a CUDA GPU), else "32"; others as given."""
    check_precision(precision)
    if precision != "auto":
        return precision
    return "bf16" if _native_on(device) else "32"


def autocast(precision: str, device: torch.device | str):
    """The context the network runs in for ``precision`` on ``device``: bfloat16 autocast or none (float32)."""
    import torch

    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=resolve(precision, device) == "bf16")


def describe(precision: str, device: torch.device | str) -> str:
    """The user's words for what ``precision`` does on ``device``."""
    import torch

    where = {"cpu": "CPU", "cuda": "GPU"}.get(torch.device(device).type, "device")
    if resolve(precision, device) == "32":
        return "network in float32" + (f" (no native bfloat16 on this {where})" if precision == "auto" else "")
    if not _native_on(device):
        return f"network in bfloat16 (emulated on this {where}: slower than float32)"
    return "network in bfloat16" + (f" (native on this {where})" if precision == "auto" else "")
