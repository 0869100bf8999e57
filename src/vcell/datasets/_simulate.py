"""Synthetic perturbation screens with known ground truth: :func:`simulate`."""

from __future__ import annotations

from collections.abc import Sequence
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
    * **Combinations** ``A+B`` (pairs of singles, components sorted) have program effect
      ``e_A + e_B + i_AB``. Additive combos have ``i_AB = 0`` (the log-mean is exactly the sum of the singles'
      shifts, in every cell type); a ``frac_epistatic`` share are epistatic, with
      ``i_AB = s c (e_A + e_B) + u``: ``s = +1`` (synergy) or ``-1`` (buffering), ``c ~ U(0.7, 1)`` and ``u`` a
      random program effect drawn like a single's. Both targets are knocked down.
    * **Doses**: with ``doses`` given, each single is applied at each dose ``d`` with effect
      ``h_p(d) (W^T M_t e_p - k_p 1_target)``, ``h_p(d) = d^n / (d^n + EC50^n)`` (a Hill curve, sigmoid in
      log-dose; ``EC50`` log-uniform over the range of ``doses``, Hill coefficient ``n ~ U(1, 3)``).
      Combinations are applied at dose 1.0 only: each component at ``h_p(1.0)``, plus the unscaled
      interaction (include 1.0 in ``doses`` to observe the matching singles). Without ``doses`` every
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
        (bool per combo), ``interaction_kind`` (``'additive'``, ``'synergy'``, ``'buffering'`` per combo),
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
        ``responder_fraction``; ``params`` (the arguments). With ``protein=True`` the protein ground truth
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
    pairs = list(combinations(range(n_perturbations), 2))
    chosen = sorted(rng.choice(len(pairs), size=n_combos, replace=False).tolist()) if n_combos else []
    combo_pairs = [pairs[i] for i in chosen]
    combos = [COMBO_SEP.join((perts[i], perts[j])) for i, j in combo_pairs]
    n_epi = round(frac_epistatic * n_combos)
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

    # dose response
    if dose_arr is not None:
        lo, hi = np.log(dose_arr[0]), np.log(dose_arr[-1])
        if hi - lo < 1e-8:
            lo, hi = lo - 1.0, hi + 1.0
        ec50 = np.exp(rng.uniform(lo, hi, size=n_perturbations))
        hill_n = rng.uniform(1.0, 3.0, size=n_perturbations)
        single_doses = dose_arr
    else:
        ec50 = hill_n = None
        single_doses = np.array([1.0])

    def scale(p: int, dose: float) -> float:
        return 1.0 if ec50 is None else float(_hill(dose, ec50[p], hill_n[p]))

    # conditions: (label, dose, program effect, per-gene knock-down vector)
    conditions: list[tuple[str, float, np.ndarray, np.ndarray]] = [(CONTROL, 0.0, np.zeros(k), np.zeros(n_genes))]
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
    truth: dict = {
        "perturbations": perts,
        "combos": combos,
        "epistatic": epistatic,
        "interaction_kind": kind,
        "cell_types": type_names,
        "program_loadings": W,
        "single_effects": E,
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
