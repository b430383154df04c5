"""Deterministic BraTS-like demo data, written as BraTS 2D slice folders.

    python -m data.demo --out DIR --n_train 64 --n_test 16 --image_size 64 --seed 0

writes ``DIR/training/000001/demo_001_flair_000_w.nii.gz`` (and _t1, _t1ce, _t2, _seg) ...
and ``DIR/testing/...`` (with labels, so sample.py can evaluate), readable by the brats2d
loader. Each "patient" contributes ``--slices_per_patient`` neighbouring slices, so patient
splits have something to keep together; test patients are distinct from training patients.

What a slice holds: a brain-shaped region (an ellipse with random radial harmonics and a smooth
deformation) of white matter, a cortical ribbon and ventricles, with the contrasts of T1,
T1ce, T2 and FLAIR; a tumour of oedema (label 2) around a core of necrosis (1) and/or
enhancing tumour (4), each a blob with random radial harmonics, of varied size, position and
contrast (some barely visible), with soft edges; unlabelled small hyperintensities as
distractors; a smooth multiplicative bias field and Rician noise. About a fifth of the slices
have no tumour (a patient's tumour is a blob in 3D; slices outside it miss it).

Nested sub-regions for several classes (BraTS 2023 values and layout)::

    python -m data.demo --out DIR --classes 3

writes each patient as one BraTS 2023 volume, ``DIR/training/DEMO-00001-000/DEMO-00001-000-
{t1n,t1c,t2w,t2f,seg}.nii.gz`` (its ``--slices_per_patient`` slices stacked along the third
axis; read by the brats3d loader), whose tumour is three nested regions, each with its own
look in the sequences: oedema (label 2, bright on T2 and FLAIR) around a core (1, dark on T1,
T1ce and FLAIR) around an enhancing part (3, bright on T1ce), always clearly visible. Train and
score it with ``--regions "WT:1,2,3;TC:1,3;ET:3"`` (BraTS 2023's whole tumour, tumour core and
enhancing tumour) or ``--classes 1,2,3``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from data.errors import DataConfigError
from data.layouts import BRATS2023_MODALITIES
from guided_diffusion.errors import AddpmError

CHANNELS = ("t1", "t1ce", "t2", "flair")
# Mean intensity of each tissue in (t1, t1ce, t2, flair), roughly as the sequences show them.
TISSUE = {
    "wm": (0.85, 0.80, 0.35, 0.45),
    "gm": (0.60, 0.58, 0.55, 0.60),
    "csf": (0.20, 0.22, 1.00, 0.15),
    "oedema": (0.55, 0.55, 0.85, 0.90),
    "necrosis": (0.35, 0.30, 0.90, 0.65),
    "enhancing": (0.62, 1.00, 0.70, 0.75),
    "distractor": (0.70, 0.70, 0.80, 0.85),
    # The nested demo's tumour core: fluid-like, dark on T1, T1ce and (suppressed) FLAIR.
    "core": (0.25, 0.20, 1.00, 0.40),
}
DEMO_FORMAT = 1
# --classes 3: the nested labels, as BraTS 2023 numbers them, and the regions that fit them.
NESTED_LABELS = {"oedema": 2, "core": 1, "enhancing": 3}
NESTED_REGIONS = "WT:1,2,3;TC:1,3;ET:3"
NESTED_CONTRAST = (0.6, 1.0)


def _smooth_field(rng, size: int, coarse: int = 5) -> np.ndarray:
    """Smooth random field [S, S] with zero mean and unit-ish amplitude."""
    grid = torch.from_numpy(rng.standard_normal((1, 1, coarse, coarse)).astype(np.float32))
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)[0, 0].numpy()


def _harmonics(rng, n: int, amplitude: float):
    ks = np.arange(2, 2 + n)
    return ks, rng.uniform(0, amplitude, n) / ks ** 0.5, rng.uniform(0, 2 * np.pi, n)


def _radial(theta: np.ndarray, harmonics) -> np.ndarray:
    ks, amps, phases = harmonics
    return 1.0 + np.sum(amps[:, None, None] * np.cos(ks[:, None, None] * theta[None] + phases[:, None, None]), axis=0)


def _soft(inside_margin: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume weight from a signed margin (>0 inside), in pixels."""
    return 1.0 / (1.0 + np.exp(-np.clip(inside_margin / width, -30, 30)))


