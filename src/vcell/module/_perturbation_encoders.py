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
        self.register_buffer("features", torch.tensor(feats))  # a copy: feats may be a read-only view (pandas 3)
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


class _SparseMatmul(torch.autograd.Function):
    """``adj @ h`` for a constant sparse ``adj`` whose transpose ``adj_t`` is given: backward ``adj_t @ grad``."""

    @staticmethod
    def forward(ctx, adj: torch.Tensor, adj_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        ctx.adj_t = adj_t
        return adj @ h

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        return None, None, ctx.adj_t @ grad


def _row_positions(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in a CSR ``indices`` array of the entries of ``rows``, and each entry's index into ``rows``."""
    starts, lens = indptr[rows], indptr[rows + 1] - indptr[rows]
    owner = np.repeat(np.arange(len(rows)), lens)
    return np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens) + starts[owner], owner


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int) -> list[np.ndarray]:
    """``[crow, col, values]`` of the entries ``(rows, cols, vals)``, columns sorted within rows."""
    order = np.lexsort((cols, rows))
    return [np.r_[0, np.cumsum(np.bincount(rows, minlength=n_rows))], cols[order], vals[order]]


def _tensor(x: np.ndarray) -> torch.Tensor:
    """Integer arrays as int64 tensors, float arrays as float32."""
    return torch.as_tensor(x, dtype=torch.float32 if np.issubdtype(x.dtype, np.floating) else torch.int64)


#: names of the arrays of one propagation step of a plan (see ``GeneGraphOperators._plan``)
_STEP = ("crow", "col", "val", "t_crow", "t_col", "t_val", "rowsum", "keep")


