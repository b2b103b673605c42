"""Optimisation around :func:`~openbagel.train.step.compute_losses`:
initialisation, freezing, AdamW with warm-up and a constant or cosine
schedule, gradient accumulation, clipping, and an optional EMA copy.

Parallelism (FSDP2 / DDP) is applied to the model from outside; this module
only needs ``model.parameters()`` and a way to sum token counts over ranks.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from openbagel.config import BagelConfig
from openbagel.model.bagel import Bagel
from openbagel.model.layers import RMSNorm
from openbagel.model.vae import BagelVAE
from openbagel.train.packing import PackedBatch
from openbagel.train.step import compute_losses

log = logging.getLogger(__name__)

FreezePart = Literal["llm", "vit", "und"]


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule and loss settings of a run.

    Attributes:
        lr: peak learning rate, reached after ``warmup_steps``.
        schedule: ``constant`` after warm-up, or ``cosine`` decay to ``min_lr`` at ``max_steps``.
        grad_clip: max global gradient norm (0 = no clipping).
        ema_decay: keep an EMA copy of the trained weights (None = off).
        timestep_shift: training shift of the flow times (1.0 = none).
    """

    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 1000
    schedule: Literal["constant", "cosine"] = "constant"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float | None = None
    timestep_shift: float = 1.0
    ce_weight: float = 1.0
    mse_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not self.lr > 0 or self.max_steps < 1 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0, max_steps >= 1 and warmup_steps >= 0")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if min(self.min_lr, self.grad_clip, self.weight_decay, self.ce_weight, self.mse_weight) < 0:
            raise ValueError("min_lr, grad_clip, weight_decay, ce_weight and mse_weight must be >= 0")
        if not self.timestep_shift > 0 or not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ValueError("timestep_shift must be > 0 and betas two numbers in [0, 1)")


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then constant or cosine."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# --- initialisation ------------------------------------------------------------


#: Standard deviation of the ViT's learned position table at initialisation
#: (its patch embedding starts at about the pixels' scale, 0.6-0.9 per channel).
VIT_POSITION_STD = 0.3


@torch.no_grad()
def init_weights(model: Bagel, std: float = 0.02, seed: int = 0) -> Bagel:
    """Random initialisation for training from scratch: linear and embedding
    weights ``N(0, std)``, biases 0, norm scales 1; then the generation
    expert becomes a copy of the understanding expert (as the paper does).

    The projections that bring image content and timesteps into the model
    (ViT patch embedding, connector, ``vae2llm``, timestep embedder) start at
    ``N(0, 1/fan_in)`` instead, so their outputs are about as large as their
    inputs: their sum with the fixed sin-cos position table (norm
    ``sqrt(hidden/2)``, 8 at hidden 128) then carries the content. At
    ``N(0, 0.02)`` a 128-wide model's ViT content started at 3% of the
    table's norm (latents 23%); a shapes model trained 3,000 steps on
    questions alone then named colours of 10 of 44 shapes and 8 of 48
    shapes, against 15 and 18 with this scale. The ViT's learned position
    table starts at ``N(0, VIT_POSITION_STD)``.
    """
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) * std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
    embeddings = model.vit_model.vision_model.embeddings
    connector, time = model.connector, model.time_embedder.mlp
    for linear in (embeddings.patch_embedding, connector.fc1, connector.fc2, model.vae2llm, time[0], time[2]):
        fan_in = linear.weight.shape[1]
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) / math.sqrt(fan_in))
    embeddings.position_embedding.weight.copy_(
        torch.randn(embeddings.position_embedding.weight.shape, generator=g) * VIT_POSITION_STD
    )
    copy_understanding_to_generation(model)
    return model


