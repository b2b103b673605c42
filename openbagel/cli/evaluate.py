"""``eval`` and ``data``: benchmark scores and training data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from openbagel.cli.common import (
    CacheIntervalOpt,
    CacheOpt,
    CacheOrderOpt,
    CacheWarmupOpt,
    DeviceOpt,
    DtypeOpt,
    QuantOpt,
    StepsOpt,
    _check_json_output,
    _load,
    _run,
    _step_cache,
    check_input_path,
    check_output_path,
    flag,
)
from openbagel.errors import InvalidInputError

MAX_EVAL_ITEMS = 10_000
BenchModelOpt = typer.Option(
    None,
    "--model",
    "-m",
    help="Checkpoint folder (default: the embedded shapes-world model).",
    envvar="OPENBAGEL_MODEL",
    show_envvar=False,
)

eval_app = typer.Typer(help="Score a model on a benchmark.", no_args_is_help=True)
data_app = typer.Typer(help="Write training data sets.", no_args_is_help=True)


@eval_app.command("shapes")
def eval_shapes(
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="Checkpoint folder to score (default: the embedded shapes-world model).",
        envvar="OPENBAGEL_MODEL",
        show_envvar=False,
    ),
    ground_truth: bool = flag(
        "--ground-truth",
        help="Score the world's own renderings and answers instead of a model (should be 1.0); ignores --model.",
    ),
    items: int = typer.Option(20, "--items", help=f"Items per task (1 to {MAX_EVAL_ITEMS})."),
    seed: int = typer.Option(1234, "--seed", help="Seed of the item set (the default is the reported benchmark)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the scores to this JSON file."),
    steps: Optional[int] = StepsOpt,
    cache: bool = CacheOpt,
    cache_interval: int = CacheIntervalOpt,
    cache_order: int = CacheOrderOpt,
    cache_warmup: int = CacheWarmupOpt,
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    quant: Optional[str] = QuantOpt,
) -> None:
    """ShapesEval: text to image (seen and held-out combinations), questions,
    edits, style edits, next frame and thinking, scored by reading the images back."""

    def body():
        import json

        from tqdm.auto import tqdm

        from openbagel.fileio import write_atomically
        from openbagel.shapes.eval import GroundTruth, ModelPredictor, evaluate, make_items

        if not 1 <= items <= MAX_EVAL_ITEMS:
            raise InvalidInputError(f"--items must be between 1 and {MAX_EVAL_ITEMS}, got {items}")
        if json_path is not None:
            _check_json_output(json_path)
        step_cache = _step_cache(cache, cache_interval, cache_order, cache_warmup)
        if steps is not None and steps < 2:
            raise InvalidInputError(f"--steps must be at least 2 (schedule points), got {steps}")
        if ground_truth:
            predictor = GroundTruth()
        else:
            pipe = _load(model, device, dtype, quant=quant)
            predictor = ModelPredictor(pipe, num_timesteps=steps, step_cache=step_cache)
        item_list = make_items(items, seed)
        with tqdm(total=len(item_list), desc="shapes eval", unit="item", disable=ground_truth) as bar:
            scores = evaluate(predictor, item_list, progress=bar.update)
        width = max(len(k) for k in scores)
        typer.echo(f"{'task':<{width}}  score")
        for task, score in scores.items():
            typer.echo(f"{task:<{width}}  {score:.3f}")
        if json_path is not None:
            record = {
                "model": "ground-truth" if ground_truth else str(model or "embedded"),
                "items_per_task": items,
                "seed": seed,
                "steps": steps,
                "step_cache": None if step_cache is None else vars(step_cache),
                "quant": quant,
            }
            text = json.dumps({**record, "scores": scores}, indent=2) + "\n"
            write_atomically(json_path, lambda tmp: Path(tmp).write_text(text))

    _run(body)


def _question_benchmark(bench: str, title: str, data_help: str, writes: str) -> None:
    """Register ``openbagel eval BENCH`` for one question benchmark of :mod:`openbagel.evals.run`."""

    def command(
        data: Path = typer.Option(..., "--data", help=data_help),
        output: Path = typer.Option(
            ..., "--output", "-o", help=f"Folder for predictions.jsonl, scores.json, run.json and {writes}."
        ),
        model: Optional[str] = BenchModelOpt,
        limit: Optional[int] = typer.Option(
            None, "--limit", help="Answer only the first N questions (MMBench: with their circular copies)."
        ),
        resume: bool = flag("--resume", help="Continue a stopped run in --output, skipping answered questions."),
        think: bool = flag("--think", help="Let the model reason before it answers (reasoning saved, not scored)."),
        no_instruction: bool = flag(
            "--no-instruction",
            help="Ask the bare question and options, without BAGEL's instruction sentence (for models never "
            "trained on it, like the embedded one).",
        ),
        device: str = DeviceOpt,
        dtype: Optional[str] = DtypeOpt,
        quant: Optional[str] = QuantOpt,
    ) -> None:
        def body():
            from tqdm.auto import tqdm

            from openbagel.evals.folders import check_run_folder
            from openbagel.evals.run import load_questions, run_benchmark

            check_input_path(data, "--data file")
            check_output_path(output, "--output", folder=True)
            total = len(load_questions(bench, data, limit))  # a bad file or limit fails before the weights load
            check_run_folder(output, resume)
            pipe = _load(model, device, dtype, quant=quant)
            with tqdm(total=total, desc=title, unit="question") as bar:
                scores = run_benchmark(
                    pipe, bench, data, output, limit=limit, resume=resume, think=think,
                    instruction=not no_instruction, progress=bar.update,
                    run_info={"model": str(model or "embedded"), "quant": quant},
                )  # fmt: skip
            _print_scores(scores)
            typer.echo(f"predictions and {writes} written to {output}")

        _run(body)

    command.__doc__ = f"{title}: answer its questions, score them where the file has answers, write {writes}."
    eval_app.command(bench)(command)


def _print_scores(scores: dict, prefix: str = "") -> None:
    if not scores:
        typer.echo("the file holds no answers: predictions written, nothing scored")
    for key, value in scores.items():
        if isinstance(value, dict):
            _print_scores(value, f"{prefix}{key}.")
        else:
            typer.echo(f"{prefix}{key}  {value:.4f}" if isinstance(value, float) else f"{prefix}{key}  {value}")


_question_benchmark(
    "mmbench",
    "MMBench",
    "VLMEvalKit's MMBench TSV (e.g. MMBench_DEV_EN.tsv; circular copies scored circularly).",
    "mmbench_predictions.tsv (VLMEvalKit's evaluator reads its prediction column)",
)
_question_benchmark(
    "mme",
    "MME",
    "VLMEvalKit's MME TSV (MME.tsv).",
    "mme_results/<subtask>.txt (the official MME tool's input)",
)
_question_benchmark(
    "pope",
    "POPE",
    "VLMEvalKit's POPE TSV (POPE.tsv; its category column is the split).",
    "pope_answers.jsonl (one reply per line, as POPE's evaluate.py reads)",
)
_question_benchmark(
    "mmmu",
    "MMMU",
    "MMMU's parquet file of one subject from its dataset card, or VLMEvalKit's MMMU_DEV_VAL.tsv.",
    "mmmu_prediction.json (MMMU's main_eval_only.py input)",
)


@eval_app.command("geneval")
def eval_geneval(
    data: Path = typer.Option(..., "--data", help="GenEval's prompts/evaluation_metadata.jsonl (or the _long one)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the tree GenEval's scorer reads."),
    model: Optional[str] = BenchModelOpt,
    images: int = typer.Option(4, "--images", help="Images per prompt (BAGEL's run: 4)."),
    seed: int = typer.Option(42, "--seed", help="Image k of prompt i uses seed + i * images + k."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N prompts."),
    resume: bool = flag("--resume", help="Continue a stopped run in --output, skipping finished prompts."),
    think: bool = flag("--think", help="Let the model plan the picture in text before drawing it."),
    steps: Optional[int] = StepsOpt,
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    quant: Optional[str] = QuantOpt,
) -> None:
    """GenEval: images for its prompts in the tree its scorer reads; prints the scoring commands."""

    def body():
        from tqdm.auto import tqdm

        from openbagel.evals.folders import check_limit, check_run_folder
        from openbagel.evals.geneval import SCORER_COMMANDS, read_geneval, run_geneval

        check_input_path(data, "--data file")
        check_output_path(output, "--output", folder=True)
        total = len(read_geneval(data))  # a bad file or setting fails before the weights load
        check_limit(limit)
        _check_run_settings(seed, steps)
        if images < 1:
            raise InvalidInputError(f"--images must be at least 1, got {images}")
        check_run_folder(output, resume)
        pipe = _load(model, device, dtype, quant=quant)
        with tqdm(total=min(total, limit or total), desc="GenEval", unit="prompt") as bar:
            run_geneval(
                pipe, data, output, images_per_prompt=images, seed=seed, limit=limit, resume=resume,
                think=think, num_timesteps=steps, progress=bar.update,
                run_info={"model": str(model or "embedded"), "quant": quant},
            )  # fmt: skip
        typer.echo(f"images written to {output}; score them in a clone of djghosh13/geneval with its detector:")
        for command in SCORER_COMMANDS:
            typer.echo("  " + command.format(out=output))

    _run(body)


def _check_run_settings(seed: int, steps: int | None) -> None:
    """The image benchmarks' --seed and --steps, refused before the weights load."""
    if seed < 0:
        raise InvalidInputError(f"--seed must be 0 or more, got {seed}")
    if steps is not None and steps < 2:
        raise InvalidInputError(f"--steps must be at least 2 (schedule points), got {steps}")


