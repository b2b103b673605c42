#!/usr/bin/env python
"""Write a byte-level tokenizer (``tokenizer.json`` + ``tokenizer_config.json``)
whose ids are the UTF-8 bytes 0..255 and whose special tokens take the ids
256.. in Qwen2's order (``<|im_start|>`` 257, ``<|im_end|>`` 258,
``<|vision_start|>`` 265, ``<|vision_end|>`` 266): the golden tiny
checkpoint's convention.

Usage: python tools/make_byte_tokenizer.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path


def byte_symbols() -> list[str]:
    """The printable stand-in character of each byte, as byte-level BPE uses them:
    printable Latin-1 bytes stand for themselves, the others map to 256, 257, ..."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def build(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from openbagel.tokenizer import QWEN2_SPECIAL_TOKENS, write_tokenizer_files

    vocab = {sym: i for i, sym in enumerate(byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(QWEN2_SPECIAL_TOKENS)
    write_tokenizer_files(tok, out_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    build(Path(sys.argv[1]))
