"""Pure-torch modules (no AnnData): every module takes a dict of tensors keyed by ``REGISTRY_KEYS``."""

from ._base import VCellModule
from ._baseline import BASELINE_METHODS, BaselineModule

__all__ = ["VCellModule", "BaselineModule", "BASELINE_METHODS"]