_JUDGED = {
    "gedit": ("GEdit-Bench", "fullset/<task>/<language>/<key>.png with <key>_SRCIMG.png beside each"),
    "imgedit": ("ImgEdit", "<key>.png"),
    "wise": ("WISE", "<prompt_id>.png"),
}


def _judged_benchmark(bench: str) -> None:
    """Register ``openbagel eval BENCH`` for an image benchmark scored by a judge model (see openbagel.evals.editing)."""
    title, layout = _JUDGED[bench]
    data_help = {
        "gedit": "GEdit-Bench's parquet file (from its dataset card).",
        "imgedit": "ImgEdit's Benchmark/Basic/basic_edit.json (originals under --images).",
        "wise": "WISE's JSON prompt list (one file; pass --data once per category file).",
    }[bench]

    def command(
        data: list[Path] = typer.Option(..., "--data", help=data_help),
        output: Path = typer.Option(..., "--output", "-o", help=f"Folder for the images: {layout}."),
        model: Optional[str] = BenchModelOpt,
        images: Optional[Path] = typer.Option(None, "--images", help="ImgEdit only: the folder of the originals."),
        language: Optional[str] = typer.Option(
            None, "--language", help="GEdit-Bench only: en (default), cn, or all.", show_default=False
        ),
        seed: int = typer.Option(42, "--seed", help="Image i (file order) uses seed + i."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images."),
        resume: bool = flag("--resume", help="Continue a stopped run in --output, skipping images already made."),
        think: bool = flag("--think", help="Let the model plan in text before drawing (BAGEL's WISE 0.70)."),
        steps: Optional[int] = StepsOpt,
        device: str = DeviceOpt,
        dtype: Optional[str] = DtypeOpt,
        quant: Optional[str] = QuantOpt,
    ) -> None:
        def body():
            from tqdm.auto import tqdm

            from openbagel.evals.editing import gedit_jobs, imgedit_jobs, run_image_jobs, wise_jobs
            from openbagel.evals.folders import check_limit, check_run_folder
            from openbagel.evals.formats import check_images, read_rows

            for path in data:
                check_input_path(path, "--data file")
            check_output_path(output, "--output", folder=True)
            if bench != "wise" and len(data) != 1:
                raise InvalidInputError(f"{title} takes one --data file, got {len(data)}")
            if images is not None and bench != "imgedit":
                raise InvalidInputError(f"--images is for imgedit (its originals); {title} does not take it")
            if language is not None and bench != "gedit":
                raise InvalidInputError(f"--language is for gedit; {title} does not take it")
            if bench == "gedit":
                lang = language or "en"
                jobs = gedit_jobs(read_rows(data[0]), None if lang == "all" else lang)
            elif bench == "imgedit":
                if images is None:
                    raise InvalidInputError("ImgEdit needs --images, the folder its basic_edit.json ids are under")
                jobs = imgedit_jobs(data[0], images)
            else:
                jobs = wise_jobs(data)
            check_limit(limit)
            _check_run_settings(seed, steps)
            check_images(
                [(job.path, job.source) for job in jobs if job.source is not None and not isinstance(job.source, Path)]
            )
            check_run_folder(output, resume)
            pipe = _load(model, device, dtype, quant=quant)
            with tqdm(total=min(len(jobs), limit or len(jobs)), desc=title, unit="image") as bar:
                run_image_jobs(
                    pipe, jobs, output, seed=seed, limit=limit, resume=resume, think=think,
                    num_timesteps=steps, progress=bar.update,
                    run_info={"benchmark": title, "data": [str(p.resolve()) for p in data], "language": language or "",
                              "model": str(model or "embedded"), "quant": quant},
                )  # fmt: skip
            typer.echo(
                f"images written to {output}; score them with {title}'s scorer and a judge (README, Public benchmarks)"
            )

        _run(body)

    command.__doc__ = f"{title}: images in the layout its judge-based scorer reads ({layout})."
    eval_app.command(bench)(command)


for _bench in _JUDGED:
    _judged_benchmark(_bench)


@data_app.command("shapes")
def data_shapes(
    output: Path = typer.Argument(..., help="Folder for t2i.parquet, edit.parquet, chat.jsonl and images/."),
    count: int = typer.Option(1000, "--count", help="Records of each kind."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world."),
    split: str = typer.Option("train", "--split", help="train, or test (with the held-out combinations)."),
) -> None:
    """Write the shapes world in the trainer's file formats."""

    def body():
        from openbagel.shapes.export import write_datasets

        if count < 1:
            raise InvalidInputError(f"--count must be at least 1, got {count}")
        if split not in ("train", "test"):
            raise InvalidInputError(f"--split must be train or test, got {split!r}")
        if not str(output).strip():
            raise InvalidInputError("give an output folder")
        check_output_path(output, "output", folder=True)
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise InvalidInputError(f"{str(output)!r} exists and is not an empty folder; give a new folder")
        try:
            rows = write_datasets(output, count, seed, split)
        except OSError as e:
            raise InvalidInputError(f"cannot write to {str(output)!r}: {e.strerror or e}") from None
        typer.echo(", ".join(f"{name}: {n} row(s)" for name, n in rows.items()) + f" written to {output}")

    _run(body)


@data_app.command("shapes-bench")
def data_shapes_bench(
    output: Path = typer.Argument(..., help="Folder for the files (MMBench_shapes.tsv, MME_shapes.tsv, ...)."),
    count: int = typer.Option(8, "--count", help="Questions (images, prompts) per benchmark."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world."),
) -> None:
    """Small shapes-world files in the public benchmarks' formats (MMBench, MME, POPE, MMMU, GenEval,
    GEdit-Bench, ImgEdit, WISE), to try `openbagel eval BENCH` offline before the real data."""

    def body():
        from openbagel.evals.shapes_files import write_shapes_benchmarks

        if not 1 <= count <= MAX_EVAL_ITEMS:
            raise InvalidInputError(f"--count must be between 1 and {MAX_EVAL_ITEMS}, got {count}")
        check_output_path(output, "output", folder=True)
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise InvalidInputError(f"{str(output)!r} exists and is not an empty folder; give a new folder")
        for bench, path in write_shapes_benchmarks(output, count, seed).items():
            extra = f"  (--images {output / 'imgedit_originals'})" if bench == "imgedit" else ""
            typer.echo(f"{bench:8s} {path}{extra}")

    _run(body)
