"""Shared fixtures. Everything runs on the project's own copy of the golden
data (tests/golden), so a clone without ../shared runs the suite."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"
TINY = GOLDEN / "tiny-random"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return TINY


@pytest.fixture(scope="session")
def pipe():
    from openbagel import BagelPipeline

    return BagelPipeline.from_pretrained(TINY)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@contextmanager
def live_cli(args: list[str], ready_path: str, log: Path, env: dict | None = None):
    """Run ``openbagel ARGS --port P`` as a process on a free port until the
    block ends; yields ``(base_url, process)`` once ``GET ready_path`` answers 200."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "openbagel.cli", *args, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(base + ready_path, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"{args[0]} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(10)
