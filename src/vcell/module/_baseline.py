"""Closed-form baselines as a pure-torch module (buffers only), so they save/load like every model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vcell._constants import BASELINE_METHODS, REGISTRY_KEYS

from ._base import VCellModule

#: names of the pair features of the ``interaction`` baseline, in the order of ``BaselineModule.gi_coef``
INTERACTION_FEATURES = ("sum", "product", "saturation")

#: ridge grid (relative to each feature's sum of squares) searched by leave-one-double-out cross-validation;
#: ``inf`` is the additive model itself, so the fit falls back to it when no interaction term generalises
INTERACTION_RIDGE_GRID = (0.0, 0.01, 0.1, 1.0, 10.0, float("inf"))


class BaselineModule(VCellModule):
    """Shift control cells by a closed-form perturbation effect (BENCHMARK.md baselines).

    For a control cell ``x`` in context ``c`` under perturbation encoding ``e`` (dose-scaled multi-hot over
    single perturbations) the prediction is ``clamp(x + shift(e, c), min=0)`` with

    * ``control``: ``shift = 0``;
    * ``mean``: the mean shift of all perturbed training cells (when ``e`` is not all zero);
    * ``additive``: ``sum_a e_a * atom_shift[c, a]``: per-unit-dose shifts of the singles, measured in the
      same context when seen there, else averaged over the contexts where they were seen;
    * ``linear``: ``b + G W (e P)^T`` (Ahlmann-Eltze 2025), ``G`` gene embedding, ``P`` perturbation embedding;
    * ``interaction``: a single's shift as ``additive``; a combination of the singles' shifts ``d_a = e_a *
      atom_shift[c, a]`` (two or more active) gets ``c1 * sum_a d_a + sum_{a<b} [c3 * d_a * d_b + c4 *
      median(d_a, d_b, 0)]`` per gene, with ``(c1, c3, c4) = gi_coef`` shared by all pairs and genes
      (:func:`fit_interaction`); ``median(x, y, 0)`` is ``sign * min(|x|, |y|)`` when both move the gene the
      same way and 0 otherwise (saturation, or synergy when ``c4 > 0``). ``gi_coef = (1, 0, 0)`` is ``additive``.

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
        self.register_buffer("gi_coef", torch.tensor([1.0, 0.0, 0.0]))

    def pair_features(
        self, encoding: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The additive shift and the ``interaction`` baseline's pair features, each ``(n_cells, n_genes)``.

        Returns ``(s, product, saturation, multi)``: ``s = sum_a d_a`` (the additive shift), ``product = sum_{a<b}
        d_a * d_b``, ``saturation = sum_{a<b} median(d_a, d_b, 0)`` with ``d_a = e_a * atom_shift[c, a]``, and
        ``multi`` (``(n_cells, 1)``) 1 where two or more singles are active. Only each row's active singles are
        gathered (at most as many as the largest combination in the batch), never cells x singles x genes.
        """
        ctx = torch.where(context < 0, torch.full_like(context, self.atom_shift.shape[0] - 1), context)
        n_active = (encoding != 0).sum(1)
        k = max(int(n_active.max()) if encoding.shape[0] else 0, 1)
        _, idx = encoding.abs().topk(min(k, encoding.shape[1]), dim=1)  # padded slots: value 0
        dose = torch.gather(encoding, 1, idx)  # signed doses of the active singles
        d = dose[:, :, None] * self.atom_shift[ctx[:, None], idx]  # (n, k, genes)
        s = d.sum(1)
        product = torch.zeros_like(s)
        saturation = torch.zeros_like(s)
        for i in range(d.shape[1]):
            for j in range(i + 1, d.shape[1]):
                x, y = d[:, i], d[:, j]
                product += x * y
                saturation += torch.clamp(
                    x, torch.minimum(y, torch.zeros_like(y)), torch.maximum(y, torch.zeros_like(y))
                )
        multi = (n_active >= 2).to(s.dtype)[:, None]
        return s, product, saturation, multi

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
        if self.method == "interaction":
            s, product, saturation, multi = self.pair_features(encoding, context)
            c1, c3, c4 = self.gi_coef.to(s.dtype)
            return s + multi * ((c1 - 1.0) * s + c3 * product + c4 * saturation)
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


def fit_interaction(
    xtx: np.ndarray,
    xty: np.ndarray,
    yty: np.ndarray,
    *,
    ridge: float | None = None,
    grid: Sequence[float] | None = None,
) -> tuple[np.ndarray, float, dict[float, float]]:
    """Ridge fit of the ``interaction`` baseline's coefficients from per-double sufficient statistics.

    The target of each training double ``g`` is its residual from additivity, ``r = y - s`` over genes (``y``: its
    observed mean shift, ``s``: the sum of its singles' shifts), regressed on the features ``X = [s, product,
    saturation]`` (:meth:`BaselineModule.pair_features`) with one coefficient vector ``beta`` shared by all doubles and
    genes: ``beta = argmin sum_g |r_g - X_g beta|^2 + lambda * sum_j beta_j^2 * sum_g |X_g[:, j]|^2``, i.e. a ridge
    penalty relative to each feature's scale, shrinking towards the additive model (``beta = 0``). The coefficients of
    :class:`BaselineModule` are ``gi_coef = (1 + beta_0, beta_1, beta_2)``.

    Parameters
    ----------
    xtx, xty, yty
        Per double: ``X_g^T X_g`` (``(n_doubles, 3, 3)``), ``X_g^T r_g`` (``(n_doubles, 3)``) and ``r_g^T r_g``
        (``(n_doubles,)``). A "double" is the unit left out in cross-validation (one condition, all its contexts).
    ridge
        ``lambda``, fixed; ``None`` chooses it from ``grid`` by leave-one-double-out cross-validation (needs at least
        two doubles); ``inf`` gives ``beta = 0`` (additive).
    grid
        Candidate ``lambda`` values (default :data:`INTERACTION_RIDGE_GRID`, which includes ``inf``).

    Returns
    -------
    ``(beta, lambda, cv)``: the coefficients fitted on all doubles, the ridge used, and the leave-one-double-out
    squared error per candidate (empty for a fixed ridge).
    """
    xtx, xty, yty = np.asarray(xtx, np.float64), np.asarray(xty, np.float64), np.asarray(yty, np.float64)
    n = xtx.shape[0]
    if xtx.shape[1:] != (3, 3) or xty.shape != (n, 3) or yty.shape != (n,):
        msg = f"fit_interaction needs xtx (n, 3, 3), xty (n, 3), yty (n,); got {xtx.shape}, {xty.shape}, {yty.shape}"
        raise ValueError(msg)
    if n == 0:
        msg = "fit_interaction needs at least one training double"
        raise ValueError(msg)
    if ridge is not None and not ridge >= 0:
        msg = f"ridge must be >= 0 (or None to choose it by cross-validation), got {ridge}"
        raise ValueError(msg)

    def solve(a: np.ndarray, b: np.ndarray, lam: float) -> np.ndarray:
        if np.isinf(lam):
            return np.zeros(3)
        scale = np.diag(a).copy()
        jitter = 1e-10 * max(float(scale.max()), 1e-300)
        return np.linalg.lstsq(a + np.diag(lam * scale + jitter), b, rcond=None)[0]

    A, B = xtx.sum(0), xty.sum(0)
    if ridge is not None:
        return solve(A, B, float(ridge)), float(ridge), {}
    if n < 2:
        msg = "choosing the ridge by leave-one-double-out cross-validation needs at least two training doubles"
        raise ValueError(msg)
    cv: dict[float, float] = {}
    for lam in INTERACTION_RIDGE_GRID if grid is None else grid:
        err = 0.0
        for g in range(n):
            beta = solve(A - xtx[g], B - xty[g], float(lam))
            err += float(yty[g] - 2 * beta @ xty[g] + beta @ xtx[g] @ beta)
        cv[float(lam)] = err
    best = min(cv, key=lambda lam: (cv[lam], -lam))  # ties: the stronger ridge (closer to additive)
    return solve(A, B, best), best, cv
