"""``openbagel bench``: time the engine's phases against its plain path, in the same run.

The plain path is the same engine with its optimisations switched off
(``BagelPipeline.plain``): every guidance branch its own forward over a
copied context (the redundant image-free pass of text to image included), a
packed segment built per decoded token, one request at a time. Each phase is
timed in both modes (median of ``runs`` after a warm-up, modes alternating),
with its peak memory (RSS sampled every 2 ms on CPU; max allocated on CUDA),
its FLOPs (``torch.utils.flop_counter``) against the machine's measured matmul
GFLOP/s, and for decoding the tokens/s against the memory-bandwidth bound
(bytes read per token / measured copy bandwidth).

Configs: ``tiny`` (the golden config), ``small`` (a 512-wide decoder with the
real vocabulary, the full FLUX autoencoder) and ``7b-mot`` (the published
shape: on a CPU it is built on the meta device for FLOP/byte accounting and
not run), all with random weights; or ``--model DIR`` for a checkpoint.
Benchmarks and their results: ``benchmarks/`` (``RESULTS.md``, ``gpu.sh``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from openbagel.config import BagelConfig, ImageSampling, preset
from openbagel.errors import InvalidInputError
from openbagel.inference.generate import decode_tokens, draw_noise, generate_latents_batch
from openbagel.inference.sampling import TextSampling
from openbagel.inference.session import Session
from openbagel.inference.step_cache import StepCacheSettings
from openbagel.model.bagel import Bagel
from openbagel.model.layers import RMSNorm
from openbagel.packing import SpecialIds, flattened_position_ids, patchify, unpatchify
from openbagel.plan import kv_bytes_per_token

#: Bench config names -> model presets.
CONFIGS = {"tiny": "tiny-golden", "small": "small", "7b-mot": "7b-mot"}
TASKS = ("t2i", "edit", "understand")

#: The reference app's defaults, as the published config has them: text to
#: image and editing (``num_timesteps`` is set by ``--steps``).
T2I_SAMPLING = preset("7b-mot").t2i.sampling
EDIT_SAMPLING = preset("7b-mot").edit.sampling


@dataclass
class Record:
    """One phase of one task: fast and plain medians, memory, and the machine bounds."""

    config: str
    task: str
    phase: str
    median_s: float
    plain_median_s: float | None
    speedup: float | None
    peak_mem_mb: float
    plain_peak_mem_mb: float | None
    unit: str = "call"  # what median_s times: "step", "token", "call"
    gflop: float | None = None  # per unit, fast path
    gflops_per_s: float | None = None
    compute_fraction: float | None = None  # of the measured matmul GFLOP/s
    tokens_per_s: float | None = None
    bound_tokens_per_s: float | None = None
    bound_fraction: float | None = None
    kv_bytes_per_token: int | None = None
    extra: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)


# --- measuring ---------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory inside a ``with`` block: max allocated on CUDA, sampled RSS on CPU (bytes in ``peak``)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.start = device, 0, 0

    @property
    def increase(self) -> int:
        """Peak minus the memory in use when the block began: the block's own working memory."""
        return self.peak - self.start

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self._stop = threading.Event()
        self.peak = self.start = _rss()

        def sample() -> None:
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())


def _best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """The compute bound: GFLOP/s of a large square matmul in ``dtype`` (best of ``repeats``)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _best_time(lambda: a @ b, device, repeats) / 1e9


def copy_gbps(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """The memory bound: GB/s of bytes read plus written by a large copy (best of ``repeats``)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_time(lambda: dst.copy_(src), device, repeats) / 1e9


def _register_cpu_attention_flops() -> None:
    """``torch.utils.flop_counter`` has no formula for PyTorch's fused CPU attention; give it one."""
    from torch.utils.flop_counter import register_flop_formula

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return

    def flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        *batch, lq, d = query
        return 4 * math.prod(batch) * lq * key[-2] * d  # QK^T and PV, 2 FLOPs per multiply-add

    try:
        register_flop_formula(op)(flops)
    except RuntimeError:  # a PyTorch that counts it already
        pass


_register_cpu_attention_flops()


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of ``fn()`` as ``torch.utils.flop_counter`` counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# --- the model ---------------------------------------------------------------------