@torch.no_grad()
def copy_understanding_to_generation(model: Bagel) -> None:
    """Set every ``*_moe_gen`` weight to its understanding twin."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        if "_moe_gen" in name:
            p.copy_(params[name.replace("_moe_gen", "")])


def freeze(model: Bagel, parts: Sequence[FreezePart]) -> None:
    """Stop training parts of the model: ``llm`` (the whole language model),
    ``vit`` (vision tower and connector), ``und`` (the understanding expert of
    every layer, its norms and the text embeddings/head). The VAE is never trained.

    Raises:
        ValueError: an unknown part name.
    """
    unknown = set(parts) - {"llm", "vit", "und"}
    if unknown:
        raise ValueError(f"unknown freeze part(s) {sorted(unknown)}; choose from llm, vit, und")
    for name, p in model.named_parameters():
        in_llm = name.startswith("language_model.")
        if ("llm" in parts and in_llm) or ("vit" in parts and name.startswith(("vit_model.", "connector."))):
            p.requires_grad_(False)
        elif "und" in parts and in_llm and "_moe_gen" not in name:
            p.requires_grad_(False)


def apply_activation_checkpointing(model: Bagel) -> None:
    """Recompute each decoder layer's activations in the backward pass instead
    of storing them (less memory, about a third more compute). Applied from
    outside: the layers are wrapped in place."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.language_model.model.layers
    for i, layer in enumerate(layers):
        if not layer.__class__.__name__.startswith("CheckpointWrapper"):
            layers[i] = checkpoint_wrapper(layer)


