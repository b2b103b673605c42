"""Benchmark scores from extracted answers, by each benchmark's official definition.

Pure functions over plain rows: the readers (``openbagel.evals.formats``) and
the answer rules (``openbagel.evals.answers``) come first, so each formula
here is tested on hand-made rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: MMBench's circular copies of question ``i`` have indices ``i + r * 1e6`` (VLMEvalKit's generator).
CIRCULAR_OFFSET = 1_000_000

#: The official MME tool's subtasks: 10 of perception, 4 of cognition (``eval_tool/calculation.py``).
MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


@dataclass(frozen=True)
class ChoiceResult:
    """One answered multiple-choice row: its index, the right letter and the extracted one (``None``: none)."""

    index: int
    answer: str
    prediction: str | None
    category: str = ""

    @property
    def correct(self) -> bool:
        return self.prediction is not None and self.prediction == self.answer


def circular_accuracy(results: Iterable[ChoiceResult]) -> dict[str, float]:
    """MMBench's circular evaluation: a question counts only if every rotation of its options is answered right.

    Rows are grouped by ``index % 1e6`` (VLMEvalKit's ``mcq_circular_eval``); a
    group's category is its original row's (index below 1e6). A row whose
    reply no rule could read counts as wrong, as VLMEvalKit's
    ``--judge exact_matching`` scores it.

    Returns:
        ``{"overall": ..., "<category>": ...}``: fractions of groups passed, in [0, 1].

    Raises:
        ValueError: no rows, or a group without its original row (a file cut
            between the copies of one question).
    """
    groups: dict[int, list[ChoiceResult]] = defaultdict(list)
    for r in results:
        groups[r.index % CIRCULAR_OFFSET].append(r)
    if not groups:
        raise ValueError("no answered rows to score")
    passed: dict[str, list[bool]] = defaultdict(list)
    for g, rows in sorted(groups.items()):
        main = [r for r in rows if r.index == g]
        if not main:
            raise ValueError(
                f"question {g} has rotated copies but not its original row (index {g}): "
                "score the whole file, or use --limit only on files without circular copies"
            )
        ok = all(r.correct for r in rows)
        passed["overall"].append(ok)
        if main[0].category:
            passed[main[0].category].append(ok)
    return {k: sum(v) / len(v) for k, v in passed.items()}


def plain_accuracy(results: Iterable[ChoiceResult]) -> dict[str, float]:
    """Accuracy over rows, overall and per category (fractions in [0, 1]); no circular grouping."""
    by: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        by["overall"].append(r.correct)
        if r.category:
            by[r.category].append(r.correct)
    if not by:
        raise ValueError("no answered rows to score")
    return {k: sum(v) / len(v) for k, v in by.items()}


@dataclass(frozen=True)
class YesNoResult:
    """One answered yes/no row: its group (MME: the category; POPE: the split), image, right and read answers."""

    group: str
    image: str
    answer: str  # "yes" or "no"
    prediction: str | None  # "yes", "no", or None when unreadable

    @property
    def correct(self) -> bool:
        return self.prediction == self.answer


def mme_scores(results: Sequence[YesNoResult]) -> dict[str, dict[str, float]]:
    """MME's scores as the official tool computes them (``eval_tool/calculation.py``).

    Per subtask: ``acc`` = fraction of questions right; ``acc+`` = fraction of
    images whose questions (two per image) are all right; score =
    ``(acc + acc+) * 100`` (at most 200). ``perception`` and ``cognition`` are
    the sums of their subtasks' scores (at most 2000 and 800) and ``total``
    their sum, over the subtasks present.

    Returns:
        ``{subtask: {"acc", "acc_plus", "score"}, "perception": {"score"}, "cognition": {"score"},
        "total": {"score"}}`` (``acc`` values are fractions, scores in MME's points).

    Raises:
        ValueError: no rows.
    """
    if not results:
        raise ValueError("no answered rows to score")
    by_task: dict[str, list[YesNoResult]] = defaultdict(list)
    for r in results:
        by_task[r.group].append(r)
    out: dict[str, dict[str, float]] = {}
    for task, rows in by_task.items():
        images: dict[str, list[bool]] = defaultdict(list)
        for r in rows:
            images[r.image].append(r.correct)
        acc = sum(r.correct for r in rows) / len(rows)
        acc_plus = sum(all(v) for v in images.values()) / len(images)
        out[task] = {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100}
    perception = sum(v["score"] for k, v in out.items() if k in MME_PERCEPTION)
    cognition = sum(v["score"] for k, v in out.items() if k in MME_COGNITION)
    out["perception"] = {"score": perception}
    out["cognition"] = {"score": cognition}
    out["total"] = {"score": perception + cognition}
    return out


def pope_scores(results: Sequence[YesNoResult]) -> dict[str, dict[str, float]]:
    """POPE's metrics per split and over all rows ("yes" is the positive class; RUCAIBox/POPE ``evaluate.py``).

    ``accuracy`` = right / all; ``precision`` = TP / (TP + FP); ``recall`` =
    TP / (TP + FN); ``f1`` = 2PR / (P + R); ``yes_ratio`` = fraction of
    *predictions* that are yes. An undefined ratio (no yes predicted) is 0.

    Returns:
        ``{split: {...}, "overall": {...}}``, fractions in [0, 1].
    """
    if not results:
        raise ValueError("no answered rows to score")
    by: dict[str, list[YesNoResult]] = defaultdict(list)
    for r in results:
        by[r.group].append(r)
        by["overall"].append(r)
    out = {}
    for name, rows in by.items():
        tp = sum(r.prediction == "yes" and r.answer == "yes" for r in rows)
        fp = sum(r.prediction == "yes" and r.answer == "no" for r in rows)
        fn = sum(r.prediction != "yes" and r.answer == "yes" for r in rows)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        out[name] = {
            "accuracy": sum(r.correct for r in rows) / len(rows),
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(r.prediction == "yes" for r in rows) / len(rows),
        }
    return out
