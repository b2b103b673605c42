"""Where the decoder layers live and run: one device, split across several, or offloaded.

Applied from outside the model, after loading (and quantizing): forward
hooks move what a layer receives to the device it runs on, so the model code
stays device-agnostic. The small modules that touch the inputs and outputs
(embeddings, time embedder, position tables, ``vae2llm``/``llm2vae``, the
connector, the ViT, the final norms and the LM head) live on the first device.

* :func:`place_layers`: contiguous blocks of decoder layers on each device
  (pipeline placement; one request runs through the devices in turn).
* :class:`LayerOffload`: every decoder layer's weights stay in (pinned) CPU
  memory; each is copied to the device just before it runs and the next one
  is copied meanwhile on a side stream (prefetch one layer ahead); a layer's
  device copy is dropped when it is done.

The KV cache keeps each layer's keys on the device that layer runs on
(:func:`layer_devices`).
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from openbagel.errors import InvalidInputError
from openbagel.model.attention import AttnMask


@dataclass
class _Placed:
    """How a model's layers were placed."""

    devices: list[torch.device]  # the compute device of each decoder layer (read by the KV cache)
    summary: str  # a line saying where things live
    offload: LayerOffload | None = None


_PLACED: weakref.WeakKeyDictionary[nn.Module, _Placed] = weakref.WeakKeyDictionary()

#: Host-to-device copy speed assumed by the estimates (PCIe 4.0 x16, pinned memory, bytes/s).
PCIE_BYTES_PER_S = 25e9


def layer_devices(model: nn.Module) -> list[torch.device]:
    """The device each decoder layer of ``model`` runs on (one entry per layer)."""
    placed = _PLACED.get(model)
    if placed is not None:
        return placed.devices
    return [model.vae2llm.weight.device] * len(model.language_model.model.layers)


#: Of each model replicated for parallel guidance branches: the model itself, then its copies.
_REPLICAS: weakref.WeakKeyDictionary[nn.Module, list[nn.Module]] = weakref.WeakKeyDictionary()


def describe_placement(model: nn.Module) -> str | None:
    """A line saying where the layers live (None: all on one device, nothing to say)."""
    placed = _PLACED.get(model)
    if placed is not None:
        return placed.summary
    replicas = _REPLICAS.get(model)
    if replicas is None:
        return None
    devices = ", ".join(str(r.vae2llm.weight.device) for r in replicas)
    return (
        f"placement: a whole copy of the model on each of {devices}; the guidance branches of a step run side by side"
    )


def branch_replicas(model: nn.Module) -> list[nn.Module]:
    """The copies of ``model`` that guidance branches are spread over (just ``[model]`` unless replicated)."""
    return _REPLICAS.get(model, [model])


def replicate_for_branches(model: nn.Module, devices: list[torch.device]) -> list[nn.Module]:
    """A whole copy of ``model`` on each device (the first is ``model`` itself), for parallel guidance branches.

    Each device must hold the whole model (quantize it if needed: ``openbagel
    plan``). The guidance branches of a denoising step are then spread over the
    copies and run side by side (:class:`~openbagel.inference.denoise.ParallelQuery`);
    everything else runs on the first device.

    Raises:
        InvalidInputError: the model is placed or replicated already.
    """
    _check_unplaced(model)
    replicas = [model.to(devices[0])]
    for device in devices[1:]:
        replicas.append(copy.deepcopy(model).to(device))
    _REPLICAS[model] = replicas
    return replicas


def offload_of(model: nn.Module) -> LayerOffload | None:
    """The :class:`LayerOffload` applied to ``model`` (None: its layers are not offloaded)."""
    placed = _PLACED.get(model)
    return None if placed is None else placed.offload


def is_placed(model: nn.Module) -> bool:
    """Whether :func:`place_layers` or :class:`LayerOffload` was applied to ``model`` (its layers are not all
    resident on one device)."""
    return model in _PLACED


def _check_unplaced(model: nn.Module) -> None:
    if is_placed(model) or model in _REPLICAS:
        raise InvalidInputError("the model is placed already; load it again to place it differently")


def _move(obj, device: torch.device):
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, AttnMask) and isinstance(obj.mask, Tensor):
        return AttnMask(obj.kind, obj.mask.to(device, non_blocking=True))
    return obj