def _patient(seed: int, patient: int, slices: int) -> dict:
    rng = np.random.default_rng([seed, patient, 0])
    has_tumour = rng.random() < 0.92
    subtle = rng.random() < 0.3
    kind = rng.choice(["ring", "necrotic", "solid"], p=[0.5, 0.25, 0.25])
    return {
        "centre": rng.uniform(-0.03, 0.03, 2),
        "radii": (rng.uniform(0.36, 0.42), rng.uniform(0.29, 0.35)),
        "shape": _harmonics(rng, 3, 0.06),
        "warp": (rng.uniform(0.005, 0.02, 2), rng.uniform(0.5, 1.5, 2), rng.uniform(0, 2 * np.pi, 2)),
        "gain": rng.uniform(0.8, 1.2, 4),
        "has_tumour": has_tumour,
        "tumour_centre": rng.uniform(-0.45, 0.45, 2),
        "tumour_z": rng.uniform(-0.5, slices - 0.5),
        "tumour_zr": rng.uniform(1.2, 4.0),
        "tumour_r": rng.uniform(0.05, 0.15),
        "oedema_scale": rng.uniform(1.3, 2.0),
        "core_shape": _harmonics(rng, 4, 0.35),
        "oedema_shape": _harmonics(rng, 4, 0.45),
        "ring": rng.uniform(0.5, 0.75),
        "kind": str(kind),
        "contrast": rng.uniform(0.12, 0.35) if subtle else rng.uniform(0.45, 1.0),
        "noise": rng.uniform(0.02, 0.06),
    }


def generate_slice(seed: int, patient: int, z: int, size: int, slices_per_patient: int = 4, nested: bool = False):
    """One demo slice: (image float32 [4, S, S] in t1, t1ce, t2, flair order, seg uint8 [S, S]).

    nested: the tumour is oedema (2) around a core (1) around an enhancing part (3), each
    clearly visible (see the module docstring), instead of the BraTS 2021 mix of labels 1, 2, 4.
    """
    p = _patient(seed, patient, slices_per_patient)
    rng = np.random.default_rng([seed, patient, z + 1])
    yy, xx = np.meshgrid(np.linspace(-0.5, 0.5, size), np.linspace(-0.5, 0.5, size), indexing="ij")
    amp, freq, phase = p["warp"]
    u = yy - p["centre"][0] + amp[0] * np.sin(2 * np.pi * freq[0] * xx + phase[0])
    v = xx - p["centre"][1] + amp[1] * np.sin(2 * np.pi * freq[1] * yy + phase[1])
    # The head narrows away from the middle slice.
    shrink = 1.0 - 0.015 * abs(z - (slices_per_patient - 1) / 2)
    ry, rx = p["radii"][0] * shrink, p["radii"][1] * shrink
    theta = np.arctan2(u / ry, v / rx)
    r = np.sqrt((u / ry) ** 2 + (v / rx) ** 2) / _radial(theta, p["shape"])
    px = 1.0 / (size * min(ry, rx))  # one pixel in units of the normalised radius
    brain = r < 1.0
    cortex = _soft(r - 0.82, 2 * px)
    vent_r = np.minimum(
        np.hypot((u + 0.02) / 0.09, (v - 0.05) / 0.035), np.hypot((u + 0.02) / 0.09, (v + 0.05) / 0.035))
    csf = _soft(1.0 - vent_r, 0.15)

    def tissue(name):
        return np.asarray(TISSUE[name], dtype=np.float32)[:, None, None]

    image = tissue("wm") * (1 - cortex) + tissue("gm") * cortex
    image = image * (1 - csf) + tissue("csf") * csf
    image = image * (1 + 0.04 * _smooth_field(rng, size, 9)[None])  # tissue texture
    seg = np.zeros((size, size), dtype=np.uint8)

    for _ in range(rng.integers(0, 3)):
        cy, cx = rng.uniform(-0.25, 0.25, 2)
        blob = _soft(rng.uniform(0.01, 0.025) - np.hypot(yy - cy, xx - cx), 0.6 / size) * brain
        image = image + blob[None] * rng.uniform(0.2, 0.6) * (tissue("distractor") - image)

    zq = 1.0 - ((z - p["tumour_z"]) / p["tumour_zr"]) ** 2
    radius = p["tumour_r"] * np.sqrt(max(zq, 0.0))
    if p["has_tumour"] and radius * size > 1.5:
        ty = p["tumour_centre"][0] * ry * 2 * 0.7
        tx = p["tumour_centre"][1] * rx * 2 * 0.7
        tu, tv = yy - ty + 0.01 * rng.standard_normal(), xx - tx + 0.01 * rng.standard_normal()
        tt = np.arctan2(tu, tv)
        tr = np.hypot(tu, tv)
        core_edge = radius * _radial(tt, p["core_shape"])
        oedema_edge = radius * p["oedema_scale"] * _radial(tt, p["oedema_shape"])
        oedema_edge = np.maximum(oedema_edge, core_edge * 1.05)
        edge_width = 0.7 / size
        w_oedema = _soft(oedema_edge - tr, edge_width) * brain
        w_core = _soft(core_edge - tr, edge_width) * brain
        w_inner = _soft(core_edge * p["ring"] - tr, edge_width) * brain
        c = p["contrast"]
        if nested:
            # The same random stream as the default slice; its contrast (0.12..1, some barely
            # visible) is mapped onto NESTED_CONTRAST so that every sub-region can be learnt.
            c = NESTED_CONTRAST[0] + (NESTED_CONTRAST[1] - NESTED_CONTRAST[0]) * (c - 0.12) / (1.0 - 0.12)
            for name, weight, look in (("oedema", w_oedema, "oedema"), ("core", w_core, "core"),
                                       ("enhancing", w_inner, "enhancing")):
                image = image + c * weight[None] * (tissue(look) - image)
                seg[weight > 0.5] = NESTED_LABELS[name]
        else:
            if p["kind"] == "ring":
                core_look = tissue("enhancing") * (1 - w_inner) + tissue("necrosis") * w_inner
            elif p["kind"] == "necrotic":
                core_look = tissue("necrosis")
            else:
                core_look = tissue("enhancing")
            image = image + c * w_oedema[None] * (tissue("oedema") - image)
            image = image + c * w_core[None] * (core_look - image)
            seg[w_oedema > 0.5] = 2
            if p["kind"] == "ring":
                seg[w_core > 0.5] = 4
                seg[w_inner > 0.5] = 1
            else:
                seg[w_core > 0.5] = 1 if p["kind"] == "necrotic" else 4
        seg[~brain] = 0

    bias = np.exp(0.15 * _smooth_field(rng, size, 4))
    image = image * bias[None] * p["gain"][:, None, None].astype(np.float32)
    sigma = p["noise"]
    n1 = rng.standard_normal(image.shape).astype(np.float32) * sigma
    n2 = rng.standard_normal(image.shape).astype(np.float32) * sigma
    image = np.sqrt((image + n1) ** 2 + n2 ** 2)  # Rician magnitude noise
    image = np.where(brain[None], image, 0.0).astype(np.float32)
    return image, seg


