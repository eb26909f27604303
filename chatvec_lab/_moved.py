"""Old module paths, from before the layers became folders: they still import, with a DeprecationWarning.

``import chatvec_lab.geometry`` (or ``from chatvec_lab import geometry``) gives the module that now lives at
``chatvec_lab.analysis.geometry`` and warns once naming the new path. These aliases go in the next release.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    **{m: f"io.{m}" for m in ("formats", "naming", "paging", "vocab", "output", "resources", "sources")},
    **{m: f"core.{m}" for m in ("kernels", "threads", "transforms", "vector", "plan", "apply", "merge", "lora", "live")},
    **{m: f"analysis.{m}" for m in ("intervals", "geometry", "interference", "info")},
    **{m: f"behaviour.{m}" for m in ("generation", "scoring", "engines", "grid", "sweep", "atlas", "ablations")},
    **{m: f"course.{m}" for m in ("exercises", "widgets", "report", "demo")},
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module):
        pass


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds ``chatvec_lab.<old>`` and hands back ``chatvec_lab.<folder>.<old>``."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.partition(".")
        if prefix != "chatvec_lab" or old not in MOVED:
            return None
        new = f"chatvec_lab.{MOVED[old]}"
        warnings.warn(f"chatvec_lab.{old} moved to {new}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
