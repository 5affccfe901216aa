"""The embedded demo: generated Med-GRIT-style data and the end-to-end pipeline (``clinkd train --preset demo``)."""

from .data import build_demo_data, draw_sample
from .pipeline import demo_preset, run_demo

__all__ = ["build_demo_data", "demo_preset", "draw_sample", "run_demo"]
