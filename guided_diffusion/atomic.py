"""Atomic file writes: a reader (or a rerun after a crash) never sees half a file.

The content goes to a temporary file in the destination folder, then one ``os.replace``
(a same-filesystem rename) puts it in place. The file gets the permissions a plain ``open``
would give (0666 less the umask), not mkstemp's owner-only 0600.

A temporary file is named ``.<name>.<host>-<pid>-<random>.tmp<ending>``: the host and the
process that writes it. A process killed in the middle of a write leaves its temporary file
behind; ``remove_stale_temp_files`` (which every script calls on its output folder before it
writes) deletes those whose process no longer runs on this host, and nothing else.
"""

import contextlib
import hashlib
import os
import re
import socket
import tempfile
from typing import Callable

from guided_diffusion.errors import ConfigError

# The host part keeps a process on one machine from judging temporary files of another that
# shares the folder (a network file system): only this host's dead writers are cleaned up.
_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[^.]+\.tmp(\..+)?$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path, *, durable: bool = False):
    """Yield a temporary path beside ``path``; on a normal exit rename it to ``path``.

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
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.{_HOST}-{os.getpid()}-", suffix=f".tmp{ending}")
    os.close(fd)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path, write: Callable[[str], None], *, durable: bool = False) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``
    (see ``atomic_path``). Returns ``path``."""
    with atomic_path(path, durable=durable) as tmp:
        write(tmp)
    return os.fspath(path)


def atomic_write_text(path, text: str) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            handle.write(text)

    return atomic_write(path, write)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def remove_stale_temp_files(folder, *, depth: int = 1) -> list[str]:
    """Delete the temporary files of ``atomic_path`` left in ``folder`` (and its sub-folders
    down to ``depth`` levels) by writers of this host that no longer run. Returns their paths.

    Remote (URL) folders are skipped: their writes are single uploads that leave nothing behind.
    """
    folder = os.fspath(folder)
    if "://" in folder or not os.path.isdir(folder):
        return []
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if depth > 0:
                    removed += remove_stale_temp_files(entry.path, depth=depth - 1)
                continue
            match = _TEMP_NAME.match(entry.name)
            if match and match["host"] == _HOST and not _process_runs(int(match["pid"])):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)
                    removed.append(entry.path)
    return removed


def check_writable_dir(path, flag: str = "--out_dir") -> None:
    """ConfigError (one line naming ``flag``) unless ``path`` is, or can be created as, a
    folder this process may write to. Creates nothing, so it can run before any other check.

    Remote (URL) paths are not checked here; their first write reports its own error.
    """
    path = os.fspath(path)
    if not path or "://" in path:
        return
    target = os.path.abspath(path)
    while not os.path.exists(target):
        parent = os.path.dirname(target)
        if parent == target:
            break
        target = parent
    if not os.path.isdir(target):
        what = "is a file" if target == os.path.abspath(path) else f"lies under {target}, which is a file"
        raise ConfigError(f"{flag} {path} {what}, not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        where = "" if target == os.path.abspath(path) else f" (in {target})"
        raise ConfigError(f"{flag} {path}: no permission to write there{where}")
