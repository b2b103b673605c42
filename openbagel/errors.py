"""Errors raised by openbagel. Each message names the problem and the fix."""


class OpenBagelError(Exception):
    """Base class of every error openbagel raises on purpose."""


class CheckpointError(OpenBagelError):
    """A checkpoint folder or file is missing, corrupt, or does not fit the model."""


class InvalidInputError(OpenBagelError, ValueError):
    """A request cannot be served as given (bad size, bad image, bad setting)."""


class NumericalError(OpenBagelError):
    """A computation produced NaN or Inf (extreme settings or broken weights)."""
