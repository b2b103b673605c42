"""Reading a model's reply the way each public benchmark's own evaluator does.

A benchmark's score depends on how its evaluator turns free text into an
answer as much as on the model, so each rule here follows one evaluator, named
in its docstring, including its odd corners (a letter too early in a long
reply does not count for MMBench; anything without "no" is a "yes" for POPE).
None of these functions calls a judge model: where an evaluator would ask one,
they return ``None`` and the caller scores the item as unanswered.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Mapping, Sequence

#: Option letters, in order, as the benchmarks' files name their columns.
OPTION_LETTERS = "ABCDEFGHIJ"

# VLMEvalKit's matching: these characters separate tokens like spaces do.
_MCQ_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
# VLMEvalKit (since 2026-06) also reads "answer is B" / "answer is **B**", any case.
_ANSWER_IS = re.compile(r"(?:correct\s+)?answer\s+is\s+\**([abcd])\**", re.IGNORECASE)
# Replies VLMEvalKit scores as refusals (wrong) before any matching.
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def infer_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option a reply picks, by VLMEvalKit's rule-based matching (MMBench, MMMU in VLMEvalKit).

    Follows ``can_infer_option`` then ``can_infer_text`` of VLMEvalKit's
    ``vlmeval/utils/matching_util.py``:

    1. The characters ``. ( ) [ ] , : ; ! * # { }`` become spaces and the reply
       is split into tokens. If exactly one option letter (upper case) is a
       token, it is the answer, provided it first appears among the last four
       tokens ("B.", "(B)", "The answer is B"; not "B is right because ...").
    2. "answer is X" (or "**X**", any case; A to D only).
    3. Otherwise, in lower case: if exactly one option's text occurs in the
       reply (a bare option text, "B) cat"), that option; replies longer than
       twice the options' texts together never match this way.

    Args:
        prediction: the model's reply.
        options: letter -> option text, in order (``{"A": "dog", "B": "cat"}``).

    Returns:
        The letter, or ``None`` when the rules find no single answer ("A or B",
        an empty reply): VLMEvalKit would then ask its judge model, or score the
        item wrong with ``--judge exact_matching``. Its refusal replies ("Cannot
        determine the answer", ...) are ``None`` too.
    """
    if any(refusal in prediction for refusal in _REFUSALS):
        return None
    tokens = prediction.translate(_MCQ_SEPARATORS).split()
    found = [letter for letter in options if letter in tokens]
    if len(found) == 1 and tokens.index(found[0]) > len(tokens) - 5:
        return found[0]
    stated = _ANSWER_IS.search(prediction)
    if stated and stated.group(1).upper() in options:
        return stated.group(1).upper()
    text = prediction.lower()
    if len(text) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    matches = [letter for letter, value in options.items() if str(value).lower() in text]
    return matches[0] if len(matches) == 1 else None


class MMMUChoiceParser:
    """MMMU's official multiple-choice parser (``parse_multi_choice_response``, MMMU ``mmmu/utils/eval_utils.py``).

    In order: letters written as ``(X)``; else letters standing alone between
    spaces; else, for replies of more than five words, options whose text
    occurs in the reply. Several candidates: the one written last. None: a
    random letter, as the official script does; its generator is seeded once
    (42) and drawn in the order replies are parsed, so parse one benchmark's
    replies with one parser, in file order, to get the official numbers.
    """

    def __init__(self, seed: int = 42):
        self._rng = random.Random(seed)

    def __call__(self, prediction: str, options: Mapping[str, str]) -> str:
        """The letter picked by ``prediction`` among ``options`` (letter -> text); always one of the letters."""
        if not options:
            raise ValueError("MMMU choice parsing needs at least one option")
        for char in ",.!?;:'":  # one character after the other, as the official loop does
            prediction = prediction.strip(char)
        reply = " " + prediction + " "
        by_text = False
        found = [c for c in options if f"({c})" in reply]
        brackets = bool(found)
        if not found:
            found = [c for c in options if f" {c} " in reply]
        if not found and len(reply.split()) > 5:
            found = [c for c, text in options.items() if str(text).lower() in reply.lower()]
            by_text = bool(found)
        if not found:
            return self._rng.choice(list(options))
        if len(found) == 1:
            return found[0]
        if by_text:
            return max(found, key=lambda c: reply.lower().rfind(str(options[c]).lower()))
        return max(found, key=lambda c: reply.rfind(f"({c})" if brackets else f" {c} "))


