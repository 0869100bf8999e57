"""``vcell.pp.harmonize``: canonical perturbation labels, counts and doses."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vcell._constants import COMBO_SEP, CONTROL, DOSE_COL, N_PERT_COL, PERT_COL
from vcell._utils import check_obs_keys

from ._labels import LabelParser, ParsedLabel, _as_list, ambiguous_labels_message, label_parser

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("vcell")

UNS_KEY = "vcell_harmonize"
_MAX_SHOWN = 10


def _codes_and_uniques(col: pd.Series) -> tuple[np.ndarray, list[Any]]:
    """Integer code per cell (``-1`` for missing) and the unique values the codes index."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        return col.cat.codes.to_numpy().astype(np.int64), list(col.cat.categories)
    codes, uniques = pd.factorize(col, use_na_sentinel=True)
    return np.asarray(codes, dtype=np.int64), list(uniques)


def _shown(items: Sequence[str]) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > _MAX_SHOWN else ""
    return ", ".join(items[:_MAX_SHOWN]) + more


def _frequent_labels(raws: list[str], counts: np.ndarray, n: int = _MAX_SHOWN) -> str:
    order = np.argsort(-counts, kind="stable")[:n]
    return ", ".join(f"{raws[i]!r} ({int(counts[i])} cells)" for i in order if counts[i] > 0)


def _is_numeric(col: pd.Series) -> bool:
    dtype = col.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        return pd.api.types.is_numeric_dtype(dtype.categories.dtype)
    return pd.api.types.is_numeric_dtype(dtype)


def _parse_dose_string(value: Any, parsed: ParsedLabel, parser: LabelParser, dose_key: str) -> float:
    """Dose of a perturbed label from a (possibly per-component, ``"10+20"``) dose value."""
    where = f"obs[{dose_key!r}] value {value!r} of label {parsed.raw!r}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        msg = (
            f"obs[{dose_key!r}] is missing (NaN) for perturbed label {parsed.raw!r}; every perturbed cell needs a dose"
        )
        raise ValueError(msg)
    parts = parser.split_raw(str(value))
    try:
        doses = [float(p) for p in parts]
    except ValueError:
        msg = f"{where} is not a number or numbers joined by {parser.sep!r}"
        raise ValueError(msg) from None
    if len(doses) > 1:
        if len(doses) != len(parsed.parts):
            msg = (
                f"{where} has {len(doses)} components but the label has {len(parsed.parts)}; "
                "expected one dose, or one dose per component of the label"
            )
            raise ValueError(msg)
        doses = [d for d, c in zip(doses, parsed.is_control_part, strict=True) if not c]
    if any(not math.isfinite(d) for d in doses):
        msg = f"obs[{dose_key!r}] is missing (NaN) or infinite for perturbed label {parsed.raw!r} (value {value!r})"
        raise ValueError(msg)
    if any(d <= 0 for d in doses):
        msg = (
            f"{where} is zero or negative; doses of perturbed cells are positive amounts (e.g. concentrations, not "
            "log-doses): label untreated cells as controls, or give the perturbed cells their dose"
        )
        raise ValueError(msg)
    if len(set(doses)) > 1:
        msg = (
            f"{where} gives different doses to the components of a combination; per-component doses are not "
            "supported yet (vcell uses one dose per cell): give all components the same dose"
        )
        raise ValueError(msg)
    return doses[0]


