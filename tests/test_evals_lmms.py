"""openbagel as an lmms-eval model: a local task of the shapes world run through lmms-eval, offline."""

import base64
import io
import json
import random
import textwrap

import pytest

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is in the test extra")


UTILS = """
import base64, io
from PIL import Image

def doc_to_visual(doc):
    return [Image.open(io.BytesIO(base64.b64decode(doc["image"]))).convert("RGB")]

def doc_to_text(doc):
    return doc["question"]

def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
"""


def test_a_shapes_task_runs_through_lmms_eval(tmp_path, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from openbagel.evals.lmms import OpenBagel
    from openbagel.shapes import world

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    rows = []
    for _ in range(6):
        scene = world.random_scene(rng, "all")
        buf = io.BytesIO()
        world.render(scene).save(buf, "PNG")
        question, answer, _ = next(q for q in world.questions(scene, rng, "all") if q[2] == "background")
        rows.append({"question": question, "answer": answer, "image": base64.b64encode(buf.getvalue()).decode()})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "task"
    task.mkdir()
    (task / "utils.py").write_text(UTILS)
    (task / "shapes_qa.yaml").write_text(
        textwrap.dedent(f"""\
        task: shapes_qa
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / "data.jsonl"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 8
          until: ["\\n"]
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """)
    )
    model = OpenBagel()
    out = simple_evaluate(model=model, tasks=["shapes_qa"], task_manager=TaskManager(include_path=str(task)))
    score = out["results"]["shapes_qa"]["exact_match,none"]
    # the embedded model names backgrounds right (ShapesEval's question kinds: background 38/38)
    assert score >= 5 / 6
    with pytest.raises(Exception, match="generatively"):
        model.loglikelihood([])
