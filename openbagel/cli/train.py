"""``train``: a training run from a YAML config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from openbagel.cli.common import _run, flag


def train(
    config: Path = typer.Argument(
        ..., help="Training config (YAML): model, data, batch, optim; see configs/example-tiny.yaml."
    ),
    output: Path = typer.Option(
        Path("runs/latest"), "--output", "-o", help="Run folder: log.jsonl and the exported checkpoint/."
    ),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Override the config's optim.max_steps."),
    skip_bad_rows: bool = flag(
        "--skip-bad-rows", help="Skip data rows that cannot be read (counted) instead of stopping."
    ),
    resume: bool = flag("--resume", help="Continue the run in --output exactly where it stopped."),
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
