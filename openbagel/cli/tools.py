"""``quantize``, ``plan`` and ``bench``: preparing, sizing and timing a model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from openbagel.cli.common import (
    AdapterOpt,
    CacheIntervalOpt,
    CacheOpt,
    CacheOrderOpt,
    CacheWarmupOpt,
    CompileOpt,
    ModelOpt,
    _check_json_output,
    _parse_size,
    _run,
    _step_cache,
    check_input_path,
    check_output_path,
    flag,
)
from openbagel.errors import InvalidInputError


def quantize(
    output: Path = typer.Option(..., "--output", "-o", help="New checkpoint folder for the quantized model."),
    quant: str = typer.Option(
        ...,
        "--quant",
        help="PART=MODE,... with parts llm, vit, head and modes int8, nf4, fp8 (e.g. llm=nf4; a bare mode means llm=MODE).",
    ),
    model: Optional[str] = ModelOpt,
    adapter: Optional[Path] = AdapterOpt,
    device: str = typer.Option(
        "cpu", "--device", help="Where to quantize (cuda is faster; the result loads on any device the mode runs on)."
    ),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Dtype of the unquantized parts and of the computation."),
) -> None:
    """Quantize a checkpoint once and save it: later loads (--model OUT) start without quantizing."""

    def body():
        from openbagel.checkpoint import resolve_checkpoint_dir
        from openbagel.kv_cache import format_bytes
        from openbagel.pipeline import DEFAULT_MODEL, BagelPipeline
        from openbagel.quantize import (
            QuantSpec,
            check_new_folder,
            module_bytes,
            partial_folder,
            read_quant_info,
            save_quantized,
        )

        spec = QuantSpec.parse(quant)
        if not spec.active:
            raise InvalidInputError("--quant quantizes nothing; give a mode, for example --quant llm=int8")
        check_output_path(output, "--output", folder=True, temp_bytes=len(os.fsencode(partial_folder(output).name)))
        check_new_folder(output)
        if adapter is not None:
            check_input_path(adapter, "--adapter folder", folder=True)
        source = resolve_checkpoint_dir(DEFAULT_MODEL if model is None else model)
        stored = read_quant_info(source)
        if stored is not None:
            raise InvalidInputError(f"{source} is quantized already ({stored[0]}); quantize the original checkpoint")
        pipe = BagelPipeline.from_pretrained(source, dtype=dtype, device=device, adapter=adapter, quant=spec)
        save_quantized(pipe.model, spec, source, output)
        typer.echo(f"wrote {output} ({spec}, {format_bytes(module_bytes(pipe.model))} of weights without the VAE)")

    _run(body)


def plan(
    gpu_mem: str = typer.Option(
        ...,
        "--gpu-mem",
        help="Memory of each GPU with a unit, as nvidia-smi shows it: 24GiB, 24564MiB (a '24 GB' card has 24 GiB).",
    ),
    model: Optional[str] = ModelOpt,
    config_name: Optional[str] = typer.Option(
        None,
        "--config",
        help="Plan a preset instead of a folder: 7b-mot, small, shapes, tiny (no files needed).",
        show_default=False,
    ),
    quant: Optional[str] = typer.Option(
        None,
        "--quant",
        help="Plan this quantization (PART=MODE,..., or a bare mode for llm) next to bfloat16; "
        "default: bfloat16, llm=int8 and llm=nf4.",
        show_default=False,
    ),
    devices: int = typer.Option(
        1, "--devices", help="GPUs to split the decoder layers across (offload rows are for one GPU only)."
    ),
    task: str = typer.Option("edit", "--task", help="The session to budget for: t2i, edit or understand."),
    size: str = typer.Option("1024x1024", "--size", help="WxH of the generated (t2i) or input image."),
    think: bool = flag("--think", help="The session reasons in text first."),
    max_think_tokens: Optional[int] = typer.Option(
        None, "--max-think-tokens", help="Reasoning length with --think (default: the model's).", show_default=False
    ),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens", help="Tokens of the prompt text."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Dtype of the weights and activations."),
) -> None:
    """Print the memory each way of running the model needs on GPUs of a given size, before loading anything."""

    def body():
        from openbagel.checkpoint import resolve_checkpoint_dir
        from openbagel.config import PRESETS, config_from_checkpoint
        from openbagel.kv_cache import parse_bytes
        from openbagel.pipeline import (
            DEFAULT_MODEL,
            THINK_GENERATE_PROMPT,
            THINK_UNDERSTAND_PROMPT,
            check_size,
            parse_dtype,
        )
        from openbagel.plan import Workload, make_plan
        from openbagel.quantize import QuantSpec, check_quantized_folder
        from openbagel.tokenizer import Tokenizer

        gpu = parse_bytes(gpu_mem, "--gpu-mem")
        if not any(c.isalpha() for c in gpu_mem):
            raise InvalidInputError(f"--gpu-mem needs a unit, e.g. 24GiB or 24564MiB; got {gpu_mem!r}")
        dt = parse_dtype(dtype)
        height, width = _parse_size(size)
        system = THINK_UNDERSTAND_PROMPT if task == "understand" else THINK_GENERATE_PROMPT
        if config_name is not None:
            if model is not None:
                raise InvalidInputError("give --model or --config, not both")
            name = {"tiny": "tiny-golden"}.get(config_name, config_name)
            if name not in PRESETS:
                raise InvalidInputError(f"unknown --config {config_name!r}; choose one of {', '.join(PRESETS)}")
            config, stored = PRESETS[name], None
            system_tokens = len(system) // 4  # no tokenizer: about 4 characters per token
        else:
            folder = resolve_checkpoint_dir(DEFAULT_MODEL if model is None else model)
            asked = QuantSpec.parse(quant) if quant is not None else None
            config, stored = config_from_checkpoint(folder), check_quantized_folder(folder, asked, dt)
            system_tokens = len(Tokenizer.from_folder(folder).encode(system))
        if stored is not None:
            specs = [stored[0]]
        elif quant is not None:
            specs = [QuantSpec(), QuantSpec.parse(quant)]
        else:
            specs = [QuantSpec(), QuantSpec(llm="int8"), QuantSpec(llm="nf4")]
        workload = Workload(task, height, width, think, max_think_tokens, prompt_tokens)
        if task == "t2i":
            check_size(config, height, width)
        if max_think_tokens is not None and max_think_tokens < 0:
            raise InvalidInputError(f"--max-think-tokens must be 0 or more, got {max_think_tokens}")
        if devices > config.llm.num_layers:
            raise InvalidInputError(
                f"--devices {devices} is more than the model's {config.llm.num_layers} decoder layers (one each at most)"
            )
        result = make_plan(config, dt, gpu, workload, specs, devices, system_tokens)
        typer.echo(result.table())
        if "gb" in gpu_mem.lower() and "gib" not in gpu_mem.lower():
            typer.echo(
                f"note: {gpu_mem} was read as {gpu:,} bytes ({gpu / 2**30:.1f} GiB); cards sold as N GB have "
                "about N GiB (nvidia-smi's MiB): pass --gpu-mem NGiB"
            )

    _run(body)


def bench(
    config: str = typer.Option(
        "small",
        "--config",
        help="Random-weight config: tiny (the golden one), small, or 7b-mot (accounting only on a CPU).",
    ),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A checkpoint folder instead of a random config."),
    task: list[str] = typer.Option(
        ["t2i"], "--task", help="t2i, edit, understand, or all; repeat the option for several."
    ),
    size: int = typer.Option(256, "--size", help="Image side in pixels (generated image; edit input)."),
    steps: int = typer.Option(
        10, "--steps", help="Points of the denoising schedule; the model runs steps - 1 times (BAGEL's meaning)."
    ),
    runs: int = typer.Option(3, "--runs", help="Timed runs per mode after one warm-up; the median is reported."),
    batch: int = typer.Option(1, "--batch", help="Images generated together (several seeds of one prompt)."),
    decode_tokens: int = typer.Option(32, "--decode-tokens", help="Tokens decoded in the understanding task."),
    long_context: int = typer.Option(
        9000, "--long-context", help="Cached tokens before the long-context decoding measurement."
    ),
    cache: bool = CacheOpt,
    cache_interval: int = CacheIntervalOpt,
    cache_order: int = CacheOrderOpt,
    cache_warmup: int = CacheWarmupOpt,
    compile_: bool = CompileOpt,
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    device: str = typer.Option("cpu", "--device", help="Where to run: cpu, cuda, cuda:N or mps (one device)."),
    dtype: Optional[str] = typer.Option(
        None,
        "--dtype",
        help="float32 or bfloat16 (default float32; with --model, as openbagel generate: bfloat16 on CUDA, "
        "a quantized folder's own).",
        show_default=False,
    ),
    quant: Optional[str] = typer.Option(
        None,
        "--quant",
        help="Also run the fast path with the weights quantized (e.g. llm=int8) and compare.",
        show_default=False,
    ),
    offload: Optional[str] = typer.Option(
        None,
        "--offload",
        help="layers: also run with the decoder layers offloaded (prefetched) and compare.",
        show_default=False,
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the records to this JSON file."),
    prompt: str = typer.Option(
        "a red circle above a blue square", "--prompt", help="With --model: the prompt (random token ids otherwise)."
    ),
) -> None:
    """Time each phase against the plain path (optimisations off) in the same run; see benchmarks/RESULTS.md."""

    def body():
        import torch

        from openbagel.bench import TASKS, run_bench

        if threads is not None:
            if threads < 1:
                raise InvalidInputError(f"--threads must be at least 1, got {threads}")
            torch.set_num_threads(threads)
        if json_out is not None:
            _check_json_output(json_out)
        tasks = TASKS if "all" in task else tuple(dict.fromkeys(task))
        run_bench(
            config, tasks, size, steps, runs, batch, 32, decode_tokens, long_context, dtype, device, model,
            _step_cache(cache, cache_interval, cache_order, cache_warmup), json_out, compile_, prompt, log=typer.echo,
            quant=quant, offload=offload,
        )  # fmt: skip

    _run(body)
