"""Overlay pictures of one case: image, label, pre-segmentation, result and uncertainty.

One PNG per case, panels side by side at an integer scale (nearest-neighbour, so thin
structures stay visible)::

    title: case id, sampler, ensemble size, the case's Dice (and the pre-segmentation's)
    <channel> | label | pre-seg | result | variance | entropy
    legend (label, pre-seg, result)          colour bar 0..0.25   colour bar 0..ln 2

Masks are tinted and outlined over the chosen image channel, the label's outline (green) also
on the pre-segmentation and result panels. The uncertainty maps are drawn on fixed scales,
0 to their largest possible value (variance of a probability: 0.25; binary entropy: ln 2), so
that pictures of different cases compare and a nearly certain case stays dark.

Several classes (``classes=((value, name), ...)``): label, pre-segmentation and result are
integer label maps in the dataset's values; each class is tinted and outlined in its own colour
(``CLASS_PALETTE``, in the order given, one legend entry per class name), and the label's
foreground outline is drawn in white on the pre-segmentation and result panels.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from evaluation.arrays import to_bool_mask, to_numpy
from evaluation.errors import EvaluationError
from evaluation.uncertainty import MAX_ENTROPY, MAX_VARIANCE
from guided_diffusion.atomic import atomic_write
from guided_diffusion.errors import ConfigError

OVERLAY_GAP = 4
OVERLAY_LINE_HEIGHT = 14
OVERLAY_MIN_SIZE = 128
# Below the panels: the legend's swatches and the colour bars, with their tick labels.
OVERLAY_FOOTER_HEIGHT = 26
LEGEND_SWATCH = 10
COLOURBAR_HEIGHT = 8
_FOOTER_TOP = 3
LABEL_RGB = (0, 220, 0)
PRESEG_RGB = (255, 200, 0)
RESULT_RGB = (255, 40, 40)
MASK_COLOURS = {"label": LABEL_RGB, "pre-seg": PRESEG_RGB, "result": RESULT_RGB}
# One colour per class, in the order the classes are given (repeated past the eighth): hues
# far apart from one another and from grey (Trubetskoy's "distinct colours").
CLASS_PALETTE = ((60, 180, 75), (230, 25, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                 (70, 240, 240), (240, 50, 230))
LABEL_EDGE_RGB = (255, 255, 255)
LABEL_EDGE_NAME = "label edge"
# The fixed scale of each uncertainty map: its largest possible value and how the bar names it.
UNCERTAINTY_SCALES = {"variance": (MAX_VARIANCE, "0.25"), "entropy": (MAX_ENTROPY, "ln 2")}
# The channel shown by default wherever the data names one so (BraTS, nnU-Net channel_names).
DEFAULT_CHANNEL_NAME = "flair"
_TINT = 0.35
_TEXT = (255, 255, 255)
# Anchors of a perceptually ordered dark-to-bright heat map (black, purple, red, orange,
# yellow, white), interpolated linearly.
_HEAT_ANCHORS = np.array(
    [[0, 0, 0], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191], [255, 255, 255]],
    dtype=np.float64,
)


def heat_colormap(values) -> np.ndarray:
    """Map values in [0, 1] (clipped; nan -> 0) to RGB uint8 [..., 3] with a dark-to-bright
    heat map."""
    v = np.nan_to_num(np.clip(to_numpy(values).astype(np.float64), 0.0, 1.0))
    xs = np.linspace(0.0, 1.0, len(_HEAT_ANCHORS))
    rgb = np.stack([np.interp(v, xs, _HEAT_ANCHORS[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def overlay_channel(spec: str, channel_names) -> int:
    """The index of the image channel an overlay shows, from ``--overlay_channel``.

    spec: a channel name (case-insensitive, e.g. ``flair``), an index, or "" for the default:
    the first channel whose name contains "flair", else 0. ConfigError for an unknown name or
    an index out of range, naming the channels there are.
    """
    names = [str(n) for n in channel_names]
    shown = ", ".join(f"{i} {n}" for i, n in enumerate(names))
    spec = str(spec).strip()
    if not spec:
        return next((i for i, n in enumerate(names) if DEFAULT_CHANNEL_NAME in n.lower()), 0)
    if spec.lstrip("-").isdigit():
        index = int(spec)
        if not 0 <= index < len(names):
            raise ConfigError(f"--overlay_channel {spec}: the images have {len(names)} channel(s) ({shown})")
        return index
    matches = [i for i, n in enumerate(names) if n.lower() == spec.lower()]
    if not matches:
        raise ConfigError(f"--overlay_channel {spec!r} is not a channel of the images ({shown})")
    return matches[0]


def overlay_title(case_id: str, sampler: str, num_members: int, metrics: dict | None = None,
                  preseg_metrics: dict | None = None) -> str:
    """``case  addpm K=3  Dice 0.912 (pre-seg 0.905)``; "no label" for an unlabelled case, and
    the both-empty case (Dice 1 by convention, left out of the means) said as such."""
    title = f"{case_id}  {sampler}  K={num_members}"
    if metrics is None:
        return f"{title}  no label"
    if metrics.get("pred_voxels") == 0 and metrics.get("label_voxels") == 0:
        return f"{title}  label and result empty"
    title += f"  Dice {metrics['dice']:.3f}"
    if preseg_metrics is not None:
        title += f" (pre-seg {preseg_metrics['dice']:.3f})"
    return title


def _gray(channel: np.ndarray) -> np.ndarray:
    channel = np.nan_to_num(channel.astype(np.float64))
    lo, hi = np.percentile(channel, (1.0, 99.0))
    if hi <= lo:
        return np.zeros(channel.shape + (3,), dtype=np.float64)
    g = np.clip((channel - lo) / (hi - lo), 0.0, 1.0) * 255.0
    return np.repeat(g[..., None], 3, axis=-1)


def _tint(rgb: np.ndarray, mask: np.ndarray, color, fill: bool = True) -> np.ndarray:
    out = rgb.copy()
    color = np.asarray(color, dtype=np.float64)
    if fill:
        out[mask] = (1 - _TINT) * out[mask] + _TINT * color
    out[mask ^ ndimage.binary_erosion(mask, border_value=0)] = color
    return out


def _upscale(arr: np.ndarray, scale: int) -> np.ndarray:
    return arr if scale == 1 else np.repeat(np.repeat(arr, scale, axis=0), scale, axis=1)


def _class_colours(classes) -> dict:
    """{value: (name, RGB)} from ``((value, name), ...)``, checked."""
    colours = {}
    for i, entry in enumerate(classes):
        try:
            value, name = entry
            value = int(value)
        except (TypeError, ValueError):
            raise EvaluationError(f"overlay classes must be (value, name) pairs, got {entry!r}") from None
        if value == 0 or value in colours:
            raise EvaluationError(f"overlay class value {value} is the background or given twice")
        colours[value] = (str(name), CLASS_PALETTE[i % len(CLASS_PALETTE)])
    if not colours:
        raise EvaluationError("overlay classes is empty; pass None for a single foreground")
    return colours


def _checked_label_maps(shape, label, preseg, result, colours: dict) -> dict:
    maps = {}
    for name, values in (("label", label), ("pre-seg", preseg), ("result", result)):
        if values is None:
            continue
        values = to_numpy(values)
        if values.shape != shape:
            raise EvaluationError(f"overlay {name} shape {values.shape} does not match image {shape}")
        if values.dtype.kind not in "biu" and not np.array_equal(values, np.round(values)):
            raise EvaluationError(f"overlay {name} is not an integer label map")
        values = values.astype(np.int64)
        unknown = sorted(set(np.unique(values).tolist()) - set(colours) - {0})
        if unknown:
            raise EvaluationError(f"overlay {name} has label value {unknown[0]}, which no class covers "
                                  f"(classes: {', '.join(str(v) for v in colours)})")
        maps[name] = values
    if "result" not in maps:
        raise EvaluationError("overlay needs a result map")
    return maps


def _class_panels(gray, maps: dict, colours: dict, scale: int) -> list:
    """[(name, RGB float panel)] of the label-map panels: every class tinted and outlined in its colour."""
    maps = {k: _upscale(m, scale) for k, m in maps.items()}
    panels = []
    for name in ("label", "pre-seg", "result"):
        if name not in maps:
            continue
        panel = gray
        for value, (_, rgb) in colours.items():
            panel = _tint(panel, maps[name] == value, rgb)
        if name != "label" and "label" in maps:
            panel = _tint(panel, maps["label"] != 0, LABEL_EDGE_RGB, fill=False)
        panels.append((name, panel))
    return panels


def _checked_masks(shape, label, preseg, result) -> dict:
    masks = {}
    for name, mask in (("label", label), ("pre-seg", preseg), ("result", result)):
        if mask is not None:
            mask = to_bool_mask(mask)
            if mask.shape != shape:
                raise EvaluationError(f"overlay {name} shape {mask.shape} does not match image {shape}")
            masks[name] = mask
    if "result" not in masks:
        raise EvaluationError("overlay needs a result mask")
    return masks


def _panels(gray, masks: dict, maps: dict, scale: int, channel_name: str, colours: dict | None,
            scales: dict) -> list:
    """[(name, RGB float panel)] in display order; ``scales``: {map name: (largest value, text)}."""
    panels = [(channel_name, gray)]
    if colours is not None:
        panels += _class_panels(gray, masks, colours, scale)
        masks = {}
    masks = {k: _upscale(m, scale) for k, m in masks.items()}
    if "label" in masks:
        panels.append(("label", _tint(gray, masks["label"], LABEL_RGB)))
    for name in ("pre-seg", "result"):
        if name in masks:
            panel = _tint(gray, masks[name], MASK_COLOURS[name])
            if "label" in masks:
                panel = _tint(panel, masks["label"], LABEL_RGB, fill=False)
            panels.append((name, panel))
    for name, values in maps.items():
        top = scales[name][0]
        panels.append((name, _upscale(heat_colormap(values / top), scale).astype(np.float64)))
    return panels


def _draw_legend(draw: ImageDraw.ImageDraw, x: int, y: int, entries) -> None:
    """entries: (name, RGB) pairs, drawn as swatches left to right."""
    for name, rgb in entries:
        draw.rectangle([x, y, x + LEGEND_SWATCH - 1, y + LEGEND_SWATCH - 1], fill=rgb)
        draw.text((x + LEGEND_SWATCH + 3, y - 1), name, fill=_TEXT)
        x += LEGEND_SWATCH + 3 + int(draw.textlength(name)) + 10


def _colourbar_ticks(draw: ImageDraw.ImageDraw, x: int, y: int, width: int, top_text: str) -> None:
    """The tick labels under a colour bar: 0 at its left end, the scale's top at its right."""
    draw.text((x, y), "0", fill=_TEXT)
    draw.text((x + width - int(draw.textlength(top_text)), y), top_text, fill=_TEXT)


