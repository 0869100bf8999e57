"""Biology-structured pieces: a gene-program (pathway) decoder and a TF->target sign-consistency penalty."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def _gene_index(genes: Sequence[str] | np.ndarray) -> dict[str, int]:
    g = [str(x) for x in np.asarray(genes).ravel()]
    index = {name: i for i, name in enumerate(g)}
    if len(index) != len(g):
        dup = sorted({x for x in g if g.count(x) > 1})[:5]
        msg = f"genes must be unique; duplicated: {dup}"
        raise ValueError(msg)
    return index


def _check_lengths(**arrays: np.ndarray) -> None:
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) > 1:
        msg = f"{', '.join(sizes)} must have the same length, got {sizes}"
        raise ValueError(msg)


def gene_programs(
    source: Sequence[str] | np.ndarray,
    target: Sequence[str] | np.ndarray,
    genes: Sequence[str] | np.ndarray,
    *,
    weight: Sequence[float] | np.ndarray | None = None,
    min_genes: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """Program matrix of a network (PROGENy footprints, Hallmark sets, ...) over a model's genes.

    Parameters
    ----------
    source, target
        Program (pathway / gene set) and gene of each edge, e.g. ``net["source"]``, ``net["target"]``.
    genes
        The model's genes (columns of the result); edges to other genes are dropped.
    weight
        Edge weights (footprint weights); ``None``: membership 1.
    min_genes
        Programs with fewer genes among ``genes`` are dropped.

    Returns
    -------
    ``(names, programs)``: sorted program names and their ``(n_programs, n_genes)`` weights (0 = not in the
    program), ready for :class:`PathwayDecoder`. Repeated edges add up.
    """
    src, tgt = np.asarray(source, dtype=str).ravel(), np.asarray(target, dtype=str).ravel()
    w = np.ones(len(src)) if weight is None else np.asarray(weight, dtype=np.float64).ravel()
    _check_lengths(source=src, target=tgt, weight=w)
    index = _gene_index(genes)
    keep = np.array([t in index for t in tgt], dtype=bool) & (w != 0)
    names, rows = np.unique(src[keep], return_inverse=True)
    programs = np.zeros((len(names), len(index)))
    np.add.at(programs, (rows, [index[t] for t in tgt[keep]]), w[keep])
    big = (programs != 0).sum(1) >= min_genes
    if not big.any():
        msg = f"no program has at least min_genes={min_genes} genes among the {len(index)} genes"
        raise ValueError(msg)
    return names[big], programs[big]


class PathwayDecoder(nn.Module):
    """Decoder whose first latent factors are tied to gene programs (a masked linear layer).

    Output ``h = z[:, :P] @ (W * M).T + f(z[:, P:]) + b``: the ``P = programs.shape[0]`` program factors load only
    on the genes of their program (mask ``M = programs != 0``, fixed), the remaining ``n_free = n_latent - P``
    factors go through ``f``, a linear layer (``n_hidden=0``) or an MLP, onto all genes. ``h`` has
    ``n_out_per_gene * n_genes`` columns in gene blocks, what ``CausalVAEModule.decode`` takes from its decoder:
    pre-softmax gene logits for NB (1 block), logits then dropout logits for ZINB (2 blocks, each masked the same
    way), or the mean for Gaussian (1 block). A program factor changes only its genes' outputs; under NB the
    softmax then rescales all genes' shares by one common factor.

    Parameters
    ----------
    n_latent
        Size of the latent input (at least the number of programs).
    n_genes
        Number of genes.
    programs
        ``(n_programs, n_genes)`` membership or weights (e.g. from :func:`gene_programs`); non-zero = allowed.
    n_out_per_gene
        Output blocks: 1 (NB, Gaussian) or 2 (ZINB).
    n_hidden, n_layers, dropout
        Nonlinear free part: ``n_layers`` hidden layers of ``n_hidden`` units (Linear, LayerNorm, ReLU, Dropout);
        ``n_hidden=0`` makes it linear. Unused when ``n_free = 0``.
    init
        ``"random"``: program loadings uniform in ``+-1/sqrt(n_latent)`` on the mask; ``"programs"``: the program
        weights scaled so each program's largest loading is ``1/sqrt(n_latent)`` (factor k starts as footprint k).
    """

    def __init__(
        self,
        n_latent: int,
        n_genes: int,
        programs: np.ndarray,
        *,
        n_out_per_gene: int = 1,
        n_hidden: int = 0,
        n_layers: int = 1,
        dropout: float = 0.0,
        init: str = "random",
    ) -> None:
        super().__init__()
        prog = np.asarray(programs, dtype=np.float64)
        if prog.ndim != 2 or prog.shape[1] != n_genes:
            msg = f"programs must have shape (n_programs, n_genes={n_genes}), got {prog.shape}"
            raise ValueError(msg)
        if not np.isfinite(prog).all():
            msg = "programs holds non-finite values"
            raise ValueError(msg)
        empty = np.flatnonzero((prog != 0).sum(1) == 0)
        if empty.size:
            msg = f"program row(s) {empty[:5].tolist()} have no gene among the {n_genes} genes; drop them"
            raise ValueError(msg)
        if prog.shape[0] > n_latent:
            msg = f"{prog.shape[0]} programs need n_latent >= {prog.shape[0]}, got n_latent={n_latent}"
            raise ValueError(msg)
        if n_out_per_gene not in (1, 2):
            msg = f"n_out_per_gene must be 1 (NB, Gaussian) or 2 (ZINB), got {n_out_per_gene}"
            raise ValueError(msg)
        if init not in ("random", "programs"):
            msg = f"init must be 'random' or 'programs', got {init!r}"
            raise ValueError(msg)
        self.n_latent, self.n_genes, self.n_programs = int(n_latent), int(n_genes), int(prog.shape[0])
        self.n_free, self.n_out_per_gene, self.init = self.n_latent - self.n_programs, int(n_out_per_gene), init
        n_out = self.n_out_per_gene * self.n_genes
        tiled = np.tile(prog.T, (self.n_out_per_gene, 1))  # (n_out, n_programs)
        self.register_buffer("mask", torch.as_tensor(tiled != 0, dtype=torch.float32))
        self.register_buffer("prior", torch.as_tensor(tiled, dtype=torch.float32))
        self.program_weight = nn.Parameter(torch.zeros(n_out, self.n_programs))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.free: nn.Module | None = None
        if self.n_free > 0:
            layers: list[nn.Module] = []
            n_in = self.n_free
            for _ in range(n_layers if n_hidden > 0 else 0):
                layers += [nn.Linear(n_in, n_hidden), nn.LayerNorm(n_hidden), nn.ReLU()]
                layers += [nn.Dropout(dropout)] if dropout > 0 else []
                n_in = n_hidden
            self.free = nn.Sequential(*layers, nn.Linear(n_in, n_out, bias=False))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the program loadings (zero off the mask) and the bias; the free part resets itself."""
        bound = 1.0 / math.sqrt(self.n_latent)
        with torch.no_grad():
            if self.init == "programs":
                scale = self.prior.abs().amax(0, keepdim=True).clamp(min=1e-12)
                self.program_weight.copy_(self.prior / scale * bound)
            else:
                self.program_weight.uniform_(-bound, bound).mul_(self.mask)
            self.bias.zero_()

    @property
    def loadings(self) -> torch.Tensor:
        """Effective program loadings ``W * M``, shape ``(n_out_per_gene * n_genes, n_programs)``."""
        return self.program_weight * self.mask

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output ``(n_cells, n_out_per_gene * n_genes)`` from the latent ``z`` ``(n_cells, n_latent)``."""
        if z.shape[-1] != self.n_latent:
            msg = f"z has {z.shape[-1]} latent dimensions, expected {self.n_latent}"
            raise ValueError(msg)
        h = z[:, : self.n_programs] @ self.loadings.T + self.bias
        if self.free is not None:
            h = h + self.free(z[:, self.n_programs :])
        return h


def regulatory_edges(
    net_source: Sequence[str] | np.ndarray,
    net_target: Sequence[str] | np.ndarray,
    net_weight: Sequence[float] | np.ndarray,
    genes: Sequence[str] | np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed TF->target edges of a network (e.g. CollecTRI) as gene indices.

    Edges whose TF or target is not in ``genes``, with weight 0, or from a TF to itself are dropped; a repeated
    edge is kept once when its signs agree and dropped when they conflict.

    Returns
    -------
    ``(tf_idx, target_idx, sign)``: int64 indices into ``genes`` and float ``+1`` (activation) / ``-1``
    (repression), sorted by ``(tf_idx, target_idx)``, for :func:`regulatory_penalty`.
    """
    src, tgt = np.asarray(net_source, dtype=str).ravel(), np.asarray(net_target, dtype=str).ravel()
    w = np.asarray(net_weight, dtype=np.float64).ravel()
    _check_lengths(net_source=src, net_target=tgt, net_weight=w)
    index = _gene_index(genes)
    i = np.array([index.get(s, -1) for s in src], dtype=np.int64)
    j = np.array([index.get(t, -1) for t in tgt], dtype=np.int64)
    keep = (i >= 0) & (j >= 0) & (i != j) & (w != 0) & np.isfinite(w)
    key = i[keep] * len(index) + j[keep]
    uniq, inv = np.unique(key, return_inverse=True)
    total = np.bincount(inv, weights=np.sign(w[keep]), minlength=len(uniq))
    count = np.bincount(inv, minlength=len(uniq))
    agree = np.abs(total) == count
    uniq = uniq[agree]
    return uniq // len(index), uniq % len(index), np.sign(total[agree])


