"""Perturbation encoders (pure torch): atom operators, dose-response curves and pairwise interactions.

A batch carries a dose-scaled multi-hot encoding ``enc`` of shape ``(n_cells, n_atoms)`` (0: inactive; otherwise the
dose, 1.0 without doses). :class:`PerturbationEncoder` maps it to ``s @ operators() + interactions(s)``, where
``s = DoseResponse(enc)`` and ``operators()`` returns the ``(n_atoms, dim)`` atom vectors at full effect from
:class:`OneHotOperators`, :class:`TableOperators` (MLP of a fixed embedding table) or :class:`GeneGraphOperators`
(a small GNN over a gene graph, so that an atom unseen in training gets a vector from its graph neighbours).

Each module's ``reset_parameters`` re-initialises only its own direct parameters (torch's convention; sub-modules
such as ``nn.Linear`` have their own), so ``for m in module.modules(): m.reset_parameters()`` re-initialises all.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def mlp(n_in: int, n_hidden: int, n_out: int, *, n_layers: int = 1) -> nn.Sequential:
    """``n_layers`` hidden layers (Linear, LayerNorm, ReLU) then a Linear output layer (as ``_causal_vae.mlp``)."""
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [nn.Linear(n_in if i == 0 else n_hidden, n_hidden), nn.LayerNorm(n_hidden), nn.ReLU()]
    layers.append(nn.Linear(n_hidden if n_layers else n_in, n_out))
    return nn.Sequential(*layers)


def _seen_mask(seen_atoms: np.ndarray | None, n_atoms: int) -> torch.Tensor:
    if seen_atoms is None:
        return torch.ones(n_atoms, dtype=torch.bool)
    seen = torch.as_tensor(np.asarray(seen_atoms)).bool().reshape(-1)
    if len(seen) != n_atoms:
        msg = f"seen_atoms must have one entry per atom ({n_atoms}), got {len(seen)}"
        raise ValueError(msg)
    return seen


class AtomOperators(nn.Module):
    """Base of the operator modules: ``forward()`` returns the ``(n_atoms, dim)`` atom vectors at full effect.

    Parameters
    ----------
    n_atoms
        Number of atoms (single perturbations).
    dim
        Size of each atom's vector (the latent size of the model using it).
    seen_atoms
        Boolean ``(n_atoms,)``: which atoms were seen in training (buffer ``seen_atoms``); ``None``: all.
    """

    def __init__(self, n_atoms: int, dim: int, *, seen_atoms: np.ndarray | None = None) -> None:
        super().__init__()
        if int(n_atoms) < 0 or int(dim) < 1:
            msg = f"n_atoms must be >= 0 and dim >= 1, got n_atoms={n_atoms}, dim={dim}"
            raise ValueError(msg)
        self.n_atoms, self.dim = int(n_atoms), int(dim)
        self.register_buffer("seen_atoms", _seen_mask(seen_atoms, self.n_atoms))


class OneHotOperators(AtomOperators):
    """One learned vector per atom (parameter ``weight``, ``(n_atoms, dim)``, initialised ``N(0, 0.1)``).

    Atoms marked unseen in ``seen_atoms`` get a zero vector (no information about them); with ``seen_atoms=None``
    ``forward`` returns ``weight`` itself.
    """

    def __init__(self, n_atoms: int, dim: int, *, seen_atoms: np.ndarray | None = None) -> None:
        super().__init__(n_atoms, dim, seen_atoms=seen_atoms)
        self.weight = nn.Parameter(torch.zeros(self.n_atoms, self.dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight ~ N(0, 0.1)`` (torch's global RNG)."""
        with torch.no_grad():
            self.weight.normal_(0.0, 0.1)

    def forward(self) -> torch.Tensor:
        """Atom vectors, ``(n_atoms, dim)``."""
        if bool(self.seen_atoms.all()):
            return self.weight
        return torch.where(self.seen_atoms[:, None], self.weight, torch.zeros_like(self.weight))


