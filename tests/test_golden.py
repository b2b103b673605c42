"""Golden parity with the reference implementation (shared/golden, copied to tests/golden)."""

from __future__ import annotations

import json

import pytest
import torch

from openbagel.golden import GoldenRunner

from .conftest import GOLDEN

CASES = [k for k in json.loads((GOLDEN / "cases.json").read_text()) if not k.startswith("_")]


@pytest.fixture(scope="module")
def runner32():
    return GoldenRunner(GOLDEN, torch.float32)


@pytest.fixture(scope="module")
def runner32_plain():
    return GoldenRunner(GOLDEN, torch.float32, plain=True)


@pytest.fixture(scope="module")
def runner16():
    return GoldenRunner(GOLDEN, torch.bfloat16)


def test_all_case_kinds_present():
    kinds = {json.loads((GOLDEN / "cases.json").read_text())[c]["kind"] for c in CASES}
    assert kinds == {"components", "text", "understanding", "t2i", "edit", "train_forward", "transforms"}


@pytest.mark.parametrize("case", CASES)
def test_float32_matches_reference(runner32, case):
    result = runner32.run(case)
    assert result.ok, result.failures
    assert result.max_rel <= 1e-4


@pytest.mark.parametrize("case", [c for c in CASES if "transforms" not in c and "components" not in c])
def test_plain_path_matches_reference(runner32_plain, case):
    # the benchmarks' baseline: separate guidance passes over copied contexts
    result = runner32_plain.run(case)
    assert result.ok, result.failures
    assert result.max_rel <= 1e-4


@pytest.mark.parametrize("case", [c for c in CASES if "transforms" not in c and "components" not in c])
def test_bfloat16_within_twice_reference_drift(runner16, case):
    # greedy ids identical, first-step logits within 0.16, first-step velocities within 3.6%
    result = runner16.run(case)
    assert result.ok, result.failures


def test_checker_detects_a_wrong_model(runner32):
    # A checker that cannot fail is worthless: perturb one weight and expect failures.
    w = runner32.model.llm2vae.bias
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(1e-2)
        assert not runner32.run("case3_t2i_64x64").ok
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert runner32.run("case3_t2i_64x64").ok


def test_check_golden_tool_exit_codes(tmp_path, capsys):
    import shutil
    import sys

    sys.path.insert(0, str(GOLDEN.parent.parent / "tools"))
    try:
        import check_golden
    finally:
        sys.path.pop(0)
    # a golden folder with a subset of cases and one corrupted expected output
    for f in ["cases.json", "case1_text.safetensors", "case0_components.safetensors"]:
        shutil.copy(GOLDEN / f, tmp_path / f)
    shutil.copytree(GOLDEN / "tiny-random", tmp_path / "tiny-random")
    cases = json.loads((GOLDEN / "cases.json").read_text())
    subset = {k: cases[k] for k in ("_common", "case0_components", "case1_text")}
    (tmp_path / "cases.json").write_text(json.dumps(subset))
    assert check_golden.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "case1_text" in out and "2 passed, 0 failed" in out

    from safetensors.torch import load_file, save_file

    data = load_file(str(tmp_path / "case1_text.safetensors"))
    data["first_step_logits"] = data["first_step_logits"] + 0.01
    save_file(data, str(tmp_path / "case1_text.safetensors"))
    assert check_golden.main([str(tmp_path)]) == 1
    assert "first_step_logits" in capsys.readouterr().out
