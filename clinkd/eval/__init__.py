"""Med-GRIT evaluation: metrics, scoring a predictions file, bootstrap intervals, and greedy prediction."""

from .._lazy import lazy_exports
from .evaluate import Row, evaluate, format_report, gather
from .metrics import box_iou, caption_metrics, parse_box, roc_correct, vg_hit

# prediction needs the model (transformers): imported when first used
__getattr__, __dir__, _lazy = lazy_exports(
    __name__, {".predict": ("load_model", "predict"), ".bootstrap": ("bootstrap_intervals",)}
)
__all__ = [
    "Row",
    "box_iou",
    "caption_metrics",
    "evaluate",
    "format_report",
    "gather",
    "parse_box",
    "roc_correct",
    "vg_hit",
    *_lazy,
]
