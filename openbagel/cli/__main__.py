"""``python -m openbagel.cli`` (and ``torchrun -m openbagel.cli``)."""

from openbagel.cli import main

main()
