"""Leakage guard for benchmark splits: :func:`vcell.bench.check_leakage`."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from vcell._constants import CONTROL, PERT_COL
from vcell._settings import logger
from vcell._utils import check_obs_keys

from ._split import (
    SPLIT_CATEGORIES,
    SPLIT_KINDS,
    canonical_condition,
    cell_conditions,
    condition_parts,
    dose_condition,
    dose_values,
)

if TYPE_CHECKING:
    from anndata import AnnData


def _str_list(value: Any) -> list[str]:
    """A list of str from a list, tuple or array read back from h5ad (which may be an empty float array)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in np.asarray(value, dtype=object).ravel()]


def check_leakage(adata: AnnData, *, key: str = "vcell_split", perturbation_key: str = PERT_COL) -> None:
    """Raise if a held-out condition of a benchmark split appears among its training or validation cells.

    Reads the split written by :func:`vcell.bench.split` (``obs[key]`` and ``uns[key]``) and checks, by kind:

    - ``combo_seen*``, ``combo_half``, ``unseen_perturbation``: no train/val cell carries a test condition,
      combinations compared order-insensitively (``"B+A"`` is ``"A+B"``). For ``combo_seen*`` every train/val
      condition also uses only genes of the split's train gene set; for ``unseen_perturbation`` no train/val
      condition contains a held-out perturbation.
    - ``unseen_cell_type``: no train/val cell is a perturbed cell of the held-out cell type (pairs of
      perturbation and cell type).
    - ``unseen_dose``: no train/val cell carries a held-out (perturbation, dose) pair.
    - ``random_cells``: nothing to check (conditions are shared by design).

    Parameters
    ----------
    adata
        Annotated data split by :func:`vcell.bench.split`.
    key
        Key of the split in ``obs`` and ``uns`` (``key_added`` of :func:`vcell.bench.split`).
    perturbation_key
        Column of ``obs`` holding condition labels.

    Returns
    -------
    ``None``; raises :class:`ValueError` naming the leaking conditions and their numbers of cells.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> import vcell
    >>> labels = ["control"] * 4 + ["A", "B", "C", "D", "A+B", "C+D", "B+C", "A+D"] * 2
    >>> obs = pd.DataFrame({"vcell_perturbation": labels}, index=[f"cell{i}" for i in range(len(labels))])
    >>> adata = ad.AnnData(np.zeros((len(labels), 3)), obs=obs)
    >>> vcell.bench.split(adata, kind="combo_half", seed=1)
    >>> vcell.bench.check_leakage(adata)
    >>> adata.obs.loc[adata.obs["vcell_split"] == "test", "vcell_split"] = "train"
    >>> vcell.bench.check_leakage(adata)
    Traceback (most recent call last):
    ...
    ValueError: data leakage in split 'vcell_split' (kind 'combo_half'): 4 train/val cells carry held-out conditions: ...
    """
    if key not in adata.uns:
        msg = f"adata.uns[{key!r}] not found; run vcell.bench.split(adata, kind=..., key_added={key!r}) first"
        raise KeyError(msg)
    info = adata.uns[key]
    check_obs_keys(adata, [key], what="split key")
    kind = str(info.get("kind"))
    if kind not in SPLIT_KINDS:
        msg = f"adata.uns[{key!r}]['kind'] is {kind!r}, not a split kind; valid kinds: {list(SPLIT_KINDS)}"
        raise ValueError(msg)
    split = adata.obs[key].astype(object).to_numpy()
    bad = ~np.isin(split.astype(str), SPLIT_CATEGORIES) | adata.obs[key].isna().to_numpy()
    if bad.any():
        msg = (
            f"adata.obs[{key!r}] has {int(bad.sum())} cells outside {list(SPLIT_CATEGORIES)} "
            f"(e.g. {sorted(set(map(str, split[bad])))[:5]})"
        )
        raise ValueError(msg)
    if kind == "random_cells":
        logger.debug("check_leakage: split %r is i.i.d. cells (kind 'random_cells'); nothing to check", key)
        return None

    control = str(info.get("control", CONTROL))
    conds = cell_conditions(adata, perturbation_key, control)
    seen = np.isin(split.astype(str), ["train", "val"])
    held_out = [canonical_condition(c, control) for c in _str_list(info.get("held_out"))]
    test_conditions = {canonical_condition(c, control) for c in _str_list(info.get("test_conditions"))}
    leak = np.full(len(conds), None, dtype=object)  # why each leaking cell leaks

    if kind.startswith("combo_seen") or kind in ("combo_half", "unseen_perturbation"):
        for cond in set(conds[seen]):
            if cond == control:
                continue
            genes = set(condition_parts(cond))
            reason = None
            if cond in test_conditions:
                reason = cond
            elif kind.startswith("combo_seen") and genes - set(_str_list(info.get("train_genes"))):
                reason = f"{cond} (gene outside the train gene set)"
            elif kind == "unseen_perturbation" and genes & set(held_out):
                reason = f"{cond} (contains a held-out perturbation)"
            if reason is not None:
                leak[seen & (conds == cond)] = reason
    elif kind == "unseen_cell_type":
        ct_key = str(info.get("cell_type_key", "cell_type"))
        check_obs_keys(adata, [ct_key], what="cell_type_key (from the split's uns)")
        cell_type = str(info["cell_type"])
        ct = adata.obs[ct_key].astype(str).to_numpy()
        mask = seen & (ct == cell_type) & (conds != control)
        leak[mask] = [f"{c} in {cell_type}" for c in conds[mask]]
    else:  # unseen_dose
        dose = dose_values(adata, str(info.get("dose_key")))
        held_pairs = set()
        for label in held_out:
            cond, _, level = label.rpartition("@")
            held_pairs.add(f"{canonical_condition(cond, control)}@{level}")
        mask = seen & (conds != control) & ~np.isnan(dose)
        for i in np.flatnonzero(mask):
            pair = dose_condition(conds[i], dose[i])
            if pair in held_pairs:
                leak[i] = pair

    leaking = np.array([r is not None for r in leak], dtype=bool)
    if not leaking.any():
        return None
    counts = Counter(zip(leak[leaking], split[leaking].astype(str), strict=True))
    reasons = sorted({r for r, _ in counts})
    parts = []
    for reason in reasons[:20]:
        n = ", ".join(f"{counts[(reason, s)]} {s}" for s in ("train", "val") if counts[(reason, s)])
        parts.append(f"{reason} ({n})")
    more = f", ... ({len(reasons)} in all)" if len(reasons) > 20 else ""
    msg = (
        f"data leakage in split {key!r} (kind {kind!r}): {int(leaking.sum())} train/val cells carry held-out "
        f"conditions: {', '.join(parts)}{more}"
    )
    raise ValueError(msg)
