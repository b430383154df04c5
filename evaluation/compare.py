"""One table comparing sample.py runs: Dice and HD95 with confidence intervals, and cost.

    python -m evaluation.compare preseg=OUT/preseg ddpm=OUT/ddpm addpm=OUT/addpm \
        [--out results/table.md] [--confidence 0.95]

Each NAME=DIR is the ``--out_dir`` of one ``sample.py`` run; its ``metrics.csv`` and
``summary.json`` are read and the run becomes one row of the table:

- Dice and HD95 per patient or per volume where the run has group rows (``patient`` /
  ``volume`` rows: each group scored on its slices stacked in 3D, see
  ``evaluation.report.GroupAccumulator``): the headline columns, first; then per case (the
  ``case`` rows of metrics.csv);
- UNet evaluations per image (all ensemble members together) and seconds per image, from
  summary.json.

Every metric cell is the mean and a confidence interval of the mean from the t-distribution:
``mean +- t_{(1+c)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation
(ddof=1) of the n valid values. No interval is given for n < 2, and none is clipped to the
metric's range (with few, spread values a Dice interval may pass 1); the table's notes say so
wherever an interval rests on fewer than 5 values. The rows enter the means
by ``evaluation.report.CONVENTIONS``, as in summary.json: cases whose label and prediction are
both empty are left out and counted; HD95 is the mean over the cases where it is defined (the
one-sided misses counted as "miss"), and "HD95, miss = diagonal" the mean with each miss scored
as the image diagonal in mm.

With ``--baseline NAME`` every other row also gets the paired difference to that run: the
mean and confidence interval of ``metric(run) - metric(baseline)`` over the units both runs
scored (patients or volumes where the runs have them, else cases), matched by id, of the same
per-unit values the means take: a unit both empty in either run is left out and counted
(``n_both_empty``), pairs where either value is undefined (an HD95 miss) are left out and
counted, and "HD95, miss = diagonal" pairs every other unit. A paired interval answers "does
this run improve on the baseline on the same patients", which two overlapping intervals of the
means cannot.

Runs with several classes or regions (``<name>_dice`` columns in metrics.csv, see
``evaluation.report``) hold in their un-prefixed columns each unit's mean over the classes present
in it. With ``--per_class True`` the first table is titled so, a line per run under the title gives
the mean of the per-class means (nnU-Net's foreground mean, at the run's headline level, without
an interval), and one more table per class or region follows: the same columns, read from that
class's own metrics (and paired on them with ``--baseline``). With a single class there is no mean
over classes: the class's table alone is printed.

With ``--out FILE.md`` the table is written there and the rows, with every number, to
``FILE.json`` beside it.
"""

import argparse
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy import stats

from evaluation.errors import EvaluationError
from evaluation.report import (
    conventions,
    is_both_empty,
    mean_of_class_means,
    metric_values,
    read_metrics_csv,
    write_summary_json,
)
from guided_diffusion.errors import ConfigError
from guided_diffusion.script_util import run_cli, str2bool

METRICS = ("dice", "hd95", "hd95_penalized")
GROUP_KINDS = ("patient", "volume")
DEFAULT_CONFIDENCE = 0.95
# Below this many values an interval of the mean is wide enough to need a word in the table.
FEW_UNITS = 5


def mean_ci(values, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """Mean of ``values`` with a t-distribution confidence interval of the mean.

    Args:
        values: numbers (None and nan are left out and counted as ``n_nan``).
        confidence: coverage of the interval, in (0, 1).

    Returns:
        {"mean", "low", "high", "std", "n", "n_nan"}: ``std`` is the sample standard deviation
        (ddof=1), ``n`` the number of valid values. mean is None when n == 0; std, low and high
        are None when n < 2.
    """
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"--confidence must lie in (0, 1), got {confidence}")
    array = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    valid = array[np.isfinite(array)]
    n = int(valid.size)
    out = {"mean": None, "low": None, "high": None, "std": None, "n": n,
           "n_nan": int(array.size - n)}
    if n == 0:
        return out
    out["mean"] = float(valid.mean())
    if n < 2:
        return out
    std = float(valid.std(ddof=1))
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    out.update(std=std, low=out["mean"] - half, high=out["mean"] + half)
    return out


