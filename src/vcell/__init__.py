"""vcell: virtual-cell models of perturbation responses on AnnData/MuData, with honest OOD benchmarks.

Submodules are imported on first use so that ``import vcell`` stays light (no torch, scvi-tools or JAX).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._settings import settings

__version__ = "0.1.0"

_SUBMODULES = ("pp", "tl", "pl", "metrics", "bench", "datasets", "model", "data", "module", "train", "priors")

if TYPE_CHECKING:
    from . import bench, data, datasets, metrics, model, module, pl, pp, priors, tl, train


def __getattr__(name: str):
    if name in _SUBMODULES:
        mod = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = mod
        return mod
    msg = f"module 'vcell' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])


__all__ = ["settings", "__version__", *_SUBMODULES]
