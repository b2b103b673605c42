"""The tokenizer shipped with the tiny checkpoint and the special ids."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from openbagel.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_folder(tiny_dir)


def test_golden_ids(tok, golden_dir):
    data = load_file(str(golden_dir / "case1_text.safetensors"))
    assert tok.encode("Hello BAGEL! Describe a red cube on a table.") == data["prompt_ids"].tolist()
    assert tok.ids == {"bos": 257, "eos": 258, "start_of_image": 265, "end_of_image": 266}


def test_round_trip_and_stream(tok):
    text = "héllo wörld 😀\n  tabs\tand <think> tags </think>"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    pieces = list(tok.stream(tok.encode("a😀b")))
    assert pieces == ["a", "😀", "b"]


def test_special_tokens_added_if_missing(tmp_path, tiny_dir):
    import json
    import shutil

    shutil.copy(tiny_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    data = json.loads((tiny_dir / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|vision_end|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {
        k: v for k, v in cfg.get("added_tokens_decoder", {}).items() if v["content"] != "<|vision_end|>"
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.hf.convert_tokens_to_ids("<|vision_end|>") == tok.ids["end_of_image"]
    assert tok.ids["end_of_image"] not in (257, 258, 265)
