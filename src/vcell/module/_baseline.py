"""Closed-form baselines as a pure-torch module (buffers only), so they save/load like every model."""

from __future__ import annotations

import torch

from vcell._constants import REGISTRY_KEYS

from ._base import VCellModule

BASELINE_METHODS = ("control", "mean", "additive", "linear")


class BaselineModule(VCellModule):
    """Shift control cells by a closed-form perturbation effect (BENCHMARK.md baselines).

    For a control cell ``x`` in context ``c`` under perturbation encoding ``e`` (dose-scaled multi-hot over
    single perturbations) the prediction is ``clamp(x + shift(e, c), min=0)`` with

    * ``control``: ``shift = 0``;
    * ``mean``: the mean shift of all perturbed training cells (when ``e`` is not all zero);
    * ``additive``: ``sum_a e_a * atom_shift[c, a]``: per-unit-dose shifts of the singles, measured in the
      same context when seen there, else averaged over the contexts where they were seen;
    * ``linear``: ``b + G W (e P)^T`` (Ahlmann-Eltze 2025), ``G`` gene embedding, ``P`` perturbation embedding.

    Parameters
    ----------
    n_genes, n_atoms, n_contexts
        Numbers of genes, single perturbations and contexts.
    method
        One of ``BASELINE_METHODS``.
    n_components
        Embedding dimension ``K`` of the linear baseline.
    """

    def __init__(
        self, n_genes: int, n_atoms: int, n_contexts: int, *, method: str = "additive", n_components: int = 10
    ):
        super().__init__()
        if method not in BASELINE_METHODS:
            msg = f"method must be one of {BASELINE_METHODS}, got {method!r}"
            raise ValueError(msg)
        self.method = method
        # context index n_contexts (the extra row) = unseen context: averages over contexts
        self.register_buffer("atom_shift", torch.zeros(n_contexts + 1, n_atoms, n_genes))
        self.register_buffer("atom_seen", torch.zeros(n_contexts + 1, n_atoms, dtype=torch.bool))
        self.register_buffer("mean_shift", torch.zeros(n_genes))
        self.register_buffer("lin_G", torch.zeros(n_genes, n_components))
        self.register_buffer("lin_W", torch.zeros(n_components, n_components))
        self.register_buffer("lin_b", torch.zeros(n_genes))
        self.register_buffer("lin_P", torch.zeros(n_atoms, n_components))
        self.register_buffer("lin_P_ok", torch.zeros(n_atoms, dtype=torch.bool))

    def shift(
        self, encoding: torch.Tensor, context: torch.Tensor, embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted change, shape ``(n_cells, n_genes)``.

        ``context`` is the context index (``-1`` for an unseen one); ``embedding`` (linear only) overrides
        ``encoding @ lin_P`` with a given perturbation embedding ``(n_cells, K)``, for perturbations outside
        the training vocabulary.
        """
        n = encoding.shape[0]
        active = (encoding.abs().sum(1, keepdim=True) > 0).to(encoding.dtype)
        if self.method == "control":
            return torch.zeros(n, self.mean_shift.shape[0], dtype=encoding.dtype, device=encoding.device)
        if self.method == "mean":
            return active * self.mean_shift[None, :]
        if self.method == "additive":
            ctx = torch.where(context < 0, torch.full_like(context, self.atom_shift.shape[0] - 1), context)
            return torch.einsum("na,nag->ng", encoding, self.atom_shift[ctx])
        p = encoding @ self.lin_P if embedding is None else embedding  # (n, K)
        return active * (self.lin_b[None, :] + p @ self.lin_W.T @ self.lin_G.T)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Counterfactual of ``batch[CONTROL_X_KEY]`` (log1p(CP10k)) under ``batch[PERT_ENCODING_KEY]``."""
        x = batch[REGISTRY_KEYS.CONTROL_X_KEY]
        shift = self.shift(
            batch[REGISTRY_KEYS.PERT_ENCODING_KEY], batch["context"], batch.get("perturbation_embedding")
        )
        return torch.clamp(x + shift, min=0.0)
