"""What ``sample.py`` writes for each case, and the merged tables at the end of a run.

Layout under ``--out_dir``::

    masks/<case_id>.nii.gz|png           the fused mask at the input's geometry
    uncertainty/<case_id>_variance.*     per-pixel variance of the members' probabilities
    uncertainty/<case_id>_entropy.*      binary entropy of their mean (nats)
    preseg/<case_id>.*                   the pre-segmentation (--save_preseg True)
    overlays/<case_id>.png               image, label, pre-segmentation, result, uncertainty
    cases/<case_id>.npz                  the case's record: written last, marks it finished
    metrics.csv, summary.json            merged over every selected case (rank 0)

Slices of a 3D volume are written as whole volumes (``masks/<volume_id>.nii.gz``, ...) when
the run ends, from the case records, so that ranks of a torchrun job can share a volume.
16-bit PNG maps store variance / 0.25 and entropy / ln 2 (both maxima) in 0..65535.
"""

import json
import os
import platform

import numpy as np
import torch

from data import restore_geometry
from data.writers import NIFTI_FORMATS, write_slice, write_volume
from evaluation.metrics import segmentation_metrics
from evaluation.report import (
    GroupAccumulator,
    metrics_row,
    save_overlay,
    summarize,
    write_metrics_csv,
    write_summary_json,
)
from evaluation.uncertainty import MAX_ENTROPY, ensemble_statistics, fuse
from guided_diffusion.atomic import atomic_write
from guided_diffusion.errors import ConfigError
from guided_diffusion.loading import file_sha256

MAX_VARIANCE = 0.25  # of a probability in [0, 1]


def select_cases(dataset, file_list: str) -> list:
    """Dataset indices chosen by ``--file_list``: comma-separated indices or case ids."""
    case_ids = dataset.case_ids
    if not file_list.strip():
        return list(range(len(case_ids)))
    index_of = {cid: i for i, cid in enumerate(case_ids)}
    chosen = []
    for entry in (e.strip() for e in file_list.split(",")):
        if not entry:
            continue
        if entry in index_of:
            chosen.append(index_of[entry])
        elif entry.isdigit() and int(entry) < len(case_ids):
            chosen.append(int(entry))
        else:
            raise ConfigError(
                f"--file_list entry {entry!r} is neither a case id nor an index below {len(case_ids)}"
            )
    return sorted(set(chosen))


def _atomic_npz(path: str, **arrays) -> None:
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays))


