"""The embedded model's tokenizer: a small byte-level BPE trained with
``tokenizers`` on the shapes world's text, with BAGEL's special tokens
(Qwen2's, in Qwen2's order), saved as the standard Hugging Face files
(``tokenizer.json``, ``tokenizer_config.json``) that
:class:`openbagel.tokenizer.Tokenizer` reads.

Byte-level: any text still encodes (unseen words fall back to bytes).
"""

from __future__ import annotations

from pathlib import Path

#: Qwen2's special tokens; BAGEL uses ``<|im_start|>``, ``<|im_end|>``,
#: ``<|vision_start|>`` and ``<|vision_end|>``.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
]
#: Vocabulary size: the 256 byte symbols, the special tokens and the merges.
VOCAB_SIZE = 512


def train_tokenizer(folder: str | Path, vocab_size: int = VOCAB_SIZE, texts=None) -> Path:
    """Train on ``texts`` (default: the world's text, plus the thinking prompts)
    and write the tokenizer files to ``folder``. Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from openbagel.pipeline import THINK_GENERATE_PROMPT, THINK_UNDERSTAND_PROMPT
    from openbagel.shapes.world import world_text

    if texts is None:
        texts = [*world_text(), THINK_GENERATE_PROMPT, THINK_UNDERSTAND_PROMPT, "<think>", "</think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    return folder
