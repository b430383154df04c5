"""Overlay PNGs: panels, legend, colour bars on fixed scales, the channel shown, the title."""

import math

import numpy as np
import pytest
from PIL import Image

from evaluation.errors import EvaluationError
from evaluation.overlay import (
    COLOURBAR_HEIGHT,
    LABEL_RGB,
    LEGEND_SWATCH,
    OVERLAY_FOOTER_HEIGHT,
    OVERLAY_GAP,
    OVERLAY_LINE_HEIGHT,
    PRESEG_RGB,
    RESULT_RGB,
    _gray,
    heat_colormap,
    overlay_channel,
    overlay_title,
    save_overlay,
)
from guided_diffusion.errors import ConfigError

H, W = 16, 24
FOOTER_TOP = 3  # the legend and the colour bars start this far below the panels


def square(top, left, size=6):
    mask = np.zeros((H, W), dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "RGB"
        return np.asarray(img)


def panel(picture, index, header=2 * OVERLAY_LINE_HEIGHT, scale=1):
    x = index * (W * scale + OVERLAY_GAP)
    return picture[header : header + H * scale, x : x + W * scale]


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    image = rng.random((3, H, W)).astype(np.float32)
    return {"image": image, "label": square(4, 4), "preseg": square(5, 3), "result": square(5, 5)}


def test_six_panels_their_size_and_the_mask_colours(case, tmp_path):
    path = tmp_path / "overlays" / "case.png"
    variance = np.full((H, W), 0.1)
    size = save_overlay(path, case["image"], case["label"], case["preseg"], case["result"],
                        variance=variance, entropy=np.zeros((H, W)), title="case 7", scale=1)
    picture = pixels(path)
    assert size == (6 * W + 5 * OVERLAY_GAP, 2 * OVERLAY_LINE_HEIGHT + H + OVERLAY_FOOTER_HEIGHT)
    assert picture.shape[:2] == (size[1], size[0])
    result = panel(picture, 3)
    # (10, 10) lies on the result's outline (which the label's green outline does not cover);
    # (7, 7) inside it is tinted red.
    assert result[10, 10].tolist() == list(RESULT_RGB)
    assert result[7, 7, 0] > result[7, 7, 1]
    assert panel(picture, 1)[4, 6].tolist() == list(LABEL_RGB)
    # The uncertainty panels are the heat map of the fixed scale: 0.1 / 0.25 everywhere.
    assert (panel(picture, 4) == heat_colormap(0.1 / 0.25)).all()
    assert (panel(picture, 5) == heat_colormap(0.0)).all()


def test_legend_swatches_and_colour_bars_are_drawn(case, tmp_path):
    path = tmp_path / "legend.png"
    save_overlay(path, case["image"], case["label"], case["preseg"], case["result"],
                 variance=np.zeros((H, W)), entropy=np.zeros((H, W)), title="t", scale=6)
    picture = pixels(path)
    top = 2 * OVERLAY_LINE_HEIGHT + 6 * H + FOOTER_TOP
    # The legend: one swatch per mask, in the order label, pre-seg, result, left to right.
    row = picture[top + LEGEND_SWATCH // 2, : 2 * 6 * W]
    colours = [tuple(c) for c in row]
    starts = [colours.index(rgb) for rgb in (LABEL_RGB, PRESEG_RGB, RESULT_RGB)]
    assert starts == sorted(starts) and starts[0] < 6
    assert all(colours.count(rgb) >= LEGEND_SWATCH for rgb in (LABEL_RGB, PRESEG_RGB, RESULT_RGB))
    # A colour bar under each uncertainty panel, dark to bright from 0 to the scale's top,
    # with tick labels (white text) below it.
    pw = 6 * W
    for index in (4, 5):
        x = index * (pw + OVERLAY_GAP)
        bar = picture[top : top + COLOURBAR_HEIGHT, x : x + pw]
        assert (bar == heat_colormap(np.linspace(0.0, 1.0, pw))[None]).all()
        ticks = picture[top + COLOURBAR_HEIGHT : top + OVERLAY_FOOTER_HEIGHT - FOOTER_TOP, x : x + pw]
        assert (ticks.min(axis=-1) > 200).any(axis=0)[: pw // 4].any()  # "0" at the left
        assert (ticks.min(axis=-1) > 200).any(axis=0)[-pw // 4 :].any()  # the top at the right
    # Nothing but the legend below the mask panels: no colour bar there.
    assert not (picture[top : top + COLOURBAR_HEIGHT, 3 * (pw + OVERLAY_GAP) : 4 * pw] > 0).any()


def test_legend_names_only_the_masks_given(case, tmp_path):
    path = tmp_path / "unlabelled.png"
    size = save_overlay(path, case["image"], None, case["preseg"], case["result"], scale=1)
    assert size == (3 * W + 2 * OVERLAY_GAP, OVERLAY_LINE_HEIGHT + H + OVERLAY_FOOTER_HEIGHT)
    footer = [tuple(c) for c in pixels(path)[OVERLAY_LINE_HEIGHT + H :].reshape(-1, 3)]
    assert LABEL_RGB not in footer and PRESEG_RGB in footer and RESULT_RGB in footer


def test_uncertainty_scale_is_fixed_not_the_maximum_of_the_image(case, tmp_path):
    """A nearly certain case stays dark: its map is not stretched to its own maximum."""
    variance = np.zeros((H, W))
    variance[8, 8] = 0.002
    entropy = np.full((H, W), math.log(2.0))
    path = tmp_path / "certain.png"
    save_overlay(path, case["image"], case["label"], None, case["result"], variance=variance,
                 entropy=entropy, scale=1)
    picture = pixels(path)
    var_panel, ent_panel = panel(picture, 3, OVERLAY_LINE_HEIGHT), panel(picture, 4, OVERLAY_LINE_HEIGHT)
    assert var_panel[8, 8].tolist() == heat_colormap(0.002 / 0.25).tolist() and var_panel.max() < 40
    assert (ent_panel == 255).all()  # ln 2 is the top of the entropy scale


def test_the_channel_asked_for_is_the_one_shown(case, tmp_path):
    shown = {}
    for channel in (0, 2):
        path = tmp_path / f"channel{channel}.png"
        save_overlay(path, case["image"], None, None, case["result"], channel=channel, scale=1)
        shown[channel] = panel(pixels(path), 0, OVERLAY_LINE_HEIGHT)
        expected = np.round(_gray(case["image"][channel])).astype(np.uint8)
        np.testing.assert_array_equal(shown[channel], expected)
    assert (shown[0] != shown[2]).any()
    with pytest.raises(EvaluationError, match="channel 3 is out of range"):
        save_overlay(tmp_path / "bad.png", case["image"], None, None, case["result"], channel=3)


def test_overlay_channel_by_name_index_and_default():
    brats = ("t1", "t1ce", "t2", "flair")
    assert overlay_channel("", brats) == 3  # FLAIR by default
    assert overlay_channel("", ("T2", "FLAIR", "T1")) == 1
    assert overlay_channel("", ("R", "G", "B")) == 0  # no FLAIR: the first channel
    assert overlay_channel("T1ce", brats) == 1 and overlay_channel("2", brats) == 2
    with pytest.raises(ConfigError, match=r"--overlay_channel 4: the images have 4 channel\(s\) \(0 t1, 1 t1ce"):
        overlay_channel("4", brats)
    with pytest.raises(ConfigError, match="'adc' is not a channel of the images"):
        overlay_channel("adc", brats)


def test_title_carries_the_case_dice():
    metrics = {"dice": 0.91234, "pred_voxels": 10, "label_voxels": 12}
    assert overlay_title("c1", "addpm", 3, metrics, {"dice": 0.8}) == "c1  addpm  K=3  Dice 0.912 (pre-seg 0.800)"
    assert overlay_title("c1", "preseg", 1, metrics) == "c1  preseg  K=1  Dice 0.912"
    assert overlay_title("c1", "addpm", 3).endswith("no label")
    empty = {"dice": 1.0, "pred_voxels": 0, "label_voxels": 0}
    assert overlay_title("c1", "addpm", 3, empty).endswith("label and result empty")


def test_bad_shapes_are_refused(case, tmp_path):
    with pytest.raises(EvaluationError, match="result shape"):
        save_overlay(tmp_path / "bad.png", case["image"], None, None, np.zeros((5, 5)))
    with pytest.raises(EvaluationError, match="variance shape"):
        save_overlay(tmp_path / "bad.png", case["image"], None, None, case["result"], variance=np.zeros((5, 5)))
    assert not (tmp_path / "bad.png").exists()