def _write_slices(folder: str, part: str, first_patient: int, count: int, seed: int, image_size: int,
                  slices_per_patient: int) -> None:
    """BraTS 2D slice folders ``<part>/<i:06d>/demo_<pid>_<channel>_<z>_w.nii.gz``."""
    for i in range(count):
        pid = first_patient + i // slices_per_patient
        z = i % slices_per_patient
        image, seg = generate_slice(seed, pid, z, image_size, slices_per_patient)
        case = os.path.join(folder, part, f"{i + 1:06d}")
        os.makedirs(case)
        arrays = dict(zip(CHANNELS, image), seg=seg)
        for name, array in arrays.items():
            path = os.path.join(case, f"demo_{pid:03d}_{name}_{z:03d}_w.nii.gz")
            nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def _write_nested_volumes(folder: str, part: str, first_patient: int, count: int, seed: int, image_size: int,
                          slices_per_patient: int) -> None:
    """BraTS 2023 volumes ``<part>/DEMO-<pid>-000/DEMO-<pid>-000-<t1n|t1c|t2w|t2f|seg>.nii.gz``, one per
    patient: its slices (the same ones, in number and order, as the 2D demo has) stacked on axis 2."""
    for start in range(0, count, slices_per_patient):
        pid = first_patient + start // slices_per_patient
        slices = [generate_slice(seed, pid, z, image_size, slices_per_patient, nested=True)
                  for z in range(min(slices_per_patient, count - start))]
        image = np.stack([s[0] for s in slices], axis=-1)  # [4, S, S, Z]
        seg = np.stack([s[1] for s in slices], axis=-1)
        case_id = f"DEMO-{pid:05d}-000"
        case = os.path.join(folder, part, case_id)
        os.makedirs(case)
        for name, array in (*zip(BRATS2023_MODALITIES, image), ("seg", seg)):
            nib.save(nib.Nifti1Image(array, np.eye(4)), os.path.join(case, f"{case_id}-{name}.nii.gz"))


