"""Finding a checkpoint folder, building the model on the meta device and
loading safetensors strictly.

A missing or unexpected tensor, or a shape mismatch, is a
:class:`~openbagel.errors.CheckpointError` naming the tensor and the file.
Nothing here touches the network.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from openbagel.config import BagelConfig, config_from_checkpoint
from openbagel.errors import CheckpointError
from openbagel.model.bagel import Bagel
from openbagel.model.vae import BagelVAE, flux_ae_shapes, to_diffusers_state_dict

log = logging.getLogger(__name__)

MODEL_FILE = "ema.safetensors"
VAE_FILE = "ae.safetensors"
#: Fixed sin-cos tables: rebuilt, never learned; a file may hold them or not.
DERIVED_TENSORS = ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder, or a Hugging Face cache folder (``models--org--name``)
    resolved to its snapshot offline.

    Raises:
        CheckpointError: the folder does not exist or holds no ``llm_config.json``.
    """
    try:
        p = Path(path).expanduser()
        exists = p.exists()
    except (OSError, RuntimeError) as e:  # a name too long, '~nouser'
        raise CheckpointError(f"bad checkpoint path {str(path)[:80]!r}: {e}") from None
    if not exists:
        raise CheckpointError(
            f"checkpoint folder {str(p)!r} does not exist; pass --model DIR with a BAGEL checkpoint folder"
        )
    if not p.is_dir():
        raise CheckpointError(f"{str(p)!r} is a file; pass the checkpoint folder that holds it")
    if (p / "snapshots").is_dir() and not (p / "llm_config.json").exists():
        p = _hf_snapshot(p)
    if not (p / "llm_config.json").exists():
        raise CheckpointError(f"{p}: missing llm_config.json; this is not a BAGEL checkpoint folder")
    return p


def _hf_snapshot(repo: Path) -> Path:
    """The snapshot folder of a Hugging Face cache repo folder: ``refs/main``, or the only snapshot."""
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = sorted(d for d in (repo / "snapshots").iterdir() if d.is_dir())
    if len(snaps) == 1:
        return snaps[0]
    raise CheckpointError(
        f"{repo}: a Hugging Face cache folder with {len(snaps)} snapshots and no usable refs/main; pass the snapshot folder itself"
    )


def read_safetensors(
    file: Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """All tensors of a safetensors file (converted to ``dtype`` if given).

    Raises:
        CheckpointError: the file is missing, truncated, or not safetensors.
    """
    from safetensors import SafetensorError, safe_open

    if not file.exists():
        raise CheckpointError(f"{file.parent}: missing {file.name}; a BAGEL checkpoint folder needs it")
    out: dict[str, Tensor] = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({e}); the file is truncated or corrupt, download it again"
        ) from None
    for key, t in out.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {t.dtype}; weights must be floating point")
    return out


def check_tensors(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], file: Path, optional: tuple[str, ...] = ()
) -> None:
    """Strict comparison of a file's tensor names/shapes with a model's.

    Raises:
        CheckpointError: naming the first missing, unexpected or mis-shaped tensor and the file.
    """
    for key, shape in expected.items():
        if key not in found:
            if key in optional:
                continue
            raise CheckpointError(
                f"{file}: missing tensor {key!r} (shape {list(shape)}); the file does not fit this model's config"
            )
        if tuple(found[key]) != tuple(shape):
            raise CheckpointError(
                f"{file}: tensor {key!r} has shape {list(found[key])}, the model expects {list(shape)}"
            )
    for key in found:
        if key not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {key!r}; the file does not fit this model's config")


def model_shapes(model: nn.Module, extra: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    """Names and shapes a checkpoint of ``model`` holds (parameters, persistent buffers and ``extra`` buffers)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    buffers = dict(model.named_buffers())
    for k in extra:
        shapes[k] = tuple(buffers[k].shape)
    return shapes


def build_model(config: BagelConfig) -> Bagel:
    """The model on the meta device (no memory used)."""
    with torch.device("meta"):
        return Bagel(config)


def load_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: BagelConfig | None = None,
) -> Bagel:
    """Build BAGEL on the meta device and load ``ema.safetensors`` strictly.

    Args:
        folder: checkpoint folder (see :func:`resolve_checkpoint_dir`).
        dtype: weight dtype (``torch.float32`` or ``torch.bfloat16``).
        device: where the weights go.
        config: override the folder's config.
    Raises:
        CheckpointError: missing/corrupt files, or tensors that do not fit.
    """
    folder = resolve_checkpoint_dir(folder)
    config = config or config_from_checkpoint(folder)
    model = build_model(config)
    file = folder / MODEL_FILE
    sd = read_safetensors(file, dtype=dtype, device=device)
    check_tensors(
        {k: tuple(v.shape) for k, v in sd.items()}, model_shapes(model, DERIVED_TENSORS), file, optional=DERIVED_TENSORS
    )
    stored_tables = {k: sd.pop(k) for k in DERIVED_TENSORS if k in sd}
    model.load_state_dict(sd, strict=True, assign=True)
    model.reset_position_tables()
    for key, stored in stored_tables.items():
        rebuilt = model.get_buffer(key)
        err = (stored.float() - rebuilt.float()).abs().max().item()
        if err > 1e-2:
            raise CheckpointError(
                f"{file}: tensor {key!r} differs from the 2-D sin-cos table by {err:.3g}; this checkpoint uses another position table"
            )
    return model.eval()


def load_vae(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: BagelConfig | None = None,
) -> BagelVAE:
    """Build the FLUX autoencoder and load ``ae.safetensors`` (FLUX layout) strictly.

    Raises:
        CheckpointError: missing/corrupt file, or tensors that do not fit.
    """
    folder = resolve_checkpoint_dir(folder)
    config = config or config_from_checkpoint(folder)
    file = folder / VAE_FILE
    sd = read_safetensors(file, dtype=dtype, device=device)
    check_tensors({k: tuple(v.shape) for k, v in sd.items()}, flux_ae_shapes(config.vae), file)
    with torch.device("meta"):
        vae = BagelVAE(config.vae)
    vae.ae.load_state_dict(to_diffusers_state_dict(sd, config.vae), strict=True, assign=True)
    return vae.eval()
