"""Overlay PNGs: panels, legend, colour bars on fixed scales, the channel shown, the title."""

import hashlib
import math

import numpy as np
import pytest
from PIL import Image

from evaluation.errors import EvaluationError
from evaluation.overlay import (
    CLASS_PALETTE,
    COLOURBAR_HEIGHT,
    LABEL_EDGE_RGB,
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


# SHA-256 of the RGB pixels that the one-foreground overlays below gave before ``classes``
# existed (the code at bf4277a): classes=None must keep drawing exactly these.
BINARY_PIXELS = {
    "full": ((102, 452, 3), "cd42cf89f04a45b5daa16028e07400e2e2613f63ef799334214e4696696c4e28"),
    "plain": ((136, 588, 3), "28f6c443a490cd5e1e8616f96bc5c3c4dac74f903e847e9b69f574406a9bded1"),
}


def test_one_foreground_overlays_are_pixel_identical_to_before(case, tmp_path):
    variance = np.linspace(0, 0.25, H * W).reshape(H, W)
    entropy = np.linspace(0, 0.69, H * W).reshape(H, W)[::-1]
    runs = {"full": dict(variance=variance, entropy=entropy, title="case 7  addpm  K=2  Dice 0.500", scale=3),
            "plain": dict(scale=None)}
    for name, kw in runs.items():
        path = tmp_path / f"{name}.png"
        save_overlay(path, case["image"], square(4, 4).astype(np.uint8), square(5, 3), square(5, 5, 7),
                     classes=None, **kw)
        picture = pixels(path)
        assert (picture.shape, hashlib.sha256(picture.tobytes()).hexdigest()) == BINARY_PIXELS[name], name


def nested_maps():
    """Label maps in BraTS 2023 values: oedema 2 around a core 1 around enhancing tumour 3."""
    label = np.zeros((H, W), dtype=np.uint8)
    label[2:14, 2:14] = 2
    label[4:12, 4:12] = 1
    label[6:10, 6:10] = 3
    result = label.copy()
    result[6:10, 6:10] = 1  # the enhancing part missed
    return label, result


def test_each_class_gets_its_own_colour_and_legend_entry(case, tmp_path):
    label, result = nested_maps()
    classes = ((2, "oedema"), (1, "core"), (3, "enhancing"))
    path = tmp_path / "classes.png"
    size = save_overlay(path, case["image"], label, None, result, classes=classes, scale=4)
    picture = pixels(path)
    assert size == (3 * W * 4 + 2 * OVERLAY_GAP, OVERLAY_LINE_HEIGHT + 4 * H + OVERLAY_FOOTER_HEIGHT)
    colours = dict(zip((2, 1, 3), CLASS_PALETTE))
    assert len(set(CLASS_PALETTE)) == len(CLASS_PALETTE)
    label_panel = panel(picture, 1, OVERLAY_LINE_HEIGHT, scale=4)
    result_panel = panel(picture, 2, OVERLAY_LINE_HEIGHT, scale=4)
    # Each class's outline is drawn in its colour (upscaled by 4: the outer pixel ring of each square).
    assert label_panel[2 * 4, 8 * 4].tolist() == list(colours[2])
    assert label_panel[4 * 4, 8 * 4].tolist() == list(colours[1])
    assert label_panel[6 * 4, 8 * 4].tolist() == list(colours[3])
    # The result misses the enhancing part: its centre is tinted as core, not as enhancing tumour.
    inside = result_panel[8 * 4, 8 * 4].astype(float)
    assert np.argmax(inside) == np.argmax(colours[1])  # core's colour is mostly red
    # The label's foreground edge (white) is drawn on the result panel.
    assert result_panel[2 * 4, 8 * 4].tolist() == list(LABEL_EDGE_RGB)
    # The legend: one swatch per class, in the order given, then the label's edge.
    footer = picture[OVERLAY_LINE_HEIGHT + 4 * H + FOOTER_TOP + LEGEND_SWATCH // 2]
    row = [tuple(c) for c in footer]
    starts = [row.index(rgb) for rgb in (*colours.values(), LABEL_EDGE_RGB)]
    assert starts == sorted(starts)
    assert all(row.count(rgb) >= LEGEND_SWATCH for rgb in colours.values())


def test_a_label_value_no_class_covers_is_refused(case, tmp_path):
    label, result = nested_maps()
    with pytest.raises(EvaluationError, match="overlay label has label value 3, which no class covers"):
        save_overlay(tmp_path / "bad.png", case["image"], label, None, result, classes=((1, "core"), (2, "oedema")))
    with pytest.raises(EvaluationError, match="is not an integer label map"):
        save_overlay(tmp_path / "bad.png", case["image"], None, None, result * 0.5, classes=((1, "core"),))
    assert not (tmp_path / "bad.png").exists()


def test_entropy_over_more_classes_has_its_own_scale(case, tmp_path):
    """The entropy over background and three classes reaches ln 4: drawn on 0..ln 4, not clipped at ln 2."""
    entropy = np.full((H, W), math.log(2.0))
    path = tmp_path / "classes.png"
    save_overlay(path, case["image"], None, None, case["result"], entropy=entropy, scale=1,
                 entropy_scale=(math.log(4.0), "ln 4"))
    ent_panel = panel(pixels(path), 2, OVERLAY_LINE_HEIGHT)
    assert ent_panel[0, 0].tolist() == heat_colormap(0.5).tolist()