def load_run(run_dir) -> tuple[list[dict], dict]:
    """(metrics.csv rows, summary.json dict) of one sample.py output folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvaluationError(f"run folder {run_dir} not found")
    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        raise EvaluationError(
            f"{metrics_path} not found (sample.py writes it when the data has labels)"
        )
    rows = read_metrics_csv(metrics_path)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise EvaluationError(f"{summary_path} not found (sample.py writes it beside metrics.csv)")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EvaluationError(f"{summary_path}: cannot read ({' '.join(str(exc).split())})") from None
    if not isinstance(summary, dict):
        raise EvaluationError(f"{summary_path} is not a JSON object")
    return rows, summary


def _level(rows: list[dict], confidence: float, prefix: str = "") -> dict:
    level = {"n": len(rows), "n_both_empty": metric_values(rows, prefix + "dice")[1]}
    for metric in METRICS:
        level[metric] = mean_ci(metric_values(rows, prefix + metric)[0], confidence)
    return level


def class_names(rows: list[dict]) -> list[str]:
    """The classes or regions of a run's metrics.csv rows: the ``<name>`` of its ``<name>_dice``
    columns (not the pre-segmentation's ``preseg_*``), in column order."""
    columns = rows[0].keys() if rows else ()
    return [c[: -len("_dice")] for c in columns
            if c.endswith("_dice") and c != "dice" and not c.startswith("preseg_")]


def _cases_digest(case_ids) -> str:
    return hashlib.sha1("\n".join(sorted(case_ids)).encode("utf-8")).hexdigest()[:12]


def _units(rows: list[dict]) -> tuple[str, dict]:
    """(kind, {id: row}) of the units a paired comparison uses: groups if any, else cases."""
    for kind in (*GROUP_KINDS, "case"):
        units = {r["case_id"]: r for r in rows if r.get("kind", "case") == kind}
        if units:
            return kind, units
    return "case", {}


def paired_difference(rows: list[dict], baseline_rows: list[dict], *,
                      confidence: float = DEFAULT_CONFIDENCE, prefix: str = "") -> dict:
    """Paired differences ``run - baseline`` per unit (see the module docstring).

    Returns:
        {"kind": patient|volume|case, "n_pairs": units in both runs and not both empty in
         either, "n_both_empty": the units left out for that,
         metric: mean_ci of the differences (n_nan: pairs with an undefined value)}.
    """
    kind, mine = _units(rows)
    base_kind, theirs = _units(baseline_rows)
    if kind != base_kind:
        raise EvaluationError(f"cannot pair {kind} rows with the baseline's {base_kind} rows")
    common = sorted(set(mine) & set(theirs))
    # The convention of the means: a unit both empty (in either run) is in neither run's mean
    # (or only in one), so it enters no difference.
    scored = [u for u in common if not (is_both_empty(mine[u], prefix) or is_both_empty(theirs[u], prefix))]
    out = {"kind": kind, "n_pairs": len(scored), "n_both_empty": len(common) - len(scored)}
    for metric in METRICS:
        diffs = []
        for unit in scored:
            a, b = mine[unit].get(prefix + metric), theirs[unit].get(prefix + metric)
            diffs.append(None if a is None or b is None else float(a) - float(b))
        out[metric] = mean_ci(diffs, confidence)
    return out


def compare_runs(run_dirs: Mapping, *, confidence: float = DEFAULT_CONFIDENCE,
                 baseline: str | None = None, class_name: str = "") -> list[dict]:
    """One row per run, in the order given.

    Args:
        run_dirs: {name: sample.py --out_dir}.
        confidence: coverage of the intervals of the mean.
        class_name: "" for the un-prefixed columns, or a class or region of the runs
            (``class_names``), whose ``<name>_`` columns the row then reads.

    Returns:
        rows: {"name", "run_dir", "sampler", "num_ensemble", "unet_evaluations_per_image",
        "unet_evaluations_per_member", "seconds_per_image", "device", "cases" (a digest of
        the sorted case ids, equal for runs on the same cases), "classes" (``class_names``),
        "case": {"n", "n_both_empty", "dice": mean_ci, "hd95": mean_ci, "hd95_penalized": mean_ci},
        "group": the same plus "kind" (patient|volume) for the group rows, or None,
        "paired": ``paired_difference`` to the ``baseline`` run (None for the baseline itself
        or without one)}.
    """
    if not run_dirs:
        raise ConfigError("give at least one run as NAME=DIR")
    if baseline is not None and baseline not in run_dirs:
        raise ConfigError(f"--baseline {baseline!r} is not one of the runs ({', '.join(run_dirs)})")
    loaded = {name: load_run(run_dir) for name, run_dir in run_dirs.items()}
    prefix = f"{class_name}_" if class_name else ""
    for name, (rows, _) in loaded.items():
        if class_name and class_name not in class_names(rows):
            raise EvaluationError(f"{Path(run_dirs[name]) / 'metrics.csv'} has no class or region {class_name!r} "
                                  f"(it has: {', '.join(class_names(rows)) or 'none'})")
    out = []
    for name, run_dir in run_dirs.items():
        rows, summary = loaded[name]
        cases = [r for r in rows if r.get("kind", "case") == "case"]
        if not cases:
            raise EvaluationError(f"{Path(run_dir) / 'metrics.csv'} has no case rows")
        group = None
        for kind in GROUP_KINDS:
            group_rows = [r for r in rows if r.get("kind") == kind]
            if group_rows:
                group = {"kind": kind, **_level(group_rows, confidence, prefix)}
                break
        out.append({
            "name": str(name),
            "run_dir": str(run_dir),
            "sampler": summary.get("sampler"),
            "num_ensemble": summary.get("num_ensemble"),
            "unet_evaluations_per_image": summary.get("unet_evaluations_per_image"),
            "unet_evaluations_per_member": summary.get("unet_evaluations_per_member"),
            "seconds_per_image": summary.get("seconds_per_image"),
            "device": summary.get("device"),
            "cases": _cases_digest(r["case_id"] for r in cases),
            "classes": class_names(rows),
            "case": _level(cases, confidence, prefix),
            "group": group,
            "paired": (None if baseline is None or name == baseline
                       else paired_difference(rows, loaded[baseline][0], confidence=confidence, prefix=prefix)),
        })
    return out


def _cell(ci: dict | None, digits: int, undefined: str = "undefined", signed: bool = False) -> str:
    if ci is None or (ci["mean"] is None and not ci["n_nan"]):
        return "-"
    if ci["mean"] is None:
        # Every value is undefined (all misses): the count says so.
        return f"n/a ({ci['n_nan']} {undefined})"
    sign = "+" if signed else ""
    text = f"{ci['mean']:{sign}.{digits}f}"
    if ci["low"] is not None:
        text += f" [{ci['low']:{sign}.{digits}f}, {ci['high']:{sign}.{digits}f}]"
    if ci["n_nan"]:
        text += f" ({ci['n_nan']} {undefined})"
    return text


def _count(level: dict | None) -> str:
    if level is None:
        return "-"
    empty = level.get("n_both_empty") or 0
    return f"{level['n']} ({empty} both empty)" if empty else str(level["n"])


def _level_cells(level: dict | None) -> list[str]:
    return [_count(level), _cell(level and level["dice"], 3), _cell(level and level["hd95"], 2, "miss"),
            _cell(level and level["hd95_penalized"], 2)]


def _seconds(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _evaluations(row: dict) -> str:
    per_image, per_member = row["unet_evaluations_per_image"], row["unet_evaluations_per_member"]
    members = row["num_ensemble"]
    if per_image is None:
        return "-"
    if per_image and members and members > 1 and per_member is not None:
        return f"{per_image} ({members} x {per_member})"
    return str(per_image)


def format_table(rows: list[dict], *, confidence: float = DEFAULT_CONFIDENCE,
                 baseline: str | None = None, with_notes: bool = True) -> str:
    """Markdown table of ``compare_runs`` rows, with the notes that say how to read it (unless
    ``with_notes`` is False: the tables per class follow one that has them)."""
    group_word = _group_word(rows)
    paired = [r["paired"] for r in rows if r.get("paired")]
    pair_word = paired[0]["kind"] if paired else ""
    header = ["run", "sampler"]
    levels = [("case", "case")]
    if group_word:
        # The per-patient / per-volume figures are the headline: they come first.
        levels.insert(0, ("group", group_word))
    for _, word in levels:
        header += [f"{word}s", f"Dice per {word}", f"HD95 per {word}", f"HD95 per {word}, miss = diagonal"]
    if paired:
        header += [f"Dice - {baseline} (paired, per {pair_word})", f"HD95 - {baseline} (paired)",
                   f"HD95, miss = diagonal - {baseline} (paired)"]
    header += ["UNet evals / image", "s / image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["name"], str(r["sampler"] or "-")]
        for key, _ in levels:
            cells += _level_cells(r[key])
        if paired:
            p = r.get("paired")
            cells += [_cell(p and p["dice"], 3, signed=True), _cell(p and p["hd95"], 2, "miss", signed=True),
                      _cell(p and p["hd95_penalized"], 2, signed=True)]
        cells += [_evaluations(r), _seconds(r["seconds_per_image"])]
        lines.append("| " + " | ".join(cells) + " |")
    if not with_notes:
        return "\n".join(lines) + "\n"
    percent = f"{100 * confidence:g}%"
    stated = conventions(several_classes=has_several_classes(rows))
    notes = [
        f"Mean [{percent} confidence interval of the mean, t-distribution: mean +- "
        f"t((1+c)/2, n-1) * s / sqrt(n)]. HD95 in mm (pixels for images without a spacing). "
        f"Both empty: {stated['both_empty']}. HD95: {stated['hd95']} (miss). "
        f"Miss = diagonal: {stated['hd95_penalized']}. UNet evaluations per image count "
        "every ensemble member (members x evaluations per member).",
    ]
    if "classes" in stated:
        notes.append(f"Classes: {stated['classes']}.")
    if group_word:
        notes.append(f"Per-{group_word} rows score each {group_word}'s slices stacked in 3D; "
                     f"they are the headline figures.")
    if paired:
        notes.append(
            f"Paired columns: mean [{percent} interval] of run - {baseline} over the same "
            f"{pair_word}s, of the per-{pair_word} values the means above take: a {pair_word} both "
            f"empty in either run is left out, a miss in either run leaves the HD95 pair out (counted "
            f"as miss) and enters miss = diagonal with the diagonal; an interval above 0 (Dice) or "
            f"below 0 (HD95) is a gain on those {pair_word}s."
        )
    small = _small_samples(rows, [key for key, _ in levels] + (["paired"] if paired else []))
    if small:
        sizes = ", ".join(f"n = {n}: t = {float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)):.2f}" for n in small)
        notes.append(
            f"Intervals of fewer than {FEW_UNITS} values ({sizes}) are wide: the t quantile with n - 1 degrees "
            "of freedom grows fast as n falls, and an interval is not clipped to the metric's range, so a "
            "Dice interval may run below 0 or above 1. Such an interval says that the units are too few "
            "to pin the mean down, not that a Dice below 0 is plausible."
        )
    if len({r["cases"] for r in rows}) > 1:
        notes.append("Warning: the runs were not scored on the same cases.")
    # One paragraph per note: in markdown, lines without a blank one between them run together.
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def _group_word(rows: list[dict]) -> str:
    """What the runs' group rows are: patient, volume, or group for a mix; "" without any."""
    kinds = sorted({r["group"]["kind"] for r in rows if r["group"] is not None})
    return kinds[0] if len(kinds) == 1 else ("group" if kinds else "")


def has_several_classes(rows: list[dict]) -> bool:
    """True when some run of ``compare_runs`` rows has two or more classes or regions: its
    un-prefixed columns are then means over classes."""
    return any(len(r.get("classes") or ()) > 1 for r in rows)


def class_mean_of_runs(per_class: Mapping) -> list[dict]:
    """The mean of the per-class means of each run (nnU-Net's foreground mean), at its headline
    level (groups where it has them, else cases).

    Args:
        per_class: {class: ``compare_runs`` rows of that class}, the runs in one order.

    Returns:
        one entry per run: {"name", "kind": patient|volume|case, metric: {"mean", "n_valid",
        "n_undefined" (``evaluation.report.mean_of_class_means``), "undefined": the classes
        whose mean is undefined}}.
    """
    columns = list(zip(*per_class.values()))
    out = []
    for class_rows in columns:
        first = class_rows[0]
        kind = first["group"]["kind"] if first["group"] else "case"
        levels = {name: row["group"] or row["case"] for name, row in zip(per_class, class_rows)}
        entry = {"name": first["name"], "kind": kind}
        for metric in METRICS:
            means = {name: level[metric]["mean"] for name, level in levels.items()}
            entry[metric] = {**mean_of_class_means(means),
                             "undefined": [name for name, mean in means.items() if mean is None]}
        out.append(entry)
    return out


def format_class_means(entries: list[dict]) -> str:
    """One markdown line per run of ``class_mean_of_runs``, under a line that says what they are."""
    lines = ["Mean of the classes (the mean of the per-class means in the tables below, as nnU-Net's "
             "foreground mean), per run:", ""]
    for entry in entries:
        cells = []
        for metric, title, digits in (("dice", "Dice per {}", 3), ("hd95", "HD95 per {}", 2),
                                      ("hd95_penalized", "HD95 per {}, miss = diagonal", 2)):
            mean = entry[metric]
            text = "n/a" if mean["mean"] is None else f"{mean['mean']:.{digits}f}"
            if mean["undefined"]:
                text += f" ({', '.join(mean['undefined'])} undefined)"
            cells.append(f"{title.format(entry['kind'])} {text}")
        lines.append(f"- {entry['name']}: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def _small_samples(rows: list[dict], keys) -> list[int]:
    """The sizes below ``FEW_UNITS`` of the intervals in the table (n >= 2: n < 2 has none)."""
    sizes = set()
    for row in rows:
        for key in keys:
            level = row.get(key)
            for metric in METRICS if level else ():
                if 2 <= level[metric]["n"] < FEW_UNITS:
                    sizes.add(level[metric]["n"])
    return sorted(sizes)


def parse_runs(specs) -> dict:
    """``["name=dir", ...]`` -> {name: dir}, in order; ConfigError on a malformed or repeated name."""
    runs = {}
    for spec in specs:
        name, sep, run_dir = str(spec).partition("=")
        if not sep or not name or not run_dir:
            raise ConfigError(f"run {spec!r} is not NAME=DIR (e.g. addpm=demo_run/samples/addpm)")
        if name in runs:
            raise ConfigError(f"run name {name!r} is given twice")
        runs[name] = run_dir
    return runs


def write_outputs(rows: list[dict], table: str, out_path, *, confidence: float, per_class=None,
                  class_mean=None) -> Path:
    """Write the markdown table to ``out_path`` and the rows (and ``per_class``: {class: rows},
    and ``class_mean``: ``class_mean_of_runs``, when given) to the .json beside it; returns the
    JSON path."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(table, encoding="utf-8")
    json_path = out_path.with_suffix(".json")
    record = {"confidence": confidence, "ci_method": "t-distribution",
              "conventions": conventions(several_classes=has_several_classes(rows)), "runs": rows}
    if per_class:
        record["per_class"] = per_class
    if class_mean:
        record["class_mean"] = class_mean
    write_summary_json(record, json_path)
    return json_path


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.compare",
        description="Compare sample.py runs in one table: Dice and HD95 per case and per "
        "patient/volume with confidence intervals, UNet evaluations and seconds per image.",
    )
    parser.add_argument("runs", nargs="+", metavar="NAME=DIR",
                        help="a table row: its name and the --out_dir of a sample.py run")
    parser.add_argument("--out", default="",
                        help="write the markdown table here and the numbers to the .json beside "
                        "it (empty: print only)")
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                        help="coverage of the confidence intervals of the mean (default: 0.95)")
    parser.add_argument("--per_class", type=str2bool, default=False,
                        help="runs with several classes or regions: one more table per class or region "
                        "after the first (each unit's mean over the classes present in it), and the mean "
                        "of the per-class means under its title")
    parser.add_argument("--baseline", default="",
                        help="NAME of the run that the others are compared with, paired per patient "
                        "(or volume, or case); empty: no paired columns")
    return parser


def main(argv=None) -> list[dict]:
    args = create_argparser().parse_args(argv)
    baseline = args.baseline or None
    runs = parse_runs(args.runs)
    rows = compare_runs(runs, confidence=args.confidence, baseline=baseline)
    table = format_table(rows, confidence=args.confidence, baseline=baseline)
    per_class, class_mean = {}, []
    if args.per_class:
        names = class_names(load_run(next(iter(runs.values())))[0])
        if not names:
            raise EvaluationError("--per_class True: the runs have no classes or regions (no <name>_dice columns)")
        per_class = {name: compare_runs(runs, confidence=args.confidence, baseline=baseline, class_name=name)
                     for name in names}
        if len(names) == 1:
            # One class: no mean over classes to show, the class's own table (with the notes).
            (name,) = names
            table = f"### {name}\n\n" + format_table(per_class[name], confidence=args.confidence, baseline=baseline)
        else:
            class_mean = class_mean_of_runs(per_class)
            units = " and ".join(word for word in (_group_word(rows), "case") if word)
            sections = [f"### Mean over the classes present in each {units} ({', '.join(names)})\n\n"
                        f"{format_class_means(class_mean)}\n{table}"]
            sections += [f"### {name}\n\n" + format_table(class_rows, confidence=args.confidence,
                                                           baseline=baseline, with_notes=False)
                         for name, class_rows in per_class.items()]
            table = "\n".join(sections)
    print(table, end="")
    if args.out:
        json_path = write_outputs(rows, table, args.out, confidence=args.confidence, per_class=per_class,
                                  class_mean=class_mean)
        print(f"wrote {args.out} and {json_path}")
    return rows


if __name__ == "__main__":
    run_cli(main)
