"""What ``sample.py`` writes for each case, and the merged tables at the end of a run.

Layout under ``--out_dir``::

    masks/<case_id>.nii.gz|png           the fused mask at the input's geometry
    uncertainty/<case_id>_variance.*     per-pixel variance of the members' probabilities
    uncertainty/<case_id>_entropy.*      binary entropy of their mean (nats)
    preseg/<case_id>.*                   the pre-segmentation (--save_preseg True)
    overlays/<case_id>.png               image, label, pre-segmentation, result, uncertainty
    cases/<case_id>.npz                  the case's record: written last, marks it finished;
                                         it carries the settings and checkpoint hashes that made it
    cases/settings.json                  the settings of the records in cases/ (run_settings)
    metrics.csv, summary.json            merged over every selected case (rank 0)

With several classes or regions (``--label_mode multiclass`` / ``regions``) the mask and the
pre-segmentation are one integer label map in the dataset's own label values
(``Preprocess.label_map``), and the uncertainty maps are per class or region::

    uncertainty/<case_id>_variance_<name>.*  variance of each channel's probabilities
    uncertainty/<case_id>_entropy.*          classes: entropy over background and classes
    uncertainty/<case_id>_entropy_<name>.*   regions: binary entropy of each region

(``name`` from ``Preprocess.class_names``: ``class2``, ``WT``), and metrics.csv holds per-class
columns beside the mean over classes (``evaluation.report``). The label maps are scored per
class or region as they are written (nnU-Net's and the BraTS evaluation's convention).

A rerun into the same folder reuses the records made with its own settings and refuses (one
line naming the differing settings) a folder that holds results of other settings, unless
``--overwrite True``. The merge streams: one volume's or patient's arrays at a time.

Slices of a 3D volume are written as whole volumes (``masks/<volume_id>.nii.gz``, ...) when
the run ends, from the case records, so that ranks of a torchrun job can share a volume.
16-bit PNG maps store variance / 0.25 and entropy / ln 2 (ln(K + 1) for the entropy over K
classes; all maxima) in 0..65535.
"""

import glob
import hashlib
import json
import os
import platform
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from data import restore_geometry
from data.formats import NIFTI_FORMATS, NIFTI_VOLUME_SLICE
from data.preprocess import SINGLE_CHANNEL_MODES, Preprocess
from data.writers import write_slice, write_volume
from evaluation.metrics import label_map_metrics, segmentation_metrics
from evaluation.report import (
    GroupAccumulator,
    SummaryAccumulator,
    class_column_names,
    class_summary,
    has_patient_groups,
    metrics_columns,
    metrics_row,
    results_text,
    write_metrics_csv,
    write_summary_json,
)
from evaluation.overlay import overlay_title, save_overlay
from evaluation.uncertainty import (
    MAX_ENTROPY,
    MAX_VARIANCE,
    channel_statistics,
    fuse_channels,
    fused_channels_mask,
    max_entropy,
)
from guided_diffusion.atomic import atomic_write, atomic_write_text, remove_stale_temp_files
from guided_diffusion.checkpoint import file_sha256
from guided_diffusion.errors import ConfigError


@dataclass(frozen=True)
class OutputOptions:
    """The choices of a sampling run that shape its outputs and records (sample.py's flags of
    the same names)."""

    out_dir: str
    fusion: str = "mean"
    seed: int = 0
    en_num: int = 0
    precision: str = "fp32"
    batch_size: int = 1
    save_preseg: bool = False
    save_overlays: bool = True
    overwrite: bool = False


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


# Every setting that changes what a case's files hold; a rerun into the same --out_dir must
# agree on all of them (paths may differ: a checkpoint is known by its SHA-256).
SETTINGS_NAME = "settings.json"


def checkpoint_hashes(bundle, plan, *, preseg_path: str = "", preseg_dir: str = "",
                      denoiser_path: str = "") -> dict:
    """The checkpoints this run reads, with their SHA-256; the --preseg_path / --denoiser_path
    defaults are left out when the sampler does not read them (they may not exist)."""
    hashes = {}
    if bundle is not None:
        hashes["model_path"] = {"path": bundle.source, "sha256": bundle.sha256, "weights": bundle.weights}
    used = {
        "preseg_path": (plan.needs_preseg and not preseg_dir, preseg_path),
        "denoiser_path": (plan.needs_denoiser, denoiser_path),
    }
    for flag, (is_used, path) in used.items():
        if is_used and path:
            hashes[flag] = {"path": path, "sha256": file_sha256(path)}
    if preseg_dir:
        hashes["preseg_dir"] = {"path": os.path.abspath(preseg_dir)}
    return hashes


