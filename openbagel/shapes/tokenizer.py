"""The embedded model's tokenizer: a small byte-level BPE trained with
``tokenizers`` on the shapes world's text, with BAGEL's special tokens
(Qwen2's, in Qwen2's order: ``openbagel.tokenizer.QWEN2_SPECIAL_TOKENS``),
saved as the standard Hugging Face files (``tokenizer.json``,
``tokenizer_config.json``) that :class:`openbagel.tokenizer.Tokenizer` reads.

Byte-level: any text still encodes (unseen words fall back to bytes).
"""

from __future__ import annotations

from pathlib import Path

#: Vocabulary size: the 256 byte symbols, the special tokens and the merges.
VOCAB_SIZE = 512


def train_tokenizer(folder: str | Path, vocab_size: int = VOCAB_SIZE, texts=None) -> Path:
    """Train on ``texts`` (default: the world's text, plus the thinking prompts)
    and write the tokenizer files to ``folder``. Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from openbagel.pipeline import THINK_GENERATE_PROMPT, THINK_UNDERSTAND_PROMPT
    from openbagel.shapes.world import world_text
    from openbagel.tokenizer import QWEN2_SPECIAL_TOKENS, write_tokenizer_files

    if texts is None:
        texts = [*world_text(), THINK_GENERATE_PROMPT, THINK_UNDERSTAND_PROMPT, "<think>", "</think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN2_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return write_tokenizer_files(tok, folder)
