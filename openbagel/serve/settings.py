"""Server settings: which model, who may call, and the limits of one request."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

#: cgroup v2's CPU quota of this process's group: "max PERIOD" or "QUOTA PERIOD" (microseconds).
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores() -> int:
    """CPU cores this process may use: its CPU affinity (``taskset``, a
    container's cpuset), capped by a cgroup v2 CPU quota (``cpu.max``) when one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            n = min(n, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it the server answers 4xx before any compute.

    Attributes:
        max_body_bytes: request body size (bytes; 413 beyond it).
        max_image_pixels: width x height summed over a request's images, checked
            from the file headers before anything is decoded (a guard against
            decompression bombs); pixels are decoded only once the request holds
            an engine slot, so waiting requests hold only their compressed bytes.
        image_formats: Pillow format names accepted for uploads.
        max_images: images in one request (edit uploads, chat image parts).
        max_n: images per generation request (``n``).
        max_steps: ``num_inference_steps`` (schedule points).
        max_prompt_tokens: tokens of a prompt, or of all texts of a chat request.
        max_tokens: ``max_tokens`` of a chat completion.
    """

    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
    max_images: int = 4
    max_n: int = 4
    max_steps: int = 100
    max_prompt_tokens: int = 1024
    max_tokens: int = 2048

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "image_formats" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{f.name} must be a whole number >= 1, got {v!r}")


#: The most PyTorch threads the engine slots may start in all.
MAX_THREADS = 1024


@dataclass(frozen=True)
class ServeSettings:
    """How the server runs.

    Attributes:
        model: checkpoint folder; ``None`` serves the embedded default model.
        model_name: the id in ``/v1/models`` and responses (default: the
            folder's name, ``openbagel-shapes`` for the embedded model).
        dtype, device, quant, offload, parallel: as :meth:`~openbagel.pipeline.BagelPipeline.from_pretrained`.
        api_key: when set, every ``/v1`` route needs ``Authorization: Bearer KEY``.
        max_queue: requests waiting for the engine; one more is answered 429.
        max_concurrency: requests inside the engine at once (each in its own thread).
        log_prompts: include prompt texts in the per-request log lines.
        limits: :class:`Limits` of one request.
        ui: also mount the web UI (:mod:`openbagel.ui`) at ``/ui``; its
            requests use the same model but not the API's queue.
        keep_alive_timeout: seconds an idle kept-alive connection stays open after a response.
        header_timeout: seconds a connection has to send a request's line and
            headers (from connecting, or from the next request's first byte); then it is closed.
        body_timeout: seconds a request has to send its whole body once its
            headers are in; then it is answered 408.
        threads: PyTorch intra-op threads of each engine slot; ``None``:
            :func:`available_cores` divided among the ``max_concurrency`` slots
            (at least 1), so that the slots' threads never outnumber the cores.
    """

    model: str | Path | None = None
    model_name: str | None = None
    dtype: str | None = None
    device: str = "cpu"
    quant: str | None = None
    offload: str | None = None
    parallel: str = "layers"
    api_key: str | None = None
    max_queue: int = 16
    max_concurrency: int = 1
    log_prompts: bool = False
    limits: Limits = field(default_factory=Limits)
    ui: bool = False
    keep_alive_timeout: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    threads: int | None = None

    def __post_init__(self):
        t = self.threads
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"threads must be a whole number >= 1, got {t!r}")
        if t is not None and isinstance(self.max_concurrency, int) and t * self.max_concurrency > MAX_THREADS:
            # tens of thousands of threads crash the process (thread creation fails in libgomp)
            raise ValueError(
                f"threads {t} x max_concurrency {self.max_concurrency} is more than {MAX_THREADS} threads in all; "
                f"use at most the CPU cores ({available_cores()} here)"
            )
        for name in ("keep_alive_timeout", "header_timeout", "body_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e6:
                raise ValueError(f"{name} must be a number of seconds above 0 (and below a million), got {v!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue must be a whole number >= 0, got {self.max_queue!r}")
        if (
            isinstance(self.max_concurrency, bool)
            or not isinstance(self.max_concurrency, int)
            or self.max_concurrency < 1
        ):
            raise ValueError(f"max_concurrency must be a whole number >= 1, got {self.max_concurrency!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; give a key or none")
        if self.api_key is not None and not (
            self.api_key.isascii() and self.api_key.isprintable() and " " not in self.api_key
        ):
            raise ValueError(
                "api_key must be printable ASCII without spaces (HTTP headers cannot carry other characters)"
            )

    @property
    def threads_per_slot(self) -> int:
        """Intra-op threads of each engine slot: ``threads``, or the available cores over the slots."""
        return self.threads or max(1, available_cores() // self.max_concurrency)

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.model is None:
            return "openbagel-shapes"
        return Path(self.model).resolve().name or "openbagel"
