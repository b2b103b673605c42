"""A training run from a YAML config: model, data mix, packing, optimiser,
logging and export. ``openbagel train CONFIG`` calls :func:`train`.

Config (paths relative to the config file)::

    model:
      init: scratch              # or a checkpoint folder (loaded strictly)
      preset: tiny-golden        # with init: scratch, the architecture
      assets: ../tests/golden/tiny-random   # tokenizer + ae.safetensors (scratch runs)
      freeze: []                 # any of llm, vit, und
      activation_checkpointing: false   # recompute layer activations in backward (less memory)
    data:
      - {kind: t2i_parquet, path: data/t2i.parquet, weight: 2}
      - {kind: edit_parquet, path: data/edit.parquet}
      - {kind: llava_jsonl, path: data/chat.jsonl}
      - {kind: shapes, count: 1000, tasks: [t2i, qa]}  # the shapes world, made in memory
                                 # (unspecified: default -> captions decide the layout)
    batch: {max_tokens: 2048, accumulation: 1}
    dropout: {text: 0.1, vit: 0.3, vae: 0.3}
    optim: {lr: 1e-4, warmup_steps: 10, max_steps: 100, schedule: cosine}
    lora: {r: 16, alpha: 32, merge: true}   # optional: train adapters only
    log_every: 10
    save_every: 500     # resumable state (state/) every N steps and at the end (default 0: at the end only)
    export_every: 0     # N > 0: also export the (EMA) weights to exports/step-N/ every N steps
    seed: 0
    device: auto        # auto (cuda when there is one, else cpu), cpu, cuda
    precision: fp32     # or bf16: bfloat16 compute, float32 weights and optimiser state
    parallel: auto      # under torchrun: fsdp (FSDP2, default on cuda) or ddp (default on cpu)
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from openbagel.checkpoint import load_model, load_vae, resolve_checkpoint_dir, save_checkpoint
from openbagel.config import BagelConfig, config_from_checkpoint, preset
from openbagel.errors import OpenBagelError
from openbagel.model.bagel import Bagel
from openbagel.tokenizer import Tokenizer
from openbagel.train.data import (
    DataError,
    RecordSource,
    SampleBuilder,
    read_conversations,
    read_edit,
    read_text_to_image,
)
from openbagel.train.lora import DEFAULT_TARGETS, add_lora, save_adapter
from openbagel.train.packing import CondDropout, ImageSplit, PackedBatch, Sample, pack
from openbagel.train.step import TrainForward
from openbagel.train.trainer import (
    OptimConfig,
    Trainer,
    apply_activation_checkpointing,
    freeze,
    init_weights,
    last_state,
    load_state,
    remove_incomplete_states,
    save_state,
)

log = logging.getLogger(__name__)


SECTIONS = (
    "model",
    "data",
    "batch",
    "dropout",
    "optim",
    "lora",
    "log_every",
    "save_every",
    "export_every",
    "seed",
    "device",
    "precision",
    "parallel",
)


class ConfigError(OpenBagelError):
    """A training config that cannot be used; the message names the field."""


@dataclass
class RunResult:
    steps: int
    checkpoint: Path
    last: dict[str, float | None]


def load_run_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML run config.

    Raises:
        ConfigError: unreadable file, not YAML, or not a mapping.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"training config {str(path)[:200]!r} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"training config {str(path)!r} is a folder; give the YAML file") from None
    except OSError as e:  # a name too long, no permission
        raise ConfigError(f"training config {str(path)[:200]!r} cannot be read: {e.strerror}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not a readable YAML file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (model, data, optim, ...)")
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    return data


def sample_length(sample: Sample, config: BagelConfig) -> int:
    """Tokens a sample takes in a packed sequence."""
    n = 0
    for split in sample:
        if isinstance(split, ImageSplit):
            unit = config.vit.patch_size if split.path == "vit" else config.latent_downsample
            n += (split.pixels.shape[1] // unit) * (split.pixels.shape[2] // unit) + 2
        else:
            n += len(split.ids) + 2
    return n


def _coerce(value: Any, kind: str, where: str) -> Any:
    """A YAML value as the dataclass field type ``kind`` (``"float"``, ``"int"``,
    ``"float | None"``, ``"tuple[float, float]"``, ``"bool"``, or a Literal).
    YAML 1.1 reads ``1e-4`` as a string, so numeric strings are accepted for floats."""

    def number(v, integer: bool):
        if isinstance(v, bool):
            raise ValueError
        if integer:
            if isinstance(v, int):
                return v
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise ValueError
        return float(v)

    try:
        if kind.endswith("| None"):
            return None if value is None else _coerce(value, kind[: -len("| None")].strip(), where)
        if kind in ("float", "int"):
            return number(value, kind == "int")
        if kind.startswith("tuple[float"):
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return tuple(number(v, False) for v in value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where} must be {kind.replace('tuple[float, float]', 'a pair of numbers')}, got {value!r}"
        ) from None
    return value


def _section(cfg: dict, name: str, cls):
    values = cfg.get(name) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"'{name}' must be a mapping")
    types = {f.name: str(f.type) for f in fields(cls)}
    unknown = set(values) - set(types)
    if unknown:
        raise ConfigError(f"'{name}': unknown field(s) {sorted(unknown)}; known: {sorted(types)}")
    coerced = {k: _coerce(v, types[k], f"'{name}.{k}'") for k, v in values.items()}
    try:
        return cls(**coerced)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"'{name}': {e}") from None


def _int(section: dict, key: str, default: int, where: str, minimum: int = 1) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"'{where}': {key} must be {kind}, got {value!r}")
    return value


def _lora_settings(cfg: dict) -> dict[str, Any] | None:
    """The checked ``lora`` section (None without one)."""
    if "lora" not in cfg:
        return None
    lora_cfg = cfg["lora"]
    if not isinstance(lora_cfg, dict):
        raise ConfigError(f"'lora' must be a mapping (use 'lora: {{}}' for the defaults), got {lora_cfg!r}")
    unknown = set(lora_cfg) - {"r", "alpha", "targets", "dropout", "merge"}
    if unknown:
        raise ConfigError(f"'lora': unknown field(s) {sorted(unknown)}; known: alpha, dropout, merge, r, targets")
    targets = lora_cfg.get("targets", DEFAULT_TARGETS)
    if not isinstance(targets, str) and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ConfigError(f"'lora.targets' must be a regex or a list of module names, got {targets!r}")
    return {
        "r": _int(lora_cfg, "r", 16, "lora"),
        "alpha": _coerce(lora_cfg.get("alpha", 32), "float", "'lora.alpha'"),
        "dropout": _coerce(lora_cfg.get("dropout", 0.0), "float", "'lora.dropout'"),
        "merge": _coerce(lora_cfg.get("merge", True), "bool", "'lora.merge'"),
        "targets": targets,
    }


@dataclass(frozen=True)
class _ModelSource:
    """The checked ``model`` section: the architecture and where its files are."""

    config: BagelConfig
    assets: Path  # the tokenizer and ae.safetensors (the checkpoint folder when ``init`` is one)
    scratch: bool  # random weights (else the checkpoint's)
    freeze: list
    activation_checkpointing: bool


def _model_source(model_cfg: dict, base: Path) -> _ModelSource:
    """The config's ``model`` section, checked (fields, preset, folders, the
    checkpoint's config) before any weights load."""
    if not isinstance(model_cfg, dict):
        raise ConfigError("'model' must be a mapping")
    unknown = set(model_cfg) - {"init", "preset", "assets", "freeze", "activation_checkpointing"}
    if unknown:
        raise ConfigError(f"'model': unknown field(s) {sorted(unknown)}")
    init = model_cfg.get("init", "scratch")
    if not isinstance(init, str):
        raise ConfigError(f"model: init must be 'scratch' or a checkpoint folder, got {init!r}")
    parts = model_cfg.get("freeze", []) or []
    if not isinstance(parts, list):
        raise ConfigError(f"'model': freeze must be a list, for example [vit], got {parts!r}")
    checkpointing = bool(model_cfg.get("activation_checkpointing", False))
    if init != "scratch":
        assets = resolve_checkpoint_dir(base / init)
        return _ModelSource(config_from_checkpoint(assets), assets, False, parts, checkpointing)
    if "preset" not in model_cfg or "assets" not in model_cfg:
        raise ConfigError(
            "model: init 'scratch' needs 'preset' (architecture) and 'assets' (tokenizer + ae.safetensors)"
        )
    if not isinstance(model_cfg["preset"], str):
        raise ConfigError(
            f"model: preset must be a preset name (7b-mot, tiny-golden, shapes), got {model_cfg['preset']!r}"
        )
    try:
        config = preset(model_cfg["preset"])
    except KeyError as e:
        raise ConfigError(f"model: {e.args[0]}") from None
    assets = base / _path_field(model_cfg, "assets", "model")
    kind = _path_kind(assets, "model: assets folder")
    if kind != "folder":
        raise ConfigError(f"model: assets folder {assets} {'is a file' if kind else 'does not exist'}")
    return _ModelSource(config, assets, True, parts, checkpointing)


