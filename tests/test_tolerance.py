"""The tolerance of tests/close.py: it accepts float rounding (the one-level
pixel of issue 17, seen on another machine between a batch and a single run)
and nothing more."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.close import assert_clear_argmax, assert_images_close


def test_images_close_accepts_rounding_only():
    a = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    b = a.copy()
    b[10, 20, 1] = a[10, 20, 1] + 1 if a[10, 20, 1] < 255 else 254  # one value one level apart
    assert_images_close(a, b)
    c = a.copy()
    c[0, 0, 0] = (int(a[0, 0, 0]) + 2) % 256
    with pytest.raises(AssertionError, match="levels apart"):
        assert_images_close(a, c)
    d = a.astype(np.int16)
    d[:8] = np.where(d[:8] < 255, d[:8] + 1, 254)  # an eighth of the image
    with pytest.raises(AssertionError, match="of the values differ"):
        assert_images_close(a, d.astype(np.uint8))


def test_clear_argmax_refuses_near_ties():
    assert_clear_argmax([torch.tensor([0.0, 1.0, 0.5]), torch.tensor([2.0, 0.0, 1.9])])
    with pytest.raises(AssertionError, match="near tie"):
        assert_clear_argmax([torch.tensor([0.0, 1.0, 0.5]), torch.tensor([2.0, 0.0, 2.0 - 1e-6])])
