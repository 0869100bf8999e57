"""Conditional flow matching (pure torch/numpy/scipy): a vector field from control to perturbed cells.

Cells live in a standardised PCA space (buffers ``pca_components``, ``pca_mean``, ``scale``: ``z = (x - mean) @ C.T /
scale``). A vector field ``v(z, t | c)`` (an MLP on ``[z, sinusoidal(t), c]``) is trained on pairs ``(z0, z1)`` of a
control cell and a perturbed cell of the same context, coupled by optimal transport (:func:`ot_pairs`): on the
straight path ``z_t = (1 - t) z0 + t z1`` (plus optional noise ``sigma``) it regresses the displacement
``u = z1 - z0``. The condition ``c`` is the perturbation encoder's vector (one-hot, table or gene graph operators with
dose responses; a combination is the sum of its singles) plus learned covariate embeddings, and optionally a scalar
time covariate. A prediction integrates ``dz/dt = v(z, t | c)`` from ``t = 0`` to ``1`` (:meth:`transport`).

With ``n_proteins > 0`` (RNA + protein) the space is a joint PCA of ``[x, w p]`` (RNA log1p(CP10k) ``x``, proteins
``p`` in log1p(counts per 1e4 of the protein library), block weight buffer ``protein_scale`` = ``w``): the components
span genes and proteins, and a cell without protein measurement (a non-finite ``p`` row) gets its coordinates from its
RNA alone through the buffer ``rna_projection`` (``z = (x - mean_rna) @ rna_projection.T``, see
:meth:`FlowMatchingModule.set_space`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vcell._constants import REGISTRY_KEYS

from ._base import VCellModule
from ._causal_vae import EXTRA_NODES_KEY, LossOutput
from ._perturbation_encoders import (
    DoseResponse,
    GeneGraphOperators,
    OneHotOperators,
    PerturbationEncoder,
    TableOperators,
)

SOLVERS = ("euler", "midpoint")
#: default integrator of predictions: 5 midpoint steps (10 field evaluations per cell). On Kang 2018 transfer and a
#: simulated screen its predictions were within 1.6% and 1.2% (RMS over cells and genes, relative to the predicted
#: change; 2.4% and 2.2% at most) of 100 midpoint steps, the scores unchanged (benchmarks/flow_matching_solvers.py)
DEFAULT_STEPS = 5
DEFAULT_SOLVER = "midpoint"
#: batch keys: source (control) and target (perturbed) coordinates, flow time, time covariate
SOURCE_KEY = "x0"
TARGET_KEY = "x1"
FLOW_TIME_KEY = "t"
TIME_COVARIATE_KEY = "time"


# ---------------------------------------------------------------------------------------------- couplings
def _sq_dists(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    x0, x1 = np.asarray(x0, dtype=np.float64), np.asarray(x1, dtype=np.float64)
    d = (x0**2).sum(1)[:, None] + (x1**2).sum(1)[None, :] - 2.0 * x0 @ x1.T
    return np.maximum(d, 0.0)


def sinkhorn_plan(cost: np.ndarray, *, epsilon: float = 0.05, max_iter: int = 500, tol: float = 1e-4) -> np.ndarray:
    """Entropic optimal-transport plan between uniform marginals (Sinkhorn).

    The iterations scale the kernel ``K = exp(-cost / eps)`` in float64 (two matrix-vector products per iteration);
    when ``K`` or the scalings leave float64's range (a regularisation small against the spread of the costs), the
    same iterations run in the log domain (in torch, float32). Both are the same updates of the same potentials
    (``f = log a - logsumexp(-cost / eps + g)``): their plans agree to float32 rounding, the scaling one about 10x
    faster (a 850 x 850 plan of FlowMatching's coupling on PCA coordinates: 10 ms instead of 100 ms).

    Parameters
    ----------
    cost
        ``(n, m)`` cost matrix.
    epsilon
        Entropic regularisation relative to the mean cost (the absolute one is ``epsilon * cost.mean()``).
    max_iter
        Maximum number of iterations (each updates both potentials).
    tol
        Stop when the row marginals are off by less than ``tol`` in L1 (relative to their total 1).

    Returns
    -------
    ``(n, m)`` plan (float64) with row sums ``1/n`` and column sums ``1/m``.

    Examples
    --------
    >>> import numpy as np
    >>> P = sinkhorn_plan(np.array([[0.0, 1.0], [1.0, 0.0]]), epsilon=0.01)
    >>> np.round(P, 3)
    array([[0.5, 0. ],
           [0. , 0.5]])
    """
    C = np.asarray(cost, dtype=np.float64)
    if C.ndim != 2 or not C.size or not np.isfinite(C).all():
        msg = f"cost must be a finite, non-empty 2-D matrix, got shape {C.shape}"
        raise ValueError(msg)
    if not epsilon > 0:
        msg = f"epsilon must be > 0, got {epsilon!r}"
        raise ValueError(msg)
    eps = float(epsilon) * max(float(C.mean()), 1e-12)
    plan = _sinkhorn_scaling(C, eps, int(max_iter), float(tol))
    return plan if plan is not None else _sinkhorn_log(C, eps, int(max_iter), float(tol))


def _sinkhorn_scaling(C: np.ndarray, eps: float, max_iter: int, tol: float) -> np.ndarray | None:
    """Sinkhorn by kernel scaling in float64; ``None`` when a value leaves float64's range (then use the log domain)."""
    n, m = C.shape
    a, b = 1.0 / n, 1.0 / m
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        K = np.exp(-C / eps)
        if not (K.sum(axis=1).min() > 1e-280 and K.sum(axis=0).min() > 1e-280):
            return None  # a row or column underflows: its scaling would overflow
        v = np.ones(m)
        for it in range(max_iter):
            u = a / (K @ v)
            v = b / (K.T @ u)
            if it % 5 == 4:  # columns are exact after the v update; check the rows every 5 iterations
                rows = u * (K @ v)
                if not np.isfinite(rows).all():
                    return None
                if float(np.abs(rows - a).sum()) < tol:
                    break
        plan = u[:, None] * K * v[None, :]
    return plan if np.isfinite(plan).all() else None


def _sinkhorn_log(C: np.ndarray, eps: float, max_iter: int, tol: float) -> np.ndarray:
    """Sinkhorn in the log domain (torch, float32): stable for any regularisation."""
    n, m = C.shape
    K = torch.as_tensor(-C / eps).to(torch.float32)
    log_a, log_b = -math.log(n), -math.log(m)
    f = torch.zeros(n, dtype=torch.float32)
    g = torch.zeros(m, dtype=torch.float32)
    for it in range(max_iter):
        f = log_a - torch.logsumexp(K + g[None, :], dim=1)
        g = log_b - torch.logsumexp(K + f[:, None], dim=0)
        if it % 5 == 4:  # columns are exact after the g update; check the rows every 5 iterations
            rows = torch.exp(torch.logsumexp(K + f[:, None] + g[None, :], dim=1))
            if float((rows - 1.0 / n).abs().sum()) < tol:
                break
    return torch.exp(K.double() + f.double()[:, None] + g.double()[None, :]).numpy()


def ot_pairs(
    x0: np.ndarray,
    x1: np.ndarray,
    *,
    method: str = "auto",
    exact_max: int = 512,
    epsilon: float = 0.05,
    rng: np.random.Generator | None = None,
    uniforms: np.ndarray | None = None,
) -> np.ndarray:
    """Source row coupled with every target row by optimal transport on squared Euclidean cost.

    Parameters
    ----------
    x0
        ``(n, d)`` source points.
    x1
        ``(m, d)`` target points (``m <= n`` for ``"exact"``; equal sizes give a permutation).
    method
        ``"exact"`` (:func:`scipy.optimize.linear_sum_assignment`: the exact solver for equal-size point sets),
        ``"sinkhorn"`` (:func:`sinkhorn_plan`; each target draws its source from its column of the plan) or
        ``"auto"``: exact up to ``exact_max`` points, Sinkhorn above.
    exact_max
        Size threshold of ``"auto"``.
    epsilon
        Sinkhorn regularisation (relative to the mean cost).
    rng
        Generator of the Sinkhorn draws (``None``: seed 0).
    uniforms
        The Sinkhorn draws themselves (``m`` uniforms in ``[0, 1)``, e.g. drawn ahead of the coupling); then ``rng``
        is not used.

    Returns
    -------
    ``(m,)`` integer array: index into ``x0`` of each target's source.

    Examples
    --------
    >>> import numpy as np
    >>> ot_pairs(np.array([[0.0], [10.0], [20.0]]), np.array([[21.0], [1.0], [9.0]]))
    array([2, 0, 1])
    """
    from scipy.optimize import linear_sum_assignment

    if method not in ("auto", "exact", "sinkhorn"):
        msg = f"method must be 'auto', 'exact' or 'sinkhorn', got {method!r}"
        raise ValueError(msg)
    x0, x1 = np.atleast_2d(np.asarray(x0, dtype=np.float64)), np.atleast_2d(np.asarray(x1, dtype=np.float64))
    if x0.shape[1] != x1.shape[1] or not len(x0) or not len(x1):
        msg = f"x0 and x1 must be non-empty with the same number of columns, got {x0.shape} and {x1.shape}"
        raise ValueError(msg)
    if method == "auto":
        method = "exact" if max(len(x0), len(x1)) <= int(exact_max) else "sinkhorn"
    cost = _sq_dists(x0, x1)
    if method == "exact":
        if len(x1) > len(x0):
            msg = f"exact coupling needs at least as many sources as targets, got {len(x0)} < {len(x1)}"
            raise ValueError(msg)
        rows, cols = linear_sum_assignment(cost.T)  # rows: targets, each assigned a distinct source
        out = np.empty(len(x1), dtype=np.int64)
        out[rows] = cols
        return out
    plan = sinkhorn_plan(cost, epsilon=epsilon)
    cum = np.cumsum(plan / np.maximum(plan.sum(0, keepdims=True), 1e-300), axis=0)
    if uniforms is not None:
        u = np.asarray(uniforms, dtype=np.float64)
        if u.shape != (len(x1),):
            msg = f"uniforms must hold one draw per target ({len(x1)}), got shape {u.shape}"
            raise ValueError(msg)
    else:
        u = (np.random.default_rng(0) if rng is None else rng).random(len(x1))
    return np.minimum((cum < u[None, :]).sum(0), len(x0) - 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------- module
def time_embedding(t: torch.Tensor, n_freqs: int, *, max_freq: float = 100.0) -> torch.Tensor:
    """Sinusoidal embedding ``[sin(w_k t), cos(w_k t)]`` of flow times ``t`` ``(n,)``, frequencies ``1..max_freq``."""
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), int(n_freqs), device=t.device, dtype=t.dtype))
    arg = t.reshape(-1, 1) * freqs[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class FlowMatchingModule(VCellModule):
    """Conditional vector field in a standardised PCA space (see the module docstring).

    Parameters
    ----------
    n_genes
        Number of genes.
    n_atoms
        Number of single perturbations the encoder knows (training vocabulary plus extra table rows).
    n_components
        Dimension of the PCA space.
    covariate_sizes
        Number of categories of each categorical covariate (a learned embedding of size ``n_condition`` each).
    n_condition
        Size of the condition vector (perturbation plus covariates).
    n_hidden, n_layers
        Width and number of hidden layers (SiLU) of the vector field MLP.
    n_freqs
        Frequencies of the sinusoidal flow-time embedding.
    time_covariate
        Append a scalar time covariate (``batch['time']``, standardised by buffers ``time_loc``/``time_scale``).
    sigma
        Standard deviation of the noise added to ``z_t`` in training (0: deterministic straight paths).
    perturbation_features, gene_graph, atom_nodes, n_graph_nodes, graph_layers, graph_embed, graph_own_embedding
        Perturbation operators as in :class:`~vcell.module.CausalVAEModule` (table MLP, gene-graph GNN, else one-hot).
    seen_atoms
        Which atoms were seen in training; ``None``: all.
    log_dose_init
        Initial log-EC50 of the dose responses.
    n_proteins
        Number of proteins of a joint RNA + protein space (0: RNA only). The PCA buffers then cover
        ``n_genes + n_proteins`` features, and buffers ``protein_scale`` (the protein block weight ``w``) and
        ``rna_projection`` (``(n_components, n_genes)``, coordinates of cells without proteins) are added.
    """

    def __init__(
        self,
        n_genes: int,
        n_atoms: int,
        n_components: int,
        *,
        covariate_sizes: tuple[int, ...] = (),
        n_condition: int = 64,
        n_hidden: int = 256,
        n_layers: int = 3,
        n_freqs: int = 16,
        time_covariate: bool = False,
        sigma: float = 0.0,
        perturbation_features: np.ndarray | None = None,
        gene_graph: tuple[np.ndarray, ...] | None = None,
        atom_nodes: np.ndarray | None = None,
        n_graph_nodes: int | None = None,
        graph_layers: int = 1,
        graph_embed: int = 64,
        graph_own_embedding: bool = True,
        seen_atoms: np.ndarray | None = None,
        log_dose_init: float = 0.0,
        n_proteins: int = 0,
    ) -> None:
        super().__init__()
        if min(int(n_genes), int(n_components), int(n_condition), int(n_hidden), int(n_layers), int(n_freqs)) < 1:
            msg = "n_genes, n_components, n_condition, n_hidden, n_layers and n_freqs must be positive integers"
            raise ValueError(msg)
        if not (np.isfinite(sigma) and sigma >= 0):
            msg = f"sigma must be a finite number >= 0, got {sigma!r}"
            raise ValueError(msg)
        self.n_genes, self.n_atoms, self.n_components = int(n_genes), int(n_atoms), int(n_components)
        self.n_condition, self.n_freqs = int(n_condition), int(n_freqs)
        self.time_covariate, self.sigma = bool(time_covariate), float(sigma)
        if isinstance(n_proteins, bool) or int(n_proteins) < 0:
            msg = f"n_proteins must be an integer >= 0, got {n_proteins!r}"
            raise ValueError(msg)
        self.n_proteins = int(n_proteins)
        n_features = self.n_genes + self.n_proteins
        self.register_buffer("pca_components", torch.zeros(self.n_components, n_features))
        self.register_buffer("pca_mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(()))
        if self.n_proteins:
            self.register_buffer("protein_scale", torch.ones(()))
            self.register_buffer("rna_projection", torch.zeros(self.n_components, self.n_genes))
        self.register_buffer("time_loc", torch.zeros(()))
        self.register_buffer("time_scale", torch.ones(()))
        if gene_graph is not None:
            if perturbation_features is not None or atom_nodes is None:
                msg = "gene_graph needs atom_nodes and excludes perturbation_features"
                raise ValueError(msg)
            ops = GeneGraphOperators(
                gene_graph,
                atom_nodes,
                dim=self.n_condition,
                n_nodes=n_graph_nodes,
                n_layers=graph_layers,
                n_embed=graph_embed,
                own_embedding=graph_own_embedding,
                n_hidden=n_hidden,
                seen_atoms=seen_atoms,
            )
        elif perturbation_features is not None:
            ops = TableOperators(perturbation_features, self.n_condition, n_hidden=n_hidden)
        else:
            ops = OneHotOperators(self.n_atoms, self.n_condition, seen_atoms=seen_atoms)
        dose = DoseResponse(self.n_atoms, log_dose_init=log_dose_init, seen_atoms=seen_atoms)
        self.perturbation = PerturbationEncoder(ops, dose)  # no interactions: a combination sums its singles
        self.covariates = nn.ModuleList([nn.Embedding(max(int(k), 1), self.n_condition) for k in covariate_sizes])
        n_in = self.n_components + 2 * self.n_freqs + self.n_condition + int(self.time_covariate)
        layers: list[nn.Module] = []
        for i in range(int(n_layers)):
            layers += [nn.Linear(n_in if i == 0 else n_hidden, n_hidden), nn.SiLU()]
        layers.append(nn.Linear(n_hidden, self.n_components))
        self.field = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re-)initialise every parameter with torch's global RNG (seed it first); the PCA buffers stay."""
        ops = self.perturbation.operators
        for m in self.modules():
            if m is not self and m is not ops and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        with torch.no_grad():
            for emb in self.covariates:
                emb.weight.normal_(0.0, 0.1)
            if hasattr(ops, "reset_parameters"):
                ops.reset_parameters()
            self.field[-1].weight.mul_(0.1)  # start near the zero field
            self.field[-1].bias.zero_()

    def set_space(
        self,
        components: np.ndarray,
        mean: np.ndarray,
        scale: float,
        *,
        protein_scale: float | None = None,
        rna_projection: np.ndarray | None = None,
    ) -> None:
        """Set the PCA space: ``components`` ``(n_components, n_features)``, feature ``mean`` and global ``scale``.

        ``n_features`` is ``n_genes`` (RNA only) or ``n_genes + n_proteins``; a joint space also needs the protein
        block weight ``protein_scale`` (``w``: protein features are ``w`` times log1p(counts per 1e4)) and
        ``rna_projection`` ``(n_components, n_genes)``: the map from centred RNA to standardised coordinates used for
        cells without protein measurement.
        """
        n_features = self.n_genes + self.n_proteins
        comps = torch.as_tensor(np.asarray(components, dtype=np.float32))
        if tuple(comps.shape) != (self.n_components, n_features) or len(np.ravel(mean)) != n_features:
            msg = f"components must be ({self.n_components}, {n_features}) and mean ({n_features},)"
            raise ValueError(msg)
        if not (np.isfinite(scale) and scale > 0):
            msg = f"scale must be a finite number > 0, got {scale!r}"
            raise ValueError(msg)
        if self.n_proteins:
            if protein_scale is None or not (np.isfinite(protein_scale) and protein_scale > 0):
                msg = f"a joint RNA + protein space needs protein_scale, a finite number > 0, got {protein_scale!r}"
                raise ValueError(msg)
            proj = None if rna_projection is None else np.asarray(rna_projection, dtype=np.float32)
            if proj is None or proj.shape != (self.n_components, self.n_genes) or not np.isfinite(proj).all():
                shape = None if proj is None else proj.shape
                msg = f"rna_projection must be a finite ({self.n_components}, {self.n_genes}) array, got {shape}"
                raise ValueError(msg)
        with torch.no_grad():
            self.pca_components.copy_(comps)
            self.pca_mean.copy_(torch.as_tensor(np.ravel(mean), dtype=torch.float32))
            self.scale.fill_(float(scale))
            if self.n_proteins:
                self.protein_scale.fill_(float(protein_scale))
                self.rna_projection.copy_(torch.as_tensor(proj))

    # ------------------------------------------------------------------------- space
    def encode(self, x: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised PCA coordinates of log1p(CP10k) expression ``x`` ``(n, n_genes)``.

        A joint space also reads the proteins ``p`` ``(n, n_proteins)`` (log1p(counts per 1e4 of the protein
        library)); rows of ``p`` with a non-finite value, or ``p=None`` (all rows), are cells without protein
        measurement: their coordinates come from ``x`` through ``rna_projection``.
        """
        if not self.n_proteins:
            return (x - self.pca_mean) @ self.pca_components.T / self.scale
        z_rna = (x - self.pca_mean[: self.n_genes]) @ self.rna_projection.T
        if p is None:
            return z_rna
        measured = torch.isfinite(p).all(dim=1, keepdim=True)
        f = torch.cat([x, torch.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0) * self.protein_scale], dim=1)
        z = (f - self.pca_mean) @ self.pca_components.T / self.scale
        return torch.where(measured, z, z_rna)

    def _rna_components(self) -> torch.Tensor:
        return self.pca_components[:, : self.n_genes] if self.n_proteins else self.pca_components

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Expression (log1p(CP10k), unclipped) of standardised PCA coordinates ``z``."""
        return z * self.scale @ self._rna_components() + self.pca_mean[: self.n_genes]

    def decode_delta(self, dz: torch.Tensor) -> torch.Tensor:
        """Change in expression of a displacement ``dz`` in the standardised PCA space."""
        return dz * self.scale @ self._rna_components()

    def decode_onto(self, x: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
        """``x + decode_delta(dz)`` as one fused product (:func:`torch.addmm`: no intermediate ``(n, n_genes)`` array)."""
        return torch.addmm(x, dz * self.scale, self._rna_components())

    def _check_proteins(self) -> None:
        if not self.n_proteins:
            msg = "this FlowMatchingModule has no proteins (n_proteins=0)"
            raise ValueError(msg)

    def decode_protein(self, z: torch.Tensor) -> torch.Tensor:
        """Proteins (log1p(counts per 1e4 of the protein library), unclipped) of coordinates ``z`` (joint space)."""
        self._check_proteins()
        G = self.n_genes
        return (z * self.scale @ self.pca_components[:, G:] + self.pca_mean[G:]) / self.protein_scale

    def decode_protein_delta(self, dz: torch.Tensor) -> torch.Tensor:
        """Change in proteins (log1p(counts per 1e4)) of a displacement ``dz`` (joint space)."""
        self._check_proteins()
        return dz * self.scale @ self.pca_components[:, self.n_genes :] / self.protein_scale

    # ------------------------------------------------------------------------- field
    def condition(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Condition vector ``(n, n_condition [+ 1])``: perturbation encoding + covariate embeddings [, time]."""
        enc = batch[REGISTRY_KEYS.PERT_ENCODING_KEY]
        c = self.perturbation(enc, batch.get(EXTRA_NODES_KEY))
        if self.covariates:
            cov = batch[REGISTRY_KEYS.COVARIATES_KEY]
            c = c + sum(emb(cov[:, k]) for k, emb in enumerate(self.covariates))
        if self.time_covariate:
            time = batch[TIME_COVARIATE_KEY].reshape(-1, 1).to(c.dtype)
            c = torch.cat([c, (time - self.time_loc) / self.time_scale], dim=1)
        return c

    def velocity(self, z: torch.Tensor, t: torch.Tensor | float, c: torch.Tensor) -> torch.Tensor:
        """``v(z, t | c)``; ``t`` a scalar or ``(n,)``."""
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(z.shape[0])
        return self.field(torch.cat([z, time_embedding(t, self.n_freqs), c], dim=1))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Predicted velocity ``v`` at ``z_t`` and the target displacement ``u`` of each pair in ``batch``.

        ``batch``: ``SOURCE_KEY``/``TARGET_KEY`` coordinates, the target's perturbation encoding and covariates
        (and time covariate), optionally fixed flow times ``FLOW_TIME_KEY`` (else ``t ~ U(0, 1)``).
        """
        z0, z1 = batch[SOURCE_KEY], batch[TARGET_KEY]
        t = batch.get(FLOW_TIME_KEY)
        t = torch.rand(z0.shape[0], device=z0.device, dtype=z0.dtype) if t is None else t.reshape(-1).to(z0.dtype)
        zt = (1.0 - t[:, None]) * z0 + t[:, None] * z1
        if self.sigma > 0 and self.training:
            zt = zt + self.sigma * torch.randn_like(zt)
        return {"v": self.velocity(zt, t, self.condition(batch)), "u": z1 - z0}

    def loss(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> LossOutput:
        """Flow-matching loss: mean squared error between ``v`` and ``u`` (mean over pairs and dimensions)."""
        mse = F.mse_loss(out["v"], out["u"])
        return LossOutput(loss=mse, terms={"flow_mse": mse.detach()})

    # ------------------------------------------------------------------------- prediction
    def condition_bias(self, c: torch.Tensor) -> torch.Tensor:
        """The condition's part of the field's first layer: ``c @ W_c.T + b`` ``(n, n_hidden)``.

        The first layer is linear in ``[z, sinusoidal(t), c]``: its pre-activation is ``z @ W_z.T + e(t) @ W_t.T + c
        @ W_c.T + b``. A prediction computes the condition's part once per cell (not once per solver step) and the
        flow time's once per step (not once per cell): see :meth:`flow`.
        """
        lin = self.field[0]
        return F.linear(c, lin.weight[:, self.n_components + 2 * self.n_freqs :], lin.bias)

    def time_bias(self, t: torch.Tensor) -> torch.Tensor:
        """The flow time's part of the field's first layer, ``e(t) @ W_t.T`` ``(len(t), n_hidden)``, for times ``t``."""
        d = self.n_components
        return time_embedding(t.reshape(-1), self.n_freqs) @ self.field[0].weight[:, d : d + 2 * self.n_freqs].T

    def _field_from_bias(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``v(z, t | c)`` from the first layer's condition and time parts ``a`` ``(n, n_hidden)``, overwritten.

        Equal to :meth:`velocity` up to float rounding (the same sums, in another order), without building
        ``[z, sinusoidal(t), c]`` per cell; the hidden activations are computed in place.
        """
        a = a.addmm_(z, self.field[0].weight[:, : self.n_components].T)
        for layer in self.field[1:]:
            a = F.silu(a, inplace=True) if isinstance(layer, nn.SiLU) else layer(a)
        return a

    @torch.no_grad()
    def flow(
        self,
        z0: torch.Tensor,
        h: torch.Tensor,
        *,
        n_steps: int = DEFAULT_STEPS,
        solver: str = DEFAULT_SOLVER,
        path: bool = False,
    ) -> torch.Tensor:
        """:meth:`transport` of cells ``z0`` whose condition enters as ``h = condition_bias(c)`` ``(n, n_hidden)``.

        The time part of the first layer is computed once per solver time for all cells; many conditions (e.g. the
        same control cells under many perturbations) integrate in one call by stacking their rows.
        """
        n_steps, dt = _check_solver(solver, n_steps)
        k = 2 if solver == "midpoint" else 1
        times = [(i * dt + j * 0.5 * dt) for i in range(n_steps) for j in range(k)]
        tb = self.time_bias(torch.tensor(times, dtype=z0.dtype, device=z0.device))
        bias = dict(zip(times, tb, strict=True))

        def velocity(z: torch.Tensor, t: float) -> torch.Tensor:
            return self._field_from_bias(z, h + bias[t])

        return integrate(velocity, z0, n_steps=n_steps, solver=solver, path=path)

    @torch.no_grad()
    def transport(
        self,
        z0: torch.Tensor,
        c: torch.Tensor,
        *,
        n_steps: int = DEFAULT_STEPS,
        solver: str = DEFAULT_SOLVER,
        path: bool = False,
    ) -> torch.Tensor:
        """Integrate ``dz/dt = v(z, t | c)`` from ``t = 0`` to ``1`` with ``n_steps`` fixed steps.

        Returns the endpoints ``(n, n_components)``, or with ``path=True`` the states at every step
        ``(n_steps + 1, n, n_components)``. Computed by :meth:`flow` (the condition's part of the first layer once,
        the time's once per step).
        """
        _check_solver(solver, n_steps)
        return self.flow(z0, self.condition_bias(c), n_steps=n_steps, solver=solver, path=path)


def _check_solver(solver: str, n_steps: int) -> tuple[int, float]:
    """``(n_steps, 1 / n_steps)``; ValueError for an unknown solver or a bad number of steps."""
    if solver not in SOLVERS:
        msg = f"solver must be one of {SOLVERS}, got {solver!r}"
        raise ValueError(msg)
    if isinstance(n_steps, bool) or int(n_steps) < 1 or int(n_steps) != n_steps:
        msg = f"n_steps must be a positive integer, got {n_steps!r}"
        raise ValueError(msg)
    return int(n_steps), 1.0 / int(n_steps)


def integrate(
    velocity: Callable[[torch.Tensor, float], torch.Tensor],
    z0: torch.Tensor,
    *,
    n_steps: int = DEFAULT_STEPS,
    solver: str = DEFAULT_SOLVER,
    path: bool = False,
) -> torch.Tensor:
    """Integrate ``dz/dt = velocity(z, t)`` (``t`` a float) from ``t = 0`` to ``1`` in ``n_steps`` fixed steps.

    ``solver``: ``"euler"`` or ``"midpoint"`` (evaluating ``velocity`` at ``t = k / n_steps`` and, for the midpoint,
    ``(k + 1/2) / n_steps``). Returns the endpoints, or with ``path=True`` the states at every step
    ``(n_steps + 1, *z0.shape)``.
    """
    n_steps, dt = _check_solver(solver, n_steps)
    z = z0
    states = [z]
    for k in range(n_steps):
        t = k * dt
        if solver == "euler":
            z = z + dt * velocity(z, t)
        else:
            z_mid = z + 0.5 * dt * velocity(z, t)
            z = z + dt * velocity(z_mid, t + 0.5 * dt)
        if path:
            states.append(z)
    return torch.stack(states) if path else z
