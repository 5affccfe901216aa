"""The embedded demo: generated Med-GRIT-style data and the end-to-end pipeline (``clinkd demo``).

The names below are imported on first use.
"""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__, {".data": ("build_demo_data", "draw_sample"), ".pipeline": ("demo_preset", "run_demo")}
)