class EMA:
    """Exponential moving average of the trainable weights (float32 copies)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))


@dataclass
class StepStats:
    """What one optimiser step did."""

    step: int
    loss: float
    loss_ce: float
    loss_mse: float
    num_ce_tokens: int
    num_mse_tokens: int
    num_tokens: int
    lr: float
    grad_norm: float


class Trainer:
    """One optimiser step over one or more packed batches (gradient accumulation).

    Args:
        model: the model to train (its ``requires_grad`` flags say what trains).
        vae: the frozen autoencoder.
        cfg: optimiser and loss settings.
        generator: source of timesteps, noise and posterior samples (unless
            :meth:`step` gets one generator per batch).
        all_reduce_sum: sums a number over ranks (identity on one process);
            token counts are normalised over all ranks and accumulation steps,
            so every part of the gradient has the same scale (spec section 8).
        forward: the module to call (the model wrapped for data parallelism);
            default the model itself.
        world_size: number of data-parallel ranks; a wrapper that averages
            gradients over ranks is compensated, since the losses are already
            normalised by the global token counts.
        autocast: run the forward under ``torch.autocast`` in this dtype
            (``torch.bfloat16`` for mixed precision with float32 weights);
            None = no autocast (full precision, or FSDP's own mixed precision).
    """

    def __init__(
        self,
        model: Bagel,
        vae: BagelVAE,
        cfg: OptimConfig,
        generator: torch.Generator | None = None,
        all_reduce_sum: Callable[[float], float] = lambda n: n,
        forward: nn.Module | None = None,
        world_size: int = 1,
        autocast: torch.dtype | None = None,
    ):
        self.model, self.vae, self.cfg = model, vae, cfg
        self.forward, self.world_size, self.autocast = forward, world_size, autocast
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.all_reduce_sum = all_reduce_sum
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("nothing to train: every parameter is frozen")
        self.optimizer = torch.optim.AdamW(
            trainable, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        self.step_count = 0
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
        if cfg.ema_decay is not None and cfg.max_steps < 5000 and cfg.ema_decay >= 0.999:
            log.warning(
                "EMA decay %s averages over about %d steps, more than this run's %d: the EMA weights will barely move",
                cfg.ema_decay,
                round(1 / (1 - cfg.ema_decay)),
                cfg.max_steps,
            )

    def step(self, batches: Sequence[PackedBatch], generators: Sequence[torch.Generator] | None = None) -> StepStats:
        """Accumulate gradients over ``batches`` (this rank's) and take one optimiser step.

        Args:
            generators: one random source per batch (for results that do not
                depend on how batches are spread over ranks); default the trainer's.
        Returns:
            the step's statistics, summed over ranks.
        """
        self.model.train()
        n_ce = int(self.all_reduce_sum(sum(b.num_ce_tokens for b in batches)))
        n_mse = int(self.all_reduce_sum(sum(b.num_mse_tokens for b in batches)))
        if n_ce == n_mse == 0 and not getattr(self, "_warned_no_loss", False):
            self._warned_no_loss = True
            log.warning("a step had no loss tokens (no answer text, no image to generate): check the data")
        lr = lr_at(self.step_count, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total = ce = mse = 0.0
        for k, batch in enumerate(batches):
            with _gradient_sync(self.forward, k == len(batches) - 1):
                with self._autocast():
                    losses = compute_losses(
                        self.model,
                        self.vae,
                        batch,
                        timestep_shift=self.cfg.timestep_shift,
                        ce_weight=self.cfg.ce_weight,
                        mse_weight=self.cfg.mse_weight,
                        num_ce_tokens=n_ce,
                        num_mse_tokens=n_mse,
                        generator=generators[k] if generators is not None else self.generator,
                        forward=self.forward,
                    )
                # data-parallel wrappers average gradients over ranks; the losses are
                # already normalised by global counts, so undo the average
                (losses.total * self.world_size).backward()
            total, ce, mse = total + losses.total.item(), ce + losses.ce.item(), mse + losses.mse.item()
        total, ce, mse = (float(self.all_reduce_sum(v)) for v in (total, ce, mse))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for p in params:
            # a parameter no batch of this step used (the ViT of a text-only step)
            # gets a zero gradient, as under FSDP and in the reference's FSDP1 flat
            # parameters: its Adam state still decays, the same on any rank layout
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grad_norm = _clip(params, self.cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step_count += 1
        return StepStats(
            step=self.step_count,
            loss=total,
            loss_ce=ce,
            loss_mse=mse,
            num_ce_tokens=n_ce,
            num_mse_tokens=n_mse,
            num_tokens=int(self.all_reduce_sum(sum(b.length for b in batches))),
            lr=lr,
            grad_norm=grad_norm,
        )

    def _autocast(self):
        if self.autocast is None:
            return nullcontext()
        device = self.model.vae2llm.weight.device
        return torch.autocast(device.type, dtype=self.autocast)


def _gradient_sync(forward: nn.Module | None, sync: bool):
    """A context in which ``backward`` reduces gradients over ranks only when
    ``sync`` (the last batch of an accumulation): DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync``; nothing on one process."""
    if forward is None or sync:
        return nullcontext()
    if hasattr(forward, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(forward)
    if hasattr(forward, "no_sync"):  # DDP
        return forward.no_sync()
    return nullcontext()


class _fsdp_no_sync:
    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.module.set_requires_gradient_sync(True)


def _clip(params: list[Tensor], max_norm: float) -> float:
    """Clip to ``max_norm`` (0 = no clipping: scaled by exactly 1) and return the norm before."""
    return _scalar(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))


def _scalar(t: Tensor) -> float:
    """A (possibly FSDP-sharded) scalar as a Python float."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def new_model(config: BagelConfig, seed: int = 0) -> Bagel:
    """A freshly initialised model for training from scratch (float32, CPU)."""
    return init_weights(Bagel(config), seed=seed)


# --- checkpoints for resuming ---------------------------------------------------------


def _state(trainer: Trainer, extra: dict | None) -> dict:
    """The checkpointed state of a run (also the template :func:`load_state` fills)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "ema": trainer.ema.shadow if trainer.ema is not None else {},
        "trainer": {"step": trainer.step_count, "generator": trainer.generator.get_state(), "extra": dict(extra or {})},
    }


#: In a run's state folder: the name of the last complete save (a one-line file).
STATE_POINTER = "latest"


def last_state(folder: str | Path) -> Path | None:
    """The last complete save under a run's state ``folder`` (None when there is none).

    ``folder/latest`` names it (``step-NNNNNN``); a folder from before these
    versioned saves (DCP files directly in ``folder``) is used as it is.
    """
    folder = Path(folder)
    pointer = folder / STATE_POINTER
    if pointer.is_file():
        saved = folder / pointer.read_text().strip()
        return saved if (saved / ".metadata").is_file() else None
    return folder if (folder / ".metadata").is_file() else None


def remove_incomplete_states(folder: str | Path) -> list[Path]:
    """Delete what interrupted saves left in a run's state ``folder`` (save
    folders other than the last complete one, temporary pointer files); returns
    what was removed. Nothing else in ``folder`` is touched."""
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return []
    keep = last_state(folder)
    removed = []
    for entry in folder.iterdir():
        if entry.is_dir() and re.fullmatch(r"step-\d+", entry.name) and entry != keep:
            shutil.rmtree(entry)
            removed.append(entry)
        elif entry.is_file() and entry.name.startswith(f".{STATE_POINTER}."):
            entry.unlink()
            removed.append(entry)
    return removed


def save_state(trainer: Trainer, folder: str | Path, extra: dict | None = None) -> Path:
    """Save everything a run needs to continue exactly (model, optimiser, EMA,
    step, random state, and ``extra``) with ``torch.distributed.checkpoint``
    (sharded under FSDP: every rank calls it), atomically: the state goes to a
    new folder ``folder/step-NNNNNN``, then the one-line file ``folder/latest``
    is replaced to name it, then older saves are deleted. A kill at any moment
    leaves the previous complete save in place (see :func:`last_state`).

    Returns:
        the folder of this save.
    """
    import shutil
    import warnings

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    name = f"step-{trainer.step_count:06d}"
    target = folder / name
    if last_state(folder) == target:
        return target  # this step is saved already (the end of a run that saved at its last step)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0 and target.exists():
        shutil.rmtree(target)  # left by a save of this step that was interrupted
    if dist.is_initialized():
        dist.barrier()
    state = _state(trainer, extra)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        try:
            dcp.save(state, checkpoint_id=str(target))
        except Exception as e:  # DCP wraps a Ctrl-C during the write in its own exception
            if "KeyboardInterrupt" in repr(e):
                raise KeyboardInterrupt from None
            raise
    if rank0:
        from openbagel.fileio import write_atomically

        # the switch: os.replace of a one-line file (its temporary name is .latest.*)
        write_atomically(folder / STATE_POINTER, lambda tmp: Path(tmp).write_text(name + "\n"))
        for entry in folder.iterdir():  # older saves, and the files of the single-folder layout
            if entry.is_dir() and re.fullmatch(r"step-\d+", entry.name) and entry != target:
                shutil.rmtree(entry)
            elif entry.is_file() and (entry.name == ".metadata" or entry.suffix == ".distcp"):
                entry.unlink()
    if dist.is_initialized():
        dist.barrier()  # every rank sees the switched pointer before the next save
    return target


def load_state(trainer: Trainer, folder: str | Path, extra: dict | None = None) -> dict:
    """Restore the last complete save of :func:`save_state` under ``folder``;
    returns its ``extra``, read into the keys (and types) of the ``extra``
    template given here.

    Raises:
        FileNotFoundError: no complete saved state in ``folder``.
        ValueError: the state does not fit this run, or its files are damaged.
    """
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    saved = last_state(folder)
    if saved is None:
        raise FileNotFoundError(f"no saved training state in {folder}")
    state = _state(trainer, extra)  # loaded in place, key by key
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed.*")
            dcp.load(state, checkpoint_id=str(saved))
        set_state_dict(
            trainer.model, trainer.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    except (RuntimeError, KeyError, ValueError) as e:
        raise ValueError(
            f"the saved state in {saved} does not fit this run (was the model, LoRA or EMA setting changed?): {str(e)[:200]}"
        ) from None
    except (CheckpointException, EOFError, OSError, pickle.UnpicklingError) as e:
        if isinstance(e, CheckpointException):  # DCP's wrapper of each rank's error
            e = next(iter(e.failures.values()))[0]
        cause = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ValueError(
            f"the saved state in {saved} is damaged ({cause[:200]}); "
            f"delete {Path(folder)} and --resume again to restart at step 0"
        ) from None
    trainer.step_count = int(state["trainer"]["step"])
    trainer.generator.set_state(state["trainer"]["generator"])
    return state["trainer"]["extra"]
