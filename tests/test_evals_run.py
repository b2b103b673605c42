"""The question-benchmark runner: resumable answering, scores and the official files, with a scripted model."""

import json

import pytest

from openbagel.errors import InvalidInputError
from openbagel.evals.run import run_benchmark
from openbagel.pipeline import TextResult
from tests.test_evals_formats import b64, write_tsv


class ScriptedModel:
    """Answers from a table keyed by the prompt's first line; records what it was asked."""

    def __init__(self, replies):
        from types import SimpleNamespace

        self.replies, self.asked = replies, []
        self.config = SimpleNamespace(llm=SimpleNamespace(max_position_embeddings=4096))
        self.tokenizer = SimpleNamespace(encode=str.split)

    def understand(self, images, prompt, *, think=False, max_new_tokens=None):
        self.asked.append((len(images or []), prompt, max_new_tokens))
        return TextResult(self.replies[prompt.split("\n")[0]], "because" if think else None)


def mmbench_file(tmp_path):
    rows = []
    for i, (q, right) in enumerate([("Q1", "red"), ("Q2", "blue")], start=1):
        opts = ["red", "blue"]
        for r in range(2):  # the original and one rotation
            rotated = opts[r:] + opts[:r]
            rows.append({"index": i + r * 1_000_000, "question": q, "hint": "", "A": rotated[0], "B": rotated[1],
                         "answer": "AB"[rotated.index(right)], "category": "colour",
                         "image": b64("red") if r == 0 else str(i)})  # fmt: skip
    return write_tsv(tmp_path / "mmb.tsv", rows)