class CaseWriter:
    """Turns the members of one case into its files, metrics and record."""

    def __init__(self, args, dataset, plan, bundle, preprocess, num_members, ctx):
        self.args = args
        self.dataset = dataset
        self.plan = plan
        self.bundle = bundle
        self.preprocess = preprocess
        self.num_members = num_members
        self.ctx = ctx
        self.out_dir = args.out_dir
        self.case_ids = dataset.case_ids

    def record_path(self, case_id: str) -> str:
        return os.path.join(self.out_dir, "cases", case_id + ".npz")

    def is_done(self, index: int) -> bool:
        return os.path.exists(self.record_path(self.case_ids[index]))

    def _stem(self, folder: str, name: str) -> str:
        return os.path.join(self.out_dir, folder, name)

    def write_case(self, batch, i, members: torch.Tensor, preseg_prob, seconds: float) -> None:
        """members: [K, S, S] foreground probabilities; preseg_prob: [S, S] or None."""
        case_id, meta = batch["case_id"][i], batch["meta"][i]
        stats = ensemble_statistics(members)
        fused_prob, _ = fuse(members, self.args.fusion)
        # Resample the fused probability and threshold on the input's grid, so that a resized
        # case gets smooth borders rather than blown-up network pixels (crop_pad: the same).
        fused_prob = restore_geometry(fused_prob.numpy().astype(np.float32), meta, order=1)
        # fuse's rules: mean >= 0.5, or a strict majority of the votes.
        mask = (fused_prob > 0.5 if self.args.fusion == "vote" else fused_prob >= 0.5).astype(np.uint8)
        variance = restore_geometry(stats["variance"].numpy().astype(np.float32), meta, order=1)
        entropy = restore_geometry(stats["entropy"].numpy().astype(np.float32), meta, order=1)
        preseg = None
        if preseg_prob is not None:
            preseg_prob = restore_geometry(preseg_prob.numpy().astype(np.float32), meta, order=1)
            preseg = (preseg_prob >= 0.5).astype(np.uint8)
        label = None
        if "original_label" in batch:
            label = batch["original_label"][i]
            label = None if label is None else np.asarray(label, dtype=np.uint8)

        if meta["format"] != "nifti_volume_slice":
            write_slice(self._stem("masks", case_id), mask, meta)
            write_slice(self._stem("uncertainty", case_id + "_variance"), self._png_scaled(variance, MAX_VARIANCE, meta), meta)
            write_slice(self._stem("uncertainty", case_id + "_entropy"), self._png_scaled(entropy, MAX_ENTROPY, meta), meta)
            if preseg is not None and self.args.save_preseg:
                write_slice(self._stem("preseg", case_id), preseg, meta)
        if self.args.save_overlays:
            image = restore_geometry(batch["image"][i].numpy(), meta, order=1)
            save_overlay(
                os.path.join(self.out_dir, "overlays", case_id + ".png"), image, label, preseg,
                mask, variance, title=f"{case_id}  {self.plan.sampler}  K={self.num_members}",
            )

        spacing = tuple(float(s) for s in meta["spacing"])
        metrics = preseg_metrics = None
        if label is not None:
            metrics = segmentation_metrics(mask > 0, label > 0, spacing)
            if preseg is not None:
                preseg_metrics = segmentation_metrics(preseg > 0, label > 0, spacing)
        record = {
            "case_id": case_id, "seconds": seconds, "metrics": metrics,
            "preseg_metrics": preseg_metrics, "meta": meta,
        }
        arrays = {"mask": np.packbits(mask > 0), "variance": variance.astype(np.float16),
                  "entropy": entropy.astype(np.float16)}
        if preseg is not None:
            arrays["preseg"] = np.packbits(preseg > 0)
        if label is not None:
            arrays["label"] = np.packbits(label > 0)
        _atomic_npz(self.record_path(case_id), record=np.frombuffer(json.dumps(record).encode(), dtype=np.uint8), **arrays)

    @staticmethod
    def _png_scaled(values: np.ndarray, maximum: float, meta: dict) -> np.ndarray:
        # NIfTI keeps the map's own units; a 16-bit PNG needs [0, 1].
        return values if meta["format"] in NIFTI_FORMATS else values / maximum


def load_record(path: str) -> dict:
    with np.load(path) as data:
        record = json.loads(bytes(data["record"]).decode())
        shape = tuple(record["meta"]["original_shape"])
        size = int(np.prod(shape))
        for name in ("mask", "preseg", "label"):
            if name in data:
                record[name] = np.unpackbits(data[name])[:size].reshape(shape).astype(np.uint8)
        for name in ("variance", "entropy"):
            record[name] = data[name].astype(np.float32)
    return record


def _group_kind(records: list) -> str | None:
    """Volumes for slices of 3D volumes; patients where several 2D cases share a patient."""
    if any(r["meta"]["format"] == "nifti_volume_slice" for r in records):
        return "volume"
    patients = [r["meta"].get("patient_id") for r in records]
    if any(p for p in patients) and len(set(patients)) < len(patients):
        return "patient"
    return None


def _group_id(record: dict, kind: str | None) -> str:
    meta = record["meta"]
    if kind == "volume":
        return meta["volume_id"] or ""
    return meta.get("patient_id") or ""


def _slice_thickness(meta: dict) -> float | None:
    """Distance between neighbouring slices of a volume (length of the affine's slice column)."""
    if meta.get("affine") is None or meta.get("slice_axis") is None:
        return None
    return float(np.linalg.norm(np.asarray(meta["affine"], dtype=float)[:3, int(meta["slice_axis"])]))


