"""Key/value training logs, as improved-diffusion's logger but smaller.

    logger.configure("runs/x")          # or OPENAI_LOGDIR, or ./logs/addpm-<date-time>
    logger.logkv("step", step)
    logger.logkv_mean("loss", loss)     # averaged over the calls until the next dump
    logger.dumpkvs()                    # table on stdout, a row in progress.csv / .jsonl

Outputs in the log folder: ``progress.csv`` (its header is rewritten when new keys appear,
as improved-diffusion does), ``progress.jsonl`` (one JSON object per dump), ``log.txt``
(the tables and ``log(...)`` lines), ``curves.png`` (loss, learning rate and validation Dice
against the step, ``guided_diffusion.curves``; redrawn after a dump at most every
``CURVES_SECONDS`` and by ``draw_curves()`` at the end of a run; local folders only). Only
rank 0 writes anything. Paths go through blobfile, so the folder may be a cloud URL; nothing
is opened before ``configure`` or the first write. Before ``configure``, output goes to stdout only, and the ``log(...)`` lines since the last
``reset()`` are held and written to the log.txt that ``configure`` opens: a script can check
its inputs (and say so) before it creates anything on disk.
"""

import csv
import datetime
import io
import json
import math
import numbers
import os
import sys
import time

import blobfile as bf

from guided_diffusion import curves

FORMATS = ("stdout", "csv", "jsonl", "log", "curves")
# Redrawing costs a few tenths of a second: not after every dump of a fast run.
CURVES_SECONDS = 20.0

_CSV_NAME = "progress.csv"
_JSONL_NAME = "progress.jsonl"
_LOG_NAME = "log.txt"


def _default_rank() -> int:
    # Under torchrun every process has RANK; only rank 0 should write.
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _plain(value):
    """A JSON/CSV-friendly scalar: numbers as float/int, 0-d tensors or arrays via .item()."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, bool) or isinstance(value, (int, float, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:<8.3g}".rstrip()
    return str(value)


def _table(kvs: dict) -> str:
    """improved-diffusion's aligned two-column table."""
    if not kvs:
        return ""
    rows = [(str(k)[:30], _format_value(v)[:30]) for k, v in sorted(kvs.items())]
    key_width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    dashes = "-" * (key_width + value_width + 7)
    lines = [dashes]
    lines += [f"| {k:<{key_width}} | {v:<{value_width}} |" for k, v in rows]
    lines.append(dashes)
    return "\n".join(lines) + "\n"


