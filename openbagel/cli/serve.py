"""``serve`` and ``ui``: the HTTP API and the web UI."""

from __future__ import annotations

from typing import Optional

import typer

from openbagel.cli.common import DeviceOpt, DtypeOpt, ModelOpt, OffloadOpt, ParallelOpt, QuantOpt, _config, _run, flag
from openbagel.errors import InvalidInputError


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
    log_prompts: bool = flag("--log-prompts", help="Write prompt texts into the request log lines."),
    with_ui: bool = flag("--ui", help="Also serve the web UI at /ui (its requests bypass the API queue)."),
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
