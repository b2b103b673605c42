"""The split of a thinking answer, ``<think> reasoning </think> answer``, into
its reasoning and its answer: one rule for the Python API and the server,
whole or streamed (spec section 7, thinking).

The rule: a text that opens with ``<think>`` (after white space) is reasoning
up to ``</think>``, the answer after it; without the closing tag (the model was
cut short) it is all reasoning and the answer is empty. A tag cut short at the
end (``<th``, ``</thi``) is dropped, never shown as text. A text that does not
open with ``<think>`` is all answer (the model did not think), and has no
reasoning (``None``); a ``</think>`` later in it stays text.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


class ReasoningSplitter:
    """Splits a thinking answer piece by piece as it is decoded.

    :meth:`feed` returns ``("reasoning", text)`` and ``("content", text)``
    pieces as soon as they are known, holding back only text that could be
    the start of a tag; :meth:`flush` returns what is held back at the end.
    ``opened`` tells whether the text opened with ``<think>``.
    """

    def __init__(self) -> None:
        self.state = "start"  # start -> reasoning -> content, or start -> content
        self.opened = False
        self.buffer = ""

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.buffer += piece
        out: list[tuple[str, str]] = []
        if self.state == "start":
            stripped = self.buffer.lstrip()
            if len(stripped) < len(OPEN) and OPEN.startswith(stripped):  # may still become "<think>"
                return out
            if stripped.startswith(OPEN):
                self.opened, self.state, self.buffer = True, "reasoning", stripped[len(OPEN) :]
            else:
                self.state = "content"
        if self.state == "reasoning":
            head, sep, tail = self.buffer.partition(CLOSE)
            if sep:
                out.append(("reasoning", head))
                self.state, self.buffer = "content", tail
            else:
                keep = _partial_suffix(self.buffer, CLOSE)
                out.append(("reasoning", self.buffer[: len(self.buffer) - keep]))
                self.buffer = self.buffer[len(self.buffer) - keep :]
        if self.state == "content":
            out.append(("content", self.buffer))
            self.buffer = ""
        return [(k, t) for k, t in out if t]

    def flush(self) -> list[tuple[str, str]]:
        """What is held back at the end. Held back are only the first letters
        of a tag, so the text was cut short inside it (a model whose tags are
        several tokens, stopped by ``max_tokens``): a cut ``<think>`` opened
        the reasoning, a cut ``</think>`` ends it, and neither is text."""
        text, self.buffer = self.buffer, ""
        if self.state == "start" and text.strip():
            self.opened, self.state = True, "reasoning"  # "<th": reasoning, empty so far
        return []


def split_reasoning(text: str) -> tuple[str | None, str]:
    """A whole thinking answer -> ``(reasoning, answer)``, each stripped,
    exactly as :class:`ReasoningSplitter` splits it piece by piece.

    ``reasoning`` is None when the text does not open with ``<think>``; the
    answer is empty when ``</think>`` never came.
    """
    parts = {"reasoning": "", "content": ""}
    splitter = ReasoningSplitter()
    for kind, piece in splitter.feed(text) + splitter.flush():
        parts[kind] += piece
    return (parts["reasoning"].strip() if splitter.opened else None), parts["content"].strip()


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