def _doses(
    adata: AnnData,
    dose_key: str | None,
    codes: np.ndarray,
    parsed: dict[int, ParsedLabel],
    is_ctrl_cell: np.ndarray,
    parser: LabelParser,
) -> np.ndarray:
    """Dose per cell: 0 for controls, 1 without ``dose_key``, else the parsed ``obs[dose_key]``."""
    if dose_key is None:
        return np.where(is_ctrl_cell, 0.0, 1.0)
    col = adata.obs[dose_key]
    if _is_numeric(col):
        dose = np.asarray(col, dtype=np.float64).copy()
        bad = ~np.isfinite(dose) & ~is_ctrl_cell
        if bad.any():
            labels = sorted({parsed[int(c)].raw for c in np.unique(codes[bad])})
            msg = (
                f"obs[{dose_key!r}] is missing (NaN) or infinite for {int(bad.sum())} perturbed cells, labels: "
                f"{_shown([repr(x) for x in labels])}; every perturbed cell needs a dose"
            )
            raise ValueError(msg)
        bad = (dose <= 0) & ~is_ctrl_cell
        if bad.any():
            labels = sorted({parsed[int(c)].raw for c in np.unique(codes[bad])})
            values = ", ".join(f"{v:g}" for v in np.unique(dose[bad])[:5])
            msg = (
                f"obs[{dose_key!r}] is zero or negative for {int(bad.sum())} perturbed cells (values {values}; labels: "
                f"{_shown([repr(x) for x in labels])}); doses are positive amounts (e.g. concentrations, not "
                "log-doses): label untreated cells as controls, or give the perturbed cells their dose"
            )
            raise ValueError(msg)
        dose[is_ctrl_cell] = 0.0
        return dose
    # string (or mixed) doses: parse each distinct (label, dose) pair once
    dose_codes, dose_uniques = _codes_and_uniques(col)
    pair = codes * (len(dose_uniques) + 1) + (dose_codes + 1)
    pairs, inverse = np.unique(pair, return_inverse=True)
    values = np.zeros(len(pairs), dtype=np.float64)
    for i, p in enumerate(pairs):
        lab = parsed[int(p // (len(dose_uniques) + 1))]
        if lab.canonical == CONTROL:
            continue
        d = int(p % (len(dose_uniques) + 1)) - 1
        values[i] = _parse_dose_string(None if d < 0 else dose_uniques[d], lab, parser, dose_key)
    return values[inverse.ravel()]


def harmonize(
    adata: AnnData,
    *,
    perturbation_key: str,
    control: str | Sequence[str],
    sep: str | Sequence[str] = COMBO_SEP,
    dose_key: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Canonical perturbation labels, number of perturbations and doses for every cell.

    Raw labels are read from ``obs[perturbation_key]`` (left as they are) and mapped to canonical labels:

    - labels equal to one of ``control`` (after stripping whitespace) become ``"control"``;
    - other labels are split on ``sep`` into components (whitespace stripped); components equal to a control
      label are dropped, and so is GEARS' ``"ctrl"`` token when ``control`` includes ``"ctrl"`` or the data is
      GEARS style (some label combines ``ctrl`` with a perturbation, as in ``"A+ctrl"``); a label left with
      no component (``"ctrl+ctrl"``) is a control;
    - the remaining components are sorted (plain string order) and joined by ``"+"``: ``"B+A"`` and ``"A+B"``
      both become ``"A+B"``, and scPerturb's ``"B_A"`` (``sep="_"``) becomes ``"A+B"`` too.

    Matching is exact and case-sensitive. The work is done once per distinct label, so millions of cells are
    quick. Cells are never dropped or reordered. Running it again on its own output
    (``perturbation_key="vcell_perturbation"``, ``control="control"``) gives the same result.

    Parameters
    ----------
    adata
        Annotated data matrix of a perturbation screen.
    perturbation_key
        ``obs`` column with the raw perturbation labels (strings or categories).
    control
        Raw label(s) of control cells, e.g. ``"control"``, ``"ctrl"`` (GEARS) or ``["NT", "safe-targeting"]``.
    sep
        Separator(s) between the components of combination labels: ``"+"`` (GEARS, vcell), ``"_"``
        (scPerturb) or several, e.g. ``("_", "+")``.
    dose_key
        Optional ``obs`` column with doses. Numbers are used as they are; strings are parsed as one number,
        or one number per component of the label (``"10+20"``, split on ``sep``; components dropped as
        controls are ignored). Controls get dose 0 whatever the column says; perturbed cells need a finite dose
        above 0 (a ValueError names the cells otherwise). Without ``dose_key``, perturbed cells get dose 1.
    copy
        Return a harmonised copy instead of writing into ``adata``.

    Returns
    -------
    The harmonised copy if ``copy=True``, else ``None``.

    Sets the following fields (and logs the report, one line per call, at INFO level on the ``vcell`` logger; at
    DEBUG when the labels are canonical already):

    ``adata.obs['vcell_perturbation']`` : categorical of str
        Canonical label: ``"control"``, ``"A"`` or ``"A+B"`` (categories: ``"control"`` first, then sorted).
    ``adata.obs['vcell_n_perturbations']`` : int
        Number of single perturbations (0 for controls, 1 for singles, 2+ for combinations).
    ``adata.obs['vcell_dose']`` : float
        Dose of the perturbation (0.0 for controls).
    ``adata.uns['vcell_harmonize']`` : dict
        The report: ``n_cells``, ``n_control``, ``n_single``, ``n_combo`` (cells), ``n_labels_raw`` and
        ``n_labels`` (distinct raw and canonical labels), ``relabelled`` (``{"raw": [...], "canonical": [...]}`` for the raw
        labels that changed), ``merged`` (``{canonical: [raw, ...]}`` for canonical labels written in two or
        more raw spellings, e.g. ``"A+B"`` and ``"B+A"``), ``params`` (``perturbation_key``, ``control`` and
        ``sep`` as lists, ``dose_key`` (``""`` when none), ``gears_ctrl``: whether ``"ctrl"`` tokens were
        dropped) and ``vcell_version``.

    Raises
    ------
    KeyError
        If ``perturbation_key`` or ``dose_key`` is not an ``obs`` column.
    ValueError
        If cells have a missing label (NaN, ``None`` or empty), no cell is a control, a label is ambiguous (an
        empty component as in ``"A++B"`` or ``"+A"``; a component twice as in ``"A+A"``; a component holding
        ``"+"`` when ``"+"`` is not a separator, as in ``"A+B_C"`` with ``sep="_"``; a component named
        ``"control"`` that is not a control label), ``control`` is not text (``control=0``: labels are matched as
        text, pass ``"0"``), or a perturbed cell's dose is missing, infinite, not a number, zero or negative (doses
        are positive amounts such as concentrations, not log-doses), or differs between the components of a
        combination (per-component doses are not supported yet).

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> obs = pd.DataFrame({"condition": ["ctrl", "A+ctrl", "B+A", "A+B"]}, index=list("wxyz"))
    >>> adata = ad.AnnData(np.zeros((4, 2), dtype=np.float32), obs=obs)
    >>> harmonize(adata, perturbation_key="condition", control="ctrl")
    >>> adata.obs["vcell_perturbation"].tolist()
    ['control', 'A', 'A+B', 'A+B']
    >>> adata.obs["vcell_n_perturbations"].tolist()
    [0, 1, 2, 2]
    """
    check_obs_keys(adata, [perturbation_key], what="perturbation_key")
    check_obs_keys(adata, [dose_key], what="dose_key")
    if copy:
        adata = adata.copy()
    elif adata.is_view:
        adata._init_as_actual(adata.copy())
    _harmonize(adata, perturbation_key=perturbation_key, control=control, sep=sep, dose_key=dose_key)
    return adata if copy else None


def _canonical_columns(adata: AnnData) -> tuple[np.ndarray, ...] | None:
    """The canonical ``obs`` columns harmonize writes (labels as str), or ``None`` when one is missing."""
    if not all(c in adata.obs for c in (PERT_COL, N_PERT_COL, DOSE_COL)):
        return None
    obs = adata.obs
    return (
        obs[PERT_COL].astype(str).to_numpy(),
        obs[N_PERT_COL].to_numpy(),
        obs[DOSE_COL].to_numpy(dtype=np.float64),
    )


def _harmonize(
    adata: AnnData,
    *,
    perturbation_key: str,
    control: str | Sequence[str],
    sep: str | Sequence[str] = COMBO_SEP,
    dose_key: str | None = None,
    log_report: str = "always",
) -> dict:
    """:func:`harmonize` in place on an actual (not view) AnnData; returns the report.

    ``log_report`` says when the one-line report is logged at INFO (else at DEBUG): ``"always"`` (a user's call; DEBUG
    only for input that is canonical already), ``"changed"`` (a call nested in another vcell function, e.g.
    ``setup_anndata``: INFO only when the canonical columns change, so data harmonised before is not reported
    twice) or ``"never"``.
    """
    from vcell import __version__

    check_obs_keys(adata, [perturbation_key], what="perturbation_key")
    check_obs_keys(adata, [dose_key], what="dose_key")
    controls = _as_list(control, name="control")
    seps = _as_list(sep, name="sep")
    if log_report not in ("always", "changed", "never"):
        msg = f"log_report must be 'always', 'changed' or 'never', got {log_report!r}"
        raise ValueError(msg)
    before = _canonical_columns(adata) if log_report == "changed" else None

    col = adata.obs[perturbation_key]
    codes, uniques = _codes_and_uniques(col)
    counts = np.bincount(codes[codes >= 0], minlength=len(uniques))
    raws = [str(u) for u in uniques]
    used = np.flatnonzero(counts > 0)

    parser = label_parser(controls, seps, (raws[i] for i in used))
    parsed = {int(i): parser.parse(raws[i]) for i in used}

    n_missing = int((codes < 0).sum()) + sum(int(counts[i]) for i, p in parsed.items() if p.error == "empty label")
    if n_missing:
        msg = (
            f"obs[{perturbation_key!r}] has {n_missing} cells with a missing label (NaN, None or empty); "
            "harmonize never drops cells: label them (e.g. as a control) or subset adata first"
        )
        raise ValueError(msg)
    msg = ambiguous_labels_message(parsed.values(), where=f"obs[{perturbation_key!r}]", sep=sep)
    if msg is not None:
        raise ValueError(msg)

    canon = {i: p.canonical for i, p in parsed.items()}
    n_control = sum(int(counts[i]) for i, c in canon.items() if c == CONTROL)
    if n_control == 0 or not any(raws[i].strip() in parser.control for i in used):
        hint = ""
        if _is_numeric(col) and len(used):
            hint = (
                f"; obs[{perturbation_key!r}] holds numbers, which are matched as text: pass control as text "
                f"(e.g. control={raws[used[0]]!r})"
            )
        msg = (
            f"no control cells: no label in obs[{perturbation_key!r}] matches control={control!r}; "
            f"most frequent labels: {_frequent_labels(raws, counts)}{hint}"
        )
        raise ValueError(msg)

    categories = [CONTROL, *sorted(set(canon.values()) - {CONTROL})]
    cat_index = {c: k for k, c in enumerate(categories)}
    lookup = np.full(max(len(uniques), 1), -1, dtype=np.int64)
    n_lookup = np.zeros(max(len(uniques), 1), dtype=np.int64)
    for i, c in canon.items():
        lookup[i] = cat_index[c]
        n_lookup[i] = parsed[i].n
    new_codes = lookup[codes]
    n_pert = n_lookup[codes]
    is_ctrl_cell = n_pert == 0
    dose = _doses(adata, dose_key, codes, parsed, is_ctrl_cell, parser)

    adata.obs[PERT_COL] = pd.Categorical.from_codes(new_codes, categories=categories)
    adata.obs[N_PERT_COL] = n_pert
    adata.obs[DOSE_COL] = dose

    spellings: dict[str, list[str]] = {}
    for i, c in canon.items():
        spellings.setdefault(c, []).append(raws[i])
    report = {
        "n_cells": int(adata.n_obs),
        "n_control": n_control,
        "n_single": int((n_pert == 1).sum()),
        "n_combo": int((n_pert > 1).sum()),
        "n_labels_raw": len(parsed),
        "n_labels": len(spellings),
        "relabelled": {
            "raw": [raws[i] for i, c in canon.items() if raws[i] != c],
            "canonical": [c for i, c in canon.items() if raws[i] != c],
        },
        "merged": {c: sorted(r) for c, r in sorted(spellings.items()) if len(r) > 1},
        "params": {
            "perturbation_key": perturbation_key,
            "control": controls,
            "sep": seps,
            "dose_key": dose_key or "",
            "gears_ctrl": bool(parser.gears),
        },
        "vcell_version": __version__,
    }
    adata.uns[UNS_KEY] = report
    if log_report == "always":  # canonical input is logged at DEBUG only
        changed = bool(report["relabelled"]["raw"]) or perturbation_key != PERT_COL
    elif log_report == "changed":
        after = _canonical_columns(adata)
        changed = before is None or not all(np.array_equal(b, a) for b, a in zip(before, after, strict=True))
    else:
        changed = False
    logger.log(logging.INFO if changed else logging.DEBUG, _summary(report))
    return report


def _summary(report: dict) -> str:
    """One-paragraph text of a harmonize report."""
    relabelled = dict(zip(report["relabelled"]["raw"], report["relabelled"]["canonical"], strict=True))
    shown = [f"{r!r} -> {c!r}" for r, c in list(relabelled.items())[:5]]
    text = (
        f"harmonize obs[{report['params']['perturbation_key']!r}]: {report['n_cells']} cells, "
        f"{report['n_control']} control, {report['n_single']} single, {report['n_combo']} combination; "
        f"{report['n_labels_raw']} raw labels -> {report['n_labels']} canonical labels"
    )
    if relabelled:
        text += f"; relabelled {len(relabelled)}: {', '.join(shown)}{', ...' if len(relabelled) > 5 else ''}"
    if report["merged"]:
        text += f"; {len(report['merged'])} canonical labels merge several raw spellings"
    return text
