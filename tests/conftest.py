"""Shared fixtures. Everything runs on the project's own copy of the golden
data (tests/golden), so a clone without ../shared runs the suite."""

from __future__ import annotations

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
