"""A trainer's run folder: its checkpoints, the resume policy, where it lies, and the run's seeds.

Every trainer (``train_addpm.py``, ``train_preseg_network.py``, ``train_denoising_network.py``)
writes into its ``--out_dir``::

    <kind>_<step:07d>.pt   every --save_interval steps; the newest --keep_checkpoints kept
    final.pt               the state at the run's end step
    best.pt                the best validation score's weights (when the run validates)
    progress.csv, progress.jsonl, log.txt, curves.png

The one resume policy of ``--resume`` / ``--resume_checkpoint``:

- ``--resume auto`` (or ``--resume_checkpoint auto``): the newest checkpoint of the run's kind
  in ``--out_dir``, by the step stored inside each file (names may lie); at equal steps
  ``final.pt``, then the numbered file. None there: a fresh start.
- ``--resume_checkpoint PATH``: that file.
- neither: a fresh run, refused (one line) when ``--out_dir`` already holds a numbered
  checkpoint or ``final.pt`` of its kind, so that no earlier run is overwritten.
"""

from __future__ import annotations

import hashlib
import os
import re
import time

import blobfile as bf
import numpy as np
import torch.distributed as dist

from guided_diffusion import logger
from guided_diffusion.atomic import check_writable_dir, remove_stale_temp_files
from guided_diffusion.checkpoint import FINAL_NAME, checkpoint_step
from guided_diffusion.errors import ConfigError

BEST_NAME = "best.pt"
RESUME_CHOICES = ("", "auto")
_NUMBERED = re.compile(r"^(?P<kind>[a-z]+)_(?P<step>\d{7,})\.pt$")


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_path(out_dir: str, kind: str, step: int) -> str:
    """``out_dir/<kind>_<step:07d>.pt``."""
    return bf.join(out_dir, f"{kind}_{step:07d}.pt")


def numbered_checkpoints(out_dir: str, kind: str) -> list[tuple[int, str]]:
    """``[(step, path), ...]`` of the ``<kind>_<step>.pt`` files in ``out_dir`` (by name), oldest first."""
    if not bf.isdir(out_dir):
        return []
    found = []
    for name in bf.listdir(out_dir):
        match = _NUMBERED.match(name)
        if match and match["kind"] == kind:
            found.append((int(match["step"]), bf.join(out_dir, name)))
    return sorted(found)


def prune_checkpoints(out_dir: str, kind: str, keep: int) -> None:
    """Remove all but the newest ``keep`` numbered checkpoints of ``kind`` (``keep`` <= 0: keep all)."""
    if keep <= 0:
        return
    for _, path in numbered_checkpoints(out_dir, kind)[:-keep]:
        bf.remove(path)


def list_checkpoints(folder, kind: str | None = None) -> list[tuple[int, str]]:
    """Our checkpoints among the ``*.pt`` files of ``folder``, as (step, path) by increasing step.

    The step is read from each file's content; files that are not our checkpoints (or not of
    ``kind``, when given) are skipped. A missing folder gives an empty list.
    """
    folder = os.fspath(folder)
    if not bf.isdir(folder):
        return []
    found = []
    for name in sorted(bf.listdir(folder)):
        if not name.endswith(".pt") or name.startswith("."):
            continue
        step = checkpoint_step(bf.join(folder, name), kind)
        if step is not None:
            found.append((step, bf.join(folder, name)))
    found.sort(key=lambda item: item[0])
    return found


def newest_checkpoint(folder, kind: str | None = None, *, exclude: tuple = ()) -> str | None:
    """The checkpoint with the highest stored step in ``folder`` (``--resume auto``), or None.

    At equal steps ``final.pt`` (written last) wins, then a numbered file, then other names in
    order; files named in ``exclude`` are passed over (e.g. a ``best.pt`` without optimizer state).
    """
    found = [(step, path) for step, path in list_checkpoints(folder, kind=kind) if bf.basename(path) not in exclude]
    if not found:
        return None
    top = found[-1][0]

    def preference(path: str) -> tuple:
        name = bf.basename(path)
        return (name != FINAL_NAME, not _NUMBERED.match(name), name)

    return min((path for step, path in found if step == top), key=preference)


def final_is_current(out_dir, step: int, kind: str) -> bool:
    """True when ``out_dir/final.pt`` holds the state at ``step``: a run that ends there need
    not write it again. False when it is missing (e.g. a kill during its write) or older."""
    return checkpoint_step(bf.join(os.fspath(out_dir), FINAL_NAME), kind) == step


def existing_checkpoint(out_dir: str, kind: str) -> str | None:
    """A checkpoint of ``kind`` already in ``out_dir`` (by name: numbered, else final.pt), or None."""
    numbered = numbered_checkpoints(out_dir, kind)
    if numbered:
        return numbered[-1][1]
    final = bf.join(out_dir, FINAL_NAME)
    return final if bf.exists(final) else None


