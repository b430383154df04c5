"""The patient split of the quality benchmark: test patients held out, the trainers' own
validation patients mirrored too, every record's files linked at their relative paths.

``make_split(args, out)`` writes ``out/split/{train,val,test}`` and ``out/split/split.json``:

- ``test``: ``--test_fraction`` of the labelled patients (seeded by ``--split_seed``), never
  seen by a trainer; ``--max_test_cases N`` keeps N of their records (seeded);
- ``train``: every other labelled patient; each trainer holds out its own ``--val_fraction``
  of them (``data.datasets.split_records`` with ``--split_seed``) for validation;
- ``val``: exactly those held-out patients, mirrored again so that ``sample.py`` can segment
  them: settings are chosen on ``val``, never on ``test``.

Each record's files are symbolic links, with the layout's own files (dataset.json and the
like) beside them, so every layout reads as before. Records without a label are left out.
"""

import os
import random
from collections import Counter
from pathlib import Path

from data.datasets import split_records
from data.io import is_image, is_nifti
from data.layouts import scan
from evaluation.report import write_summary_json
from guided_diffusion.errors import AddpmError


class BenchError(AddpmError):
    """A phase of the benchmark that cannot run or failed."""


def split_patients(patients: list[str], test_fraction: float, seed: int) -> tuple[list, list]:
    """(train, test) patient ids: a seeded shuffle, round(fraction * n) test patients (at least
    one on each side)."""
    if len(patients) < 2:
        raise BenchError(f"the data holds {len(patients)} labelled patient(s); a split needs at least 2")
    order = sorted(patients)
    random.Random(seed).shuffle(order)
    n_test = min(max(1, round(test_fraction * len(order))), len(order) - 1)
    return sorted(order[n_test:]), sorted(order[:n_test])


def _link(target: str, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        os.symlink(os.path.abspath(target), link)


def mirror(records, base: str, layout_files: list[str], dest: Path) -> None:
    """Symbolic links to every file of ``records`` under ``dest`` at its path relative to
    ``base``, and to the layout files (dataset.json and the like)."""
    for record in records:
        for path in list(record.image_files) + [record.label_file]:
            _link(path, dest / os.path.relpath(path, base))
    for path in layout_files:
        _link(path, dest / os.path.relpath(path, base))


def _layout_files(base: str, root: str) -> list[str]:
    """Files beside the data that describe it (not images or NIfTI volumes) in ``base`` and
    ``root``, e.g. nnU-Net's dataset.json."""
    found = []
    for folder in dict.fromkeys((base, root)):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not name.startswith(".") and not is_image(name) and not is_nifti(name):
                found.append(path)
    return found


def make_split(args, out: Path) -> dict:
    """Mirror the train and test records into ``out/split``; returns the split's description."""
    found = scan(args.data_dir, args.dataset, mask_suffix=args.mask_suffix)
    labelled = [r for r in found.records if r.label_file]
    if not labelled:
        raise BenchError(f"--data_dir {args.data_dir}: no record has a label; the benchmark needs labels")
    train_ids, test_ids = split_patients(sorted({r.patient_id for r in labelled}),
                                         args.test_fraction, args.split_seed)
    test_set = set(test_ids)
    train = [r for r in labelled if r.patient_id not in test_set]
    test = [r for r in labelled if r.patient_id in test_set]
    n_test_all = len(test)
    if args.max_test_cases and len(test) > args.max_test_cases:
        keep = set(random.Random(args.split_seed).sample(range(len(test)), args.max_test_cases))
        test = [r for i, r in enumerate(test) if i in keep]
    files = [f for r in labelled for f in list(r.image_files) + [r.label_file]]
    base = os.path.commonpath([found.root] + [os.path.abspath(f) for f in files])
    layout_files = _layout_files(base, found.root)
    split_dir = out / "split"
    data_rel = os.path.relpath(found.root, base)
    for part, records in (("train", train), ("test", test)):
        mirror(records, base, layout_files, split_dir / part)
    train_dir = split_dir / "train" / data_rel
    val = mirror_validation(args, train_dir, split_dir / "val")
    description = {
        "data_dir": found.root,
        "layout": found.layout,
        "records": len(found.records),
        "unlabelled_records_left_out": len(found.records) - len(labelled),
        "patients": {"train": len(train_ids), "test": len(test_ids),
                     "val": len({r.patient_id for r in val})},
        "cases": {"train": len(train), "val": len(val), "test": len(test),
                  "test_before_max_test_cases": n_test_all},
        "test_patients": test_ids,
        "val_patients": sorted({r.patient_id for r in val}),
        "test_cases_per_patient": dict(sorted(Counter(r.patient_id for r in test).items())),
        "train_dir": str(train_dir),
        "val_dir": str(split_dir / "val"),
        "test_dir": str(split_dir / "test" / data_rel),
    }
    write_summary_json(description, split_dir / "split.json")
    return description


def mirror_validation(args, train_dir: Path, dest: Path) -> list:
    """Mirror the patients that the trainers hold out of ``train_dir`` (their validation split)."""
    found = scan(str(train_dir), args.dataset, mask_suffix=args.mask_suffix)
    val = split_records(found, "val", split_by="patient", val_fraction=args.val_fraction,
                        split_seed=args.split_seed)
    # The train mirror's links, at their paths relative to it (not the files they point to).
    mirror(val, found.root, _layout_files(found.root, found.root), dest)
    return val