def run_settings(options: OutputOptions, plan, *, num_members: int, preprocess, mask_space,
                 checkpoints: dict) -> dict:
    """What made a case's result, as a case record and ``cases/settings.json`` store it."""
    return {
        "sampler": plan.sampler,
        "timesteps": list(plan.timesteps),
        "step_method": plan.method,
        "eta": plan.eta,
        "final_step": plan.final_step,
        "num_ensemble": num_members,
        "fusion": options.fusion,
        "seed": options.seed,
        "en_num": options.en_num,
        "precision": options.precision,
        "mask_space": mask_space,
        "preprocess": preprocess.to_dict(),
        # Paths may move; the contents may not.
        "checkpoints": {flag: {k: v for k, v in entry.items() if k != "path" or flag == "preseg_dir"}
                        for flag, entry in checkpoints.items()},
    }


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _shown(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 24 else text[:12] + "..."


def settings_differences(old: dict, new: dict) -> list[str]:
    """``["num_ensemble 2, now 3", ...]``: the settings on which two runs differ."""
    old, new = _flatten(old), _flatten(new)
    missing = object()
    return [f"{key} {_shown(old.get(key, '-'))}, now {_shown(new.get(key, '-'))}"
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)]


def write_record(path: str, record: dict, **arrays) -> None:
    """A case record: ``record`` (plain values) as JSON beside the case's arrays, one .npz."""
    payload = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, record=payload, **arrays))


