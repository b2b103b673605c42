"""Weight-only quantization, applied from outside the model (module surgery).

After loading and before the weights move to their device, the linear
layers of the chosen parts are replaced, one decoder layer at a time, by
quantized ones; the norms, the embeddings, the small input/output modules
(time embedder, position tables, ``vae2llm``/``llm2vae``, connector) and,
unless asked, the LM head keep their dtype. Activations stay in the model's
dtype: only the stored weights shrink.

Modes and the library behind each (what runs on both CPU and CUDA, with the
layout users know):

* ``int8``: per-output-channel int8 weights (torchao ``Int8WeightOnlyConfig``;
  1 byte per weight plus a float32 scale and an int8 zero point per row).
  torchao's tensor subclass runs everywhere and dequantizes inside the matmul.
* ``nf4``: 4-bit NormalFloat in blocks of 64 with double-quantized block
  scales (bitsandbytes ``Linear4bit``, QLoRA's format and the reference's
  NF4 mode; about 0.53 byte per weight). bitsandbytes has the fused CUDA
  kernels and a CPU backend; torchao's int4 needs an extra kernel package on
  this build and its NF4 tensor is meant for training.
* ``fp8``: float8 e4m3 weights with a float32 scale per row (torchao
  ``Float8WeightOnlyConfig``); storage halves on any device, the fast path
  needs a GPU with float8 support (compute capability 8.9 or newer).

A quantized model is saved with :func:`save_quantized` (a checkpoint folder
whose ``quantization.json`` names the modes and whose weights are in
``model.quantized.safetensors``) and loaded back by
:func:`openbagel.checkpoint.load_model` without quantizing again.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from openbagel.errors import CheckpointError, InvalidInputError
from openbagel.fileio import remove_stale, set_umask_mode
from openbagel.quiet import quiet_imports
from openbagel.weights import check_finite

#: What each part may be stored as.
MODES = ("none", "int8", "nf4", "fp8")
QUANT_FILE = "quantization.json"
QUANT_WEIGHTS = "model.quantized.safetensors"
NF4_BLOCK = 64  # weights per absmax (bitsandbytes' default)
NF4_NESTED_BLOCK = 256  # absmax values per second-level scale (double quantization)


@dataclass(frozen=True)
class QuantSpec:
    """How each part of the model stores its weights.

    Attributes:
        llm: the decoder layers' projections and MLPs (both experts): most of the bytes.
        vit: the SigLIP encoder layers' projections and MLPs.
        head: the LM head (``[vocab, D]``; quality of the text suffers first).
        vae: the autoencoder (convolutional): ``none`` only.
    """

    llm: str = "none"
    vit: str = "none"
    head: str = "none"
    vae: str = "none"

    def __post_init__(self):
        for f in fields(self):
            mode = getattr(self, f.name)
            if mode not in MODES:
                raise InvalidInputError(f"unknown quantization {mode!r} for {f.name}; choose one of {', '.join(MODES)}")
        if self.vae != "none":
            raise InvalidInputError(
                "the VAE cannot be quantized: it is convolutional and small (about 160 MB in bfloat16); use vae=none"
            )

    @classmethod
    def parse(cls, text: str | None) -> QuantSpec:
        """``"llm=int8,vit=none"`` (parts not named stay ``none``), or one mode for the LLM: ``"nf4"``.

        Raises:
            InvalidInputError: an unknown part or mode, or a malformed entry.
        """
        if text is None or not str(text).strip():
            return cls()
        text = str(text).strip().lower()
        if "=" not in text:
            return cls(llm=text)
        parts, names = {}, [f.name for f in fields(cls)]
        for item in text.split(","):
            key, sep, mode = (s.strip() for s in item.partition("="))
            if not sep or key not in names:
                raise InvalidInputError(
                    f"bad quantization entry {item.strip()!r}: write PART=MODE with PART one of {', '.join(names)} "
                    f"and MODE one of {', '.join(MODES)}, for example llm=int8,vit=none"
                )
            if key in parts:
                raise InvalidInputError(f"quantization of {key} given twice in {text!r}")
            parts[key] = mode
        return cls(**parts)

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) != "none" for f in fields(self))

    def __str__(self) -> str:
        named = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) != "none"]
        return ",".join(named) or "none"


# --- which modules ------------------------------------------------------------------


def _groups(model: nn.Module, part: str) -> Iterator[tuple[str, nn.Module]]:
    """The modules quantized together for ``part``: one decoder/encoder layer at a time, or the head."""
    if part == "llm":
        for i, layer in enumerate(model.language_model.model.layers):
            yield f"language_model.model.layers.{i}", layer
    elif part == "vit":
        for i, layer in enumerate(model.vit_model.vision_model.encoder.layers):
            yield f"vit_model.vision_model.encoder.layers.{i}", layer
    elif part == "head":
        yield "language_model", model.language_model  # only its lm_head is linear outside the layers


def quantized_linears(model: nn.Module, spec: QuantSpec) -> dict[str, str]:
    """``{qualified name of a linear layer: mode}`` for every linear the spec quantizes."""
    out = {}
    for part in ("llm", "vit", "head"):
        mode = getattr(spec, part)
        if mode == "none":
            continue
        for prefix, group in _groups(model, part):
            for name, mod in group.named_modules():
                if part == "head" and name != "lm_head":
                    continue
                if isinstance(mod, nn.Linear) or _is_nf4(mod):
                    out[f"{prefix}.{name}"] = mode
    return out


def _is_nf4(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


# --- the libraries, imported when used ---------------------------------------------


SAFETENSORS_SUPPORT = "torchao.prototype.safetensors.safetensors_support"


def _library(module: str, package: str, what: str):
    """``module`` of an optional ``package``, imported quietly (``what`` names the need in the error).

    Raises:
        InvalidInputError: the package is not installed.
    """
    try:
        with quiet_imports():
            return importlib.import_module(module)
    except ImportError as e:
        raise InvalidInputError(
            f"{what} needs {package}: pip install -e '.[quant]' (or pip install {package}) ({e})"
        ) from None


def _torchao(what: str, module: str = "torchao.quantization"):
    """torchao's ``module`` (see :func:`_library`)."""
    return _library(module, "torchao", what)


