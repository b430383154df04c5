"""The lines every script prints first and last: what the run works on, and what came out where.

The header is a block, one aligned field per line, printed once the inputs are checked and
before the work starts; the closing line is one line, the last a run prints (so that the
tail of a log says how it went)::

    sample.py
      device       cpu, fp32, 1 process
      data         DATA/testing: 16 cases (brats2d), labelled
      ...
    sample.py done in 28 s: mean dice per patient 0.9150 (4 patients); ...; results in OUT

``sample.py``, the three trainers and ``python -m evaluation`` format them here.
"""

import math

from guided_diffusion import curves
from guided_diffusion.errors import AddpmError

_INDENT = "  "


def header(title: str, fields) -> str:
    """``title`` then one ``  name  value`` line per (name, value) of ``fields`` (empty values
    left out), the values aligned."""
    fields = [(name, str(value)) for name, value in fields if value not in (None, "")]
    width = max((len(name) for name, _ in fields), default=0)
    return "\n".join([title] + [f"{_INDENT}{name.ljust(width)}  {value}" for name, value in fields])


def closing(title: str, parts, seconds: float | None = None) -> str:
    """``<title> done in <duration>: part; part; ...`` (empty parts left out)."""
    took = f" in {duration(seconds)}" if seconds is not None else ""
    return f"{title} done{took}: " + "; ".join(str(p) for p in parts if p)


def duration(seconds: float) -> str:
    """``0.4 s``, ``28 s``, ``9 min 26 s``, ``2 h 05 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def processes(world_size: int) -> str:
    return f"{world_size} process{'es' if world_size != 1 else ''}"


def last_logged(out_dir: str, key: str) -> float | None:
    """The last value of ``key`` in ``out_dir``'s progress.csv (None when it has none)."""
    try:
        rows = curves.read_progress(out_dir)
    except (OSError, ValueError, AddpmError):
        return None
    values = [row[key] for row in rows if key in row and math.isfinite(row[key])]
    return values[-1] if values else None


def training_closing(title: str, *, seconds: float, step: int, out_dir: str, final_path: str,
                     val_name: str = "validation Dice", val_score: float | None = None,
                     best_score: float | None = None, best_step: int | None = None,
                     best_path: str | None = None) -> str:
    """The closing line of a trainer: steps, last loss, validation score, checkpoints, logs."""
    loss = last_logged(out_dir, "loss")
    parts = [f"step {step}", f"loss {loss:.4f}" if loss is not None else ""]
    if val_score is not None:
        text = f"{val_name} {val_score:.4f}"
        if best_score is not None and best_step is not None and best_step != step:
            text += f" (best {best_score:.4f} at step {best_step})"
        parts.append(text)
    parts.append(f"checkpoint {final_path}")
    if best_path:
        parts.append(f"best {best_path}")
    parts.append(f"logs and curves.png in {out_dir}")
    return closing(title, parts, seconds)
