"""The ``openbagel`` command line: generate, edit, understand, chat, frames, train, serve, ui, eval."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from PIL import Image

from openbagel.errors import InvalidInputError, OpenBagelError

app = typer.Typer(
    help="Run BAGEL, the unified multimodal model: text-to-image, image editing, image understanding and chat.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- shared options ----------------------------------------------------------------

ModelOpt = typer.Option(
    None,
    "--model",
    "-m",
    help="Checkpoint folder (llm_config.json, vit_config.json, ema.safetensors, ae.safetensors, tokenizer files; "
    "or a folder from openbagel quantize); default: the embedded shapes-world model.",
    envvar="OPENBAGEL_MODEL",
    show_default=False,
)
AdapterOpt = typer.Option(None, "--adapter", help="LoRA adapter folder (from openbagel train) to merge into the model.")
DeviceOpt = typer.Option(
    "cpu",
    "--device",
    help="Where to run: cpu, cuda, cuda:N or mps; several GPUs as cuda:0,cuda:1 (decoder layers split across them).",
)
DtypeOpt = typer.Option(
    None,
    "--dtype",
    help="Weights and activations: float32 or bfloat16 (default: bfloat16 on CUDA, float32 otherwise; "
    "a quantized folder: the dtype it was saved in).",
    show_default=False,
)
QuantOpt = typer.Option(
    None,
    "--quant",
    help="Weight-only quantization per part: PART=MODE,... with parts llm, vit, head and modes int8, nf4, fp8 "
    "(e.g. llm=int8, or llm=nf4,vit=int8; a bare mode means llm=MODE). Default: none. Needs the quant extra "
    "(pip install -e '.\\[quant]'). Save the result with openbagel quantize for a fast start.",
    show_default=False,
)
ParallelOpt = typer.Option(
    "layers",
    "--parallel",
    help="With several devices: layers (split the decoder layers across them, for a model too big for one) "
    "or branches (a whole copy on each; the guidance branches of every step run side by side).",
)
OffloadOpt = typer.Option(
    None,
    "--offload",
    help="layers (the only mode; default: no offload): keep the decoder layers in CPU memory and copy each to "
    "the GPU just before it runs (the next one meanwhile). Fits small GPUs, but every forward (each denoising "
    "step, each decoded token) copies all layers. One device only. See openbagel plan.",
    show_default=False,
)
SeedOpt = typer.Option(None, "--seed", help="Random seed; same seed and settings give the same result.")
# Defaults of sampling options come from the checkpoint's config; the values
# quoted are those of BAGEL-7B-MoT.
StepsOpt = typer.Option(
    None,
    "--steps",
    help="Schedule points from noise to image; the model runs STEPS-1 times (default: the model's; 50 for 7B-MoT).",
)
CfgTextOpt = typer.Option(
    None,
    "--guidance-scale",
    "--cfg-text",
    help="Text guidance scale; <= 1 turns it off (default: the model's; 4.0 for 7B-MoT).",
)
CfgImgOpt = typer.Option(
    None,
    "--image-guidance-scale",
    "--cfg-img",
    help="Image guidance scale; <= 1 turns it off (default: the model's; 7B-MoT: 1.5 generate, 2.0 edit).",
)
SizeOpt = typer.Option(
    None,
    "--size",
    help="Output size WxH in pixels, multiples of 16 (default: the model's, 1024x1024 for 7B-MoT; edit: the input's).",
)
ShiftOpt = typer.Option(None, "--shift", help="Timestep shift of the schedule (default: the model's; 3.0 for 7B-MoT).")
IntervalOpt = typer.Option(
    None,
    "--cfg-interval",
    help="Guidance applies while LO < t <= HI, as LO,HI (default: the model's; 7B-MoT: 0.4,1.0 generate, 0,1 edit).",
)
RenormOpt = typer.Option(
    None,
    "--renorm",
    help="Guidance renormalisation: global, channel or text_channel (default: the model's; 7B-MoT: global generate, text_channel edit).",
)
RenormMinOpt = typer.Option(None, "--renorm-min", help="Lower clamp of the renorm factor, 0..1 (default 0).")
ThinkOpt = typer.Option(False, "--think", help="Let the model reason (plan) in text first; the reasoning is printed.")
OutOpt = typer.Option(..., "--output", "-o", help="Output image file (.png, .jpg, .webp ...).")
MaxTokOpt = typer.Option(
    None, "--max-new-tokens", help="Most tokens to generate (default: the model's; 7B-MoT: 512, 1024 with --think)."
)
SampleOpt = typer.Option(False, "--do-sample", help="Sample tokens instead of greedy decoding.")
TempOpt = typer.Option(
    None, "--temperature", help="Sampling temperature with --do-sample (default: the model's; 0.3 for 7B-MoT)."
)
TopPOpt = typer.Option(None, "--top-p", help="Nucleus sampling mass with --do-sample, in (0, 1] (default 1.0).")
CacheOpt = typer.Option(
    False,
    "--cache",
    help="Step caching (TaylorSeer-style, per guidance branch): run the model only every --cache-interval steps "
    "and extrapolate the velocities in between. Faster, approximate; off by default.",
)
CacheIntervalOpt = typer.Option(2, "--cache-interval", help="With --cache: run the model every N steps.")
CacheOrderOpt = typer.Option(
    1, "--cache-order", help="With --cache: 0 reuses the last velocity, 1 extrapolates linearly, 2 quadratically."
)
CacheWarmupOpt = typer.Option(2, "--cache-warmup", help="With --cache: first steps that always run the model.")
CompileOpt = typer.Option(
    False,
    "--compile",
    help="Decode text with static shapes through torch.compile (the first reply compiles; CUDA graphs on a GPU). "
    "Experimental: on a CPU it is no faster (benchmarks/RESULTS.md).",
)
KVBudgetOpt = typer.Option(
    None,
    "--kv-cache-budget",
    help="Most KV-cache memory a conversation may use, e.g. 2GB or 512MiB; a larger context is refused "
    "with a clear error instead of running out of memory (default: no limit).",
)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        _fail(f"--size must look like WIDTHxHEIGHT (for example 1024x768), got {size!r}")
    return h, w


def _parse_interval(value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        _fail(f"--cfg-interval must look like LO,HI (for example 0.4,1.0), got {value!r}")
    return lo, hi


def _can_write_rgb(fmt: str | None) -> bool:
    """Whether Pillow can save an RGB image in format ``fmt`` (tried on a 1x1 image)."""
    if fmt is None:
        return False
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except Exception:  # Pillow raises KeyError, OSError, ValueError... by format
        return False
    return True


def check_output(path: Path) -> None:
    """Refuse an output path we could not write, before any compute.

    Raises:
        InvalidInputError: unknown image extension, a missing folder, or a folder in the way.
    """
    ext = path.suffix.lower()
    if not _can_write_rgb(Image.registered_extensions().get(ext)):
        raise InvalidInputError(f"cannot write images with extension {ext or '(none)'!r}; use .png, .jpg or .webp")
    try:
        path.resolve(strict=False).parent.is_dir()
    except (OSError, RuntimeError) as e:
        raise InvalidInputError(f"bad output path {str(path)[:80]!r}: {e}") from None
    if path.is_dir():
        raise InvalidInputError(f"output path {str(path)!r} is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise InvalidInputError(f"output folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise InvalidInputError(f"output folder {str(parent)!r} is not writable")


def _check_json_output(path: Path) -> None:
    parent = path.parent
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InvalidInputError(f"cannot write --json {str(path)!r}: give a file in a writable folder")


def save_image(image: Image.Image, path: Path) -> None:
    """Write atomically (see :func:`openbagel.fileio.write_atomically`).

    Raises:
        InvalidInputError: the file cannot be written.
    """
    from openbagel.fileio import write_atomically

    fmt = Image.registered_extensions()[path.suffix.lower()]
    write_atomically(path, lambda tmp: image.save(tmp, format=fmt))


def _write_result(result, output: Path) -> None:
    if result.reasoning is not None:
        typer.echo(f"reasoning: {result.reasoning}")
    save_image(result.image, output)
    typer.echo(f"wrote {output} ({result.image.width}x{result.image.height})")


def _load(
    model: str | None,
    device: str,
    dtype: str | None,
    adapter: Path | None = None,
    kv_budget: str | None = None,
    quant: str | None = None,
    offload: str | None = None,
    parallel: str = "layers",
):
    from openbagel.kv_cache import parse_bytes
    from openbagel.pipeline import BagelPipeline
    from openbagel.placement import describe_placement

    budget = None if kv_budget is None else parse_bytes(kv_budget, "--kv-cache-budget")
    pipe = BagelPipeline.from_pretrained(
        model, dtype=dtype, device=device, adapter=adapter, max_cache_bytes=budget, quant=quant, offload=offload,
        parallel=parallel,
    )  # fmt: skip
    message = describe_placement(pipe.model)
    if message:
        typer.echo(message, err=True)
    return pipe


def _step_cache(cache: bool, interval: int, order: int, warmup: int):
    """The step-cache settings of the --cache options (None without --cache)."""
    from openbagel.inference.step_cache import StepCacheSettings

    settings = StepCacheSettings(interval, order, warmup)  # checked with or without --cache
    return settings if cache else None


def _config(model: str | None, device: str, dtype: str):
    """The checkpoint's config, with device and dtype checked: everything a
    request can be validated against before the weights load."""
    from openbagel.checkpoint import resolve_checkpoint_dir
    from openbagel.config import config_from_checkpoint
    from openbagel.pipeline import DEFAULT_MODEL, parse_devices, parse_dtype

    if dtype is not None:
        parse_dtype(dtype)
    parse_devices(device)
    return config_from_checkpoint(resolve_checkpoint_dir(DEFAULT_MODEL if model is None else model))


def _sampling(steps, guidance_scale, image_guidance_scale, shift, cfg_interval, renorm, renorm_min) -> dict:
    """The image sampling options as the Python API's keyword arguments."""
    return dict(
        num_timesteps=steps,
        guidance_scale=guidance_scale,
        image_guidance_scale=image_guidance_scale,
        timestep_shift=shift,
        cfg_interval=_parse_interval(cfg_interval),
        cfg_renorm_type=renorm,
        cfg_renorm_min=renorm_min,
    )


