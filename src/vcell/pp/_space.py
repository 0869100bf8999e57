"""Expression spaces: how a matrix is normalised (raw counts, or ``log1p`` of counts normalised to a target sum).

A prediction and the data it is compared with must be in the same space: ``log1p`` of counts normalised to 1e4 per
cell (log1p(CP10k), vcell's evaluation space, BENCHMARK.md) and ``log1p`` of counts normalised to the median library
size (scanpy's ``sc.pp.normalize_total`` default, then ``sc.pp.log1p``) differ by ``log(1e4 / median)`` in every
expressed gene, which changes a delta's correlation. :class:`ExpressionSpace` names a space;
:func:`expression_space` reads the space recorded for a matrix in ``adata.uns["vcell_spaces"]`` (written by
:func:`set_expression_space` and by vcell's tools) or infers it from the values; models record the space of the
data they were set up with and return predictions in the space asked for (``space=``); plots and metrics refuse to
compare two matrices whose spaces provably differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import sparse

from vcell._utils import get_matrix

if TYPE_CHECKING:
    from anndata import AnnData

#: ``adata.uns`` key of the recorded spaces: ``{"X": {...}, "<layer>": {...}}``, each :meth:`ExpressionSpace.to_dict`
SPACES_KEY = "vcell_spaces"
#: the kinds of space
KINDS = ("counts", "log1p", "unknown")
#: the target sum of log1p(CP10k)
CP10K = 1e4
#: rows read (seeded sample) to infer the target sum of log data
SAMPLE_ROWS = 1000
#: relative spread of the sampled rows' ``expm1`` sums within which they share one target sum
SUM_RTOL = 1e-3
#: two known target sums further apart than this (relative) are different spaces
DIFFERENT_RTOL = 0.01
#: the largest value of log data (as :data:`vcell.data._chunked.LOG_MAX_THRESHOLD`)
_LOG_MAX = 30.0

SpaceLike = Any  # ExpressionSpace | float | str | None


def _format_sum(t: float) -> str:
    return format(t, ",.10g")


@dataclass(frozen=True)
class ExpressionSpace:
    """How an expression matrix is normalised: raw counts, ``log1p`` of normalised counts, or unknown.

    Parameters
    ----------
    kind
        ``"counts"`` (non-negative integers), ``"log1p"`` (natural ``log1p`` of counts scaled to ``target_sum`` per
        cell: scanpy's ``normalize_total`` then ``log1p``) or ``"unknown"``.
    target_sum
        ``"log1p"`` only: the total each cell was scaled to (``1e4`` for log1p(CP10k), the median library size for
        scanpy's ``normalize_total`` default); ``None`` when it is not known (e.g. genes subset after
        normalisation, whose rows no longer sum to it).
    basis
        Optional note on where ``target_sum`` comes from: ``"median"`` (the median library size of the counts, what
        ``normalize_total`` picks). Not part of equality: two spaces with the same kind and target sum are equal.

    Examples
    --------
    >>> str(ExpressionSpace("log1p", 1e4))
    'log1p(CP10k: normalised to 10,000 per cell)'
    >>> str(ExpressionSpace("log1p", 2013.0, basis="median"))
    'log1p(normalised to 2,013 per cell: the median library size, scanpy normalize_total default)'
    >>> ExpressionSpace.from_dict(ExpressionSpace("counts").to_dict())
    ExpressionSpace(kind='counts', target_sum=None, basis=None)
    """

    kind: Literal["counts", "log1p", "unknown"]
    target_sum: float | None = None
    basis: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            msg = f"ExpressionSpace kind must be one of {list(KINDS)}, got {self.kind!r}"
            raise ValueError(msg)
        t = self.target_sum
        if t is not None:
            if self.kind != "log1p":
                msg = f"target_sum applies to kind 'log1p' only, got target_sum={t!r} with kind {self.kind!r}"
                raise ValueError(msg)
            ok = not isinstance(t, bool | str | bytes) and np.ndim(t) == 0
            try:
                value = float(t) if ok else math.nan
            except (TypeError, ValueError):
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                msg = f"target_sum must be a finite number above 0 (the total of each normalised cell), got {t!r}"
                raise ValueError(msg)
            object.__setattr__(self, "target_sum", value)
        if self.basis is not None and not isinstance(self.basis, str):
            msg = f"basis must be a string or None, got {self.basis!r}"
            raise ValueError(msg)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def log1p_cp10k(cls) -> ExpressionSpace:
        """log1p of counts normalised to 1e4 per cell: vcell's evaluation space (BENCHMARK.md)."""
        return cls("log1p", CP10K)

    @classmethod
    def from_dict(cls, d: dict) -> ExpressionSpace:
        """The space a :meth:`to_dict` (or ``adata.uns["vcell_spaces"][key]``) describes; ValueError if malformed."""
        if isinstance(d, ExpressionSpace):
            return d
        if not hasattr(d, "keys") or "kind" not in d or set(d) - {"kind", "target_sum", "basis"}:
            msg = f"an expression space is a dict with 'kind' and optionally 'target_sum' and 'basis', got {d!r}"
            raise ValueError(msg)
        basis = d.get("basis")
        return cls(str(d["kind"]), d.get("target_sum"), None if basis is None else str(basis))

    def to_dict(self) -> dict[str, Any]:
        """JSON- and h5ad-storable description (``None`` fields left out); :meth:`from_dict` reads it back."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.target_sum is not None:
            out["target_sum"] = float(self.target_sum)
        if self.basis is not None:
            out["basis"] = self.basis
        return out

    # ------------------------------------------------------------------ reading
    @property
    def known_log1p(self) -> bool:
        """Whether this is log1p data with a known target sum (so it converts to any other such space)."""
        return self.kind == "log1p" and self.target_sum is not None

    def differs_from(self, other: ExpressionSpace) -> bool:
        """Whether ``other`` is provably another space: counts vs log1p, or known target sums > 1% apart.

        A space of kind ``"unknown"``, or ``"log1p"`` with an unknown target sum, is not provably different from a
        log1p space: such comparisons are allowed (declare the target with :func:`set_expression_space` to have
        them checked).
        """
        kinds = {self.kind, other.kind}
        if "unknown" in kinds:
            return False
        if kinds == {"counts", "log1p"}:
            return True
        if self.known_log1p and other.known_log1p:
            a, b = float(self.target_sum), float(other.target_sum)  # type: ignore[arg-type]
            return abs(a - b) > DIFFERENT_RTOL * max(a, b)
        return False

    @property
    def label(self) -> str:
        """Short form for axis labels: ``"log1p CP10k"``, ``"log1p, 2,013 per cell (median)"``, ``"raw counts"``."""
        if self.kind == "counts":
            return "raw counts"
        if self.kind == "unknown":
            return "unknown space"
        if self.target_sum is None:
            return "log1p, target sum unknown"
        if float(self.target_sum) == CP10K:
            return "log1p CP10k"
        median = " (median)" if self.basis == "median" else ""
        return f"log1p, {_format_sum(float(self.target_sum))} per cell{median}"

    def __str__(self) -> str:
        if self.kind == "counts":
            return "raw counts"
        if self.kind == "unknown":
            return "unknown space (neither raw counts nor log1p of normalised counts)"
        if self.target_sum is None:
            return "log1p(normalised counts, target sum unknown)"
        t = float(self.target_sum)
        if t == CP10K:
            return "log1p(CP10k: normalised to 10,000 per cell)"
        if self.basis == "median":
            return f"log1p(normalised to {_format_sum(t)} per cell: the median library size, scanpy normalize_total default)"
        return f"log1p(normalised to {_format_sum(t)} per cell)"


def _key(layer: str | None) -> str:
    return "X" if layer is None else str(layer)


def _where(layer: str | None) -> str:
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def recorded_space(adata: AnnData, layer: str | None = None) -> ExpressionSpace | None:
    """The space recorded for ``X`` (``layer=None``) or a layer in ``adata.uns["vcell_spaces"]``, or ``None``."""
    spaces = adata.uns.get(SPACES_KEY)
    if spaces is None:
        return None
    if not hasattr(spaces, "get"):
        msg = f"adata.uns[{SPACES_KEY!r}] must be a mapping of matrix ('X' or a layer) to space, got {type(spaces)}"
        raise ValueError(msg)
    entry = spaces.get(_key(layer))
    if entry is None:
        return None
    try:
        return ExpressionSpace.from_dict(dict(entry))
    except (TypeError, ValueError) as err:
        msg = f"adata.uns[{SPACES_KEY!r}][{_key(layer)!r}] is not a valid expression space: {err}"
        raise ValueError(msg) from None


def record_space(adata: AnnData, layer: str | None, space: ExpressionSpace) -> None:
    """Write ``space`` as the recorded space of ``X``/``layer`` (no checks: for vcell's tools that made the matrix)."""
    spaces = dict(adata.uns.get(SPACES_KEY, {}) or {})
    spaces[_key(layer)] = space.to_dict()
    adata.uns[SPACES_KEY] = spaces


def _snap(t: float) -> float:
    """``t`` rounded to the nearest half when within 1e-5 of it (float32 round-off of an integer or .5 target)."""
    r = round(t * 2.0) / 2.0
    return float(r) if r > 0 and abs(r - t) <= 1e-5 * t else float(t)


def infer_space(
    X: Any, *, counts: bool | None = None, n_rows: int = SAMPLE_ROWS, seed: int = 0, with_target: bool = True
) -> ExpressionSpace:
    """Infer the space of a matrix from its values (dense, sparse or backed; read in row blocks).

    * every value a non-negative integer (:func:`vcell.data.is_count_matrix`, every value read): raw counts;
    * else, on a seeded sample of ``n_rows`` rows (all rows when fewer; rows that are all NaN, cells without a
      prediction, are skipped): any other NaN or infinite value, a negative value or one above 30 (no log1p of
      normalised counts reaches it): unknown;
    * else log1p, with target sum the common value of the rows' ``expm1`` sums when they agree within
      :data:`SUM_RTOL` (cells without counts left out; a value within 1e-5 of a half-integer is rounded to it),
      else with an unknown target sum (e.g. genes subset after normalisation).

    Parameters
    ----------
    X
        Cells x genes.
    counts
        Whether ``X`` holds counts, when already known (skips the pass of :func:`vcell.data.is_count_matrix`).
    n_rows
        Rows sampled for the target sum.
    seed
        Seed of the row sample (the same matrix always gives the same answer).
    with_target
        Infer the target sum; ``False``: log data get an unknown target sum. For predictions, whose rows need not
        sum to anything (the rows of a mean prediction are all equal and so share any sum): see
        :func:`prediction_space`.

    Examples
    --------
    >>> import numpy as np
    >>> counts = np.array([[1.0, 3.0], [2.0, 2.0]])
    >>> str(infer_space(counts)), str(infer_space(np.log1p(counts / counts.sum(1, keepdims=True) * 50)))
    ('raw counts', 'log1p(normalised to 50 per cell)')
    """
    from vcell.data._chunked import is_count_matrix, iter_row_blocks

    if counts is None:
        counts = is_count_matrix(X)
    if counts:
        return ExpressionSpace("counts")
    n = int(X.shape[0])
    rows = np.arange(n) if n <= n_rows else np.sort(np.random.default_rng(seed).choice(n, n_rows, replace=False))
    sums = []
    for _, _, block in iter_row_blocks(X, rows=rows):
        if sparse.issparse(block):
            B = sparse.csr_matrix(block, dtype=np.float64)
            vals = B.data
            if vals.size and not (np.isfinite(vals).all() and vals.min() >= 0 and vals.max() <= _LOG_MAX):
                return ExpressionSpace("unknown")
            B.data = np.expm1(vals)
            sums.append(np.asarray(B.sum(axis=1)).ravel())
            continue
        B = np.asarray(block, dtype=np.float64)
        B = B[~np.isnan(B).all(axis=1)] if B.shape[1] else B
        if B.size and not (np.isfinite(B).all() and B.min() >= 0 and B.max() <= _LOG_MAX):
            return ExpressionSpace("unknown")
        sums.append(np.expm1(B).sum(axis=1))
    s = np.concatenate(sums) if sums else np.zeros(0)
    s = s[s > 0]
    if not s.size or not with_target:
        return ExpressionSpace("log1p")
    med = float(np.median(s))
    if np.all(np.abs(s - med) <= SUM_RTOL * med):
        return ExpressionSpace("log1p", _snap(med))
    return ExpressionSpace("log1p")


def expression_space(adata: AnnData, layer: str | None = None) -> ExpressionSpace:
    """The expression space of ``adata.X`` (or a layer): as recorded, else inferred from the values.

    The record is ``adata.uns["vcell_spaces"]["X"]`` (or ``[layer]``), written by :func:`set_expression_space`, by
    :func:`vcell.tl.predict_perturbation` for the layers it writes and by vcell's tools for the matrices they
    return; a record is trusted as it is (vcell cannot see that a matrix was replaced later: update the record with
    ``set_expression_space(..., overwrite=True)``). Without a record, the space is inferred (:func:`infer_space`):
    raw counts when every value is a non-negative integer; log1p with the target sum that the sampled rows'
    ``expm1`` sums share (1e4 for log1p(CP10k), the median library size after ``sc.pp.normalize_total``), or with
    an unknown target sum when they do not agree (genes subset after normalisation: declare it then); unknown
    otherwise (negative or very large values).

    Parameters
    ----------
    adata
        The data (its matrix may be dense, sparse or backed).
    layer
        Layer to describe; ``None``: ``X``.

    Returns
    -------
    The :class:`ExpressionSpace`.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> import vcell
    >>> adata = ad.AnnData(np.array([[1.0, 3.0], [2.0, 6.0]], dtype=np.float32))
    >>> str(vcell.pp.expression_space(adata))
    'raw counts'
    >>> adata.layers["log"] = np.log1p(adata.X / adata.X.sum(1, keepdims=True) * 1e4)
    >>> str(vcell.pp.expression_space(adata, layer="log"))
    'log1p(CP10k: normalised to 10,000 per cell)'
    """
    recorded = recorded_space(adata, layer)
    if recorded is not None:
        return recorded
    return infer_space(get_matrix(adata, layer))


def prediction_space(adata: AnnData, layer: str | None = None) -> ExpressionSpace:
    """The space of a matrix of predictions: as recorded, else inferred without a target sum.

    :func:`vcell.tl.predict_perturbation` records the space of what it writes. Otherwise :func:`infer_space` runs
    with ``with_target=False``: predicted rows need not sum to the target of their space (an additive shift, a mean
    prediction whose rows are all equal), so a sum their rows happen to share says nothing: unrecorded predictions
    are raw counts, unknown, or log1p of an unknown target sum, which is compared with any log1p space.
    """
    recorded = recorded_space(adata, layer)
    if recorded is not None:
        return recorded
    return infer_space(get_matrix(adata, layer), with_target=False)


def set_expression_space(
    adata: AnnData,
    layer: str | None = None,
    *,
    kind: Literal["counts", "log1p", "unknown"] | ExpressionSpace,
    target_sum: float | None = None,
    overwrite: bool = False,
) -> None:
    """Declare the expression space of ``adata.X`` (or a layer), for models, plots and metrics to read.

    Needed where inference cannot tell (:func:`expression_space`): log data whose genes were subset after
    normalisation (e.g. to highly variable genes) no longer sum to the target per cell, so their target sum is
    unknown until declared, e.g. ``set_expression_space(adata, kind="log1p", target_sum=1e4)``.

    Parameters
    ----------
    adata
        The data.
    layer
        Layer the declaration is for; ``None``: ``X``.
    kind
        ``"counts"``, ``"log1p"`` or ``"unknown"``, or an :class:`ExpressionSpace` (then leave ``target_sum`` out).
    target_sum
        ``kind="log1p"``: the total per cell before ``log1p`` (``1e4`` for log1p(CP10k); after
        ``sc.pp.normalize_total`` without ``target_sum``, the median library size of the counts).
    overwrite
        Replace a different space recorded before; without it that is a ValueError naming both.

    Sets the following fields
    -------------------------
    ``adata.uns["vcell_spaces"][layer or "X"]``
        ``{"kind": ..., "target_sum": ...}`` (:meth:`ExpressionSpace.to_dict`).

    Raises
    ------
    KeyError
        If ``layer`` is not in ``adata.layers``.
    ValueError
        If the space is malformed, another space is recorded (without ``overwrite``), or the values provably are in
        another space (e.g. ``"counts"`` declared for non-integer values, or a target sum other than the one every
        sampled row sums to).

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> import vcell
    >>> adata = ad.AnnData(np.log1p(np.array([[1.0, 3.0], [2.0, 6.0]], dtype=np.float32)))
    >>> vcell.pp.set_expression_space(adata, kind="log1p", target_sum=1e4)
    >>> adata.uns["vcell_spaces"]
    {'X': {'kind': 'log1p', 'target_sum': 10000.0}}
    """
    if isinstance(kind, ExpressionSpace):
        if target_sum is not None:
            msg = "pass either an ExpressionSpace as kind or kind and target_sum, not both"
            raise ValueError(msg)
        space = kind
    else:
        space = ExpressionSpace(kind, target_sum)
    X = get_matrix(adata, layer)
    previous = recorded_space(adata, layer)
    if previous is not None and previous != space and not overwrite:
        msg = (
            f"{_where(layer)} is recorded as {previous} (adata.uns[{SPACES_KEY!r}][{_key(layer)!r}]); "
            f"pass overwrite=True to declare {space} instead"
        )
        raise ValueError(msg)
    seen = infer_space(X)
    if seen.differs_from(space) or (space.kind == "counts" and seen.kind != "counts"):
        msg = f"{_where(layer)} holds values in {seen}, not {space}: check the matrix and the layer named"
        raise ValueError(msg)
    record_space(adata, layer, space)


def check_same_space(a: ExpressionSpace, b: ExpressionSpace, *, what_a: str, what_b: str, where: str) -> None:
    """ValueError naming both spaces when ``a`` and ``b`` provably differ (:meth:`ExpressionSpace.differs_from`).

    ``where``: the function comparing them, for the message.
    """
    if not a.differs_from(b):
        return
    msg = (
        f"{where} compares {what_a}, in {a}, with {what_b}, in {b}: different expression spaces. Predict in the "
        "space of the data (predict(..., space=...) or vcell.tl.predict_perturbation(..., space=...)), or compare "
        "with a matrix in the predictions' space; if a recorded space is wrong, fix it with "
        "vcell.pp.set_expression_space(adata, layer=..., kind=..., target_sum=..., overwrite=True)"
    )
    raise ValueError(msg)


# ------------------------------------------------------------------------------------------- conversion
def parse_space(
    space: SpaceLike,
    *,
    default: ExpressionSpace,
    model: ExpressionSpace,
    median: float | None,
) -> ExpressionSpace:
    """The space a ``space=`` argument asks for.

    ``None`` or ``"default"``: ``default``; ``"model"``: ``model`` (no conversion); ``"log1p_cp10k"``: log1p of 1e4
    per cell; ``"median"``: log1p of the median library size ``median`` of the registered counts; a number:
    log1p of that target sum; an :class:`ExpressionSpace`: itself.
    """
    if space is None or (isinstance(space, str) and space == "default"):
        return default
    if isinstance(space, ExpressionSpace):
        return space
    if isinstance(space, str):
        if space == "model":
            return model
        if space == "log1p_cp10k":
            return ExpressionSpace.log1p_cp10k()
        if space == "median":
            if median is None:
                msg = (
                    "space='median' is log1p of counts normalised to their median library size, but the model was "
                    f"set up with {model} data, not counts: ask for a target sum, 'log1p_cp10k' or 'model'"
                )
                raise ValueError(msg)
            return ExpressionSpace("log1p", median, basis="median")
    elif not isinstance(space, bool) and isinstance(space, int | float | np.integer | np.floating):
        try:
            return ExpressionSpace("log1p", float(space))
        except ValueError as err:
            msg = f"space={space!r}: a number is the target sum of log1p expression; {err}"
            raise ValueError(msg) from None
    msg = (
        f"space must be None or 'default' (the model's default output space), 'model', 'log1p_cp10k', 'median', a "
        f"target sum (a number above 0) or a vcell.pp.ExpressionSpace; got {space!r}"
    )
    raise ValueError(msg)


def conversion_factor(source: ExpressionSpace, target: ExpressionSpace, *, what: str = "predictions") -> float | None:
    """Factor ``t2 / t1`` that converts log1p data of target sum ``t1`` (``source``) to ``t2`` (``target``).

    ``None`` when the spaces are equal (no conversion: the values are returned as they are). A ValueError naming
    both spaces when the conversion is impossible: into counts or an unknown space, or from or to an unknown target
    sum.
    """
    if source == target:
        return None
    if target.kind != "log1p" or target.target_sum is None or not source.known_log1p:
        hint = (
            "; the model was set up with log data of unknown target sum: declare it before setup_anndata with "
            "vcell.pp.set_expression_space(adata, layer=..., kind='log1p', target_sum=...), or ask for space='model'"
            if source.kind == "log1p" and source.target_sum is None
            else ""
        )
        msg = f"cannot convert {what} from {source} to {target}: only log1p spaces of known target sums convert{hint}"
        raise ValueError(msg)
    return float(target.target_sum) / float(source.target_sum)  # type: ignore[arg-type]


def rescale_log1p(X: Any, factor: float | None, *, out: Any = None, chunk_elements: int | None = None) -> Any:
    """``log1p(expm1(X) * factor)``: log1p data of target sum ``t1`` as target sum ``t1 * factor``, float32.

    Row block by row block (at most ``chunk_elements`` values in float64 at a time); a dense ``X`` is written into
    ``out`` (a new float32 array when ``None``; ``out=X`` converts in place), a sparse one keeps its pattern (zeros
    stay zeros). NaN stays NaN. ``factor=None`` returns ``X`` itself, unchanged.
    """
    if factor is None:
        return X
    from vcell._settings import settings

    budget = int(settings.chunk_elements if chunk_elements is None else chunk_elements)
    if sparse.issparse(X):
        Y = sparse.csr_matrix(X, dtype=np.float32, copy=True)
        data = Y.data
        for start in range(0, data.size, max(budget, 1)):
            part = data[start : start + budget].astype(np.float64)
            np.expm1(part, out=part)
            part *= factor
            data[start : start + budget] = np.log1p(part, out=part)
        return Y
    X = np.asarray(X)
    if out is None:
        out = np.empty(X.shape, dtype=np.float32)
    if X.ndim != 2:
        msg = f"expected a cells x genes matrix, got shape {X.shape}"
        raise ValueError(msg)
    step = max(1, budget // max(X.shape[1], 1))
    for start in range(0, X.shape[0], step):
        B = X[start : start + step].astype(np.float64)
        np.expm1(B, out=B)
        B *= factor
        out[start : start + step] = np.log1p(B, out=B)
    return out


__all__ = ["ExpressionSpace", "expression_space", "set_expression_space"]
