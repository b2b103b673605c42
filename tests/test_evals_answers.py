"""Answer extraction and scores of the public benchmarks, on hand-made rows with hand-computed results."""

import pytest

from openbagel.evals.answers import (
    MMMUChoiceParser,
    infer_choice,
    mmmu_open_answers,
    mmmu_open_correct,
    options_of,
    yes_no_mme,
    yes_no_pope,
)
from openbagel.evals.scores import ChoiceResult, YesNoResult, circular_accuracy, mme_scores, plain_accuracy, pope_scores

OPTIONS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("[B]", "B"),
        ("The answer is B", "B"),
        ("B) cat", "B"),
        ("cat", "B"),  # a bare option text
        ("Cat.", "B"),  # the text rule is case-blind
        ("A cat", "A"),  # the letter rule comes first
        ("answer is **C** since A and D are wrong", "C"),  # several letters, but stated
        ("the answer is d", "D"),
        ("A or B", None),  # two letters
        ("", None),
        ("b", None),  # letters are upper case
        ("I think B is right because the cat sits", None),  # letter too early; too long for the text rule
        ("a dog and a cat", None),  # two option texts
        ("Cannot determine the answer", None),  # a refusal
        ("E", None),  # not an option
    ],
)
def test_infer_choice_follows_vlmevalkit(reply, letter):
    assert infer_choice(reply, OPTIONS) == letter


def test_mmmu_parser_rules_and_seeded_fallback():
    parse = MMMUChoiceParser()
    assert parse("(C) is it", OPTIONS) == "C"
    assert parse("B.", OPTIONS) == "B"
    assert parse("A or B", OPTIONS) == "B"  # several: the one written last
    assert parse("(A) no, (D)", OPTIONS) == "D"
    assert parse("The animal shown in the picture is a cat", OPTIONS) == "B"  # more than 5 words: by text
    assert parse("it is a dog, not a bird at all", OPTIONS) == "C"  # by text, the last written
    # no candidate: random.Random(42) drawn in order, as the official module-level seed
    import random

    rng = random.Random(42)
    expected = [rng.choice("ABCD") for _ in range(3)]
    fallback = MMMUChoiceParser()
    assert [fallback("B) cat", OPTIONS), fallback("", OPTIONS), fallback("cat", OPTIONS)] == expected
    with pytest.raises(ValueError, match="at least one option"):
        parse("A", {})


@pytest.mark.parametrize(
    "reply, answer",
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("Yes, there is.", "yes"),
        ("No.", "no"),
        ("nope", "no"),
        ("There is a dog", None),
        ("", None),
        ("I think yes", None),
        (" no", "no"),
        ("   no", None),
    ],
)
def test_yes_no_mme_reads_the_first_four_characters(reply, answer):
    assert yes_no_mme(reply) == answer


@pytest.mark.parametrize(
    "reply, answer",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no, there is not", "no"),
        ("There is not a dog.", "no"),
        ("Yes. No dog.", "yes"),
        ("", "yes"),
        ("Nothing", "yes"),
        ("NO", "yes"),
    ],
)
def test_yes_no_pope_is_yes_unless_it_says_no(reply, answer):
    assert yes_no_pope(reply) == answer


def test_options_of_skips_empty_and_nan_cells():
    row = {"A": "dog", "B": 3, "C": float("nan"), "D": "", "E": None, "question": "q"}
    assert options_of(row) == {"A": "dog", "B": "3"}


def test_circular_accuracy_needs_every_rotation_right():
    rows = [
        # question 1: all four rotations right -> passes
        ChoiceResult(1, "A", "A", "colour"),
        ChoiceResult(1_000_001, "D", "D"),
        ChoiceResult(2_000_001, "C", "C"),
        ChoiceResult(3_000_001, "B", "B"),
        # question 2: one rotation wrong -> fails
        ChoiceResult(2, "B", "B", "colour"),
        ChoiceResult(1_000_002, "A", "C"),
        # question 3: one rotation unreadable -> fails
        ChoiceResult(3, "C", "C", "shape"),
        ChoiceResult(1_000_003, "B", None),
        # question 4: a plain row -> passes
        ChoiceResult(4, "A", "A", "shape"),
    ]
    assert circular_accuracy(rows) == {"overall": 0.5, "colour": 0.5, "shape": 0.5}
    # plain: 7 of 9 rows right; categories are on the original rows only (all four right)
    assert plain_accuracy(rows) == pytest.approx({"overall": 7 / 9, "colour": 1.0, "shape": 1.0})
    with pytest.raises(ValueError, match="not its original row"):
        circular_accuracy([ChoiceResult(1_000_005, "A", "A")])
    with pytest.raises(ValueError, match="no answered rows"):
        circular_accuracy([])


def test_mme_scores_acc_plus_and_totals():
    rows = [
        YesNoResult("existence", "1.jpg", "yes", "yes"),
        YesNoResult("existence", "1.jpg", "no", "no"),
        YesNoResult("existence", "2.jpg", "yes", "yes"),
        YesNoResult("existence", "2.jpg", "no", None),
        YesNoResult("code_reasoning", "3.png", "yes", "no"),
        YesNoResult("code_reasoning", "3.png", "no", "no"),
    ]
    s = mme_scores(rows)
    assert s["existence"] == pytest.approx({"acc": 0.75, "acc_plus": 0.5, "score": 125.0})
    assert s["code_reasoning"] == pytest.approx({"acc": 0.5, "acc_plus": 0.0, "score": 50.0})
    assert s["perception"]["score"] == pytest.approx(125.0)
    assert s["cognition"]["score"] == pytest.approx(50.0)
    assert s["total"]["score"] == pytest.approx(175.0)


def test_pope_scores_yes_is_positive():
    rows = [
        YesNoResult("random", "a", "yes", "yes"),  # TP
        YesNoResult("random", "b", "yes", "no"),  # FN
        YesNoResult("random", "c", "no", "yes"),  # FP
        YesNoResult("random", "d", "no", "no"),  # TN
        YesNoResult("adversarial", "e", "no", "no"),  # TN
        YesNoResult("adversarial", "f", "yes", "yes"),  # TP
    ]
    s = pope_scores(rows)
    assert s["random"] == pytest.approx({"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5})
    assert s["adversarial"] == pytest.approx(
        {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5}
    )
    # overall: TP 2, FP 1, FN 1 -> P = R = F1 = 2/3
    assert s["overall"] == pytest.approx(
        {"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.5}
    )
    none_yes = pope_scores([YesNoResult("random", "a", "yes", "no")])["random"]
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0


def test_mmmu_open_answers_follow_the_official_parser():
    # key-word tails, every number in them (the thousands comma too, and its "000" as the plain pattern reads it)
    assert sorted(mmmu_open_answers("The answer is 3,000.")) == [0.0, 3000.0]
    assert mmmu_open_answers("two") == ["two"]  # no key word: the whole reply
    assert mmmu_open_answers("x = 4.567") == [4.57]  # "=" in the last sentence; numbers rounded to 2 places
    assert mmmu_open_answers("So the result is 2e3. Therefore it is big") == ["big"]  # the shortest tail
    assert mmmu_open_correct("3000", "The answer is 3,000.")
    assert mmmu_open_correct("4.57", "x = 4.567")
    assert mmmu_open_correct("['1', '2']", "it is 2")  # a list of golds, as text
    assert mmmu_open_correct("Paris", "The capital is paris")  # a gold text inside a candidate
    assert mmmu_open_correct("a", "a cat")  # one letter matches with a space beside it
    assert not mmmu_open_correct("three", "one")
    assert not mmmu_open_correct("12", "it is 121")  # numbers compare as numbers