def _check_image_settings(model, device, dtype, task, height, width, seed, sampling) -> None:
    """Validate image settings against the checkpoint's config, before the weights load."""
    from openbagel.pipeline import image_settings

    config = _config(model, device, dtype)
    image_settings(config, getattr(config, task), height, width, seed, None, **sampling)


def _check_listen(host: str, port: int) -> None:
    """Refuse an address the server could not listen on, with one clear line (before loading anything)."""
    import socket

    if not 1 <= port <= 65535:
        raise InvalidInputError(f"--port must be in 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise InvalidInputError(f"--host {host!r} is not an address of this machine ({e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise InvalidInputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


#: Largest file the web UI accepts.
UI_MAX_UPLOAD = "32mb"


def _require_gradio() -> None:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise InvalidInputError("the web UI needs Gradio: pip install 'openbagel[ui]' (or pip install gradio)")


def _run(fn):
    """Run a command body, turning our errors into one clean line and exit code 2."""
    try:
        return fn()
    except OpenBagelError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


# --- commands ----------------------------------------------------------------------


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What to draw. An empty string gives unconditional generation."),
    output: Path = OutOpt,
    model: Optional[str] = ModelOpt,
    seed: Optional[int] = SeedOpt,
    steps: Optional[int] = StepsOpt,
    guidance_scale: Optional[float] = CfgTextOpt,
    image_guidance_scale: Optional[float] = CfgImgOpt,
    size: Optional[str] = SizeOpt,
    shift: Optional[float] = ShiftOpt,
    cfg_interval: Optional[str] = IntervalOpt,
    renorm: Optional[str] = RenormOpt,
    renorm_min: Optional[float] = RenormMinOpt,
    think: bool = ThinkOpt,
    adapter: Optional[Path] = AdapterOpt,
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    cache: bool = CacheOpt,
    cache_interval: int = CacheIntervalOpt,
    cache_order: int = CacheOrderOpt,
    cache_warmup: int = CacheWarmupOpt,
    kv_cache_budget: Optional[str] = KVBudgetOpt,
    quant: Optional[str] = QuantOpt,
    offload: Optional[str] = OffloadOpt,
    parallel: str = ParallelOpt,
) -> None:
    """Generate an image from a text prompt."""
    sampling = _sampling(steps, guidance_scale, image_guidance_scale, shift, cfg_interval, renorm, renorm_min)
    height, width = _parse_size(size)

    def body():
        check_output(output)
        step_cache = _step_cache(cache, cache_interval, cache_order, cache_warmup)
        _check_image_settings(model, device, dtype, "t2i", height, width, seed, sampling)
        pipe = _load(model, device, dtype, adapter, kv_cache_budget, quant, offload, parallel)
        result = pipe.text_to_image(
            prompt,
            height=height,
            width=width,
            seed=seed,
            think=think,
            progress=True,
            **sampling,
            step_cache=step_cache,
        )
        _write_result(result, output)

    _run(body)


@app.command()
def edit(
    image: Path = typer.Argument(..., help="Input image file."),
    instruction: Optional[str] = typer.Argument(
        None, help="What to change, e.g. 'make the sky purple' or 'in the style of a watercolour' (or use --style)."
    ),
    output: Path = OutOpt,
    style: Optional[str] = typer.Option(
        None, "--style", help="A style preset instead of an instruction: outline, pixel or invert."
    ),
    model: Optional[str] = ModelOpt,
    seed: Optional[int] = SeedOpt,
    steps: Optional[int] = StepsOpt,
    guidance_scale: Optional[float] = CfgTextOpt,
    image_guidance_scale: Optional[float] = CfgImgOpt,
    size: Optional[str] = SizeOpt,
    shift: Optional[float] = ShiftOpt,
    cfg_interval: Optional[str] = IntervalOpt,
    renorm: Optional[str] = RenormOpt,
    renorm_min: Optional[float] = RenormMinOpt,
    think: bool = ThinkOpt,
    adapter: Optional[Path] = AdapterOpt,
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    cache: bool = CacheOpt,
    cache_interval: int = CacheIntervalOpt,
    cache_order: int = CacheOrderOpt,
    cache_warmup: int = CacheWarmupOpt,
    kv_cache_budget: Optional[str] = KVBudgetOpt,
    quant: Optional[str] = QuantOpt,
    offload: Optional[str] = OffloadOpt,
    parallel: str = ParallelOpt,
) -> None:
    """Edit or restyle an image following an instruction."""
    sampling = _sampling(steps, guidance_scale, image_guidance_scale, shift, cfg_interval, renorm, renorm_min)
    height, width = _parse_size(size)

    def body():
        from openbagel.images import load_image
        from openbagel.pipeline import style_instruction

        check_output(output)
        step_cache = _step_cache(cache, cache_interval, cache_order, cache_warmup)
        prompt = style_instruction(instruction, style)
        source = load_image(image)  # fail on a bad image or setting before loading the weights
        _check_image_settings(model, device, dtype, "edit", height, width, seed, sampling)
        pipe = _load(model, device, dtype, adapter, kv_cache_budget, quant, offload, parallel)
        result = pipe.edit(
            source,
            prompt,
            height=height,
            width=width,
            seed=seed,
            think=think,
            progress=True,
            **sampling,
            step_cache=step_cache,
        )
        _write_result(result, output)

    _run(body)


@app.command()
def frames(
    clip: list[Path] = typer.Argument(
        ..., help="The clip: a GIF, MP4, WebM, MKV or MOV file, or image files in order (one frame each)."
    ),
    num_frames: int = typer.Option(1, "--num-frames", "-n", help="Frames to predict after the clip."),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="Where the predicted frames go: a .gif, .mp4 or .webm file, or an existing folder (frame-001.png, ...).",
    ),
    include_input: bool = typer.Option(
        False, "--include-input", help="Write the input frames before the predicted ones."
    ),
    context_frames: Optional[int] = typer.Option(
        None, "--context-frames", help="Keep only the last K frames in the model's context (default: all)."
    ),
    fps: Optional[float] = typer.Option(
        None, "--fps", help="Frame rate of the output (default: the input's; 4 for image files)."
    ),
    model: Optional[str] = ModelOpt,
    seed: Optional[int] = SeedOpt,
    steps: Optional[int] = StepsOpt,
    guidance_scale: Optional[float] = CfgTextOpt,
    image_guidance_scale: Optional[float] = CfgImgOpt,
    shift: Optional[float] = ShiftOpt,
    cfg_interval: Optional[str] = IntervalOpt,
    renorm: Optional[str] = RenormOpt,
    renorm_min: Optional[float] = RenormMinOpt,
    adapter: Optional[Path] = AdapterOpt,
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    cache: bool = CacheOpt,
    cache_interval: int = CacheIntervalOpt,
    cache_order: int = CacheOrderOpt,
    cache_warmup: int = CacheWarmupOpt,
    kv_cache_budget: Optional[str] = KVBudgetOpt,
    quant: Optional[str] = QuantOpt,
    offload: Optional[str] = OffloadOpt,
    parallel: str = ParallelOpt,
) -> None:
    """Predict the next frames of a clip, one at a time (each predicted frame joins the context)."""
    sampling = _sampling(steps, guidance_scale, image_guidance_scale, shift, cfg_interval, renorm, renorm_min)

    def body():
        from openbagel.video import Clip, check_clip_output, read_clip, write_clip

        if num_frames < 1:
            raise InvalidInputError(f"--num-frames must be at least 1, got {num_frames}")
        if context_frames is not None and context_frames < 1:
            raise InvalidInputError(f"--context-frames must be at least 1, got {context_frames}")
        if fps is not None and not 0 < fps <= 240:
            raise InvalidInputError(f"--fps must be in (0, 240], got {fps}")
        check_clip_output(output)
        step_cache = _step_cache(cache, cache_interval, cache_order, cache_warmup)
        source = read_clip(clip)
        _check_image_settings(model, device, dtype, "edit", None, None, seed, sampling)
        pipe = _load(model, device, dtype, adapter, kv_cache_budget, quant, offload, parallel)
        result = pipe.predict_frames(
            source.frames,
            num_frames,
            context_frames=context_frames,
            seed=seed,
            progress=True,
            **sampling,
            step_cache=step_cache,
        )
        frames_out = result.images
        if include_input:  # at the predicted frames' size
            frames_out = [f.resize(frames_out[0].size) for f in source.frames] + frames_out
        written = write_clip(Clip(frames_out, fps or source.fps), output)
        where = output if len(written) == 1 else f"{output}/ ({len(written)} files)"
        typer.echo(f"wrote {len(frames_out)} frame(s) to {where} ({frames_out[0].width}x{frames_out[0].height})")

    _run(body)


@app.command()
def understand(
    image: Path = typer.Argument(..., help="Input image file."),
    question: str = typer.Argument(..., help="The question about the image."),
    model: Optional[str] = ModelOpt,
    think: bool = ThinkOpt,
    max_new_tokens: Optional[int] = MaxTokOpt,
    do_sample: bool = SampleOpt,
    temperature: Optional[float] = TempOpt,
    top_p: Optional[float] = TopPOpt,
    seed: Optional[int] = SeedOpt,
    adapter: Optional[Path] = AdapterOpt,
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    kv_cache_budget: Optional[str] = KVBudgetOpt,
    quant: Optional[str] = QuantOpt,
    offload: Optional[str] = OffloadOpt,
    parallel: str = ParallelOpt,
    compile_: bool = CompileOpt,
) -> None:
    """Answer a question about an image; the answer streams to stdout.

    With --think the model reasons first: its reasoning is printed on a 'reasoning:' line
    (when it closes it with </think>), then the answer.
    """

    def body():
        from openbagel.images import load_image
        from openbagel.pipeline import make_generator, text_sampling

        source = load_image(image)
        text_sampling(_config(model, device, dtype), max_new_tokens, do_sample, temperature, top_p, think)
        make_generator(seed)
        pipe = _load(model, device, dtype, adapter, kv_cache_budget, quant, offload, parallel)
        if compile_:
            pipe.compile(mode="reduce-overhead" if device.startswith("cuda") else None)
        kwargs = dict(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed
        )
        if think:
            result = pipe.understand(source, question, think=True, **kwargs)
            if result.reasoning is not None:
                typer.echo(f"reasoning: {result.reasoning}")
            typer.echo(result.text)
            return
        for piece in pipe.understand_stream(source, question, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

    _run(body)


CHAT_HELP = """commands:
  /image PATH        add an image to the conversation
  /generate [FILE]   generate an image from the conversation (default chat_N.png, N = images generated so far)
  /reset             start a new conversation
  /help              this help
  /quit              leave (Ctrl-D works too)
anything else is your message; the model answers it."""


def _generate_target(line: str, count: int) -> Path:
    args = line.split()[1:]
    if args and args[0] == "-o":
        args = args[1:]
    if len(args) > 1:
        raise InvalidInputError("usage: /generate [FILE]")
    return Path(args[0]) if args else Path(f"chat_{count}.png")


@app.command()
def chat(
    model: Optional[str] = ModelOpt,
    think: bool = ThinkOpt,
    max_new_tokens: Optional[int] = MaxTokOpt,
    do_sample: bool = SampleOpt,
    temperature: Optional[float] = TempOpt,
    top_p: Optional[float] = TopPOpt,
    seed: Optional[int] = SeedOpt,
    steps: Optional[int] = StepsOpt,
    guidance_scale: Optional[float] = CfgTextOpt,
    image_guidance_scale: Optional[float] = CfgImgOpt,
    size: Optional[str] = typer.Option(
        None, "--size", help="Size WxH of generated images, multiples of 16 (default: the model's)."
    ),
    adapter: Optional[Path] = AdapterOpt,
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    kv_cache_budget: Optional[str] = KVBudgetOpt,
    quant: Optional[str] = QuantOpt,
    offload: Optional[str] = OffloadOpt,
    parallel: str = ParallelOpt,
    compile_: bool = CompileOpt,
) -> None:
    """Interactive multi-turn chat; images go in with /image PATH and come out with /generate."""
    height, width = _parse_size(size)

    def body():
        from openbagel.pipeline import THINK_UNDERSTAND_PROMPT, image_settings, make_generator, text_sampling

        # every setting is checked before the weights load, not at the first message
        config = _config(model, device, dtype)
        params = text_sampling(config, max_new_tokens, do_sample, temperature, top_p, think)
        settings = image_settings(
            config, config.t2i, height, width, seed, None,
            num_timesteps=steps, guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
        )  # fmt: skip
        generator = make_generator(seed)
        pipe = _load(model, device, dtype, adapter, kv_cache_budget, quant, offload, parallel)
        if compile_:
            pipe.compile(mode="reduce-overhead" if device.startswith("cuda") else None)
        conv = pipe.chat(THINK_UNDERSTAND_PROMPT if think else None)
        typer.echo("openbagel chat; /help for commands", err=True)
        count = 0
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                typer.echo("", err=True)
                return
            if not line:
                continue
            try:
                if line in ("/quit", "/exit"):
                    return
                if line == "/help":
                    typer.echo(CHAT_HELP)
                elif line == "/reset":
                    conv = pipe.chat(THINK_UNDERSTAND_PROMPT if think else None)
                    typer.echo("(new conversation)")
                elif line.split()[0] == "/image":
                    path = line[len("/image") :].strip()
                    if not path:
                        raise InvalidInputError("usage: /image PATH")
                    w, h = conv.add_image(path)
                    typer.echo(f"(image added, {w}x{h})")
                elif line.split()[0] == "/generate":
                    out = _generate_target(line, count + 1)
                    check_output(out)
                    result = conv.generate_image(settings, progress=True)
                    count += 1
                    save_image(result.image, out)
                    typer.echo(f"(image written to {out})")
                elif line.startswith("/"):
                    typer.echo(f"unknown command {line.split()[0]}; /help lists them")
                else:
                    conv.add_text(line)
                    sys.stdout.write("bagel> ")
                    for piece in conv.reply_stream(params, generator):
                        sys.stdout.write(piece)
                        sys.stdout.flush()
                    sys.stdout.write("\n")
            except OpenBagelError as e:
                typer.echo(f"error: {e}", err=True)

    _run(body)


@app.command()
def train(
    config: Path = typer.Argument(
        ..., help="Training config (YAML): model, data, batch, optim; see configs/example-tiny.yaml."
    ),
    output: Path = typer.Option(
        Path("runs/latest"), "--output", "-o", help="Run folder: log.jsonl and the exported checkpoint/."
    ),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Override the config's optim.max_steps."),
    skip_bad_rows: bool = typer.Option(
        False, "--skip-bad-rows", help="Skip data rows that cannot be read (counted) instead of stopping."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output exactly where it stopped."),
) -> None:
    """Train or fine-tune a BAGEL model on packed sequences; exports the result in the official layout."""

    def body():
        from openbagel.train.run import train as run_training

        result = run_training(
            config, output, max_steps=max_steps, skip_bad_rows=skip_bad_rows, resume=resume, echo=typer.echo
        )
        if os.environ.get("RANK", "0") == "0":
            typer.echo(f"trained {result.steps} steps; checkpoint written to {result.checkpoint}")

    _run(body)


@app.command()
def quantize(
    output: Path = typer.Option(..., "--output", "-o", help="New checkpoint folder for the quantized model."),
    quant: str = typer.Option(
        ...,
        "--quant",
        help="PART=MODE,... with parts llm, vit, head and modes int8, nf4, fp8 (e.g. llm=nf4; a bare mode means llm=MODE).",
    ),
    model: Optional[str] = ModelOpt,
    adapter: Optional[Path] = AdapterOpt,
    device: str = typer.Option(
        "cpu", "--device", help="Where to quantize (cuda is faster; the result loads on any device the mode runs on)."
    ),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Dtype of the unquantized parts and of the computation."),
) -> None:
    """Quantize a checkpoint once and save it: later loads (--model OUT) start without quantizing."""

    def body():
        from openbagel.checkpoint import resolve_checkpoint_dir
        from openbagel.kv_cache import format_bytes
        from openbagel.pipeline import DEFAULT_MODEL, BagelPipeline
        from openbagel.quantize import QuantSpec, check_new_folder, module_bytes, read_quant_info, save_quantized

        spec = QuantSpec.parse(quant)
        if not spec.active:
            raise InvalidInputError("--quant quantizes nothing; give a mode, for example --quant llm=int8")
        check_new_folder(output)
        source = resolve_checkpoint_dir(DEFAULT_MODEL if model is None else model)
        stored = read_quant_info(source)
        if stored is not None:
            raise InvalidInputError(f"{source} is quantized already ({stored[0]}); quantize the original checkpoint")
        pipe = BagelPipeline.from_pretrained(source, dtype=dtype, device=device, adapter=adapter, quant=spec)
        save_quantized(pipe.model, spec, source, output)
        typer.echo(f"wrote {output} ({spec}, {format_bytes(module_bytes(pipe.model))} of weights without the VAE)")

    _run(body)


@app.command()
def plan(
    gpu_mem: str = typer.Option(
        ...,
        "--gpu-mem",
        help="Memory of each GPU with a unit, as nvidia-smi shows it: 24GiB, 24564MiB (a '24 GB' card has 24 GiB).",
    ),
    model: Optional[str] = ModelOpt,
    config_name: Optional[str] = typer.Option(
        None,
        "--config",
        help="Plan a preset instead of a folder: 7b-mot, small, shapes, tiny (no files needed).",
        show_default=False,
    ),
    quant: Optional[str] = typer.Option(
        None,
        "--quant",
        help="Plan this quantization (PART=MODE,..., or a bare mode for llm) next to bfloat16; "
        "default: bfloat16, llm=int8 and llm=nf4.",
        show_default=False,
    ),
    devices: int = typer.Option(
        1, "--devices", help="GPUs to split the decoder layers across (offload rows are for one GPU only)."
    ),
    task: str = typer.Option("edit", "--task", help="The session to budget for: t2i, edit or understand."),
    size: str = typer.Option("1024x1024", "--size", help="WxH of the generated (t2i) or input image."),
    think: bool = typer.Option(False, "--think", help="The session reasons in text first."),
    max_think_tokens: Optional[int] = typer.Option(
        None, "--max-think-tokens", help="Reasoning length with --think (default: the model's).", show_default=False
    ),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens", help="Tokens of the prompt text."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Dtype of the weights and activations."),
) -> None:
    """Print the memory each way of running the model needs on GPUs of a given size, before loading anything."""

    def body():
        from openbagel.checkpoint import resolve_checkpoint_dir
        from openbagel.config import PRESETS, config_from_checkpoint
        from openbagel.kv_cache import parse_bytes
        from openbagel.pipeline import (
            DEFAULT_MODEL,
            THINK_GENERATE_PROMPT,
            THINK_UNDERSTAND_PROMPT,
            check_size,
            parse_dtype,
        )
        from openbagel.plan import Workload, make_plan
        from openbagel.quantize import QuantSpec, check_quantized_folder
        from openbagel.tokenizer import Tokenizer

        gpu = parse_bytes(gpu_mem, "--gpu-mem")
        if not any(c.isalpha() for c in gpu_mem):
            raise InvalidInputError(f"--gpu-mem needs a unit, e.g. 24GiB or 24564MiB; got {gpu_mem!r}")
        dt = parse_dtype(dtype)
        height, width = _parse_size(size)
        system = THINK_UNDERSTAND_PROMPT if task == "understand" else THINK_GENERATE_PROMPT
        if config_name is not None:
            if model is not None:
                raise InvalidInputError("give --model or --config, not both")
            name = {"tiny": "tiny-golden"}.get(config_name, config_name)
            if name not in PRESETS:
                raise InvalidInputError(f"unknown --config {config_name!r}; choose one of {', '.join(PRESETS)}")
            config, stored = PRESETS[name], None
            system_tokens = len(system) // 4  # no tokenizer: about 4 characters per token
        else:
            folder = resolve_checkpoint_dir(DEFAULT_MODEL if model is None else model)
            asked = QuantSpec.parse(quant) if quant is not None else None
            config, stored = config_from_checkpoint(folder), check_quantized_folder(folder, asked, dt)
            system_tokens = len(Tokenizer.from_folder(folder).encode(system))
        if stored is not None:
            specs = [stored[0]]
        elif quant is not None:
            specs = [QuantSpec(), QuantSpec.parse(quant)]
        else:
            specs = [QuantSpec(), QuantSpec(llm="int8"), QuantSpec(llm="nf4")]
        workload = Workload(task, height, width, think, max_think_tokens, prompt_tokens)
        if task == "t2i":
            check_size(config, height, width)
        if max_think_tokens is not None and max_think_tokens < 0:
            raise InvalidInputError(f"--max-think-tokens must be 0 or more, got {max_think_tokens}")
        if devices > config.llm.num_layers:
            raise InvalidInputError(
                f"--devices {devices} is more than the model's {config.llm.num_layers} decoder layers (one each at most)"
            )
        result = make_plan(config, dt, gpu, workload, specs, devices, system_tokens)
        typer.echo(result.table())
        if "gb" in gpu_mem.lower() and "gib" not in gpu_mem.lower():
            typer.echo(
                f"note: {gpu_mem} was read as {gpu:,} bytes ({gpu / 2**30:.1f} GiB); cards sold as N GB have "
                "about N GiB (nvidia-smi's MiB): pass --gpu-mem NGiB"
            )

    _run(body)


@app.command()
def serve(
    model: Optional[str] = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(
        None,
        "--api-key",
        envvar="OPENBAGEL_API_KEY",
        help="Require 'Authorization: Bearer KEY' on every /v1 route (/health, /ready, /metrics stay open).",
        show_default=False,
    ),
    model_name: Optional[str] = typer.Option(
        None,
        "--model-name",
        help="Model id in /v1/models and responses (default: the folder's name).",
        show_default=False,
    ),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests that may wait; one more is answered 429."),
    max_concurrency: int = typer.Option(1, "--max-concurrency", help="Requests running in the engine at once."),
    max_body_mb: float = typer.Option(32.0, "--max-body-mb", help="Largest request body, in MiB (413 beyond)."),
    max_image_pixels: int = typer.Option(
        4096 * 4096,
        "--max-image-pixels",
        help="Most pixels (width x height) over a request's images, read before decoding.",
    ),
    max_n: int = typer.Option(4, "--max-n", help="Most images per request (n)."),
    max_steps: int = typer.Option(100, "--max-steps", help="Most num_inference_steps per request."),
    max_prompt_tokens: int = typer.Option(
        1024, "--max-prompt-tokens", help="Longest prompt (all message texts), in tokens."
    ),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="Largest max_tokens of a chat completion."),
    log_prompts: bool = typer.Option(False, "--log-prompts", help="Write prompt texts into the request log lines."),
    with_ui: bool = typer.Option(
        False, "--ui", help="Also serve the web UI at /ui (its requests bypass the API queue)."
    ),
    keep_alive_timeout: float = typer.Option(
        5.0, "--keep-alive-timeout", help="Seconds an idle connection stays open after a response."
    ),
    header_timeout: float = typer.Option(
        10.0, "--header-timeout", help="Seconds a connection has to send a request's headers; then it is closed."
    ),
    body_timeout: float = typer.Option(
        60.0, "--body-timeout", help="Seconds a request has to send its body; then it is answered 408."
    ),
    threads: Optional[int] = typer.Option(
        None,
        "--threads",
        help="PyTorch threads per engine slot (default: the available CPU cores / --max-concurrency).",
        show_default=False,
    ),
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    quant: Optional[str] = QuantOpt,
    offload: Optional[str] = OffloadOpt,
    parallel: str = ParallelOpt,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (images, edits, chat; /docs lists the routes)."""

    def body():
        import logging

        from openbagel.pipeline import check_memory_options
        from openbagel.serve import Limits, ServeSettings, run_server

        _config(model, device, dtype)  # a bad folder, device or dtype fails here, before listening
        check_memory_options(device, quant, offload, parallel)
        if with_ui:
            _require_gradio()
        if not 0 < max_body_mb < 1e6:
            raise InvalidInputError(
                f"--max-body-mb must be a number of MiB above 0 (and below a million), got {max_body_mb}"
            )
        try:
            limits = Limits(
                max_body_bytes=int(max_body_mb * 1024 * 1024), max_image_pixels=max_image_pixels, max_n=max_n,
                max_steps=max_steps, max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens,
            )  # fmt: skip
            settings = ServeSettings(
                model=model, model_name=model_name, dtype=dtype, device=device, quant=quant, offload=offload,
                parallel=parallel,
                api_key=api_key, max_queue=max_queue, max_concurrency=max_concurrency, log_prompts=log_prompts,
                limits=limits, ui=with_ui, keep_alive_timeout=keep_alive_timeout, header_timeout=header_timeout,
                body_timeout=body_timeout, threads=threads,
            )  # fmt: skip
        except ValueError as e:  # messages start with the setting's name
            name, _, rest = str(e).partition(" ")
            raise InvalidInputError(f"--{name.replace('_', '-')} {rest}") from None
        _check_listen(host, port)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        ui_note = f", web UI: http://{host}:{port}/ui" if with_ui else ""
        typer.echo(
            f"serving {settings.served_name} on http://{host}:{port} (API docs: /docs{ui_note}); loading the model..."
        )
        run_server(settings, host, port)

    _run(body)


@app.command()
def ui(
    model: Optional[str] = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(7860, "--port", help="TCP port."),
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    quant: Optional[str] = QuantOpt,
    offload: Optional[str] = OffloadOpt,
    parallel: str = ParallelOpt,
) -> None:
    """Open the web UI (Gradio): Generate, Edit, Understand, Chat and Frames tabs."""

    def body():
        _require_gradio()
        from openbagel.pipeline import check_memory_options
        from openbagel.ui import build_ui

        _config(model, device, dtype)
        check_memory_options(device, quant, offload, parallel)
        _check_listen(host, port)
        blocks = build_ui(model, dtype=dtype, device=device, quant=quant, offload=offload, parallel=parallel)
        typer.echo(f"openbagel UI on http://{host}:{port} (the model loads in the background)")
        blocks.queue().launch(
            server_name=host, server_port=port, footer_links=[], quiet=True, max_file_size=UI_MAX_UPLOAD
        )

    _run(body)


MAX_EVAL_ITEMS = 10_000

eval_app = typer.Typer(help="Score a model on a benchmark.", no_args_is_help=True)
data_app = typer.Typer(help="Write training data sets.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
app.add_typer(data_app, name="data")


@eval_app.command("shapes")
def eval_shapes(
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="Checkpoint folder to score (default: the embedded shapes-world model).",
        envvar="OPENBAGEL_MODEL",
        show_envvar=False,
    ),
    ground_truth: bool = typer.Option(
        False,
        "--ground-truth",
        help="Score the world's own renderings and answers instead of a model (should be 1.0); ignores --model.",
    ),
    items: int = typer.Option(20, "--items", help=f"Items per task (1 to {MAX_EVAL_ITEMS})."),
    seed: int = typer.Option(1234, "--seed", help="Seed of the item set (the default is the reported benchmark)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the scores to this JSON file."),
    steps: Optional[int] = StepsOpt,
    cache: bool = CacheOpt,
    cache_interval: int = CacheIntervalOpt,
    cache_order: int = CacheOrderOpt,
    cache_warmup: int = CacheWarmupOpt,
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    quant: Optional[str] = QuantOpt,
) -> None:
    """ShapesEval: text to image (seen and held-out combinations), questions,
    edits, style edits, next frame and thinking, scored by reading the images back."""

    def body():
        import json

        from tqdm.auto import tqdm

        from openbagel.fileio import write_atomically
        from openbagel.shapes.eval import GroundTruth, ModelPredictor, evaluate, make_items

        if not 1 <= items <= MAX_EVAL_ITEMS:
            raise InvalidInputError(f"--items must be between 1 and {MAX_EVAL_ITEMS}, got {items}")
        if json_path is not None:
            _check_json_output(json_path)
        step_cache = _step_cache(cache, cache_interval, cache_order, cache_warmup)
        if steps is not None and steps < 2:
            raise InvalidInputError(f"--steps must be at least 2 (schedule points), got {steps}")
        if ground_truth:
            predictor = GroundTruth()
        else:
            pipe = _load(model, device, dtype, quant=quant)
            predictor = ModelPredictor(pipe, num_timesteps=steps, step_cache=step_cache)
        item_list = make_items(items, seed)
        with tqdm(total=len(item_list), desc="shapes eval", unit="item", disable=ground_truth) as bar:
            scores = evaluate(predictor, item_list, progress=bar.update)
        width = max(len(k) for k in scores)
        typer.echo(f"{'task':<{width}}  score")
        for task, score in scores.items():
            typer.echo(f"{task:<{width}}  {score:.3f}")
        if json_path is not None:
            record = {
                "model": "ground-truth" if ground_truth else str(model or "embedded"),
                "items_per_task": items,
                "seed": seed,
                "steps": steps,
                "step_cache": None if step_cache is None else vars(step_cache),
                "quant": quant,
            }
            text = json.dumps({**record, "scores": scores}, indent=2) + "\n"
            write_atomically(json_path, lambda tmp: Path(tmp).write_text(text))

    _run(body)


@data_app.command("shapes")
def data_shapes(
    output: Path = typer.Argument(..., help="Folder for t2i.parquet, edit.parquet, chat.jsonl and images/."),
    count: int = typer.Option(1000, "--count", help="Records of each kind."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world."),
    split: str = typer.Option("train", "--split", help="train, or test (with the held-out combinations)."),
) -> None:
    """Write the shapes world in the trainer's file formats."""

    def body():
        from openbagel.shapes.export import write_datasets

        if count < 1:
            raise InvalidInputError(f"--count must be at least 1, got {count}")
        if split not in ("train", "test"):
            raise InvalidInputError(f"--split must be train or test, got {split!r}")
        if not str(output).strip():
            raise InvalidInputError("give an output folder")
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise InvalidInputError(f"{str(output)!r} exists and is not an empty folder; give a new folder")
        try:
            rows = write_datasets(output, count, seed, split)
        except OSError as e:
            raise InvalidInputError(f"cannot write to {str(output)!r}: {e.strerror or e}") from None
        typer.echo(", ".join(f"{name}: {n} row(s)" for name, n in rows.items()) + f" written to {output}")

    _run(body)


def main() -> None:  # pragma: no cover - entry point
    app()


@app.command()
def bench(
    config: str = typer.Option(
        "small",
        "--config",
        help="Random-weight config: tiny (the golden one), small, or 7b-mot (accounting only on a CPU).",
    ),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A checkpoint folder instead of a random config."),
    task: list[str] = typer.Option(
        ["t2i"], "--task", help="t2i, edit, understand, or all; repeat the option for several."
    ),
    size: int = typer.Option(256, "--size", help="Image side in pixels (generated image; edit input)."),
    steps: int = typer.Option(
        10, "--steps", help="Points of the denoising schedule; the model runs steps - 1 times (BAGEL's meaning)."
    ),
    runs: int = typer.Option(3, "--runs", help="Timed runs per mode after one warm-up; the median is reported."),
    batch: int = typer.Option(1, "--batch", help="Images generated together (several seeds of one prompt)."),
    decode_tokens: int = typer.Option(32, "--decode-tokens", help="Tokens decoded in the understanding task."),
    long_context: int = typer.Option(
        9000, "--long-context", help="Cached tokens before the long-context decoding measurement."
    ),
    cache: bool = CacheOpt,
    cache_interval: int = CacheIntervalOpt,
    cache_order: int = CacheOrderOpt,
    cache_warmup: int = CacheWarmupOpt,
    compile_: bool = CompileOpt,
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    device: str = typer.Option("cpu", "--device", help="Where to run: cpu, cuda, cuda:N or mps (one device)."),
    dtype: Optional[str] = typer.Option(
        None,
        "--dtype",
        help="float32 or bfloat16 (default float32; with --model, as openbagel generate: bfloat16 on CUDA, "
        "a quantized folder's own).",
        show_default=False,
    ),
    quant: Optional[str] = typer.Option(
        None,
        "--quant",
        help="Also run the fast path with the weights quantized (e.g. llm=int8) and compare.",
        show_default=False,
    ),
    offload: Optional[str] = typer.Option(
        None,
        "--offload",
        help="layers: also run with the decoder layers offloaded (prefetched) and compare.",
        show_default=False,
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the records to this JSON file."),
    prompt: str = typer.Option(
        "a red circle above a blue square", "--prompt", help="With --model: the prompt (random token ids otherwise)."
    ),
) -> None:
    """Time each phase against the plain path (optimisations off) in the same run; see benchmarks/RESULTS.md."""

    def body():
        import torch

        from openbagel.bench import TASKS, run_bench

        if threads is not None:
            if threads < 1:
                raise InvalidInputError(f"--threads must be at least 1, got {threads}")
            torch.set_num_threads(threads)
        if json_out is not None:
            _check_json_output(json_out)
        tasks = TASKS if "all" in task else tuple(dict.fromkeys(task))
        run_bench(
            config, tasks, size, steps, runs, batch, 32, decode_tokens, long_context, dtype, device, model,
            _step_cache(cache, cache_interval, cache_order, cache_warmup), json_out, compile_, prompt, log=typer.echo,
            quant=quant, offload=offload,
        )  # fmt: skip

    _run(body)


if __name__ == "__main__":  # pragma: no cover
    app()
