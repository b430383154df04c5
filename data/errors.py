"""Errors raised by the data package: one line naming the file or flag and the problem."""

from guided_diffusion.errors import AddpmError, ConfigError

# torch's DataLoader re-raises an exception from a worker process as
# ``type(exc)("Caught X in DataLoader worker process N.\nOriginal Traceback ...")``, which would
# turn our one-line message into a traceback. The original message is the last line there.
_WORKER_MARKER = "Original Traceback"


def _one_line(message: str) -> str:
    if _WORKER_MARKER in message:
        lines = [line for line in message.strip().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else message
        for cls_name in ("DataConfigError", "DataError"):
            marker = cls_name + ": "
            if marker in last:
                last = last.split(marker, 1)[1]
                break
        return last
    return message


class DataError(AddpmError):
    """Bad input data: missing, unreadable or inconsistent files. The message names the file."""

    def __init__(self, message: str = ""):
        super().__init__(_one_line(str(message)))


class DataConfigError(DataError, ConfigError):
    """A data flag that cannot be honoured (unknown --dataset, bad --foreground_labels, ...)."""