def test_mmbench_circular_scores_and_predictions_file(tmp_path):
    # Q1 answered "red" by text every time (passes); Q2 answered "A" every time (right once: fails)
    model = ScriptedModel({"Q1": "red", "Q2": "A"})
    scores = run_benchmark(model, "mmbench", mmbench_file(tmp_path), tmp_path / "out")
    assert scores == {"circular_accuracy": {"overall": 0.5, "colour": 0.5}}
    assert [a[2] for a in model.asked] == [100] * 4 and all(a[0] == 1 for a in model.asked)
    lines = (tmp_path / "out" / "mmbench_predictions.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["index", "question", "A", "B", "C", "D", "E", "answer", "category", "prediction"]
    assert lines[1].split("\t") == ["1", "Q1", "red", "blue", "", "", "", "A", "colour", "red"]
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == scores
    # --limit 1 keeps question 1 and its rotated copy
    scores = run_benchmark(model, "mmbench", mmbench_file(tmp_path), tmp_path / "one", limit=1)
    assert scores == {"circular_accuracy": {"overall": 1.0, "colour": 1.0}}


def test_resume_skips_answered_questions_and_drops_a_torn_line(tmp_path):
    data, out = mmbench_file(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_text(
        json.dumps({"id": "1", "reply": "A", "reasoning": None}) + "\n" + '{"id": "1000001", "rep'
    )
    with pytest.raises(InvalidInputError, match="--resume"):
        run_benchmark(ScriptedModel({}), "mmbench", data, out)
    model = ScriptedModel({"Q1": "B", "Q2": "B"})
    run_benchmark(model, "mmbench", data, out, resume=True)
    assert len(model.asked) == 3  # question 1 was answered before the stop
    ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(ids) == ["1", "1000001", "1000002", "2"]


def test_mme_writes_the_official_tool_files(tmp_path):
    rows = [
        {"index": 0, "image": b64("white"), "question": "Is there a circle?", "answer": "Yes",
         "category": "existence", "image_path": "a.png"},
        {"index": 1, "image": "0", "question": "Is there a square?", "answer": "No", "category": "existence",
         "image_path": "a.png"},
    ]  # fmt: skip
    model = ScriptedModel({"Is there a circle? Answer the question using a single word or phrase.": "Yes",
                           "Is there a square? Answer the question using a single word or phrase.": "Yes\nit is"})  # fmt: skip
    scores = run_benchmark(model, "mme", write_tsv(tmp_path / "mme.tsv", rows), tmp_path / "out", think=True)
    assert scores["existence"] == pytest.approx({"acc": 0.5, "acc_plus": 0.0, "score": 50.0})
    assert scores["total"]["score"] == pytest.approx(50.0)
    assert (tmp_path / "out" / "mme_results" / "existence.txt").read_text().splitlines() == [
        "a.png\tIs there a circle?\tYes\tYes",
        "a.png\tIs there a square?\tNo\tYes it is",
    ]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["think"] is True
    record = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    assert record == {"id": "0", "reply": "Yes", "reasoning": "because"}


def test_unknown_benchmark_and_bad_limit(tmp_path):
    with pytest.raises(InvalidInputError, match="unknown benchmark 'mmvet'"):
        run_benchmark(ScriptedModel({}), "mmvet", tmp_path / "x.tsv", tmp_path / "out")
    with pytest.raises(InvalidInputError, match="--limit must be at least 1"):
        run_benchmark(ScriptedModel({}), "mmbench", mmbench_file(tmp_path), tmp_path / "out", limit=0)


def test_embedded_model_runs_every_question_benchmark_file(tmp_path):
    """Shapes-world files in the four formats, answered end to end by the embedded model."""
    from openbagel import BagelPipeline
    from openbagel.evals.shapes_files import write_shapes_benchmarks

    pipe = BagelPipeline.from_pretrained()
    files = write_shapes_benchmarks(tmp_path / "data", count=4, seed=1)
    expected = {
        "mmbench": ("mmbench_predictions.tsv", "circular_accuracy"),
        "mme": ("mme_results/existence.txt", "total"),
        "pope": ("pope_answers.jsonl", "overall"),
        "mmmu": ("mmmu_prediction.json", "multiple_choice"),
    }
    for bench, (written, key) in expected.items():
        out = tmp_path / bench
        scores = run_benchmark(pipe, bench, files[bench], out, instruction=False)
        answered = (out / "predictions.jsonl").read_text().splitlines()
        assert (out / written).is_file() and key in scores, bench
        assert len(answered) == json.loads((out / "run.json").read_text())["questions"], bench
    assert len((tmp_path / "mme" / "mme_results" / "existence.txt").read_text().splitlines()) == 8  # 2 per image
    mme = json.loads((tmp_path / "mme" / "scores.json").read_text())
    assert 0 <= mme["existence"]["acc_plus"] <= mme["existence"]["acc"] <= 1
    assert len((tmp_path / "mmbench" / "predictions.jsonl").read_text().splitlines()) == 14  # 4 groups of 3-4


def test_geneval_tree_seeds_and_resume(tmp_path):
    from openbagel import BagelPipeline
    from openbagel.evals.geneval import read_geneval, run_geneval
    from openbagel.evals.shapes_files import write_shapes_benchmarks

    pipe = BagelPipeline.from_pretrained()
    data = write_shapes_benchmarks(tmp_path / "data", count=3, seed=0)["geneval"]
    out = tmp_path / "geneval"
    assert run_geneval(pipe, data, out, images_per_prompt=2, seed=7, limit=2) == 2
    for i, item in enumerate(read_geneval(data)[:2]):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == item
        assert json.loads((folder / "seeds.json").read_text()) == [7 + 2 * i, 8 + 2 * i]
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["00000.png", "00001.png"]
    # image 1 of prompt 1 made again alone from its recorded seed: the batched image, up to float rounding
    import numpy as np
    from PIL import Image

    again = np.asarray(pipe.text_to_image(read_geneval(data)[1]["prompt"], seed=10).images[0], dtype=np.float32)
    saved = np.asarray(Image.open(out / "00001" / "samples" / "00001.png").convert("RGB"), dtype=np.float32)
    assert saved.shape == again.shape and np.abs(saved - again).mean() < 1.0  # of 255
    (out / "00001" / "metadata.jsonl").unlink()  # a prompt stopped before its metadata was written
    with pytest.raises(InvalidInputError, match="--resume"):
        run_geneval(pipe, data, out, images_per_prompt=2, seed=7)
    assert run_geneval(pipe, data, out, images_per_prompt=2, seed=7, resume=True) == 2  # prompts 1 and 2


def test_judged_image_benchmarks_layouts_and_resume(tmp_path):
    from openbagel import BagelPipeline
    from openbagel.evals.editing import gedit_jobs, imgedit_jobs, run_image_jobs, wise_jobs
    from openbagel.evals.formats import read_rows
    from openbagel.evals.shapes_files import write_shapes_benchmarks

    pipe = BagelPipeline.from_pretrained()
    files = write_shapes_benchmarks(tmp_path / "data", count=2, seed=3)
    gedit = gedit_jobs(read_rows(files["gedit"]))
    assert run_image_jobs(pipe, gedit, tmp_path / "gedit") == 2
    for job in gedit:
        assert job.path.startswith("fullset/") and job.path.endswith("/en/" + job.path.split("/")[-1])
        assert (tmp_path / "gedit" / job.path).is_file() and (tmp_path / "gedit" / job.keep_source_as).is_file()
    with pytest.raises(InvalidInputError, match="no GEdit-Bench rows in language 'cn'"):
        gedit_jobs(read_rows(files["gedit"]), "cn")

    imgedit = imgedit_jobs(files["imgedit"], tmp_path / "data" / "imgedit_originals")
    assert [j.path for j in imgedit] == ["0.png", "1.png"]
    with pytest.raises(InvalidInputError, match="--images"):
        imgedit_jobs(files["imgedit"], tmp_path)

    wise = wise_jobs([files["wise"]])
    assert [j.path for j in wise] == ["1.png", "2.png"] and all(j.source is None for j in wise)
    assert run_image_jobs(pipe, wise, tmp_path / "wise", limit=1) == 1
    with pytest.raises(InvalidInputError, match="--resume"):
        run_image_jobs(pipe, wise, tmp_path / "wise")
    assert run_image_jobs(pipe, wise, tmp_path / "wise", resume=True) == 1  # only the missing one
    with pytest.raises(InvalidInputError, match="prompt_id values repeat"):
        wise_jobs([files["wise"], files["wise"]])


def test_cli_runs_a_benchmark_and_refuses_bad_input_cleanly(tmp_path):
    from typer.testing import CliRunner

    from openbagel.cli import app
    from openbagel.evals.shapes_files import write_shapes_benchmarks

    runner = CliRunner()
    files = write_shapes_benchmarks(tmp_path / "data", count=2, seed=5)
    r = runner.invoke(
        app, ["eval", "pope", "--data", str(files["pope"]), "-o", str(tmp_path / "pope"), "--no-instruction"]
    )
    assert r.exit_code == 0, r.output
    assert "overall.f1" in r.output and (tmp_path / "pope" / "pope_answers.jsonl").is_file()
    r = runner.invoke(app, ["eval", "pope", "--data", str(files["pope"]), "-o", str(tmp_path / "pope")])
    assert r.exit_code == 2 and "--resume" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["eval", "mme", "--data", str(tmp_path / "missing.tsv"), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "missing.tsv" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["eval", "mmbench", "--data", str(files["pope"]), "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "not in the MMBench format: no column A" in r.output
    r = runner.invoke(app, ["eval", "imgedit", "--data", str(files["imgedit"]), "-o", str(tmp_path / "z")])
    assert r.exit_code == 2 and "needs --images" in r.output
    for bench in ("mmbench", "mme", "pope", "mmmu", "geneval", "gedit", "imgedit", "wise"):
        assert runner.invoke(app, ["eval", bench, "--help"]).exit_code == 0


def test_names_from_files_cannot_leave_the_output_folder(tmp_path):
    from openbagel.evals.editing import imgedit_jobs, wise_jobs
    from openbagel.evals.folders import safe_name
    from openbagel.evals.formats import read_rows, yes_no_questions

    for bad in ("", ".", "..", "../x", "a/b", "/tmp/x", ".hidden", "a\\b"):
        with pytest.raises(InvalidInputError, match="not a plain file name"):
            safe_name(bad, "key")
    assert safe_name("existence", "category") == "existence"
    rows = [{"index": 0, "image": b64("white"), "question": "q", "answer": "Yes", "category": "../../x"}]
    with pytest.raises(InvalidInputError, match="MME category '../../x' is not a plain file name"):
        yes_no_questions(read_rows(write_tsv(tmp_path / "mme.tsv", rows)), "MME")
    (tmp_path / "w.json").write_text(json.dumps([{"prompt_id": "../up", "Prompt": "p"}]))
    with pytest.raises(InvalidInputError, match="WISE prompt_id"):
        wise_jobs([tmp_path / "w.json"])
    (tmp_path / "originals").mkdir()
    (tmp_path / "i.json").write_text(json.dumps({"k": {"id": "../w.json", "prompt": "p", "edit_type": "x"}}))
    with pytest.raises(InvalidInputError, match="points outside --images"):
        imgedit_jobs(tmp_path / "i.json", tmp_path / "originals")


def test_resume_refuses_a_run_with_other_settings(tmp_path):
    data = mmbench_file(tmp_path)
    model = ScriptedModel({"Q1": "A", "Q2": "B"})
    run_benchmark(model, "mmbench", data, tmp_path / "out", limit=1)
    with pytest.raises(InvalidInputError, match="holds a run with instruction=True, not False"):
        run_benchmark(model, "mmbench", data, tmp_path / "out", resume=True, instruction=False)
    with pytest.raises(InvalidInputError, match="holds a run with think=False, not True"):
        run_benchmark(model, "mmbench", data, tmp_path / "out", resume=True, think=True)
    run_benchmark(model, "mmbench", data, tmp_path / "out", resume=True)  # the same settings, without --limit


def test_unreadable_files_are_named_not_tracebacks(tmp_path):
    from openbagel.evals.formats import mmmu_questions, read_rows

    (tmp_path / "latin.tsv").write_bytes("index\tquestion\n1\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(InvalidInputError, match="could not be read as a .tsv"):
        read_rows(tmp_path / "latin.tsv")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InvalidInputError, match="could not be read as a .parquet"):
        read_rows(tmp_path / "junk.parquet")
    (tmp_path / "bom.tsv").write_bytes("\ufeffindex\tquestion\n1\tq\n".encode())
    assert read_rows(tmp_path / "bom.tsv") == [{"index": "1", "question": "q"}]  # a byte-order mark is dropped
    row = {"id": "v_1", "question": "q", "options": "['a', 'b'", "answer": "A", "question_type": "multiple-choice"}
    with pytest.raises(InvalidInputError, match="MMMU v_1 options .* is not a list"):
        mmmu_questions([row])


def test_mmbench_predictions_tsv_survives_tabs_newlines_and_quotes(tmp_path):
    import csv

    rows = [{"index": 1, "question": 'a "big"\tcircle?', "hint": "", "A": "red\nish", "B": "blue", "answer": "A",
             "category": "c", "image": b64("red")}]  # fmt: skip
    run_benchmark(
        ScriptedModel({'a "big"\tcircle?': "A"}), "mmbench", write_tsv(tmp_path / "m.tsv", rows), tmp_path / "o"
    )
    with (tmp_path / "o" / "mmbench_predictions.tsv").open(newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    assert len(table) == 1 and table[0]["question"] == 'a "big" circle?' and table[0]["A"] == "red ish"


def test_bad_settings_and_images_are_refused_before_the_weights_load(tmp_path):
    """With a model folder that does not exist, each input error must win over the checkpoint error."""
    from typer.testing import CliRunner

    from openbagel.cli import app
    from openbagel.evals.shapes_files import write_shapes_benchmarks

    runner = CliRunner()
    files = write_shapes_benchmarks(tmp_path / "data", count=2, seed=5)
    bad_image = [{"index": 0, "image": "bm90IGFuIGltYWdl", "question": "q", "answer": "Yes", "category": "existence"}]
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("another run")
    nomodel = ["--model", str(tmp_path / "no-such-model")]
    cases = [
        (["eval", "mme", "--data", str(write_tsv(tmp_path / "bad.tsv", bad_image)), "-o", str(tmp_path / "a")],
         "row 0: its image cannot be read"),
        (["eval", "pope", "--data", str(files["pope"]), "-o", str(used)], "already holds files"),
        (["eval", "geneval", "--data", str(files["geneval"]), "-o", str(tmp_path / "b"), "--images", "0"],
         "--images must be at least 1"),
        (["eval", "geneval", "--data", str(files["geneval"]), "-o", str(tmp_path / "c"), "--limit", "0"],
         "--limit must be at least 1"),
        (["eval", "wise", "--data", str(files["wise"]), "-o", str(tmp_path / "d"), "--seed", "-1"],
         "--seed must be 0 or more"),
        (["eval", "gedit", "--data", str(files["gedit"]), "-o", str(tmp_path / "e"), "--steps", "1"],
         "--steps must be at least 2"),
    ]  # fmt: skip
    for args, message in cases:
        r = runner.invoke(app, [*args, *nomodel])
        assert r.exit_code == 2 and message in r.output, (args, r.output)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def test_values_the_benchmarks_never_hold_are_refused(tmp_path):
    from openbagel.evals.formats import mmbench_questions, mmmu_questions, read_rows

    row = {"index": 1, "question": "q", "hint": "", "A": "red", "B": "blue", "answer": "Z", "category": "c",
           "image": b64("red")}  # fmt: skip
    with pytest.raises(InvalidInputError, match="answer 'Z' is not one of its options \\(A, B\\)"):
        mmbench_questions(read_rows(write_tsv(tmp_path / "m.tsv", [row])))
    mmmu = {"id": "v_1", "question": "q", "options": "a, b, c", "answer": "A", "question_type": "multiple-choice"}
    with pytest.raises(InvalidInputError, match="MMMU v_1 options 'a, b, c' is not a list"):
        mmmu_questions([mmmu])


def test_a_question_longer_than_the_context_is_refused(tmp_path):
    from openbagel import BagelPipeline

    pipe = BagelPipeline.from_pretrained()
    rows = [{"index": 0, "image": b64("white"), "question": "is it " * 5000, "answer": "Yes", "category": "existence"}]
    with pytest.raises(InvalidInputError, match="question 0: its text .* is longer than the model's context"):
        run_benchmark(pipe, "mme", write_tsv(tmp_path / "long.tsv", rows), tmp_path / "out")
