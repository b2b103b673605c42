"""The text tokenizer (a ``transformers`` tokenizer read offline from the
checkpoint folder) and the special ids the contexts need (spec section 3)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from openbagel.errors import CheckpointError
from openbagel.packing import SpecialIds

#: Special tokens BAGEL needs, added to the tokenizer if missing.
SPECIAL_TOKENS = {
    "bos": "<|im_start|>",
    "eos": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}

#: Qwen2's special tokens, in Qwen2's order (the ids follow the vocabulary);
#: the tokenizers this project writes carry them all.
QWEN2_SPECIAL_TOKENS = [
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

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")

log = logging.getLogger(__name__)


def write_tokenizer_files(tok, folder: str | Path) -> Path:
    """Save a ``tokenizers.Tokenizer`` as the standard Hugging Face files
    (``tokenizer.json``, ``tokenizer_config.json``; end of text ``<|im_end|>``,
    padding ``<|endoftext|>``) that :meth:`Tokenizer.from_folder` reads."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    return folder


class Tokenizer:
    """Text <-> token ids, plus BAGEL's special ids by name.

    Build with :meth:`from_folder`. ``encode`` adds no special tokens: the
    contexts wrap every text segment as ``[BOS] text [EOS]`` themselves.
    """

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        missing = [tok for tok in SPECIAL_TOKENS.values() if tok not in self.hf.get_vocab()]
        if missing:
            # As the reference does; a released BAGEL tokenizer has them all, so
            # this usually means the tokenizer files belong to another model.
            self.hf.add_tokens(missing, special_tokens=True)
            log.warning(
                "tokenizer lacked %s; added them with new ids (%s)",
                missing,
                [self.hf.convert_tokens_to_ids(t) for t in missing],
            )
        vocab = self.hf.get_vocab()
        self.ids = {name: vocab[tok] for name, tok in SPECIAL_TOKENS.items()}
        self.special = SpecialIds(**self.ids)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Load the tokenizer files of a checkpoint folder (never the network).

        Raises:
            CheckpointError: no tokenizer files, or files ``transformers`` cannot read.
        """
        folder = Path(folder)
        if not any((folder / f).exists() for f in _TOKENIZER_FILES):
            raise CheckpointError(
                f"{folder}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt); "
                "copy the Qwen2 tokenizer files of the BAGEL release into the folder"
            )
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            hf.encode("probe <|im_start|>", add_special_tokens=False)  # some broken files fail only here
        except Exception as e:  # transformers raises many types for bad files
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(
                f"{folder}: cannot read the tokenizer files ({e.__class__.__name__}: {first_line})"
            ) from None
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added). Special-token strings
        in the text, such as ``<|im_end|>``, stay plain text: what a user
        writes can never become a control token of the context."""
        return list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, without special tokens such as ``<|im_end|>``
        (``<think>`` is plain text in Qwen2's vocabulary and stays)."""
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Decode a stream of ids into text pieces, holding back incomplete characters."""
        buffer: list[int] = []
        emitted = ""
        for token in ids:
            buffer.append(token)
            text = self.decode(buffer)
            if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                continue
            if len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text
        text = self.decode(buffer)
        if len(text) > len(emitted):
            yield text[len(emitted) :]
