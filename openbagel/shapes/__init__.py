"""The shapes world: procedural data (:mod:`~openbagel.shapes.world`), the
ShapesEval checker (:mod:`~openbagel.shapes.eval`), export to the trainer's
file formats (:mod:`~openbagel.shapes.export`), and the trainers of the
embedded model's tokenizer and autoencoder."""
