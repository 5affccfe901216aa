"""Med-GRIT evaluation: metrics, scoring a predictions file, and greedy prediction."""

from .evaluate import evaluate, format_report
from .metrics import box_iou, caption_metrics, parse_box, roc_correct, vg_hit

__all__ = ["box_iou", "caption_metrics", "evaluate", "format_report", "parse_box", "roc_correct", "vg_hit"]