class Logger:
    """Accumulates key/values between dumps and writes them in the chosen formats."""

    def __init__(self, dir: str | None, formats=FORMATS, rank: int = 0):
        unknown = [fmt for fmt in formats if fmt not in FORMATS]
        if unknown:
            raise ValueError(f"unknown log formats {unknown}; choose from {FORMATS}")
        self.dir = dir
        self.rank = rank
        self.formats = tuple(formats) if dir is not None else tuple(f for f in formats if f == "stdout")
        self.name2val = {}
        self.name2cnt = {}
        self._csv_keys = []
        self._curves_drawn = -math.inf
        # Lines of an unconfigured logger, for the log.txt of the next configure().
        self.held_lines = []
        if self.writes and any(fmt != "stdout" for fmt in self.formats):
            bf.makedirs(dir)

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def logkv(self, key: str, value) -> None:
        self.name2val[key] = _plain(value)
        self.name2cnt.pop(key, None)

    def logkv_mean(self, key: str, value) -> None:
        value = _plain(value)
        count = self.name2cnt.get(key, 0)
        old = self.name2val.get(key, 0.0)
        # Running mean: old * n / (n + 1) + new / (n + 1), as improved-diffusion.
        self.name2val[key] = old * count / (count + 1) + value / (count + 1)
        self.name2cnt[key] = count + 1

    def dumpkvs(self) -> dict:
        kvs = dict(self.name2val)
        self.name2val.clear()
        self.name2cnt.clear()
        if not kvs or not self.writes:
            return kvs
        if "stdout" in self.formats:
            sys.stdout.write(_table(kvs))
            sys.stdout.flush()
        if "log" in self.formats:
            self._append(_LOG_NAME, _table(kvs))
        if "jsonl" in self.formats:
            self._append(_JSONL_NAME, json.dumps(kvs, sort_keys=True, default=str) + "\n")
        if "csv" in self.formats:
            self._write_csv(kvs)
        if time.monotonic() - self._curves_drawn >= CURVES_SECONDS:
            self.draw_curves()
        return kvs

    def draw_curves(self) -> None:
        """Redraw curves.png from progress.csv (rank 0, local folders, with "curves" and "csv")."""
        if not (self.writes and "curves" in self.formats and "csv" in self.formats) or "://" in self.dir:
            return
        if not bf.exists(bf.join(self.dir, curves.PROGRESS_NAME)):
            return
        try:
            curves.draw_run_curves(self.dir)
        except OSError as err:
            # A picture must not end a training run; the numbers are in progress.csv.
            self.log(f"curves.png not drawn: {err}")
        self._curves_drawn = time.monotonic()

    def log(self, *args) -> None:
        if not self.writes:
            return
        line = " ".join(str(a) for a in args) + "\n"
        if "stdout" in self.formats:
            sys.stdout.write(line)
            sys.stdout.flush()
        if "log" in self.formats:
            self._append(_LOG_NAME, line)
        elif self.dir is None:
            self.held_lines.append(line)

    def _append(self, name: str, text: str) -> None:
        with bf.BlobFile(bf.join(self.dir, name), "a") as f:
            f.write(text)

    def _write_csv(self, kvs: dict) -> None:
        path = bf.join(self.dir, _CSV_NAME)
        if not self._csv_keys and bf.exists(path):
            # A resumed run appends to the table its earlier process wrote.
            with bf.BlobFile(path, "r") as f:
                header = next(csv.reader(f), [])
            self._csv_keys = list(header)
        new_keys = [k for k in sorted(kvs) if k not in self._csv_keys]
        if new_keys:
            old_rows = []
            if self._csv_keys and bf.exists(path):
                with bf.BlobFile(path, "r") as f:
                    old_rows = list(csv.reader(f))[1:]
            self._csv_keys += new_keys
            # A new column: rewrite the header and pad the earlier rows with empty cells.
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(self._csv_keys)
            for row in old_rows:
                writer.writerow(row + [""] * (len(self._csv_keys) - len(row)))
            with bf.BlobFile(path, "w") as f:
                f.write(buffer.getvalue())
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["" if kvs.get(k) is None else kvs[k] for k in self._csv_keys])
        self._append(_CSV_NAME, buffer.getvalue())


_current = None


def _logger() -> Logger:
    global _current
    if _current is None:
        _current = Logger(None, formats=("stdout",), rank=_default_rank())
    return _current


def _default_dir() -> str:
    stamp = datetime.datetime.now().strftime("addpm-%Y-%m-%d-%H-%M-%S-%f")
    return os.path.join(os.getcwd(), "logs", stamp)


def configure(dir=None, rank: int | None = None, formats=FORMATS) -> str:
    """Start logging into ``dir``; returns the folder.

    :param dir: the log folder; None -> ``$OPENAI_LOGDIR``, else ./logs/addpm-<date-time>.
    :param rank: this process's rank; only rank 0 writes. None -> ``$RANK`` (torchrun), else 0.
    :param formats: any of "stdout", "csv", "jsonl", "log", "curves".
    """
    global _current
    if dir is None:
        dir = os.environ.get("OPENAI_LOGDIR") or _default_dir()
    dir = os.fspath(dir)
    if rank is None:
        rank = _default_rank()
    held = _current.held_lines if _current is not None and _current.dir is None else []
    _current = Logger(dir, formats=formats, rank=rank)
    if held and _current.writes and "log" in _current.formats:
        _current._append(_LOG_NAME, "".join(held))
    return dir


def get_dir() -> str | None:
    """The folder configured by ``configure`` (None before)."""
    return _logger().dir


def logkv(key: str, value) -> None:
    """Set ``key`` for the next dump (the last value wins)."""
    _logger().logkv(key, value)


def logkv_mean(key: str, value) -> None:
    """Add ``value`` to the mean of ``key`` over the calls until the next dump."""
    _logger().logkv_mean(key, value)


def dumpkvs() -> dict:
    """Write the current key/values (rank 0) and start a new interval; returns them."""
    return _logger().dumpkvs()


def log(*args) -> None:
    """A free-text line to stdout and log.txt (rank 0)."""
    _logger().log(*args)


def draw_curves() -> None:
    """Redraw curves.png now (the trainers call it when a run ends)."""
    _logger().draw_curves()


def reset() -> None:
    """Back to the unconfigured stdout-only logger (drops unsaved key/values and held lines)."""
    global _current
    _current = None