def save_overlay(path, image_channels, label, preseg, result, *, variance=None, entropy=None,
                 title: str = "", channel: int = 0, channel_name: str = "image",
                 scale: int | None = None, classes=None, entropy_scale=None) -> tuple[int, int]:
    """Write the overlay PNG of one case (see the module docstring).

    Args:
        path: output .png path (folders are created).
        image_channels: [C, H, W] (or [H, W]) float image.
        label, preseg, result: masks [H, W] or None (result is required); a panel and a legend
            entry for each one given. With ``classes``: integer label maps [H, W] in the
            dataset's values (0 background); EvaluationError for a value no class covers.
        variance, entropy: [H, W] uncertainty maps or None, drawn on 0..0.25 and 0..ln 2.
        entropy_scale: (largest value, its text) of the entropy panel, e.g. (ln 4, "ln 4") for
            the entropy over three classes and the background; None: (ln 2, "ln 2").
        title: a line of text above the panels ("" for none; see ``overlay_title``).
        channel: the image channel shown (1st-99th percentile window), named ``channel_name``.
        scale: integer upsampling of every panel; None picks the smallest one that makes a
            panel at least ``OVERLAY_MIN_SIZE`` pixels on its longer side.
        classes: None for one foreground (the colours of label, pre-seg and result), or
            ``((value, name), ...)``: one colour per class (``CLASS_PALETTE`` in this order) and a
            legend entry per class name, plus the label's edge when a label is given.

    Returns:
        (width, height) of the PNG: width = n_panels * W * scale + (n_panels - 1) *
        OVERLAY_GAP, height = OVERLAY_LINE_HEIGHT * (2 if title else 1) + H * scale +
        OVERLAY_FOOTER_HEIGHT.
    """
    image = to_numpy(image_channels)
    image = image[None] if image.ndim == 2 else image
    if image.ndim != 3:
        raise EvaluationError(f"overlay image must be [C, H, W], got shape {image.shape}")
    if not 0 <= channel < image.shape[0]:
        raise EvaluationError(f"overlay channel {channel} is out of range for {image.shape[0]} channels")
    height, width = image.shape[1:]
    colours = None if classes is None else _class_colours(classes)
    if colours is None:
        masks = _checked_masks((height, width), label, preseg, result)
        legend = [(name, MASK_COLOURS[name]) for name in masks]
    else:
        masks = _checked_label_maps((height, width), label, preseg, result, colours)
        legend = list(colours.values())
        if "label" in masks and len(masks) > 1:
            legend.append((LABEL_EDGE_NAME, LABEL_EDGE_RGB))
    maps = {}
    for name, values in (("variance", variance), ("entropy", entropy)):
        if values is not None:
            values = np.nan_to_num(to_numpy(values).astype(np.float64))
            if values.shape != (height, width):
                raise EvaluationError(f"overlay {name} shape {values.shape} does not match image {(height, width)}")
            maps[name] = values
    scale = max(1, -(-OVERLAY_MIN_SIZE // max(height, width))) if scale is None else int(scale)
    if scale < 1:
        raise EvaluationError(f"overlay scale must be >= 1, got {scale}")

    scales = dict(UNCERTAINTY_SCALES, **({"entropy": tuple(entropy_scale)} if entropy_scale else {}))
    panels = _panels(_upscale(_gray(image[channel]), scale), masks, maps, scale, channel_name, colours, scales)
    header = OVERLAY_LINE_HEIGHT * (2 if title else 1)
    ph, pw = height * scale, width * scale
    footer = header + ph + _FOOTER_TOP
    canvas = np.zeros((header + ph + OVERLAY_FOOTER_HEIGHT, len(panels) * pw + (len(panels) - 1) * OVERLAY_GAP, 3),
                      dtype=np.uint8)
    bar = heat_colormap(np.linspace(0.0, 1.0, pw))[None]
    for i, (name, panel) in enumerate(panels):
        x = i * (pw + OVERLAY_GAP)
        canvas[header : header + ph, x : x + pw] = np.clip(np.round(panel), 0, 255).astype(np.uint8)
        if name in maps:
            canvas[footer : footer + COLOURBAR_HEIGHT, x : x + pw] = bar
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for i, (name, _) in enumerate(panels):
        x = i * (pw + OVERLAY_GAP)
        draw.text((x + 2, header - OVERLAY_LINE_HEIGHT + 1), name, fill=_TEXT)
        if name in maps:
            _colourbar_ticks(draw, x, footer + COLOURBAR_HEIGHT, pw, scales[name][1])
    _draw_legend(draw, 2, footer, legend)
    if title:
        draw.text((2, 1), title, fill=_TEXT)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    return picture.size