class TableOperators(AtomOperators):
    """MLP of a fixed embedding table (gene embeddings, drug fingerprints): every atom with a row gets a vector.

    Parameters
    ----------
    features
        ``(n_atoms, d)`` table (buffer ``features``), one row per atom, including atoms unseen in training.
    dim
        Output size.
    n_hidden
        Hidden width of the MLP (sub-module ``mlp``: Linear, LayerNorm, ReLU, Linear).
    """

    def __init__(self, features: np.ndarray, dim: int, *, n_hidden: int = 256) -> None:
        feats = np.asarray(features, dtype=np.float32)
        if feats.ndim != 2 or not np.isfinite(feats).all():
            msg = f"features must be a finite 2-D (n_atoms, d) array, got shape {feats.shape}"
            raise ValueError(msg)
        super().__init__(feats.shape[0], dim)
        self.register_buffer("features", torch.as_tensor(feats))
        self.mlp = mlp(feats.shape[1], n_hidden, self.dim, n_layers=1)

    def forward(self) -> torch.Tensor:
        """Atom vectors ``MLP(features)``, ``(n_atoms, dim)``."""
        return self.mlp(self.features)


def _undirected_edges(
    edges: tuple[np.ndarray, ...], n_nodes: int | None, atom_nodes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(a, b, w, n_nodes)``: unique undirected edges ``a < b`` (max weight of both directions), no self-loops."""
    if len(edges) not in (2, 3):
        msg = f"edges must be (source, target) or (source, target, weight) arrays, got {len(edges)} arrays"
        raise ValueError(msg)
    src, dst = (np.asarray(e).reshape(-1) for e in edges[:2])
    w = np.ones(len(src)) if len(edges) == 2 else np.asarray(edges[2], dtype=np.float64).reshape(-1)
    if not (len(src) == len(dst) == len(w)) or not all(
        np.issubdtype(x.dtype, np.integer) or not x.size for x in (src, dst)
    ):
        msg = f"edges need integer source/target and weight arrays of one length, got {len(src)}, {len(dst)}, {len(w)}"
        raise ValueError(msg)
    if not np.isfinite(w).all() or (w < 0).any():
        msg = "edge weights must be finite and >= 0"
        raise ValueError(msg)
    src, dst = src.astype(np.int64), dst.astype(np.int64)
    largest = int(max(src.max(initial=-1), dst.max(initial=-1), atom_nodes.max(initial=-1)))
    n_nodes = largest + 1 if n_nodes is None else int(n_nodes)
    if largest >= n_nodes or (len(src) and min(src.min(), dst.min()) < 0):
        msg = f"edge and atom node indices must lie in [0, n_nodes={n_nodes}), got up to {largest}"
        raise ValueError(msg)
    keep = (src != dst) & (w > 0)
    a, b, w = np.minimum(src, dst)[keep], np.maximum(src, dst)[keep], w[keep]
    key = a * n_nodes + b
    order = np.lexsort((w, key))
    key, w = key[order], w[order]
    last = np.r_[key[1:] != key[:-1], True] if len(key) else np.zeros(0, bool)
    key, w = key[last], w[last]
    return key // n_nodes, key % n_nodes, w, n_nodes


class _SymmetricMatmul(torch.autograd.Function):
    """``adj @ h`` for a constant symmetric sparse ``adj``: the backward pass is ``adj @ grad`` (no transpose)."""

    @staticmethod
    def forward(ctx, adj: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return adj @ h

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, ctx.adj @ grad


class GeneGraphOperators(AtomOperators):
    """Graph-propagated gene embeddings: an atom unseen in training gets its vector from its graph neighbours.

    Learnable node embeddings ``h0`` (parameter ``node_embedding``) are propagated over the symmetric-normalised
    weighted adjacency with self-loops, ``A = D^-1/2 (W + I) D^-1/2``, for ``n_layers`` residual steps
    ``h <- h + relu(A (h W_l + b_l))`` (sub-modules ``layers``); an MLP (``mlp``) maps each atom's node state to
    ``dim``. The embeddings of nodes of unseen atoms are masked to zero, so an unseen atom's vector is purely derived
    from the nodes within ``n_layers`` hops (and changes when they change). Only nodes within ``n_layers`` hops of an
    atom are kept (degrees come from the full graph, so the result is exact); sparse products keep 20k-node graphs
    with ~400k edges cheap on CPU.

    Parameters
    ----------
    edges
        ``(source, target)`` or ``(source, target, weight)`` arrays of node indices (a GEARS-format graph such as the
        GO Jaccard graph); treated as undirected (the larger weight of both directions), self-loops dropped.
    atom_nodes
        ``(n_atoms,)`` node index of each atom's gene; ``-1``: not in the graph (the atom gets an isolated node of its
        own: a free vector when seen, a constant one when unseen). Atoms sharing a node share a vector; the node is
        masked only when no seen atom uses it.
    dim
        Output size.
    n_nodes
        Number of nodes of the graph; ``None``: largest index + 1.
    n_layers, n_embed, n_hidden
        Propagation steps, size of the node embeddings, hidden width of the output MLP.
    seen_atoms
        Boolean ``(n_atoms,)``: which atoms were seen in training; ``None``: all.
    """

    def __init__(
        self,
        edges: tuple[np.ndarray, ...],
        atom_nodes: np.ndarray,
        *,
        dim: int,
        n_nodes: int | None = None,
        n_layers: int = 2,
        n_embed: int = 64,
        n_hidden: int = 128,
        seen_atoms: np.ndarray | None = None,
    ) -> None:
        atom_nodes = np.asarray(atom_nodes).reshape(-1)
        if not np.issubdtype(atom_nodes.dtype, np.integer) or (atom_nodes < -1).any():
            msg = "atom_nodes must be integer node indices (-1: atom not in the graph)"
            raise ValueError(msg)
        super().__init__(len(atom_nodes), dim, seen_atoms=seen_atoms)
        a, b, w, n_nodes = _undirected_edges(edges, n_nodes, atom_nodes)
        missing = atom_nodes < 0
        n_total = n_nodes + int(missing.sum())  # one isolated node per atom absent from the graph
        atom_nodes = atom_nodes.astype(np.int64)
        atom_nodes[missing] = n_nodes + np.arange(int(missing.sum()))
        deg = np.ones(n_total)
        np.add.at(deg, a, w)
        np.add.at(deg, b, w)
        reached = np.zeros(n_total, dtype=bool)
        reached[atom_nodes] = True
        for _ in range(int(n_layers)):
            nxt = reached.copy()
            nxt[b[reached[a]]] = True
            nxt[a[reached[b]]] = True
            reached = nxt
        nodes = np.flatnonzero(reached)
        row = np.full(n_total, -1, dtype=np.int64)
        row[nodes] = np.arange(len(nodes))
        inside = reached[a] & reached[b]
        a, b, w = a[inside], b[inside], w[inside]
        norm = w / np.sqrt(deg[a] * deg[b])
        rows = np.concatenate([row[a], row[b], row[nodes]])
        cols = np.concatenate([row[b], row[a], row[nodes]])
        vals = np.concatenate([norm, norm, 1.0 / deg[nodes]])
        order = np.argsort(rows * len(nodes) + cols, kind="stable")
        self.n_layers, self.n_embed = int(n_layers), int(n_embed)
        self.register_buffer("nodes", torch.as_tensor(nodes), persistent=False)
        self.register_buffer("atom_index", torch.as_tensor(row[atom_nodes]), persistent=False)
        crow = np.r_[0, np.cumsum(np.bincount(rows, minlength=len(nodes)))]
        self.register_buffer("adj_crow", torch.as_tensor(crow), persistent=False)
        self.register_buffer("adj_col", torch.as_tensor(cols[order]), persistent=False)
        self.register_buffer("adj_values", torch.as_tensor(vals[order], dtype=torch.float32), persistent=False)
        self.node_embedding = nn.Parameter(torch.zeros(len(nodes), self.n_embed))
        self.layers = nn.ModuleList([nn.Linear(self.n_embed, self.n_embed) for _ in range(self.n_layers)])
        self.mlp = mlp(self.n_embed, n_hidden, self.dim, n_layers=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``node_embedding ~ N(0, 1)`` (torch's global RNG)."""
        with torch.no_grad():
            self.node_embedding.normal_(0.0, 1.0)

    def adjacency(self) -> torch.Tensor:
        """Normalised adjacency of the kept nodes (symmetric, sparse CSR, ``(n_kept, n_kept)``; rows as ``nodes``)."""
        n, vals = len(self.nodes), self.adj_values.to(self.node_embedding.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(self.adj_crow, self.adj_col, vals, (n, n), check_invariants=False)

    def node_mask(self) -> torch.Tensor:
        """``(n_kept, 1)``: 0 for nodes used only by unseen atoms, else 1."""
        mask = torch.ones(len(self.nodes), 1, device=self.node_embedding.device, dtype=self.node_embedding.dtype)
        mask[self.atom_index[~self.seen_atoms]] = 0.0
        mask[self.atom_index[self.seen_atoms]] = 1.0
        return mask

    def forward(self) -> torch.Tensor:
        """Atom vectors, ``(n_atoms, dim)``."""
        h, adj = self.node_embedding * self.node_mask(), self.adjacency()
        for lin in self.layers:
            h = h + torch.relu(_SymmetricMatmul.apply(adj, lin(h)))
        return self.mlp(h[self.atom_index])


class DoseResponse(nn.Module):
    """Per-atom sigmoid in log-dose: ``s_i = sigmoid(exp(log_slope_i) (log dose_i - log_ec50_i))``, 0 if inactive.

    Parameters ``log_ec50`` (initialised to ``log_dose_init``) and ``log_slope`` (0), ``(n_atoms,)``; buffer
    ``seen_atoms``: atoms unseen in training use the mean EC50 and slope of the seen ones.
    """

    def __init__(self, n_atoms: int, *, log_dose_init: float = -2.0, seen_atoms: np.ndarray | None = None) -> None:
        super().__init__()
        self.n_atoms, self.log_dose_init = int(n_atoms), float(log_dose_init)
        self.log_ec50 = nn.Parameter(torch.zeros(self.n_atoms))
        self.log_slope = nn.Parameter(torch.zeros(self.n_atoms))
        self.register_buffer("seen_atoms", _seen_mask(seen_atoms, self.n_atoms))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``log_ec50 = log_dose_init``, ``log_slope = 0``."""
        with torch.no_grad():
            self.log_ec50.fill_(self.log_dose_init)
            self.log_slope.zero_()

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-EC50 and slope per atom; atoms unseen in training get the mean over the seen ones."""
        ec50, slope = self.log_ec50, torch.exp(self.log_slope)
        if not bool(self.seen_atoms.all()) and bool(self.seen_atoms.any()):
            ec50 = torch.where(self.seen_atoms, ec50, ec50[self.seen_atoms].mean())
            slope = torch.where(self.seen_atoms, slope, slope[self.seen_atoms].mean())
        return ec50, slope

    def forward(self, enc: torch.Tensor) -> torch.Tensor:
        """``s`` ``(n_cells, n_atoms)`` from the dose-scaled multi-hot ``enc`` (fewer columns are zero-padded)."""
        if enc.shape[1] > self.n_atoms:
            msg = f"perturbation encoding has {enc.shape[1]} columns, more than n_atoms={self.n_atoms}"
            raise ValueError(msg)
        enc = F.pad(enc, (0, self.n_atoms - enc.shape[1])) if enc.shape[1] < self.n_atoms else enc
        active = enc > 0
        ec50, slope = self.params()
        log_dose = torch.log(torch.where(active, enc, torch.ones_like(enc)))
        return torch.sigmoid(slope * (log_dose - ec50)) * active


class PairInteractions(nn.Module):
    """Gated pairwise interactions: ``sum_p s_a s_b sigmoid(gate_p) effect_p`` over ``pairs`` ``(a, b)``.

    Buffer ``pairs`` ``(n_pairs, 2)``; parameters ``effect`` ``(n_pairs, dim)`` (initialised 0) and ``gate``
    ``(n_pairs,)`` (initialised ``gate_init``).
    """

    def __init__(self, pairs: np.ndarray | None, dim: int, *, gate_init: float = -2.0) -> None:
        super().__init__()
        arr = np.zeros((0, 2)) if pairs is None else np.asarray(pairs)
        if arr.size and (
            arr.ndim != 2 or arr.shape[1] != 2 or not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0
        ):
            msg = f"pairs must be a (n_pairs, 2) array of non-negative atom indices, got shape {arr.shape}"
            raise ValueError(msg)
        self.dim, self.gate_init = int(dim), float(gate_init)
        self.register_buffer("pairs", torch.as_tensor(arr, dtype=torch.long).reshape(-1, 2))
        self.effect = nn.Parameter(torch.zeros(len(self.pairs), self.dim))
        self.gate = nn.Parameter(torch.zeros(len(self.pairs)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``effect = 0``, ``gate = gate_init``."""
        with torch.no_grad():
            self.effect.zero_()
            self.gate.fill_(self.gate_init)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """Interaction latent ``(n_cells, dim)`` from the dose responses ``s`` ``(n_cells, n_atoms)``."""
        if not len(self.pairs):
            return s.new_zeros(s.shape[0], self.dim)
        coef = s[:, self.pairs[:, 0]] * s[:, self.pairs[:, 1]]
        return coef @ (torch.sigmoid(self.gate)[:, None] * self.effect)

    def penalty(self) -> torch.Tensor:
        """Sparsity penalty ``sum_p sigmoid(gate_p)`` (0 without pairs)."""
        return torch.sigmoid(self.gate).sum()


class PerturbationEncoder(nn.Module):
    """Latent shift of a perturbation encoding: ``s @ operators() + interactions(s)`` with ``s = dose(enc)``.

    Parameters
    ----------
    operators
        An :class:`AtomOperators` (sub-module ``operators``).
    dose
        A :class:`DoseResponse` over the same atoms (sub-module ``dose``).
    interactions
        Optional :class:`PairInteractions` of the same size (sub-module ``interactions``).
    """

    def __init__(
        self, operators: AtomOperators, dose: DoseResponse, *, interactions: PairInteractions | None = None
    ) -> None:
        super().__init__()
        if operators.n_atoms != dose.n_atoms:
            msg = f"operators have {operators.n_atoms} atoms but the dose response {dose.n_atoms}"
            raise ValueError(msg)
        if interactions is not None and (
            interactions.dim != operators.dim
            or (len(interactions.pairs) and int(interactions.pairs.max()) >= operators.n_atoms)
        ):
            msg = f"interactions must have dim={operators.dim} and pairs of atoms < {operators.n_atoms}"
            raise ValueError(msg)
        self.n_atoms, self.dim = operators.n_atoms, operators.dim
        self.operators, self.dose, self.interactions = operators, dose, interactions

    def forward(self, enc: torch.Tensor) -> torch.Tensor:
        """Perturbation latent ``(n_cells, dim)`` of the dose-scaled multi-hot ``enc``."""
        s = self.dose(enc)
        z = s @ self.operators()
        if self.interactions is not None and len(self.interactions.pairs):
            z = z + self.interactions(s)
        return z

    def penalty(self) -> torch.Tensor:
        """The interactions' sparsity penalty (0 without them)."""
        if self.interactions is None:
            return self.dose.log_ec50.new_zeros(())
        return self.interactions.penalty()
