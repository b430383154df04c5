"""Data loading speed: samples per second for the 2D, 3D and image-folder layouts.

    python -m benchmarks.bench_data [--workers 0,2] [--batch_size 16] [--image_size 128]

Writes temporary data (demo BraTS 2D slices; synthetic BraTS 3D volumes) and reads a few
patients of the real LGG set (../shared/datasets/lgg_flair, copied to a temporary folder),
then runs one epoch of a DataLoader per layout and worker count (4 batches for the plain shuffle).
Times include worker start-up, so they are a lower bound for long runs. The "3D, plain shuffle"
row reads the same volumes with a plain random shuffle instead of the grouped one: every slice
then decodes a whole case.
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader

from data import Preprocess, collate, create_dataset, create_loader
from data.demo import write_demo_dataset

LGG_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lgg_flair"


def write_volumes(root: Path, cases: int, shape: tuple, seed: int = 0) -> None:
    """BraTS 2021-named cases: an ellipsoid 'brain' of int16 noise, a blob of label 2/4 in it."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    brain = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.7) ** 2 < 1
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for c in range(cases):
        name = f"BraTS2021_{c:05d}"
        folder = root / name
        folder.mkdir(parents=True)
        for mod in ("t1", "t1ce", "t2", "flair"):
            vol = (rng.integers(100, 1000, shape) * brain).astype(np.int16)
            nib.save(nib.Nifti1Image(vol, affine), str(folder / f"{name}_{mod}.nii.gz"))
        seg = np.zeros(shape, np.uint8)
        seg[((x - 0.2) ** 2 + y ** 2 + z ** 2 < 0.1) & brain] = 2
        seg[((x - 0.2) ** 2 + y ** 2 + z ** 2 < 0.03) & brain] = 4
        nib.save(nib.Nifti1Image(seg, affine), str(folder / f"{name}_seg.nii.gz"))


def epoch_rate(loader, max_samples: int | None = None) -> tuple:
    """(samples read, samples per second) over one epoch, or its first ``max_samples``."""
    start = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["image"].shape[0]
        if max_samples is not None and n >= max_samples:
            break
    return n, n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batch_size", type=int, default=16, help="batch size")
    parser.add_argument("--image_size", type=int, default=128, help="network input size")
    parser.add_argument("--lgg_patients", type=int, default=6, help="real LGG patients to read")
    args = parser.parse_args()
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]
    pre = Preprocess(image_size=args.image_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_demo_dataset(str(tmp / "demo"), n_train=192, n_test=0, image_size=args.image_size, seed=0)
        write_volumes(tmp / "volumes", cases=6, shape=(160, 160, 64))
        sets = [
            ("2D brats2d (demo)", create_dataset(tmp / "demo" / "training", preprocess=pre), True),
            ("3D brats3d (grouped)", create_dataset(tmp / "volumes", preprocess=pre, subset="all"), True),
            ("3D brats3d (plain shuffle)", create_dataset(tmp / "volumes", preprocess=pre, subset="all"), False),
        ]
        if LGG_DIR.is_dir():
            for folder in sorted(p for p in LGG_DIR.iterdir() if p.is_dir())[: args.lgg_patients]:
                shutil.copytree(folder, tmp / "lgg" / folder.name)
            sets.append(("images lgg (real)", create_dataset(tmp / "lgg", preprocess=pre), True))
        for name, ds, grouped in sets:
            for w in workers:
                if grouped:
                    loader = create_loader(ds, batch_size=args.batch_size, shuffle=True, num_workers=w)
                else:
                    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=w, collate_fn=collate)
                # The plain shuffle decodes a case per slice: a few batches show its rate.
                n, rate = epoch_rate(loader, None if grouped else 4 * args.batch_size)
                rows.append((name, w, n, rate))
                del loader
    print(f"data loading, one epoch, batch {args.batch_size}, image {args.image_size}, {os.cpu_count()} CPUs")
    print(f"{'layout':<28} {'workers':>7} {'samples':>8} {'samples/s':>10}")
    for name, w, n, rate in rows:
        print(f"{name:<28} {w:>7} {n:>8} {rate:>10.1f}")


if __name__ == "__main__":
    main()