def _build_model(source: _ModelSource, seed: int):
    """``(model, vae, tokenizer)`` of a checked ``model`` section."""
    if source.scratch:
        model = init_weights(Bagel(source.config), seed=seed)
    else:
        model = load_model(source.assets, config=source.config)
    vae = load_vae(source.assets, config=source.config)
    tokenizer = Tokenizer.from_folder(source.assets)
    try:
        freeze(model, source.freeze)
    except ValueError as e:
        raise ConfigError(f"'model': {e}") from None
    if source.activation_checkpointing:
        apply_activation_checkpointing(model)
    for p in vae.parameters():
        p.requires_grad_(False)
    return model, vae, tokenizer


@dataclass(frozen=True)
class _Source:
    """One validated ``data`` entry."""

    kind: str
    weight: float
    label: str
    path: Path | None = None
    world: Any = None  # a WorldSource for kind "shapes"


def _data_sources(cfg: dict, base: Path) -> list[_Source]:
    """The ``data`` entries, checked (kinds, fields, weights, paths) before any weights load."""
    import math

    entries = cfg.get("data")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("'data' must be a non-empty list of sources")
    out = []
    for k, e in enumerate(entries):
        if not isinstance(e, dict) or "kind" not in e:
            raise ConfigError(f"data[{k}] must be a mapping with a 'kind'")
        kind = e["kind"]
        if kind not in ("shapes", "t2i_parquet", "edit_parquet", "llava_jsonl"):
            raise ConfigError(
                f"data[{k}]: unknown kind {kind!r}; choose from shapes, t2i_parquet, edit_parquet, llava_jsonl"
            )
        allowed = (
            {"kind", "weight", "count", "seed", "split", "tasks", "weights", "unspecified"}
            if kind == "shapes"
            else {"kind", "weight", "path"}
        )
        if set(e) - allowed:
            raise ConfigError(f"data[{k}]: unknown field(s) {sorted(set(e) - allowed)}; known: {sorted(allowed)}")
        weight = _coerce(e.get("weight", 1.0), "float", f"data[{k}].weight")
        if not 0 < weight < math.inf:
            raise ConfigError(f"data[{k}].weight must be a finite number > 0, got {weight}")
        if kind == "shapes":
            out.append(_Source(kind, weight, "shapes world", world=_shapes_source(e, f"data[{k}]")))
            continue
        path = base / _path_field(e, "path", f"data[{k}] ({kind})")
        found = _path_kind(path, f"data[{k}]:")
        if found is None:
            raise ConfigError(f"data[{k}]: {path} does not exist")
        if found == "folder":
            raise ConfigError(f"data[{k}]: {path} is a folder; give the {kind.split('_')[-1]} file")
        out.append(_Source(kind, weight, str(path.resolve()), path=path.resolve()))
    if not math.isfinite(sum(s.weight for s in out)):
        raise ConfigError("the data weights are too large; use weights like 1, 2 or 0.5")
    return out


