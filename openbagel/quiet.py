"""Importing libraries without their start-up chatter.

torchao logs every CUDA-only extension it cannot load, bitsandbytes every
optional CPU kernel, and diffusers imports both whenever they are installed;
none of it concerns what openbagel runs. Real errors still raise.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: The loggers whose import-time records are dropped: the optional libraries
#: and torch's pytree registry, which torchao's import triggers.
LOUD_LOGGERS = ("torchao", "bitsandbytes", "diffusers", "transformers", "peft", "accelerate", "torch.utils._pytree")


@contextmanager
def quiet_imports() -> Iterator[None]:
    """Drop the records below ERROR of :data:`LOUD_LOGGERS` and ignore
    warnings, for the ``with`` block (meant for imports).

    Only those loggers are raised to ERROR (and diffusers' own verbosity
    setting, which it applies to its loggers while it imports), never the
    whole process: a server thread logging a request meanwhile keeps its line
    (``logging.disable`` dropped it, issue 17).
    """
    loggers = [logging.getLogger(name) for name in LOUD_LOGGERS]
    levels = [lg.level for lg in loggers]
    verbosity = os.environ.get("DIFFUSERS_VERBOSITY")
    os.environ["DIFFUSERS_VERBOSITY"] = "error"
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if verbosity is None:
            os.environ.pop("DIFFUSERS_VERBOSITY", None)
        else:
            os.environ["DIFFUSERS_VERBOSITY"] = verbosity
