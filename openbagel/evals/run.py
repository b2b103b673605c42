"""Answering a question benchmark with a pipeline, resumably, then scoring it and writing its official files.

``OUT/predictions.jsonl`` gets one line per answered question as soon as it
is answered (``id``, ``reply``, ``reasoning``), so a stopped run continues
with ``resume=True`` and skips what is done; ``OUT/run.json`` records the
model, the data file and the decoding settings; ``OUT/scores.json`` the
scores; each benchmark also writes the file its official evaluator or
submission takes (see :data:`BENCHMARKS`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from openbagel.errors import InvalidInputError
from openbagel.evals.answers import MMMUChoiceParser, infer_choice, mmmu_open_correct, yes_no_mme, yes_no_pope
from openbagel.evals.folders import check_limit, open_run_folder, record_run, safe_name
from openbagel.evals.formats import (
    Question,
    check_images,
    decode_image,
    mmbench_questions,
    mmmu_questions,
    read_rows,
    yes_no_questions,
)
from openbagel.evals.scores import (
    CIRCULAR_OFFSET,
    ChoiceResult,
    YesNoResult,
    circular_accuracy,
    mme_scores,
    plain_accuracy,
    pope_scores,
)
from openbagel.fileio import write_atomically

PREDICTIONS = "predictions.jsonl"


@dataclass(frozen=True)
class QuestionBenchmark:
    """How one benchmark is asked, scored and written.

    Attributes:
        title: its usual name.
        questions: rows of its file -> questions (prompts built as BAGEL's scripts build them).
        max_new_tokens: the answer length BAGEL's script allows.
        finish: ``(questions, replies by id, OUT) -> scores``; also writes the official files into OUT.
        first_image_scale: the first image enlarged this many times, bilinear (BAGEL's MMMU script: 2).
    """

    title: str
    questions: Callable[[list[dict[str, object]]], list[Question]]
    max_new_tokens: int
    finish: Callable[[list[Question], dict[str, str], Path], dict]
    first_image_scale: int = 1


def _write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _finish_mmbench(questions: list[Question], replies: dict[str, str], out: Path) -> dict:
    letters = "ABCDE"
    rows = [["index", "question", *letters, "answer", "category", "prediction"]]
    results = []
    for q in questions:
        reply = replies[q.id]
        options = [q.options.get(k, "") for k in letters]
        rows.append([_one_line(c) for c in (q.id, q.meta["question"], *options, q.answer or "", q.category, reply)])
        if q.answer is not None:
            results.append(ChoiceResult(int(q.id), q.answer, infer_choice(reply, q.options), q.category))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows(rows)

    write_atomically(out / "mmbench_predictions.tsv", write)
    if not results:
        return {}
    circular = any(r.index >= CIRCULAR_OFFSET for r in results)
    scores = circular_accuracy(results) if circular else plain_accuracy(results)
    return {"accuracy" if not circular else "circular_accuracy": scores}


def _finish_mme(questions: list[Question], replies: dict[str, str], out: Path) -> dict:
    by_task: dict[str, list[str]] = {}
    results = []
    for q in questions:
        reply = replies[q.id]
        gt = (q.answer or "").capitalize()
        by_task.setdefault(q.category, []).append(
            "\t".join([q.meta["image"], _one_line(q.meta["question"]), gt, _one_line(reply)])
        )
        if q.answer is not None:
            results.append(YesNoResult(q.category, q.meta["image"], q.answer, yes_no_mme(reply)))
    folder = out / "mme_results"
    folder.mkdir(exist_ok=True)
    for task, lines in by_task.items():
        _write_text(folder / f"{safe_name(task, 'MME category')}.txt", "\n".join(lines) + "\n")
    return mme_scores(results) if results else {}


def _finish_pope(questions: list[Question], replies: dict[str, str], out: Path) -> dict:
    lines = []
    results = []
    for q in questions:
        reply = replies[q.id]
        lines.append(json.dumps({"question_id": q.id, "prompt": q.meta["question"], "text": reply, "answer": reply}))
        if q.answer is not None:
            results.append(YesNoResult(q.category or "pope", q.id, q.answer, yes_no_pope(reply)))
    _write_text(out / "pope_answers.jsonl", "\n".join(lines) + "\n")
    return pope_scores(results) if results else {}


def _finish_mmmu(questions: list[Question], replies: dict[str, str], out: Path) -> dict:
    parse = MMMUChoiceParser()  # one parser in file order: the official random fallback sequence
    predictions: dict[str, str] = {}
    right: dict[str, list[bool]] = {"multiple_choice": [], "open": []}
    for q in questions:
        reply = replies[q.id]
        if q.meta["question_type"] == "multiple-choice" and q.options:
            predictions[q.id] = parse(reply, q.options)
            if q.answer is not None:
                right["multiple_choice"].append(predictions[q.id] == q.answer)
        else:
            predictions[q.id] = reply
            if q.answer is not None:
                right["open"].append(mmmu_open_correct(q.answer, reply))
    _write_text(out / "mmmu_prediction.json", json.dumps(predictions, indent=2, ensure_ascii=False) + "\n")
    every = right["multiple_choice"] + right["open"]
    if not every:
        return {}
    scores = {k: {"accuracy": sum(v) / len(v), "questions": len(v)} for k, v in right.items() if v}
    return {"overall": {"accuracy": sum(every) / len(every), "questions": len(every)}, **scores}


#: The question benchmarks: their files (VLMEvalKit TSVs; MMMU also its parquet) and official outputs.
BENCHMARKS: dict[str, QuestionBenchmark] = {
    # mmbench_predictions.tsv: the rows with a `prediction` column, which VLMEvalKit's evaluator reads
    "mmbench": QuestionBenchmark("MMBench", mmbench_questions, 100, _finish_mmbench),
    # mme_results/<subtask>.txt: image, question, answer, reply, the official MME tool's input
    "mme": QuestionBenchmark("MME", lambda rows: yes_no_questions(rows, "MME"), 20, _finish_mme),
    # pope_answers.jsonl: one reply per line in file order (official POPE evaluate.py; LLaVA's `text`)
    "pope": QuestionBenchmark("POPE", lambda rows: yes_no_questions(rows, "POPE"), 100, _finish_pope),
    # mmmu_prediction.json: id -> letter (parsed) or reply, the input of MMMU's main_eval_only.py
    "mmmu": QuestionBenchmark("MMMU", mmmu_questions, 10, _finish_mmmu, first_image_scale=2),
}


def _done(path: Path) -> dict[str, dict]:
    """Answered lines of a predictions file; a torn last line (a kill mid-write) or any line that is not an
    answer record is dropped from the file (and answered again)."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    good = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("reply"), str):
            continue  # not one of ours: answered again
        done[str(record["id"])] = record
        good.append(line)
    _write_text(path, "".join(f"{line}\n" for line in good))
    return done


def _first(questions: list[Question], n: int, *, circular: bool) -> list[Question]:
    """The first ``n`` questions; with ``circular``, the first ``n`` originals and all their rotated copies."""
    if not circular:
        return questions[:n]
    keep: dict[int, None] = {}
    for q in questions:
        if len(keep) == n:
            break
        keep.setdefault(int(q.id) % CIRCULAR_OFFSET)
    return [q for q in questions if int(q.id) % CIRCULAR_OFFSET in keep]


def _check_length(pipe, q: Question, prompt: str) -> None:
    """Refuse a question whose text alone overflows the model's context (before a long, doomed prefill)."""
    limit = pipe.config.llm.max_position_embeddings
    # a token is at least one character: a longer text is refused without tokenizing it
    if len(prompt) > 16 * limit or len(pipe.tokenizer.encode(prompt)) > limit:
        raise InvalidInputError(
            f"question {q.id}: its text ({len(prompt)} characters) is longer than the model's context "
            f"({limit} positions); shorten or drop that row"
        )


def load_questions(bench: str, data: Path, limit: int | None = None) -> list[Question]:
    """The questions a run of ``bench`` on ``data`` asks (``limit``: see :func:`run_benchmark`), checked.

    Raises:
        InvalidInputError: an unknown benchmark, a bad file or limit, repeated question ids, or an image
            that cannot be read (named by its row).
    """
    if bench not in BENCHMARKS:
        raise InvalidInputError(f"unknown benchmark {bench!r}; choose one of {', '.join(BENCHMARKS)}")
    check_limit(limit)
    questions = BENCHMARKS[bench].questions(read_rows(data))
    if limit is not None:
        questions = _first(questions, limit, circular=bench == "mmbench")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise InvalidInputError(f"{data}: question ids repeat; each row needs its own index")
    check_images([(q.id, cell) for q in questions for cell in q.images])
    return questions


def run_benchmark(
    pipe,
    bench: str,
    data: Path,
    out: Path,
    *,
    limit: int | None = None,
    resume: bool = False,
    think: bool = False,
    instruction: bool = True,
    progress: Callable[[int], None] | None = None,
    run_info: dict | None = None,
) -> dict:
    """Answer every question of ``data`` (or the first ``limit``), score them and write the official files.

    Args:
        pipe: a :class:`~openbagel.pipeline.BagelPipeline` (greedy decoding, BAGEL's answer lengths).
        bench: a key of :data:`BENCHMARKS`.
        data: the benchmark's file.
        out: the output folder (created); must be new or empty unless ``resume``.
        limit: answer only the first ``limit`` questions (MMBench: the first ``limit`` questions with all
            their circular copies, wherever they are in the file).
        resume: continue a stopped run in ``out``: questions already in its predictions are skipped.
        think: let the model reason before answering (reasoning saved, not scored).
        instruction: append BAGEL's instruction sentence to each question (``False``: the bare question
            and options, for models never trained on such instructions, like the embedded one).
        progress: called with 1 after each question (answered now, or before a resume).
        run_info: more fields for ``run.json`` (the model's name, ...).

    Returns:
        The scores (empty when the file holds no answers), also written to ``out/scores.json``.

    Raises:
        InvalidInputError: an unknown benchmark, a bad file, or an output folder that holds another run.
    """
    questions = load_questions(bench, data, limit)
    spec = BENCHMARKS[bench]
    out = open_run_folder(out, resume)
    info = {"benchmark": spec.title, "data": str(Path(data).resolve()), "questions": len(questions),
            "think": think, "instruction": instruction, "decoding": "greedy",
            "max_new_tokens": None if think else spec.max_new_tokens, **(run_info or {})}  # fmt: skip
    record_run(out, info, resume)
    done = _done(out / PREDICTIONS)
    with (out / PREDICTIONS).open("a", encoding="utf-8") as log:
        for q in questions:
            if q.id in done:
                if progress is not None:
                    progress(1)
                continue
            _check_length(pipe, q, q.prompt(instruction))
            images = [decode_image(cell) for cell in q.images]
            if images and spec.first_image_scale != 1:
                s = spec.first_image_scale
                images[0] = images[0].resize((images[0].width * s, images[0].height * s), Image.Resampling.BILINEAR)
            result = pipe.understand(
                images or None,
                q.prompt(instruction),
                think=think,
                max_new_tokens=None if think else spec.max_new_tokens,
            )
            done[q.id] = {"id": q.id, "reply": result.text, "reasoning": result.reasoning}
            log.write(json.dumps(done[q.id], ensure_ascii=False) + "\n")
            log.flush()
            if progress is not None:
                progress(1)
    scores = spec.finish(questions, {q.id: done[q.id]["reply"] for q in questions}, out)
    _write_text(out / "scores.json", json.dumps(scores, indent=2) + "\n")
    return scores