def _path_kind(path: Path, where: str) -> str | None:
    """``"file"``, ``"folder"`` or None (nothing there).

    Raises:
        ConfigError: the path cannot be looked up (a name too long, no permission).
    """
    try:
        return ("folder" if path.is_dir() else "file") if path.exists() else None
    except OSError as e:
        raise ConfigError(f"{where} {str(path)[:200]!r}: {e.strerror}") from None


def _path_field(section: dict, key: str, where: str) -> str:
    value = section.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} needs '{key}': a file or folder path, got {value!r}")
    return value


def _reader(src: _Source, builder: SampleBuilder, rng: random.Random, on_error) -> Callable[[], Iterator[Sample]]:
    """A function starting a new pass over one source."""
    if src.kind == "shapes":
        return lambda: iter(RecordSource(src.world, builder, rng))
    if src.kind == "t2i_parquet":
        return lambda: read_text_to_image(src.path, builder, rng, on_error)
    if src.kind == "edit_parquet":
        return lambda: read_edit(src.path, builder, rng, on_error)
    return lambda: read_conversations(src.path, builder, on_error)


def _shapes_source(e: dict, where: str):
    """The shapes world as an in-memory source (``count`` records per pass)."""
    from openbagel.shapes.world import TASKS, WorldSource

    weights = e.get("weights")
    if weights is not None:
        if not isinstance(weights, list):
            raise ConfigError(f"{where}.weights must be a list of numbers, one per task")
        weights = tuple(_coerce(w, "float", f"{where}.weights") for w in weights)
    try:
        return WorldSource(
            count=_int(e, "count", 1000, where),
            seed=_int(e, "seed", 0, where, minimum=0),
            split=e.get("split", "train"),
            tasks=e.get("tasks", TASKS),
            weights=weights,
            unspecified=e.get("unspecified", "random"),
        )
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _mixed(sources: list[tuple[float, Callable, str]], rng: random.Random) -> Iterator[Sample]:
    """Endless samples, each from a source chosen by weight; a source restarts when it ends."""
    iters = [make() for _, make, _ in sources]
    weights = [w for w, _, _ in sources]
    while True:
        k = rng.choices(range(len(sources)), weights)[0]
        for _ in range(2):
            try:
                yield next(iters[k])
                break
            except StopIteration:
                iters[k] = sources[k][1]()
        else:
            raise ConfigError(f"data source {k} ({sources[k][2]}) yields no usable samples")


