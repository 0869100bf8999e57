"""Out-of-distribution train/val/test splits of perturbation screens: :func:`vcell.bench.split`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vcell._constants import COMBO_SEP, CONTROL, DOSE_COL, PERT_COL
from vcell._settings import logger
from vcell._utils import check_obs_keys, check_writable, resolve_seed
from vcell.pp._labels import canonical_labels

if TYPE_CHECKING:
    from anndata import AnnData

#: split kinds understood by :func:`split`
SPLIT_KINDS: tuple[str, ...] = (
    "combo_seen0",
    "combo_seen1",
    "combo_seen2",
    "combo_half",
    "unseen_perturbation",
    "unseen_cell_type",
    "unseen_dose",
    "random_cells",
)
#: categories of ``obs[key_added]``, in this order
SPLIT_CATEGORIES: tuple[str, ...] = ("train", "val", "test")

# options each kind accepts (through ``**kind_options``) and their defaults
_KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "combo_seen": {
        "train_gene_set_size": 0.75,
        "combo_seen2_train_frac": 0.75,
        "val_train_gene_set_size": 0.9,
        "val_combo_seen2_train_frac": 0.9,
    },
    "combo_half": {"val_frac": 0.1},
    "unseen_perturbation": {"held_out": None, "test_frac": 0.2, "val_frac": 0.1},
    "unseen_cell_type": {"cell_type_key": "cell_type", "held_out": None, "val_frac": 0.1},
    "unseen_dose": {"dose_key": DOSE_COL, "held_out_dose": None, "val_frac": 0.1},
    "random_cells": {"test_frac": 0.2, "val_frac": 0.1},
}


def _option_group(kind: str) -> str:
    return "combo_seen" if kind.startswith("combo_seen") else kind


# --------------------------------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------------------------------
def canonical_condition(label: str, control: str = CONTROL) -> str:
    """Canonical form of a condition label, read as :func:`vcell.pp.harmonize` reads it (one shared parser).

    ``"B+A"`` and ``"A+B"`` both become ``"A+B"``; ``"A+control"`` becomes ``"A"``; ``"control"`` stays ``control``.
    A label harmonize rejects (``"A+B+"``, ``"A+A"``) is a ValueError naming it.
    """
    canon = canonical_labels([label], control=control, where="condition label")[0]
    return control if canon == CONTROL else canon


def condition_parts(condition: str) -> list[str]:
    """The single perturbations of a canonical condition (``"A+B"`` -> ``["A", "B"]``)."""
    return condition.split(COMBO_SEP)


def cell_conditions(adata: AnnData, perturbation_key: str, control: str) -> np.ndarray:
    """Canonical condition label of every cell (object array), with clear errors for a missing or incomplete column.

    Labels are read by the parser of :func:`vcell.pp.harmonize` (:func:`vcell.pp._labels.label_parser`, separator
    ``"+"``): ``"B+A"`` is ``"A+B"``, and the labels harmonize rejects (``"A+B+"``, ``"A+A"``) raise the same
    ValueError here. Control cells keep the label ``control``.
    """
    if perturbation_key not in adata.obs.columns:
        cols = ", ".join(map(repr, list(adata.obs.columns)[:20]))
        msg = (
            f"perturbation_key {perturbation_key!r} is not in adata.obs (columns: {cols}); run vcell.pp.harmonize "
            f"first, which writes {PERT_COL!r}, or pass perturbation_key= naming the column of condition labels"
        )
        raise KeyError(msg)
    codes, uniques = pd.factorize(adata.obs[perturbation_key], use_na_sentinel=True)
    raws = [str(u) for u in uniques]
    n_missing = int((codes < 0).sum()) + int(np.isin(codes, [i for i, r in enumerate(raws) if not r.strip()]).sum())
    if n_missing:
        msg = f"adata.obs[{perturbation_key!r}] has {n_missing} missing labels; label every cell (controls {control!r})"
        raise ValueError(msg)
    canon = canonical_labels(raws, control=control, where=f"adata.obs[{perturbation_key!r}]")
    canon = np.array([control if c == CONTROL else c for c in canon], dtype=object)
    return canon[codes] if len(codes) else np.array([], dtype=object)


def dose_values(adata: AnnData, dose_key: str) -> np.ndarray:
    """Doses in ``obs[dose_key]`` as floats (float32 columns stay float32 so their labels are stable)."""
    check_obs_keys(adata, [dose_key], what="dose_key")
    col = adata.obs[dose_key]
    num = pd.to_numeric(col, errors="coerce")
    bad = num.isna() & col.notna()
    if bad.any():
        msg = f"adata.obs[{dose_key!r}] must be numeric; e.g. {list(col[bad].astype(str).unique()[:5])} are not numbers"
        raise ValueError(msg)
    arr = num.to_numpy()
    return arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float64)


def format_dose(dose: float | np.floating) -> str:
    """Shortest exact text of a dose (``1000.0`` -> ``"1000"``, ``0.1`` -> ``"0.1"``)."""
    return np.format_float_positional(dose, trim="-")


def dose_condition(condition: str, dose: float | np.floating) -> str:
    """Label of a (condition, dose) pair: ``"<condition>@<dose>"``."""
    return f"{condition}@{format_dose(dose)}"


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------
def _n_draw(frac: float, n: int, *, min_left: int, name: str) -> int:
    """How many of ``n`` items a share ``frac`` takes: rounded, at least 1 when ``frac > 0``, leaving ``min_left``."""
    if not 0 <= frac < 1:
        msg = f"{name} must be in [0, 1), got {frac!r}"
        raise ValueError(msg)
    k = round(frac * n)
    if frac > 0:
        k = max(k, 1)
    return max(min(k, n - min_left), 0)


def _preview(items: Sequence[str], n: int = 20) -> str:
    items = list(items)
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(map(repr, items[:n])) + more


def _gears_simulation(
    conditions: Sequence[str], train_gene_set_size: float, combo_seen2_train_frac: float, seed: int
) -> tuple[list[str], list[str], dict[str, list[str]], list[str]]:
    """One round of the GEARS "simulation" split over canonical, non-control conditions (singles and pairs).

    Returns train conditions, test conditions, test subgroups and the train gene set. The random draws are made as
    GEARS makes them (numpy's legacy generator seeded with ``seed``, drawing indices into the sorted gene list and,
    reseeded, into the sorted list of combinations whose genes are both train genes), so the same seed and the same
    condition names give GEARS' split.
    """
    parts = {c: condition_parts(c) for c in conditions}
    genes = sorted({g for p in parts.values() for g in p})
    n_train_genes = int(len(genes) * train_gene_set_size)
    rs = np.random.RandomState(seed)
    train_genes = {genes[i] for i in rs.choice(len(genes), n_train_genes, replace=False)}

    singles = sorted(c for c in conditions if len(parts[c]) == 1)
    combos = sorted(c for c in conditions if len(parts[c]) > 1)
    n_seen = {c: sum(g in train_genes for g in parts[c]) for c in combos}
    pool = [c for c in combos if n_seen[c] == len(parts[c])]  # both genes seen
    n_pool_train = int(len(pool) * combo_seen2_train_frac)
    rs = np.random.RandomState(seed)
    pool_train = {pool[i] for i in rs.choice(len(pool), n_pool_train, replace=False)}

    subgroups = {
        "unseen_single": [c for c in singles if parts[c][0] not in train_genes],
        "combo_seen0": [c for c in combos if n_seen[c] == 0],
        "combo_seen1": [c for c in combos if n_seen[c] == 1],
        "combo_seen2": [c for c in pool if c not in pool_train],
    }
    train = sorted([c for c in singles if parts[c][0] in train_genes] + list(pool_train))
    test = sorted(c for group in subgroups.values() for c in group)
    return train, test, subgroups, sorted(train_genes)


# --------------------------------------------------------------------------------------------------------------------
# split kinds: each returns (split label per cell, uns fields besides kind/seed/params)
# --------------------------------------------------------------------------------------------------------------------
def _by_condition(conds: np.ndarray, mapping: dict[str, str]) -> np.ndarray:
    out = np.full(len(conds), "train", dtype=object)
    for name in ("val", "test"):
        chosen = [c for c, s in mapping.items() if s == name]
        out[pd.Series(conds).isin(chosen).to_numpy()] = name
    return out


def _split_combo_seen(
    conds: np.ndarray,
    control: str,
    k: int,
    seed: int,
    *,
    train_gene_set_size: float,
    combo_seen2_train_frac: float,
    val_train_gene_set_size: float,
    val_combo_seen2_train_frac: float,
) -> tuple[np.ndarray, dict[str, Any]]:
    for name, value in (
        ("train_gene_set_size", train_gene_set_size),
        ("combo_seen2_train_frac", combo_seen2_train_frac),
        ("val_train_gene_set_size", val_train_gene_set_size),
        ("val_combo_seen2_train_frac", val_combo_seen2_train_frac),
    ):
        if not 0 < value <= 1:
            msg = f"{name} must be in (0, 1], got {value!r}"
            raise ValueError(msg)
    perturbed = sorted(set(conds) - {control})
    large = [c for c in perturbed if len(condition_parts(c)) > 2]
    if large:
        msg = (
            f"the GEARS simulation split (kind 'combo_seen{k}') defines subgroups for single and double perturbations "
            f"only; found {len(large)} conditions with 3 or more parts: {_preview(large, 5)}"
        )
        raise ValueError(msg)
    train, test, subgroups, train_genes = _gears_simulation(
        perturbed, train_gene_set_size, combo_seen2_train_frac, seed
    )
    train, val, val_subgroups, _ = _gears_simulation(train, val_train_gene_set_size, val_combo_seen2_train_frac, seed)
    held_out = subgroups[f"combo_seen{k}"]
    if not held_out:
        n_single = sum(len(condition_parts(c)) == 1 for c in perturbed)
        sizes = ", ".join(f"{name}: {len(v)}" for name, v in subgroups.items())
        msg = (
            f"kind 'combo_seen{k}' has no test conditions for seed {seed}: the split's test subgroups are ({sizes}); "
            f"the data have {n_single} single and {len(perturbed) - n_single} double perturbations over "
            f"{len({g for c in perturbed for g in condition_parts(c)})} genes. Too few singles/combos for this kind; "
            "try another seed or kind"
        )
        raise ValueError(msg)
    mapping = dict.fromkeys(train, "train") | dict.fromkeys(val, "val") | dict.fromkeys(test, "test")
    info = {
        "held_out": held_out,
        "test_conditions": test,
        "subgroups": subgroups,
        "val_subgroups": val_subgroups,
        "train_genes": train_genes,
    }
    return _by_condition(conds, mapping), info


def _split_combo_half(conds: np.ndarray, control: str, seed: int, *, val_frac: float) -> tuple[np.ndarray, dict]:
    perturbed = sorted(set(conds) - {control})
    doubles = [c for c in perturbed if len(condition_parts(c)) > 1]
    if len(doubles) < 2:
        msg = (
            f"kind 'combo_half' needs at least 2 combination perturbations; the data have {len(doubles)} "
            f"(and {len(perturbed) - len(doubles)} singles)"
        )
        raise ValueError(msg)
    rs = np.random.RandomState(seed)
    train_doubles = sorted(doubles[i] for i in rs.choice(len(doubles), len(doubles) // 2, replace=False))
    test = [c for c in doubles if c not in set(train_doubles)]
    rng = np.random.default_rng(seed)
    n_val = _n_draw(val_frac, len(train_doubles), min_left=1, name="val_frac")
    val = sorted(train_doubles[i] for i in rng.choice(len(train_doubles), n_val, replace=False))
    mapping = dict.fromkeys(val, "val") | dict.fromkeys(test, "test")
    return _by_condition(conds, mapping), {"held_out": test, "test_conditions": test}


def _split_unseen_perturbation(
    conds: np.ndarray,
    control: str,
    seed: int,
    *,
    held_out: str | Sequence[str] | None,
    test_frac: float,
    val_frac: float,
) -> tuple[np.ndarray, dict]:
    perturbed = sorted(set(conds) - {control})
    singles = [c for c in perturbed if len(condition_parts(c)) == 1]
    rng = np.random.default_rng(seed)
    if held_out is not None:
        held = sorted(
            {canonical_condition(h, control) for h in ([held_out] if isinstance(held_out, str) else held_out)}
        )
        unknown = [h for h in held if h not in singles]
        if unknown:
            msg = f"held_out {unknown[:5]} are not single perturbations in the data; valid: {_preview(singles)}"
            raise ValueError(msg)
        if len(held) >= len(singles):
            msg = f"held_out lists all {len(singles)} single perturbations; leave at least one for training"
            raise ValueError(msg)
    else:
        if len(singles) < 2:
            msg = f"kind 'unseen_perturbation' needs at least 2 single perturbations; the data have {len(singles)}"
            raise ValueError(msg)
        n_test = _n_draw(test_frac, len(singles), min_left=1, name="test_frac")
        if n_test == 0:
            msg = f"test_frac={test_frac!r} holds out no perturbation; pass test_frac > 0 or held_out="
            raise ValueError(msg)
        held = sorted(singles[i] for i in rng.choice(len(singles), n_test, replace=False))
    rest = [s for s in singles if s not in set(held)]
    n_val = _n_draw(val_frac, len(rest), min_left=1, name="val_frac")
    val_genes = {rest[i] for i in rng.choice(len(rest), n_val, replace=False)}
    held_genes = set(held)
    mapping = {}
    for c in perturbed:
        genes = set(condition_parts(c))
        mapping[c] = "test" if genes & held_genes else "val" if genes & val_genes else "train"
    test = sorted(c for c, s in mapping.items() if s == "test")
    return _by_condition(conds, mapping), {"held_out": held, "test_conditions": test}


def _split_unseen_cell_type(
    adata: AnnData,
    conds: np.ndarray,
    control: str,
    seed: int,
    *,
    cell_type_key: str,
    held_out: str | None,
    val_frac: float,
) -> tuple[np.ndarray, dict]:
    check_obs_keys(adata, [cell_type_key], what="cell_type_key")
    col = adata.obs[cell_type_key]
    if col.isna().any():
        msg = f"adata.obs[{cell_type_key!r}] has {int(col.isna().sum())} missing values; label every cell's type"
        raise ValueError(msg)
    ct = col.astype(str).to_numpy()
    is_ctrl = conds == control
    types = sorted(set(ct))
    has_ctrl = set(ct[is_ctrl])
    has_pert = set(ct[~is_ctrl])
    eligible = [t for t in types if t in has_ctrl and t in has_pert]
    rng = np.random.default_rng(seed)
    if held_out is None:
        if not eligible:
            msg = f"no cell type in adata.obs[{cell_type_key!r}] has both control and perturbed cells (types: {types})"
            raise ValueError(msg)
        cell_type = eligible[int(rng.integers(len(eligible)))]
    else:
        cell_type = str(held_out)
        if cell_type not in types:
            msg = f"held_out cell type {cell_type!r} is not in adata.obs[{cell_type_key!r}]; valid types: {types}"
            raise ValueError(msg)
        if cell_type not in eligible:
            what = "perturbed" if cell_type not in has_pert else f"control ({control!r})"
            msg = (
                f"cell type {cell_type!r} has no {what} cells, so it cannot be held out; "
                f"types with both control and perturbed cells: {eligible}"
            )
            raise ValueError(msg)
    test = (ct == cell_type) & ~is_ctrl
    others = np.flatnonzero((ct != cell_type) & ~is_ctrl)
    if not len(others):
        msg = f"only cell type {cell_type!r} has perturbed cells; nothing is left to learn the perturbation from"
        raise ValueError(msg)
    out = np.full(len(conds), "train", dtype=object)
    n_val = _n_draw(val_frac, len(others), min_left=1, name="val_frac")
    out[rng.choice(others, n_val, replace=False)] = "val"
    out[test] = "test"
    held = sorted(set(conds[test]))
    info = {"held_out": held, "test_conditions": held, "cell_type": cell_type, "cell_type_key": cell_type_key}
    return out, info


def _split_unseen_dose(
    adata: AnnData,
    conds: np.ndarray,
    control: str,
    seed: int,
    *,
    dose_key: str,
    held_out_dose: float | None,
    val_frac: float,
) -> tuple[np.ndarray, dict]:
    dose = dose_values(adata, dose_key)
    is_ctrl = conds == control
    has_dose = ~np.isnan(dose)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(conds), dtype=bool)
    held: list[str] = []
    n_levels: dict[str, int] = {}
    for cond in sorted(set(conds[~is_ctrl])):
        in_cond = (conds == cond) & has_dose
        levels = np.unique(dose[in_cond])
        n_levels[cond] = len(levels)
        if len(levels) < 3:
            continue
        if held_out_dose is None:
            interior = levels[1:-1]
            level = interior[int(rng.integers(len(interior)))]
        else:
            match = levels[np.isclose(levels, held_out_dose, rtol=1e-6, atol=0)]
            if not len(match):
                continue
            level = match[0]
        held.append(dose_condition(cond, level))
        test |= in_cond & (dose == level)
    if not any(n >= 3 for n in n_levels.values()):
        counts = ", ".join(f"{c}: {n}" for c, n in list(n_levels.items())[:20])
        msg = f"kind 'unseen_dose' needs a perturbation with >= 3 dose levels in adata.obs[{dose_key!r}]; levels: {counts}"
        raise ValueError(msg)
    if not held:
        msg = f"held_out_dose={held_out_dose!r} is not a dose level of any perturbation with >= 3 levels"
        raise ValueError(msg)
    others = np.flatnonzero(~is_ctrl & ~test)
    out = np.full(len(conds), "train", dtype=object)
    n_val = _n_draw(val_frac, len(others), min_left=1, name="val_frac")
    out[rng.choice(others, n_val, replace=False)] = "val"
    out[test] = "test"
    return out, {"held_out": held, "test_conditions": held, "dose_key": dose_key}


def _split_random_cells(
    conds: np.ndarray, control: str, seed: int, *, test_frac: float, val_frac: float
) -> tuple[np.ndarray, dict]:
    idx = np.flatnonzero(conds != control)
    rng = np.random.default_rng(seed)
    n_test = _n_draw(test_frac, len(idx), min_left=1, name="test_frac")
    if n_test == 0:
        msg = f"kind 'random_cells' puts no cell in test ({len(idx)} perturbed cells, test_frac={test_frac!r})"
        raise ValueError(msg)
    n_val = _n_draw(val_frac, len(idx) - n_test, min_left=1, name="val_frac")
    perm = rng.permutation(idx)
    out = np.full(len(conds), "train", dtype=object)
    out[perm[:n_test]] = "test"
    out[perm[n_test : n_test + n_val]] = "val"
    return out, {"held_out": [], "test_conditions": sorted(set(conds[perm[:n_test]]))}


# --------------------------------------------------------------------------------------------------------------------
# public
# --------------------------------------------------------------------------------------------------------------------
def split(
    adata: AnnData,
    *,
    kind: str,
    seed: int | None = None,
    key_added: str = "vcell_split",
    perturbation_key: str = PERT_COL,
    control: str = CONTROL,
    copy: bool = False,
    overwrite: bool = False,
    **kind_options: Any,
) -> AnnData | None:
    """Split a perturbation screen into train/val/test cells for an out-of-distribution task.

    The split is a deterministic function of (``adata``'s labels, ``kind``, ``seed``). Condition labels are read
    order-insensitively (``"B+A"`` is the condition ``"A+B"``; parts equal to ``control`` are dropped). Control cells
    always go to ``train``: they are the source cells every prediction starts from. ``val`` holds perturbed cells
    only (for early stopping and model selection) and never overlaps a held-out condition. Check a split with
    :func:`vcell.bench.check_leakage`.

    Kinds (options are passed as keyword arguments):

    ``combo_seen0``, ``combo_seen1``, ``combo_seen2``
        The GEARS "simulation" split (``DataSplitter.get_simulation_split``). A seeded share
        ``train_gene_set_size`` (0.75) of all genes is the train gene set; singles of train genes and a share
        ``combo_seen2_train_frac`` (0.75) of the doubles whose two genes are both train genes go to training; test
        holds the unseen singles and the doubles with 0, 1 and (the other 25%) 2 seen genes, each in its subgroup
        (``unseen_single``, ``combo_seen0``, ``combo_seen1``, ``combo_seen2``). The same recipe run on the training
        conditions at ``val_train_gene_set_size`` and ``val_combo_seen2_train_frac`` (0.9) gives val. All three kinds
        make the same split for a seed; ``combo_seenK`` sets ``held_out`` to the test conditions of subgroup
        ``combo_seenK`` (the other test conditions stay in test, so nothing held out leaks into training). A gene
        is "seen" when it is in the train gene set (GEARS' definition). The draws are GEARS' (numpy's legacy
        generator over sorted names), so the same seed and canonical condition names reproduce GEARS' split.
        Only single and double perturbations are allowed; an empty subgroup ``combo_seenK`` raises.
    ``combo_half``
        Ahlmann-Eltze et al. 2025: a seeded half (rounded down) of all doubles and all singles train, the other
        doubles are held out for test (drawn as in their code, ``np.random.seed(seed)`` over the sorted doubles).
        Deviation: their code uses a quarter of the held-out doubles as validation set yet reports metrics on all
        held-out doubles; here all held-out doubles are test and val is a seeded share ``val_frac`` (0.1) of the
        *training* doubles instead (``val_frac=0`` keeps their training set exactly).
    ``unseen_perturbation``
        Whole single perturbations held out (GEARS "single", Systema): ``held_out`` (names) or a seeded share
        ``test_frac`` (0.2) of the singles. Combinations containing a held-out perturbation also go to test (so
        that its effect is never seen), but ``held_out`` lists the held-out singles only. Val: a seeded share
        ``val_frac`` (0.1) of the remaining singles, with the combinations containing them.
    ``unseen_cell_type``
        The perturbed cells of one cell type (``obs[cell_type_key]``, ``cell_type_key="cell_type"``) are test;
        that type's controls stay in train (scGen / CellOT / CPA on Kang 2018). ``held_out`` names the type; by
        default it is a seeded choice among the types with both control and perturbed cells. Val: a seeded share
        ``val_frac`` (0.1) of the other types' perturbed cells (i.i.d. cells). ``uns[key_added]['held_out']`` lists
        the perturbation conditions of the held-out type, ``['cell_type']`` the type.
    ``unseen_dose``
        For every perturbation with at least 3 dose levels in ``obs[dose_key]`` (``dose_key="vcell_dose"``), one
        level is held out: ``held_out_dose`` where that perturbation has it, else a seeded choice among its interior
        levels (neither lowest nor highest: interpolation, as in CPA / chemCPA on sci-Plex). ``held_out`` lists
        ``"<perturbation>@<dose>"`` labels. Perturbations with fewer levels stay in training. Val: a seeded share
        ``val_frac`` (0.1) of the remaining perturbed cells (i.i.d. cells).
    ``random_cells``
        An i.i.d. split of the perturbed cells (``test_frac=0.2``, ``val_frac=0.1``); a sanity check only, never a
        headline number. ``held_out`` is empty.

    Parameters
    ----------
    adata
        Annotated data with a condition label per cell in ``obs[perturbation_key]``.
    kind
        One of :data:`SPLIT_KINDS`.
    seed
        Random seed; ``None`` uses ``vcell.settings.seed``. The field references use seeds 1-5.
    key_added
        Key of the split in ``obs`` and ``uns``.
    perturbation_key
        Column of ``obs`` holding canonical condition labels (written by :func:`vcell.pp.harmonize`).
    control
        Label of control cells.
    copy
        Return a modified copy instead of writing into ``adata``.
    overwrite
        Replace ``obs[key_added]`` / ``uns[key_added]`` when they exist (a previous split, say); without it an
        existing one is a ValueError naming it, before anything is computed.
    **kind_options
        Options of the chosen kind (see above); unknown options raise.

    Returns
    -------
    ``None``, or a copy of ``adata`` with the split when ``copy=True``.

    Sets the following fields:

    ``adata.obs[key_added]``
        Categorical with categories ``["train", "val", "test"]``.
    ``adata.uns[key_added]``
        Dict (writable to h5ad) with ``kind``, ``seed``, ``held_out`` (list of the conditions to evaluate),
        ``test_conditions`` (all conditions with cells in test), ``params`` (the kind's options, ``None`` values
        omitted), ``perturbation_key``, ``control``, ``n_cells`` (per split) and per kind: ``subgroups`` and
        ``val_subgroups`` (subgroup -> conditions) and ``train_genes`` (``combo_seen*``); ``cell_type`` and
        ``cell_type_key`` (``unseen_cell_type``); ``dose_key`` (``unseen_dose``).

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> import vcell
    >>> labels = ["control"] * 4 + ["A", "B", "C", "D", "A+B", "C+D", "B+C", "A+D"] * 2
    >>> obs = pd.DataFrame({"vcell_perturbation": labels}, index=[f"cell{i}" for i in range(len(labels))])
    >>> adata = ad.AnnData(np.zeros((len(labels), 3)), obs=obs)
    >>> vcell.bench.split(adata, kind="combo_half", seed=1)
    >>> adata.uns["vcell_split"]["held_out"]
    ['A+B', 'A+D']
    >>> vcell.bench.check_leakage(adata)
    """
    if kind not in SPLIT_KINDS:
        msg = f"unknown split kind {kind!r}; valid kinds: {list(SPLIT_KINDS)}"
        raise ValueError(msg)
    defaults = _KIND_OPTIONS[_option_group(kind)]
    unknown = sorted(set(kind_options) - set(defaults))
    if unknown:
        msg = f"unknown option(s) {unknown} for split kind {kind!r}; valid options: {sorted(defaults)}"
        raise ValueError(msg)
    options = defaults | kind_options
    seed = resolve_seed(seed)
    if not isinstance(key_added, str) or not key_added:
        msg = f"key_added must be a non-empty string, got {key_added!r}"
        raise ValueError(msg)
    if key_added == perturbation_key:
        msg = f"key_added {key_added!r} is the perturbation_key: the split would replace the condition labels"
        raise ValueError(msg)
    check_writable(adata, obs=[key_added], uns=[key_added], overwrite=overwrite, what="split")
    adata = adata.copy() if copy else adata

    conds = cell_conditions(adata, perturbation_key, control)
    if not np.any(conds != control):
        msg = f"adata.obs[{perturbation_key!r}] holds only control cells ({control!r}); nothing to split"
        raise ValueError(msg)

    if kind.startswith("combo_seen"):
        labels, info = _split_combo_seen(conds, control, int(kind[-1]), seed, **options)
    elif kind == "combo_half":
        labels, info = _split_combo_half(conds, control, seed, **options)
    elif kind == "unseen_perturbation":
        labels, info = _split_unseen_perturbation(conds, control, seed, **options)
    elif kind == "unseen_cell_type":
        labels, info = _split_unseen_cell_type(adata, conds, control, seed, **options)
    elif kind == "unseen_dose":
        labels, info = _split_unseen_dose(adata, conds, control, seed, **options)
    else:
        labels, info = _split_random_cells(conds, control, seed, **options)

    labels[conds == control] = "train"
    n_cells = {name: int((labels == name).sum()) for name in SPLIT_CATEGORIES}
    params = {}
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, Sequence) and not isinstance(value, str):
            value = [str(v) for v in value]
        params[name] = value
    adata.obs[key_added] = pd.Categorical(labels, categories=list(SPLIT_CATEGORIES))
    adata.uns[key_added] = {
        "kind": kind,
        "seed": seed,
        "held_out": list(info.pop("held_out")),
        "test_conditions": list(info.pop("test_conditions")),
        "params": params,
        "perturbation_key": perturbation_key,
        "control": control,
        "n_cells": n_cells,
        **info,
    }
    logger.info(
        "split %r (seed %d): %d train, %d val, %d test cells; %d held-out conditions",
        kind,
        seed,
        n_cells["train"],
        n_cells["val"],
        n_cells["test"],
        len(adata.uns[key_added]["held_out"]),
    )
    return adata if copy else None
