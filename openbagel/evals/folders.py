"""Checks shared by every benchmark run: the ``--limit`` and the output folder."""

from __future__ import annotations

from pathlib import Path

from openbagel.errors import InvalidInputError


def check_limit(limit: int | None) -> None:
    """Refuse a ``--limit`` below 1 (``None``: no limit)."""
    if limit is not None and limit < 1:
        raise InvalidInputError(f"--limit must be at least 1, got {limit}")


def check_run_folder(out: Path, resume: bool) -> None:
    """Refuse an output folder that is a file, or that holds files when ``resume`` is not set (no side effect).

    Raises:
        InvalidInputError: as said.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} exists and is not a folder; give an output folder")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise InvalidInputError(f"{out} already holds files; continue that run with --resume or give a new folder")


def open_run_folder(out: Path, resume: bool) -> Path:
    """The output folder, checked (:func:`check_run_folder`) and created."""
    check_run_folder(out, resume)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def safe_name(value: object, what: str) -> str:
    """``value`` as one file or folder name inside an output folder.

    Benchmark files name their outputs (an MME subtask, an ImgEdit key, a WISE
    ``prompt_id``); such a name must not climb out of the output folder.

    Raises:
        InvalidInputError: an empty name, ``.``/``..``, a leading dot, a path separator or a NUL.
    """
    name = str(value)
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise InvalidInputError(f"{what} {name!r} is not a plain file name; fix that row of the benchmark file")
    return name


RUN_FILE = "run.json"


def record_run(out: Path, info: dict, resume: bool, unchecked: tuple[str, ...] = ("questions",)) -> None:
    """Write the run's settings to ``out/run.json``; on ``resume``, first check they are the stopped run's
    (all but ``unchecked``: a run stopped with ``--limit`` may go on without it).

    Raises:
        InvalidInputError: a resumed folder whose run used other settings (another benchmark, data file,
            model, seed...), which would mix two runs' outputs.
    """
    import json

    from openbagel.fileio import write_atomically

    path = Path(out) / RUN_FILE
    if resume and path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            before = None
        if not isinstance(before, dict):
            raise InvalidInputError(f"{path} is not a run record; give a new output folder")
        changed = [k for k in info if k in before and k not in unchecked and before[k] != info[k]]
        if changed:
            k = changed[0]
            raise InvalidInputError(
                f"--resume: {out} holds a run with {k}={before[k]!r}, not {info[k]!r}; resume it with the same "
                "settings or give a new output folder"
            )
    text = json.dumps(info, indent=2) + "\n"
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
