"""AnnData-aware models on scvi-tools' BaseModelClass."""

from ._base import Capabilities, PerturbationModel
from ._baseline import Baseline
from ._causal_vae import CausalVAE
from ._cell_jepa import CellJEPA
from ._flow_matching import FlowMatching
from ._residual_diffusion import ResidualDiffusion

__all__ = [
    "PerturbationModel",
    "Capabilities",
    "Baseline",
    "CausalVAE",
    "ResidualDiffusion",
    "FlowMatching",
    "CellJEPA",
]
