"""Pure-torch modules (no AnnData): every module takes a dict of tensors keyed by ``REGISTRY_KEYS``."""

from ._base import VCellModule
from ._baseline import BASELINE_METHODS, INTERACTION_FEATURES, BaselineModule, fit_interaction
from ._causal_vae import CausalVAEModule
from ._flow_matching import FlowMatchingModule, ot_pairs, sinkhorn_plan
from ._jepa import (
    CellJEPAModule,
    JEPAModule,
    LatentTransitionModule,
    cosine_error,
    effective_rank,
    ema_update,
    retrieval_ranks,
)
from ._perturbation_encoders import (
    AtomOperators,
    DoseResponse,
    GeneGraphOperators,
    OneHotOperators,
    PairInteractions,
    PerturbationEncoder,
    TableOperators,
)
from ._residual_diffusion import ResidualDiffusionModule
from ._structured import PathwayDecoder, gene_programs, regulatory_edges, regulatory_penalty

__all__ = [
    "VCellModule",
    "BaselineModule",
    "BASELINE_METHODS",
    "INTERACTION_FEATURES",
    "fit_interaction",
    "CausalVAEModule",
]
__all__ += ["PathwayDecoder", "gene_programs", "regulatory_edges", "regulatory_penalty"]
__all__ += ["AtomOperators", "OneHotOperators", "TableOperators", "GeneGraphOperators"]
__all__ += ["DoseResponse", "PairInteractions", "PerturbationEncoder"]

__all__ += ["FlowMatchingModule", "ot_pairs", "sinkhorn_plan"]
__all__ += ["ResidualDiffusionModule"]

__all__ += ["JEPAModule", "LatentTransitionModule", "CellJEPAModule"]
__all__ += ["ema_update", "effective_rank", "retrieval_ranks", "cosine_error"]
