"""``understand`` and ``chat``: answers about images, and a conversation that can draw."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from openbagel.cli.common import (
    AdapterOpt,
    CfgImgOpt,
    CfgTextOpt,
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    KVBudgetOpt,
    MaxTokOpt,
    ModelOpt,
    MoreImagesOpt,
    OffloadOpt,
    ParallelOpt,
    QuantOpt,
    SampleOpt,
    SeedOpt,
    StepsOpt,
    TempOpt,
    ThinkOpt,
    TopPOpt,
    _config,
    _load,
    _load_inputs,
    _parse_size,
    _run,
    check_input_path,
    check_output,
    save_image,
)
from openbagel.errors import InvalidInputError, OpenBagelError


def understand(
    image: Path = typer.Argument(..., help="Input image file.", readable=False),
    question: str = typer.Argument(..., help="The question about the image."),
    more_images: list[Path] = MoreImagesOpt,
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
    """Answer a question about an image (--image adds more); the answer streams to stdout.

    With --think the model reasons first: its reasoning is printed on a 'reasoning:' line
    (when it closes it with </think>), then the answer.
    """

    def body():
        from openbagel.pipeline import make_generator, text_sampling

        sources = _load_inputs([image, *more_images])
        text_sampling(_config(model, device, dtype), max_new_tokens, do_sample, temperature, top_p, think)
        make_generator(seed)
        pipe = _load(model, device, dtype, adapter, kv_cache_budget, quant, offload, parallel)
        if compile_:
            pipe.compile(mode="reduce-overhead" if device.startswith("cuda") else None)
        kwargs = dict(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed
        )
        if think:
            result = pipe.understand(sources, question, think=True, **kwargs)
            if result.reasoning is not None:
                typer.echo(f"reasoning: {result.reasoning}")
            typer.echo(result.text)
            return
        for piece in pipe.understand_stream(sources, question, **kwargs):
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
        None,
        "--size",
        help="Size WxH of generated images, one the model draws (7B-MoT: multiples of 16 up to 1024; the embedded model: 64x64). Default: the model's.",
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
                    check_input_path(Path(path), "image file")
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
