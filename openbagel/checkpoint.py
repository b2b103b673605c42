"""Finding a checkpoint folder, building the model on the meta device and
loading safetensors strictly.

A missing or unexpected tensor, a shape mismatch, or a NaN or infinite
weight is a :class:`~openbagel.errors.CheckpointError` naming the tensor and
the file.
Nothing here touches the network.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from openbagel.config import OPENBAGEL_EXTRA, BagelConfig, config_from_checkpoint
from openbagel.errors import CheckpointError
from openbagel.model.bagel import Bagel
from openbagel.model.vae import BagelVAE, flux_ae_shapes, to_diffusers_state_dict
from openbagel.quantize import load_quantized, read_quant_info
from openbagel.weights import check_finite

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
    except OSError as e:  # a name too long
        raise CheckpointError(f"bad checkpoint path {str(path)[:80]!r}: {e.strerror}") from None
    except RuntimeError as e:  # '~nouser'
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
    check_finite(out, file)
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
    """Build BAGEL on the meta device and load ``ema.safetensors`` strictly
    (or a quantized folder's weights, see :mod:`openbagel.quantize`, in their stored dtype).

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
    if read_quant_info(folder) is not None:
        return load_quantized(folder, build_model(config), device)
    model = build_model(config)
    file = folder / MODEL_FILE
    sd = read_safetensors(file, dtype=dtype, device=device)
    stored_tables = {k: sd.pop(k) for k in DERIVED_TENSORS if k in sd}
    check_tensors({k: tuple(v.shape) for k, v in sd.items()}, model_shapes(model), file)
    model.load_state_dict(sd, strict=True, assign=True)
    model.reset_position_tables()
    for key, stored in stored_tables.items():
        check_position_table(stored, model.get_buffer(key), key, file)
    return model.eval()


def check_position_table(stored: Tensor, rebuilt: Tensor, key: str, file: Path) -> None:
    """Compare a stored copy of a fixed 2-D sin-cos table (``[side**2, dim]``)
    with the rebuilt one, position by position; tables of different sides (a
    checkpoint whose config raised or lowered the max size) are compared on the
    positions both hold (row ``r*side + c`` is position ``(r, c)``).

    Raises:
        CheckpointError: the stored table is not a square table of the model's
            width, or its values are not the sin-cos table.
    """
    side, dim = math.isqrt(rebuilt.shape[0]), rebuilt.shape[1]
    stored_side = math.isqrt(stored.shape[0]) if stored.ndim == 2 else 0
    if stored.ndim != 2 or stored_side**2 != stored.shape[0] or stored.shape[1] != dim:
        raise CheckpointError(
            f"{file}: tensor {key!r} has shape {list(stored.shape)}, the model expects a square table "
            f"[side**2, {dim}] ({list(rebuilt.shape)} at this config's size)"
        )
    n = min(side, stored_side)
    both = stored.float().view(stored_side, stored_side, dim)[:n, :n]
    err = (both - rebuilt.float().view(side, side, dim)[:n, :n].to(both.device)).abs().max().item()
    if err > 1e-2:
        raise CheckpointError(
            f"{file}: tensor {key!r} differs from the 2-D sin-cos table by {err:.3g}; this checkpoint uses another position table"
        )


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
    # with an explicit config, any folder holding ae.safetensors will do
    folder = Path(folder) if config is not None else resolve_checkpoint_dir(folder)
    config = config or config_from_checkpoint(folder)
    file = folder / VAE_FILE
    sd = read_safetensors(file, dtype=dtype, device=device)
    check_tensors({k: tuple(v.shape) for k, v in sd.items()}, flux_ae_shapes(config.vae), file)
    with torch.device("meta"):
        vae = BagelVAE(config.vae)
    vae.ae.load_state_dict(to_diffusers_state_dict(sd, config.vae), strict=True, assign=True)
    return vae.eval()


# --- export ----------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def llm_config_json(config: BagelConfig) -> dict:
    """``llm_config.json`` in the published (Qwen2) form."""
    c = config.llm
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "vocab_size": c.vocab_size,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": False,
        "qk_norm": True,
        "layer_module": "Qwen2MoTDecoderLayer",
    }


def vit_config_json(config: BagelConfig) -> dict:
    """``vit_config.json`` in the published (SigLIP) form: it declares one layer
    more than is built, as the published file does."""
    c = config.vit
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers + 1,
        "num_attention_heads": c.num_heads,
        "patch_size": c.patch_size,
        "image_size": c.image_size,
        "layer_norm_eps": c.layer_norm_eps,
        "num_channels": 3,
    }


def remove_temporary_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files that an interrupted :func:`save_checkpoint`
    left in ``folder`` (those :func:`openbagel.fileio.write_atomically` names
    after each file it writes, of processes that are gone); returns them.
    Nothing else is touched."""
    from openbagel.fileio import remove_stale_temps

    folder = Path(folder)
    written = (MODEL_FILE, VAE_FILE, "llm_config.json", "vit_config.json", OPENBAGEL_EXTRA, *TOKENIZER_FILES)
    return [p for name in written for p in remove_stale_temps(folder / name)]


def save_checkpoint(
    folder: str | Path,
    model: Bagel,
    vae: BagelVAE,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder in the official layout that :func:`load_model`,
    :func:`load_vae` and the reference code read: ``ema.safetensors``,
    ``ae.safetensors`` (FLUX key layout), ``llm_config.json``,
    ``vit_config.json``, our ``openbagel.json`` (the settings the published
    folder leaves implicit) and the tokenizer files copied from ``tokenizer_dir``.

    Each file is written to a temporary name and renamed, so a crash never
    leaves a half-written file under the final name.

    Args:
        dtype: store the weights in this dtype (default: as they are).
        state_dict: the weights to write (default ``model.state_dict()``; pass
            the gathered full state dict of a sharded model).
    """
    import json
    import shutil

    from safetensors.torch import save_file

    from openbagel.config import OPENBAGEL_EXTRA, openbagel_extra
    from openbagel.fileio import write_atomically
    from openbagel.model.vae import to_flux_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def tensors(sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in sd.items()}

    def write(name: str, writer) -> None:
        write_atomically(folder / name, lambda tmp: writer(Path(tmp)))

    config = model.config
    write(MODEL_FILE, lambda p: save_file(tensors(model.state_dict() if state_dict is None else state_dict), str(p)))
    write(VAE_FILE, lambda p: save_file(tensors(to_flux_state_dict(vae.ae.state_dict(), config.vae)), str(p)))
    for name, content in (
        ("llm_config.json", llm_config_json(config)),
        ("vit_config.json", vit_config_json(config)),
        (OPENBAGEL_EXTRA, openbagel_extra(config)),
    ):
        write(name, lambda p, c=content: p.write_text(json.dumps(c, indent=2) + "\n"))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                write(name, lambda p, n=name: shutil.copyfile(Path(tokenizer_dir) / n, p))
    return folder
