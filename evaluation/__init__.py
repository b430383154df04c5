"""Segmentation metrics, ensemble uncertainty, metric tables and overlays.

``python -m evaluation --pred_dir P --label_dir L`` scores a folder of predictions.
"""

from evaluation.errors import EvaluationError
from evaluation.metrics import (
    COUNT_NAMES,
    METRIC_NAMES,
    label_map_metrics,
    multiclass_metrics,
    segmentation_metrics,
    surface_distances,
)
from evaluation.overlay import save_overlay
from evaluation.report import (
    GroupAccumulator,
    metrics_row,
    read_metrics_csv,
    read_uint16_png,
    save_uint16_png,
    summarize,
    write_metrics_csv,
    write_summary_json,
)
from evaluation.uncertainty import channel_statistics, ensemble_statistics, fuse, fuse_channels

__all__ = [
    "COUNT_NAMES",
    "METRIC_NAMES",
    "EvaluationError",
    "GroupAccumulator",
    "channel_statistics",
    "ensemble_statistics",
    "fuse",
    "fuse_channels",
    "label_map_metrics",
    "metrics_row",
    "multiclass_metrics",
    "read_metrics_csv",
    "read_uint16_png",
    "save_overlay",
    "save_uint16_png",
    "segmentation_metrics",
    "summarize",
    "surface_distances",
    "write_metrics_csv",
    "write_summary_json",
]