def regulatory_penalty(
    delta: torch.Tensor,
    tf_idx: torch.Tensor | np.ndarray,
    target_idx: torch.Tensor | np.ndarray,
    sign: torch.Tensor | np.ndarray,
    *,
    margin: float = 0.0,
) -> torch.Tensor:
    """Mean hinge penalty on predicted changes that contradict TF->target signs.

    For each edge ``e`` (TF ``i``, target ``j``, sign ``s``) and each row: ``relu(margin - s * delta_i * delta_j)``,
    averaged over rows and edges. With ``margin=0`` (recommended) the penalty is exactly 0 for consistent pairs
    and for pairs where either gene does not change, so it never invents changes; it only shrinks co-changes of
    the wrong sign: the gradient of an inconsistent edge moves ``delta_i`` towards ``sign(s * delta_j)`` and
    ``delta_j`` towards ``sign(s * delta_i)``. A smooth version (softplus) would push every one of the tens of
    thousands of edges towards co-regulation, and a positive ``margin`` likewise asks each edge for a change of at
    least ``margin``: use it only with few, trusted edges. The TF's mRNA change stands in for its activity (e.g.
    its CRISPRi knock-down), so this is a soft prior; the penalty is quadratic in the size of the changes.

    Parameters
    ----------
    delta
        Predicted change vs control, ``(n_cells or n_perturbations, n_genes)`` (or one ``(n_genes,)`` vector),
        e.g. in log1p(CP10k).
    tf_idx, target_idx, sign
        Edges from :func:`regulatory_edges` (indices must lie in ``[0, n_genes)``).
    margin
        Required signed co-change of every edge (0: only contradictions are penalised).

    Returns
    -------
    A scalar tensor (0, still attached to the graph of ``delta``, when there are no edges).
    """
    if delta.ndim == 1:
        delta = delta[None]
    if delta.ndim != 2:
        msg = f"delta must be (n, n_genes) or (n_genes,), got shape {tuple(delta.shape)}"
        raise ValueError(msg)
    _check_lengths(tf_idx=tf_idx, target_idx=target_idx, sign=sign)
    for name, idx in (("tf_idx", tf_idx), ("target_idx", target_idx)):
        if not isinstance(idx, torch.Tensor) and len(idx) and not 0 <= np.min(idx) <= np.max(idx) < delta.shape[1]:
            msg = f"{name} holds indices outside [0, {delta.shape[1]})"
            raise ValueError(msg)
    if len(tf_idx) == 0:
        return delta.sum() * 0.0
    i = torch.as_tensor(tf_idx, dtype=torch.long, device=delta.device)
    j = torch.as_tensor(target_idx, dtype=torch.long, device=delta.device)
    s = torch.as_tensor(sign, dtype=delta.dtype, device=delta.device)
    return torch.relu(margin - s * delta[:, i] * delta[:, j]).mean()
