"""Errors raised by the evaluation package for input a user can fix."""

from guided_diffusion.errors import AddpmError


class EvaluationError(AddpmError):
    """Predictions or labels that cannot be evaluated: unreadable, mismatched or missing."""