def read_record_header(path: str) -> dict | None:
    """The JSON part of a case record (no arrays decoded); None when it is missing or unreadable."""
    try:
        with np.load(path) as data:
            return json.loads(bytes(data["record"]).decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


# ------------------------------------------------------------------ classes and regions


def has_classes(preprocess) -> bool:
    """True for the label modes with one channel per class or region (multiclass, regions):
    their outputs are label maps and their tables per class; binary and subset runs write
    exactly what they wrote before classes existed."""
    return preprocess.label_mode not in SINGLE_CHANNEL_MODES


def class_values(preprocess) -> dict:
    """{name: label value(s)} of each channel, as the label maps are scored
    (``evaluation.metrics.label_map_metrics``): a class's value, a region's set of values."""
    if preprocess.label_mode == "multiclass":
        return dict(zip(preprocess.class_names, preprocess.classes))
    return {name: tuple(values) for name, values in preprocess.regions}


def overlay_classes(preprocess) -> tuple:
    """((value, name), ...): the colours an overlay gives the label map's values."""
    names = preprocess.class_names
    return tuple((value, names[k]) for k, value in preprocess.paint_order())


def label_map_of(preprocess, channels: np.ndarray) -> np.ndarray:
    """A case's written map from its hard channels: the one-channel mask [H, W] as it is
    (binary, subset), else ``Preprocess.label_map`` of the channels [K, H, W]."""
    return preprocess.label_map(channels) if has_classes(preprocess) else channels


def uncertainty_maps(preprocess, variance: np.ndarray, entropy: np.ndarray) -> list:
    """[(file-name suffix, map [H, W], the map's largest value)] of one case or slice.

    variance: [K, H, W] (binary, subset: [H, W]); entropy: [H, W] for classes (over the
    background and the classes), [K, H, W] per region."""
    if not has_classes(preprocess):
        return [("_variance", variance, MAX_VARIANCE), ("_entropy", entropy, MAX_ENTROPY)]
    names = preprocess.class_names
    maps = [(f"_variance_{name}", variance[k], MAX_VARIANCE) for k, name in enumerate(names)]
    if preprocess.exclusive:
        maps.append(("_entropy", entropy, max_entropy(len(names) + 1)))
    else:
        maps += [(f"_entropy_{name}", entropy[k], MAX_ENTROPY) for k, name in enumerate(names)]
    return maps


def score(preprocess, pred_map: np.ndarray, label_map: np.ndarray, spacing) -> dict:
    """A case's metrics: the foreground's (binary, subset), or per class or region with
    their mean (``label_map_metrics``)."""
    if not has_classes(preprocess):
        return segmentation_metrics(pred_map > 0, label_map > 0, spacing)
    return label_map_metrics(pred_map, label_map, class_values(preprocess), spacing)


class CaseWriter:
    """Turns the members of one case into its files, metrics and record.

    settings: ``run_settings`` of this run; a record is this run's (reused by a rerun, merged
    by ``finish_run``) only when it carries the same settings.
    overlay_channel: the image channel the overlays show (``overlay.overlay_channel``).
    """

    def __init__(self, options: OutputOptions, dataset, plan, preprocess, num_members, ctx, *,
                 settings: dict, checkpoints: dict, overlay_channel: int = 0):
        self.options = options
        self.dataset = dataset
        self.plan = plan
        self.preprocess = preprocess
        self.num_members = num_members
        self.ctx = ctx
        self.out_dir = options.out_dir
        self.case_ids = dataset.case_ids
        self.settings = settings
        self.digest = settings_digest(settings)
        self.checkpoints = checkpoints
        self.overlay_channel = overlay_channel

    def record_path(self, case_id: str) -> str:
        return os.path.join(self.out_dir, "cases", case_id + ".npz")

    def _settings_path(self) -> str:
        return os.path.join(self.out_dir, "cases", SETTINGS_NAME)

    def _earlier_settings(self):
        """The settings of what the out_dir holds: {} when it holds no records, None when its
        records do not say (an older version wrote them)."""
        path = self._settings_path()
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as handle:
                    return json.load(handle)
            except (OSError, ValueError):
                return None
        folder = os.path.dirname(path)
        records = sorted(glob.glob(os.path.join(glob.escape(folder), "*.npz")))
        if not records:
            return {}
        header = read_record_header(records[0])
        return None if header is None else header.get("settings")

    def check_out_dir(self) -> None:
        """Refuse (one line naming the differing settings) to add to results of other settings,
        unless --overwrite True. Reads only; every rank may call it."""
        earlier = self._earlier_settings()
        if earlier == {} or earlier == self.settings or self.options.overwrite:
            return
        if earlier is None:
            raise ConfigError(
                f"--out_dir {self.out_dir} holds case records that do not say which settings made "
                "them (an older version wrote them); pass --overwrite True to recompute them, or "
                "choose another --out_dir"
            )
        raise ConfigError(
            f"--out_dir {self.out_dir} holds results of other settings "
            f"({'; '.join(settings_differences(earlier, self.settings))}); pass --overwrite True "
            "to recompute them with these, or choose another --out_dir"
        )

    def start(self) -> None:
        """Rank 0, before any case is written: clear what killed writers left, record the settings."""
        if not self.ctx.is_main:
            return
        remove_stale_temp_files(self.out_dir)
        atomic_write_text(self._settings_path(), json.dumps(self.settings, indent=2, sort_keys=True) + "\n")

    def header_if_mine(self, path: str) -> dict | None:
        """The record's JSON when it exists and was made with this run's settings, else None."""
        if not os.path.exists(path):
            return None
        header = read_record_header(path)
        if header is None or header.get("settings_digest") != self.digest:
            return None
        return header

    def is_done(self, index: int) -> bool:
        return self.header_if_mine(self.record_path(self.case_ids[index])) is not None

    def _stem(self, folder: str, name: str) -> str:
        return os.path.join(self.out_dir, folder, name)

    def write_case(self, batch, i, members: torch.Tensor, preseg_probs, seconds: float) -> None:
        """members: [M, K, S, S] per-channel probabilities of the M members; preseg_probs:
        [K, S, S] or None (K = 1 for binary and subset)."""
        case_id, meta = batch["case_id"][i], batch["meta"][i]
        preprocess, fusion = self.preprocess, self.options.fusion
        exclusive, classes = preprocess.exclusive, has_classes(preprocess)
        stats = channel_statistics(members, exclusive)
        fused_probs, _ = fuse_channels(members, fusion, exclusive)
        # Resample the fused probabilities and decide on the input's grid, so that a resized
        # case gets smooth borders rather than blown-up network pixels (crop_pad: the same).
        fused_probs = restore_geometry(fused_probs.numpy().astype(np.float32), meta, order=1)
        channels = fused_channels_mask(fused_probs, fusion, exclusive).astype(np.uint8)
        variance = restore_geometry(stats["variance"].numpy().astype(np.float32), meta, order=1)
        entropy = restore_geometry(stats["entropy"].numpy().astype(np.float32), meta, order=1)
        preseg_channels = None
        if preseg_probs is not None:
            preseg_probs = restore_geometry(preseg_probs.numpy().astype(np.float32), meta, order=1)
            preseg_channels = fused_channels_mask(preseg_probs, "mean", exclusive).astype(np.uint8)
        label_channels = None
        if "original_label" in batch and batch["original_label"][i] is not None:
            label_channels = np.asarray(batch["original_label"][i], dtype=np.uint8)
        if not classes:
            # One channel: the maps and masks are [H, W], as they always were.
            channels, variance = channels[0], variance[0]
            preseg_channels = None if preseg_channels is None else preseg_channels[0]
        mask = label_map_of(preprocess, channels)
        preseg = None if preseg_channels is None else label_map_of(preprocess, preseg_channels)
        label = None if label_channels is None else label_map_of(preprocess, label_channels)

        if meta["format"] != NIFTI_VOLUME_SLICE:
            write_slice(self._stem("masks", case_id), mask, meta, label_map=classes)
            for suffix, values, maximum in uncertainty_maps(preprocess, variance, entropy):
                write_slice(self._stem("uncertainty", case_id + suffix), self._png_scaled(values, maximum, meta), meta)
            if preseg is not None and self.options.save_preseg:
                write_slice(self._stem("preseg", case_id), preseg, meta, label_map=classes)
        spacing = tuple(float(s) for s in meta["spacing"])
        metrics = preseg_metrics = None
        if label is not None:
            metrics = score(preprocess, mask, label, spacing)
            if preseg is not None:
                preseg_metrics = score(preprocess, preseg, label, spacing)
        if self.options.save_overlays:
            self._write_overlay(batch, i, label, preseg, mask, variance, entropy, metrics, preseg_metrics)
        record = {
            "case_id": case_id, "seconds": seconds, "metrics": metrics,
            "preseg_metrics": preseg_metrics, "meta": meta,
            "settings": self.settings, "settings_digest": self.digest,
            "device": str(self.ctx.device), "world_size": self.ctx.world_size,
            "batch_size": self.options.batch_size,
        }
        if classes:
            record["mask_channels"] = preprocess.num_mask_channels
        # The hard channels (packed bits, one per channel), which the merge paints into the same
        # label maps as the files above (label_map_of).
        arrays = {"mask": np.packbits(channels > 0), "variance": variance.astype(np.float16),
                  "entropy": entropy.astype(np.float16)}
        if preseg_channels is not None:
            arrays["preseg"] = np.packbits(preseg_channels > 0)
        if label_channels is not None:
            arrays["label"] = np.packbits(label_channels > 0)
        write_record(self.record_path(case_id), record, **arrays)

    def _write_overlay(self, batch, i, label, preseg, mask, variance, entropy, metrics, preseg_metrics) -> None:
        case_id, meta = batch["case_id"][i], batch["meta"][i]
        image = restore_geometry(batch["image"][i].numpy(), meta, order=1)
        classes = {}
        if has_classes(self.preprocess):
            # One panel each, on its own full scale: the spread over the channels, and the
            # entropy over background and classes (ln(K+1)) or the regions' mean binary one (ln 2).
            variance = variance.mean(axis=0)
            classes = {"classes": overlay_classes(self.preprocess)}
            if entropy.ndim == 2:
                outcomes = self.preprocess.num_mask_channels + 1
                classes["entropy_scale"] = (max_entropy(outcomes), f"ln {outcomes}")
            else:
                entropy = entropy.mean(axis=0)
        # One member has no spread: its variance panel would be black whatever the case.
        save_overlay(
            os.path.join(self.out_dir, "overlays", case_id + ".png"), image, label, preseg, mask,
            variance=variance if self.num_members > 1 else None, entropy=entropy, channel=self.overlay_channel,
            channel_name=self.dataset.channel_names[self.overlay_channel],
            title=overlay_title(case_id, self.plan.sampler, self.num_members, metrics, preseg_metrics),
            **classes,
        )

    @staticmethod
    def _png_scaled(values: np.ndarray, maximum: float, meta: dict) -> np.ndarray:
        # NIfTI keeps the map's own units; a 16-bit PNG needs [0, 1].
        return values if meta["format"] in NIFTI_FORMATS else values / maximum


MASK_ARRAYS = ("mask", "preseg", "label")
MAP_ARRAYS = ("variance", "entropy")


def load_record(path: str, arrays=MASK_ARRAYS + MAP_ARRAYS) -> dict:
    """A case record with the named arrays decoded (masks uint8 [H, W], or the hard channels
    [K, H, W] of a run with classes or regions; maps float32)."""
    with np.load(path) as data:
        record = json.loads(bytes(data["record"]).decode())
        shape = tuple(record["meta"]["original_shape"])
        if "mask_channels" in record:
            shape = (int(record["mask_channels"]), *shape)
        size = int(np.prod(shape))
        for name in arrays:
            if name not in data:
                continue
            if name in MASK_ARRAYS:
                record[name] = np.unpackbits(data[name])[:size].reshape(shape).astype(np.uint8)
            else:
                record[name] = data[name].astype(np.float32)
    return record


def _slice_thickness(meta: dict) -> float | None:
    """Distance between neighbouring slices of a volume (length of the affine's slice column)."""
    if meta.get("affine") is None or meta.get("slice_axis") is None:
        return None
    return float(np.linalg.norm(np.asarray(meta["affine"], dtype=float)[:3, int(meta["slice_axis"])]))


def _write_volume_outputs(out_dir: str, volume_id: str, records: list, save_preseg: bool, preprocess) -> None:
    """Stack a volume's slice records into masks/, uncertainty/ (and preseg/) volumes: the
    names and maps of ``uncertainty_maps``, label maps in the dataset's values."""
    meta = records[0]["meta"]
    outputs = {}  # (folder, name) -> {slice index: [H, W]}
    for r in records:
        index = int(r["meta"]["slice_index"])
        outputs.setdefault(("masks", volume_id), {})[index] = label_map_of(preprocess, r["mask"])
        for suffix, values, _ in uncertainty_maps(preprocess, r["variance"], r["entropy"]):
            outputs.setdefault(("uncertainty", volume_id + suffix), {})[index] = values
        if save_preseg and "preseg" in records[0]:
            outputs.setdefault(("preseg", volume_id), {})[index] = label_map_of(preprocess, r["preseg"])
    for (folder, name), slices in outputs.items():
        dtype = np.float32 if folder == "uncertainty" else next(iter(slices.values())).dtype
        write_volume(os.path.join(out_dir, folder, name + ".nii.gz"), slices, meta, dtype)


@dataclass
class RecordIndex:
    """Pass one of the merge: which records there are and how they group (no arrays read)."""

    kind: str | None  # "volume", "patient" or None (no groups)
    groups: dict  # group id -> [record paths]; one group "" when kind is None
    labelled: bool  # some record has metrics
    preseg: bool  # some record has pre-segmentation metrics
    n: int
    n_unlabelled: int = 0  # records of cases without a label (no metrics)


def index_records(paths, digest: str | None = None) -> RecordIndex:
    """Read the JSON part of each record: its group, and what the tables need to hold.

    Missing or unreadable records are left out, and with ``digest`` those of other settings.
    """
    entries, formats = [], set()
    labelled = preseg = False
    n_unlabelled = 0
    for path in paths:
        header = read_record_header(path) if os.path.exists(path) else None
        if header is None or (digest is not None and header.get("settings_digest") != digest):
            continue
        meta = header["meta"]
        formats.add(meta["format"])
        entries.append((path, meta.get("volume_id") or "", meta.get("patient_id") or ""))
        labelled = labelled or header["metrics"] is not None
        n_unlabelled += header["metrics"] is None
        preseg = preseg or header["preseg_metrics"] is not None
    if NIFTI_VOLUME_SLICE in formats:
        kind, key = "volume", 1
    elif has_patient_groups(e[2] for e in entries):
        kind, key = "patient", 2
    else:
        kind, key = None, None
    groups: dict[str, list] = {}
    for entry in entries:
        groups.setdefault(entry[key] if key else "", []).append(entry[0])
    return RecordIndex(kind, groups, labelled, preseg, len(entries), n_unlabelled)


def _group_rows(index: RecordIndex, group_id: str, out_dir: str, save_preseg: bool, seconds: dict, preprocess):
    """The case rows of one group, then its group row; its volume outputs written on the way.
    Only this group's arrays are in memory."""
    volume = index.kind == "volume"
    arrays = MASK_ARRAYS + MAP_ARRAYS if volume else MASK_ARRAYS if index.kind else ()
    classes = class_values(preprocess) if has_classes(preprocess) else None
    accumulator = GroupAccumulator(kind=index.kind, classes=classes) if index.kind and index.labelled else None
    records = []
    for path in index.groups[group_id]:
        record = load_record(path, arrays)
        seconds["sum"] += record["seconds"]
        seconds["n"] += 1
        if record["metrics"] is not None:
            yield metrics_row(record["case_id"], record["metrics"], group_id=group_id,
                              preseg_metrics=record["preseg_metrics"])
        if accumulator is not None and "label" in record:
            meta = record["meta"]
            preseg = record.get("preseg")
            accumulator.add(group_id, label_map_of(preprocess, record["mask"]),
                            label_map_of(preprocess, record["label"]), slice_index=meta.get("slice_index"),
                            spacing=meta["spacing"], slice_thickness=_slice_thickness(meta),
                            preseg=None if preseg is None else label_map_of(preprocess, preseg))
        if volume:
            records.append(record)
    if volume:
        _write_volume_outputs(out_dir, group_id, records, save_preseg, preprocess)
    if accumulator is not None and accumulator.group_ids:
        yield from accumulator.rows()


def merge_records(paths, out_dir: str, *, save_preseg: bool = False, digest: str | None = None,
                  preprocess: Preprocess | None = None) -> dict:
    """Merge case records into ``out_dir``'s metrics.csv (when labelled) and volume outputs, in
    two streaming passes: memory holds one group's arrays and the running sums, whatever the
    number of cases. ``digest``: merge only the records of these settings. ``preprocess``: the
    run's, whose classes or regions the records hold (None: one foreground).
    Returns ``summarize``'s dict plus n_cases_written, n_unlabelled (cases without a label,
    hence without metrics) and seconds_per_image.
    """
    preprocess = preprocess or Preprocess()
    index = index_records(paths, digest)
    summary, seconds, group_rows = SummaryAccumulator(), {"sum": 0.0, "n": 0}, []

    def rows():
        for group_id in index.groups:
            for row in _group_rows(index, group_id, out_dir, save_preseg, seconds, preprocess):
                if row["kind"] == "case":
                    summary.add(row)
                    yield row
                else:
                    group_rows.append(row)
        # Group rows (one per volume or patient) are few; they close the table.
        for row in group_rows:
            summary.add(row)
            yield row

    if index.labelled:
        names = preprocess.class_names if has_classes(preprocess) else ()
        write_metrics_csv(rows(), os.path.join(out_dir, "metrics.csv"),
                          columns=metrics_columns(preseg=index.preseg,
                                                  extra=class_column_names(names, preseg=index.preseg)))
    else:
        for _ in rows():
            pass
    result = summary.result()
    if has_classes(preprocess):
        result.update(class_summary(result, class_values(preprocess)))
    result["n_cases_written"] = index.n
    result["n_unlabelled"] = index.n_unlabelled
    result["seconds_per_image"] = seconds["sum"] / seconds["n"] if seconds["n"] else None
    return result


def finish_run(writer: CaseWriter, selected: list) -> dict:
    """Merge the records of every selected case made with this run's settings into
    metrics.csv and summary.json."""
    paths = [writer.record_path(writer.case_ids[i]) for i in selected]
    options, plan = writer.options, writer.plan
    addpm = plan.sampler == "addpm"
    summary = merge_records(paths, writer.out_dir, save_preseg=options.save_preseg, digest=writer.digest,
                            preprocess=writer.preprocess)
    summary.update({
        "n_cases_selected": len(selected),
        "sampler": plan.sampler,
        "timesteps": [plan.timesteps[0], plan.timesteps[-1]] if plan.timesteps else [],
        "reverse_steps": max(len(plan.timesteps) - 1, 0),
        "step_method": plan.method,
        "final_step": plan.final_step,
        "pre_t": plan.timesteps[0] if addpm else None,
        "T": plan.timesteps[-1] if addpm else None,
        "num_ensemble": writer.num_members,
        "fusion": options.fusion,
        "mask_space": writer.settings["mask_space"],
        "unet_evaluations_per_image": plan.unet_evaluations * writer.num_members,
        "unet_evaluations_per_member": plan.unet_evaluations,
        "device": str(writer.ctx.device),
        "world_size": writer.ctx.world_size,
        "precision": options.precision,
        "seed": options.seed,
        "en_num": options.en_num,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "checkpoints": writer.checkpoints,
        "settings_digest": writer.digest,
        "preprocess": writer.preprocess.to_dict(),
    })
    summary["results"] = results_text(summary)
    write_summary_json(summary, os.path.join(writer.out_dir, "summary.json"))
    return summary
