"""The BAGEL architecture: pure ``nn.Module`` code, no tokenizer, images or losses."""

from openbagel.model.bagel import Bagel, SequenceInput

__all__ = ["Bagel", "SequenceInput"]
