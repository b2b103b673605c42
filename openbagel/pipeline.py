"""The public Python API: load a checkpoint folder, run the tasks.

>>> from openbagel import BagelPipeline
>>> pipe = BagelPipeline.from_pretrained("path/to/BAGEL-7B-MoT", dtype="bfloat16", device="cuda")
>>> pipe.text_to_image("a red cube on a wooden table", seed=0).image.save("cube.png")
>>> pipe.understand("cube.png", "What is on the table?").text

The recipes follow spec section 7: each builds a :class:`Chat` (the three
guidance contexts) and runs the text decoder or the image sampler on it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from openbagel.checkpoint import load_model, load_vae, resolve_checkpoint_dir
from openbagel.config import BagelConfig, ImageTaskDefaults, config_from_checkpoint
from openbagel.errors import InvalidInputError
from openbagel.images import load_image, resize, resize_size, to_pil, to_tensor
from openbagel.inference.generate import FlowStep, decode_tokens, draw_noise, generate_latents_batch
from openbagel.inference.sampling import ImageSampling, TextSampling
from openbagel.inference.session import Context, Session
from openbagel.inference.static_decode import StaticDecoder
from openbagel.inference.step_cache import StepCacheSettings
from openbagel.inference.thinking import ReasoningSplitter, split_reasoning  # noqa: F401 (the server streams)
from openbagel.kv_cache import CacheBudget
from openbagel.model.bagel import Bagel
from openbagel.model.vae import BagelVAE
from openbagel.packing import flattened_position_ids, patchify, unpatchify
from openbagel.placement import LayerOffload, is_placed, offload_of, place_layers, replicate_for_branches
from openbagel.quantize import QuantSpec, check_quantized_folder, quantize_model
from openbagel.tokenizer import Tokenizer

#: System prompts of thinking mode, verbatim (the model was trained on them; spec section 7).
THINK_UNDERSTAND_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> answer here"
)
THINK_GENERATE_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> image here"
)

ImageInput = str | Path | Image.Image

#: The embedded model (the shapes world, ``openbagel/assets/shapes``): loaded
#: when no model is given to :meth:`BagelPipeline.from_pretrained` or the CLI.
DEFAULT_MODEL = Path(__file__).parent / "assets" / "shapes"

#: Named style edits (``edit(..., style=NAME)``, ``openbagel edit --style NAME``):
#: the instruction each sends. The embedded model knows these three.
STYLE_PRESETS = {
    "outline": "draw only the outlines",
    "pixel": "make it pixel art",
    "invert": "invert the colours",
}

#: The instruction between frames in next-frame prediction (the embedded model's training text).
NEXT_FRAME_INSTRUCTION = "next frame"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bfloat16"`` (or a ``torch.dtype``) -> ``torch.dtype``.

    Raises:
        InvalidInputError: another dtype.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise InvalidInputError(f"dtype {dtype} is not supported; use torch.float32 or torch.bfloat16")
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InvalidInputError(f"dtype {dtype!r} is not supported; use float32 or bfloat16") from None


def parse_device(device: str | torch.device) -> torch.device:
    """Check that a device exists here.

    Raises:
        InvalidInputError: unknown device, or CUDA/MPS not available.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InvalidInputError(f"device type {dev.type!r} is not supported; use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidInputError(f"device {dev} requested but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError("device 'mps' requested but MPS is not available; use --device cpu")
    return dev


def parse_devices(device: str | torch.device | Sequence[str | torch.device]) -> list[torch.device]:
    """One device, or several: ``"cuda:0,cuda:1"`` or a list (the first holds the inputs and outputs).

    Raises:
        InvalidInputError: an unknown or unavailable device, or one named twice.
    """
    items = device.split(",") if isinstance(device, str) else [device] if isinstance(device, torch.device) else device
    devices = [parse_device(d.strip() if isinstance(d, str) else d) for d in items]
    if not devices:
        raise InvalidInputError("no device given; use cpu, cuda, cuda:N or a list such as cuda:0,cuda:1")
    if len(devices) > 1 and len(set(devices)) < len(devices):
        raise InvalidInputError(f"device list {device!r} names a device twice; name each device once")
    return devices


def check_memory_options(
    device, quant: str | QuantSpec | None, offload: str | None, parallel: str
) -> tuple[list[torch.device], QuantSpec, bool]:
    """Check the memory options of :meth:`BagelPipeline.from_pretrained` before anything loads.

    Returns:
        The devices, the quantization and whether the layers are offloaded.
    Raises:
        InvalidInputError: an unknown or unavailable device, quantization, offload or parallel mode,
            or a combination that cannot work.
    """
    devices = parse_devices(device)
    spec = quant if isinstance(quant, QuantSpec) else QuantSpec.parse(quant)
    if offload not in (None, "none", "layers"):
        raise InvalidInputError(f"offload must be 'layers' (or none), got {offload!r}")
    if offload == "layers" and len(devices) > 1:
        raise InvalidInputError("offload runs the layers on one device; give a single device with offload")
    if parallel not in ("layers", "branches"):
        raise InvalidInputError(f"parallel must be 'layers' or 'branches', got {parallel!r}")
    if parallel == "branches" and len(devices) < 2:
        raise InvalidInputError("parallel guidance branches need several devices, e.g. cuda:0,cuda:1,cuda:2")
    return devices, spec, offload == "layers"


def make_generator(seed: int | None) -> torch.Generator | None:
    """A CPU ``torch.Generator`` seeded with ``seed`` (None: no generator).

    Noise is drawn on the CPU, so a seed gives the same result on every device.

    Raises:
        InvalidInputError: a seed that is not an integer in [0, 2**63).
    """
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise InvalidInputError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    return torch.Generator().manual_seed(int(seed))


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InvalidInputError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def _prompt_list(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InvalidInputError("prompt must be a string or a non-empty list of strings")
    return [check_text("prompt", p) for p in prompts]


def _noises(model: Bagel, s: ImageSettings, seed, total: int) -> list[torch.Tensor]:
    """One initial noise per image: ``seed`` int -> seeds seed, seed+1, ...; a list -> one seed each;
    else ``total`` draws from the settings' generator (so a batch equals consecutive single runs)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != total:
            raise InvalidInputError(f"{len(seed)} seeds given for {total} images; give one seed per image or one seed")
        seeds = list(seed)
    elif seed is not None:
        seeds = [seed + k for k in range(total)]
    else:
        return [draw_noise(model, s.height, s.width, s.generator) for _ in range(total)]
    return [draw_noise(model, s.height, s.width, make_generator(sd)) for sd in seeds]


def _single_seed(seed, generator):
    """The seed for :func:`image_settings` (None when ``seed`` is a list, used by :func:`_noises`)."""
    if isinstance(seed, (list, tuple)):
        if generator is not None:
            raise InvalidInputError("pass seed or generator, not both")
        for sd in seed:
            make_generator(sd)  # checks each
        return None
    return seed


#: Most images one call generates together.
MAX_BATCH = 64


def _check_step_cache(step_cache) -> None:
    if step_cache is not None and not isinstance(step_cache, StepCacheSettings):
        raise InvalidInputError("step_cache must be a StepCacheSettings (or None)")


def _check_batch(prompts: int, per_prompt, step_cache) -> int:
    """``per_prompt`` checked (a whole number, at most :data:`MAX_BATCH` images in all), and ``step_cache``'s type."""
    if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or not 1 <= per_prompt <= MAX_BATCH:
        raise InvalidInputError(
            f"num_images_per_prompt must be a whole number from 1 to {MAX_BATCH}, got {per_prompt!r}"
        )
    if prompts * per_prompt > MAX_BATCH:
        raise InvalidInputError(
            f"{prompts} prompts x {per_prompt} images is more than {MAX_BATCH} images in one call; split the batch"
        )
    _check_step_cache(step_cache)
    return per_prompt


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(f"{name} must be True or False, got {value!r}")
    return value


def style_instruction(prompt: str | None, style: str | None) -> str:
    """The edit instruction: ``prompt``, or the text of the named style preset.

    Raises:
        InvalidInputError: neither or both given, or an unknown style name.
    """
    if style is None:
        if prompt is None:
            raise InvalidInputError(f"edit needs an instruction or a style preset ({', '.join(STYLE_PRESETS)})")
        return check_text("prompt", prompt)
    if prompt is not None:
        raise InvalidInputError("give an instruction or a style preset, not both")
    if not isinstance(style, str) or style not in STYLE_PRESETS:
        raise InvalidInputError(f"unknown style {style!r}; choose from {', '.join(STYLE_PRESETS)}")
    return STYLE_PRESETS[style]


def check_text(name: str, value) -> str:
    """``value`` if it is a string of valid Unicode text.

    Raises:
        InvalidInputError: not a string, or a lone surrogate in it (named by ``name``).
    """
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
    return value


@dataclass
class ImageResult:
    """Generated images and, with ``think=True``, the model's planning text.

    ``reasonings`` holds one plan per prompt when several prompts were given
    (``reasoning`` is the first).
    """

    images: list[Image.Image]
    reasoning: str | None = None
    reasonings: list[str | None] = field(default_factory=list)

    @property
    def image(self) -> Image.Image:
        return self.images[0]


@dataclass
class TextResult:
    """An answer and, with ``think=True``, the reasoning that preceded it."""

    text: str
    reasoning: str | None = None


@dataclass
class ImageSettings:
    """Size, sampling settings and random source of one image generation."""

    height: int
    width: int
    sampling: ImageSampling
    generator: torch.Generator | None = field(default=None)


def check_size(config: BagelConfig, height: int, width: int) -> None:
    """Refuse sizes the model cannot draw, before any compute.

    The sizes come from the model's config (:attr:`BagelConfig.supported_sizes`:
    7B-MoT draws multiples of 16 up to 1024 a side; the embedded model 64x64 only).

    Raises:
        InvalidInputError: a side that is not an integer, or outside the
            model's sizes (the message names them and the nearest valid side).
    """
    sizes = config.supported_sizes
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidInputError(f"{name} must be an integer number of pixels, got {v!r}")
    for name, v in (("height", height), ("width", width)):
        if sizes.single and v != sizes.min_side:
            raise InvalidInputError(f"{name} {v} is not supported: this model draws {sizes.describe()}")
        if v < sizes.min_side:
            raise InvalidInputError(f"{name} {v} is too small; the smallest valid {name} is {sizes.min_side}")
        if v > sizes.max_side:
            grid = f" (max_latent_size {config.max_latent_size} x {config.latent_downsample})"
            why = "" if config.image_sizes else grid
            raise InvalidInputError(f"{name} {v} exceeds this model's limit of {sizes.max_side} pixels{why}")
        step = sizes.multiple_of
        if v % step:
            nearest = min(sizes.max_side, max(sizes.min_side, round(v / step) * step))
            raise InvalidInputError(f"{name} {v} is not a multiple of {step}; the nearest valid {name} is {nearest}")


def output_size_of_input(config: BagelConfig, width: int, height: int, what: str) -> tuple[int, int]:
    """The output size an edit or a clip takes from its input, ``(width, height)`` in
    pixels: the input's size after the VAE-path resize (``width`` x ``height``)
    when the model draws it; the model's one size when it draws a single one
    (the embedded 64x64 model given a 64x32 input draws 64x64).

    Raises:
        InvalidInputError: the model draws several sizes but not this one
            (``what``: "the input image", "the frames"), before any compute;
            the message names the model's sizes and the fix.
    """
    sizes = config.supported_sizes
    if sizes.allows(width, height):
        return width, height
    if sizes.single:
        return sizes.min_side, sizes.min_side
    verb = "are" if what.endswith("s") else "is"
    raise InvalidInputError(
        f"{what} {verb} {width}x{height} at this model's resolution, a size it cannot draw "
        f"(it draws {sizes.describe()}); give an output size it draws (height and width)"
    )


def image_settings(
    config: BagelConfig,
    defaults: ImageTaskDefaults,
    height: int | None = None,
    width: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    **sampling,
) -> ImageSettings:
    """Resolve per-call image settings against a task's defaults (``config.t2i`` or ``config.edit``).

    ``None`` means "the default". A default size of 0 (editing) means the
    input image's size, filled in by the caller.

    Raises:
        InvalidInputError: bad size or sampling settings.
    """
    params = replace(defaults.sampling, **{k: v for k, v in sampling.items() if v is not None})
    if (height is None) != (width is None) and not (defaults.height and defaults.width):
        raise InvalidInputError("give both height and width, or neither (then the input image's size is used)")
    height = defaults.height if height is None else height
    width = defaults.width if width is None else width
    if not (height == width == 0 and defaults.height == defaults.width == 0):
        check_size(config, height, width)
    if generator is not None and seed is not None:
        raise InvalidInputError("pass seed or generator, not both")
    if generator is None:
        generator = make_generator(seed)
    return ImageSettings(height, width, params, _check_generator(generator))


def text_sampling(
    config: BagelConfig,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    think: bool = False,
) -> TextSampling:
    """Text decoding settings with the config's defaults for ``None``
    (``max_think_tokens`` instead of ``max_new_tokens`` when thinking)."""
    t = config.text
    if max_new_tokens is None:
        max_new_tokens = t.max_think_tokens if think else t.max_new_tokens
    return TextSampling(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=t.temperature if temperature is None else temperature,
        top_p=t.top_p if top_p is None else top_p,
    )


class BagelPipeline:
    """A loaded BAGEL: model, VAE, tokenizer and config.

    Create with :meth:`from_pretrained`. All task methods are thread-unsafe
    and run under ``torch.inference_mode``.
    """

    #: Run every guidance branch as its own pass over copied contexts and
    #: build a segment per decoded token (the reference's way): the baseline
    #: ``openbagel bench`` compares against. Same numbers, slower.
    plain: bool = False

    #: Set by :meth:`compile`: text decoding with static shapes.
    decoder: StaticDecoder | None = None

    #: How the weights are stored (set by :meth:`from_pretrained`).
    quant: QuantSpec = QuantSpec()

    def __init__(
        self,
        model: Bagel,
        vae: BagelVAE,
        tokenizer: Tokenizer,
        config: BagelConfig,
        max_cache_bytes: int | None = None,
    ):
        """``max_cache_bytes``: the KV-cache budget of each conversation (None: unlimited)."""
        self.model, self.vae, self.tokenizer, self.config = model, vae, tokenizer, config
        CacheBudget(max_cache_bytes)  # checks the value
        self.max_cache_bytes = max_cache_bytes
        if self.device.type == "cpu":
            model.use_decoding_layout()
        if max(tokenizer.ids.values()) >= config.llm.vocab_size:
            raise InvalidInputError(
                f"the tokenizer's special ids {tokenizer.ids} exceed the model's vocabulary ({config.llm.vocab_size}); "
                "the tokenizer files do not belong to this checkpoint"
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | Sequence[str | torch.device] = "cpu",
        adapter: str | Path | None = None,
        max_cache_bytes: int | None = None,
        quant: str | QuantSpec | None = None,
        offload: str | None = None,
        parallel: str = "layers",
    ) -> BagelPipeline:
        """Load a checkpoint folder (or a Hugging Face cache snapshot folder), offline.

        Args:
            path: folder with ``llm_config.json``, ``vit_config.json``,
                ``ema.safetensors``, ``ae.safetensors`` and the tokenizer files
                (or a folder written by :func:`~openbagel.quantize.save_quantized`);
                ``None`` loads the embedded shapes-world model (:data:`DEFAULT_MODEL`).
            dtype: ``"float32"`` or ``"bfloat16"`` (weights and activations); default
                bfloat16 on CUDA, float32 elsewhere, or the dtype a quantized folder was saved in.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, or several
                (``"cuda:0,cuda:1"``), shared as ``parallel`` says.
            adapter: a LoRA adapter folder (from ``openbagel train``), merged into the weights.
            max_cache_bytes: KV-cache budget of each conversation; a context
                that would need more is refused with ``CacheBudgetError``.
            quant: weight-only quantization per part, e.g. ``"llm=int8"``,
                ``"llm=nf4,vit=int8"`` (see :mod:`openbagel.quantize`).
            offload: ``"layers"``: decoder layers stay in CPU memory and are
                copied to the device one ahead of use (see :class:`~openbagel.placement.LayerOffload`).
            parallel: with several devices, ``"layers"``: the decoder layers
                split across them in contiguous blocks, the rest on the first
                (for a model too big for one); ``"branches"``: a whole copy on
                each, the guidance branches of every denoising step run side by
                side (each device must hold the whole model).
        Raises:
            CheckpointError: missing, corrupt or mismatched files.
            InvalidInputError: bad dtype, quantization or offload; unavailable device.
        """
        devices, spec, offload = check_memory_options(device, quant, offload, parallel)
        main = devices[0]
        if path is None:
            path = DEFAULT_MODEL
        if not isinstance(path, (str, Path)):
            raise InvalidInputError(f"path must be a checkpoint folder, got {type(path).__name__}")
        folder = resolve_checkpoint_dir(path)
        config = config_from_checkpoint(folder)
        asked = parse_dtype(dtype) if dtype is not None else None
        stored = check_quantized_folder(folder, spec if spec.active else None, asked)
        default = torch.bfloat16 if main.type == "cuda" else torch.float32  # GPUs run BAGEL in bf16
        dt = stored[1] if stored is not None else asked or default
        if stored is not None:
            spec = QuantSpec()  # stored that way already: nothing to quantize
            if adapter is not None:
                raise InvalidInputError("merge the LoRA adapter into the original checkpoint before quantizing it")
        tokenizer = Tokenizer.from_folder(folder)
        staged = spec.active or offload or len(devices) > 1  # built on the CPU, then placed
        model = load_model(folder, dtype=dt, device="cpu" if staged else main, config=config)
        if adapter is not None:
            from openbagel.errors import CheckpointError
            from openbagel.train.lora import load_adapter

            if not (Path(adapter) / "adapter_config.json").exists():
                raise CheckpointError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
            model = load_adapter(model, adapter)
        if spec.active:  # straight to the device when the layers will all live there
            quantize_model(model, spec, device=main if len(devices) == 1 and not offload else "cpu")
        if offload:
            LayerOffload(model, main)
        if len(devices) > 1 and parallel == "branches":
            replicate_for_branches(model, devices)
        elif len(devices) > 1:
            place_layers(model, devices)
        elif staged and not offload:
            model.to(main)
        vae = load_vae(folder, dtype=dt, device=main, config=config)
        pipe = cls(model, vae, tokenizer, config, max_cache_bytes)
        pipe.quant = stored[0] if stored is not None else spec
        return pipe

    @property
    def device(self) -> torch.device:
        return self.model.vae2llm.weight.device

    @property
    def offload(self) -> LayerOffload | None:
        """The decoder layers' offload (``offload="layers"``), else None."""
        return offload_of(self.model)

    def compile(self, mode: str | None = None, backend: str = "inductor") -> BagelPipeline:
        """Decode text with static shapes through ``torch.compile`` (optional; the first reply compiles).

        ``mode="reduce-overhead"`` on a GPU replays each decoding step as a
        CUDA graph. Same tokens as the default decoder. Returns ``self``.

        Raises:
            InvalidInputError: the layers are offloaded or split across devices (hooks move their weights).
        """
        if is_placed(self.model):
            raise InvalidInputError(
                "compiled decoding needs every layer resident on one device; drop the offload or the device list"
            )
        self.decoder = StaticDecoder(self.model, compile=True, backend=backend, mode=mode)
        return self

    def chat(self, system_prompt: str | None = None) -> Chat:
        """A new multi-turn conversation (see :class:`Chat`)."""
        return Chat(self, system_prompt)

    # --- settings ----------------------------------------------------------------

    def check_size(self, height: int, width: int) -> None:
        """See :func:`check_size`."""
        check_size(self.config, height, width)

    def image_settings(
        self, defaults: ImageTaskDefaults, height=None, width=None, seed=None, generator=None, **sampling
    ) -> ImageSettings:
        """See :func:`image_settings`."""
        return image_settings(self.config, defaults, height, width, seed, generator, **sampling)

    def text_sampling(
        self, max_new_tokens=None, do_sample=False, temperature=None, top_p=None, think=False
    ) -> TextSampling:
        """See :func:`text_sampling`."""
        return text_sampling(self.config, max_new_tokens, do_sample, temperature, top_p, think)

    # --- tasks -------------------------------------------------------------------

    @torch.inference_mode()
    def text_to_image(
        self,
        prompt: str | Sequence[str],
        *,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_timesteps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        timestep_shift: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        cfg_renorm_type: str | None = None,
        cfg_renorm_min: float | None = None,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        think: bool = False,
        max_think_tokens: int | None = None,
        progress: bool = False,
        on_step: Callable[[FlowStep], None] | None = None,
        step_cache: StepCacheSettings | None = None,
    ) -> ImageResult:
        """Generate an image from text. An empty prompt is unconditional generation.

        Several prompts (a list) and/or ``num_images_per_prompt`` > 1 are
        generated together, one forward per step for all (prompt-major order
        in ``images``); image ``k`` uses ``seed + k`` (or ``seed[k]`` from a
        list, or the ``k``-th draw from ``generator``), so a batch gives the
        images the single runs would. ``step_cache`` skips model passes
        (approximate, off by default; see :class:`StepCacheSettings`).

        Sizes are pixels, among the model's ``config.supported_sizes`` (7B-MoT:
        multiples of 16 up to 1024; the embedded model: 64x64 only); the
        defaults come from the config's ``t2i``.
        ``num_timesteps`` counts schedule points: the model runs
        ``num_timesteps - 1`` times. Guidance scales <= 1 turn that guidance off.
        With ``think=True`` the model first writes a plan, returned as ``reasoning``.
        ``on_step`` is called after every denoising step with a
        :class:`~openbagel.inference.generate.FlowStep` (progress bars; an
        exception raised there stops the generation and propagates).

        Raises:
            InvalidInputError: bad size or settings (before any compute).
        """
        s = self.image_settings(
            self.config.t2i, height, width, _single_seed(seed, generator), generator,
            num_timesteps=num_timesteps, guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
            timestep_shift=timestep_shift, cfg_interval=cfg_interval, cfg_renorm_type=cfg_renorm_type, cfg_renorm_min=cfg_renorm_min,
        )  # fmt: skip
        prompts = _prompt_list(prompt)
        n = _check_batch(len(prompts), num_images_per_prompt, step_cache)
        _check_flag("think", think)
        chats, reasonings = [], []
        for p in prompts:
            chat = self.chat(THINK_GENERATE_PROMPT if think else None)
            chat.add_text(p)
            reasonings.append(chat._think(max_think_tokens) if think else None)
            chats.append(chat)
        images = self._sample(
            [c.session for c in chats for _ in range(n)], s, _noises(self.model, s, seed, len(prompts) * n),
            progress, on_step, step_cache,
        )  # fmt: skip
        return ImageResult(images, reasonings[0], reasonings)

    def _sample(
        self,
        sessions: list[Session],
        s: ImageSettings,
        noises: list[torch.Tensor],
        progress: bool,
        on_step,
        step_cache: StepCacheSettings | None,
    ) -> list[Image.Image]:
        """Denoise one image per session (a batch), then decode each with the VAE."""
        latents = generate_latents_batch(
            self.model, sessions, s.height, s.width, s.sampling, noises,
            on_step=on_step, progress=progress, plain=self.plain, step_cache=step_cache,
        )  # fmt: skip
        p, down = self.config.latent_patch_size, self.config.latent_downsample
        out = []
        for lat in latents:  # one at a time: the decoder's activations are the largest
            out.append(to_pil(self.vae.decode(unpatchify(lat, s.height // down, s.width // down, p)[None])[0]))
        return out

    @torch.inference_mode()
    def edit(
        self,
        image: ImageInput | None,
        prompt: str | None = None,
        *,
        style: str | None = None,
        images: Sequence[ImageInput] = (),
        num_timesteps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        timestep_shift: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        cfg_renorm_type: str | None = None,
        cfg_renorm_min: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        think: bool = False,
        max_think_tokens: int | None = None,
        progress: bool = False,
        on_step: Callable[[FlowStep], None] | None = None,
        num_images_per_prompt: int = 1,
        step_cache: StepCacheSettings | None = None,
    ) -> ImageResult:
        """Edit (or restyle) an image following an instruction.

        The output has the input's size after the VAE-path resize, unless
        ``height``/``width`` are given. ``images`` adds more input images after
        the first. Defaults come from the config's ``edit`` settings.
        ``style`` names a preset of :data:`STYLE_PRESETS` instead of a ``prompt``.
        ``on_step``, ``num_images_per_prompt``, ``seed``, ``step_cache``: as in :meth:`text_to_image`.

        Raises:
            InvalidInputError: no image given, unreadable image, bad settings,
                neither or both of ``prompt`` and ``style``, an unknown style,
                an input whose size the model cannot draw (without ``height``/``width``;
                a model that draws one size draws that one).
        """
        prompt = style_instruction(prompt, style)
        _check_flag("think", think)
        n = _check_batch(1, num_images_per_prompt, step_cache)
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        inputs = [image, *images] if image is not None else list(images)
        if not inputs:
            raise InvalidInputError("edit needs an input image; pass image=PATH_OR_PIL")
        loaded = [load_image(i) for i in inputs]
        s = self.image_settings(
            self.config.edit, height, width, _single_seed(seed, generator), generator,
            num_timesteps=num_timesteps, guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
            timestep_shift=timestep_shift, cfg_interval=cfg_interval, cfg_renorm_type=cfg_renorm_type, cfg_renorm_min=cfg_renorm_min,
        )  # fmt: skip
        if not s.height:
            s.width, s.height = output_size_of_input(
                self.config, *resize_size(*loaded[0].size, self.config.vae_transform), "the input image"
            )
        chat = self.chat(THINK_GENERATE_PROMPT if think else None)
        for image in loaded:
            chat.add_image(image)
        chat.add_text(prompt)
        reasoning = chat._think(max_think_tokens) if think else None
        images = self._sample([chat.session] * n, s, _noises(self.model, s, seed, n), progress, on_step, step_cache)
        return ImageResult(images, reasoning, [reasoning])

    @torch.inference_mode()
    def predict_frames(
        self,
        frames: Sequence[ImageInput],
        num_frames: int = 1,
        *,
        context_frames: int | None = None,
        instruction: str = NEXT_FRAME_INSTRUCTION,
        num_timesteps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        timestep_shift: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        cfg_renorm_type: str | None = None,
        cfg_renorm_min: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        on_step: Callable[[FlowStep], None] | None = None,
        step_cache: StepCacheSettings | None = None,
    ) -> ImageResult:
        """Predict the ``num_frames`` frames that follow a clip, one at a time:
        the context is the frames so far, each followed by ``instruction``
        (``[frame 1, "next frame", frame 2, "next frame", ...]``, as the
        embedded model was trained), and each predicted frame joins the context
        of the next. ``context_frames`` keeps only the last K frames in the
        context (default: all). Frames come out at the first frame's size after
        the VAE-path resize. Sampling defaults come from the config's ``edit`` settings.
        ``on_step``: as in :meth:`text_to_image`, for every denoising step of every frame.

        Returns:
            :class:`ImageResult` with the ``num_frames`` predicted frames in ``images``.
        Raises:
            InvalidInputError: no frames, an unreadable frame, frames that do not
                come to one size at the model's resolution (predicted frames,
                already at it, may follow the frames they came from),
                ``num_frames`` or ``context_frames`` below 1, bad settings.
        """
        if isinstance(frames, (str, Path, Image.Image)):
            frames = [frames]
        if not frames:
            raise InvalidInputError("predict_frames needs at least one frame")
        _check_step_cache(step_cache)
        for name, v in (("num_frames", num_frames), ("context_frames", context_frames)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InvalidInputError(f"{name} must be a whole number >= 1, got {v!r}")
        check_text("instruction", instruction)
        from openbagel.video import check_frame_sizes

        history = [load_image(f) for f in frames]
        # one size at the model's resolution: predicted frames may follow their clip
        check_frame_sizes(history, lambda f: resize_size(*f.size, self.config.vae_transform))
        s = self.image_settings(
            self.config.edit, None, None, seed, generator,
            num_timesteps=num_timesteps, guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
            timestep_shift=timestep_shift, cfg_interval=cfg_interval, cfg_renorm_type=cfg_renorm_type, cfg_renorm_min=cfg_renorm_min,
        )  # fmt: skip
        if not s.height:
            s.width, s.height = output_size_of_input(
                self.config, *resize_size(*history[0].size, self.config.vae_transform), "the frames"
            )
        steps = range(num_frames)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="frames", unit="frame")
        predicted: list[Image.Image] = []
        for _ in steps:
            chat = self.chat()  # rebuilt per frame: the context window may slide
            for frame in history[-context_frames:] if context_frames else history:
                chat.add_image(frame)
                chat.add_text(instruction)
            noise = draw_noise(self.model, s.height, s.width, s.generator)
            predicted.append(self._sample([chat.session], s, [noise], False, on_step, step_cache)[0])
            history.append(predicted[-1])
        return ImageResult(predicted)

    @torch.inference_mode()
    def understand(
        self,
        image: ImageInput | Sequence[ImageInput] | None,
        question: str,
        *,
        think: bool = False,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> TextResult:
        """Answer a question about one or more images (or none: plain text).

        Greedy by default; ``do_sample=True`` samples with ``temperature`` and
        ``top_p``. With ``think=True`` the reasoning is returned apart from the answer.
        """
        text = "".join(
            self.understand_stream(
                image, question, think=think, max_new_tokens=max_new_tokens, do_sample=do_sample,
                temperature=temperature, top_p=top_p, seed=seed,
            )
        )  # fmt: skip
        if think:
            reasoning, answer = split_reasoning(text)
            return TextResult(answer, reasoning)
        return TextResult(text.strip())

    @torch.inference_mode()
    def understand_stream(
        self,
        image: ImageInput | Sequence[ImageInput] | None,
        question: str,
        *,
        think: bool = False,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Like :meth:`understand`, as an iterator of text pieces (reasoning included when thinking).

        Inputs are checked and the context is built before this returns.
        """
        if image is None:
            images: list = []
        elif isinstance(image, (str, Path, Image.Image)):
            images = [image]
        else:
            images = list(image)
        loaded = [load_image(i) for i in images]
        params = self.text_sampling(max_new_tokens, do_sample, temperature, top_p, think=think)
        generator = make_generator(seed)
        check_text("question", question)
        _check_flag("think", think)
        chat = self.chat(THINK_UNDERSTAND_PROMPT if think else None)
        for img in loaded:
            chat.add_image(img, vae=False)
        chat.add_text(question)
        return chat.reply_stream(params, generator=generator, remember=False)


class Chat:
    """A multi-turn conversation in which images go in and come out.

    Conventions (spec section 7): user texts go to the full and image-free
    contexts; user images (VAE + ViT segments) to the full context; answers
    are appended as text to the full and image-free contexts; generated
    images are fed back like user images; generated reasoning stays in the
    full context only.
    """

    def __init__(self, pipe: BagelPipeline, system_prompt: str | None = None):
        self.pipe = pipe
        self.session = Session(pipe.model, pipe.tokenizer.special, max_cache_bytes=pipe.max_cache_bytes)
        if system_prompt is not None:
            check_text("system_prompt", system_prompt)
        if system_prompt:
            self.session.add_text(pipe.tokenizer.encode(system_prompt), user=False)

    @torch.inference_mode()
    def add_text(self, text: str) -> None:
        """A user text."""
        ids = self.pipe.tokenizer.encode(check_text("text", text))
        with self.session.transaction():
            self.session.add_text(ids)

    @torch.inference_mode()
    def add_image(self, image: ImageInput, *, vae: bool = True, vit: bool = True) -> tuple[int, int]:
        """A user image, through the VAE path (for generation) and/or the ViT path (for understanding).

        The image is first resized for the VAE path (also when only the ViT
        path is used, as the reference does). Returns that ``(width, height)``.
        """
        img = resize(load_image(image), self.pipe.config.vae_transform)
        with self.session.transaction():
            self._add_resized_image(img, vae, vit)
        return img.size

    def _add_resized_image(self, img: Image.Image, vae: bool, vit: bool) -> None:
        cfg, model = self.pipe.config, self.pipe.model
        if vae:
            pixels = to_tensor(img)[None].to(self.pipe.device)
            latent = self.pipe.vae.encode(pixels)[0].float()
            p = cfg.latent_patch_size
            h, w = latent.shape[1] // p, latent.shape[2] // p
            pos = flattened_position_ids(h, w, cfg.max_latent_size, cfg.position_mode)
            self.session.add_vae_image(patchify(latent, p), pos)
        if vit:
            pixels = to_tensor(resize(img, cfg.vit_transform))
            p = cfg.vit.patch_size
            pos = flattened_position_ids(
                pixels.shape[1] // p, pixels.shape[2] // p, cfg.vit_max_num_patch_per_side, cfg.position_mode
            )
            self.session.add_vit_image(patchify(pixels, p).to(model.dtype), pos)

    @torch.inference_mode()
    def add_answer(self, text: str) -> None:
        """A previous answer of the model (a conversation history sent back by a client)."""
        ids = self.pipe.tokenizer.encode(check_text("text", text))
        with self.session.transaction():
            self.session.add_text(ids, user=False)

    def reply_stream(
        self,
        params: TextSampling | None = None,
        generator: torch.Generator | None = None,
        remember: bool = True,
        on_token: Callable[[int], None] | None = None,
    ) -> Iterator[str]:
        """Decode the model's answer as text pieces; with ``remember`` the answer joins the context.

        ``on_token`` is called with each decoded token id (end of sequence not
        included); an exception raised there stops decoding and propagates.
        """
        params = params or self.pipe.text_sampling()
        if not isinstance(params, TextSampling):
            raise InvalidInputError("params must be a TextSampling (see pipe.text_sampling(...))")
        _check_generator(generator)
        ids: list[int] = []

        def tokens() -> Iterator[int]:
            with torch.inference_mode():
                for token in decode_tokens(
                    self.pipe.model, self._decoding_context(params), self.session.special, params, generator,
                    plain=self.pipe.plain, static=self.pipe.decoder,
                ):  # fmt: skip
                    ids.append(token)
                    if on_token is not None:
                        on_token(token)
                    yield token

        yield from self.pipe.tokenizer.stream(tokens())
        if remember:
            with torch.inference_mode(), self.session.transaction():
                self.session.add_text(ids, user=False)

    def reply(self, params: TextSampling | None = None, generator: torch.Generator | None = None) -> str:
        """The model's answer (kept in the conversation)."""
        return "".join(self.reply_stream(params, generator)).strip()

    @torch.inference_mode()
    def generate_image(
        self,
        settings: ImageSettings | None = None,
        *,
        think: bool = False,
        max_think_tokens: int | None = None,
        progress: bool = False,
        on_step: Callable[[FlowStep], None] | None = None,
        step_cache: StepCacheSettings | None = None,
    ) -> ImageResult:
        """Generate an image from the conversation so far and feed it back into it.

        ``on_step``, ``step_cache``: see :meth:`BagelPipeline.text_to_image`.
        """
        pipe = self.pipe
        s = settings or pipe.image_settings(pipe.config.t2i)
        if not isinstance(s, ImageSettings):
            raise InvalidInputError("settings must come from pipe.image_settings(...)")
        _check_step_cache(step_cache)
        with self.session.transaction():
            reasoning = self._think(max_think_tokens) if think else None
            noise = draw_noise(pipe.model, s.height, s.width, s.generator)
            image = pipe._sample([self.session], s, [noise], progress, on_step, step_cache)[0]
            self._add_resized_image(resize(image, pipe.config.vae_transform), vae=True, vit=True)
        return ImageResult([image], reasoning, [reasoning])

    def _decoding_context(self, params: TextSampling) -> Context:
        if self.pipe.plain:
            return self.session.full.fork()  # a copy, as the reference makes
        return self.session.decoding_context(params.max_new_tokens)

    def _think(self, max_think_tokens: int | None) -> str:
        """Decode a plan, keep it in the full context only; returns its reasoning text."""
        pipe = self.pipe
        params = pipe.text_sampling(max_think_tokens, think=True)
        ctx = self._decoding_context(params)
        ids = list(decode_tokens(pipe.model, ctx, self.session.special, params, plain=pipe.plain, static=pipe.decoder))
        text = pipe.tokenizer.decode(ids)
        self.session.add_text(ids, user=False, image_free=False)
        return split_reasoning(text)[0] or text.strip()
