"""LoRA fine-tuning through ``peft``: adapters on chosen linear layers (by
default the generation expert's attention projections), saved apart from the
base weights and merged on request."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from openbagel.model.bagel import Bagel
from openbagel.quiet import quiet_imports

#: The generation expert's q/k/v/o projections in every decoder layer.
DEFAULT_TARGETS = r".*\.self_attn\.(q|k|v|o)_proj_moe_gen$"


def add_lora(
    model: Bagel, r: int = 16, alpha: float = 32, targets: str | list[str] = DEFAULT_TARGETS, dropout: float = 0.0
):
    """Wrap ``model`` with LoRA adapters; only the adapters train.

    Args:
        targets: a regex over module names, or a list of module-name suffixes.
    Returns:
        the ``peft`` model (call it, or read attributes, as the base model).
    Raises:
        ValueError: no module matches ``targets``.
    """
    with quiet_imports():  # peft imports bitsandbytes and torchao when they are installed
        from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, bias="none")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ValueError(f"LoRA targets {targets!r} match no linear layer of the model ({e})") from None


def save_adapter(peft_model, folder: str | Path) -> Path:
    """Write the adapter weights and config (``adapter_model.safetensors``, ``adapter_config.json``),
    readable as the umask allows (safetensors writes its files ``0o600``)."""
    from openbagel.fileio import set_umask_mode

    peft_model.save_pretrained(str(folder))
    for f in Path(folder).iterdir():
        if f.is_file():
            set_umask_mode(f)
    return Path(folder)


def load_adapter(model: Bagel, folder: str | Path, merge: bool = True) -> nn.Module:
    """Apply a saved adapter to ``model``; merged into the weights by default
    (then the result is a plain :class:`Bagel`, as fast as the base model).

    Raises:
        CheckpointError: the adapter's weights are unreadable or hold NaN or
            infinite values (the tensor named).
    """
    from openbagel.checkpoint import read_safetensors

    file = Path(folder) / "adapter_model.safetensors"
    if file.is_file():
        read_safetensors(file)  # refuses a corrupt file and NaN/Inf weights (peft would load them)
    with quiet_imports():
        from peft import PeftModel

    wrapped = PeftModel.from_pretrained(model, str(folder))
    return wrapped.merge_and_unload() if merge else wrapped


def unwrap(model: nn.Module) -> Bagel:
    """The :class:`Bagel` inside a (possibly peft-wrapped) model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
