"""Package attributes imported on first use: ``import clinkd.x`` stays cheap (no transformers, no torch)
until a name that needs them is read."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]):
    """(``__getattr__``, ``__dir__``, ``__all__``) for ``package``: ``exports`` maps a module (absolute, or
    relative to the package with a leading dot) to the names it gives; each module is imported when one
    of its names is first read, and the name is then kept on the package."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__, sorted(where)