def _write_volumes(writer: CaseWriter, records: list) -> None:
    by_volume: dict[str, list] = {}
    for r in records:
        if r["meta"]["format"] == "nifti_volume_slice":
            by_volume.setdefault(r["meta"]["volume_id"], []).append(r)
    for volume_id, members in by_volume.items():
        meta = members[0]["meta"]
        index = {int(r["meta"]["slice_index"]): r for r in members}
        outputs = [("masks", volume_id, "mask", np.uint8), ("uncertainty", volume_id + "_variance", "variance", np.float32),
                   ("uncertainty", volume_id + "_entropy", "entropy", np.float32)]
        if writer.args.save_preseg and "preseg" in members[0]:
            outputs.append(("preseg", volume_id, "preseg", np.uint8))
        for folder, name, key, dtype in outputs:
            slices = {k: r[key] for k, r in index.items()}
            write_volume(os.path.join(writer.out_dir, folder, name + ".nii.gz"), slices, meta, dtype)


def finish_run(writer: CaseWriter, selected: list) -> dict:
    """Merge the records of every selected case into metrics.csv and summary.json."""
    records = []
    for index in selected:
        path = writer.record_path(writer.case_ids[index])
        if os.path.exists(path):
            records.append(load_record(path))
    _write_volumes(writer, records)

    kind = _group_kind(records)
    rows = [
        metrics_row(r["case_id"], r["metrics"], group_id=_group_id(r, kind), preseg_metrics=r["preseg_metrics"])
        for r in records
        if r["metrics"] is not None
    ]
    if kind is not None and rows:
        groups = GroupAccumulator(kind=kind)
        for r in records:
            if "label" in r:
                groups.add(
                    _group_id(r, kind), r["mask"], r["label"], slice_index=r["meta"].get("slice_index"),
                    spacing=r["meta"]["spacing"], slice_thickness=_slice_thickness(r["meta"]),
                    preseg=r.get("preseg"),
                )
        rows.extend(groups.rows())
    if rows:
        write_metrics_csv(rows, os.path.join(writer.out_dir, "metrics.csv"))

    args, plan, bundle = writer.args, writer.plan, writer.bundle
    summary = summarize(rows)
    seconds = [r["seconds"] for r in records]
    summary.update({
        "n_cases_selected": len(selected),
        "n_cases_written": len(records),
        "sampler": plan.sampler,
        "timesteps": [plan.timesteps[0], plan.timesteps[-1]] if plan.timesteps else [],
        "reverse_steps": max(len(plan.timesteps) - 1, 0),
        "step_method": plan.method,
        "final_step": plan.final_step,
        "pre_t": args.pre_t if plan.sampler == "addpm" else None,
        "T": plan.timesteps[-1] if plan.sampler == "addpm" else None,
        "num_ensemble": writer.num_members,
        "fusion": args.fusion,
        "unet_evaluations_per_image": plan.unet_evaluations * writer.num_members,
        "unet_evaluations_per_member": plan.unet_evaluations,
        "seconds_per_image": float(np.mean(seconds)) if seconds else None,
        "device": str(writer.ctx.device),
        "world_size": writer.ctx.world_size,
        "precision": args.precision,
        "seed": args.seed,
        "en_num": args.en_num,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "checkpoints": _checkpoint_hashes(args, bundle, plan),
        "preprocess": writer.preprocess.to_dict(),
    })
    write_summary_json(summary, os.path.join(writer.out_dir, "summary.json"))
    return summary


def _checkpoint_hashes(args, bundle, plan) -> dict:
    """The checkpoints this run read; the --preseg_path / --denoiser_path defaults may not exist."""
    hashes = {"model_path": {"path": bundle.source, "sha256": bundle.sha256, "weights": bundle.weights}}
    used = {
        "preseg_path": plan.sampler in ("addpm", "preseg") and not args.preseg_dir,
        "denoiser_path": plan.sampler == "addpm" and plan.final_step == "denoiser",
    }
    for flag, is_used in used.items():
        path = getattr(args, flag)
        if is_used and path:
            hashes[flag] = {"path": path, "sha256": file_sha256(path)}
    if args.preseg_dir:
        hashes["preseg_dir"] = {"path": args.preseg_dir}
    return hashes