def yes_no_mme(prediction: str) -> str | None:
    """``"yes"``, ``"no"`` or ``None``, by the official MME tool (``eval_tool/calculation.py``).

    The reply in lower case is taken whole if it is "yes" or "no"; otherwise
    only its first four characters count: "yes" in them, then "no". Anything
    else (``None``) scores as a wrong answer.
    """
    reply = prediction.lower()  # no strip: " no" reads as no, "   no" as nothing, as in the tool
    if reply in ("yes", "no"):
        return reply
    head = reply[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return None


def yes_no_pope(prediction: str) -> str:
    """``"yes"`` or ``"no"``, by the official POPE evaluator (RUCAIBox/POPE ``evaluate.py``).

    Only the text before the first period counts, commas removed, split on
    spaces: "No", "no" or "not" among the words is a no; **anything else is a
    yes**, an empty reply included (the official rule; it is what the published
    F1 scores were computed with).
    """
    words = prediction.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def options_of(row: Mapping[str, object], letters: Sequence[str] = OPTION_LETTERS) -> dict[str, str]:
    """The options of a benchmark row: its letter columns that hold text, in order (``{"A": ..., ...}``).

    Empty cells, ``None`` and NaN (how pandas-written files leave unused
    columns) are not options.
    """
    out = {}
    for letter in letters:
        value = row.get(letter)
        if value is None or (isinstance(value, float) and value != value):
            continue
        text = str(value).strip()
        if text and text.lower() != "nan":
            out[letter] = text
    return out


# MMMU's open answers (``parse_open_response`` / ``eval_open`` of MMMU ``mmmu/utils/eval_utils.py``)
_KEY_WORDS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_NUMBER_PATTERNS = (
    r"-?\b\d{1,3}(?:,\d{3})+\b",  # with thousands commas
    r"-?\d+(?:\.\d+)?[eE][+-]?\d+",  # scientific
    r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])",  # plain
)


def _mmmu_normal_forms(text: str) -> list[str | float]:
    """A number becomes a float rounded to 2 places; text goes lower case (one character padded with a space)."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


def mmmu_open_answers(prediction: str) -> list[str | float]:
    """The candidate answers MMMU's official parser reads from a free-text reply (normalised, no repeats).

    Per sentence, the shortest tail after a key word ("is", "so", "therefore",
    "answer", ...; "=" too in the last sentence); the whole reply if none; plus
    every number in those tails.
    """
    text = prediction.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", text)
    tails = []
    for n, sentence in enumerate(sentences):
        words = _KEY_WORDS + (("=",) if n == len(sentences) - 1 else ())
        found = [sentence.split(w)[-1].strip() for w in words if w in sentence]
        shortest = min(found, key=len) if found else ""
        if shortest and shortest not in (":", ",", ".", "!", "?", ";", "'"):
            tails.append(shortest)
    tails = tails or [text]
    candidates = tails + [m for t in tails for pattern in _NUMBER_PATTERNS for m in re.findall(pattern, t)]
    out: list[str | float] = []
    for c in candidates:
        for form in _mmmu_normal_forms(c):
            if form not in out:
                out.append(form)
    return out


def mmmu_open_correct(gold: str | Sequence[str], prediction: str) -> bool:
    """MMMU's ``eval_open``: a gold text inside a candidate text, or a gold number equal to a candidate number.

    ``gold`` may be one answer or several (MMMU stores some as a list, also
    as the text of a Python list: ``"['1', '2']"``).
    """
    if isinstance(gold, str) and gold.strip().startswith("["):
        try:
            gold = [str(g) for g in ast.literal_eval(gold.strip())]
        except (ValueError, SyntaxError):
            pass
    golds = [gold] if isinstance(gold, str) else list(gold)
    forms = [f for g in golds for f in _mmmu_normal_forms(g)]
    for cand in mmmu_open_answers(prediction):
        if isinstance(cand, str):
            if any(isinstance(f, str) and f in cand for f in forms):
                return True
        elif cand in forms:
            return True
    return False
