"""Comparing results of two different computations of the same maths.

A batch and a single run, the fast and the plain path, offloaded or split
layers and resident ones run other matrix shapes or kernels, so their float
rounding may differ (and differently on another CPU). Exact equality is for
two runs of the same computation only (determinism); these helpers state the
tolerance for the rest.
"""

from __future__ import annotations

import numpy as np
import torch

#: An 8-bit value that sits near a rounding boundary may land one level apart.
IMAGE_LEVELS = 1
#: ... on a few values only: an image that differs for a real reason (another
#: seed, a dropped setting) differs by tens of levels on most of its values.
IMAGE_FRACTION = 0.01


def assert_images_close(a, b, what: str = "") -> None:
    """Two 8-bit images (PIL or arrays) of the same size agree up to float rounding:
    at most :data:`IMAGE_LEVELS` apart, on at most :data:`IMAGE_FRACTION` of the values."""
    x, y = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert x.shape == y.shape, f"{what}: shapes {x.shape} and {y.shape}"
    diff = np.abs(x - y)
    assert diff.max() <= IMAGE_LEVELS, f"{what}: {int(diff.max())} levels apart"
    assert (diff > 0).mean() <= IMAGE_FRACTION, f"{what}: {(diff > 0).mean():.1%} of the values differ"


def assert_clear_argmax(logits: list[torch.Tensor], margin: float = 1e-3) -> None:
    """Every step's largest logit leads the next by more than ``margin``: greedy
    tokens of two computations whose logits agree far closer than that (1e-5
    here) cannot differ, so comparing the tokens exactly is safe."""
    top2 = torch.stack(logits).float().topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert gaps.min() > margin, f"a near tie between two tokens (gap {float(gaps.min()):.2e}): compare the logits"
