"""Mixed precision: bf16 autocast on the device's type, or nothing for fp32."""
from __future__ import annotations

import contextlib

import torch


def autocast(precision: str, device: torch.device | str = "cpu"):
    """bf16 autocast on the device's type, or a no-op context for fp32."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
