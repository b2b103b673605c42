"""Writing files so that a crash or an error never leaves a half-written one."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from openbagel.errors import InvalidInputError


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it to
    ``path``: a failed or interrupted write leaves no half-written file.

    The temporary file is ``.NAME.PID.XXXXXXXX.SUFFIX`` (PID: this process);
    one left behind by a killed process is removed by the next write to the
    same ``path`` (see :func:`remove_stale_temps`).

    Raises:
        InvalidInputError: the file cannot be written (the cause named).
    """
    remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=path.suffix, dir=path.parent)
    except OSError as e:
        raise InvalidInputError(f"cannot write {str(path)!r}: {e.strerror}") from None
    os.close(fd)
    try:
        write(tmp)
        set_umask_mode(Path(tmp))
        os.replace(tmp, path)
    except InvalidInputError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except Exception as e:  # OSError, or an encoder's own error
        Path(tmp).unlink(missing_ok=True)
        raise InvalidInputError(f"cannot write {str(path)!r}: {e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_umask_mode(path: Path) -> None:
    """Give a file the permissions a plain ``open()`` would (``0o666`` less the
    umask): temporary files and safetensors' ``save_file`` make them ``0o600``,
    which a server running as another user cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


#: How many random characters ``tempfile.mkstemp`` puts between the prefix and the suffix.
_TEMP_RANDOM_CHARS = 8
_TEMP_RANDOM = rf"[a-z0-9_]{{{_TEMP_RANDOM_CHARS}}}"


def temp_prefix(path: Path) -> str:
    """The start of the temporary name :func:`write_atomically` gives ``path``: ``.NAME.PID.``."""
    return f".{path.name}.{os.getpid()}."


def temp_name_bytes(path: Path) -> int:
    """Length in bytes of the temporary file name :func:`write_atomically` uses for ``path``
    (the longest name written in ``path``'s folder, to check against the file system's limit)."""
    return len(os.fsencode(temp_prefix(path))) + _TEMP_RANDOM_CHARS + len(os.fsencode(path.suffix))


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except (OverflowError, ValueError):  # no such process can exist
        return False
    return True


def remove_stale(folder: Path, pattern: str, *, dirs: bool) -> list[Path]:
    """Remove the leftovers of killed writers in ``folder``: the entries whose whole
    name matches ``pattern`` (a regular expression with a ``pid`` group), whose
    process is gone, and that are folders (``dirs=True``) or regular files.

    Links are never followed or removed; the entry of a live process (a write
    in progress) stays. A failed removal is skipped (the next run tries again).

    Returns:
        The entries removed.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = re.fullmatch(pattern, entry.name)
        if match is None or entry.is_symlink() or pid_alive(int(match["pid"])):
            continue
        try:
            if dirs and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            elif not dirs and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
            else:
                continue
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files killed runs of :func:`write_atomically` left for ``path``.

    Returns:
        The files removed.
    """
    pattern = re.escape(f".{path.name}.") + r"(?P<pid>\d+)\." + _TEMP_RANDOM + re.escape(path.suffix)
    return remove_stale(path.parent, pattern, dirs=False)