# ----------------------------------------------------------------------------- resume policy


def check_resume_flags(resume: str, resume_checkpoint: str) -> None:
    """ConfigError (one line) for ``--resume`` values other than auto / nothing, or both flags."""
    if resume not in RESUME_CHOICES:
        raise ConfigError(
            f"--resume {resume!r}: expected auto or nothing (use --resume_checkpoint PATH for a file)"
        )
    if resume == "auto" and resume_checkpoint not in ("", "auto"):
        raise ConfigError("--resume auto and --resume_checkpoint PATH exclude each other; give one")


def resumes_auto(resume: str, resume_checkpoint: str) -> bool:
    """True when the run continues from the newest checkpoint of its folder (if there is one)."""
    return resume == "auto" or resume_checkpoint == "auto"


def check_out_dir(out_dir: str, kind: str, *, resume: str, resume_checkpoint: str) -> None:
    """Refuse (one line) before any work a folder that cannot be written, resume flags that
    contradict each other, or a fresh run into a folder holding checkpoints of ``kind``.
    Writes nothing."""
    check_writable_dir(out_dir, "--out_dir")
    check_resume_flags(resume, resume_checkpoint)
    if resumes_auto(resume, resume_checkpoint) or resume_checkpoint:
        return
    found = existing_checkpoint(out_dir, kind)
    if found is not None:
        raise ConfigError(
            f"--out_dir {out_dir} already holds {found}: pass --resume auto to continue, or another --out_dir"
        )


def resume_path(out_dir: str, kind: str, *, resume: str, resume_checkpoint: str,
                exclude: tuple = ()) -> str | None:
    """The checkpoint a run continues from (the policy of the module docstring), None for a
    fresh start; the folder and flags are checked first (``check_out_dir``)."""
    check_out_dir(out_dir, kind, resume=resume, resume_checkpoint=resume_checkpoint)
    if not resumes_auto(resume, resume_checkpoint):
        return resume_checkpoint or None
    found = newest_checkpoint(out_dir, kind=kind, exclude=exclude)
    if found is None:
        logger.log(f"--resume auto: no checkpoint in {out_dir} yet, starting fresh")
    return found


# ----------------------------------------------------------------------------- the folder


def resolve_out_dir(flag: str, default: str, *, logdir_subfolder: str = "", ctx=None) -> str:
    """``--out_dir``, else ``$OPENAI_LOGDIR[/logdir_subfolder]``, else ``default``.

    Under torchrun (``ctx`` distributed) rank 0's choice is broadcast, so that a date-stamped
    default cannot differ between processes.
    """
    log_root = os.environ.get("OPENAI_LOGDIR")
    if log_root and logdir_subfolder:
        log_root = os.path.join(log_root, logdir_subfolder)
    out_dir = flag or log_root or default
    if ctx is not None and ctx.is_distributed:
        box = [out_dir]
        dist.broadcast_object_list(box, src=0)
        out_dir = box[0]
    return out_dir


def dated_default(prefix: str) -> str:
    """``runs/<prefix>-<date-time>``: a fresh folder per run."""
    return os.path.join("runs", time.strftime(f"{prefix}-%Y%m%d-%H%M%S"))


def open_run_dir(out_dir: str, ctx) -> None:
    """Start writing into ``out_dir``: rank 0 removes the temporary files that killed writers
    left there, then the logger opens its files (with the lines held since ``logger.reset``)."""
    if ctx.is_main:
        remove_stale_temp_files(out_dir, depth=0)
    logger.configure(dir=out_dir, rank=ctx.rank)


# ----------------------------------------------------------------------------- seeds

SEED_SCHEMES = ("words", "stream", "text")


def mix_seed(*parts, scheme: str = "words") -> int:
    """A 63-bit seed that mixes ``parts``: independent random streams for different tuples.

    One mixer; the three schemes are the foldings each stream has always used, kept so that
    every run draws the same numbers on the same seed:

    - ``words`` (the diffusion trainer): numpy's ``SeedSequence(parts)``, its first two 32-bit
      words as one 64-bit integer, shifted right by one;
    - ``stream`` (the supervised trainers; parts are seed, stream, rank): the seed taken modulo
      2**32, the same two words folded as ``(w0 << 31) ^ w1``;
    - ``text`` (sampling noise keyed by case ids, which are strings): SHA-256 of the parts
      joined by ``:``, its first 8 bytes (little-endian) shifted right by one.
    """
    if scheme == "text":
        key = ":".join(str(p) for p in parts).encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1
    if scheme not in SEED_SCHEMES:
        raise ValueError(f"seed scheme must be one of {SEED_SCHEMES}, got {scheme!r}")
    entropy = [int(p) for p in parts]
    if scheme == "stream":
        entropy[0] %= 2**32
    w0, w1 = (int(w) for w in np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32))
    if scheme == "stream":
        return (w0 << 31) ^ w1
    return ((w1 << 32) | w0) >> 1
