"""Checks shared by every benchmark run: the ``--limit`` and the output folder."""

from __future__ import annotations

from pathlib import Path

from openbagel.errors import InvalidInputError


def check_limit(limit: int | None) -> None:
    """Refuse a ``--limit`` below 1 (``None``: no limit)."""
    if limit is not None and limit < 1:
        raise InvalidInputError(f"--limit must be at least 1, got {limit}")


def open_run_folder(out: Path, resume: bool) -> Path:
    """The output folder, created; a folder that already holds files only with ``resume``.

    Raises:
        InvalidInputError: ``out`` is a file, or holds another run and ``resume`` is not set.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} exists and is not a folder; give an output folder")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise InvalidInputError(f"{out} already holds files; continue that run with --resume or give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return out