def _inputs_to(device: torch.device):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return tuple(_move(a, device) for a in args)

    return hook


def _move_all_but_layers(model: nn.Module, device: torch.device) -> None:
    decoder = model.language_model.model
    layers = decoder.layers
    decoder.layers = nn.ModuleList()
    try:
        model.to(device)
    finally:
        decoder.layers = layers


def split_evenly(num_layers: int, num_devices: int) -> list[int]:
    """Device index of each layer: contiguous blocks, sizes differing by at most one (earlier blocks larger)."""
    counts = [num_layers // num_devices + (i < num_layers % num_devices) for i in range(num_devices)]
    return [d for d, c in enumerate(counts) for _ in range(c)]


def place_layers(model: nn.Module, devices: list[torch.device], assignment: list[int] | None = None) -> list[int]:
    """Put the decoder layers on ``devices`` in contiguous blocks, everything else on ``devices[0]``.

    Args:
        model: a loaded :class:`~openbagel.model.bagel.Bagel` (possibly quantized), on the CPU.
        devices: at least one device.
        assignment: device index of each layer (default :func:`split_evenly`).
    Returns:
        The assignment used.
    Raises:
        InvalidInputError: the model is placed already, or an assignment of the wrong length.
    """
    layers = model.language_model.model.layers
    _check_unplaced(model)
    assignment = split_evenly(len(layers), len(devices)) if assignment is None else list(assignment)
    if len(assignment) != len(layers) or any(not 0 <= a < len(devices) for a in assignment):
        raise InvalidInputError(
            f"a placement needs one device index in 0..{len(devices) - 1} per layer ({len(layers)})"
        )
    main = devices[0]
    _move_all_but_layers(model, main)
    for layer, a in zip(layers, assignment):
        layer.to(devices[a])
        layer.register_forward_pre_hook(_inputs_to(devices[a]))
    decoder = model.language_model.model
    for norm in (decoder.norm, decoder.norm_moe_gen):
        norm.register_forward_pre_hook(_inputs_to(main))
    _PLACED[model] = _Placed([devices[a] for a in assignment], _describe_split(layers, devices, assignment))
    return assignment


def _describe_split(layers: nn.ModuleList, devices: list[torch.device], assignment: list[int]) -> str:
    from openbagel.kv_cache import format_bytes
    from openbagel.quantize import module_bytes

    blocks = []
    for d, device in enumerate(devices):
        idx = [i for i, a in enumerate(assignment) if a == d]
        if idx:
            size = format_bytes(sum(module_bytes(layers[i]) for i in idx))
            blocks.append(f"layers {idx[0]}-{idx[-1]} on {device} ({size})")
    return f"placement: {', '.join(blocks)}; embeddings, ViT, heads and VAE on {devices[0]}"


# --- offload ------------------------------------------------------------------------


@dataclass
class _Stored:
    """One parameter or buffer of an offloaded layer: where it sits in the module, and its host copy."""

    module: nn.Module
    name: str
    is_param: bool
    host: Tensor

    @property
    def slots(self) -> dict[str, Tensor | None]:
        """The module's dict the tensor lives in (``_parameters`` or ``_buffers``)."""
        return self.module._parameters if self.is_param else self.module._buffers


class LayerOffload:
    """Decoder layers in host memory, each copied to ``device`` just before it runs, the next one prefetched.

    While layer ``i`` runs, layer ``i + 1`` (after the last: layer 0, for the
    next forward) is being copied on a side CUDA stream, so at most two
    layers are on the device at once. Everything else goes to ``device``. On
    a CPU "device" the copies are synchronous (same numbers, nothing saved):
    the placement logic and the order of the copies are what it shows.

    One forward of the decoder runs at a time (a lock: the swapped weights are
    shared state); a forward that raises puts every layer's host copy back.

    Args:
        model: a loaded :class:`~openbagel.model.bagel.Bagel` (possibly quantized), on the CPU.
        device: where the layers run.
    Attributes:
        log: ``("load", i)`` when layer ``i``'s copy starts, ``("free", i)`` when it is dropped (in order).
        layer_bytes: bytes of the offloaded layers (each copied once per forward).
    Raises:
        InvalidInputError: the model is placed already.
    """

    def __init__(self, model: nn.Module, device: torch.device | str):
        from openbagel.quantize import module_bytes

        _check_unplaced(model)
        self.device = device = torch.device(device)
        self.layers = layers = model.language_model.model.layers
        _move_all_but_layers(model, device)
        pin = device.type == "cuda"
        self.stored: list[list[_Stored]] = []
        for layer in layers:
            layer.to("cpu")
            entries = []
            for module in layer.modules():
                for store, is_param in ((module._parameters, True), (module._buffers, False)):
                    for name, t in store.items():
                        if t is None:
                            continue
                        if pin and _plain(t):  # quantized tensors are copied unpinned
                            t.data = t.data.pin_memory()
                        entries.append(_Stored(module, name, is_param, t))
            self.stored.append(entries)
        self.layer_bytes = sum(module_bytes(layer) for layer in layers)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending: dict[int, tuple[list[Tensor], torch.cuda.Event | None]] = {}
        self.log: list[tuple[str, int]] = []
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._before(i))
            layer.register_forward_hook(self._after(i))
        self.lock = threading.Lock()
        decoder = model.language_model.model
        decoder.register_forward_pre_hook(self._start_of_forward)
        decoder.register_forward_hook(self._end_of_forward, always_call=True)
        _PLACED[model] = _Placed([device] * len(layers), self.summary(), self)

    def _load(self, i: int) -> None:
        """Start copying layer ``i`` to the device (on the side stream)."""
        if i in self.pending:
            return
        self.log.append(("load", i))
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with ctx:
            copies = [_copy_to(e.host, self.device) for e in self.stored[i]]
            event = torch.cuda.Event() if self.stream is not None else None
            if event is not None:
                event.record(self.stream)
        self.pending[i] = (copies, event)

    def _before(self, i: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            self._load(i)
            copies, event = self.pending[i]
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for c in copies:  # made on the side stream, used on this one
                    _record_stream(c, current)
            for e, c in zip(self.stored[i], copies):
                e.slots[e.name] = c
            self._load((i + 1) % len(self.layers))  # prefetch while this layer runs
            return tuple(_move(a, self.device) for a in args)

        return hook

    def _after(self, i: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            for e in self.stored[i]:
                e.slots[e.name] = e.host
            del self.pending[i]
            self.log.append(("free", i))

        return hook

    def _start_of_forward(self, module: nn.Module, args: tuple) -> None:
        self.lock.acquire()

    def _end_of_forward(self, module: nn.Module, args: tuple, output) -> None:
        try:
            for i in [i for i in self.pending if self._swapped_in(i)]:  # a forward that raised midway
                self._after(i)(module, args, output)
        finally:
            self.lock.release()

    def _swapped_in(self, i: int) -> bool:
        e = self.stored[i][0]
        return e.slots[e.name] is not e.host

    def summary(self) -> str:
        """Where the layers live and the copy time each forward pays (at :data:`PCIE_BYTES_PER_S`)."""
        from openbagel.kv_cache import format_bytes

        n = len(self.layers)
        per_layer = self.layer_bytes / max(n, 1)
        if self.device.type == "cpu":
            return f"offload: the device is the CPU, where the {n} decoder layers already are: nothing is saved"
        return (
            f"offload: {n} decoder layers ({format_bytes(self.layer_bytes)}) in "
            f"{'pinned ' if self.stream is not None else ''}CPU memory, at most 2 on {self.device} at a time "
            f"({format_bytes(2 * per_layer)}); every forward copies all of them: at least "
            f"{self.layer_bytes / PCIE_BYTES_PER_S:.2f} s per forward (a prefill, a denoising step, a decoded token) "
            f"at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s"
        )


def _plain(t: Tensor) -> bool:
    """A tensor or parameter of plain data (not torchao's or bitsandbytes' quantized kinds)."""
    return type(t) in (Tensor, nn.Parameter) and type(t.data) is Tensor


def _copy_to(t: Tensor, device: torch.device) -> Tensor:
    if _plain(t):
        return t.detach().to(device, non_blocking=True, copy=True)
    if t.device == device:  # a quantized tensor already there: itself (bitsandbytes repacks it in place on CPU)
        return t
    return t.to(device)  # a quantized tensor: its own copy (blocking)


def _record_stream(t: Tensor, stream) -> None:
    from openbagel.quantize import inner_tensors

    for x in inner_tensors(t):
        x.record_stream(stream)