@torch.no_grad()
def random_init(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Linear/embedding weights ``N(0, std)``, biases 0, norm scales 1, drawn on the weights' device."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
            module.weight.normal_(0, std, generator=g)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, (RMSNorm, nn.LayerNorm, nn.GroupNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


def build_random(config: BagelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """``(model, vae)`` with random weights, initialised where they live (no CPU copy of a GPU model)."""
    from openbagel.model.vae import BagelVAE

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a 7B model is never materialised in float32
    try:
        with torch.device(device):
            model = Bagel(config)
            vae = BagelVAE(config.vae)
    finally:
        torch.set_default_dtype(default)
    random_init(model, seed)
    model = model.to(dtype).eval()
    if device.type == "cpu":
        model.use_decoding_layout()  # as BagelPipeline does
    return model, vae.to(dtype).eval()


def special_ids(vocab: int) -> SpecialIds:
    return SpecialIds(bos=vocab - 4, eos=vocab - 3, start_of_image=vocab - 2, end_of_image=vocab - 1)


def understanding_bytes(model: Bagel) -> int:
    """Bytes of the weights one decoded token reads: the understanding expert, final norm, LM head, one embedding row."""
    lm = model.language_model
    total = sum(p.numel() * p.element_size() for n, p in lm.model.layers.named_parameters() if "_moe_gen" not in n)
    total += sum(p.numel() * p.element_size() for p in (*lm.model.norm.parameters(), *lm.lm_head.parameters()))
    emb = lm.model.embed_tokens.weight
    return total + emb.shape[1] * emb.element_size()


# --- tasks -------------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    model: Bagel
    vae: nn.Module | None
    config: BagelConfig
    special: SpecialIds
    device: torch.device
    size: int
    steps: int
    batch: int
    prompt_tokens: int
    decode_tokens: int
    long_context: int
    step_cache: StepCacheSettings | None
    static: object | None = None  # a compiled StaticDecoder for the fast path
    variants: dict = field(default_factory=dict)  # memory modes (--quant, --offload): name -> model
    tokenizer: object | None = None  # a checkpoint's: real prompts instead of random ids
    prompt_text: str = ""

    def prompt(self) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.encode(self.prompt_text)
        g = torch.Generator().manual_seed(1)
        return torch.randint(0, self.special.bos, (self.prompt_tokens,), generator=g).tolist()

    def image_latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent tokens and position ids of a ``size`` x ``size`` input image (VAE path)."""
        cfg = self.config
        g = torch.Generator().manual_seed(2)
        pixels = (torch.rand(1, 3, self.size, self.size, generator=g) * 2 - 1).to(self.device)
        latent = self.vae.encode(pixels)[0].float()
        p = cfg.latent_patch_size
        h, w = latent.shape[1] // p, latent.shape[2] // p
        return patchify(latent, p), flattened_position_ids(h, w, cfg.max_latent_size, cfg.position_mode)

    def vit_patches(self, side: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ViT patches and position ids of an image (its side a multiple of the patch; default: ``size`` rounded)."""
        cfg = self.config
        p = cfg.vit.patch_size
        side = side or min(cfg.vit_transform.max_size, max(p, self.size // p * p))
        g = torch.Generator().manual_seed(3)
        pixels = torch.rand(3, side, side, generator=g) * 2 - 1
        pos = flattened_position_ids(side // p, side // p, cfg.vit_max_num_patch_per_side, cfg.position_mode)
        return patchify(pixels, p).to(self.device, self.model.dtype), pos

    @property
    def never_stop(self) -> SpecialIds:
        """Special ids whose end token never comes: random weights decode the full count."""
        return replace(self.special, eos=-1)

    def sampling(self, task: str) -> ImageSampling:
        return replace(T2I_SAMPLING if task == "t2i" else EDIT_SAMPLING, num_timesteps=self.steps)

    def prefill(self, task: str) -> Session:
        """The context of ``task``: the prompt, after a VAE + ViT image (edit) or a ViT image (understand)."""
        session = Session(self.model, self.special)
        if task == "edit":
            session.add_vae_image(*self.image_latents())
        if task in ("edit", "understand"):
            session.add_vit_image(*self.vit_patches())
        session.add_text(self.prompt())
        return session

    def decode_image(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent tokens ``[h*w, C]`` -> the VAE's image ``[1, 3, size, size]``."""
        down, p = self.config.latent_downsample, self.config.latent_patch_size
        return self.vae.decode(unpatchify(latent, self.size // down, self.size // down, p)[None])

    def noises(self) -> list[torch.Tensor]:
        return [
            draw_noise(self.model, self.size, self.size, torch.Generator().manual_seed(10 + k))
            for k in range(self.batch)
        ]


class _Phases:
    """Times (seconds) and memory (peak, increase; bytes) of the phases of one run."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.peaks, self.increases = device, {}, {}, {}

    @contextmanager
    def __call__(self, name: str, units: int = 1):
        with PeakMemory(self.device) as mem:
            _sync(self.device)
            t0 = time.perf_counter()
            yield
            _sync(self.device)
            self.times[name] = (time.perf_counter() - t0) / units
        self.peaks[name], self.increases[name] = mem.peak, mem.increase


def _image_task(setup: Setup, task: str, plain: bool, step_cache=None) -> tuple[_Phases, tuple]:
    """One run of text to image or edit: its phases, and the latents and decoded images."""
    s = setup
    phase = _Phases(s.device)
    noises = s.noises()
    with torch.inference_mode():
        with phase("prefill"):
            session = s.prefill(task)
        with phase("denoise_step", units=s.steps - 1):
            latents = generate_latents_batch(
                s.model, [session] * s.batch, s.size, s.size, s.sampling(task), noises, plain=plain,
                step_cache=step_cache,
            )  # fmt: skip
        with phase("vae_decode", units=s.batch):
            images = [s.decode_image(lat) for lat in latents]
    return phase, (latents, images)


def _filled_session(s: Setup, tokens: int) -> Session:
    """A session whose full context holds ``tokens`` cached tokens of random keys/values (not timed)."""
    session = Session(s.model, s.special, capacity=tokens + s.decode_tokens + 8)
    cache = session.full.cache
    g = torch.Generator(s.device).manual_seed(4)
    for t in cache.k + cache.v:
        t[:tokens].normal_(generator=g)
    cache.commit(tokens)
    session.full.rope = tokens
    return session


def _understand(s: Setup, plain: bool) -> tuple[_Phases, int]:
    """Prefill of one image + prompt, decoding at that context, and decoding after ``long_context`` tokens."""
    params = TextSampling(max_new_tokens=s.decode_tokens)
    phase = _Phases(s.device)
    with torch.inference_mode():
        with phase("prefill"):
            session = s.prefill("understand")
        for name, sess in (("decode", session), ("decode_long", _filled_session(s, s.long_context))):
            with phase(name, units=s.decode_tokens):
                # the plain path copies the context to decode in, as the reference does
                ctx = sess.full.fork() if plain else sess.decoding_context(s.decode_tokens)
                static = None if plain else s.static
                for _ in decode_tokens(s.model, ctx, s.never_stop, params, plain=plain, static=static):
                    pass
    return phase, session.full.cache.length


#: What each phase's median times (the rest: one call).
UNITS = {"denoise_step": "step", "decode": "token", "decode_long": "token"}

#: Phases whose code is the same in both modes (their "speed-up" is noise).
SAME_CODE = ("prefill", "vae_decode")


@dataclass
class _Samples:
    """Per phase: times of the timed runs, peak and increase of memory (max over runs), one mode."""

    times: dict = field(default_factory=dict)
    peak: dict = field(default_factory=dict)
    increase: dict = field(default_factory=dict)

    def add(self, phases: _Phases) -> None:
        for ph, t in phases.times.items():
            self.times.setdefault(ph, []).append(t)
            self.peak[ph] = max(self.peak.get(ph, 0), phases.peaks[ph])
            self.increase[ph] = max(self.increase.get(ph, 0), phases.increases[ph])


def run_task(
    s: Setup,
    task: str,
    runs: int,
    machine: dict,
    log: Callable[[str], None],
    partial: Callable[[list[Record]], None] | None = None,
) -> list[Record]:
    """Time ``task`` in both modes; returns one record per phase.

    ``partial`` is called with the records measured so far after every run
    (so that a benchmark cut short still reports what it measured).
    """
    fast, plain_ = _Samples(), _Samples()
    context_tokens = None
    for rep in range(runs + 1):  # the first is a warm-up
        for plain in (rep % 2 == 1, rep % 2 == 0):  # alternate which mode goes first
            if task == "understand":
                phases, context_tokens = _understand(s, plain)
            else:
                phases, _ = _image_task(s, task, plain)
            if rep:
                (plain_ if plain else fast).add(phases)
        log(f"  {task}: run {rep}/{runs} done" if rep else f"  {task}: warm-up done")
        if rep and partial is not None:
            partial(_records(s, task, fast, plain_, context_tokens, {}, machine))

    records = _records(s, task, fast, plain_, context_tokens, _flops(s, task), machine)
    if s.step_cache is not None and task != "understand":
        records.append(_step_cache_record(s, task, runs, machine, fast))
    for mode, model in s.variants.items():
        records += _memory_mode_records(s, task, runs, machine, fast, mode, model)
        log(f"  {task}: {mode} done")
    return records


def _memory_mode_records(
    s: Setup, task: str, runs: int, machine: dict, baseline: _Samples, mode: str, model: Bagel
) -> list[Record]:
    """The fast path with the weights stored or placed another way (``--quant``, ``--offload``), against
    the same path with the plain model: time per phase, working memory, weight bytes, latent error."""
    from openbagel.quantize import module_bytes

    variant = replace(s, model=model, static=None, step_cache=None)
    if task == "understand":
        samples, _ = _timed_runs(runs, lambda: _understand(variant, False))
    else:
        samples, (latents, _) = _timed_runs(runs, lambda: _image_task(variant, task, False))
    extra = {"baseline": "fast path, plain weights", "weights_mb": _resident_bytes(model) / 2**20}
    extra["baseline_weights_mb"] = module_bytes(s.model) / 2**20
    if task != "understand":
        _, (ref_latents, _) = _image_task(s, task, False)
        extra["latent_rel_error"] = _latent_error(latents, ref_latents)
    records = []
    for ph, ts in samples.times.items():
        med, base = statistics.median(ts), statistics.median(baseline.times[ph])
        r = Record(
            s.name, task, f"{ph} [{mode}]", med, None, base / med, samples.peak[ph] / 2**20, None,
            unit=UNITS.get(ph, "call"),
            extra={**extra, "baseline_median_s": base, "mem_increase_mb": samples.increase[ph] / 2**20},
            machine=machine,
        )  # fmt: skip
        records.append(r)
    return records


def _timed_runs(runs: int, run: Callable[[], tuple[_Phases, object]]) -> tuple[_Samples, object]:
    """``runs`` timed runs after a warm-up: their samples, and the last run's outputs."""
    samples, out = _Samples(), None
    for rep in range(runs + 1):
        phases, out = run()
        if rep:
            samples.add(phases)
    return samples, out


def _latent_error(latents: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest relative L2 error of ``latents`` against ``reference`` (sample by sample)."""
    return max(float((a - b).norm() / b.norm()) for a, b in zip(latents, reference))


def _resident_bytes(model: Bagel) -> int:
    """Weight bytes kept on the device: all of them, or with offload all but the layers plus two of them."""
    from openbagel.placement import offload_of
    from openbagel.quantize import module_bytes

    total = module_bytes(model)
    if offload_of(model) is not None:
        layers = model.language_model.model.layers
        total -= module_bytes(layers) - 2 * module_bytes(layers[0])
    return total


def build_variants(model: Bagel, device: torch.device, quant=None, offload: bool = False) -> dict[str, Bagel]:
    """The memory modes to compare: a quantized copy of ``model`` and/or an offloaded one (``name -> model``)."""
    import copy

    from openbagel.placement import LayerOffload
    from openbagel.quantize import quantize_model

    out = {}
    quantized = quant is not None and quant.active
    if quantized:
        out[f"quant {quant}"] = quantize_model(copy.deepcopy(model), quant, device)
    if offload:  # the plain weights offloaded, and the quantized ones too
        for name, base in [("offload", model)] + ([(f"offload + {quant}", out[f"quant {quant}"])] if quantized else []):
            moved = copy.deepcopy(base).to("cpu")
            LayerOffload(moved, device)
            out[name] = moved
    return out


def _records(s: Setup, task, fast: _Samples, plain: _Samples, context_tokens, flops, machine) -> list[Record]:
    kv_per_token = kv_bytes_per_token(s.config, s.model.dtype)
    records = []
    for ph, ts in fast.times.items():
        med, pmed = statistics.median(ts), statistics.median(plain.times[ph])
        r = Record(
            s.name, task, ph, med, pmed, pmed / med, fast.peak[ph] / 2**20, plain.peak[ph] / 2**20,
            unit=UNITS.get(ph, "call"), kv_bytes_per_token=kv_per_token, machine=machine,
        )  # fmt: skip
        r.extra["mem_increase_mb"] = fast.increase[ph] / 2**20
        r.extra["plain_mem_increase_mb"] = plain.increase[ph] / 2**20
        if ph in SAME_CODE:
            r.extra["same_code_both_modes"] = True
        if ph in flops:
            r.gflop = flops[ph] / 1e9
            r.gflops_per_s = r.gflop / med
            r.compute_fraction = r.gflops_per_s / machine["matmul_gflops"]
        if ph.startswith("decode"):
            ctx = (context_tokens if ph == "decode" else s.long_context) + s.decode_tokens // 2
            per_token = understanding_bytes(s.model) + ctx * kv_per_token
            r.tokens_per_s = 1 / med
            r.bound_tokens_per_s = machine["copy_gbps"] * 1e9 / per_token
            r.bound_fraction = r.tokens_per_s / r.bound_tokens_per_s
            r.extra["context_tokens"] = ctx
            r.extra["bytes_per_token"] = per_token
        if ph == "denoise_step":
            r.extra["batch"] = s.batch
        records.append(r)
    return records


def _step_cache_record(s: Setup, task: str, runs: int, machine: dict, uncached: _Samples) -> Record:
    """Denoising with the step cache against the uncached fast path: speed-up, latent error, PSNR."""
    _, (ref_latents, ref_images) = _image_task(s, task, False)
    cached, (latents, images) = _timed_runs(runs, lambda: _image_task(s, task, False, s.step_cache))
    err = _latent_error(latents, ref_latents)
    mse = max(float(((a.float() - b.float()) ** 2).mean()) for a, b in zip(images, ref_images))
    psnr = math.inf if mse == 0 else 10 * math.log10(4.0 / mse)  # images in [-1, 1]: peak-to-peak 2
    med, base = statistics.median(cached.times["denoise_step"]), statistics.median(uncached.times["denoise_step"])
    ph = "denoise_step"
    return Record(
        s.name, task, "denoise_step_cached", med, None, base / med, cached.peak[ph] / 2**20, None, unit="step",
        extra={
            "baseline": "uncached fast path", "uncached_median_s": base, "latent_rel_error": err, "psnr_db": psnr,
            "mem_increase_mb": cached.increase[ph] / 2**20, **asdict(s.step_cache),
        },
        machine=machine,
    )  # fmt: skip


def _flops(s: Setup, task: str) -> dict[str, float]:
    """FLOPs per unit of each phase on the fast path (one counted run of each)."""
    out: dict = {}
    with torch.inference_mode():
        prefill = count_flops(lambda: out.setdefault("session", s.prefill(task)))
        session = out["session"]
        if task == "understand":
            ctx, one = session.decoding_context(1), TextSampling(max_new_tokens=1)
            return {
                "prefill": prefill,
                "decode": count_flops(lambda: list(decode_tokens(s.model, ctx, s.never_stop, one))),
            }
        params = s.sampling(task)
        denoise = count_flops(
            lambda: out.setdefault(
                "latents", generate_latents_batch(s.model, [session] * s.batch, s.size, s.size, params, s.noises())
            )
        )
        vae = count_flops(lambda: s.decode_image(out["latents"][0]))
    return {"prefill": prefill, "denoise_step": denoise / (s.steps - 1), "vae_decode": vae}


# --- the command ---------------------------------------------------------------------


def meta_accounting(config: BagelConfig, size: int, steps: int, prompt_tokens: int) -> dict:
    """FLOPs and bytes of a config that is not run (built on the meta device)."""
    from openbagel.checkpoint import build_model
    from openbagel.inference.denoise import BatchedQuery
    from openbagel.inference.session import FULL, TEXT_FREE

    model = build_model(config)
    special = special_ids(config.llm.vocab_size)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    down = config.latent_downsample
    n = (size // down) ** 2
    session = Session(model, special)
    with torch.inference_mode():
        session.add_text(list(range(prompt_tokens)))
        position_ids = flattened_position_ids(size // down, size // down, config.max_latent_size)
        query = BatchedQuery(model, [session.branch(FULL), session.branch(TEXT_FREE)], position_ids, special)
        x = torch.empty(2, n, config.latent_channels_per_token, device="meta")
        step = count_flops(lambda: query.velocities(x, torch.zeros((), device="meta")))
    kv = session.full.cache.bytes_per_token
    return {
        "weights_bytes_bf16": weights // 2,
        "kv_bytes_per_token_bf16": kv // 2,
        "denoise_step_gflop_two_branches": step / 1e9,
        "latent_tokens": n,
        "decode_bytes_per_token_bf16": understanding_bytes(model) // 2,
    }


def run_bench(
    config: str = "small",
    tasks: tuple[str, ...] = ("t2i",),
    size: int = 256,
    steps: int = 10,
    runs: int = 3,
    batch: int = 1,
    prompt_tokens: int = 32,
    decode_tokens_n: int = 32,
    long_context: int = 9000,
    dtype: str | None = "float32",
    device: str = "cpu",
    model_dir: str | None = None,
    step_cache: StepCacheSettings | None = None,
    json_path: Path | None = None,
    compile: bool = False,
    prompt: str = "a red circle above a blue square",
    log: Callable[[str], None] = print,
    quant: str | None = None,
    offload: str | None = None,
) -> list[Record]:
    """Run the benchmark; returns the records (and writes them to ``json_path`` as a JSON list).

    With ``model_dir``, prompts are ``prompt`` through the checkpoint's
    tokenizer (random token ids otherwise). ``compile`` decodes text on the fast path with the static-shape decoder
    through ``torch.compile`` (compiled during the warm-up run). ``quant``
    (``"llm=int8"``...) and ``offload="layers"`` add the fast path with the
    weights stored that way, against the plain weights (speed, working memory,
    weight bytes on the device, latent error).

    Raises:
        InvalidInputError: unknown config or task, a size the model cannot
            make, a count out of range. (``7b-mot`` on a CPU prints and
            writes its FLOP/byte accounting and returns no records.)
    """
    from openbagel.pipeline import parse_device, parse_dtype
    from openbagel.quantize import QuantSpec

    dev = parse_device(device)
    dt = parse_dtype(dtype) if dtype is not None else None  # None: float32, or as the checkpoint loads
    spec = QuantSpec.parse(quant)
    if offload not in (None, "none", "layers"):
        raise InvalidInputError(f"--offload must be 'layers', got {offload!r}")
    for t in tasks:
        if t not in TASKS:
            raise InvalidInputError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    for name, v, lo, hi in (
        ("steps", steps, 2, 10_000),
        ("runs", runs, 1, 1000),
        ("batch", batch, 1, 64),
        ("prompt tokens", prompt_tokens, 1, 100_000),
        ("decode tokens", decode_tokens_n, 1, 100_000),
        ("long context", long_context, 1, 1_000_000),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise InvalidInputError(f"{name} must be a whole number from {lo} to {hi}, got {v!r}")
    if step_cache is not None and all(step_cache.computes(i) for i in range(steps - 1)):
        log(f"note: with {steps - 1} denoising steps and these --cache settings, the step cache skips no step")
    if model_dir is not None:
        from openbagel.pipeline import BagelPipeline

        pipe = BagelPipeline.from_pretrained(model_dir, dtype=dt, device=dev)
        name, model, vae, cfg, special = Path(model_dir).name, pipe.model, pipe.vae, pipe.config, pipe.tokenizer.special
        dt = model.dtype
        tokenizer = pipe.tokenizer
    else:
        if config not in CONFIGS:
            raise InvalidInputError(f"unknown config {config!r}; choose from {', '.join(CONFIGS)} (or --model DIR)")
        cfg = preset(CONFIGS[config])
        if config == "7b-mot" and dev.type == "cpu":
            acc = meta_accounting(cfg, size, steps, prompt_tokens)
            log(
                f"7b-mot needs {acc['weights_bytes_bf16'] / 2**30:.1f} GiB of bf16 weights: not run on a CPU "
                "(built on the meta device for accounting only; run it on a GPU with benchmarks/gpu.sh)"
            )
            for k, v in acc.items():
                log(f"  {k}: {v:,.2f}" if isinstance(v, float) else f"  {k}: {v:,}")
            if json_path is not None:
                write_json([{"config": config, "task": "accounting", "size": size, **acc}], json_path)
            return []
        name, dt = config, dt or torch.float32
        log(f"building {config} with random weights ({dt}, {dev}) ...")
        model, vae = build_random(cfg, dt, dev)
        special = special_ids(cfg.llm.vocab_size)
        tokenizer = None
    from openbagel.pipeline import check_size

    check_size(cfg, size, size)
    setup = Setup(
        name, model, vae, cfg, special, dev, size, steps, batch, prompt_tokens, decode_tokens_n, long_context,
        step_cache, tokenizer=tokenizer, prompt_text=prompt,
    )  # fmt: skip
    if spec.active or offload == "layers":
        log("building the memory modes ...")
        setup.variants = build_variants(model, dev, spec, offload == "layers")
    if compile:
        from openbagel.inference.static_decode import StaticDecoder

        setup.static = StaticDecoder(model, compile=True, mode="reduce-overhead" if dev.type == "cuda" else None)
    log("measuring the machine ...")
    machine = {
        "matmul_gflops": matmul_gflops(dev, dt),
        "copy_gbps": copy_gbps(dev),
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "dtype": str(dt).removeprefix("torch."),
        "torch": torch.__version__,
        "size": size,
        "steps": steps,
    }
    log(
        f"  matmul {machine['matmul_gflops']:.1f} GFLOP/s, copy {machine['copy_gbps']:.1f} GB/s, {machine['threads']} threads"
    )
    records: list[Record] = []

    def partial(measured: list[Record]) -> None:  # a run cut short still reports
        if json_path is not None:
            write_records(records + measured, json_path)

    for task in tasks:
        records += run_task(setup, task, runs, machine, log, partial)
        partial([])
    log(format_table(records))
    return records


def write_records(records: list[Record], path: Path) -> None:
    write_json([asdict(r) for r in records], path)


def write_json(data: list[dict], path: Path) -> None:
    """``data`` as a JSON list at ``path``, written whole or not at all."""
    from openbagel.fileio import write_atomically

    text = json.dumps(data, indent=1, default=float)
    write_atomically(Path(path), lambda tmp: Path(tmp).write_text(text))


def format_table(records: list[Record]) -> str:
    """The records as a text table: times in ms; memory in MiB, the phase's own working memory
    (peak minus what was in use when it began; the process's whole peak is in the JSON)."""
    head = (
        f"{'config':<8} {'task':<10} {'phase':<30} {'fast ms':>9} {'plain ms':>9} {'speedup':>9} "
        f"{'+MiB':>6} {'plain +MiB':>10}  notes"
    )
    lines = [head, "-" * len(head)]
    over = False
    for r in records:
        notes = []
        if r.compute_fraction is not None:
            notes.append(f"{r.gflops_per_s:.1f} GFLOP/s = {r.compute_fraction:.0%} of matmul")
            over |= r.compute_fraction > 1
        if r.bound_fraction is not None:
            notes.append(
                f"{r.tokens_per_s:.1f} tok/s = {r.bound_fraction:.0%} of the bandwidth bound ({r.bound_tokens_per_s:.1f})"
            )
        if "uncached_median_s" in r.extra:
            notes.append(
                f"vs uncached {r.extra['uncached_median_s'] * 1e3:.1f} ms; latent error "
                f"{r.extra['latent_rel_error']:.2%}, PSNR {r.extra['psnr_db']:.1f} dB"
            )
        if "weights_mb" in r.extra:
            notes.append(
                f"weights {r.extra['weights_mb']:.0f} MiB vs {r.extra['baseline_weights_mb']:.0f}; "
                f"plain weights {r.extra['baseline_median_s'] * 1e3:.1f} ms"
                + (f"; latent error {r.extra['latent_rel_error']:.2%}" if "latent_rel_error" in r.extra else "")
            )
        plain = "" if r.plain_median_s is None else f"{r.plain_median_s * 1e3:9.1f}"
        if r.extra.get("same_code_both_modes"):
            speed = "same code"
        else:
            speed = "" if r.speedup is None else f"{r.speedup:8.2f}x"
        inc = r.extra.get("mem_increase_mb", 0)
        pinc = r.extra.get("plain_mem_increase_mb")
        lines.append(
            f"{r.config[:8]:<8} {r.task:<10} {r.phase:<30} {r.median_s * 1e3:9.1f} {plain:>9} {speed:>9} "
            f"{inc:6.0f} {'' if pinc is None else f'{pinc:10.0f}':>10}  {'; '.join(notes)}"
        )
    if over:
        lines.append("(above 100% of matmul: convolution FLOPs are nominal; fast kernels, e.g. Winograd, do fewer)")
    return "\n".join(lines)
