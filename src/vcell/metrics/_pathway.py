"""Pathway / TF activity agreement: correlation of decoupler activities of predicted and true deltas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

#: decoupler methods :func:`pathway_agreement` accepts (deterministic linear models; scores are t-values)
PATHWAY_METHODS: tuple[str, ...] = ("ulm", "mlm")
#: a delta whose spread is at most this (times ``max(1, max|delta|)`` of the pair) counts as constant
_RTOL = 1e-6


def _import_decoupler():
    try:
        import decoupler
    except ImportError as err:  # pragma: no cover - decoupler is installed in the test environment
        msg = 'pathway_agreement needs decoupler (>= 2.0); install it with `pip install "vcell[decoupler]"`'
        raise ImportError(msg) from err
    return decoupler


def _check_net(net: pd.DataFrame, genes: np.ndarray, min_targets: int) -> pd.DataFrame:
    """``net`` restricted to edges whose target is in ``genes`` and sources with ``>= min_targets`` such targets."""
    if not isinstance(net, pd.DataFrame):
        msg = f"net must be a pandas DataFrame with columns 'source', 'target' (and 'weight'), got {type(net)}"
        raise ValueError(msg)
    missing = [c for c in ("source", "target") if c not in net.columns]
    if missing:
        msg = f"net lacks column(s) {missing}; expected decoupler format with 'source', 'target' and 'weight'"
        raise ValueError(msg)
    cols = ["source", "target"] + (["weight"] if "weight" in net.columns else [])
    net = net[cols].astype({"source": str, "target": str})
    if "weight" not in net.columns:
        net = net.assign(weight=1.0)
    net = net.astype({"weight": np.float64})
    dup = net.duplicated(subset=["source", "target"])
    if dup.any():
        first = net.loc[dup].iloc[0]
        msg = f"net has {int(dup.sum())} duplicated (source, target) edge(s), e.g. ({first.source!r}, {first.target!r})"
        raise ValueError(msg)
    if not np.isfinite(net["weight"].to_numpy()).all():
        msg = "net['weight'] holds non-finite values"
        raise ValueError(msg)
    net = net.loc[net["target"].isin(set(genes))]
    if net.empty:
        msg = f"none of the {len(genes)} genes (e.g. {list(genes[:3])}) is a target in net; check gene naming/species"
        raise ValueError(msg)
    stats = net.groupby("source")["weight"].agg(["size", "nunique"])
    # a source targeting every gene with one weight is constant over genes: its linear model is undefined
    keep = stats.index[(stats["size"] >= min_targets) & ~((stats["size"] == len(genes)) & (stats["nunique"] == 1))]
    if len(keep) < 2:
        msg = (
            f"only {len(keep)} source(s) of net have at least min_targets={min_targets} targets among the "
            f"{len(genes)} genes; at least 2 are needed to correlate activities (use more genes or lower min_targets)"
        )
        raise ValueError(msg)
    return net.loc[net["source"].isin(set(keep))].reset_index(drop=True)


def _activities(deltas: np.ndarray, net: pd.DataFrame, genes: np.ndarray, method: str, min_targets: int) -> np.ndarray:
    """Scores (decoupler) of each row of ``deltas`` (``(n, n_genes)``) for the sources of an already pruned ``net``."""
    dc = _import_decoupler()
    data = pd.DataFrame(deltas, index=[f"row{i}" for i in range(deltas.shape[0])], columns=genes)
    with np.errstate(divide="ignore", invalid="ignore"):
        es, _ = getattr(dc.mt, method)(data, net, tmin=min_targets, empty=False, verbose=False)
    sources = np.sort(net["source"].unique())
    return es.loc[data.index, sources].to_numpy(dtype=np.float64)


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (a * b).sum(1) / denom
    r[~(np.isfinite(r) & np.isfinite(denom) & (denom > 0))] = np.nan
    return np.clip(r, -1.0, 1.0)


def pathway_agreement(
    pred_delta: ArrayLike,
    true_delta: ArrayLike,
    net: pd.DataFrame,
    *,
    genes: Sequence[str] | ArrayLike,
    method: str = "ulm",
    min_targets: int = 5,
) -> float | np.ndarray:
    """Pearson correlation of pathway / TF activities inferred from the predicted and the true expression change.

    Each delta (mean log1p(CP10k) change of a perturbation vs control, one value per gene of ``genes``) is scored
    with decoupler's :func:`decoupler.mt.ulm` (or ``mlm``) against ``net``: one activity (a t-value) per source.
    The metric is the Pearson correlation across sources of the predicted and true activity vectors, so it asks
    whether a prediction moves the same pathways (PROGENy) or transcription factors (CollecTRI) in the same
    directions, rather than the same individual genes (compare :func:`pearson_delta`). Genes of ``genes`` that are
    no target of ``net`` stay in the model as the background (weight 0), as in decoupler.

    Parameters
    ----------
    pred_delta
        Predicted change, shape ``(n_genes,)``, or ``(n_perturbations, n_genes)`` with one row per perturbation
        (rows are perturbations, not cells: pass means minus the control mean).
    true_delta
        True change, same shape and row order.
    net
        Network in decoupler's long format: columns ``source``, ``target`` and optionally ``weight`` (1 if absent),
        e.g. PROGENy (pathways) or CollecTRI (TFs) as loaded by :mod:`vcell.priors`; no duplicated edges.
    genes
        Gene names of the columns, matching ``net["target"]`` (same species and naming).
    method
        decoupler method, one of :data:`PATHWAY_METHODS`: ``"ulm"`` (univariate linear model, one source at a time)
        or ``"mlm"`` (multivariate; needs fewer sources than genes and non-collinear footprints).
    min_targets
        Sources with fewer targets among ``genes`` are dropped (decoupler's ``tmin``).

    Returns
    -------
    The correlation (a float for 1-D input, an array of shape ``(n_perturbations,)`` for 2-D input); ``NaN``
    where undefined: a constant delta (spread ``<= 1e-6 * max(1, max|delta|)``, e.g. the ``control`` baseline's
    zero change) or constant activities. With only 2 sources left the correlation is always +-1.

    Raises
    ------
    ValueError
        On shape or length mismatch, non-finite deltas, duplicated genes or edges, no gene among the targets of
        ``net``, or fewer than 2 sources with ``min_targets`` targets among ``genes``.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> net = pd.DataFrame({"source": ["A"] * 3 + ["B"] * 3, "target": ["g0", "g1", "g2", "g3", "g4", "g5"]})
    >>> delta = np.array([1.0, 2.0, 1.5, -1.0, 0.0, -0.5, 0.2, 0.1])
    >>> genes = [f"g{i}" for i in range(8)]
    >>> round(pathway_agreement(delta, delta, net, genes=genes, min_targets=3), 6)
    1.0
    """
    if method not in PATHWAY_METHODS:
        msg = f"method must be one of {PATHWAY_METHODS}, got {method!r}"
        raise ValueError(msg)
    if isinstance(min_targets, bool) or not isinstance(min_targets, int | np.integer) or min_targets < 1:
        msg = f"min_targets must be a positive integer, got {min_targets!r}"
        raise ValueError(msg)
    P = np.asarray(pred_delta, dtype=np.float64)
    T = np.asarray(true_delta, dtype=np.float64)
    if P.shape != T.shape or P.ndim not in (1, 2):
        msg = f"pred_delta and true_delta must be 1-D or 2-D with the same shape, got {P.shape} and {T.shape}"
        raise ValueError(msg)
    vector = P.ndim == 1
    P, T = np.atleast_2d(P), np.atleast_2d(T)
    if P.shape[0] == 0:
        msg = "pred_delta and true_delta have no rows (perturbations)"
        raise ValueError(msg)
    if not (np.isfinite(P).all() and np.isfinite(T).all()):
        msg = "pred_delta and true_delta must be finite (no NaN or inf)"
        raise ValueError(msg)
    g = np.asarray(genes, dtype=str).ravel()
    if g.shape[0] != P.shape[1]:
        msg = f"genes has {g.shape[0]} names but the deltas have {P.shape[1]} genes; they must match"
        raise ValueError(msg)
    uniq, counts = np.unique(g, return_counts=True)
    if (counts > 1).any():
        msg = f"genes must be unique; duplicated: {list(uniq[counts > 1][:5])}"
        raise ValueError(msg)
    pruned = _check_net(net, g, int(min_targets))

    scale = np.maximum(1.0, np.maximum(np.abs(P).max(1), np.abs(T).max(1)))
    ok = (np.ptp(P, axis=1) > _RTOL * scale) & (np.ptp(T, axis=1) > _RTOL * scale)
    r = np.full(P.shape[0], np.nan)
    if ok.any():  # constant rows have undefined activities (decoupler cannot take them): NaN
        acts = _activities(np.vstack([P[ok], T[ok]]), pruned, g, method, int(min_targets))
        n = int(ok.sum())
        r[ok] = _rowwise_pearson(acts[:n], acts[n:])
    return float(r[0]) if vector else r
