"""Importing libraries without their start-up chatter.

torchao logs every CUDA-only extension it cannot load, bitsandbytes every
optional CPU kernel, and diffusers imports both whenever they are installed;
none of it concerns what openbagel runs. Real errors still raise.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_imports() -> Iterator[None]:
    """Drop log records below ERROR and ignore warnings, for the ``with`` block (meant for imports).

    A filter on the libraries' loggers would not hold: diffusers configures its
    loggers while it imports.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
