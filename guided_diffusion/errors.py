"""Errors a user can cause: each carries one line that names the file or flag and the problem.

Scripts catch ``AddpmError`` (see ``script_util.run_cli``) and print that line instead of a
traceback, then exit non-zero.
"""


class AddpmError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""


class ConfigError(AddpmError):
    """A flag, or a combination of flags, that cannot be honoured."""


class CheckpointError(AddpmError):
    """A file that is not one of our checkpoints, is corrupt, or does not fit the model."""