def _torchao_config(mode: str):
    """torchao's weight-only config for ``int8`` or ``fp8``."""
    q = _torchao(f"{mode} quantization")
    return q.Int8WeightOnlyConfig() if mode == "int8" else q.Float8WeightOnlyConfig()


def _bnb():
    """bitsandbytes (see :func:`_library`)."""
    return _library("bitsandbytes", "bitsandbytes", "nf4 quantization")


def _nf4_linear(lin: nn.Linear, weight, dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``weight`` (a quantized ``Params4bit``) and ``lin``'s bias,
    computing in ``dtype``."""
    bnb = _bnb()
    new = bnb.nn.Linear4bit(
        lin.in_features,
        lin.out_features,
        bias=lin.bias is not None,
        compute_dtype=dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    new.train(lin.training)  # bitsandbytes picks its CPU kernel by mode
    new.weight = weight
    weight.module = new
    new.quant_state = weight.quant_state
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.detach().to(weight.device, dtype), requires_grad=False)
    return new


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


# --- quantizing ------------------------------------------------------------------------


@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec, device: torch.device | str = "cpu") -> nn.Module:
    """Quantize the linear layers ``spec`` names, in place, moving each group to ``device`` first.

    One linear layer at a time is moved to ``device`` and quantized there, so
    the device never holds more than one of them in the original dtype. The
    rest of the model stays where it is (move it afterwards).

    Args:
        model: a loaded :class:`~openbagel.model.bagel.Bagel` (float32 or bfloat16 weights).
        spec: the modes per part.
        device: where the quantized layers go.
    Returns:
        ``model``.
    Raises:
        InvalidInputError: the library a mode needs is missing, or the device cannot run it.
    """
    configs = {}
    for name, mode in quantized_linears(model, spec).items():
        lin = model.get_submodule(name)
        lin.to(device)
        try:
            if mode in ("int8", "fp8"):
                configs.setdefault(mode, _torchao_config(mode))
                _quantize_torchao(lin, configs[mode])
            else:
                _check_nf4_shape(name, lin, device)
                w = _bnb().nn.Params4bit(
                    lin.weight.detach(), requires_grad=False, quant_type="nf4", compress_statistics=True
                )
                _replace(model, name, _nf4_linear(lin, w.to(device), lin.weight.dtype))
        except (RuntimeError, NotImplementedError, AssertionError) as e:
            raise InvalidInputError(f"{mode} quantization is not supported on {device}: {e}") from None
    return model


def _check_nf4_shape(name: str, lin: nn.Linear, device: torch.device | str) -> None:
    # bitsandbytes' CPU kernel repacks the weight in blocks of 32 output rows and 64 inputs
    if torch.device(device).type == "cpu" and (lin.out_features % 32 or lin.in_features % 64):
        raise InvalidInputError(
            f"nf4 on the CPU needs output sizes that are multiples of 32 and input sizes that are multiples of 64; "
            f"{name} is {lin.in_features} -> {lin.out_features} (quantize this part with int8 or leave it as it is)"
        )


def _quantize_torchao(lin: nn.Linear, config) -> None:
    from torchao.quantization import quantize_

    holder = nn.Module()  # quantize_ replaces children; give the linear a parent
    holder.lin = lin
    quantize_(holder, config)


# --- memory ----------------------------------------------------------------------------


def inner_tensors(t: Tensor) -> list[Tensor]:
    """The plain tensors a (possibly quantized) weight is stored in: itself, torchao's inner
    tensors, or bitsandbytes' packed data and quantization state."""
    qs = getattr(t, "quant_state", None)
    if qs is not None:  # bitsandbytes Params4bit
        inner = [t.data, qs.absmax, qs.code]
        if qs.nested:
            inner += [qs.state2.absmax, qs.state2.code]
        return inner
    if hasattr(t, "__tensor_flatten__") and type(t) is not nn.Parameter and type(t) is not Tensor:
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in inner_tensors(getattr(t, n))]
    return [t]


