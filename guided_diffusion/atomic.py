"""Atomic file writes: a reader (or a rerun after a crash) never sees half a file.

The content goes to a temporary file in the destination folder, then one ``os.replace``
(a same-filesystem rename) puts it in place. The file gets the permissions a plain ``open``
would give (0666 less the umask), not mkstemp's owner-only 0600.
"""

import os
import tempfile
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write: Callable[[str], None], *, durable: bool = False) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``.

    The temporary name keeps ``path``'s ending (``.nii.gz``, ``.png``, ``.npz``) so that
    writers which pick a format by extension work, and starts with a dot so listings of
    ``*.pt`` or ``*.png`` skip it. ``durable`` fsyncs the data before the rename
    (checkpoints). On any failure the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    ending = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=f".tmp{ending}")
    os.close(fd)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path, text: str) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            handle.write(text)

    return atomic_write(path, write)
