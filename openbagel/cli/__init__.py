"""The ``openbagel`` command line: generate, edit, understand, chat, frames, train, serve, ui, eval.

The Typer app is assembled here; each command group lives in its own module
(``generate``: generate/edit/frames, ``understand``: understand/chat,
``train``, ``tools``: quantize/plan/bench, ``serve``: serve/ui,
``evaluate``: eval/data) and shares its option types and helpers through
``common``. Heavy libraries are imported inside the commands, so ``--help``
stays fast.
"""

from __future__ import annotations

import typer

from openbagel.cli import evaluate, generate, serve, tools, train, understand
from openbagel.cli.common import check_output, save_image

app = typer.Typer(
    help="Run BAGEL, the unified multimodal model: text-to-image, image editing, image understanding and chat.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for command in (
    generate.generate,
    generate.edit,
    generate.frames,
    understand.understand,
    understand.chat,
    train.train,
    tools.quantize,
    tools.plan,
    serve.serve,
    serve.ui,
):
    app.command()(command)
app.add_typer(evaluate.eval_app, name="eval")
app.add_typer(evaluate.data_app, name="data")
app.command()(tools.bench)


def main() -> None:  # pragma: no cover - entry point
    app()


__all__ = ["app", "check_output", "main", "save_image"]
