"""Metrics and ensemble uncertainty on hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from evaluation.errors import EvaluationError
from evaluation.metrics import (
    METRIC_NAMES,
    label_map_metrics,
    mean_over_classes,
    multiclass_metrics,
    segmentation_metrics,
    surface_distances,
    union_counts,
    voxel_counts,
)
from evaluation.uncertainty import (
    MAX_ENTROPY,
    channel_statistics,
    class_entropy,
    ensemble_statistics,
    fuse,
    fuse_channels,
    fused_channels_mask,
)
from guided_diffusion.errors import ConfigError


def square(shape, top, left, size=3):
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def cube(shape, corner, size=3):
    mask = np.zeros(shape, dtype=bool)
    z, y, x = corner
    mask[z : z + size, y : y + size, x : x + size] = True
    return mask


def test_dice_iou_counts_by_hand():
    pred = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=bool)
    label = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    m = segmentation_metrics(pred, label)
    # tp = 2 ((0,0), (1,0)); fp = 2 ((0,1), (2,3)); fn = 1 ((1,1)); tn = 12 - 5 = 7.
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 2, 1, 7)
    assert (m["pred_voxels"], m["label_voxels"]) == (4, 3)
    assert m["dice"] == pytest.approx(4 / 7)
    assert m["iou"] == pytest.approx(2 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["specificity"] == pytest.approx(7 / 9)
    assert list(m)[: len(METRIC_NAMES)] == list(METRIC_NAMES)


def test_identical_masks_are_perfect():
    mask = square((10, 10), 2, 3, size=4)
    m = segmentation_metrics(mask, mask.astype(np.uint8) * 255)
    assert m["dice"] == m["iou"] == 1.0
    assert m["hd95"] == m["assd"] == 0.0


@pytest.mark.parametrize("k", [3, 4, 6])
def test_squares_offset_by_k(k):
    # 3x3 squares k >= 3 rows apart: the 8 surface pixels of one sit k-2 (3 pixels), k-1 (2)
    # and k (3) from the other's facing side. Sorted distances [k-2]*3 + [k-1]*2 + [k]*3:
    # 95th percentile at position 6.65 -> k; mean (3(k-2) + 2(k-1) + 3k) / 8 = k - 1.
    a = square((16, 16), 1, 2)
    b = square((16, 16), 1 + k, 2)
    m = segmentation_metrics(a, b)
    assert m["dice"] == 0.0
    assert m["hd95"] == pytest.approx(k)
    assert m["assd"] == pytest.approx(k - 1)
    d_ab, d_ba = surface_distances(a, b)
    assert sorted(d_ab) == [k - 2] * 3 + [k - 1] * 2 + [k] * 3
    assert sorted(d_ba) == sorted(d_ab)


def test_overlapping_squares_by_hand():
    # Offset by one row: overlap 6 of 9 pixels; surface distances 1 (4 pixels) and 0 (4).
    a = square((8, 8), 1, 1)
    b = square((8, 8), 2, 1)
    m = segmentation_metrics(a, b)
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["iou"] == pytest.approx(0.5)
    assert m["hd95"] == pytest.approx(1.0)
    assert m["assd"] == pytest.approx(0.5)


def test_anisotropic_spacing_scales_only_its_axis():
    k = 4
    a = square((16, 16), 1, 1)
    along_rows = square((16, 16), 1 + k, 1)
    along_cols = square((16, 16), 1, 1 + k)
    m = segmentation_metrics(a, along_rows, spacing=(2.0, 1.0))
    assert m["hd95"] == pytest.approx(2 * k)
    assert m["assd"] == pytest.approx(2 * (k - 1))
    m = segmentation_metrics(a, along_cols, spacing=(2.0, 1.0))
    assert m["hd95"] == pytest.approx(k)
    assert m["assd"] == pytest.approx(k - 1)


def _reference_distances(a, b, spacing):
    # Brute force: surface = foreground pixels with a 4-neighbour outside the mask or the array.
    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = padded[1:-1, 1:-1]
        interior = (
            inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
        return np.argwhere(mask & ~interior) * np.asarray(spacing)

    pa, pb = surface_points(a), surface_points(b)
    pair = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
    return pair.min(axis=1), pair.min(axis=0)


def test_surface_distances_match_brute_force_on_irregular_shapes():
    rng = np.random.default_rng(0)
    a = rng.random((14, 12)) > 0.6
    b = rng.random((14, 12)) > 0.5
    spacing = (1.5, 0.7)
    d_ab, d_ba = surface_distances(a, b, spacing)
    r_ab, r_ba = _reference_distances(a, b, spacing)
    np.testing.assert_allclose(np.sort(d_ab), np.sort(r_ab))
    np.testing.assert_allclose(np.sort(d_ba), np.sort(r_ba))
    m = segmentation_metrics(a, b, spacing)
    expected_hd95 = max(np.percentile(r_ab, 95), np.percentile(r_ba, 95))
    assert m["hd95"] == pytest.approx(expected_hd95)
    assert m["assd"] == pytest.approx(np.concatenate([r_ab, r_ba]).mean())


def test_empty_mask_conventions():
    empty = np.zeros((6, 6), dtype=bool)
    full = square((6, 6), 1, 1)

    both = segmentation_metrics(empty, empty)
    assert both["dice"] == both["iou"] == 1.0
    assert both["hd95"] == both["assd"] == 0.0
    assert math.isnan(both["sensitivity"]) and math.isnan(both["precision"])
    assert both["specificity"] == 1.0

    no_pred = segmentation_metrics(empty, full)
    assert no_pred["dice"] == no_pred["iou"] == 0.0
    assert math.isnan(no_pred["hd95"]) and math.isnan(no_pred["assd"])
    assert no_pred["sensitivity"] == 0.0 and math.isnan(no_pred["precision"])
    assert no_pred["specificity"] == 1.0

    no_label = segmentation_metrics(full, empty)
    assert no_label["dice"] == no_label["iou"] == 0.0
    assert math.isnan(no_label["hd95"]) and math.isnan(no_label["assd"])
    assert math.isnan(no_label["sensitivity"]) and no_label["precision"] == 0.0
    assert no_label["specificity"] == pytest.approx(27 / 36)

    all_foreground = np.ones((3, 3), dtype=bool)
    assert math.isnan(segmentation_metrics(all_foreground, all_foreground)["specificity"])


def test_one_sided_miss_is_penalised_with_the_image_diagonal_in_mm():
    empty = np.zeros((16, 12), dtype=bool)
    lesion = square((16, 12), 4, 4)
    diagonal = math.sqrt((16 * 1.0) ** 2 + (12 * 2.5) ** 2)
    for pred, label in ((empty, lesion), (lesion, empty)):
        metrics = segmentation_metrics(pred, label, spacing=(1.0, 2.5))
        assert math.isnan(metrics["hd95"])
        assert metrics["hd95_penalized"] == pytest.approx(diagonal)
    assert segmentation_metrics(empty, empty)["hd95_penalized"] == 0.0
    hit = segmentation_metrics(lesion, square((16, 12), 5, 4), spacing=(1.0, 2.5))
    assert hit["hd95_penalized"] == hit["hd95"] == 1.0
    # BraTS's figure for a missed lesion in a 240 x 240 x 155 volume at 1 mm.
    volume = np.zeros((155, 240, 240), dtype=bool)
    volume[70:72, 100:104, 100:104] = True
    assert segmentation_metrics(np.zeros_like(volume), volume)["hd95_penalized"] == pytest.approx(373.13, abs=0.01)


@pytest.mark.parametrize("k", [3, 5])
def test_3d_cubes_with_slice_thickness(k):
    # 3x3x3 cubes k >= 3 slices apart: the 26 surface voxels of one lie k-2 (9), k-1 (8)
    # and k (9) slices from the other's facing side -> hd95 = k, assd = k - 1 slices.
    a = cube((10, 6, 6), (0, 1, 1))
    b = cube((10, 6, 6), (k, 1, 1))
    m = segmentation_metrics(a, b, spacing=(2.5, 1.0, 1.0))
    assert m["hd95"] == pytest.approx(2.5 * k)
    assert m["assd"] == pytest.approx(2.5 * (k - 1))
    shifted = cube((10, 6, 6), (1, 1, 1))
    m = segmentation_metrics(a, shifted)
    assert m["dice"] == pytest.approx(2 * 18 / 54)
    assert m["tp"] == 18 and m["tn"] == 360 - 36


def test_torch_inputs_and_errors():
    a = torch.zeros(5, 5, dtype=torch.long)
    a[1:3, 1:3] = 1
    assert segmentation_metrics(a, a.clone())["dice"] == 1.0
    with pytest.raises(EvaluationError, match="does not match"):
        segmentation_metrics(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(EvaluationError, match="spacing"):
        segmentation_metrics(np.zeros((4, 4)), np.zeros((4, 4)), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(EvaluationError, match="spacing"):
        segmentation_metrics(np.zeros((4, 4)), np.zeros((4, 4)), spacing=(0.0, 1.0))


def test_multiclass_metrics():
    label = np.array([[1, 1, 0], [2, 2, 0], [0, 0, 0]])
    pred = np.array([[1, 0, 0], [2, 2, 2], [0, 0, 1]])
    per_class = multiclass_metrics(pred, label, [1, 2])
    # class 1: tp 1, fp 1, fn 1 -> dice 1/2; class 2: tp 2, fp 1, fn 0 -> dice 4/5.
    assert per_class[1]["dice"] == pytest.approx(0.5)
    assert per_class[2]["dice"] == pytest.approx(0.8)
    regions = multiclass_metrics(pred, label, {"any": (1, 2), "missing": 4})
    # union: tp 3, fp 2, fn 1 -> dice 6/9.
    assert regions["any"]["dice"] == pytest.approx(6 / 9)
    assert regions["missing"]["dice"] == 1.0


def test_ensemble_statistics_by_hand_numpy_and_torch():
    members = np.array([[0.2, 1.0, 0.0, 0.0], [0.6, 1.0, 1.0, 0.0]])
    stats = ensemble_statistics(members)
    np.testing.assert_allclose(stats["mean"], [0.4, 1.0, 0.5, 0.0])
    # Population variance: ((0.2-0.4)^2 + (0.6-0.4)^2) / 2 = 0.04; (0^2 + 1^2)/2 - 0.25 = 0.25.
    np.testing.assert_allclose(stats["variance"], [0.04, 0.0, 0.25, 0.0], atol=1e-12)
    h04 = -(0.4 * math.log(0.4) + 0.6 * math.log(0.6))
    np.testing.assert_allclose(stats["entropy"], [h04, 0.0, MAX_ENTROPY, 0.0], atol=1e-12)

    t_stats = ensemble_statistics(torch.tensor(members, dtype=torch.float32))
    for key in ("mean", "variance", "entropy"):
        assert isinstance(t_stats[key], torch.Tensor) and t_stats[key].dtype == torch.float32
        np.testing.assert_allclose(t_stats[key].numpy(), stats[key], atol=1e-6)

    single = ensemble_statistics(torch.full((1, 2, 3), 0.3))
    assert torch.all(single["variance"] == 0)


def test_vote_and_mean_fusion_differ():
    members = np.array(
        [
            [0.9, 1.0, 0.55, 1.0],
            [0.9, 0.2, 0.55, 0.45],
            [0.0, 0.2, 0.0, 0.45],
        ]
    )
    mean_prob, mean_mask = fuse(members, "mean")
    vote_prob, vote_mask = fuse(members, "vote")
    np.testing.assert_allclose(mean_prob, members.mean(axis=0))
    np.testing.assert_allclose(vote_prob, [2 / 3, 1 / 3, 2 / 3, 1 / 3])
    assert mean_mask.tolist() == [True, False, False, True]
    assert vote_mask.tolist() == [True, False, True, False]

    # Two members split: the mean 0.5 reaches the threshold, one vote of two is no majority.
    tie = torch.tensor([[1.0], [0.0]])
    prob, mask = fuse(tie, "mean")
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.item()
    prob, mask = fuse(tie, "vote")
    assert prob.item() == 0.5 and not mask.item()
    with pytest.raises(ConfigError, match="fusion"):
        fuse(tie, "median")


def test_mean_over_classes_leaves_both_empty_classes_out_and_counts_their_union():
    label = np.array([[1, 1, 2, 0], [0, 0, 0, 0]])
    pred = np.array([[1, 0, 2, 2], [0, 0, 0, 0]])
    row = label_map_metrics(pred, label, {"class1": 1, "class2": 2, "class4": 4})
    # class1: tp 1, fn 1 -> dice 2/3; class2: tp 1, fp 1 -> 2/3; class4 empty in both: left out.
    assert row["class1_dice"] == pytest.approx(2 / 3) and row["class2_dice"] == pytest.approx(2 / 3)
    assert row["class4_dice"] == 1.0 and row["class4_pred_voxels"] == row["class4_label_voxels"] == 0
    assert row["dice"] == pytest.approx(2 / 3)
    assert (row["pred_voxels"], row["label_voxels"], row["tp"]) == (3, 3, 2)
    assert set(METRIC_NAMES) <= set(row) and "class1_tp" not in row
    # A class missed has no hd95, and neither has the row: it counts as a miss in the HD95 means
    # (hd95_penalized scores it), while the Dice is the mean over both classes.
    missed = label_map_metrics(np.array([[1, 0], [0, 0]]), np.array([[1, 2], [0, 0]]), {"a": 1, "b": 2})
    assert math.isnan(missed["b_hd95"]) and missed["a_hd95"] == 0.0
    assert math.isnan(missed["hd95"]) and math.isnan(missed["assd"]) and missed["dice"] == pytest.approx(0.5)
    assert missed["hd95_penalized"] == pytest.approx((0.0 + missed["b_hd95_penalized"]) / 2)
    empty = np.zeros((2, 2))
    everything_empty = mean_over_classes(multiclass_metrics(empty, empty, [1, 2]),
                                         union_counts(empty, empty, [1, 2]))
    assert everything_empty["dice"] == 1.0 and everything_empty["pred_voxels"] == 0
    regions = label_map_metrics(np.array([[2, 1, 4]]), np.array([[2, 4, 4]]), {"WT": (1, 2, 4), "ET": 4})
    assert regions["WT_dice"] == 1.0 and regions["ET_dice"] == pytest.approx(2 / 3)


def test_voxel_counts_over_overlapping_regions_count_each_voxel_once():
    # An 18-voxel tumour: WT holds all 18, TC 10 of them, ET 2 of those.
    label = np.zeros((6, 6), dtype=np.uint8)
    label[0:3, :] = 2
    label[1:3, 1:6] = 1
    label[2, 4:6] = 4
    pred = label.copy()
    pred[2, 4:6] = 1  # ET missed, called necrosis: still tumour core
    pred[5, 5] = 2  # one false positive, outside the tumour
    regions = {"WT": (1, 2, 4), "TC": (1, 4), "ET": 4}
    row = label_map_metrics(pred, label, regions)
    assert (row["WT_label_voxels"], row["TC_label_voxels"], row["ET_label_voxels"]) == (18, 10, 2)
    # The un-prefixed counts are the union's (= WT here), not 18 + 10 + 2.
    union = tuple(row[c] for c in ("label_voxels", "pred_voxels", "tp", "fp", "fn", "tn"))
    assert union == (18, 19, 18, 1, 0, 17)
    assert row["label_voxels"] + row["fp"] + row["tn"] == label.size
    assert union_counts(pred, label, regions) == voxel_counts(pred > 0, label > 0)
    # Classes that do not overlap: the union's counts are their sums, as before.
    classes = label_map_metrics(pred, label, [1, 2, 4])
    assert classes["label_voxels"] == sum(classes[f"{v}_label_voxels"] for v in (1, 2, 4)) == 18
    # Both empty in the row only when every class is: ET alone present keeps the row scored.
    only_et = label_map_metrics(np.zeros((2, 2), dtype=int), np.array([[4, 0], [0, 0]]), {"TC": (1, 4), "ET": 4})
    assert (only_et["pred_voxels"], only_et["label_voxels"], only_et["fn"]) == (0, 1, 1)


def test_class_entropy_over_background_and_classes():
    probs = np.array([[0.5, 1.0, 0.0, 1 / 3], [0.5, 0.0, 0.0, 1 / 3]])
    entropy = class_entropy(probs, exclusive=True)
    np.testing.assert_allclose(entropy, [math.log(2), 0.0, 0.0, math.log(3)], atol=1e-12)
    t_entropy = class_entropy(torch.tensor(probs, dtype=torch.float32), exclusive=True)
    np.testing.assert_allclose(t_entropy.numpy(), entropy, atol=1e-6)
    # Regions: one binary entropy each.
    np.testing.assert_allclose(class_entropy(probs, exclusive=False)[0], [math.log(2), 0, 0,
                               -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))], atol=1e-12)
    # One class: the binary entropy, as before classes existed.
    np.testing.assert_allclose(class_entropy(probs[:1]), ensemble_statistics(probs[:1])["entropy"])


def test_channel_statistics_with_one_channel_are_the_ensemble_statistics():
    members = torch.rand(4, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    stats, old = channel_statistics(members), ensemble_statistics(members[:, 0])
    assert torch.equal(stats["mean"][0], old["mean"]) and torch.equal(stats["variance"][0], old["variance"])
    assert torch.equal(stats["entropy"], old["entropy"])
    for fusion in ("mean", "vote"):
        (fused, mask), (old_fused, old_mask) = fuse_channels(members, fusion), fuse(members[:, 0], fusion)
        assert torch.equal(fused[0], old_fused) and torch.equal(mask[0], old_mask)


def test_channel_statistics_and_fusion_per_class_and_region():
    # Two members, two classes, three pixels: [class1 sure, split class1/class2, split bg/class2].
    members = np.array([
        [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
        [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
    ])
    stats = channel_statistics(members, exclusive=True)
    np.testing.assert_allclose(stats["mean"], [[1.0, 0.5, 0.0], [0.0, 0.5, 0.5]])
    np.testing.assert_allclose(stats["variance"], [[0.0, 0.25, 0.0], [0.0, 0.25, 0.25]])
    np.testing.assert_allclose(stats["entropy"], [0.0, math.log(2), math.log(2)], atol=1e-12)
    fused, mask = fuse_channels(members, "mean", exclusive=True)
    # Pixel 1: class1 and class2 tie (argmax takes the first); pixel 2: background ties class2.
    assert mask.tolist() == [[True, True, False], [False, False, False]]
    fused, mask = fuse_channels(members, "vote", exclusive=True)
    np.testing.assert_allclose(fused, stats["mean"])
    assert mask.tolist() == [[True, False, False], [False, False, False]]
    # Regions: each channel on its own (mean >= 0.5), the entropy per region.
    stats = channel_statistics(members, exclusive=False)
    assert stats["entropy"].shape == (2, 3)
    _, mask = fuse_channels(members, "mean", exclusive=False)
    assert mask.tolist() == [[True, True, False], [False, True, True]]
    # Three members with soft probabilities: each member votes its own argmax.
    soft = torch.tensor([[[0.6], [0.3]], [[0.2], [0.7]], [[0.45], [0.4]]])
    fused, mask = fuse_channels(soft, "vote", exclusive=True)
    np.testing.assert_allclose(fused.numpy().ravel(), [2 / 3, 1 / 3])
    assert mask.ravel().tolist() == [True, False]
    assert fused_channels_mask(np.array([[0.3], [0.3]]), "mean").ravel().tolist() == [False, False]
    with pytest.raises(ConfigError, match="fusion"):
        fuse_channels(soft, "median")
