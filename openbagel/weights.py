"""Checks on weight tensors as they are read from a file, shared by every
loader (checkpoints, quantized folders, LoRA adapters)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from openbagel.errors import CheckpointError


def check_finite(tensors: dict[str, Tensor], file: Path) -> None:
    """Refuse NaN or infinite values in the floating-point tensors of ``file``
    (a corrupt download, a flipped exponent bit, a diverged fine-tune); other
    dtypes (packed quantized weights) are skipped.

    One reduction per tensor: its minimum and maximum (``torch.aminmax``),
    which are NaN or infinite exactly when some value is.

    Raises:
        CheckpointError: naming the first tensor with a NaN or an infinity, and the file.
    """
    for key, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if t.element_size() == 1:  # float8 has no aminmax of its own
            t = t.float()
        low, high = torch.aminmax(t)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{file}: tensor {key!r} holds {bad} NaN or infinite value(s) of {t.numel()}; "
                "the file is corrupt (download it again) or the weights diverged"
            )