def _packs(
    samples: Iterator[Sample], max_tokens: int, config: BagelConfig, special, dropout, rng_t
) -> Iterator[PackedBatch]:
    """Greedy packing up to ``max_tokens`` per sequence."""
    pending: list[Sample] = []
    used = 0
    warned = False
    for sample in samples:
        n = sample_length(sample, config)
        if n > max_tokens and not warned:
            warned = True
            log.warning("a sample of %d tokens exceeds batch.max_tokens (%d); it is packed alone", n, max_tokens)
        if pending and used + n > max_tokens:
            yield pack(pending, config, special, dropout, rng_t)
            pending, used = [], 0
        pending.append(sample)
        used += n
        if used >= max_tokens:
            yield pack(pending, config, special, dropout, rng_t)
            pending, used = [], 0


def train(
    config_path: str | Path,
    output: str | Path,
    max_steps: int | None = None,
    skip_bad_rows: bool = False,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> RunResult:
    """Run a training config; write ``log.jsonl``, the resumable state
    (``state/``) and the exported checkpoint (``checkpoint/``) under ``output``.

    Args:
        resume: continue from the last complete save in ``output/state``
            exactly where it stopped (same weights, optimiser, random draws
            and data order); a run killed before its first save starts again
            at step 0. What a killed run left (unfinished saves, later log
            records and exports, temporary files) is removed first.
        stop_at: stop after this optimiser step (the schedule still runs to
            ``max_steps``), to continue later with ``resume``.

    Raises:
        ConfigError, CheckpointError, DataError: with the file/field/row named.
    """
    config_path = Path(config_path)
    cfg = load_run_config(config_path)
    base = config_path.resolve().parent
    seed = _int(cfg, "seed", 0, "config", minimum=0)
    optim = _section(cfg, "optim", OptimConfig)
    if max_steps is not None:
        if max_steps < 1:
            raise ConfigError(f"--max-steps must be at least 1, got {max_steps}")
        optim = OptimConfig(**{**optim.__dict__, "max_steps": max_steps})
    dropout = _section(cfg, "dropout", CondDropout)
    batch_cfg = cfg.get("batch") or {}
    if not isinstance(batch_cfg, dict) or set(batch_cfg) - {"max_tokens", "accumulation"}:
        raise ConfigError("'batch' takes max_tokens and accumulation")
    max_tokens = _int(batch_cfg, "max_tokens", 2048, "batch")
    accumulation = _int(batch_cfg, "accumulation", 1, "batch")
    log_every = _int(cfg, "log_every", 10, "config")
    compute = compute_settings(cfg, "lora" in cfg)
    lora_cfg = _lora_settings(cfg)
    data_sources = _data_sources(cfg, base)  # checked before the weights load
    save_every = _int(cfg, "save_every", 0, "config", minimum=0)
    export_every = _int(cfg, "export_every", 0, "config", minimum=0)
    if export_every and lora_cfg is not None:
        raise ConfigError("export_every does not apply to LoRA runs (the adapter is saved at the end); remove it")
    model_source = _model_source(cfg.get("model") or {}, base)
    output = Path(output)
    if not str(output).strip() or output.name in ("", ".", ".."):  # "" reaches here as "."
        raise ConfigError(
            f"--output {str(output)!r} is empty or names no folder of its own (it would fill the one "
            "it names); give a folder for the run (it is created if missing)"
        )
    _check_output(output, resume)  # before the weights load
    world, rank, own_group = _init_distributed(compute.device)
    model, vae, tokenizer = _build_model(model_source, seed)
    assets = model_source.assets
    config = model.config  # before any LoRA wrapper
    if lora_cfg is not None:
        torch.manual_seed(seed)  # peft draws the adapters' initial values from the global generator
        try:
            model = add_lora(
                model,
                r=lora_cfg["r"],
                alpha=lora_cfg["alpha"],
                targets=lora_cfg["targets"],
                dropout=lora_cfg["dropout"],
            )
        except ValueError as e:
            raise ConfigError(f"'lora': {e}") from None

    rng = random.Random(seed)
    skipped: dict[tuple, DataError] = {}  # each bad row once, however many passes over the data

    def on_skip(err: DataError) -> None:
        skipped.setdefault((err.source, err.row), err)

    on_error = on_skip if skip_bad_rows else None
    builder = SampleBuilder(config, tokenizer)
    samples = _mixed([(src.weight, _reader(src, builder, rng, on_error), src.label) for src in data_sources], rng)
    packs = _packs(samples, max_tokens, config, tokenizer.special, dropout, torch.Generator().manual_seed(seed))
    vae.to(compute.device)
    forward = _parallelize(model, compute, world)
    trainer = Trainer(
        model,
        vae,
        optim,
        torch.Generator().manual_seed(seed + 1),
        all_reduce_sum=(lambda n: _all_reduce_sum(n, compute.device)) if world > 1 else (lambda n: n),
        forward=forward,
        world_size=world,
        autocast=torch.bfloat16 if compute.precision == "bf16" and compute.parallel != "fsdp" else None,
    )
    if rank != 0:
        echo, progress = (lambda s: None), False

    consumed = 0
    if resume:
        if last_state(output / "state") is None:
            echo(f"no complete saved state in {output / 'state'} (stopped before its first save): starting at step 0")
        else:
            try:
                consumed = int(load_state(trainer, output / "state", {"packs": 0})["packs"])
            except ValueError as e:
                raise ConfigError(f"--resume: {e}") from None
            for _ in range(consumed):  # replay the data stream to where it stopped
                next(packs)
            echo(f"resumed at step {trainer.step_count}")
        if rank == 0:
            for path in _remove_leftovers(output, trainer.step_count):
                echo(f"removed {path} (left by the interrupted run)")
            _truncate_log(output / "log.jsonl", trainer.step_count)

    def export(folder: Path) -> None:
        weights = _export_weights(model, trainer, compute.parallel == "fsdp")  # every rank takes part
        if rank == 0:
            save_checkpoint(folder, model, vae, tokenizer_dir=assets, state_dict=weights)

    end = min(optim.max_steps, stop_at) if stop_at is not None else optim.max_steps
    log_file = (output / "log.jsonl").open("a") if rank == 0 else None
    steps = range(trainer.step_count, end)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="training", unit="step")
    last: dict[str, float | None] = {}
    tokens, t0 = 0, time.perf_counter()
    interval = _Interval()
    try:
        for _ in steps:
            # each step takes accumulation x world packs of the stream; this rank
            # its own slice, each pack with a random stream of its own, so the
            # result does not depend on how the packs are spread over ranks
            group = [next(packs) for _ in range(accumulation * world)]
            first = rank * accumulation
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + consumed + first + i) for i in range(accumulation)]
            stats = trainer.step(group[first : first + accumulation], gens)
            consumed += accumulation * world
            tokens += stats.num_tokens
            interval.add(stats)
            if stats.step % log_every == 0 or stats.step == optim.max_steps:
                elapsed = time.perf_counter() - t0
                last = {
                    "step": stats.step,
                    **interval.means(),
                    "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                    "lr": stats.lr,
                    "grad_norm": stats.grad_norm,
                }
                if log_file is not None:
                    log_file.write(json.dumps(last) + "\n")
                    log_file.flush()
                ce, mse = (f"{v:.4f}" if v is not None else "-" for v in (last["loss_ce"], last["loss_mse"]))
                echo(
                    f"step {stats.step}: loss {last['loss']:.4f} (ce {ce}, mse {mse}) "
                    f"lr {stats.lr:.2e} {last['tokens_per_s']:.0f} tok/s"
                )
                tokens, t0 = 0, time.perf_counter()
                interval = _Interval()
            # the state last: a kill before it is complete resumes from the previous
            # save, which redoes this step's log record and export identically
            if export_every and stats.step % export_every == 0:
                export(output / "exports" / f"step-{stats.step:06d}")
            if save_every and stats.step % save_every == 0:
                save_state(trainer, output / "state", {"packs": consumed})
    finally:
        if log_file is not None:
            log_file.close()
    if skipped:
        echo(f"skipped {len(skipped)} bad row(s); first: {next(iter(skipped.values()))}")
    save_state(trainer, output / "state", {"packs": consumed})
    if lora_cfg is not None:
        if trainer.ema is not None:
            trainer.ema.copy_to(model)
        save_adapter(model, output / "adapter")
        echo(f"LoRA adapter written to {output / 'adapter'}")
        model = model.merge_and_unload() if lora_cfg["merge"] else model.unload()
        trainer.ema = None  # merged or unloaded: the adapters' EMA no longer applies
    checkpoint = output / "checkpoint"
    export(checkpoint)
    if own_group:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return RunResult(trainer.step_count, checkpoint, last)