def write_demo_dataset(out: str, *, n_train: int = 64, n_test: int = 16, image_size: int = 64, seed: int = 0,
                       slices_per_patient: int = 4, classes: int | None = None) -> dict:
    """Write the demo set to ``out`` (created atomically); returns its description (demo.json).

    classes: None for the BraTS 2021-style slices (labels 1, 2, 4); 3 for the nested sub-regions
    in BraTS 2023 volumes (labels 1, 2, 3; see the module docstring). An ``out`` that already
    holds the same demo is left as it is.
    """
    for name, value, low in (("--n_train", n_train, 1), ("--n_test", n_test, 0), ("--image_size", image_size, 16),
                             ("--slices_per_patient", slices_per_patient, 1)):
        if int(value) < low:
            raise DataConfigError(f"{name} must be at least {low}, got {value}")
    if classes is not None and int(classes) != len(NESTED_LABELS):
        raise DataConfigError(f"--classes {classes}: the demo has {len(NESTED_LABELS)} nested classes "
                              f"(--classes {len(NESTED_LABELS)}), or leave --classes out for the default demo")
    description = {"format": DEMO_FORMAT, "n_train": int(n_train), "n_test": int(n_test),
                   "image_size": int(image_size), "seed": int(seed), "slices_per_patient": int(slices_per_patient)}
    if classes is not None:
        description.update(classes=int(classes), regions=NESTED_REGIONS)
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.isdir(out) and os.listdir(out):
        try:
            with open(os.path.join(out, "demo.json")) as fh:
                if json.load(fh) == description:
                    return description
        except (OSError, ValueError):
            pass
        raise DataConfigError(f"--out {out} exists and is not empty (nor the same demo); choose another folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataConfigError(f"--out {out} exists and is not a folder")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    try:
        write = _write_slices if classes is None else _write_nested_volumes
        patient = 1
        for part, count in (("training", n_train), ("testing", n_test)):
            write(tmp, part, patient, count, seed, image_size, slices_per_patient)
            patient += -(-count // slices_per_patient)
        with open(os.path.join(tmp, "demo.json"), "w") as fh:
            json.dump(description, fh, indent=1)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return description


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write deterministic BraTS-like demo slices (BraTS 2D layout).")
    parser.add_argument("--out", required=True, help="folder to create; gets training/ and testing/ slice folders")
    parser.add_argument("--n_train", type=int, default=64, help="number of training slices")
    parser.add_argument("--n_test", type=int, default=16, help="number of test slices (with labels)")
    parser.add_argument("--image_size", type=int, default=64, help="side of the square slices, in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed writes the same files")
    parser.add_argument("--slices_per_patient", type=int, default=4, help="neighbouring slices per demo patient")
    parser.add_argument("--classes", type=int, default=None,
                        help=f"{len(NESTED_LABELS)}: nested sub-regions in BraTS 2023 volumes (brats3d layout, one "
                        f"volume per patient), oedema 2 around a core 1 around an enhancing part 3; train and "
                        f"score with --regions \"{NESTED_REGIONS}\" or --classes 1,2,3 (default: the BraTS 2D "
                        f"slices with labels 1, 2, 4)")
    args = parser.parse_args(argv)
    d = write_demo_dataset(args.out, n_train=args.n_train, n_test=args.n_test, image_size=args.image_size,
                           seed=args.seed, slices_per_patient=args.slices_per_patient, classes=args.classes)
    what = "" if args.classes is None else (f" with {args.classes} nested classes (BraTS 2023 volumes; "
                                            f"--regions \"{NESTED_REGIONS}\")")
    print(f"demo data in {os.path.abspath(args.out)}: {d['n_train']} training and {d['n_test']} test slices "
          f"of {d['image_size']}x{d['image_size']}{what}")


def run(argv=None) -> int:
    """``main`` with the scripts' error convention: one ``error: ...`` line and exit status 2."""
    try:
        main(argv)
    except AddpmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