class GeneGraphOperators(AtomOperators):
    """Graph-propagated gene embeddings: an atom unseen in training gets its vector from its graph neighbours.

    Learnable node embeddings ``h0`` (parameter ``node_embedding``) are propagated over the symmetric-normalised
    weighted adjacency with self-loops, ``A = D^-1/2 (W + I) D^-1/2``, for ``n_layers`` residual steps
    ``h <- h + relu(A (h W_l + b_l))`` (sub-modules ``layers``); an MLP (``mlp``) maps an atom's node state to
    ``dim``. The vector of an atom unseen in training is computed with its own node's embedding set to zero (unless
    a seen atom uses that node), so it is derived purely from the nodes within ``n_layers`` hops, and it changes
    when they change; each unseen atom is propagated on its own, so its vector does not depend on which other atoms
    are asked for.

    Only nodes within ``n_layers`` hops of a seen atom's node have an embedding (buffer ``nodes``, sorted): they are
    the nodes that training can reach. Every other node's embedding is zero, consistently for seen and unseen atoms
    (it would never get a gradient). Degrees come from the full graph, so results are exact, and each step is
    computed only for the nodes the next one needs (step ``l`` for nodes within ``n_layers - l`` hops of the atoms,
    as ``(A h) W + (A 1) b``), so a 20k-node graph with ~400k edges costs little on CPU. :meth:`node_vectors` gives
    the vector of any graph node as an unseen atom (zero-shot genes).

    Parameters
    ----------
    edges
        ``(source, target)`` or ``(source, target, weight)`` arrays of node indices (a GEARS-format graph such as the
        GO Jaccard graph); treated as undirected (the larger weight of both directions), self-loops dropped.
    atom_nodes
        ``(n_atoms,)`` node index of each atom's gene; ``-1``: not in the graph (the atom gets an isolated node of its
        own: a free vector when seen, a constant one when unseen). Atoms sharing a node share a vector.
    dim
        Output size.
    n_nodes
        Number of nodes of the graph; ``None``: largest index + 1.
    n_layers, n_embed, n_hidden
        Propagation steps, size of the node embeddings, hidden width of the output MLP.
    seen_atoms
        Boolean ``(n_atoms,)``: which atoms were seen in training; ``None``: all.
    own_embedding
        Seen atoms use their own node's embedding (a free vector each, like one-hot, plus their neighbours');
        ``False``: every atom, seen or not, leaves its own node out, so training fits the same neighbours-only rule
        that unseen atoms are predicted with.
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
        own_embedding: bool = True,
    ) -> None:
        atom_nodes = np.asarray(atom_nodes).reshape(-1)
        if not np.issubdtype(atom_nodes.dtype, np.integer) or (atom_nodes < -1).any():
            msg = "atom_nodes must be integer node indices (-1: atom not in the graph)"
            raise ValueError(msg)
        if int(n_layers) < 0:
            msg = f"n_layers must be >= 0, got {n_layers}"
            raise ValueError(msg)
        super().__init__(len(atom_nodes), dim, seen_atoms=seen_atoms)
        a, b, w, n_nodes = _undirected_edges(edges, n_nodes, atom_nodes)
        missing = atom_nodes < 0
        self.n_nodes, self.n_layers, self.n_embed = int(n_nodes), int(n_layers), int(n_embed)
        n_total = self.n_nodes + int(missing.sum())  # one isolated node per atom absent from the graph
        atom_nodes = atom_nodes.astype(np.int64)
        atom_nodes[missing] = self.n_nodes + np.arange(int(missing.sum()))
        deg = np.ones(n_total)
        np.add.at(deg, a, w)
        np.add.at(deg, b, w)
        # the full normalised adjacency (numpy CSR, columns sorted within rows; never moved to a device)
        loops = np.arange(n_total)
        norm = w / np.sqrt(deg[a] * deg[b])
        vals = np.concatenate([norm, norm, 1.0 / deg])
        self._indptr, self._indices, self._values = _csr(np.r_[a, b, loops], np.r_[b, a, loops], vals, n_total)
        seen = self.seen_atoms.numpy()
        self._seen_node = np.zeros(n_total, dtype=bool)
        self._seen_node[atom_nodes[seen]] = True
        self.own_embedding = bool(own_embedding)
        self._own_node = self._seen_node if self.own_embedding else np.zeros(n_total, dtype=bool)
        shared = self._own_node[atom_nodes]  # atoms read from the one propagation from all seen atoms' nodes
        plan = self._plan([np.unique(atom_nodes[seen])], masked=False)
        nodes = plan.pop("nodes")
        self._param_row = np.full(n_total, -1, dtype=np.int64)
        self._param_row[nodes] = np.arange(len(nodes))
        plan["rows"] = np.arange(len(nodes))
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.register_buffer("nodes", torch.as_tensor(nodes), persistent=False)
        self.register_buffer("atom_nodes", torch.as_tensor(atom_nodes), persistent=False)
        self.register_buffer("shared_atoms", torch.as_tensor(shared), persistent=False)
        out = np.searchsorted(np.unique(atom_nodes[seen]), atom_nodes).clip(max=max(int(seen.sum()) - 1, 0))
        self.register_buffer("atom_index", torch.as_tensor(out), persistent=False)
        for key, value in plan.items():
            self.register_buffer(f"_plan_{key}", _tensor(value), persistent=False)
        self.node_embedding = nn.Parameter(torch.zeros(len(nodes), self.n_embed))
        self.layers = nn.ModuleList([nn.Linear(self.n_embed, self.n_embed) for _ in range(self.n_layers)])
        self.mlp = mlp(self.n_embed, n_hidden, self.dim, n_layers=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``node_embedding ~ N(0, 1)`` (torch's global RNG)."""
        with torch.no_grad():
            self.node_embedding.normal_(0.0, 1.0)

    # ------------------------------------------------------------------ propagation plans (numpy)
    def _hops(self, start: np.ndarray) -> list[np.ndarray]:
        """Sorted nodes within ``0, 1, ..., n_layers`` hops of ``start``."""
        levels = [np.unique(np.asarray(start, dtype=np.int64))]
        for _ in range(self.n_layers):
            nb = self._indices[_row_positions(self._indptr, levels[-1])[0]]
            levels.append(np.union1d(levels[-1], nb))
        return levels

    def _plan(self, groups: list[np.ndarray], *, masked: bool) -> dict[str, np.ndarray]:
        """Arrays to propagate from each group of start nodes on its own (block-diagonal), exactly.

        ``nodes``: the nodes whose embeddings enter (all groups, concatenated); step ``l`` (keys ``<l>_<name>``)
        maps the states of the nodes within ``n_layers - l`` hops of each group to those within ``n_layers - l - 1``
        hops: ``A`` restricted to those rows (CSR), its transpose, its row sums and the rows' positions among its
        columns; ``out``: each group's start nodes in the final states. ``masked``: every group is one node whose
        own embedding is left out (an unseen atom), unless a seen atom uses it.
        """
        levels = [self._hops(g) for g in groups]
        plan: dict[str, np.ndarray] = {}
        for step in range(self.n_layers):
            hi, lo = self.n_layers - step, self.n_layers - step - 1
            rows, cols, vals, keep = [], [], [], []
            n_rows = n_cols = 0
            for lv in levels:
                pos, owner = _row_positions(self._indptr, lv[lo])
                rows.append(owner + n_rows)
                cols.append(np.searchsorted(lv[hi], self._indices[pos]) + n_cols)
                vals.append(self._values[pos])
                keep.append(np.searchsorted(lv[hi], lv[lo]) + n_cols)
                n_rows, n_cols = n_rows + len(lv[lo]), n_cols + len(lv[hi])
            r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
            arrays = [*_csr(r, c, v, n_rows), *_csr(c, r, v, n_cols), np.bincount(r, v, minlength=n_rows)]
            plan.update({f"{step}_{name}": x for name, x in zip(_STEP, [*arrays, np.concatenate(keep)], strict=True)})
        plan["nodes"] = np.concatenate([lv[-1] for lv in levels])
        plan["out"] = np.arange(len(np.concatenate([lv[0] for lv in levels])))
        if masked:
            first = np.cumsum([0] + [len(lv[-1]) for lv in levels[:-1]])
            own = first + np.array([np.searchsorted(lv[-1], lv[0][0]) for lv in levels], dtype=np.int64)
            plan["masked"] = own[~self._own_node[[lv[0][0] for lv in levels]]]
        return plan

    def _propagate(self, h: torch.Tensor, plan: dict[str, torch.Tensor]) -> torch.Tensor:
        """States of the plan's start nodes from the states ``h`` of its ``nodes``."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            for step, lin in enumerate(self.layers):
                p = {name: plan[f"{step}_{name}"] for name in _STEP}
                n_rows, n_cols = len(p["crow"]) - 1, len(p["t_crow"]) - 1
                adj = torch.sparse_csr_tensor(
                    p["crow"], p["col"], p["val"].to(h.dtype), (n_rows, n_cols), check_invariants=False
                )
                adj_t = torch.sparse_csr_tensor(
                    p["t_crow"], p["t_col"], p["t_val"].to(h.dtype), (n_cols, n_rows), check_invariants=False
                )
                msg = _SparseMatmul.apply(adj, adj_t, h)
                h = h[p["keep"]] + torch.relu(F.linear(msg, lin.weight) + p["rowsum"].to(h.dtype)[:, None] * lin.bias)
        return h[plan["out"]]

    def _shared_plan(self) -> dict[str, torch.Tensor]:
        return {key[len("_plan_") :]: value for key, value in self.named_buffers() if key.startswith("_plan_")}

    def _unseen_states(self, nodes: np.ndarray) -> torch.Tensor:
        """Node states after propagation of ``nodes`` as unseen atoms (each on its own), ``(len(nodes), n_embed)``."""
        emb = self.node_embedding
        key = (tuple(nodes.tolist()), str(emb.device))
        if key not in self._cache:
            plan = self._plan([np.array([q]) for q in nodes], masked=True)
            rows = self._param_row[plan.pop("nodes")]
            rows[plan.pop("masked")] = -1
            plan["rows"] = rows
            self._cache.clear()  # keep the last query only (predictions ask for the same nodes batch after batch)
            self._cache[key] = {k: _tensor(v).to(emb.device) for k, v in plan.items()}
        plan = self._cache[key]
        rows = plan["rows"]
        if len(emb):
            h = torch.where((rows >= 0)[:, None], emb[rows.clamp(min=0)], 0.0)
        else:
            h = emb.new_zeros(len(rows), self.n_embed)
        return self._propagate(h, plan)

    def node_vectors(self, nodes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Vectors of graph nodes ``nodes`` (indices in ``[0, n_nodes)``) as atoms unseen in training, ``(k, dim)``.

        A node that a seen atom uses keeps its embedding (its vector then equals that atom's); otherwise its own
        embedding is left out and its vector comes from its neighbours.
        """
        idx = torch.as_tensor(nodes).detach().cpu().numpy().astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_nodes):
            msg = f"graph node indices must lie in [0, n_nodes={self.n_nodes}), got {idx.min()}..{idx.max()}"
            raise ValueError(msg)
        if not idx.size:
            return self.node_embedding.new_zeros(0, self.dim)
        return self.mlp(self._unseen_states(idx))

    def forward(self) -> torch.Tensor:
        """Atom vectors, ``(n_atoms, dim)``."""
        h = self._propagate(self.node_embedding, self._shared_plan())
        if bool(self.shared_atoms.all()):
            return self.mlp(h[self.atom_index])
        shared = torch.nonzero(self.shared_atoms).flatten()
        unseen = torch.nonzero(~self.shared_atoms).flatten()
        states = torch.cat([h[self.atom_index[shared]], self._unseen_states(self.atom_nodes[unseen].cpu().numpy())])
        return self.mlp(states[torch.argsort(torch.cat([shared, unseen]))])


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

    def unseen(self, enc: torch.Tensor) -> torch.Tensor:
        """``s`` of atoms beyond the ``n_atoms`` trained ones (any number of columns): the seen atoms' mean curve."""
        if self.n_atoms:
            seen = self.seen_atoms if bool(self.seen_atoms.any()) else torch.ones_like(self.seen_atoms)
            ec50, slope = self.log_ec50[seen].mean(), torch.exp(self.log_slope)[seen].mean()
        else:
            ec50, slope = enc.new_tensor(self.log_dose_init), enc.new_tensor(1.0)
        active = enc > 0
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

    def forward(self, enc: torch.Tensor, extra_nodes: torch.Tensor | None = None) -> torch.Tensor:
        """Perturbation latent ``(n_cells, dim)`` of the dose-scaled multi-hot ``enc``.

        Columns of ``enc`` beyond ``n_atoms`` are atoms unseen in training given by graph node (operators with
        ``node_vectors``, i.e. :class:`GeneGraphOperators`): ``extra_nodes`` ``(k,)`` (or ``(n_cells, k)`` with equal
        rows) holds their node indices. They use the seen atoms' mean dose response and no interaction, and their
        vectors are computed only for the columns active in ``enc``.
        """
        n_extra = enc.shape[1] - self.n_atoms
        extra = None
        if n_extra > 0:
            if extra_nodes is None or not hasattr(self.operators, "node_vectors"):
                msg = (
                    f"perturbation encoding has {enc.shape[1]} columns, more than n_atoms={self.n_atoms}; extra "
                    "columns need graph operators and their extra_nodes"
                )
                raise ValueError(msg)
            nodes = torch.as_tensor(extra_nodes).reshape(-1, n_extra)
            enc, extra = enc[:, : self.n_atoms], enc[:, self.n_atoms :]
        s = self.dose(enc)
        z = s @ self.operators()
        if self.interactions is not None and len(self.interactions.pairs):
            z = z + self.interactions(s)
        if extra is not None and len(extra):
            active = torch.nonzero((extra > 0).any(0)).flatten()
            if len(active):
                vectors = self.operators.node_vectors(nodes[0, active.to(nodes.device)])
                z = z + self.dose.unseen(extra[:, active]) @ vectors
        return z

    def penalty(self) -> torch.Tensor:
        """The interactions' sparsity penalty (0 without them)."""
        if self.interactions is None:
            return self.dose.log_ec50.new_zeros(())
        return self.interactions.penalty()