def tensor_bytes(t: Tensor) -> int:
    """Bytes a (possibly quantized) weight occupies: packed data plus scales."""
    return sum(x.numel() * x.element_size() for x in inner_tensors(t))


def module_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (each storage once; quantized ones as stored)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def part_bytes(model: nn.Module) -> dict[str, int]:
    """Weight bytes per part: ``llm`` (decoder layers), ``vit`` (encoder layers), ``head``, ``other`` (the rest)."""
    llm = sum(module_bytes(g) for _, g in _groups(model, "llm"))
    vit = sum(module_bytes(g) for _, g in _groups(model, "vit"))
    head = module_bytes(model.language_model.lm_head)
    return {"llm": llm, "vit": vit, "head": head, "other": module_bytes(model) - llm - vit - head}


# --- saving and loading ------------------------------------------------------------------


def save_quantized(model: nn.Module, spec: QuantSpec, source: str | Path, out: str | Path) -> Path:
    """Write a quantized checkpoint folder: ``source``'s configs, tokenizer and VAE, the quantized weights.

    Args:
        model: the model after :func:`quantize_model` with ``spec``.
        source: the checkpoint folder it was loaded from.
        out: the new folder (absent or empty; written whole or not at all: it is
            written as ``.NAME.partial-PID`` beside it, then renamed; such folders
            left by killed runs are removed first, see :func:`remove_stale_partials`).
    Returns:
        The folder.
    Raises:
        InvalidInputError: ``out`` is a file or a non-empty folder, or ``spec`` quantizes nothing.

    Saving runs ``model.state_dict()``: on a CPU, bitsandbytes then undoes the
    repacking its kernel made for nf4 weights (outputs may move by a rounding step).
    """
    from safetensors.torch import save_file

    if not spec.active:
        raise InvalidInputError("nothing to save: the quantization spec quantizes no part (for example llm=int8)")
    source, out = Path(source), Path(out)
    check_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = partial_folder(out)  # renamed to out when complete
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()  # permissions follow the umask
    try:
        for f in sorted(source.iterdir()):
            if f.is_file() and f.name not in ("ema.safetensors", QUANT_FILE, QUANT_WEIGHTS):
                shutil.copy2(f, tmp / f.name)
        sd = {k: v.contiguous() if type(v) is Tensor else v for k, v in model.state_dict().items()}
        tensors, metadata = _flatten(sd)
        save_file(tensors, str(tmp / QUANT_WEIGHTS), metadata=metadata)
        set_umask_mode(tmp / QUANT_WEIGHTS)  # save_file makes it 0o600
        info = {"format": 1, "quantization": str(spec), "dtype": str(model.dtype).removeprefix("torch.")}
        (tmp / QUANT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def partial_folder(out: Path) -> Path:
    """Where :func:`save_quantized` writes ``out`` before renaming it: ``.NAME.partial-PID`` beside it."""
    return out.parent / f"{_partial_prefix(out)}{os.getpid()}"


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the ``.NAME.partial-PID`` folders that killed runs of :func:`save_quantized`
    left beside ``out`` (only those of ``out``, only those whose process is gone).

    Returns:
        The folders removed.
    """
    return remove_stale(out.parent, re.escape(_partial_prefix(out)) + r"(?P<pid>\d+)", dirs=True)


def check_new_folder(out: Path) -> None:
    """Raise unless ``out`` can become a new checkpoint folder (absent, or an empty folder).

    Raises:
        InvalidInputError: ``out`` is a file or a folder that holds something.
    """
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} is a file; give a folder to write the quantized checkpoint into")
    if out.is_dir() and any(out.iterdir()):
        raise InvalidInputError(f"{out} is not empty; choose a new folder for the quantized checkpoint")


def _flatten(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """torchao's tensor subclasses as plain tensors plus JSON metadata (its safetensors support)."""
    return _torchao("saving a quantized model", SAFETENSORS_SUPPORT).flatten_tensor_state_dict(sd)


def read_quant_info(folder: Path) -> tuple[QuantSpec, torch.dtype] | None:
    """The spec and weight dtype of a quantized checkpoint folder (None: not quantized).

    Raises:
        CheckpointError: an unreadable ``quantization.json``.
    """
    file = folder / QUANT_FILE
    if not file.exists():
        return None
    try:
        info = json.loads(file.read_text())
        return QuantSpec.parse(info["quantization"]), getattr(torch, info["dtype"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{file}: not a valid quantization record ({e})") from None


def check_quantized_folder(
    folder: Path, spec: QuantSpec | None, dtype: torch.dtype | None
) -> tuple[QuantSpec, torch.dtype] | None:
    """What a quantized checkpoint folder holds, checked against what was asked (None: not quantized).

    Args:
        spec: the quantization asked for (None: none asked).
        dtype: the dtype asked for (None: the folder's).
    Raises:
        InvalidInputError: the folder holds another quantization or dtype.
        CheckpointError: an unreadable ``quantization.json``.
    """
    stored = read_quant_info(folder)
    if stored is None:
        return None
    held, held_dtype = stored
    if spec is not None and spec != held:
        raise InvalidInputError(
            f"{folder} holds a model quantized as {held}; drop the quantization option "
            "or quantize the original checkpoint instead"
        )
    if dtype is not None and dtype != held_dtype:
        name = str(held_dtype).removeprefix("torch.")
        raise InvalidInputError(f"{folder} was quantized in {name}; load it with --dtype {name}")
    return stored


@torch.no_grad()
def load_quantized(folder: Path, model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Load a folder written by :func:`save_quantized` into ``model``, strictly
    (:func:`openbagel.checkpoint.load_model` calls this for a quantized folder).

    Args:
        model: BAGEL built on the meta device with the folder's config
            (:func:`openbagel.checkpoint.build_model`); its linears are replaced here.
    Raises:
        CheckpointError: missing/corrupt files, or tensors that do not fit the spec.
    """
    from safetensors import SafetensorError, safe_open

    spec, dtype = read_quant_info(folder)
    file = folder / QUANT_WEIGHTS
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read the quantized weights ({e})") from None
    check_finite(tensors, file)  # the floating ones: scales and unquantized weights
    unflatten = _torchao("loading a quantized folder", SAFETENSORS_SUPPORT).unflatten_tensor_state_dict
    try:
        sd, leftover = unflatten(tensors, metadata)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: the quantized weights' metadata does not match ({e})") from None
    sd.update(leftover)
    nf4 = [name for name, mode in quantized_linears(model, spec).items() if mode == "nf4"]
    for name in nf4:
        lin = model.get_submodule(name)
        stats = {k.removeprefix(name + ".weight."): sd.pop(k) for k in list(sd) if k.startswith(name + ".weight.")}
        if name + ".weight" not in sd or not stats:
            raise CheckpointError(f"{file}: no nf4 weight for {name!r}; the file does not match {QUANT_FILE}")
        weight = _bnb().nn.Params4bit.from_prequantized(sd.pop(name + ".weight"), stats, device=device)
        if lin.bias is not None:
            lin.bias = nn.Parameter(sd.pop(name + ".bias"))
        _replace(model, name, _nf4_linear(lin, weight, dtype))
    sd = {k: v.to(device) for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.startswith(tuple(f"{n}." for n in nf4))]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{file}: tensors do not fit the model (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    model.reset_position_tables()
    return model.requires_grad_(False).eval()
