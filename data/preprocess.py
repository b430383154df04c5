"""The one preprocessing transform: intensity normalisation, label mapping and geometry.

Every trainer and ``sample.py`` apply the same ``Preprocess``; checkpoints store it with
``to_dict()`` and ``sample.py`` rebuilds it with ``from_dict()``.

Intensity: per channel, clip to the ``clip_percentiles`` (0.5, 99.5) of the channel's non-zero
region and scale that range linearly to [0, 1]; zero voxels (the background of skull-stripped
MRI) stay exactly 0. Scaling to [0, 1] rather than to zero mean and unit variance keeps the
background at 0, so a padded border looks like background. Volume layouts take the percentiles
over the whole volume (consistent slices), slice and image layouts over the file they read.

Geometry: ``crop_pad`` centre-crops or zero-pads each axis to ``image_size`` (240 -> 256 pads
8 pixels on each side); ``resize`` resamples (bilinear image, nearest label). What was done is
recorded in ``meta["geometry"]`` and ``restore_geometry`` inverts it: crop_pad is inverted
pixel-exactly (padding removed, a cropped border filled with 0), resize by resampling back.
Training with ``augment`` draws the crop/pad offset at random, flips each axis with p=0.5 and
jitters each channel's intensity (scale 1 +- 0.1, shift +- 0.05 on its non-zero region).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from data.errors import DataConfigError, DataError
from data.io import check_finite

RESIZE_MODES = ("crop_pad", "resize")
LABEL_MODES = ("binary", "subset", "multiclass", "regions")
# Modes with one mask channel: the foreground of every model written before multi-class existed.
SINGLE_CHANNEL_MODES = ("binary", "subset")
# The flag that gives each label mode its label values.
LABEL_FLAGS = {"subset": "--foreground_labels", "multiclass": "--classes", "regions": "--regions"}
# Volumes hold millions of non-zero voxels; percentiles of a regular subsample of this many
# values differ from the exact ones by far less than the noise, and cost a fraction.
_MAX_PERCENTILE_SAMPLES = 1 << 20
_JITTER_SCALE = 0.1
_JITTER_SHIFT = 0.05


@dataclass(frozen=True)
class Preprocess:
    """The preprocessing a model was trained with; everything needed to rebuild its inputs.

    image_size: side S of the square network input.
    resize_mode: "crop_pad" or "resize".
    clip_percentiles: (low, high) percentiles of each channel's non-zero region.
    label_mode: "binary" (any non-zero label is foreground), "subset" (``foreground_labels``),
        "multiclass" (one channel per value of ``classes``, mutually exclusive) or "regions"
        (one channel per entry of ``regions``, overlapping; an extension, see ``map_label``).
    foreground_labels: label values counted as foreground in "subset" mode, e.g. (1, 4).
    classes: label values of the "multiclass" channels, e.g. (1, 2, 4); filled from the
        dataset's declared labels when empty.
    regions: ((name, (values, ...)), ...) of the "regions" channels, e.g. BraTS
        (("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,))).
    regions_class_order: the label value each region is painted with, in the regions' order
        (nnU-Net's ``regions_class_order``, taken from the dataset.json the regions come from);
        empty: derived from the regions (``paint_order``).
    channel_names: the image channels in order, as the data named them (filled by the dataset).
    dataset: the layout the model was trained on (filled by the dataset).
    """

    image_size: int = 256
    resize_mode: str = "crop_pad"
    clip_percentiles: tuple = (0.5, 99.5)
    label_mode: str = "binary"
    foreground_labels: tuple = ()
    channel_names: tuple = field(default=())
    dataset: str = ""
    classes: tuple = ()
    regions: tuple = ()
    regions_class_order: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "clip_percentiles", tuple(float(p) for p in self.clip_percentiles))
        object.__setattr__(self, "foreground_labels", tuple(int(v) for v in self.foreground_labels))
        object.__setattr__(self, "classes", tuple(int(v) for v in self.classes))
        object.__setattr__(self, "regions", parse_regions(self.regions))
        object.__setattr__(self, "regions_class_order", tuple(int(v) for v in self.regions_class_order))
        object.__setattr__(self, "channel_names", tuple(str(c) for c in self.channel_names))
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise DataConfigError(f"--image_size must be a positive integer, got {self.image_size!r}")
        object.__setattr__(self, "image_size", int(self.image_size))
        if self.resize_mode not in RESIZE_MODES:
            raise DataConfigError(f"unknown --resize_mode {self.resize_mode!r}; "
                                  f"choose one of {', '.join(RESIZE_MODES)}")
        if self.label_mode not in LABEL_MODES:
            raise DataConfigError(f"unknown --label_mode {self.label_mode!r}; choose one of {', '.join(LABEL_MODES)}")
        if self.label_mode == "subset" and not self.foreground_labels:
            raise DataConfigError("--label_mode subset needs --foreground_labels (e.g. --foreground_labels 1,4)")
        if self.label_mode == "binary" and self.foreground_labels:
            raise DataConfigError("--foreground_labels is only used with --label_mode subset")
        check_foreground_values(self.foreground_labels, "--foreground_labels")
        if self.classes and self.label_mode != "multiclass":
            raise DataConfigError("--classes is only used with --label_mode multiclass")
        if self.regions and self.label_mode != "regions":
            raise DataConfigError("--regions is only used with --label_mode regions")
        check_classes(self.classes)
        check_nested_or_disjoint(self.regions)
        if self.regions_class_order:
            problem = regions_class_order_problem(self.regions, self.regions_class_order)
            if problem:
                raise DataConfigError(problem)
        if len(self.clip_percentiles) != 2 or not 0.0 <= self.clip_percentiles[0] < self.clip_percentiles[1] <= 100.0:
            raise DataConfigError(f"clip_percentiles must be (low, high) with 0 <= low < high <= 100, "
                                  f"got {self.clip_percentiles}")

    def to_dict(self) -> dict:
        """Plain python types only (lists, not tuples), as a checkpoint config stores them.

        ``classes``, ``regions`` and ``regions_class_order`` appear only when set, so that every
        record made before they existed (and the settings digest of its sampling runs) stays
        the same."""
        record = {
            "image_size": self.image_size,
            "resize_mode": self.resize_mode,
            "clip_percentiles": list(self.clip_percentiles),
            "label_mode": self.label_mode,
            "foreground_labels": list(self.foreground_labels),
            "channel_names": list(self.channel_names),
            "dataset": self.dataset,
        }
        if self.classes:
            record["classes"] = list(self.classes)
        if self.regions:
            record["regions"] = [[name, list(values)] for name, values in self.regions]
        if self.regions_class_order:
            record["regions_class_order"] = list(self.regions_class_order)
        return record

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        """Inverse of ``to_dict``; missing keys take their defaults, unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataConfigError(f"preprocessing record has unknown keys {unknown}; known: {sorted(names)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

    def with_data(self, channel_names, dataset: str) -> "Preprocess":
        return dataclasses.replace(self, channel_names=tuple(channel_names), dataset=dataset)

    def check_same_as(self, recorded: dict, path: str, *, from_flags: bool = False) -> None:
        """Refuse a network (checkpoint ``path``, preprocessing ``recorded``) that was trained on
        other inputs: the three nets feed each other's masks, so they must see the same grid.

        from_flags: this preprocessing is the data flags' (the diffusion model is a raw state
        dict, which records none), so the message names the flags ``path`` was trained with
        where either side has classes or regions (one-channel runs keep the message they had)."""
        trained_with = Preprocess.from_dict(recorded)
        other, mine = trained_with.to_dict(), self.to_dict()
        one_channel = self.label_mode in SINGLE_CHANNEL_MODES and trained_with.label_mode in SINGLE_CHANNEL_MODES
        name_flags = from_flags and not one_channel
        for name in ("image_size", "resize_mode", "clip_percentiles", "label_mode", "foreground_labels",
                     "classes", "regions", "regions_class_order"):
            if other.get(name) == mine.get(name):
                continue
            # No flag sets the paint order: regions given by --regions paint in the derived one.
            if from_flags and name == "regions_class_order":
                continue
            trained = f"{path} was trained with {name}={other.get(name, [])}"
            flag = trained_with._flag_for(name) if name_flags else ""
            if flag:
                raise DataConfigError(
                    f"{trained}, but the data flags give {name}={mine.get(name, [])}; the diffusion model is "
                    f"a raw state dict, whose preprocessing comes from the data flags: pass {flag}"
                )
            raise DataConfigError(
                f"{trained}, but the diffusion model with {name}={mine.get(name, [])}; "
                "train all three networks with the same preprocessing"
            )
        theirs, ours = other["channel_names"], mine["channel_names"]
        if theirs and ours and len(theirs) != len(ours):
            raise DataConfigError(
                f"{path} was trained on {len(theirs)} image channels, the diffusion model on {len(ours)}"
            )

    def with_order_of(self, recorded: dict) -> "Preprocess":
        """This preprocessing with the ``regions_class_order`` of a network trained on the same
        regions (``recorded``, its preprocessing record), where this one has none: the data
        flags of a raw state dict cannot give the order that a dataset.json gave the networks."""
        theirs = Preprocess.from_dict(recorded)
        if self.regions_class_order or not theirs.regions_class_order or theirs.regions != self.regions:
            return self
        return dataclasses.replace(self, regions_class_order=theirs.regions_class_order)

    def _flag_for(self, name: str) -> str:
        """The data flag (with its value) that gives this preprocessing's ``name``; "" for the
        fields no flag sets."""
        if name in ("image_size", "resize_mode"):
            return f"--{name} {getattr(self, name)}"
        if name not in ("label_mode", "foreground_labels", "classes", "regions"):
            return ""
        flag, spec = LABEL_FLAGS.get(self.label_mode), self.describe_labels()
        if not flag or not spec:
            return f"--label_mode {self.label_mode}"
        # The shell would split a regions spec at its ';'.
        return f'{flag} "{spec}"' if self.label_mode == "regions" else f"{flag} {spec}"

    # ------------------------------------------------------------------ label channels
    @property
    def num_mask_channels(self) -> int:
        """K, the mask's channels: 1 (binary, subset), one per class or per region."""
        if self.label_mode == "multiclass":
            return len(self.classes)
        if self.label_mode == "regions":
            return len(self.regions)
        return 1

    @property
    def exclusive(self) -> bool:
        """True when at most one channel is on per pixel (classes), False for regions."""
        return self.label_mode != "regions"

    @property
    def network_classes(self) -> int:
        """Outputs of the supervised nets: K + 1 softmax logits (background first) for
        exclusive classes, K sigmoid logits for regions."""
        return self.num_mask_channels + 1 if self.exclusive else self.num_mask_channels

    @property
    def class_names(self) -> tuple:
        """One name per channel, as the tables name them: ("foreground",), the classes as
        "class<value>" (as python -m evaluation --classes names its columns), or the region names."""
        if self.label_mode == "multiclass":
            return tuple(class_name(v) for v in self.classes)
        if self.label_mode == "regions":
            return tuple(name for name, _ in self.regions)
        return ("foreground",)

    @property
    def covered_labels(self) -> tuple:
        """The label values some channel reads (every other non-zero value is an error in
        multiclass and regions mode, where a silently dropped value would be a wrong target)."""
        if self.label_mode == "multiclass":
            return covered_values(classes=self.classes)
        if self.label_mode == "regions":
            return covered_values(regions=self.regions)
        return ()

    def check_covered(self, values, path: str) -> None:
        """DataError naming ``path`` and the value when a mask holds a non-zero value that no
        class or region covers (multiclass and regions mode only)."""
        if self.label_mode in ("multiclass", "regions"):
            check_covered_by(values, path, classes=self.classes, regions=self.regions)

    def describe_labels(self) -> str:
        """The channels as the flags write them: ``1,2,4`` or ``WT:1,2,4;TC:1,4;ET:4``."""
        if self.label_mode == "regions":
            return format_regions(self.regions)
        if self.label_mode == "multiclass":
            return ",".join(str(v) for v in self.classes)
        return ",".join(str(v) for v in self.foreground_labels)

    def map_label(self, raw: np.ndarray) -> np.ndarray:
        """Raw label values [H, W] -> the training target, int64 {0, 1}: the foreground mask
        [H, W] in the one-channel modes, else one channel per class or region [K, H, W]."""
        if self.label_mode == "binary":
            return (raw != 0).astype(np.int64)
        if self.label_mode == "subset":
            return np.isin(raw, self.foreground_labels).astype(np.int64)
        if self.label_mode == "multiclass":
            return np.stack([raw == v for v in self.classes]).astype(np.int64)
        return np.stack([np.isin(raw, values) for _, values in self.regions]).astype(np.int64)

    def paint_order(self) -> list:
        """[(channel, value), ...]: painted in this order, the channels give the label map.

        Classes are disjoint: channel k is value ``classes[k]``. Regions with a
        ``regions_class_order`` are painted as nnU-Net paints them: region k, in their order,
        with ``regions_class_order[k]``. Without one, from the largest value set to the smallest
        (BraTS WT, TC, ET), each with the smallest of its values that no later region holds
        (WT:1,2,4 -> 2, TC:1,4 -> 1, ET:4 -> 4), which agrees with nnU-Net's order for BraTS."""
        if self.label_mode == "multiclass":
            return list(enumerate(self.classes))
        if self.label_mode != "regions":
            return [(0, 1)]
        if self.regions_class_order:
            return list(enumerate(self.regions_class_order))
        return derived_paint_order(self.regions)

    def label_map(self, channels: np.ndarray) -> np.ndarray:
        """Hard channels [K, H, W] (or [H, W] for K = 1), {0, 1} -> one integer map [H, W] in
        the dataset's own label values (0/1 in the one-channel modes, as masks were written
        before); uint8 when every value fits, else int32."""
        channels = np.asarray(channels)
        if channels.ndim == 2:
            channels = channels[None]
        if channels.shape[0] != self.num_mask_channels:
            raise ValueError(f"{channels.shape[0]} channels for a {self.num_mask_channels}-channel label mode")
        order = self.paint_order()
        dtype = np.uint8 if max(v for _, v in order) < 256 else np.int32
        out = np.zeros(channels.shape[1:], dtype=dtype)
        for k, value in order:
            out[channels[k] > 0] = value
        return out

    def apply(self, image: np.ndarray, label: np.ndarray | None, bounds, *, augment: bool = False,
              rng: np.random.Generator | None = None):
        """Normalise and fit one slice to the network input.

        image: [C, H, W] raw intensities; label: ``map_label``'s [H, W] or [K, H, W], or None;
        bounds: per-channel (low, high) intensities from ``channel_bounds``.
        Returns (image float32 [C, S, S] in [0, 1], label int64 [S, S] or [K, S, S] or None,
        geometry dict).
        """
        image = normalise(image, bounds)
        plan = geometry_plan(image.shape[-2:], self.image_size, self.resize_mode, rng=rng if augment else None)
        image = apply_geometry(image, plan, order=1)
        if label is not None:
            label = apply_geometry(label, plan, order=0)
        if augment:
            image = jitter_intensity(image, rng)
        return np.ascontiguousarray(image, dtype=np.float32), label, plan


def parse_foreground_labels(text) -> tuple:
    """``"1,4"`` -> (1, 4); ``""`` -> (). Accepts a sequence of ints as well."""
    if isinstance(text, (list, tuple)):
        values = list(text)
    else:
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        values = []
        for p in parts:
            try:
                values.append(int(p))
            except ValueError:
                raise DataConfigError(f"--foreground_labels must be comma-separated integers like 1,4; "
                                      f"got {text!r}") from None
    return tuple(sorted(set(int(v) for v in values)))


def class_name(value: int) -> str:
    """The name of the class of one label value in tables and file names: ``class4``."""
    return f"class{int(value)}"


def parse_classes(text, flag: str = "--classes") -> tuple:
    """``"1,2,4"`` -> (1, 2, 4) in the order given; ``""`` -> (). Accepts a sequence of ints."""
    if isinstance(text, (list, tuple)):
        return tuple(int(v) for v in text)
    values = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise DataConfigError(f"{flag} must be comma-separated integers like 1,2,4; got {text!r}") from None
    return tuple(values)


def parse_regions(spec) -> tuple:
    """``"WT:1,2,4;TC:1,4;ET:4"`` (or the pairs themselves, or the lists a record stores) ->
    (("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,))); ``""`` -> ().

    Each region is a name and the label values it unites; names are letters, digits, ``_``
    or ``-`` (they name table columns and files) and unique, values non-zero."""
    if isinstance(spec, str):
        pairs = []
        for entry in (e.strip() for e in spec.split(";")):
            if not entry:
                continue
            name, sep, values = entry.partition(":")
            if not sep:
                raise DataConfigError(f"--regions entry {entry!r} must be NAME:values, e.g. WT:1,2,4")
            pairs.append((name.strip(), parse_classes(values, f"--regions {name.strip()}")))
    else:
        pairs = [(name, values if isinstance(values, (list, tuple)) else (values,)) for name, values in spec]
    regions = []
    for name, values in pairs:
        name, values = str(name), tuple(sorted(set(int(v) for v in values)))
        if not name or not all(c.isalnum() or c in "_-" for c in name):
            raise DataConfigError(f"--regions name {name!r} must be letters, digits, _ or - (e.g. WT)")
        if not values:
            raise DataConfigError(f"--regions {name} lists no label values")
        check_foreground_values(values, f"--regions {name}")
        if name in (n for n, _ in regions):
            raise DataConfigError(f"--regions names {name} twice")
        regions.append((name, values))
    return tuple(regions)


def check_nested_or_disjoint(regions) -> None:
    """DataConfigError unless every two regions are nested or disjoint (BraTS WT, TC, ET are
    nested): only then do the regions paint one label map that gives each region back exactly
    (``Preprocess.paint_order``), which the outputs are written, and scored, as."""
    for i, (name_a, a) in enumerate(regions):
        for name_b, b in regions[i + 1:]:
            shared = set(a) & set(b)
            if shared and not (set(a) <= set(b) or set(b) <= set(a)):
                raise DataConfigError(
                    f"--regions {name_a} and {name_b} share the value {min(shared)} but neither holds the "
                    "other; regions must be nested (like WT:1,2,4;TC:1,4) or disjoint")


def derived_paint_order(regions) -> list:
    """[(channel, value), ...] of regions without a ``regions_class_order``: the largest value
    set first, each with the smallest of its values that no later region holds."""
    order = sorted(range(len(regions)), key=lambda k: -len(regions[k][1]))
    painted = []
    for i, k in enumerate(order):
        later = {v for j in order[i + 1:] for v in regions[j][1]}
        own = sorted(set(regions[k][1]) - later) or sorted(regions[k][1])
        painted.append((k, own[0]))
    return painted


def regions_class_order_problem(regions, order) -> str:
    """What is wrong with painting ``regions`` with ``order`` (nnU-Net's ``regions_class_order``:
    region k, in the regions' order, painted with ``order[k]``); "" when nothing is.

    Each region needs one value that it holds, and the painted map must give every region back
    exactly: the outputs are written, and scored, as that map."""
    if len(order) != len(regions):
        names = ", ".join(name for name, _ in regions)
        return f"regions_class_order needs one value per region ({names}), got {list(order)}"
    for (name, values), value in zip(regions, order):
        if value not in values:
            return (f"regions_class_order gives region {name} the value {value}, which it does not hold "
                    f"({','.join(str(v) for v in values)})")
    for value in sorted({v for _, values in regions for v in values}):
        # A pixel of ``value`` lies in these regions; the last of them painted sets its value.
        inside = [k for k, (_, values) in enumerate(regions) if value in values]
        painted = order[inside[-1]]
        lost = [name for name, values in regions if (value in values) != (painted in values)]
        if lost:
            return (f"regions_class_order {list(order)} paints label value {value} as {painted}, so the label "
                    f"map would not give region {lost[0]} back")
    return ""


def check_foreground_values(values, flag: str) -> None:
    """DataConfigError unless every value is a label value > 0 (0 is the background; a
    negative one is no label value at all)."""
    if 0 in values:
        raise DataConfigError(f"{flag} must not contain 0 (the background)")
    negative = [v for v in values if v < 0]
    if negative:
        raise DataConfigError(f"{flag} must hold label values > 0, got {negative[0]}")


def check_classes(classes, flag: str = "--classes") -> None:
    """DataConfigError unless ``classes`` are label values > 0, each listed once."""
    check_foreground_values(classes, flag)
    if len(set(classes)) != len(classes):
        raise DataConfigError(f"{flag} lists a value twice: {','.join(str(v) for v in classes)}")


def covered_values(*, classes=(), regions=()) -> tuple:
    """The label values that ``classes`` (or ``regions``, their union) read, sorted."""
    if regions:
        return tuple(sorted({v for _, region_values in regions for v in region_values}))
    return tuple(sorted(classes))


def check_covered_by(values, path, *, classes=(), regions=()) -> None:
    """DataError naming ``path`` and the first non-zero of ``values`` (a mask's label values)
    that none of ``classes`` (or ``regions``) covers: it would silently count as background."""
    if regions:
        flag, spec = LABEL_FLAGS["regions"], format_regions(regions)
    else:
        flag, spec = LABEL_FLAGS["multiclass"], ",".join(str(v) for v in classes)
    covered = set(covered_values(classes=classes, regions=regions))
    extra = sorted(set(int(v) for v in values) - covered - {0})
    if extra:
        raise DataError(f"mask {path} has label value {extra[0]}, which {flag} ({spec}) does not cover")


def format_regions(regions) -> str:
    """Inverse of ``parse_regions``: ``WT:1,2,4;TC:1,4;ET:4``."""
    return ";".join(f"{name}:{','.join(str(v) for v in values)}" for name, values in regions)


def channel_bounds(image: np.ndarray, percentiles=(0.5, 99.5)) -> list:
    """Per-channel (low, high) percentiles of the non-zero voxels of ``image`` [C, ...]
    (an array or a list of per-channel arrays). A channel without non-zero voxels gets (0.0, 0.0).
    """
    bounds = []
    for channel in image:
        values = channel[channel != 0]
        if values.size == 0:
            bounds.append((0.0, 0.0))
            continue
        if values.size > _MAX_PERCENTILE_SAMPLES:
            values = values[:: values.size // _MAX_PERCENTILE_SAMPLES + 1]
        lo, hi = np.percentile(values.astype(np.float64), percentiles)
        bounds.append((float(lo), float(hi)))
    return bounds


def normalise(image: np.ndarray, bounds) -> np.ndarray:
    """[C, H, W] raw -> float32 [C, H, W] in [0, 1]; zero voxels stay 0.

    Non-zero voxels map ``low -> 0`` and ``high -> 1`` (clipped). A channel whose non-zero
    region is constant (low == high) maps that region to 1.
    """
    out = np.zeros(image.shape, dtype=np.float32)
    for c, (lo, hi) in enumerate(bounds):
        x = image[c].astype(np.float32, copy=False)
        nonzero = x != 0
        if hi > lo:
            scaled = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
        else:
            scaled = np.ones_like(x)
        out[c] = np.where(nonzero, scaled, 0.0)
    return out


def geometry_plan(in_hw, size: int, mode: str, rng: np.random.Generator | None = None) -> dict:
    """What ``apply_geometry`` does to a slice of shape ``in_hw``; random offsets/flips with ``rng``.

    crop_pad: out[dst:dst+extent] = in[src:src+extent] per axis, zeros elsewhere.
    """
    h, w = int(in_hw[0]), int(in_hw[1])
    flip = [bool(rng.random() < 0.5), bool(rng.random() < 0.5)] if rng is not None else [False, False]
    plan = {"mode": mode, "input_shape": [h, w], "output_shape": [size, size], "flip": flip}
    if mode == "resize":
        return plan
    if mode != "crop_pad":
        raise DataConfigError(f"unknown --resize_mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    src, dst, extent = [], [], []
    for n in (h, w):
        slack = abs(n - size)
        offset = int(rng.integers(0, slack + 1)) if rng is not None else slack // 2
        if n >= size:
            src.append(offset), dst.append(0), extent.append(size)
        else:
            src.append(0), dst.append(offset), extent.append(n)
    plan.update(src_start=src, dst_start=dst, extent=extent)
    return plan


def apply_geometry(array: np.ndarray, plan: dict, order: int) -> np.ndarray:
    """[..., H, W] -> [..., S, S] following ``plan``; order 1 bilinear, 0 nearest (labels)."""
    h, w = plan["input_shape"]
    if tuple(array.shape[-2:]) != (h, w):
        raise ValueError(f"array of shape {array.shape} does not match the plan's input {h}x{w}")
    if plan["mode"] == "resize":
        out = _resize(array, tuple(plan["output_shape"]), order)
    else:
        out = np.zeros(array.shape[:-2] + tuple(plan["output_shape"]), dtype=array.dtype)
        (sy, sx), (dy, dx), (ny, nx) = plan["src_start"], plan["dst_start"], plan["extent"]
        out[..., dy:dy + ny, dx:dx + nx] = array[..., sy:sy + ny, sx:sx + nx]
    return _flip(out, plan["flip"])


def restore_geometry(array, meta: dict, order: int = 0) -> np.ndarray:
    """Map a network-sized array [..., S, S] back to the input's own grid [..., H, W].

    meta: an item's meta (or its ``meta["geometry"]``). order: 0 nearest (masks, labels),
    1 bilinear (probability or uncertainty maps); crop_pad ignores it and is pixel-exact
    (the padding is cut away, a border that was cropped off comes back as 0).
    """
    plan = meta.get("geometry", meta)
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    size = tuple(plan["output_shape"])
    if tuple(array.shape[-2:]) != size:
        raise ValueError(f"array of shape {array.shape} does not match the network size {size}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), got {order}")
    array = _flip(array, plan["flip"])
    h, w = plan["input_shape"]
    if plan["mode"] == "resize":
        return _resize(array, (h, w), order)
    out = np.zeros(array.shape[:-2] + (h, w), dtype=array.dtype)
    (sy, sx), (dy, dx), (ny, nx) = plan["src_start"], plan["dst_start"], plan["extent"]
    out[..., sy:sy + ny, sx:sx + nx] = array[..., dy:dy + ny, dx:dx + nx]
    return out


def jitter_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-channel random scale and shift of the non-zero region, kept in [0, 1]."""
    out = image.copy()
    for c in range(out.shape[0]):
        scale = 1.0 + rng.uniform(-_JITTER_SCALE, _JITTER_SCALE)
        shift = rng.uniform(-_JITTER_SHIFT, _JITTER_SHIFT)
        nonzero = out[c] != 0
        out[c] = np.where(nonzero, np.clip(out[c] * scale + shift, 0.0, 1.0), 0.0)
    return out


def _flip(array: np.ndarray, flip) -> np.ndarray:
    axes = [axis for axis, f in zip((-2, -1), flip) if f]
    return np.flip(array, axis=axes).copy() if axes else array


def _resize(array: np.ndarray, out_hw: tuple, order: int) -> np.ndarray:
    """Resample the last two axes; bilinear (half-pixel centres) or nearest-exact."""
    dtype = array.dtype
    lead = array.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(-1, 1, *array.shape[-2:])
    if order == 1:
        t = F.interpolate(t, size=out_hw, mode="bilinear", align_corners=False)
        out = t.reshape(*lead, *out_hw).numpy()
        return out if dtype.kind == "f" else out.astype(np.float32)
    t = F.interpolate(t, size=out_hw, mode="nearest-exact")
    return t.reshape(*lead, *out_hw).numpy().astype(dtype)


def check_label_values(values, declared, path: str) -> None:
    """DataError naming ``path`` when the mask holds values the dataset does not declare."""
    extra = sorted(set(int(v) for v in values) - set(declared))
    if extra:
        shown = ", ".join(str(v) for v in extra[:8]) + (", ..." if len(extra) > 8 else "")
        raise DataError(f"mask {path} has values {shown} that the dataset does not declare "
                        f"(declared: {', '.join(str(v) for v in sorted(declared))})")


def label_values(label: np.ndarray, path: str) -> np.ndarray:
    """Distinct values of a label array as int64; DataError for non-integer values."""
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            check_finite(label, path)
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            example = float(label[rounded != label][0])
            raise DataError(f"mask {path} has non-integer values (e.g. {example}); labels must be integers")
        label = rounded.astype(np.int64)
    if label.dtype.kind == "b":
        label = label.astype(np.int64)
    if label.size and label.min() >= 0 and label.max() < 65536:
        counts = np.bincount(label.ravel().astype(np.int64, copy=False))
        return np.flatnonzero(counts)
    return np.unique(label).astype(np.int64)


def as_int_label(label: np.ndarray) -> np.ndarray:
    if label.dtype.kind == "f":
        return np.rint(label).astype(np.int64)
    return label.astype(np.int64, copy=False)


# Mask values: the one reading of binary masks that every mask reader shares (the datasets,
# precomputed pre-segmentations, python -m evaluation).
BINARY_MASK_VALUES = ((0, 1), (0, 255))
# Lossy formats (JPEG) scatter values around 0 and 255: their masks are cut at mid-grey.
LOSSY_MASK_THRESHOLD = 128


def binary_mask_labels(mask: np.ndarray, values) -> np.ndarray | None:
    """``mask`` stored as 0/1 or as 0/255 (its distinct ``values`` tell) -> int64 {0, 1};
    None for any other values, which each reader handles in its own way."""
    present = set(np.asarray(values).tolist())
    if present <= set(BINARY_MASK_VALUES[0]):
        return as_int_label(mask)
    if present <= set(BINARY_MASK_VALUES[1]):
        return (as_int_label(mask) == BINARY_MASK_VALUES[1][1]).astype(np.int64)
    return None


def lossy_mask_foreground(mask: np.ndarray) -> np.ndarray:
    """uint8 {0, 1} foreground of a mask read from a lossy format: values >= mid-grey."""
    return (np.asarray(mask) >= LOSSY_MASK_THRESHOLD).astype(np.uint8)
