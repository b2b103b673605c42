"""Writing files so that a crash or an error never leaves a half-written one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from openbagel.errors import InvalidInputError


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it to
    ``path``: a failed or interrupted write leaves no half-written file.

    Raises:
        InvalidInputError: the file cannot be written (the cause named).
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    except OSError as e:
        raise InvalidInputError(f"cannot write {str(path)!r}: {e.strerror}") from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
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
