"""Configuration: frozen dataclasses, named presets, and reading a checkpoint folder.

Every quirk of the published BAGEL-7B-MoT checkpoint is handled in exactly one
place, :func:`config_from_checkpoint`. Nothing else in the package reads the
json files of a checkpoint folder.

Glossary: *latent patch* -- a 2x2 patch of the VAE latent, one generation
token; *max latent size* -- side of the latent-token position grid (64 for
7B-MoT, so 1024 px); *ViT patch* -- a 14x14x3 pixel patch, one ViT token.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from openbagel.errors import CheckpointError, InvalidInputError

log = logging.getLogger(__name__)

RenormType = Literal["global", "channel", "text_channel"]

#: File written by our exporter / shipped with our checkpoints. Optional.
OPENBAGEL_EXTRA = "openbagel.json"
#: File of the golden tiny checkpoint carrying the implicit settings. Optional.
GOLDEN_EXTRA = "tiny_extra.json"
#: Sanity bound on layer counts read from a config (BAGEL-7B-MoT has 28).
MAX_LAYERS = 1024


def _positive(obj: Any, *names: str) -> None:
    """Raise ValueError unless each named field is a positive finite number,
    and an integer where the field is declared ``int``."""
    for name in names:
        v = getattr(obj, name)
        want_int = obj.__dataclass_fields__[name].type == "int"
        if isinstance(v, bool) or not isinstance(v, int if want_int else (int, float)):
            raise ValueError(f"{name} must be {'an integer' if want_int else 'a number'}, got {v!r}")
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be positive, got {v!r}")


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2 decoder with MoT experts (``llm_config.json``)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    #: Context length the model was trained for (a warning past it, not a limit).
    max_position_embeddings: int = 32768

    def __post_init__(self) -> None:
        _positive(
            self,
            "max_position_embeddings",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "vocab_size",
            "rope_theta",
            "rms_norm_eps",
        )
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads, and that of num_key_value_heads")
        if self.num_layers > MAX_LAYERS:
            raise ValueError(f"num_hidden_layers {self.num_layers} is beyond any BAGEL model (at most {MAX_LAYERS})")
        if self.rope_theta <= 1:
            raise ValueError(f"rope_theta must be > 1, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ViTConfig:
    """SigLIP vision tower run NaViT-style (``vit_config.json``).

    ``num_layers`` is the number of layers **built** (the published json
    declares one more; the reference drops the last one).
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    patch_size: int = 14
    image_size: int = 980
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _positive(
            self,
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "patch_size",
            "image_size",
            "layer_norm_eps",
        )
        if self.hidden_size % self.num_heads:
            raise ValueError("vit hidden_size must be a multiple of num_attention_heads")
        if self.num_layers > MAX_LAYERS:
            raise ValueError(
                f"vit num_hidden_layers {self.num_layers} is beyond any BAGEL model (at most {MAX_LAYERS})"
            )

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class VAEConfig:
    """FLUX autoencoder shape (the reference hard-codes the published values)."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    resolution: int = 256
    #: GroupNorm groups (FLUX: 32 groups of 4 channels at its 128 base channels).
    norm_groups: int = 32

    def __post_init__(self) -> None:
        _positive(
            self,
            "in_channels",
            "out_channels",
            "base_channels",
            "num_res_blocks",
            "z_channels",
            "scale_factor",
            "norm_groups",
        )
        if not math.isfinite(self.shift_factor):
            raise ValueError(f"shift_factor must be a finite number, got {self.shift_factor!r}")
        if not self.channel_mult or any(not isinstance(m, int) or m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be positive integers, got {self.channel_mult}")
        if any(c % self.norm_groups for c in self.block_out_channels):
            raise ValueError(
                f"norm_groups ({self.norm_groups}) must divide every channel count {self.block_out_channels}"
            )

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class ImageTransformConfig:
    """Aspect-preserving resize bounds of one image path (spec section 4)."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 14 * 14 * 9 * 1024

    def __post_init__(self) -> None:
        _positive(self, "max_size", "min_size", "stride", "max_pixels")


RENORM_TYPES = ("global", "channel", "text_channel")


