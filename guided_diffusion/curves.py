"""Training curves: loss, learning rate and validation Dice against the step, as one PNG.

Every trainer's logger redraws ``curves.png`` beside ``progress.csv`` at each log interval
(``logger.configure(..., formats=...)`` with "curves"); ``python -m evaluation.plot RUN_DIR ...``
draws several runs together. matplotlib runs with its Agg backend (no display, nothing opened
at import time of this package: matplotlib is imported on the first drawing).
"""

import csv
import math
import os

import blobfile as bf

from guided_diffusion.atomic import atomic_write
from guided_diffusion.errors import AddpmError

PROGRESS_NAME = "progress.csv"
CURVES_NAME = "curves.png"
LOSS_KEYS = ("loss", "vb")
VALIDATION_MARKERS = ("o", "s", "^", "D", "v")


def read_progress(run_dir: str) -> list[dict]:
    """The rows of ``run_dir/progress.csv`` as {key: float} (empty or non-numeric cells dropped)."""
    path = bf.join(run_dir, PROGRESS_NAME)
    if not bf.exists(path):
        raise AddpmError(f"{path} not found: is {run_dir} a training run folder?")
    with bf.BlobFile(path, "r") as f:
        rows = []
        for raw in csv.DictReader(f):
            row = {}
            for key, text in raw.items():
                try:
                    value = float(text)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(value):
                    row[key] = value
            rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if "step" in r and key in r]
    return [p[0] for p in points], [p[1] for p in points]


def _validation_keys(runs: dict) -> list[str]:
    keys = {k for rows in runs.values() for r in rows for k in r if k.startswith("val_") and k.endswith("dice")}
    return sorted(keys)


def plot_runs(runs: dict, path: str, title: str = "") -> str:
    """Draw ``runs`` ({label: rows of ``read_progress``}) into the PNG ``path``; returns it.

    Panels: the training loss (log scale; the vb term too when logged), the learning rate, and
    every validation Dice the runs logged (``val_dice`` of the supervised trainers,
    ``val_addpm_dice`` and ``val_preseg_dice`` of the diffusion trainer), against the step.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val_keys = _validation_keys(runs)
    panels = ["loss", "lr"] + (["validation"] if val_keys else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        name = f"{label} " if len(runs) > 1 else ""
        for key, style in zip(LOSS_KEYS, ("-", ":")):
            steps, values = _series(rows, key)
            if steps and all(v > 0 for v in values):
                axes["loss"].plot(steps, values, style, color=colour, label=f"{name}{key}")
        steps, values = _series(rows, "lr")
        axes["lr"].plot(steps, values, "-", color=colour, label=label if len(runs) > 1 else None)
        for j, (key, marker) in enumerate(zip(val_keys, VALIDATION_MARKERS * len(val_keys))):
            steps, values = _series(rows, key)
            if steps:
                # One run: a colour per score; several: a colour per run, a marker per score.
                shade = colour if len(runs) > 1 else colours[j % len(colours)]
                axes["validation"].plot(steps, values, "-", marker=marker, markersize=4, color=shade,
                                        label=f"{name}{key.removeprefix('val_').removesuffix('_dice') or 'dice'}")
    axes["loss"].set_yscale("log")
    for name, axis in axes.items():
        axis.set_xlabel("step")
        axis.set_title({"loss": "training loss", "lr": "learning rate", "validation": "validation Dice"}[name])
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=90))
    plt.close(figure)
    return path


def draw_run_curves(run_dir: str) -> str:
    """Redraw ``run_dir/curves.png`` from its progress.csv (local folders only)."""
    return plot_runs({os.path.basename(os.path.normpath(run_dir)): read_progress(run_dir)},
                     os.path.join(run_dir, CURVES_NAME), title=run_dir)
