"""What the command groups share: option types, output and input checks, loading, error handling."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import typer
from PIL import Image

from openbagel.errors import InvalidInputError, OpenBagelError


def flag(name: str, help: str) -> typer.models.OptionInfo:
    """An on/off option, off unless given (``--name``, no value). The empty metavar
    keeps Typer's help from showing a ``<bool>`` value the flag does not take."""
    return typer.Option(False, name, help=help, metavar="")


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


# Input paths are checked by check_input_path (one line), not by click's usage error (readable=False).
AdapterOpt = typer.Option(
    None, "--adapter", help="LoRA adapter folder (from openbagel train) to merge into the model.", readable=False
)
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
    help="Output size WxH in pixels, one the model draws (7B-MoT: multiples of 16 up to 1024; the embedded model: 64x64). Default: the model's; edit: the input's.",
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
ThinkOpt = flag("--think", help="Let the model reason (plan) in text first; the reasoning is printed.")
OutOpt = typer.Option(..., "--output", "-o", help="Output image file (.png, .jpg, .webp ...).")
NumImagesOpt = typer.Option(
    1,
    "--num-images",
    "-n",
    help="Images to make in one batch, with seeds SEED, SEED+1, ... (without --seed a random SEED, printed with "
    "each file); more than one are written as NAME-0.EXT, NAME-1.EXT, ... (the number is the seed offset, "
    "zero-padded to one width).",
)
MoreImagesOpt = typer.Option(
    [],
    "--image",
    help="Another input image after the first; repeat the option for several.",
    metavar="PATH",
    readable=False,
    show_default=False,
)
MaxTokOpt = typer.Option(
    None, "--max-new-tokens", help="Most tokens to generate (default: the model's; 7B-MoT: 512, 1024 with --think)."
)
SampleOpt = flag("--do-sample", help="Sample tokens instead of greedy decoding.")
TempOpt = typer.Option(
    None, "--temperature", help="Sampling temperature with --do-sample (default: the model's; 0.3 for 7B-MoT)."
)
TopPOpt = typer.Option(None, "--top-p", help="Nucleus sampling mass with --do-sample, in (0, 1] (default 1.0).")
CacheOpt = flag(
    "--cache",
    help="Step caching (TaylorSeer-style, per guidance branch): run the model only every --cache-interval steps "
    "and extrapolate the velocities in between. Faster, approximate; off by default.",
)
CacheIntervalOpt = typer.Option(2, "--cache-interval", help="With --cache: run the model every N steps.")
CacheOrderOpt = typer.Option(
    1, "--cache-order", help="With --cache: 0 reuses the last velocity, 1 extrapolates linearly, 2 quadratically."
)
CacheWarmupOpt = typer.Option(2, "--cache-warmup", help="With --cache: first steps that always run the model.")
CompileOpt = flag(
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


def _shown(path: Path) -> str:
    """``path`` quoted for a message, cut to 80 characters."""
    text = str(path)
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):
        return default


def check_output_path(path: Path, what: str = "output", *, folder: bool = False, temp_bytes: int = 0) -> None:
    """Refuse an output path before any work: its folder must exist (a folder output's
    missing parents are created, so their nearest existing one), be a folder and be
    writable; every new name must fit the file system (``PC_NAME_MAX``, ``PC_PATH_MAX``);
    a file output must not be an existing folder.

    Args:
        path: the file (or, with ``folder=True``, the folder) the command will write.
        what: how messages name it (an option, e.g. ``--json``).
        folder: ``path`` is a folder the command creates or fills; whether an
            existing one may be used is the command's own check.
        temp_bytes: length in bytes of the longest temporary name written beside
            ``path`` (it must fit the file system's limit too).
    Raises:
        InvalidInputError: the problem and the fix, in one line.
    """
    if not str(path).strip() or path.name in ("", ".", ".."):
        raise InvalidInputError(f"{what}: give a {'folder' if folder else 'file'} name, got {_shown(path)}")
    parent = path.parent
    while True:
        try:
            parent_is_dir = stat.S_ISDIR(os.stat(parent).st_mode)
            break
        except FileNotFoundError:
            if not folder or parent == parent.parent:
                raise InvalidInputError(f"{what} folder {_shown(parent)} does not exist; create it first") from None
            parent = parent.parent  # created with the output folder
        except NotADirectoryError:
            raise InvalidInputError(
                f"{what} path {_shown(path)} runs through a file; give a path in a folder"
            ) from None
        except OSError as e:
            raise InvalidInputError(f"bad {what} path {_shown(path)}: {e.strerror}; check the path") from None
    if not parent_is_dir:
        raise InvalidInputError(f"{what} folder {_shown(parent)} is a file, not a folder; give a path in a folder")
    name_max = _limit(parent, "PC_NAME_MAX", 255)
    new_names = path.relative_to(parent).parts  # the output's name, and the folders created for it
    extra = max(temp_bytes - len(os.fsencode(path.name)), 0)  # the temporary name is the longest
    for i, name in enumerate(new_names):
        size = len(os.fsencode(name))
        limit = name_max - (extra if i == len(new_names) - 1 else 0)
        if size > limit:
            raise InvalidInputError(
                f"{what} name {_shown(name)} is too long for this file system ({size} bytes; "
                f"at most {limit} here); choose a shorter name"
            )
    path_bytes = len(os.fsencode(os.path.abspath(path))) + extra
    path_max = _limit(parent, "PC_PATH_MAX", 4096)
    if path_bytes >= path_max:
        raise InvalidInputError(
            f"{what} path {_shown(path)} is too long for this file system ({path_bytes} bytes with its "
            f"temporary name; under {path_max} here); choose a shorter path"
        )
    if not folder and path.is_dir():
        raise InvalidInputError(f"{what} path {_shown(path)} is a folder; give a file name")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"{what} folder {_shown(parent)} is not writable; choose another folder")