@dataclass(frozen=True)
class ImageSampling:
    """Image generation settings (spec section 6).

    Attributes:
        num_timesteps: points of the schedule from t=1 to t=0; the model runs
            ``num_timesteps - 1`` times (BAGEL's meaning). At least 2.
        timestep_shift: schedule shift ``s`` in ``s*t / (1 + (s-1)*t)``.
        guidance_scale: text guidance; <= 1 turns it off.
        image_guidance_scale: image guidance; <= 1 turns it off.
        cfg_interval: guidance applies while ``lo < t <= hi``.
        cfg_renorm_type: ``global``, ``channel`` or ``text_channel``.
        cfg_renorm_min: lower clamp of the renorm factor, in [0, 1] (0 = no floor).

    Raises:
        InvalidInputError: a value outside its range, or not a finite number.
    """

    num_timesteps: int = 50
    timestep_shift: float = 3.0
    guidance_scale: float = 4.0
    image_guidance_scale: float = 1.5
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: RenormType = "global"
    cfg_renorm_min: float = 0.0

    def __post_init__(self) -> None:
        for name in ("timestep_shift", "guidance_scale", "image_guidance_scale", "cfg_renorm_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InvalidInputError(f"{name} must be a finite number, got {v!r}")
        if isinstance(self.num_timesteps, bool) or not isinstance(self.num_timesteps, int):
            raise InvalidInputError(f"num_timesteps must be an integer, got {self.num_timesteps!r}")
        if self.num_timesteps < 2:
            raise InvalidInputError(
                f"num_timesteps must be at least 2 (it counts schedule points; the model runs num_timesteps - 1 times), got {self.num_timesteps}"
            )
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise InvalidInputError(
                f"cfg_renorm_type must be one of {', '.join(RENORM_TYPES)}, got {self.cfg_renorm_type!r}"
            )
        if self.timestep_shift <= 0:
            raise InvalidInputError(f"timestep_shift must be > 0, got {self.timestep_shift}")
        if not 0 <= self.cfg_renorm_min <= 1:
            raise InvalidInputError(f"cfg_renorm_min must be in [0, 1], got {self.cfg_renorm_min}")
        try:
            lo, hi = (float(x) for x in self.cfg_interval)
        except (TypeError, ValueError):
            raise InvalidInputError(f"cfg_interval must be a pair (lo, hi), got {self.cfg_interval!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise InvalidInputError(f"cfg_interval must be (lo, hi) with lo <= hi, got {self.cfg_interval}")
        object.__setattr__(self, "cfg_interval", (lo, hi))


@dataclass(frozen=True)
class ImageSizes:
    """The output sizes a model can draw, in pixels: each side a multiple of
    ``multiple_of`` from ``min_side`` to ``max_side``.

    ``min_side == max_side`` allows one square size only (the embedded model,
    trained on 64x64 scenes, draws nothing else). A checkpoint states it in
    ``openbagel.json`` as ``"image_sizes": {"min_side": .., "max_side": ..,
    "multiple_of": ..}``; without it every size the latent grid can hold is
    allowed (see :attr:`BagelConfig.supported_sizes`).

    Raises:
        ValueError: a non-positive value, ``min_side > max_side``, or a bound
            that is not a multiple of ``multiple_of``.
    """

    min_side: int
    max_side: int
    multiple_of: int = 16

    def __post_init__(self) -> None:
        _positive(self, "min_side", "max_side", "multiple_of")
        if self.min_side > self.max_side:
            raise ValueError(f"image_sizes: min_side {self.min_side} exceeds max_side {self.max_side}")
        for name in ("min_side", "max_side"):
            if getattr(self, name) % self.multiple_of:
                raise ValueError(f"image_sizes: {name} {getattr(self, name)} is not a multiple of {self.multiple_of}")

    @property
    def single(self) -> bool:
        """True when one size only (``min_side`` x ``min_side``) is allowed."""
        return self.min_side == self.max_side

    def allows(self, width: int, height: int) -> bool:
        """Whether ``width`` x ``height`` pixels is a size of this set."""
        return all(self.min_side <= v <= self.max_side and v % self.multiple_of == 0 for v in (width, height))

    def describe(self) -> str:
        """The set in words, e.g. ``"64x64 only"`` or ``"sides from 16 to 1024 px, multiples of 16"``."""
        if self.single:
            return f"{self.min_side}x{self.min_side} only"
        return f"sides from {self.min_side} to {self.max_side} px, multiples of {self.multiple_of}"


@dataclass(frozen=True)
class ImageTaskDefaults:
    """Default output size and sampling settings of one image task (text-to-image or editing).

    ``width``/``height`` of 0 mean "the input image's (resized) size".
    """

    width: int
    height: int
    sampling: ImageSampling = ImageSampling()


@dataclass(frozen=True)
class TextDefaults:
    """Default text decoding settings (the reference app's)."""

    max_new_tokens: int = 512
    max_think_tokens: int = 1024
    temperature: float = 0.3
    top_p: float = 1.0

    def __post_init__(self) -> None:
        _positive(self, "max_new_tokens", "max_think_tokens", "temperature", "top_p")
        if self.top_p > 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class BagelConfig:
    """Everything needed to build a BAGEL model and run its tasks."""

    llm: LLMConfig
    vit: ViTConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    position_mode: Literal["extrapolate", "interpolate"] = "extrapolate"
    vae_transform: ImageTransformConfig = ImageTransformConfig(1024, 512, 16)
    vit_transform: ImageTransformConfig = ImageTransformConfig(980, 224, 14)
    t2i: ImageTaskDefaults = ImageTaskDefaults(width=1024, height=1024)
    edit: ImageTaskDefaults = ImageTaskDefaults(
        width=0,
        height=0,
        sampling=ImageSampling(image_guidance_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel"),
    )
    text: TextDefaults = TextDefaults()
    #: The output sizes the model can draw; None: all the latent grid holds
    #: (see :attr:`supported_sizes`).
    image_sizes: ImageSizes | None = None

    def __post_init__(self) -> None:
        _positive(self, "latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side")
        if self.connector_act != "gelu_pytorch_tanh":
            raise ValueError(f"connector_act {self.connector_act!r} is not supported (only gelu_pytorch_tanh)")
        if self.position_mode not in ("extrapolate", "interpolate"):
            raise ValueError(f"position_mode must be 'extrapolate' or 'interpolate', got {self.position_mode!r}")
        if self.vit_transform.stride % self.vit.patch_size:
            raise ValueError(
                f"vit_transform stride {self.vit_transform.stride} must be a multiple of the ViT patch size {self.vit.patch_size}"
            )
        if self.vae_transform.stride % self.latent_downsample:
            raise ValueError(
                f"vae_transform stride {self.vae_transform.stride} must be a multiple of {self.latent_downsample} (VAE downsample x latent patch)"
            )
        sizes = self.image_sizes
        if sizes is not None and (sizes.multiple_of % self.latent_downsample or sizes.max_side > self.max_image_side):
            raise ValueError(
                f"image_sizes ({sizes.describe()}) must use multiples of {self.latent_downsample} up to {self.max_image_side} "
                "(latent downsample, max_latent_size x latent downsample)"
            )
        for task, d in (("t2i", self.t2i), ("edit", self.edit)):
            if task == "edit" and d.width == d.height == 0:
                continue  # the input image's size
            if not all(isinstance(side, int) for side in (d.width, d.height)) or not self.supported_sizes.allows(
                d.width, d.height
            ):
                raise ValueError(
                    f"{task} default size {d.width}x{d.height} is not one this model draws ({self.supported_sizes.describe()})"
                )

    @property
    def latent_channels_per_token(self) -> int:
        """Numbers carried by one generation token: ``p*p*z_channels`` (64)."""
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per generation token side: VAE downsample x latent patch (16)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def max_image_side(self) -> int:
        """Largest image side the latent grid holds, in pixels (1024 for 7B-MoT)."""
        return self.max_latent_size * self.latent_downsample

    @property
    def supported_sizes(self) -> ImageSizes:
        """The output sizes this model draws: ``image_sizes``, or by default
        every multiple of the latent downsample up to :attr:`max_image_side`
        (7B-MoT: multiples of 16 up to 1024)."""
        if self.image_sizes is not None:
            return self.image_sizes
        return ImageSizes(self.latent_downsample, self.max_image_side, self.latent_downsample)


# ---------------------------------------------------------------------------
# Presets

#: Latent scaling of the shapes autoencoder (fitted after its training:
#: ``latent = scale * (z - shift)`` has zero mean and unit variance).
SHAPES_VAE_SCALE = 0.535241
SHAPES_VAE_SHIFT = 0.000092

PRESETS: dict[str, BagelConfig] = {
    "7b-mot": BagelConfig(
        llm=LLMConfig(
            hidden_size=3584,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            intermediate_size=18944,
            vocab_size=152064,
        ),
        vit=ViTConfig(hidden_size=1152, num_layers=26, num_heads=16, intermediate_size=4304),
    ),
    # The benchmarks' middle size (openbagel bench --config small): a small
    # decoder with the real vocabulary, a small ViT, the full FLUX autoencoder.
    "small": BagelConfig(
        llm=LLMConfig(
            hidden_size=512,
            num_layers=8,
            num_heads=8,
            num_kv_heads=4,
            intermediate_size=1408,
            vocab_size=152064,
        ),
        vit=ViTConfig(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536),
    ),
    # The golden tiny-random checkpoint of shared/golden (its transforms are
    # the small ones the golden cases use).
    "tiny-golden": BagelConfig(
        llm=LLMConfig(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            vocab_size=300,
            max_position_embeddings=4096,
        ),
        vit=ViTConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=128),
        vae=VAEConfig(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1),
        vae_transform=ImageTransformConfig(256, 64, 16),
        vit_transform=ImageTransformConfig(224, 56, 14),
        t2i=ImageTaskDefaults(width=64, height=64, sampling=ImageSampling(num_timesteps=10)),
        edit=ImageTaskDefaults(
            width=0,
            height=0,
            sampling=ImageSampling(
                num_timesteps=10, image_guidance_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel"
            ),
        ),
        text=TextDefaults(max_new_tokens=32, max_think_tokens=64),
    ),
    # The embedded model of the shapes world (openbagel/assets/shapes): its
    # tokenizer (512 tokens) and autoencoder are trained on that world; images
    # are 64 px and never upscaled (a bigger input is scaled down to 64).
    "shapes": BagelConfig(
        llm=LLMConfig(
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=512,
            vocab_size=512,
            max_position_embeddings=2048,
        ),
        vit=ViTConfig(hidden_size=96, num_layers=2, num_heads=4, intermediate_size=384),
        vae=VAEConfig(
            base_channels=32,
            channel_mult=(1, 2, 2, 4),
            num_res_blocks=1,
            norm_groups=8,  # 4 channels per group, as FLUX has (1 would erase flat colours)
            scale_factor=SHAPES_VAE_SCALE,
            shift_factor=SHAPES_VAE_SHIFT,
            resolution=64,
        ),
        max_latent_size=16,
        vit_max_num_patch_per_side=16,
        vae_transform=ImageTransformConfig(64, 32, 16),
        vit_transform=ImageTransformConfig(70, 28, 14),
        # sampling tuned on ShapesEval items of another seed (MODEL_CARD.md): the
        # training shift (3.0) and text guidance 4.0 over the whole schedule
        t2i=ImageTaskDefaults(
            width=64,
            height=64,
            sampling=ImageSampling(num_timesteps=20, timestep_shift=3.0, guidance_scale=4.0, cfg_interval=(0.0, 1.0)),
        ),
        edit=ImageTaskDefaults(
            width=0,
            height=0,
            sampling=ImageSampling(
                num_timesteps=20,
                timestep_shift=1.0,
                image_guidance_scale=2.5,
                cfg_interval=(0.0, 1.0),
                cfg_renorm_type="text_channel",
            ),
        ),
        text=TextDefaults(max_new_tokens=16, max_think_tokens=96),
        # trained on 64x64 scenes only: other sizes crop the scene or give noise
        image_sizes=ImageSizes(64, 64, 16),
    ),
}


def preset(name: str) -> BagelConfig:
    """Return a named preset (``"7b-mot"``, ``"small"``, ``"tiny-golden"``, ``"shapes"``).

    Raises:
        KeyError: unknown name; the message lists the known ones.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------
# Reading a checkpoint folder


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"{path.parent}: missing {path.name}; a BAGEL checkpoint folder needs it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _image_transform(d: dict[str, Any]) -> ImageTransformConfig:
    return ImageTransformConfig(
        max_size=int(d["max_size"]),
        min_size=int(d["min_size"]),
        stride=int(d["stride"]),
        max_pixels=int(d.get("max_pixels", 14 * 14 * 9 * 1024)),
    )


def _task_defaults(base: ImageTaskDefaults, d: dict[str, Any]) -> ImageTaskDefaults:
    d = dict(d)
    if "sampling" in d:
        sampling = dict(d["sampling"])
        if "cfg_interval" in sampling:
            sampling["cfg_interval"] = tuple(float(x) for x in sampling["cfg_interval"])
        d["sampling"] = replace(base.sampling, **sampling)
    return replace(base, **d)


def config_from_checkpoint(folder: str | Path) -> BagelConfig:
    """Read a BAGEL checkpoint folder's json files into a :class:`BagelConfig`.

    This is the one function that knows the published checkpoint's quirks:

    * ``llm_config.json`` is a plain Qwen2 config; the reference forces
      ``qk_norm=True``, untied embeddings and MoT layers (our model always has
      them), whatever the file says.
    * ``vit_config.json`` declares one layer more than is built: the reference
      drops the last encoder layer (it selects the second-to-last hidden state),
      uses a linear patch embedding and no rotary embedding.
    * The VAE shape and the top-level settings (latent patch 2, max latent size
      64, ViT max 70 patches a side, connector ``gelu_pytorch_tanh``) are not in
      the published folder; they default to the published values, and are
      read from ``openbagel.json`` (ours) or ``tiny_extra.json`` (golden) when
      one is present.
    * Some fine-tunes carry a stale max latent size: when the latent position
      table stored in ``ema.safetensors`` is larger, its size is used (with a
      warning). A smaller stored table is fine (the table is rebuilt at the
      configured size; :func:`~openbagel.checkpoint.load_model` checks the rows
      both hold).

    Args:
        folder: the checkpoint folder.

    Raises:
        CheckpointError: a json file is missing or malformed.
    """
    folder = Path(folder)
    llm_file, vit_file = folder / "llm_config.json", folder / "vit_config.json"
    llm, vit = _read_json(llm_file), _read_json(vit_file)
    with _config_errors(llm_file):
        llm_cfg = LLMConfig(
            hidden_size=int(llm["hidden_size"]),
            num_layers=int(llm["num_hidden_layers"]),
            num_heads=int(llm["num_attention_heads"]),
            num_kv_heads=int(llm.get("num_key_value_heads", llm["num_attention_heads"])),
            intermediate_size=int(llm["intermediate_size"]),
            vocab_size=int(llm["vocab_size"]),
            rope_theta=float(llm.get("rope_theta", 1_000_000.0)),
            rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(llm.get("max_position_embeddings", 32768)),
        )
    with _config_errors(vit_file):
        vit_cfg = ViTConfig(
            hidden_size=int(vit["hidden_size"]),
            num_layers=int(vit["num_hidden_layers"]) - 1,  # quirk: last layer dropped
            num_heads=int(vit["num_attention_heads"]),
            intermediate_size=int(vit["intermediate_size"]),
            patch_size=int(vit.get("patch_size", 14)),
            image_size=int(vit.get("image_size", 980)),
            layer_norm_eps=float(vit.get("layer_norm_eps", 1e-6)),
        )

    # the default ViT transform's stride (14) fits only ViT patches dividing it;
    # another patch size starts from its own stride until openbagel.json sets the transform
    default_vit = BagelConfig.vit_transform  # the field's default
    if default_vit.stride % vit_cfg.patch_size:
        default_vit = replace(default_vit, stride=vit_cfg.patch_size)
    cfg = BagelConfig(llm=llm_cfg, vit=vit_cfg, vit_transform=default_vit)
    for name, apply in ((OPENBAGEL_EXTRA, _apply_openbagel_extra), (GOLDEN_EXTRA, _apply_golden_extra)):
        if (folder / name).exists():
            with _config_errors(folder / name):
                cfg = apply(cfg, _read_json(folder / name))
            break
    side = _stored_latent_side(folder)
    if side is not None and side > cfg.max_latent_size:
        log.warning(
            "%s: the config's max_latent_size %d is stale; the stored latent position table is %dx%d: "
            "using %d (images up to %d px)",
            folder,
            cfg.max_latent_size,
            side,
            side,
            side,
            side * cfg.latent_downsample,
        )
        cfg = replace(cfg, max_latent_size=side)
    return cfg


def _stored_latent_side(folder: Path) -> int | None:
    """The side of the latent position table stored in ``ema.safetensors`` (its
    header only is read); None without the file or the table, or when the table
    is not square (the loader reports that)."""
    from safetensors import SafetensorError, safe_open

    file, key = folder / "ema.safetensors", "latent_pos_embed.pos_embed"
    try:
        if not file.is_file():
            return None
        with safe_open(str(file), framework="pt") as f:
            if key not in f.keys():
                return None
            rows = f.get_slice(key).get_shape()[0]
    except (SafetensorError, OSError):
        return None
    side = math.isqrt(rows)
    return side if side * side == rows else None


@contextmanager
def _config_errors(file: Path) -> Iterator[None]:
    """Turn a missing field or a bad value in ``file`` into a CheckpointError naming the file."""
    try:
        yield
    except KeyError as e:
        raise CheckpointError(f"{file}: missing the field {e.args[0]!r}") from None
    except (TypeError, ValueError, InvalidInputError) as e:
        raise CheckpointError(f"{file}: invalid setting ({e})") from None


def _vae_from_ae_params(p: dict[str, Any]) -> VAEConfig:
    """FLUX ``AutoEncoderParams`` names -> :class:`VAEConfig`."""
    return VAEConfig(
        in_channels=int(p.get("in_channels", 3)),
        out_channels=int(p.get("out_ch", 3)),
        base_channels=int(p["ch"]),
        channel_mult=tuple(int(m) for m in p["ch_mult"]),
        num_res_blocks=int(p["num_res_blocks"]),
        z_channels=int(p["z_channels"]),
        scale_factor=float(p["scale_factor"]),
        shift_factor=float(p["shift_factor"]),
        resolution=int(p.get("resolution", 256)),
    )


_TOP_LEVEL = ("latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side", "connector_act")


def _apply_golden_extra(cfg: BagelConfig, extra: dict[str, Any]) -> BagelConfig:
    top = {k: extra.get("bagel_config", {})[k] for k in _TOP_LEVEL if k in extra.get("bagel_config", {})}
    if "ae_params" in extra:
        top["vae"] = _vae_from_ae_params(extra["ae_params"])
    return replace(cfg, **top)


def _apply_openbagel_extra(cfg: BagelConfig, extra: dict[str, Any]) -> BagelConfig:
    top: dict[str, Any] = {k: extra[k] for k in (*_TOP_LEVEL, "position_mode") if k in extra}
    if "vae" in extra:
        v = dict(extra["vae"])
        if "channel_mult" in v:
            v["channel_mult"] = tuple(v["channel_mult"])
        top["vae"] = replace(cfg.vae, **v)
    for name in ("vae_transform", "vit_transform"):
        if name in extra:
            top[name] = _image_transform(extra[name])
    for name in ("t2i", "edit"):
        if name in extra:
            top[name] = _task_defaults(getattr(cfg, name), extra[name])
    if "text" in extra:
        top["text"] = replace(cfg.text, **extra["text"])
    if extra.get("image_sizes") is not None:
        top["image_sizes"] = ImageSizes(**extra["image_sizes"])
    return replace(cfg, **top)


def openbagel_extra(cfg: BagelConfig) -> dict[str, Any]:
    """The ``openbagel.json`` content that makes :func:`config_from_checkpoint` return ``cfg``
    (given the same ``llm_config.json``/``vit_config.json``)."""
    d = asdict(cfg)
    out = {
        k: d[k] for k in (*_TOP_LEVEL, "position_mode", "vae", "vae_transform", "vit_transform", "t2i", "edit", "text")
    }
    if cfg.image_sizes is not None:
        out["image_sizes"] = d["image_sizes"]
    return out
