"""Memory planning before anything is loaded: weights per device, KV cache, activations.

Everything is computed from the checkpoint's config (the model is built on
the meta device, no weights are read): the weights as each quantization mode
stores them (the byte counts of torchao's and bitsandbytes' layouts, see
:mod:`openbagel.quantize`), the KV cache of one session as the engine
allocates it (the contexts of spec section 7, each storage rounded up to
:attr:`~openbagel.kv_cache.CacheBudget.STEP` tokens as a budgeted cache
grows), and an estimate of the largest transient activations.

The activation figures assume a GPU attention kernel that does not
materialise the score matrix (SDPA's flash / memory-efficient kernels); on a
CPU the attention scores add ``heads x queries x keys`` floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from openbagel.config import BagelConfig
from openbagel.errors import InvalidInputError
from openbagel.images import resize_size
from openbagel.kv_cache import CacheBudget, format_bytes
from openbagel.placement import PCIE_BYTES_PER_S, split_evenly
from openbagel.quantize import NF4_BLOCK, NF4_NESTED_BLOCK, QuantSpec, quantized_linears

#: Memory the CUDA runtime takes on each GPU before any tensor (context, cuBLAS workspace; typical figure).
CUDA_RUNTIME_BYTES = 600 * 2**20

TASKS = ("t2i", "edit", "understand")


def linear_weight_bytes(out_features: int, in_features: int, mode: str, dtype: torch.dtype) -> int:
    """Bytes of one linear layer's weight ``[out, in]`` stored as ``mode`` (bias not included).

    The layouts: int8 = int8 data + float32 scale + int8 zero point per row
    (torchao ``Int8Tensor``); fp8 = float8 data + float32 scale per row
    (torchao ``Float8Tensor``); nf4 = two weights per byte, one uint8 absmax
    per 64 weights, one float32 per 256 absmax and the two code books
    (bitsandbytes ``Params4bit`` with double quantization).
    """
    n = out_features * in_features
    if mode == "none":
        return n * dtype.itemsize
    if mode == "int8":
        return n + 5 * out_features
    if mode == "fp8":
        return n + 4 * out_features
    if mode == "nf4":
        blocks = math.ceil(n / NF4_BLOCK)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 * 16 + 4 * 256
    raise InvalidInputError(f"unknown quantization {mode!r}")


def weight_bytes(config: BagelConfig, dtype: torch.dtype, spec: QuantSpec = QuantSpec()) -> dict[str, int]:
    """Bytes of the weights by part: ``layer`` (one decoder layer, all the same), ``layers`` (all of
    them), ``rest`` (embeddings, ViT, heads, connector, tables), ``vae``.

    Matches :func:`openbagel.quantize.part_bytes` of a loaded model (tested).
    """
    from openbagel.checkpoint import build_model
    from openbagel.model.vae import flux_ae_shapes

    model = build_model(config)
    modes = quantized_linears(model, spec)
    elem = dtype.itemsize
    layers = model.language_model.model.layers
    in_layers = {id(p) for p in layers.parameters()}
    per_part = {"layers": 0, "rest": 0}
    linears = {
        id(m.weight): (m, modes.get(name, "none")) for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    for p in model.parameters():
        if id(p) in linears:
            module, mode = linears[id(p)]
            size = linear_weight_bytes(module.out_features, module.in_features, mode, dtype)
        else:
            size = p.numel() * elem
        per_part["layers" if id(p) in in_layers else "rest"] += size
    per_part["rest"] += sum(b.numel() * b.element_size() for b in model.buffers())  # float32 position tables
    vae = sum(math.prod(s) for s in flux_ae_shapes(config.vae).values()) * elem
    return {"layer": per_part["layers"] // len(layers), **per_part, "vae": vae}


@dataclass(frozen=True)
class Workload:
    """The session to budget for.

    Attributes:
        task: ``t2i`` (an image from a prompt), ``edit`` (an image and an
            instruction) or ``understand`` (an image and a question).
        height, width: pixels of the generated image (t2i) or of the input image.
        think: reason in text first, up to ``max_think_tokens`` (default: the model's).
        prompt_tokens: tokens of the prompt text.
        max_new_tokens: reply length (understand).
    """

    task: str = "edit"
    height: int = 1024
    width: int = 1024
    think: bool = False
    max_think_tokens: int | None = None
    prompt_tokens: int = 64
    max_new_tokens: int | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise InvalidInputError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        for name in ("height", "width", "prompt_tokens"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be positive, got {getattr(self, name)}")

    def describe(self, config: BagelConfig) -> str:
        what = {"t2i": "text to image of", "edit": "edit of", "understand": "question about"}[self.task]
        think = f" with thinking ({self._think_tokens(config)} tokens)" if self.think else ""
        return f"{what} a {self.width}x{self.height} image{think}, {self.prompt_tokens}-token prompt"

    def _think_tokens(self, config: BagelConfig) -> int:
        return self.max_think_tokens if self.max_think_tokens is not None else config.text.max_think_tokens


@dataclass
class SessionTokens:
    """Token counts of one session's KV storages and its largest forward."""

    storages: list[int]  # the most tokens each storage holds (full context first)
    largest_forward: int  # tokens of the largest single forward (the denoising query or an image prefill)
    largest_what: str
    image_tokens: int = 0  # VAE latent tokens of the output image (0: no image out)
    image_size: tuple[int, int] = (0, 0)  # output image (width, height)


def session_tokens(config: BagelConfig, w: Workload, system_tokens: int = 0) -> SessionTokens:
    """The tokens each KV storage of the session holds at its fullest (see :mod:`openbagel.inference.session`).

    Args:
        system_tokens: tokens of the system prompt (thinking mode's), 0 without.
    """
    down = config.latent_downsample
    sys_ = system_tokens + 2 if system_tokens else 0  # [BOS] ... [EOS]
    prompt = w.prompt_tokens + 2
    think = w._think_tokens(config) if w.think else 0
    if w.task == "t2i":
        out_w, out_h = w.width, w.height
        ctx = sys_ + prompt
    else:  # the input image: VAE (edit) and ViT tokens
        vw, vh = resize_size(w.width, w.height, config.vit_transform)
        vit = (vw // config.vit.patch_size) * (vh // config.vit.patch_size) + 2
        out_w, out_h = resize_size(w.width, w.height, config.vae_transform)
        vae = (out_w // down) * (out_h // down) + 2 if w.task == "edit" else 0
        ctx = sys_ + vae + vit + prompt
    if w.task == "understand":
        reply = (w.max_new_tokens or config.text.max_new_tokens) + 1
        return SessionTokens([ctx + think + reply], max(vit, prompt), "the ViT image prefill")
    n = (out_w // down) * (out_h // down) + 2  # one branch's query: the latent tokens and two markers
    decoding = ctx + think + 1 if think else 0  # the reasoning decoded after the context
    after_think = ctx + (think + 2 if think else 0)  # then prefilled as text
    if w.task == "t2i" and not think:  # full and text-free (a prefix) read the full storage; image-free == full
        storages, branches = [max(decoding, after_think + 2 * n)], 2
    else:  # the image-free context (the texts, no image, no reasoning) has its own storage
        storages, branches = [max(decoding, after_think + 2 * n), sys_ + prompt + n], 3
    return SessionTokens(
        storages, branches * n, f"the denoising query ({branches} guidance branches)", n - 2, (out_w, out_h)
    )


def kv_bytes_per_token(config: BagelConfig, dtype: torch.dtype) -> int:
    """Key plus value bytes of one token over all layers."""
    llm = config.llm
    return 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * dtype.itemsize


def kv_cache_bytes(config: BagelConfig, dtype: torch.dtype, tokens: SessionTokens) -> int:
    """KV-cache bytes of a session with a budget: each storage rounded up to the growth step."""
    return sum(CacheBudget.rounded(t) for t in tokens.storages) * kv_bytes_per_token(config, dtype)


def activation_bytes(config: BagelConfig, dtype: torch.dtype, tokens: int) -> int:
    """Largest transient memory of one decoder layer over ``tokens`` tokens (an estimate).

    The float32 residual stream (input and output), the normed input, q/k/v and
    the attention output, and the MLP's gate, up and their product.
    """
    llm, e = config.llm, dtype.itemsize
    d, hd = llm.hidden_size, llm.head_dim
    per_token = 2 * 4 * d + d * e + (2 * llm.num_heads + 2 * llm.num_kv_heads) * hd * e + 3 * llm.intermediate_size * e
    return tokens * per_token


def vae_decode_bytes(config: BagelConfig, dtype: torch.dtype, width: int, height: int) -> int:
    """Largest transient memory of decoding a ``width x height`` image (an estimate).

    The last decoder stage works at full resolution with the base channel
    count: about five feature maps of that size are alive at once (block
    input, normalised, convolved, the residual sum, the upsampled input).
    """
    return 5 * config.vae.base_channels * width * height * dtype.itemsize


@dataclass
class Choice:
    """One way to run the model and what it takes per device."""

    name: str
    weights: list[int]  # bytes of weights on each GPU
    host: int = 0  # bytes of weights in CPU memory (offload)
    note: str = ""
    totals: list[int] = field(default_factory=list)


@dataclass
class Plan:
    """What :func:`make_plan` found: the session's needs and each choice's totals."""

    config: BagelConfig
    dtype: torch.dtype
    gpu_bytes: int
    workload: Workload
    tokens: SessionTokens
    kv: int
    activations: int
    vae_decode: int
    choices: list[Choice]

    def fits(self, choice: Choice) -> bool:
        return max(choice.totals) <= self.gpu_bytes

    def table(self) -> str:
        """The plan as text: the session's needs, then one row per choice."""
        c, gib = self.config, format_bytes
        lines = [
            f"model: {c.llm.num_layers} layers, hidden {c.llm.hidden_size}, {str(self.dtype).removeprefix('torch.')}; "
            f"GPU memory {gib(self.gpu_bytes)} per device",
            f"session: {self.workload.describe(c)}",
            f"KV cache: {sum(self.tokens.storages)} tokens in {len(self.tokens.storages)} storage(s), "
            f"{gib(self.kv)} (--kv-cache-budget {math.ceil(self.kv / 2**20)}MiB)",
            f"activations: {gib(self.activations)} at most per layer ({self.tokens.largest_what}, "
            f"{self.tokens.largest_forward} tokens)"
            + (f"; VAE decoding {gib(self.vae_decode)}" if self.vae_decode else ""),
            f"CUDA runtime: about {gib(CUDA_RUNTIME_BYTES)} per GPU",
            "",
            f"{'choice':<26} {'weights per GPU':<28} {'in CPU memory':>14} {'peak per GPU':>14}  fits  note",
        ]
        for ch in self.choices:
            same = len(ch.weights) > 1 and len(set(ch.weights)) == 1
            per_gpu = f"{gib(ch.weights[0])} x {len(ch.weights)}" if same else " + ".join(gib(w) for w in ch.weights)
            host = gib(ch.host) if ch.host else "-"
            fits = "yes" if self.fits(ch) else "no"
            lines.append(f"{ch.name:<26} {per_gpu:<28} {host:>14} {gib(max(ch.totals)):>14}  {fits:<4}  {ch.note}")
        return "\n".join(lines)


def make_plan(
    config: BagelConfig,
    dtype: torch.dtype,
    gpu_bytes: int,
    workload: Workload,
    specs: list[QuantSpec],
    num_devices: int = 1,
    system_tokens: int = 0,
) -> Plan:
    """Weights per device, KV cache, activations and the peak per GPU for each quantization, with and without offload.

    Args:
        config: the checkpoint's config.
        dtype: weights and activations (``torch.bfloat16`` on GPUs).
        gpu_bytes: memory of each GPU.
        workload: the session to budget for.
        specs: the quantizations to plan (each also with ``--offload layers`` when on one device).
        num_devices: GPUs to split the decoder layers across.
        system_tokens: tokens of the thinking system prompt (counted with the tokenizer by the caller).
    """
    if num_devices < 1:
        raise InvalidInputError(f"the number of devices must be at least 1, got {num_devices}")
    tokens = session_tokens(config, workload, system_tokens if workload.think else 0)
    kv = kv_cache_bytes(config, dtype, tokens)
    act = activation_bytes(config, dtype, tokens.largest_forward)
    vae_dec = vae_decode_bytes(config, dtype, *tokens.image_size) if tokens.image_tokens else 0
    work = max(act, vae_dec)
    n = config.llm.num_layers
    choices = []
    for spec in specs:
        w = weight_bytes(config, dtype, spec)
        label = "bf16" if not spec.active else str(spec)
        label = label if dtype == torch.bfloat16 or spec.active else str(dtype).removeprefix("torch.")
        split = split_evenly(n, num_devices)
        per_dev = [w["layer"] * split.count(d) for d in range(num_devices)]
        per_dev[0] += w["rest"] + w["vae"]
        kv_dev = [kv * split.count(d) // n for d in range(num_devices)]  # each layer's cache lives with it
        totals = [pd + kd + work + CUDA_RUNTIME_BYTES for pd, kd in zip(per_dev, kv_dev)]
        note = f"layers split {'/'.join(str(split.count(d)) for d in range(num_devices))}" if num_devices > 1 else ""
        choices.append(Choice(label, per_dev, 0, note, totals))
        if num_devices > 1:  # --parallel branches: a whole copy per GPU (the KV figure: at most the session's)
            whole = w["layers"] + w["rest"] + w["vae"]
            note = "a whole copy per GPU, guidance branches side by side (--parallel branches)"
            choices.append(
                Choice(
                    f"{label} (branches)",
                    [whole] * num_devices,
                    0,
                    note,
                    [whole + kv + work + CUDA_RUNTIME_BYTES] * num_devices,
                )
            )
        if num_devices == 1:
            resident = w["rest"] + w["vae"] + 2 * w["layer"]
            seconds = w["layers"] / PCIE_BYTES_PER_S
            note = f"copies {format_bytes(w['layers'])} per forward: >= {seconds:.2f} s each at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s"
            choices.append(
                Choice(f"{label} + offload", [resident], w["layers"], note, [resident + kv + work + CUDA_RUNTIME_BYTES])
            )
    return Plan(config, dtype, gpu_bytes, workload, tokens, kv, act, vae_dec, choices)
