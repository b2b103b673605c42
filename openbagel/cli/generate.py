"""``generate``, ``edit`` and ``frames``: images out of a prompt, an image or a clip."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from openbagel.cli.common import (
    AdapterOpt,
    CacheIntervalOpt,
    CacheOpt,
    CacheOrderOpt,
    CacheWarmupOpt,
    CfgImgOpt,
    CfgTextOpt,
    DeviceOpt,
    DtypeOpt,
    IntervalOpt,
    KVBudgetOpt,
    ModelOpt,
    MoreImagesOpt,
    NumImagesOpt,
    OffloadOpt,
    OutOpt,
    ParallelOpt,
    QuantOpt,
    RenormMinOpt,
    RenormOpt,
    SeedOpt,
    ShiftOpt,
    SizeOpt,
    StepsOpt,
    ThinkOpt,
    _check_image_settings,
    _load,
    _load_inputs,
    _parse_size,
    _run,
    _sampling,
    _step_cache,
    _write_result,
    check_input_path,
    check_output,
    check_output_path,
    flag,
    numbered_outputs,
    pick_seed,
)
from openbagel.errors import InvalidInputError


def generate(
    prompt: str = typer.Argument(..., help="What to draw. An empty string gives unconditional generation."),
    output: Path = OutOpt,
    num_images: int = NumImagesOpt,
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
    """Generate an image from a text prompt (-n N: N images with seeds SEED..SEED+N-1)."""
    sampling = _sampling(steps, guidance_scale, image_guidance_scale, shift, cfg_interval, renorm, renorm_min)
    height, width = _parse_size(size)

    def body():
        outputs = numbered_outputs(output, num_images)
        for path in outputs:
            check_output(path)
        step_cache = _step_cache(cache, cache_interval, cache_order, cache_warmup)
        chosen = pick_seed(seed)  # printed with each image
        _check_image_settings(model, device, dtype, "t2i", height, width, chosen, sampling)
        pipe = _load(model, device, dtype, adapter, kv_cache_budget, quant, offload, parallel)
        result = pipe.text_to_image(
            prompt,
            height=height,
            width=width,
            seed=chosen,
            think=think,
            progress=True,
            **sampling,
            step_cache=step_cache,
            num_images_per_prompt=num_images,
        )
        _write_result(result, outputs, chosen)

    _run(body)


def edit(
    image: Path = typer.Argument(..., help="Input image file.", readable=False),
    instruction: Optional[str] = typer.Argument(
        None, help="What to change, e.g. 'make the sky purple' or 'in the style of a watercolour' (or use --style)."
    ),
    output: Path = OutOpt,
    style: Optional[str] = typer.Option(
        None, "--style", help="A style preset instead of an instruction: outline, pixel or invert."
    ),
    more_images: list[Path] = MoreImagesOpt,
    num_images: int = NumImagesOpt,
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
    """Edit or restyle an image following an instruction (--image adds input images; -n N: N results)."""
    sampling = _sampling(steps, guidance_scale, image_guidance_scale, shift, cfg_interval, renorm, renorm_min)
    height, width = _parse_size(size)

    def body():
        from openbagel.pipeline import style_instruction

        outputs = numbered_outputs(output, num_images)
        for path in outputs:
            check_output(path)
        step_cache = _step_cache(cache, cache_interval, cache_order, cache_warmup)
        prompt = style_instruction(instruction, style)
        # fail on a bad image or setting before loading the weights
        source, *more = _load_inputs([image, *more_images])
        chosen = pick_seed(seed)  # printed with each image
        _check_image_settings(model, device, dtype, "edit", height, width, chosen, sampling)
        pipe = _load(model, device, dtype, adapter, kv_cache_budget, quant, offload, parallel)
        result = pipe.edit(
            source,
            prompt,
            images=more,
            height=height,
            width=width,
            seed=chosen,
            think=think,
            progress=True,
            **sampling,
            step_cache=step_cache,
            num_images_per_prompt=num_images,
        )
        _write_result(result, outputs, chosen)

    _run(body)


def frames(
    clip: list[Path] = typer.Argument(
        ...,
        help="The clip: a GIF, MP4, WebM, MKV or MOV file, or image files in order (one frame each).",
        readable=False,
    ),
    num_frames: int = typer.Option(1, "--num-frames", "-n", help="Frames to predict after the clip."),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="Where the predicted frames go: a .gif, .mp4 or .webm file, or an existing folder (frame-001.png, ...).",
    ),
    include_input: bool = flag("--include-input", help="Write the input frames before the predicted ones."),
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
        from openbagel.fileio import temp_name_bytes
        from openbagel.video import Clip, check_clip_output, is_clip_file, read_clip, write_clip

        if num_frames < 1:
            raise InvalidInputError(f"--num-frames must be at least 1, got {num_frames}")
        if context_frames is not None and context_frames < 1:
            raise InvalidInputError(f"--context-frames must be at least 1, got {context_frames}")
        if fps is not None and not 0 < fps <= 240:
            raise InvalidInputError(f"--fps must be in (0, 240], got {fps}")
        try:
            existing_folder = output.is_dir()
        except OSError:  # a bad path: named below
            existing_folder = False
        if not existing_folder:  # a clip file (an existing folder gets numbered frames)
            check_output_path(output, "output", temp_bytes=temp_name_bytes(output))
        check_clip_output(output)
        for path in clip:
            check_input_path(path, "clip file" if is_clip_file(path) else "image file")
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
