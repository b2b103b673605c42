"""Step caching: skip model passes on some denoising steps and predict the velocities instead.

An approximate speed-up of the TaylorSeer class (Liu et al. 2025, "From
Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers"):
every ``interval``-th step (and the first ``warmup`` steps) runs the model;
the steps in between extrapolate each velocity from the last computed ones
with a Taylor polynomial in the flow time ``t`` (finite differences).

It is applied **per guidance branch**: the full, text-free and image-free
velocities each have their own history and are predicted separately, then
combined by the usual guidance formula. (Caching only the guided result, or
only one branch, silently changes what guidance does.) A branch that just
became active (the guidance window opened) has no history and is computed.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

from torch import Tensor

from openbagel.errors import InvalidInputError


@dataclass(frozen=True)
class StepCacheSettings:
    """How to skip denoising passes (off unless given).

    Attributes:
        interval: run the model every ``interval`` steps (1 = every step: no caching).
        order: Taylor order of the prediction: 0 reuses the last velocity,
            1 extrapolates linearly, 2 quadratically.
        warmup: steps at the start that always run the model (the image's
            layout is decided there).
    Raises:
        InvalidInputError: a value out of range.
    """

    interval: int = 2
    order: int = 1
    warmup: int = 2

    def __post_init__(self) -> None:
        for name, lo, hi in (("interval", 1, 100), ("order", 0, 2), ("warmup", 0, 10_000)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise InvalidInputError(f"step cache {name} must be an integer in [{lo}, {hi}], got {v!r}")

    def computes(self, step: int) -> bool:
        """Whether step ``step`` (0-based) runs the model for branches with enough history."""
        return step < self.warmup or (step - self.warmup) % self.interval == 0


class TaylorStepCache:
    """Per-branch velocity histories of one generation (see the module docstring).

    Keys name a branch of a sample, for example ``(0, "text")``.
    """

    def __init__(self, settings: StepCacheSettings):
        self.settings = settings
        self._history: dict[Hashable, list[tuple[float, Tensor]]] = {}
        self.computed = 0  # model evaluations of a branch
        self.predicted = 0

    def to_compute(self, step: int, keys: list[Hashable]) -> list[Hashable]:
        """The branches among ``keys`` that must run the model at ``step``."""
        if self.settings.computes(step):
            return list(keys)
        need = self.settings.order + 1
        return [k for k in keys if len(self._history.get(k, ())) < need]

    def record(self, key: Hashable, t: float, v: Tensor) -> None:
        """Remember a computed velocity ``v`` of branch ``key`` at time ``t``."""
        hist = self._history.setdefault(key, [])
        hist.append((t, v))
        del hist[: -(self.settings.order + 1)]
        self.computed += 1

    def predict(self, key: Hashable, t: float) -> Tensor:
        """Extrapolate branch ``key``'s velocity to time ``t`` (Newton's divided differences)."""
        pts = self._history[key][-(self.settings.order + 1) :]
        # Newton form over the stored points, newest first
        pts = pts[::-1]
        coef = [v for _, v in pts]
        times = [s for s, _ in pts]
        for level in range(1, len(pts)):
            for j in range(len(pts) - 1, level - 1, -1):
                dt = times[j - level] - times[j]
                if math.isclose(dt, 0.0):
                    raise InvalidInputError("step cache: two computed steps at the same time")
                coef[j] = (coef[j - 1] - coef[j]) / dt
        out, basis = coef[0], 1.0
        for j in range(1, len(pts)):
            basis = basis * (t - times[j - 1])
            out = out + coef[j] * basis
        self.predicted += 1
        return out
