"""Memory of the end of a sample.py run: merging the case records into metrics.csv and summary.json.

    python -m benchmarks.bench_outputs [--cases 100,1000] [--size 256] [--slices_per_patient 20]

Writes ``--cases`` case records as sample.py writes them (256 x 256 image slices, as the LGG
set, ``--slices_per_patient`` slices per patient, so the merge also scores every patient on its
stacked slices), then measures, each in a fresh process, the growth of the peak resident memory
(RSS) during

- ``streaming``: ``evaluation.outputs.merge_records``, the merge sample.py runs, which holds one
  patient's (or volume's) arrays at a time;
- ``one list``: loading every record into one list first, as the merge did before (a lower
  bound of that merge's peak: it then also scored the patients from the list).

A flat ``streaming`` column over the case counts is what lets 100 000 slices finish in the
memory that 100 take.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from evaluation.metrics import segmentation_metrics
from evaluation.outputs import load_record, merge_records, write_record

METHODS = ("streaming", "one list")


def blob(rng, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    (cy, cx), r = rng.uniform(0.3, 0.7, 2) * size, rng.uniform(0.05, 0.15) * size
    return ((yy - cy) ** 2 + ((xx - cx) / rng.uniform(0.7, 1.3)) ** 2 < r**2).astype(np.uint8)


def write_records(folder: Path, cases: int, size: int, per_patient: int, seed: int = 0) -> list[str]:
    """``cases`` records of image slices with a label, a prediction and a pre-segmentation."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(cases):
        patient, index = f"P{n // per_patient:05d}", n % per_patient
        label, mask, preseg = blob(rng, size), blob(rng, size), blob(rng, size)
        meta = {"format": "image", "original_shape": [size, size], "spacing": [1.0, 1.0], "affine": None,
                "patient_id": patient, "volume_id": patient, "slice_index": index, "slice_axis": None}
        record = {"case_id": f"{patient}_{index}", "seconds": 0.01, "meta": meta,
                  "metrics": segmentation_metrics(mask, label), "preseg_metrics": segmentation_metrics(preseg, label)}
        maps = rng.random((size, size)).astype(np.float16)
        path = str(folder / f"{record['case_id']}.npz")
        write_record(path, record, mask=np.packbits(mask), preseg=np.packbits(preseg), label=np.packbits(label),
                     variance=maps, entropy=maps)
        paths.append(path)
    return paths


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def measure(method: str, folder: Path) -> float:
    """Growth of this process's peak RSS (MiB) while ``method`` merges the records of ``folder``."""
    paths = sorted(str(p) for p in folder.glob("*.npz"))
    before = peak_rss_mib()
    if method == "streaming":
        merge_records(paths, str(folder.parent / "out"))
    else:
        records = [load_record(p) for p in paths]
        assert len(records) == len(paths)
    return peak_rss_mib() - before


def run_child(method: str, folder: Path) -> float:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_outputs", "--measure", method, "--records",
                          str(folder)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["mib"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_outputs", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="100,1000", help="comma-separated numbers of case records")
    parser.add_argument("--size", type=int, default=256, help="side of each slice in pixels")
    parser.add_argument("--slices_per_patient", type=int, default=20, help="slices grouped under one patient")
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--records", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps({"mib": measure(args.measure, Path(args.records))}))
        return
    counts = [int(c) for c in args.cases.split(",") if c.strip()]
    print(f"peak RSS growth while merging case records ({args.size}x{args.size} slices, "
          f"{args.slices_per_patient} per patient)")
    print("| cases | streaming merge | every record in one list | one list / streaming |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench_outputs_") as tmp:
        for n in counts:
            folder = Path(tmp) / f"n{n}" / "cases"
            write_records(folder, n, args.size, args.slices_per_patient)
            streaming, listed = (run_child(m, folder) for m in METHODS)
            print(f"| {n} | {streaming:.1f} MiB | {listed:.1f} MiB | {listed / max(streaming, 0.1):.1f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
