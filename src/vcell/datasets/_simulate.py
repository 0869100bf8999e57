"""Synthetic perturbation screens with known ground truth: :func:`simulate`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from vcell._constants import COMBO_SEP, CONTROL
from vcell._utils import mudata_no_pull, resolve_seed

if TYPE_CHECKING:
    from mudata import MuData

#: scale of the baseline log-means: ``exp(baseline)`` sums to this over genes (counts per 10k)
_TARGET_SUM = 1e4
#: share of cells that are controls
_CONTROL_FRACTION = 0.2
#: median total RNA counts per cell, per gene
_COUNTS_PER_GENE = 20.0
#: sd of the per-cell log library size
_LIBRARY_SD = 0.3
#: sd of the per-cell program state (cell-to-cell heterogeneity)
_CELL_STATE_SD = 0.2
#: cells per block when sampling counts
_BLOCK = 8192
#: share of genes loaded on each program
_PROGRAM_DENSITY = 0.1
#: size range of a single perturbation's effect on each of its programs
_EFFECT_LOW, _EFFECT_HIGH = 0.5, 1.0
#: sd of the genes' baseline log expression
_BASE_SD = 0.7
#: epistatic interaction: +-U(low, high) times the singles' summed effect, plus this many random single effects
_INT_LOW, _INT_HIGH, _INT_RANDOM = 0.7, 1.0, 1.0
#: mechanistic interactions: the mechanisms, in the order of ``uns['vcell_simulation']['mechanistic']['flags']``
_MECHANISMS = ("saturation", "and_gate", "cascade")
#: mechanistic: a program's capacity ``cap_k ~ U(low, high)``: its activity is ``cap_k tanh(input / cap_k)``
_CAP_LOW, _CAP_HIGH = 0.5, 0.8
#: mechanistic: size range of a single's raw input to each of its programs (saturated to about U(0.5, 0.8))
_INPUT_LOW, _INPUT_HIGH = 0.8, 1.6
#: mechanistic: an upstream perturbation removes ``U(low, high)`` of its regulator's activity (two always floor it)
_UPSTREAM_LOW, _UPSTREAM_HIGH = 0.55, 0.9
#: mechanistic: AND gate input ``x^n / (x^n + K^n)`` of an input program's activity ``x``; gate genes per gene
_GATE_K, _GATE_N, _GATE_DENSITY = 0.25, 3.0, 0.05
#: mechanistic: size range of an AND gate's effect on each of its genes (log scale, random sign)
_GATE_LOW, _GATE_HIGH = 0.6, 1.2
#: mechanistic: a double's flag is set when its mechanism's part of the non-additivity exceeds this
_TOL = 1e-9
#: mechanistic: layouts drawn before giving up on one with enough doubles of every kind
_ATTEMPTS = 20


def _names(prefix: str, n: int) -> list[str]:
    width = max(4 if prefix == "G" else 3, len(str(max(n - 1, 0))))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def _sparse_loadings(
    rng: np.random.Generator, n_programs: int, n_features: int, per_program: int, level: np.ndarray | None = None
) -> np.ndarray:
    """Sparse program loadings: ``per_program`` features per program, weights of size U(0.5, 1).

    Signs are random, or, given the features' baseline ``level``, alternate along the level ranks within each
    program (so that a program moves about as much expression up as down and barely changes total counts).
    """
    W = np.zeros((n_programs, n_features))
    for k in range(n_programs):
        idx = rng.choice(n_features, size=min(per_program, n_features), replace=False)
        if level is None:
            signs = rng.choice([-1.0, 1.0], size=idx.size)
        else:
            idx = idx[np.argsort(level[idx])]
            signs = np.where(np.arange(idx.size) % 2 == 0, 1.0, -1.0) * rng.choice([-1.0, 1.0])
        W[k, idx] = signs * rng.uniform(0.5, 1.0, size=idx.size)
    return W


def _program_effect(rng: np.random.Generator, n_programs: int) -> np.ndarray:
    """Effect of one perturbation in program space: 1-3 active programs, |effect| ~ U(EFFECT_LOW, EFFECT_HIGH)."""
    e = np.zeros(n_programs)
    n_active = int(rng.integers(1, min(3, n_programs) + 1))
    idx = rng.choice(n_programs, size=n_active, replace=False)
    e[idx] = rng.choice([-1.0, 1.0], size=n_active) * rng.uniform(_EFFECT_LOW, _EFFECT_HIGH, size=n_active)
    return e


def _program_graph(W: np.ndarray, genes: list[str]) -> dict[str, np.ndarray]:
    """Gene pairs sharing a program, with the Jaccard index of their program sets (GEARS' graph format)."""
    member = (W != 0).astype(float)
    shared = member.T @ member  # genes x genes: programs in common
    n_prog = member.sum(0)
    src, tgt = np.nonzero(np.triu(shared, 1) > 0)
    src, tgt = np.concatenate([src, tgt]), np.concatenate([tgt, src])
    jaccard = shared[src, tgt] / (n_prog[src] + n_prog[tgt] - shared[src, tgt])
    names = np.asarray(genes, dtype=object)
    return {"source": names[src].astype(str), "target": names[tgt].astype(str), "importance": jaccard}


def _hill(dose: float | np.ndarray, ec50: float | np.ndarray, hill: float | np.ndarray) -> np.ndarray:
    dose = np.asarray(dose, dtype=float)
    with np.errstate(divide="ignore"):
        ratio = np.where(dose > 0, (dose / ec50) ** hill, 0.0)
    return ratio / (1.0 + ratio)


def _nb_counts(rng: np.random.Generator, mu: np.ndarray, dispersion: np.ndarray) -> np.ndarray:
    """Negative binomial counts (gamma-Poisson) with per-column dispersion ``phi`` (var = mu + phi mu^2)."""
    theta = 1.0 / dispersion
    rate = mu * rng.gamma(shape=theta, scale=1.0 / theta, size=mu.shape)
    return rng.poisson(rate).astype(np.float32)


def _sample_counts(
    rng: np.random.Generator,
    *,
    base: np.ndarray,
    effect: np.ndarray,
    loadings: np.ndarray,
    state: np.ndarray,
    offset: np.ndarray | None,
    type_of_cell: np.ndarray,
    cond_of_cell: np.ndarray,
    size: np.ndarray,
    dispersion: np.ndarray,
) -> sparse.csr_matrix:
    """NB counts, in blocks of cells (bounded memory): mean ``size * exp(base + (effect + state) @ loadings - offset)``.

    ``base`` is types x features, ``effect`` conditions x types x programs, ``offset`` conditions x features.
    """
    blocks = []
    for start in range(0, state.shape[0], _BLOCK):
        sl = slice(start, start + _BLOCK)
        t, c = type_of_cell[sl], cond_of_cell[sl]
        log_mu = base[t] + (effect[c, t] + state[sl]) @ loadings
        if offset is not None:
            log_mu -= offset[c]
        blocks.append(sparse.csr_matrix(_nb_counts(rng, size[sl, None] * np.exp(log_mu), dispersion)))
    return sparse.vstack(blocks, format="csr")


def _dose_response(
    rng: np.random.Generator, dose_arr: np.ndarray | None, n_perturbations: int
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """Per-single ``EC50`` and Hill coefficient (``None`` without doses) and the singles' dose levels."""
    if dose_arr is None:
        return None, None, np.array([1.0])
    lo, hi = np.log(dose_arr[0]), np.log(dose_arr[-1])
    if hi - lo < 1e-8:
        lo, hi = lo - 1.0, hi + 1.0
    ec50 = np.exp(rng.uniform(lo, hi, size=n_perturbations))
    hill_n = rng.uniform(1.0, 3.0, size=n_perturbations)
    return ec50, hill_n, dose_arr


def _directed_effects(rng: np.random.Generator, n_perturbations: int, direction: np.ndarray) -> np.ndarray:
    """Mechanistic singles: one program each (a quarter of them two), moved in the program's ``direction``.

    Raw input sizes U(0.8, 1.6). Few programs per single keep most pairs apart (additive), so that the share of
    interacting doubles is set by the structure laid out for them, not by chance overlaps.
    """
    k = direction.size
    E = np.zeros((n_perturbations, k))
    for p in range(n_perturbations):
        idx = rng.choice(k, size=2 if k > 1 and rng.random() < 0.25 else 1, replace=False)
        E[p, idx] = direction[idx] * rng.uniform(_INPUT_LOW, _INPUT_HIGH, size=idx.size)
    return E


class _ShortOfDoubles(ValueError):
    """A mechanistic layout offers too few doubles of some kind."""


class _Mechanisms:
    """Structure of ``simulate(interactions="mechanistic")``: programs with saturation, AND gates, cascades.

    ``direct`` (perturbations x programs) are the raw program inputs of the perturbations that act directly;
    ``regulator_of[p]`` is the regulator (a perturbation index) an upstream perturbation ``p`` acts through (``-1``:
    none) and ``strength[p]`` the share of the regulator's activity it removes; ``gate_programs`` (gates x 2) are the
    input programs of the AND gates and ``gate_loadings`` (gates x genes) their effects on genes.
    """

    def __init__(
        self,
        direct: np.ndarray,
        direction: np.ndarray,
        capacity: np.ndarray,
        knockdown: np.ndarray,
        target_idx: np.ndarray,
        n_genes: int,
    ) -> None:
        n = direct.shape[0]
        self.direct = direct.copy()
        self.direction, self.capacity = direction, capacity
        self.knockdown, self.target_idx, self.n_genes = knockdown, target_idx, n_genes
        self.regulator_of = np.full(n, -1)
        self.strength = np.zeros(n)
        self.gate_programs = np.zeros((0, 2), dtype=int)
        self.gate_loadings = np.zeros((0, n_genes))

    @property
    def is_regulator(self) -> np.ndarray:
        return np.isin(np.arange(self.direct.shape[0]), self.regulator_of[self.regulator_of >= 0])

    def inputs(self, scales: Mapping[int, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Regulator loss (per perturbation; capped at 1), the programs' raw input and the per-gene knock-down."""
        n, k = self.direct.shape
        regulator = self.is_regulator
        loss, u, kd = np.zeros(n), np.zeros(k), np.zeros(self.n_genes)
        for p, s in scales.items():
            if regulator[p]:
                loss[p] += s  # a regulator's own perturbation knocks it out
                continue
            if self.regulator_of[p] >= 0:
                loss[self.regulator_of[p]] += s * self.strength[p]
            else:
                u += s * self.direct[p]
            kd[self.target_idx[p]] += s * self.knockdown[p]
        loss = np.minimum(loss, 1.0)
        for r in np.flatnonzero(loss > 0):
            u += loss[r] * self.direct[r]
            kd[self.target_idx[r]] += loss[r] * self.knockdown[r]
        return loss, u, kd

    def saturate(self, u: np.ndarray) -> np.ndarray:
        return self.capacity * np.tanh(u / self.capacity)

    def gate_on(self, activity: np.ndarray) -> np.ndarray:
        """How far each gate is on (``(..., gates)``): the product of its two inputs' Hill functions."""
        x = np.maximum(activity * self.direction, 0.0)
        h = x**_GATE_N / (x**_GATE_N + _GATE_K**_GATE_N)
        return h[..., self.gate_programs[:, 0]] * h[..., self.gate_programs[:, 1]]

    def condition(self, scales: Mapping[int, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Program activity, the AND gates' per-gene effect and the per-gene knock-down of a condition."""
        _, u, kd = self.inputs(scales)
        activity = self.saturate(u)
        return activity, self.gate_on(activity) @ self.gate_loadings, kd

    def pair_flags(self, pairs: list[tuple[int, int]], scale: np.ndarray) -> np.ndarray:
        """``(n_pairs, 3)`` flags: saturation, AND gate, cascade contributes to the double's non-additivity."""
        single = [self.inputs({p: scale[p]}) for p in range(self.direct.shape[0])]
        flags = np.zeros((len(pairs), len(_MECHANISMS)), dtype=bool)
        for row, (i, j) in enumerate(pairs):
            loss, u, _ = self.inputs({i: scale[i], j: scale[j]})
            (li, ui, _), (lj, uj, _) = single[i], single[j]
            ai, aj = self.saturate(ui), self.saturate(uj)
            flags[row, 0] = np.abs(self.saturate(ui + uj) - ai - aj).max() > _TOL
            if len(self.gate_programs):
                on = self.gate_on(np.stack([self.saturate(u), ai, aj]))
                flags[row, 1] = np.abs(on[0] - on[1] - on[2]).max() > _TOL
            flags[row, 2] = np.abs(loss - li - lj).max() > _TOL
        return flags


def _kinds(flags: np.ndarray) -> np.ndarray:
    """A double's mechanism: cascade, else AND gate, else saturation, else additive."""
    kind = np.full(flags.shape[0], "additive", dtype=object)
    for col in (0, 1, 2):  # later ones take precedence
        kind[flags[:, col]] = _MECHANISMS[col]
    return kind


def _mechanism_counts(n_epi: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Split ``n_epi`` doubles over the mechanisms in proportion to ``mix`` (largest remainders, ties in order)."""
    w = np.array([mix.get(m, 0.0) for m in _MECHANISMS], dtype=float)
    raw = n_epi * w / w.sum()
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n_epi - counts.sum()]:
        counts[i] += 1
    return dict(zip(_MECHANISMS, counts.tolist(), strict=True))


def _build_mechanisms(
    rng: np.random.Generator,
    mech: _Mechanisms,
    *,
    counts: Mapping[str, int],
    n_additive: int,
    scale: np.ndarray,
    loadings: np.ndarray,
    grow_programs: bool,
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Lay out cascades, AND gates (and shared programs) until each mechanism has enough doubles; pick the doubles.

    Returns the chosen pairs (in pair order) and their flags.
    """
    n, k = mech.direct.shape
    pairs = list(combinations(range(n), 2))
    mech.capacity[:] = rng.uniform(_CAP_LOW, _CAP_HIGH, size=k)

    # cascades: a regulator (a perturbed gene) and 1-3 upstream perturbations acting only through it (m upstream
    # perturbations make m + m(m-1)/2 cascade doubles: at most 3, at most what is still needed)
    free = [int(p) for p in rng.permutation(n)]
    n_cascade = 0
    while n_cascade < counts["cascade"] and len(free) >= 2:
        reg = free.pop()
        need = counts["cascade"] - n_cascade
        fan = next(m for m in (1, 2, 3) if m + m * (m - 1) // 2 >= need or m == 3)
        for _ in range(min(fan, int(rng.integers(1, 4)), len(free))):
            up = free.pop()
            mech.regulator_of[up], mech.strength[up] = reg, rng.uniform(_UPSTREAM_LOW, _UPSTREAM_HIGH)
            mech.direct[up] = 0.0
        m = int((mech.regulator_of == reg).sum())
        n_cascade += m + m * (m - 1) // 2

    # AND gates on pairs of programs, kept when they make new doubles synergistic
    n_gate_genes = max(2, round(_GATE_DENSITY * mech.n_genes))
    unloaded = np.setdiff1d(np.flatnonzero(~(loadings != 0).any(0)), mech.target_idx)
    gene_pool = unloaded if unloaded.size >= n_gate_genes else np.setdiff1d(np.arange(mech.n_genes), mech.target_idx)
    program_pairs = list(combinations(range(k), 2))
    kinds = _kinds(mech.pair_flags(pairs, scale))
    for g in rng.permutation(len(program_pairs)) if counts["and_gate"] else []:
        if (kinds == "and_gate").sum() >= counts["and_gate"]:
            break
        genes = rng.choice(gene_pool, size=min(n_gate_genes, gene_pool.size), replace=False)
        row = np.zeros(mech.n_genes)
        row[genes] = rng.choice([-1.0, 1.0], size=genes.size) * rng.uniform(_GATE_LOW, _GATE_HIGH, size=genes.size)
        before = (kinds == "and_gate").sum()
        mech.gate_programs = np.vstack([mech.gate_programs, program_pairs[g]])
        mech.gate_loadings = np.vstack([mech.gate_loadings, row])
        kinds = _kinds(mech.pair_flags(pairs, scale))
        if (kinds == "and_gate").sum() == before:  # no double sees this gate: drop it
            mech.gate_programs, mech.gate_loadings = mech.gate_programs[:-1], mech.gate_loadings[:-1]

    # shared programs: with random effects, a plain perturbation takes on one of another's programs when too few share
    plain = (mech.regulator_of < 0) & ~mech.is_regulator
    while grow_programs and (kinds == "saturation").sum() < counts["saturation"]:
        cand = [r for r, (i, j) in enumerate(pairs) if kinds[r] == "additive" and plain[i] and plain[j]]
        if not cand:
            break
        i, j = pairs[cand[int(rng.integers(len(cand)))]]
        prog = rng.choice(np.flatnonzero(mech.direct[i]))
        mech.direct[j, prog] = mech.direction[prog] * rng.uniform(_INPUT_LOW, _INPUT_HIGH)
        kinds = _kinds(mech.pair_flags(pairs, scale))

    flags = mech.pair_flags(pairs, scale)
    kinds = _kinds(flags)
    chosen: list[int] = []
    for name, need in [*counts.items(), ("additive", n_additive)]:
        pool = np.flatnonzero(kinds == name)
        if pool.size < need:
            msg = (
                f"interactions='mechanistic' needs {need} {name!r} doubles but the {n} perturbations' structure "
                f"offers {pool.size} (of {len(pairs)} pairs): use more perturbations, more programs or fewer combos, "
                "or change frac_epistatic / mechanism_mix"
            )
            raise _ShortOfDoubles(msg)
        # doubles driven by this one mechanism first, then mixed ones
        pure = flags[pool].sum(1) <= (1 if name != "cascade" else 2)
        order = np.concatenate([rng.permutation(pool[pure]), rng.permutation(pool[~pure])])
        chosen.extend(order[:need].tolist())
    chosen.sort()
    return [pairs[r] for r in chosen], flags[chosen]


def _mechanistic_network(
    mech: _Mechanisms, loadings: np.ndarray, genes: list[str], perts: list[str]
) -> dict[str, np.ndarray]:
    """The mechanistic model as one edge list (``source``, ``target``, ``kind``, ``weight``).

    Kinds: ``'effect'`` perturbed gene -> ``program{k}`` (raw input), ``'loading'`` ``program{k}`` -> gene,
    ``'gate_input'`` ``program{k}`` -> ``gate{j}``, ``'gate'`` ``gate{j}`` -> gene, ``'cascade'`` upstream perturbed
    gene -> regulator gene (the share of the regulator's activity it removes).
    """
    src: list[str] = []
    tgt: list[str] = []
    kind: list[str] = []
    weight: list[float] = []

    def add(s: list[str], t: list[str], name: str, w: np.ndarray) -> None:
        src.extend(s)
        tgt.extend(t)
        kind.extend([name] * len(s))
        weight.extend(np.asarray(w, dtype=float).tolist())

    p, q = np.nonzero(mech.direct)
    add([perts[i] for i in p], [f"program{j}" for j in q], "effect", mech.direct[p, q])
    p, q = np.nonzero(loadings)
    add([f"program{i}" for i in p], [genes[j] for j in q], "loading", loadings[p, q])
    for j, (k1, k2) in enumerate(mech.gate_programs):
        add([f"program{k1}", f"program{k2}"], [f"gate{j}"] * 2, "gate_input", np.ones(2))
    p, q = np.nonzero(mech.gate_loadings)
    add([f"gate{i}" for i in p], [genes[j] for j in q], "gate", mech.gate_loadings[p, q])
    up = np.flatnonzero(mech.regulator_of >= 0)
    add([perts[i] for i in up], [perts[mech.regulator_of[i]] for i in up], "cascade", mech.strength[up])
    return {
        "source": np.asarray(src, dtype=str),
        "target": np.asarray(tgt, dtype=str),
        "kind": np.asarray(kind, dtype=str),
        "weight": np.asarray(weight, dtype=float),
    }


def _validate(
    n_cells: int,
    n_genes: int,
    n_perturbations: int,
    n_combos: int,
    frac_epistatic: float,
    doses: Sequence[float] | None,
    cell_types: int | Sequence[str],
    n_programs: int,
    n_proteins: int,
) -> tuple[list[str], np.ndarray | None]:
    for name, value, low in [
        ("n_cells", n_cells, 1),
        ("n_genes", n_genes, 2),
        ("n_perturbations", n_perturbations, 0),
        ("n_combos", n_combos, 0),
        ("n_programs", n_programs, 1),
        ("n_proteins", n_proteins, 1),
    ]:
        if int(value) != value or value < low:
            msg = f"{name} must be an integer >= {low}, got {value!r}"
            raise ValueError(msg)
    if n_perturbations > n_genes:
        msg = f"n_perturbations ({n_perturbations}) must be <= n_genes ({n_genes}): each perturbation targets a gene"
        raise ValueError(msg)
    max_combos = n_perturbations * (n_perturbations - 1) // 2
    if n_combos > max_combos:
        msg = f"n_combos ({n_combos}) exceeds the {max_combos} pairs of {n_perturbations} single perturbations"
        raise ValueError(msg)
    if not 0.0 <= frac_epistatic <= 1.0:
        msg = f"frac_epistatic must be in [0, 1], got {frac_epistatic!r}"
        raise ValueError(msg)
    if isinstance(cell_types, str):
        msg = f"cell_types must be a number of cell types or a sequence of names, got the string {cell_types!r}"
        raise ValueError(msg)
    if isinstance(cell_types, Sequence):
        type_names = [str(t) for t in cell_types]
        if not type_names or len(set(type_names)) != len(type_names):
            msg = f"cell_types must be distinct names (at least one), got {list(cell_types)!r}"
            raise ValueError(msg)
    else:
        if int(cell_types) != cell_types or cell_types < 1:
            msg = f"cell_types must be an integer >= 1 or a sequence of names, got {cell_types!r}"
            raise ValueError(msg)
        type_names = [f"type{i}" for i in range(int(cell_types))]
    dose_arr = None
    if doses is not None:
        dose_arr = np.asarray(list(doses), dtype=float)
        if dose_arr.ndim != 1 or dose_arr.size == 0 or not np.all(np.isfinite(dose_arr)) or np.any(dose_arr <= 0):
            msg = f"doses must be a non-empty sequence of positive finite numbers, got {doses!r}"
            raise ValueError(msg)
        if np.unique(dose_arr).size != dose_arr.size:
            msg = f"doses must be distinct, got {doses!r}"
            raise ValueError(msg)
        dose_arr = np.sort(dose_arr)
    return type_names, dose_arr


def _validate_interactions(interactions: str, mechanism_mix: Mapping[str, float] | None) -> dict[str, float]:
    """Check ``interactions`` and ``mechanism_mix``; the mix with every mechanism (equal thirds by default)."""
    if interactions not in ("random", "mechanistic"):
        msg = f"interactions must be 'random' or 'mechanistic', got {interactions!r}"
        raise ValueError(msg)
    if mechanism_mix is None:
        return dict.fromkeys(_MECHANISMS, 1.0 / len(_MECHANISMS))
    if interactions != "mechanistic":
        msg = f"mechanism_mix applies to interactions='mechanistic' only, got interactions={interactions!r}"
        raise ValueError(msg)
    if not isinstance(mechanism_mix, Mapping):
        msg = f"mechanism_mix must be a mapping mechanism -> weight (keys {list(_MECHANISMS)}), got {mechanism_mix!r}"
        raise ValueError(msg)
    unknown = sorted(set(mechanism_mix) - set(_MECHANISMS))
    if unknown:
        msg = f"mechanism_mix has unknown mechanisms {unknown}; expected keys among {list(_MECHANISMS)}"
        raise ValueError(msg)
    mix = {}
    for m in _MECHANISMS:
        w = mechanism_mix.get(m, 0.0)
        ok = isinstance(w, int | float | np.number) and not isinstance(w, bool) and np.isfinite(w) and w >= 0
        if not ok:
            msg = f"mechanism_mix[{m!r}] must be a finite number >= 0, got {w!r}"
            raise ValueError(msg)
        mix[m] = float(w)
    total = sum(mix.values())
    if total <= 0:
        msg = f"mechanism_mix needs a positive weight for at least one mechanism, got {dict(mechanism_mix)!r}"
        raise ValueError(msg)
    return {m: w / total for m, w in mix.items()}


def simulate(
    *,
    n_cells: int = 2000,
    n_genes: int = 200,
    n_perturbations: int = 10,
    n_combos: int = 20,
    frac_epistatic: float = 0.3,
    doses: Sequence[float] | None = None,
    cell_types: int | Sequence[str] = 1,
    protein: bool = False,
    n_programs: int = 10,
    n_proteins: int = 20,
    effects: str = "random",
    responder_fraction: float = 1.0,
    interactions: str = "random",
    mechanism_mix: Mapping[str, float] | None = None,
    seed: int | None = None,
) -> AnnData | MuData:
    """Simulate a perturbation screen with known ground truth (negative-binomial counts, latent gene programs).

    The model, in log-mean space (natural log of the expected count per ``1e4`` library-size units):

    * **Genes** ``G0000, G0001, ...``; **programs** are sparse gene loadings ``W`` (``n_programs x n_genes``;
      each program loads about 10% of the genes with weights of size U(0.5, 1) whose signs alternate along the
      genes' expression ranks, so that a program barely changes a cell's total counts).
    * **Baseline** of cell type ``t``: ``b_t = b + W^T z_t + noise`` (``b ~ N(0, 0.7^2)`` per gene, ``z_t`` a
      cell-type program offset, ``z_0 = 0``), scaled so that ``exp(b_t)`` sums to ``1e4``.
    * **Single perturbations** are named after their target gene (chosen among the better-expressed half of
      ``var_names``). Each has a sparse program-effect vector ``e_p`` (1-3 programs, size U(0.5, 1), random sign)
      and knocks its own target down by ``k_p ~ U(1, 2)`` (log scale). Cell type ``t`` sees the program effect
      through a response matrix ``M_t = diag(g_t) ((1 - r) I + r Q_t)`` (``g_t`` lognormal gains, ``Q_t`` a
      random rotation, ``r = 0.3``, ``M_0 = I``): each type scales and partly rotates the response.
      With ``effects="target_programs"`` the targets are genes loaded on at least one program and ``e_p`` acts on
      exactly the programs that load its target, each in that program's own direction (one random sign per
      program, size U(0.5, 1)): perturbing members of the same program has similar effects, so a gene graph of
      shared programs (``uns['vcell_simulation']['gene_graph']``) predicts the effect of a gene never perturbed.
    * **Combinations** ``A+B`` (pairs of singles, components sorted), with ``interactions="random"`` (the
      default), have program effect ``e_A + e_B + i_AB``. Additive combos have ``i_AB = 0`` (the log-mean is
      exactly the sum of the singles' shifts, in every cell type); a ``frac_epistatic`` share are epistatic, with
      ``i_AB = s c (e_A + e_B) + u``: ``s = +1`` (synergy) or ``-1`` (buffering), ``c ~ U(0.7, 1)`` and ``u`` a
      random program effect drawn like a single's, for each double on its own: nothing in the singles or in other
      doubles predicts it. Both targets are knocked down.
    * **Mechanistic interactions** (``interactions="mechanistic"``): no double has an interaction of its own; every
      condition follows from one structure over the perturbations, which singles and seen doubles reveal.
      Programs act as latent regulators, each moving one way (``d_k = +-1``). A single sends a raw input ``e_p``
      into one program (a quarter of the singles: two), size U(0.8, 1.6) in direction ``d_k`` (with
      ``effects="target_programs"``: into its target's programs as above). A condition's raw input ``u`` is the sum
      over its perturbations, and three mechanisms act on it:

      - *saturation of shared programs*: the program activity is ``a_k = cap_k tanh(u_k / cap_k)``
        (capacity ``cap_k ~ U(0.5, 0.8)``; singles saturate too), so two perturbations on the same program add
        sub-additively, and on different programs exactly additively;
      - *a cascade*: a regulator, the target gene ``R`` of a perturbation ``B``, drives ``B``'s programs; 1-3
        upstream perturbations ``A`` act only through it, each removing a share ``x_A ~ U(0.55, 0.9)`` of ``R``'s
        activity (``x_B = 1``). The loss ``l_R = min(1, sum of x)`` sends ``l_R e_B`` into the programs and lowers
        ``R``'s expression by ``l_R k_B``: ``A`` alone looks like a weaker ``B`` (with ``R`` down), and ``B`` masks
        ``A``'s downstream effect (``A+B`` is ``B`` plus ``A``'s own knock-down); two upstream perturbations of one
        regulator floor it too;
      - *AND gates on the regulatory network*: gate ``j`` with input programs ``(k1, k2)`` moves about 5% of the
        genes (genes loaded on no program, when there are enough) by
        ``G_jg h(d_k1 a_k1) h(d_k2 a_k2)``, ``h(x) = x^3 / (x^3 + 0.25^3)`` for ``x > 0`` (else 0),
        ``G_jg = +-U(0.6, 1.2)``: a gate gene responds only when both input programs are active, e.g. in the
        double of a perturbation on ``k1`` and one on ``k2`` and in neither single (synergy).

      The log-mean is ``b_t + W^T M_t a + sum_j G_j h h - (knock-downs)``: saturation and gates act before the
      cell-type response ``M_t`` (so unrelated doubles are exactly additive in every cell type); gates and
      knock-downs act on RNA only. The doubles are chosen, not drawn at random: a ``frac_epistatic`` share is
      non-additive, split over the mechanisms by ``mechanism_mix`` (largest remainders), the rest additive (no
      shared program, no gate seeing both, no shared regulator). Cascades, gates (and, with random effects, extra
      shared programs between two singles) are laid out until every mechanism has enough doubles, and the doubles
      taken from each pool, those with one mechanism first; a layout short of some kind is drawn again (20 draws,
      then a ``ValueError``). A double's ``flags`` (below) say which mechanisms make it non-additive and its
      ``interaction_kind`` the leading one (``'cascade'``, else ``'and_gate'``, else ``'saturation'``, else
      ``'additive'``). With 200 genes, 16 singles and 48 doubles (10 seeds), the L2 distance between a
      non-additive double's true log1p means and the additive expectation has median 1.75 (saturation), 2.27
      (cascade) and 2.41 (AND gate), against 5.4 for the random draws: learnable from structure, but subtler.
    * **Doses**: with ``doses`` given, each single is applied at each dose ``d`` with effect
      ``h_p(d) (W^T M_t e_p - k_p 1_target)``, ``h_p(d) = d^n / (d^n + EC50^n)`` (a Hill curve, sigmoid in
      log-dose; ``EC50`` log-uniform over the range of ``doses``, Hill coefficient ``n ~ U(1, 3)``).
      Combinations are applied at dose 1.0 only: each component at ``h_p(1.0)``, plus the unscaled
      interaction (include 1.0 in ``doses`` to observe the matching singles). Mechanistic: ``h_p(d)`` scales a
      perturbation's raw input, its share of a regulator's activity and its knock-down. Without ``doses`` every
      perturbation acts at full effect and ``obs['dose']`` is 1.0.
    * **Cells**: 20% controls, the rest spread evenly over the perturbed conditions; cell types spread evenly
      within each condition. Each cell ``c`` has a program state ``s_c ~ N(0, 0.2^2 I)`` (heterogeneity), a
      lognormal library size ``l_c`` (median ``20 n_genes``, log-sd 0.3) and counts
      ``x_cg ~ NB(mean = l_c / 1e4 exp(b_t + W^T s_c + effect), dispersion phi_g)`` (``var = mu + phi mu^2``,
      ``phi_g`` lognormal around 0.1).
    * **Responders**: each perturbed cell responds with probability ``responder_fraction`` (an independent coin
      flip per cell, from its own random stream, so ``responder_fraction=1.0`` leaves every other draw unchanged).
      A non-responder gets no perturbation effect at all (no program effect, no target knock-down, in RNA and
      protein): it is drawn exactly like a control cell of its cell type but keeps its perturbation label and dose.
      With ``responder_fraction < 1`` every condition is thus a two-component mixture (a bimodal response);
      ``obs['responder']`` marks the responders.
    * **Protein** (``protein=True``): ``n_proteins`` proteins ``P000, ...`` whose log-means are driven by the
      same program states and effects through their own loadings (each protein loads 2 programs), with their
      own baseline, library size and NB dispersion. Target knock-downs act on RNA only.

    Additivity is exact in log-mean space (``uns['vcell_simulation']['true_log_mean']``). In log1p(CP10k) group
    means (what benchmarks compare) it holds up to sampling noise because effects are moderate and
    mass-balanced: with 200 cells per condition and 200 genes, the L2 error of ``ctrl + (A - ctrl) + (B - ctrl)``
    on additive combos is about 0.96x the split-half noise of the combo's cells (at most 1.7x over 30 seeds),
    and on epistatic combos about 6x (median), i.e. 4.7-8x the additive error. Very strong effects, a floor
    of lowly expressed genes (large ``n_genes`` spreads ``1e4`` counts thinner) and library normalisation make
    the log1p(CP10k) picture deviate from exact additivity.

    Parameters
    ----------
    n_cells
        Number of cells.
    n_genes
        Number of genes.
    n_perturbations
        Number of single perturbations (each targets a distinct gene).
    n_combos
        Number of double perturbations (distinct pairs of singles).
    frac_epistatic
        Share of the combinations that carry an interaction effect (rounded to a whole number of combos).
    doses
        Dose values at which every single perturbation is applied; ``None`` for one full-effect dose.
    cell_types
        Number of cell types (named ``type0, type1, ...``) or a sequence of cell-type names.
    protein
        Also simulate a protein modality and return a :class:`~mudata.MuData`.
    n_programs
        Number of latent gene programs.
    n_proteins
        Number of proteins when ``protein=True``.
    effects
        ``"random"``: each single's program effect is drawn independently of its target gene;
        ``"target_programs"``: it acts on the programs that load its target (see above), the setting for zero-shot
        prediction of unseen genes from a gene graph.
    responder_fraction
        Probability, in ``(0, 1]``, that a perturbed cell responds; non-responders are drawn like controls of
        their cell type (see "Responders" above). ``1.0`` (default): every perturbed cell responds.
    interactions
        ``"random"`` (default): an epistatic double draws its own interaction (see "Combinations"; the data are
        those of earlier versions, bit for bit); ``"mechanistic"``: interactions follow from shared programs with
        saturation, AND gates and cascades (see "Mechanistic interactions").
    mechanism_mix
        With ``interactions="mechanistic"``: relative weights of the mechanisms among the ``frac_epistatic``
        share of non-additive doubles, a mapping with keys among ``"saturation"``, ``"and_gate"``, ``"cascade"``
        (missing keys weigh 0). ``None`` (default): a third each.
    seed
        Random seed; ``None`` uses ``vcell.settings.seed``. The same seed gives identical data.

    Returns
    -------
    :class:`~anndata.AnnData` of raw counts (float32 CSR in ``X``), or with ``protein=True`` a
    :class:`~mudata.MuData` with modalities ``rna`` (that AnnData) and ``prot``, sharing ``obs_names``.

    Sets the following fields:

    ``.obs['perturbation']``
        ``'control'``, a single ``'G0012'`` or a combination ``'G0012+G0087'`` (components sorted).
    ``.obs['cell_type']``
        ``'type0'``, ... (categorical).
    ``.obs['dose']``
        Dose of the perturbation (0 for controls; 1.0 for everything without ``doses``).
    ``.obs['responder']``
        ``True`` for perturbed cells that respond, ``False`` for non-responders and controls (bool; every
        perturbed cell with ``responder_fraction=1.0``).
    ``.uns['vcell_simulation']``
        The ground truth, h5ad-writable: ``perturbations`` (singles, sorted), ``combos``, ``epistatic``
        (bool per combo: non-additive), ``interaction_kind`` (``'additive'``, ``'synergy'``, ``'buffering'`` per
        combo; mechanistic: ``'additive'``, ``'saturation'``, ``'and_gate'``, ``'cascade'``),
        ``cell_types``, ``program_loadings`` (``n_programs x n_genes``), ``single_effects``
        (``n_perturbations x n_programs``), ``target_knockdown`` (per single), ``combo_interaction``
        (``n_combos x n_programs``), ``cell_type_response`` (``n_types x n_programs x n_programs``),
        ``single_effects_by_type`` (``n_types x n_perturbations x n_programs``), ``baseline_log_mean``
        (``n_types x n_genes``), ``dispersion`` (per gene), ``true_log_mean`` (conditions x cell types by genes:
        the log of the expected count per 1e4 library units, cell heterogeneity included; that of the
        responders: non-responders follow the ``control`` row of their cell type) with row labels
        ``true_log_mean_labels`` (``'G0012+G0087|type0'``; with doses ``'G0012@0.1|type0'``, ``'control@0|type0'``,
        ``'G0012+G0087@1|type0'``) and the row's ``true_log_mean_perturbation``, ``true_log_mean_cell_type``,
        ``true_log_mean_dose``; ``dose_response`` (``doses``, ``ec50``, ``hill`` per single) when ``doses`` is
        given; ``gene_graph`` with ``effects="target_programs"``: the ground-truth gene-gene graph in GEARS' format
        (``source``, ``target``, ``importance`` arrays: Jaccard index of the sets of programs loading two genes,
        for every pair of genes sharing one; ``pd.DataFrame(uns['vcell_simulation']['gene_graph'])``);
        ``responder_fraction``; ``params`` (the arguments). Mechanistic: ``single_effects`` are the singles'
        saturated program activities ``a`` at full effect, ``combo_interaction`` is ``a_AB - a_A - a_B`` (program
        level; the gates act on genes), and ``mechanistic`` holds the structure: ``mechanisms`` (the names),
        ``flags`` (``n_combos x 3`` bool: saturation, AND gate, cascade make the double non-additive),
        ``program_capacity``, ``program_direction``, ``direct_effects`` (raw inputs, ``n_perturbations x
        n_programs``; zero for upstream perturbations), ``cascade_upstream``, ``cascade_regulator``,
        ``cascade_strength`` (one entry per upstream perturbation), ``gate_programs`` (``n_gates x 2``),
        ``gate_loadings`` (``n_gates x n_genes``), ``gate_threshold``, ``gate_hill`` and ``network``, the whole
        regulatory network as an edge list (``source``, ``target``, ``kind``, ``weight``; kinds ``'effect'``
        perturbed gene -> ``programK``, ``'loading'`` program -> gene, ``'gate_input'`` program -> ``gateJ``,
        ``'gate'`` gate -> gene, ``'cascade'`` upstream perturbed gene -> regulator gene). With ``protein=True`` the protein ground truth
        (``program_loadings``, ``baseline_log_mean``, ``true_log_mean``, ``true_log_mean_labels``,
        ``dispersion``) is in ``mdata['prot'].uns['vcell_simulation']``, and ``mdata.obs`` and ``mdata.uns``
        hold copies of the RNA ``obs`` columns and ground truth.

    Examples
    --------
    >>> import vcell
    >>> adata = vcell.datasets.simulate(n_cells=500, n_genes=50, n_perturbations=4, n_combos=2, seed=0)
    >>> adata.shape
    (500, 50)
    >>> sorted(adata.uns["vcell_simulation"])[:3]
    ['baseline_log_mean', 'cell_type_response', 'cell_types']
    """
    if effects not in ("random", "target_programs"):
        msg = f"effects must be 'random' or 'target_programs', got {effects!r}"
        raise ValueError(msg)
    mix = _validate_interactions(interactions, mechanism_mix)
    is_number = isinstance(responder_fraction, int | float | np.number) and not isinstance(responder_fraction, bool)
    if not is_number or not 0.0 < responder_fraction <= 1.0:  # the comparison also rejects NaN
        msg = (
            "responder_fraction must be a number in (0, 1] (the chance that a perturbed cell responds), "
            f"got {responder_fraction!r}"
        )
        raise ValueError(msg)
    type_names, dose_arr = _validate(
        n_cells, n_genes, n_perturbations, n_combos, frac_epistatic, doses, cell_types, n_programs, n_proteins
    )
    n_cells, n_genes, n_perturbations, n_combos, n_programs = map(
        int, (n_cells, n_genes, n_perturbations, n_combos, n_programs)
    )
    seed = resolve_seed(seed)
    rng = np.random.default_rng(seed)
    n_types, k = len(type_names), n_programs

    # genes, programs, baselines
    genes = _names("G", n_genes)
    per_program = max(3, round(_PROGRAM_DENSITY * n_genes))
    base = rng.normal(0.0, _BASE_SD, size=n_genes)
    W = _sparse_loadings(rng, k, n_genes, per_program, level=base)
    z = rng.normal(0.0, 0.5, size=(n_types, k))
    z[0] = 0.0
    B = base[None, :] + z @ W + rng.normal(0.0, 0.2, size=(n_types, n_genes))
    B[0] = base
    B -= np.log(np.exp(B).sum(axis=1, keepdims=True)) - np.log(_TARGET_SUM)
    dispersion = np.exp(rng.normal(np.log(0.1), 0.5, size=n_genes))

    # single perturbations and cell-type responses
    pool = np.argsort(-base)[: max(n_genes // 2, n_perturbations)]  # targets among the better-expressed half
    if effects == "target_programs":
        loaded = W != 0
        pool = np.argsort(-base)[loaded.any(0)[np.argsort(-base)]]  # loaded genes, best expressed first
        if pool.size < n_perturbations:
            msg = (
                f"effects='target_programs' needs {n_perturbations} genes loaded on a program, only {pool.size} "
                "are; use fewer perturbations or more programs/genes"
            )
            raise ValueError(msg)
        pool = pool[: max(pool.size // 2, n_perturbations)]
        target_idx = np.sort(rng.choice(pool, size=n_perturbations, replace=False))
        direction = rng.choice([-1.0, 1.0], size=k)
        size = rng.uniform(_EFFECT_LOW, _EFFECT_HIGH, size=(n_perturbations, k))
        E = np.where(loaded[:, target_idx].T, direction[None, :] * size, 0.0)
    elif interactions == "mechanistic":  # every program moves one way, so shared programs saturate
        target_idx = np.sort(rng.choice(pool, size=n_perturbations, replace=False))
        direction = rng.choice([-1.0, 1.0], size=k)
        E = _directed_effects(rng, n_perturbations, direction)
    else:
        target_idx = np.sort(rng.choice(pool, size=n_perturbations, replace=False))
        E = np.array([_program_effect(rng, k) for _ in range(n_perturbations)]).reshape(n_perturbations, k)
    perts = [genes[i] for i in target_idx]
    knockdown = rng.uniform(1.0, 2.0, size=n_perturbations)
    M = np.empty((n_types, k, k))
    M[0] = np.eye(k)
    for t in range(1, n_types):
        Q, R = np.linalg.qr(rng.normal(size=(k, k)))
        Q = Q * np.sign(np.diag(R))[None, :]
        gains = np.exp(rng.normal(0.0, 0.3, size=k))
        M[t] = np.diag(gains) @ (0.7 * np.eye(k) + 0.3 * Q)

    # combinations
    n_epi = round(frac_epistatic * n_combos)
    mech = None
    if interactions == "mechanistic":
        ec50, hill_n, single_doses = _dose_response(rng, dose_arr, n_perturbations)
        at_one = np.ones(n_perturbations) if ec50 is None else _hill(1.0, ec50, hill_n)
        for attempt in range(_ATTEMPTS):  # a layout short of some kind of double is drawn again
            if attempt and effects == "random":
                E = _directed_effects(rng, n_perturbations, direction)
            mech = _Mechanisms(E, direction, np.ones(k), knockdown, target_idx, n_genes)
            try:
                combo_pairs, mech_flags = _build_mechanisms(
                    rng,
                    mech,
                    counts=_mechanism_counts(n_epi, mix),
                    n_additive=n_combos - n_epi,
                    scale=at_one,
                    loadings=W,
                    grow_programs=effects == "random",
                )
                break
            except _ShortOfDoubles as err:
                short = err
        else:
            msg = f"{short} (no layout in {_ATTEMPTS} draws)"
            raise ValueError(msg)
        epistatic = mech_flags.any(1)
        kind = _kinds(mech_flags).tolist()
        interaction = np.zeros((n_combos, k))
        for c, (i, j) in enumerate(combo_pairs):
            both = mech.condition({i: at_one[i], j: at_one[j]})[0]
            interaction[c] = both - mech.condition({i: at_one[i]})[0] - mech.condition({j: at_one[j]})[0]
    else:
        pairs = list(combinations(range(n_perturbations), 2))
        chosen = sorted(rng.choice(len(pairs), size=n_combos, replace=False).tolist()) if n_combos else []
        combo_pairs = [pairs[i] for i in chosen]
        epistatic = np.zeros(n_combos, dtype=bool)
        if n_epi:
            epistatic[rng.choice(n_combos, size=n_epi, replace=False)] = True
        interaction = np.zeros((n_combos, k))
        kind = ["additive"] * n_combos
        for c, (i, j) in enumerate(combo_pairs):
            if epistatic[c]:
                sign = 1.0 if rng.random() < 0.5 else -1.0
                shared = sign * rng.uniform(_INT_LOW, _INT_HIGH) * (E[i] + E[j])
                interaction[c] = shared + _INT_RANDOM * _program_effect(rng, k)
                kind[c] = "synergy" if sign > 0 else "buffering"
        ec50, hill_n, single_doses = _dose_response(rng, dose_arr, n_perturbations)
    combos = [COMBO_SEP.join((perts[i], perts[j])) for i, j in combo_pairs]

    def scale(p: int, dose: float) -> float:
        return 1.0 if ec50 is None else float(_hill(dose, ec50[p], hill_n[p]))

    # conditions: (label, dose, program effect, per-gene offset subtracted from the log-mean: knock-down - gates)
    conditions: list[tuple[str, float, np.ndarray, np.ndarray]] = [(CONTROL, 0.0, np.zeros(k), np.zeros(n_genes))]
    if mech is not None:
        for p in range(n_perturbations):
            for d in single_doses:
                activity, gate, kd = mech.condition({p: scale(p, d)})
                conditions.append((perts[p], float(d), activity, kd - gate))
        for i, j in combo_pairs:
            activity, gate, kd = mech.condition({i: scale(i, 1.0), j: scale(j, 1.0)})
            conditions.append((COMBO_SEP.join((perts[i], perts[j])), 1.0, activity, kd - gate))
    else:
        for p in range(n_perturbations):
            for d in single_doses:
                kd = np.zeros(n_genes)
                kd[target_idx[p]] = knockdown[p] * scale(p, d)
                conditions.append((perts[p], float(d), scale(p, d) * E[p], kd))
        for c, (i, j) in enumerate(combo_pairs):
            kd = np.zeros(n_genes)
            kd[target_idx[i]] = knockdown[i] * scale(i, 1.0)
            kd[target_idx[j]] = knockdown[j] * scale(j, 1.0)
            conditions.append((combos[c], 1.0, scale(i, 1.0) * E[i] + scale(j, 1.0) * E[j] + interaction[c], kd))
    n_cond = len(conditions)

    # true log-means per condition x cell type (program state noise contributes exp(sd^2 |W_g|^2 / 2) to the mean)
    hetero = 0.5 * _CELL_STATE_SD**2 * (W**2).sum(axis=0)
    prog = np.array([cond[2] for cond in conditions])  # n_cond x k
    kd_all = np.array([cond[3] for cond in conditions])  # n_cond x n_genes
    eff_prog = np.einsum("tij,cj->cti", M, prog)  # n_cond x n_types x k
    true_lm = B[None, :, :] + eff_prog @ W - kd_all[:, None, :] + hetero  # n_cond x n_types x n_genes

    # allocate cells
    if n_cond > 1:
        n_ctrl = max(round(_CONTROL_FRACTION * n_cells), 1)
        n_rest = n_cells - n_ctrl
        if n_rest < n_cond - 1:
            msg = f"n_cells={n_cells} is too small for {n_cond - 1} perturbed conditions plus controls; use more cells"
            raise ValueError(msg)
        per = np.full(n_cond - 1, n_rest // (n_cond - 1))
        per[: n_rest % (n_cond - 1)] += 1
        sizes = np.concatenate([[n_ctrl], per])
    else:
        sizes = np.array([n_cells])
    cond_of_cell = np.repeat(np.arange(n_cond), sizes)
    type_of_cell = np.concatenate([rng.permutation(np.arange(s) % n_types) for s in sizes])
    order = rng.permutation(n_cells)
    cond_of_cell, type_of_cell = cond_of_cell[order], type_of_cell[order]
    # responders: coin flips from their own stream (the main stream's draws do not depend on responder_fraction)
    coin = np.random.default_rng([seed, 7]).random(n_cells)
    responder = (cond_of_cell != 0) & (coin < responder_fraction)
    effect_of_cell = np.where(responder, cond_of_cell, 0)  # non-responders get condition 0, the control's effect

    # counts
    state = rng.normal(0.0, _CELL_STATE_SD, size=(n_cells, k))
    library = _COUNTS_PER_GENE * n_genes * np.exp(rng.normal(0.0, _LIBRARY_SD, size=n_cells))
    X = _sample_counts(
        rng,
        base=B,
        effect=eff_prog,
        loadings=W,
        state=state,
        offset=kd_all,
        type_of_cell=type_of_cell,
        cond_of_cell=effect_of_cell,
        size=library / _TARGET_SUM,
        dispersion=dispersion,
    )

    obs_names = _names("cell", n_cells)
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical([conditions[c][0] for c in cond_of_cell]),
            "cell_type": pd.Categorical(np.asarray(type_names, dtype=object)[type_of_cell], categories=type_names),
            "dose": np.array([conditions[c][1] for c in cond_of_cell], dtype=float),
            "responder": responder,
        },
        index=pd.Index(obs_names),
    )
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))

    def label(c: int, t: int) -> str:
        name, d = conditions[c][0], conditions[c][1]
        return f"{name}|{type_names[t]}" if dose_arr is None else f"{name}@{d:g}|{type_names[t]}"

    rows = [(c, t) for c in range(n_cond) for t in range(n_types)]
    single_effects = E  # mechanistic: the singles' saturated activities
    if mech is not None:
        single_effects = np.array([mech.condition({p: 1.0})[0] for p in range(n_perturbations)]).reshape(E.shape)
    truth: dict = {
        "perturbations": perts,
        "combos": combos,
        "epistatic": epistatic,
        "interaction_kind": kind,
        "cell_types": type_names,
        "program_loadings": W,
        "single_effects": single_effects,
        "target_knockdown": knockdown,
        "combo_interaction": interaction,
        "cell_type_response": M,
        "single_effects_by_type": np.einsum("tij,pj->tpi", M, E),
        "baseline_log_mean": B,
        "dispersion": dispersion,
        "true_log_mean": true_lm.reshape(n_cond * n_types, n_genes),
        "true_log_mean_labels": [label(c, t) for c, t in rows],
        "true_log_mean_perturbation": [conditions[c][0] for c, _ in rows],
        "true_log_mean_cell_type": [type_names[t] for _, t in rows],
        "true_log_mean_dose": np.array([conditions[c][1] for c, _ in rows]),
        "responder_fraction": float(responder_fraction),
        "params": {
            "n_cells": n_cells,
            "n_genes": n_genes,
            "n_perturbations": n_perturbations,
            "n_combos": n_combos,
            "frac_epistatic": float(frac_epistatic),
            "doses": np.array([]) if dose_arr is None else dose_arr,
            "n_cell_types": n_types,
            "protein": bool(protein),
            "n_programs": n_programs,
            "n_proteins": int(n_proteins) if protein else 0,
            "responder_fraction": float(responder_fraction),
            "seed": seed,
            "log_mean_units": "log expected count per 1e4 library-size units",
        },
    }
    if dose_arr is not None:
        truth["dose_response"] = {"doses": dose_arr, "ec50": ec50, "hill": hill_n}
    if effects == "target_programs":
        truth["gene_graph"] = _program_graph(W, genes)
    truth["params"]["effects"] = effects
    if mech is not None:
        truth["params"]["interactions"] = interactions
        truth["params"]["mechanism_mix"] = {m: float(mix[m]) for m in _MECHANISMS}
        truth["mechanistic"] = {
            "mechanisms": list(_MECHANISMS),
            "flags": mech_flags.reshape(n_combos, len(_MECHANISMS)),
            "program_capacity": mech.capacity,
            "program_direction": direction,
            "direct_effects": mech.direct,
            "cascade_upstream": [perts[i] for i in np.flatnonzero(mech.regulator_of >= 0)],
            "cascade_regulator": [perts[mech.regulator_of[i]] for i in np.flatnonzero(mech.regulator_of >= 0)],
            "cascade_strength": mech.strength[mech.regulator_of >= 0],
            "gate_programs": mech.gate_programs.astype(np.int64),
            "gate_loadings": mech.gate_loadings,
            "gate_threshold": _GATE_K,
            "gate_hill": _GATE_N,
            "network": _mechanistic_network(mech, W, genes, perts),
        }
    adata.uns["vcell_simulation"] = truth
    if not protein:
        return adata

    # protein modality: same program states and effects, own loadings/baseline/library/dispersion
    import mudata

    n_proteins = int(n_proteins)
    Wp = _sparse_loadings(rng, n_proteins, k, 2).T  # k x n_proteins, 2 programs per protein
    base_p = rng.normal(np.log(50.0), 1.0, size=n_proteins)
    Bp = base_p[None, :] + z @ Wp
    disp_p = np.exp(rng.normal(np.log(0.05), 0.3, size=n_proteins))
    hetero_p = 0.5 * _CELL_STATE_SD**2 * (Wp**2).sum(axis=0)
    true_lm_p = Bp[None, :, :] + eff_prog @ Wp + hetero_p
    lib_p = np.exp(rng.normal(0.0, _LIBRARY_SD, size=n_cells))
    Xp = _sample_counts(
        rng,
        base=Bp,
        effect=eff_prog,
        loadings=Wp,
        state=state,
        offset=None,
        type_of_cell=type_of_cell,
        cond_of_cell=effect_of_cell,
        size=lib_p,
        dispersion=disp_p,
    )
    prot = AnnData(
        X=Xp,
        obs=obs.copy(),
        var=pd.DataFrame(index=pd.Index(_names("P", n_proteins))),
    )
    prot.uns["vcell_simulation"] = {
        "program_loadings": Wp,
        "baseline_log_mean": Bp,
        "dispersion": disp_p,
        "true_log_mean": true_lm_p.reshape(n_cond * n_types, n_proteins),
        "true_log_mean_labels": list(truth["true_log_mean_labels"]),
        "log_mean_units": "log expected count at median library size",
    }
    with mudata_no_pull():
        mdata = mudata.MuData({"rna": adata, "prot": prot})
    for col in obs.columns:
        mdata.obs[col] = obs[col].values  # keeps categoricals
    mdata.uns["vcell_simulation"] = dict(truth)
    return mdata