def check_input_path(path: Path, what: str, *, folder: bool = False) -> None:
    """Refuse an input path that cannot be read, before any work.

    Args:
        what: how messages name it (e.g. ``image file``, ``--adapter folder``).
        folder: the input is a folder (otherwise a file).
    Raises:
        InvalidInputError: missing, a folder where a file is expected (or the
            reverse), not a regular file (a device, a pipe), unreadable, or a
            bad path; one line naming the fix.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidInputError(f"{what} not found: {_shown(path)}; check the path") from None
    except OSError as e:
        raise InvalidInputError(f"bad {what} path {_shown(path)}: {e.strerror}; check the path") from None
    if folder and not stat.S_ISDIR(mode):
        raise InvalidInputError(f"{what} {_shown(path)} is a file; give the folder")
    if not folder and stat.S_ISDIR(mode):
        raise InvalidInputError(f"{what} {_shown(path)} is a folder; give a file")
    if not folder and not stat.S_ISREG(mode):  # a device or a pipe: reading it could block
        raise InvalidInputError(f"{what} {_shown(path)} is not a regular file; give a file")
    if not os.access(path, os.R_OK | (os.X_OK if folder else 0)):
        raise InvalidInputError(f"cannot read {what} {_shown(path)} (permission denied); fix its permissions")


def check_output(path: Path) -> None:
    """Refuse an image output path we could not write, before any compute.

    Raises:
        InvalidInputError: unknown image extension, or see :func:`check_output_path`.
    """
    from openbagel.fileio import temp_name_bytes

    check_output_path(path, "output", temp_bytes=temp_name_bytes(path))  # first: an existing folder is named so
    ext = path.suffix.lower()
    if not _can_write_rgb(Image.registered_extensions().get(ext)):
        raise InvalidInputError(f"cannot write images with extension {ext or '(none)'!r}; use .png, .jpg or .webp")


def _check_json_output(path: Path) -> None:
    from openbagel.fileio import temp_name_bytes

    check_output_path(path, "--json", temp_bytes=temp_name_bytes(path))


def save_image(image: Image.Image, path: Path) -> None:
    """Write atomically (see :func:`openbagel.fileio.write_atomically`).

    Raises:
        InvalidInputError: the file cannot be written.
    """
    from openbagel.fileio import write_atomically

    fmt = Image.registered_extensions()[path.suffix.lower()]
    write_atomically(path, lambda tmp: image.save(tmp, format=fmt))


def numbered_outputs(output: Path, count: int) -> list[Path]:
    """The files ``-n COUNT`` images go to: ``output`` itself for one, else
    ``NAME-K.EXT`` for K = 0 .. COUNT-1 (the seed offset), zero-padded to one width.

    Raises:
        InvalidInputError: ``count`` outside 1 .. the most images of one batch.
    """
    from openbagel.pipeline import MAX_BATCH

    if not 1 <= count <= MAX_BATCH:
        raise InvalidInputError(f"-n/--num-images must be from 1 to {MAX_BATCH}, got {count}")
    if count == 1:
        return [output]
    width = len(str(count - 1))
    return [output.with_name(f"{output.stem}-{k:0{width}d}{output.suffix}") for k in range(count)]


def _load_inputs(paths: list[Path]) -> list[Image.Image]:
    """Input images checked (see :func:`check_input_path`) and read, before the weights load."""
    from openbagel.images import load_image

    for path in paths:
        check_input_path(path, "image file")
    return [load_image(path) for path in paths]


def pick_seed(seed: int | None) -> int:
    """``seed``, or a random one when none is given, so that every image the
    CLI writes can be made again (its seed is printed with it)."""
    import secrets

    return seed if seed is not None else secrets.randbelow(2**31)


def _write_result(result, outputs: list[Path], seed: int) -> None:
    """Write each image (image k was drawn with ``seed + k``) and say where, with its seed."""
    if result.reasoning is not None:
        typer.echo(f"reasoning: {result.reasoning}")
    for k, (image, output) in enumerate(zip(result.images, outputs, strict=True)):
        save_image(image, output)
        typer.echo(f"wrote {output} ({image.width}x{image.height}, seed {seed + k})")


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

    if adapter is not None:
        check_input_path(adapter, "--adapter folder", folder=True)
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


def _run(fn):
    """Run a command body, turning our errors into one clean line and exit code 2."""
    try:
        return fn()
    except OpenBagelError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
