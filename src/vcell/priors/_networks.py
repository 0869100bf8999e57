"""Regulatory networks and gene sets in decoupler's format (``source``, ``target``, ``weight``)."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import check_file, read_table, require_columns

#: resources fetched with decoupler's own ``decoupler.op.<name>`` functions (network access needed)
RESOURCES = ("collectri", "dorothea", "progeny", "hallmark")
_NET_EXPECTED = (
    "a network in decoupler's format: a csv/tsv (optionally gzipped) with columns source, target and optionally "
    "weight (DoRothEA's tf/mor and PROGENy's pathway/p_value are recognised), or a .gmt file"
)
_GMT_EXPECTED = "a GMT gene-set file: one set per line, 'name<TAB>description<TAB>gene<TAB>gene...'"
# other spellings of decoupler's columns (DoRothEA's tf/mor, OmniPath's pathway/genesymbol, decoupler 1.x p_value)
_RENAME = {"tf": "source", "pathway": "source", "genesymbol": "target", "mor": "weight", "p_value": "padj"}
_INSTALL_HINT = 'pip install "vcell[decoupler]"'


def read_gmt(path: str | PathLike) -> pd.DataFrame:
    r"""Read a GMT gene-set file as a decoupler-format network.

    Parameters
    ----------
    path
        Local ``.gmt`` file: one gene set per line, ``name``, a description (e.g. a URL), then the genes, all
        tab-separated.

    Returns
    -------
    DataFrame with columns ``source`` (set name, as in the file), ``target`` (gene) and ``weight`` (1.0), sets in
    file order; a gene listed twice in a set is kept once.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    ValueError
        If a line has no description field.

    Examples
    --------
    >>> import tempfile, pathlib, vcell
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "sets.gmt"
    >>> _ = path.write_text("SET_A\tdesc\tG1\tG2\nSET_B\thttp://x\tG2\n")
    >>> vcell.priors.read_gmt(path)
      source target  weight
    0  SET_A     G1     1.0
    1  SET_A     G2     1.0
    2  SET_B     G2     1.0
    """
    path = check_file(path, expected=_GMT_EXPECTED)
    sources, targets = [], []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            fields = line.rstrip("\r\n").split("\t")
            if not line.strip():
                continue
            if len(fields) < 2:
                msg = f"line {lineno} of {str(path)!r} has no tab-separated description field; expected {_GMT_EXPECTED}"
                raise ValueError(msg)
            genes = [g.strip() for g in fields[2:] if g.strip()]
            sources.extend([fields[0].strip()] * len(genes))
            targets.extend(genes)
    net = pd.DataFrame({"source": sources, "target": targets, "weight": np.ones(len(targets))})
    return net.drop_duplicates(["source", "target"], ignore_index=True)


def _fetch(name: str, organism: str) -> pd.DataFrame:
    """Call ``decoupler.op.<name>(organism=...)`` (needs network access)."""
    try:
        import decoupler as dc
    except ImportError as err:
        msg = f"read_network({name!r}) downloads the resource with decoupler; install it with {_INSTALL_HINT}"
        raise ImportError(msg) from err
    return getattr(dc.op, name)(organism=organism)


def read_network(
    source: str | PathLike,
    *,
    organism: str = "human",
    min_weight: float | None = None,
    levels: Sequence[str] | None = None,
    top: int | None = None,
) -> pd.DataFrame:
    r"""Read a prior-knowledge network in decoupler's format (``source``, ``target``, ``weight``).

    Parameters
    ----------
    source
        A local file (``.csv``/``.tsv``, optionally ``.gz``, or ``.gmt`` via :func:`read_gmt`), or one of the names
        ``'collectri'``, ``'dorothea'``, ``'progeny'``, ``'hallmark'``: then decoupler's own resource function
        ``decoupler.op.<name>(organism=organism)`` is called, which needs network access and decoupler
        (``pip install "vcell[decoupler]"``). Column spellings ``tf``/``pathway`` (-> ``source``), ``genesymbol``
        (-> ``target``), ``mor`` (-> ``weight``) and ``p_value`` (-> ``padj``, decoupler 2's name) are renamed; a
        network without ``weight`` gets weight 1.
    organism
        Passed to decoupler for a named resource; ignored for a local file.
    min_weight
        Keep edges with ``|weight| >= min_weight``.
    levels
        DoRothEA confidence levels to keep, e.g. ``["A", "B"]`` (needs a ``confidence`` column).
    top
        Keep the ``top`` edges per source: smallest ``padj`` when that column exists (PROGENy), else largest
        ``|weight|`` (ties by target name).

    Returns
    -------
    DataFrame with ``source``, ``target`` (str) and ``weight`` (float) first, then any other columns (e.g.
    ``confidence``, ``padj``); duplicate (source, target) pairs are dropped (first kept), as decoupler requires.

    Raises
    ------
    FileNotFoundError
        If ``source`` is neither a file nor a resource name.
    ValueError
        If ``source``/``target`` columns are missing, or ``levels`` is given for a network without ``confidence``.

    Examples
    --------
    >>> import tempfile, pathlib, vcell
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "dorothea.csv"
    >>> _ = path.write_text("tf,confidence,target,mor\nAHR,A,CYP1A1,1\nAHR,C,CYP1B1,-1\n")
    >>> vcell.priors.read_network(path, levels=["A", "B"])
      source  target  weight confidence
    0    AHR  CYP1A1     1.0          A
    """
    is_name = isinstance(source, str) and source.lower() in RESOURCES and not Path(source).exists()
    if is_name:
        net, where = _fetch(source.lower(), organism), f"decoupler resource {source.lower()!r}"
    else:
        path = check_file(source, expected=f"{_NET_EXPECTED}, or one of the resource names {list(RESOURCES)}")
        if path.name.lower().endswith(".gmt"):
            net, where = read_gmt(path), f"GMT file {str(path)!r}"
        else:
            net, where = read_table(path, expected=_NET_EXPECTED), f"network file {str(path)!r}"
    net = net.rename(columns={k: v for k, v in _RENAME.items() if k in net.columns and v not in net.columns})
    require_columns(net, ["source", "target"], where=where, expected=_NET_EXPECTED)
    if "weight" not in net.columns:
        net["weight"] = 1.0
    net = net.dropna(subset=["source", "target", "weight"])
    net = net.astype({"source": str, "target": str, "weight": float})
    net = net[["source", "target", "weight", *[c for c in net.columns if c not in ("source", "target", "weight")]]]
    if levels is not None:
        require_columns(net, ["confidence"], where=where, expected="DoRothEA's confidence column to filter by levels")
        net = net[net["confidence"].astype(str).isin([str(x) for x in levels])]
    if min_weight is not None:
        net = net[net["weight"].abs() >= min_weight]
    net = net.drop_duplicates(["source", "target"]).reset_index(drop=True)
    if top is not None:
        if "padj" in net.columns:
            ranked = net.sort_values(["source", "padj", "target"], kind="stable")
        else:
            ranked = net.assign(_abs=-net["weight"].abs()).sort_values(["source", "_abs", "target"], kind="stable")
        net = net.loc[np.sort(ranked.groupby("source", sort=False).head(int(top)).index)]
    return net.reset_index(drop=True)