class _Interval:
    """Losses of the steps since the last log record: ``loss`` is the mean per
    step, ``loss_ce``/``loss_mse`` are weighted by each step's loss tokens (a
    step without text to predict does not pull the CE mean to 0; with no such
    tokens in the whole interval the value is None, ``null`` in the log)."""

    def __init__(self) -> None:
        self.steps, self.loss, self.ce, self.n_ce, self.mse, self.n_mse = 0, 0.0, 0.0, 0, 0.0, 0

    def add(self, stats) -> None:
        self.steps += 1
        self.loss += stats.loss
        self.ce += stats.loss_ce * stats.num_ce_tokens
        self.n_ce += stats.num_ce_tokens
        self.mse += stats.loss_mse * stats.num_mse_tokens
        self.n_mse += stats.num_mse_tokens

    def means(self) -> dict[str, float | None]:
        return {
            "loss": self.loss / max(self.steps, 1),
            "loss_ce": self.ce / self.n_ce if self.n_ce else None,
            "loss_mse": self.mse / self.n_mse if self.n_mse else None,
        }


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records after ``step`` (logged after the last saved state), and
    a last line cut short by a kill; the log is replaced atomically."""
    from openbagel.fileio import write_atomically

    def record_step(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            return math.inf  # a partial line: dropped

    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and record_step(line) <= step]
        write_atomically(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))


def _check_output(output: Path, resume: bool) -> None:
    """Check the run folder before any weights load: a fresh run needs a folder
    that holds no run (created here), ``--resume`` one that does.

    Raises:
        ConfigError: the path is a file, under a file, not writable or not a
            valid name; a fresh run into a run folder; ``--resume`` of a folder
            that does not exist.
    """
    import os

    try:
        is_file = output.exists() and not output.is_dir()
        holds_run = (output / "log.jsonl").exists() or (output / "state").exists()
    except OSError as e:  # a name too long
        raise ConfigError(f"bad --output {str(output)[:80]!r}: {e.strerror}; choose a shorter path") from None
    if is_file:
        raise ConfigError(f"--output {output} is a file; give a folder for the run (it is created if missing)")
    if resume:
        if not holds_run and not output.is_dir():  # a run killed before it wrote anything starts at step 0
            raise ConfigError(f"--resume: no run folder {output}; run without --resume first")
        return
    if holds_run and int(os.environ.get("RANK", "0")) == 0:
        raise ConfigError(
            f"{output} already holds a run; continue it with --resume (a run stopped before its first save "
            "starts again at step 0), or choose another --output"
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create the run folder {str(output)[:200]!r}: {e.strerror}; choose another --output"
        ) from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise ConfigError(f"the run folder {output} is not writable; choose another --output")


def _remove_leftovers(output: Path, step: int) -> list[Path]:
    """Delete what a killed run left in its folder, before resuming it at
    ``step``: interrupted state saves, exports of later steps (the resumed run
    writes them again, identical), temporary files of interrupted checkpoint
    writes, of the log. Returns the removed paths; nothing else is touched."""
    import re
    import shutil

    from openbagel.checkpoint import remove_temporary_files
    from openbagel.fileio import remove_stale_temps

    removed = remove_incomplete_states(output / "state")
    exports = output / "exports"
    folders = [output / "checkpoint"]
    for folder in sorted(exports.iterdir()) if exports.is_dir() else []:
        match = re.fullmatch(r"step-(\d+)", folder.name)
        if match and folder.is_dir() and int(match.group(1)) > step:
            shutil.rmtree(folder)
            removed.append(folder)
        elif match:
            folders.append(folder)
    for folder in folders:
        removed += remove_temporary_files(folder)
    removed += remove_stale_temps(output / "log.jsonl")  # an interrupted rewrite of the log (see _truncate_log)
    return removed


@dataclass(frozen=True)
class Compute:
    """Where and how a run computes.

    Attributes:
        device: this process's device (``cuda:LOCAL_RANK`` under torchrun on GPUs).
        precision: ``fp32``, or ``bf16`` (bfloat16 compute; weights, gradients
            reduction and optimiser state stay float32).
        parallel: ``none`` (one process), ``ddp`` or ``fsdp`` (FSDP2 ``fully_shard``).
    """

    device: torch.device
    precision: str
    parallel: str


def compute_settings(cfg: dict, lora: bool = False, environ: dict | None = None) -> Compute:
    """The ``device``, ``precision`` and ``parallel`` settings of a run config,
    checked before any weights load.

    Raises:
        ConfigError: an unknown value, CUDA asked for without a GPU, or FSDP
            with LoRA.
    """
    import os

    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    name = cfg.get("device", "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(name, str) or not (name in ("cpu", "cuda") or name.startswith("cuda:")):
        raise ConfigError(f"'device' must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("'device' is cuda but this PyTorch sees no GPU; use device: cpu (or auto)")
        if world > 1:
            if name != "cuda":
                raise ConfigError("under torchrun use 'device: cuda'; each process takes the GPU of its LOCAL_RANK")
            name = f"cuda:{int(env.get('LOCAL_RANK', '0'))}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"'device': {name!r} is not a device name") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"'device': {name} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    precision = cfg.get("precision", "fp32")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"'precision' must be fp32 or bf16, got {precision!r}")
    parallel = cfg.get("parallel", "auto")
    if parallel not in ("auto", "ddp", "fsdp"):
        raise ConfigError(f"'parallel' must be auto, ddp or fsdp, got {parallel!r}")
    if world <= 1:
        parallel = "none"
    elif parallel == "auto":
        parallel = "fsdp" if device.type == "cuda" else "ddp"
    if parallel == "fsdp" and lora:
        raise ConfigError("LoRA runs use 'parallel: ddp' (adapters are small; each GPU holds the frozen base)")
    return Compute(device, precision, parallel)


def _parallelize(model: nn.Module, compute: Compute, world: int) -> nn.Module | None:
    """Move the model to its device and wrap it for data parallelism; returns
    the module to call (None on one process: the model itself).

    FSDP2 shards each decoder layer and then the rest (the root: embeddings,
    ViT, connectors, heads) over all ranks, applied from outside the model.
    A pack without images leaves the ViT and the generation expert unused on
    its rank, so unused parameters take part in the reduce-scatter with zero
    gradients (FSDP2's ``set_reduce_scatter_unused_params``).
    """
    if compute.parallel != "fsdp":
        model.to(compute.device)
    if compute.parallel == "none":
        return None
    forward = TrainForward(model)
    if compute.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # every parameter may be unused by some pack (no image: no ViT, no generation expert)
        ids = [compute.device.index] if compute.device.type == "cuda" else None
        return DistributedDataParallel(forward, device_ids=ids, find_unused_parameters=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from openbagel.model.llm import MoTModel

    mesh = init_device_mesh(compute.device.type, (world,))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if compute.precision == "bf16" else None, reduce_dtype=torch.float32
    )
    for module in list(model.modules()):
        if isinstance(module, MoTModel):
            for layer in module.layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(forward, mesh=mesh, mp_policy=policy)
    if not hasattr(forward, "set_reduce_scatter_unused_params"):
        raise ConfigError(
            "this PyTorch's FSDP2 cannot reduce parameters some ranks leave unused; "
            "upgrade PyTorch or use 'parallel: ddp'"
        )
    forward.set_reduce_scatter_unused_params(True)
    return forward


def _export_weights(model: nn.Module, trainer: Trainer, sharded: bool) -> dict[str, Tensor] | None:
    """The weights to export: the EMA copy where the run keeps one, else the
    trained weights (``None``: ``model.state_dict()`` as it is). With FSDP a
    collective (the full state dict is gathered)."""
    weights = _full_state_dict(model) if sharded else None
    if trainer.ema is None:
        return weights
    weights = dict(weights if weights is not None else model.state_dict())
    for name, value in trainer.ema.shadow.items():
        if hasattr(value, "full_tensor"):  # a DTensor shard under FSDP
            value = value.full_tensor()
        weights[name] = value.to(weights[name].dtype).cpu()
    return weights


def _full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole (unsharded) state dict of an FSDP model on CPU; a collective:
    every rank calls it, rank 0 receives the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """``(world_size, rank, initialised_here)``; under ``torchrun`` joins the
    process group (NCCL on GPUs, gloo on CPU)."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, False
    own = not dist.is_initialized()
    if own:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_world_size(), dist.get_rank(), own


def _all_reduce_sum(value: float, device: torch.device) -> float:
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item()
