"""Property-based tests of the pure metrics in :mod:`vcell.metrics` (hypothesis).

Symmetry where a metric is symmetric, invariances (scaling, shifts), bounds, NaN handling (a non-finite input gives a
non-finite result or a ValueError naming the argument, never a finite number) and shape checks.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vcell import metrics as M

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=64)
positive = st.floats(0.01, 100)
# multiples of 1/64: translations are exact (no tiny coordinate absorbed by a shift, 1 + 1e-153 == 1)
grid = st.integers(-640, 640).map(lambda i: i / 64)
powers_of_two = st.sampled_from([0.25, 0.5, 2.0, 4.0, 8.0])  # exact scaling: no round-off
bad_values = st.sampled_from([np.nan, np.inf, -np.inf])
n_genes = st.integers(2, 12)


#: for the tests that call scanpy (differential expression): a quarter of the profile's examples
fewer = settings(max_examples=max(10, settings.default.max_examples // 4))


def vectors(n: int, elements=finite):
    return arrays(np.float64, n, elements=elements)


def cells(n_genes: int, min_cells: int = 1, max_cells: int = 8, elements=finite):
    return st.integers(min_cells, max_cells).flatmap(lambda c: arrays(np.float64, (c, n_genes), elements=elements))


@st.composite
def mean_triples(draw, elements=finite):
    """``(pred, true, ref)`` mean vectors of the same length."""
    n = draw(n_genes)
    return draw(vectors(n, elements)), draw(vectors(n, elements)), draw(vectors(n, elements))


@st.composite
def cell_pairs(draw, min_cells: int = 1, elements=finite):
    """Two cell sets ``(X, Y)`` over the same features."""
    n = draw(st.integers(1, 5))
    return draw(cells(n, min_cells, elements=elements)), draw(cells(n, min_cells, elements=elements))


def _tol(ref) -> float:
    """The tolerance below which the delta metrics read a change as round-off (their ``_RTOL``)."""
    return 1e-6 * max(1.0, float(np.abs(ref).max()))


def _is_nan_or_in(value: float, lo: float, hi: float) -> bool:
    return bool(np.isnan(value) or (lo <= value <= hi))


def _spoil(data, arr: np.ndarray) -> np.ndarray:
    """A copy of ``arr`` with one entry NaN or +-inf."""
    out = np.array(arr, dtype=np.float64, copy=True)
    i = data.draw(st.integers(0, out.size - 1))
    out.flat[i] = data.draw(bad_values)
    return out


def _non_finite_or_value_error(fn, name: str) -> None:
    """``fn()`` raises a ValueError naming ``name``, or returns no finite number (all of its values non-finite)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # inf - inf and the like, on the way to NaN
            out = fn()
    except ValueError as err:
        message = str(err)
    else:
        message = None
    if message is not None:
        assert name in message, f"the ValueError does not name {name!r}: {message}"
        return
    values = np.asarray(list(out.values()) if isinstance(out, dict) else out, dtype=np.float64)
    assert not np.isfinite(values).any(), f"a non-finite {name} gave the finite result {out!r}"


# ---------------------------------------------------------------- pearson_delta


@given(mean_triples())
def test_pearson_delta_is_a_correlation_and_symmetric(t):
    pred, true, ref = t
    r = M.pearson_delta(pred, true, ref)
    assert _is_nan_or_in(r, -1.0, 1.0)
    np.testing.assert_allclose(M.pearson_delta(true, pred, ref), r, rtol=1e-12, atol=1e-12, equal_nan=True)


@given(mean_triples(), positive, grid)
def test_pearson_delta_ignores_positive_scaling_and_shifts_of_the_delta(t, c, k):
    pred, true, ref = t
    dp = pred - ref
    tol = _tol(ref)
    assume(np.ptp(dp) > 1e-3 * max(1.0, np.abs(ref).max()) and np.ptp(true - ref) > 1e3 * tol)
    assume(np.ptp(c * dp) > 1e3 * tol)
    r = M.pearson_delta(pred, true, ref)
    assert M.pearson_delta(ref + c * dp, true, ref) == pytest.approx(r, abs=1e-6)
    assert M.pearson_delta(ref - c * dp, true, ref) == pytest.approx(-r, abs=1e-6)
    assert M.pearson_delta(pred + k, true, ref) == pytest.approx(r, abs=1e-6)


@given(mean_triples(grid), vectors(1, grid))
def test_pearson_delta_ignores_a_shift_of_all_three(t, v):
    pred, true, ref = t
    assume(np.ptp(pred - ref) > 1e-2 and np.ptp(true - ref) > 1e-2)  # far above the round-off tolerance
    assert M.pearson_delta(pred + v, true + v, ref + v) == pytest.approx(M.pearson_delta(pred, true, ref), abs=1e-6)


@given(mean_triples())
def test_pearson_delta_of_the_truth_is_one(t):
    _, true, ref = t
    assume(np.ptp(true - ref) > 10 * _tol(ref))
    assert M.pearson_delta(true, true, ref) == pytest.approx(1.0)


@given(n_genes.flatmap(lambda n: st.tuples(cells(n), vectors(n), vectors(n))))
def test_pearson_delta_of_cells_is_that_of_their_mean(t):
    X, true, ref = t
    np.testing.assert_array_equal(M.pearson_delta(X, true, ref), M.pearson_delta(X.mean(0), true, ref))


# ---------------------------------------------------------------- mse, l2


@given(mean_triples())
def test_mse_is_a_symmetric_nonnegative_distance(t):
    pred, true, _ = t
    m = M.mse_top_de(pred, true)
    assert m >= 0
    assert M.mse_top_de(true, pred) == m
    assert M.mse_top_de(true, true) == 0.0


@given(mean_triples(grid), powers_of_two, vectors(1, grid))
def test_mse_scales_quadratically_and_ignores_shifts(t, c, v):
    pred, true, _ = t
    m = M.mse_top_de(pred, true)
    assert M.mse_top_de(c * pred, c * true) == pytest.approx(c**2 * m, rel=1e-12, abs=1e-300)
    assert M.mse_top_de(pred + v, true + v) == pytest.approx(m, rel=1e-9, abs=1e-9)


@given(mean_triples())
def test_normalized_mse_is_zero_for_the_truth_and_one_for_the_control(t):
    pred, true, ctrl = t
    assume(M.mse_top_de(ctrl, true) > 0)
    assert M.mse_top_de_normalized(pred, true, ctrl) >= 0
    assert M.mse_top_de_normalized(true, true, ctrl) == 0.0
    assert M.mse_top_de_normalized(ctrl, true, ctrl) == 1.0
    assert np.isnan(M.mse_top_de_normalized(pred, true, true))  # the control baseline is perfect: undefined


@given(mean_triples(grid), st.integers(1, 15), powers_of_two, vectors(1, grid))
def test_l2_top_expressed_is_a_distance(t, n_top, c, v):
    pred, true, expressed = t
    d = M.l2_top_expressed(pred, true, expressed_mean=expressed, n_top=n_top)
    assert d >= 0
    assert M.l2_top_expressed(true, pred, expressed_mean=expressed, n_top=n_top) == d
    assert M.l2_top_expressed(true, true, expressed_mean=expressed, n_top=n_top) == 0.0
    assert M.l2_top_expressed(c * pred, c * true, expressed_mean=expressed, n_top=n_top) == pytest.approx(c * d)
    shifted = M.l2_top_expressed(pred + v, true + v, expressed_mean=expressed, n_top=n_top)
    assert shifted == pytest.approx(d, rel=1e-9, abs=1e-9)
    # more genes never make it smaller; all genes: the plain distance
    assert M.l2_top_expressed(pred, true, expressed_mean=expressed, n_top=n_top + 1) >= d * (1 - 1e-12)
    full = M.l2_top_expressed(pred, true, expressed_mean=expressed, n_top=pred.size)
    assert full == pytest.approx(np.linalg.norm(pred - true))


# ---------------------------------------------------------------- direction_accuracy


@st.composite
def clean_deltas(draw):
    """``(pred, true, ref)`` whose changes are 0 or clearly above the round-off tolerance."""
    n = draw(n_genes)
    ref = draw(vectors(n))
    change = st.one_of(st.just(0.0), st.floats(0.01, 10), st.floats(-10, -0.01))
    dp = np.array(draw(st.lists(change, min_size=n, max_size=n)))
    dt = np.array(draw(st.lists(change, min_size=n, max_size=n)))
    return ref + dp, ref + dt, ref


@given(clean_deltas(), st.floats(0.1, 10))
def test_direction_accuracy_is_a_share_invariant_to_positive_scaling(t, c):
    pred, true, ref = t
    acc = M.direction_accuracy(pred, true, ref)
    assert _is_nan_or_in(acc, 0.0, 1.0)
    dp, dt = pred - ref, true - ref
    assert np.isnan(acc) == (not (np.abs(dt) > _tol(ref)).any())
    np.testing.assert_allclose(M.direction_accuracy(ref + c * dp, true, ref), acc, atol=1e-12, equal_nan=True)
    # flipping every predicted change: right and wrong swap, except genes predicted unchanged (wrong both ways)
    moved = np.mean(np.abs(dp[np.abs(dt) > _tol(ref)]) > _tol(ref)) if not np.isnan(acc) else np.nan
    np.testing.assert_allclose(M.direction_accuracy(ref - c * dp, true, ref) + acc, moved, atol=1e-12, equal_nan=True)


@given(clean_deltas())
def test_direction_accuracy_of_the_truth_is_one_and_of_no_change_zero(t):
    _, true, ref = t
    assume((np.abs(true - ref) > _tol(ref)).any())
    assert M.direction_accuracy(true, true, ref) == 1.0
    assert M.direction_accuracy(ref, true, ref) == 0.0


# ---------------------------------------------------------------- pds


@st.composite
def delta_matrices(draw, min_rows: int = 1, elements=finite):
    n, g = draw(st.integers(min_rows, 6)), draw(n_genes)
    return draw(arrays(np.float64, (n, g), elements=elements)), draw(arrays(np.float64, (n, g), elements=elements))


@given(delta_matrices(elements=grid), vectors(1, grid))
def test_pds_is_bounded_and_ignores_a_common_shift(t, v):
    P, T = t
    n = P.shape[0]
    s = M.pds(P, T)
    assert s.shape == (n,)
    assert ((s >= 1.0 / n - 1e-12) & (s <= 1.0)).all()
    np.testing.assert_allclose(M.pds(P + v, T + v), s, atol=1e-12)


@given(delta_matrices(), st.data())
def test_pds_follows_the_order_of_the_perturbations(t, data):
    P, T = t
    perm = np.array(data.draw(st.permutations(range(P.shape[0]))))
    np.testing.assert_array_equal(M.pds(P[perm], T[perm]), M.pds(P, T)[perm])


@given(delta_matrices())
def test_pds_of_the_truth_is_one(t):
    _, T = t
    dist = np.abs(T[:, None, :] - T[None, :, :]).sum(-1)
    assume((dist[~np.eye(len(T), dtype=bool)] > 1e-6).all())  # distinct rows, beyond pds' tie tolerance
    np.testing.assert_array_equal(M.pds(T, T), np.ones(T.shape[0]))


# ---------------------------------------------------------------- energy distance, MMD


@given(cell_pairs())
def test_energy_distance_is_symmetric_nonnegative_and_zero_on_itself(t):
    X, Y = t
    for squared in (False, True):
        e = M.energy_distance(X, Y, squared=squared)
        assert e >= 0
        assert M.energy_distance(Y, X, squared=squared) == pytest.approx(e, rel=1e-9, abs=1e-9)
        assert M.energy_distance(X, X, squared=squared) == pytest.approx(0.0, abs=1e-9)
        assert M.energy_distance(X, X[::-1], squared=squared) == pytest.approx(0.0, abs=1e-9)


@given(cell_pairs(elements=grid), vectors(1, grid), powers_of_two)
def test_energy_distance_ignores_shifts_and_scales_with_the_data(t, v, c):
    X, Y = t
    e, e2 = M.energy_distance(X, Y), M.energy_distance(X, Y, squared=True)
    scale = max(1.0, np.abs(np.vstack([X, Y])).max())
    assert M.energy_distance(X + v, Y + v) == pytest.approx(e, rel=1e-6, abs=1e-6 * scale)
    assert M.energy_distance(c * X, c * Y) == pytest.approx(c * e, rel=1e-6, abs=1e-6 * c * scale)
    assert M.energy_distance(c * X, c * Y, squared=True) == pytest.approx(c**2 * e2, rel=1e-6, abs=1e-9 * scale**2)
    # the V-statistic: every cell counted twice is the same sample
    assert M.energy_distance(np.vstack([X, X]), Y) == pytest.approx(e, rel=1e-6, abs=1e-6 * scale)
    # squared distances: twice the squared distance of the means
    shift = X.mean(0) - Y.mean(0)
    assert e2 == pytest.approx(2 * shift @ shift, rel=1e-6, abs=1e-9 * scale**2)


@given(cell_pairs())
def test_mmd_is_symmetric_bounded_and_zero_on_itself(t):
    X, Y = t
    m = M.mmd(X, Y)
    assert 0.0 <= m <= 2.0
    assert M.mmd(Y, X) == pytest.approx(m, rel=1e-9, abs=1e-12)
    assert M.mmd(X, X) == pytest.approx(0.0, abs=1e-12)


@given(cell_pairs(elements=grid), vectors(1, grid))
def test_mmd_ignores_shifts(t, v):
    X, Y = t
    assert M.mmd(X + v, Y + v) == pytest.approx(M.mmd(X, Y), abs=1e-6)


@given(cell_pairs(elements=grid), st.one_of(positive, st.sampled_from([1e-150, 1e-155, 1e150])))
def test_mmd_ignores_scale(t, c):
    """The median heuristic makes the kernel width follow the data: MMD is scale invariant, tiny data included.

    (On grid data: a median squared distance at the level of the Gram identity's round-off is not scale invariant.)
    """
    X, Y = t
    assert M.mmd(c * X, c * Y) == pytest.approx(M.mmd(X, Y), abs=1e-6)


# ---------------------------------------------------------------- diversity


@given(n_genes.flatmap(lambda n: st.tuples(cells(n, 2), cells(n, 2))))
def test_diversity_is_bounded_and_one_on_itself(t):
    S, R = t
    d = M.diversity(S, R)
    assert np.isnan(d["variance_ratio"]) or d["variance_ratio"] >= 0
    assert 0.0 <= d["coverage"] <= 1.0
    self_d = M.diversity(R, R)
    assert self_d["coverage"] == 1.0
    if (R.var(0, ddof=1) > 0).any():
        assert self_d["variance_ratio"] == pytest.approx(1.0)
    else:
        assert np.isnan(self_d["variance_ratio"])


# ---------------------------------------------------------------- DE


@fewer
@given(n_genes.flatmap(lambda n: st.tuples(cells(n, 2, 6), cells(n, 2, 6))))
def test_top_de_genes_ranks_every_gene_and_is_symmetric(t):
    A, B = t
    # integers on a small grid: float32 holds them exactly, so swapping the groups only flips the sign of the score
    A, B = np.round(A), np.round(B)
    order = M.top_de_genes(A, B, n_top=None)
    assert sorted(order.tolist()) == list(range(A.shape[1]))
    np.testing.assert_array_equal(M.top_de_genes(B, A, n_top=None), order)
    np.testing.assert_array_equal(M.top_de_genes(A, B, n_top=2), order[:2])


@given(st.lists(st.integers(0, 30), unique=True, max_size=15), st.data())
def test_de_overlap_is_a_share(true_de, data):
    pred = data.draw(st.lists(st.integers(0, 30), unique=True, max_size=15))
    o = M.de_overlap(pred, true_de)
    assert np.isnan(o) == (len(true_de) == 0)
    assert _is_nan_or_in(o, 0.0, 1.0)
    if true_de:
        assert M.de_overlap(true_de, true_de) == 1.0
        assert M.de_overlap(data.draw(st.permutations(true_de)), true_de) == 1.0
    k = data.draw(st.integers(1, 15))
    k_eff = min(k, len(true_de))  # cell-eval's overlap_at_k: k capped at the true DE genes
    o = M.de_overlap(pred, true_de, k=k)
    assert np.isnan(o) if k_eff == 0 else o == len(set(pred[:k_eff]) & set(true_de[:k_eff])) / k_eff


# ---------------------------------------------------------------- interaction


@st.composite
def combo_means(draw):
    n, g = draw(st.integers(2, 8)), draw(n_genes)
    m = arrays(np.float64, (n, g), elements=finite)
    return draw(m), draw(m), draw(m)


@given(combo_means())
def test_nonadditivity_is_a_symmetric_distance(t):
    double, additive, _ = t
    d = M.nonadditivity(double, additive)
    assert (d >= 0).all()
    np.testing.assert_array_equal(M.nonadditivity(additive, double), d)
    np.testing.assert_array_equal(M.nonadditivity(double, double), np.zeros(len(d)))


@given(combo_means(), powers_of_two)
def test_interaction_auprc_is_bounded_perfect_on_the_truth_and_scale_free(t, c):
    pred, additive, true = t
    a = M.interaction_auprc(pred, additive, true)
    assert _is_nan_or_in(a, 0.0, 1.0)
    truth = M.nonadditivity(true, additive)
    if (truth > np.median(truth)).any():
        assert M.interaction_auprc(true, additive, true) == pytest.approx(1.0)
    np.testing.assert_allclose(M.interaction_auprc(c * pred, c * additive, c * true), a, equal_nan=True)


# ---------------------------------------------------------------- NaN and inf


@given(mean_triples(), st.sampled_from(["pred", "true", "ref"]), st.data())
def test_non_finite_means_never_give_a_finite_number(t, which, data):
    args = dict(zip(["pred", "true", "ref"], t, strict=True))
    args[which] = _spoil(data, args[which])
    pred, true, ref = args["pred"], args["true"], args["ref"]
    _non_finite_or_value_error(lambda: M.pearson_delta(pred, true, ref), which)
    _non_finite_or_value_error(lambda: M.direction_accuracy(pred, true, ref), which)
    if which != "ref":
        _non_finite_or_value_error(lambda: M.mse_top_de(pred, true), which)
        _non_finite_or_value_error(lambda: M.l2_top_expressed(pred, true, expressed_mean=ref, n_top=pred.size), which)
    else:  # ref as the control baseline of the normalised MSE
        _non_finite_or_value_error(lambda: M.mse_top_de_normalized(true, pred, ref), "ctrl")


@given(mean_triples(), st.data())
def test_non_finite_expression_ranking_is_refused(t, data):
    pred, true, expressed = t
    bad = _spoil(data, expressed)
    with pytest.raises(ValueError, match="expressed_mean"):
        M.l2_top_expressed(pred, true, expressed_mean=bad, n_top=data.draw(st.integers(1, pred.size)))


@given(delta_matrices(min_rows=2), st.data())
def test_non_finite_deltas_never_give_a_finite_pds(t, data):
    """A non-finite predicted row has no rank (NaN); a non-finite true row enters every distance (all NaN)."""
    P, T = t
    i, j = data.draw(st.integers(0, P.shape[0] - 1)), data.draw(st.integers(0, P.shape[1] - 1))
    bad = data.draw(bad_values)
    Pb = P.copy()
    Pb[i, j] = bad
    s = M.pds(Pb, T)
    assert np.isnan(s[i])
    others = np.arange(len(s)) != i
    np.testing.assert_array_equal(s[others], M.pds(P, T)[others])
    Tb = T.copy()
    Tb[i, j] = bad
    assert np.isnan(M.pds(P, Tb)).all()


@given(cell_pairs(min_cells=2), st.sampled_from(["X", "Y"]), st.data())
def test_non_finite_cells_never_give_a_finite_distance(t, which, data):
    X, Y = t
    if which == "X":
        X = _spoil(data, X)
    else:
        Y = _spoil(data, Y)
    _non_finite_or_value_error(lambda: M.energy_distance(X, Y), which)
    _non_finite_or_value_error(lambda: M.energy_distance(X, Y, squared=True), which)
    _non_finite_or_value_error(lambda: M.mmd(X, Y), which)
    name = {"X": "sampled", "Y": "real"}[which]
    _non_finite_or_value_error(lambda: M.diversity(X, Y), name)


@fewer
@given(n_genes.flatmap(lambda n: st.tuples(cells(n, 2, 5), cells(n, 2, 5))), st.data())
def test_non_finite_cells_are_refused_by_differential_expression(t, data):
    A, B = t
    which = data.draw(st.sampled_from(["true_cells", "control_cells"]))
    if which == "true_cells":
        A = _spoil(data, A)
    else:
        B = _spoil(data, B)
    for fn in (M.top_de_genes, M.de_genes_fdr):
        with pytest.raises(ValueError, match=which.split("_")[0]):
            fn(A, B)


@given(st.lists(st.integers(0, 30), min_size=1, max_size=10), st.data())
def test_de_overlap_refuses_indices_that_are_not_integers(true_de, data):
    bad = np.array(true_de, dtype=np.float64)
    bad[data.draw(st.integers(0, bad.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, 0.5, 2.25]))
    with pytest.raises(ValueError, match="pred_de"):
        M.de_overlap(bad, true_de)
    with pytest.raises(ValueError, match="true_de"):
        M.de_overlap(true_de, bad)


@given(combo_means(), st.sampled_from(["pred_double", "additive", "true_double"]), st.data())
def test_non_finite_combinations_never_give_a_finite_auprc(t, which, data):
    args = dict(zip(["pred_double", "additive", "true_double"], t, strict=True))
    args[which] = _spoil(data, args[which])
    threshold = data.draw(st.one_of(st.none(), st.floats(0, 10)))
    _non_finite_or_value_error(lambda: M.interaction_auprc(**args, threshold=threshold), which)
    if which != "true_double":
        name = {"pred_double": "double", "additive": "additive"}[which]  # nonadditivity's own argument names
        _non_finite_or_value_error(lambda: M.nonadditivity(args["pred_double"], args["additive"]), name)


# ---------------------------------------------------------------- shapes


@fewer
@given(n_genes, n_genes, st.data())
def test_gene_count_mismatch_is_a_value_error(n, m, data):
    assume(n != m)
    a, b, r = data.draw(vectors(n)), data.draw(vectors(m)), data.draw(vectors(n))
    X, Y = data.draw(cells(n, 2)), data.draw(cells(m, 2))
    calls = [
        lambda: M.pearson_delta(a, b, r),
        lambda: M.pearson_delta(a, r, b),
        lambda: M.direction_accuracy(a, b, r),
        lambda: M.mse_top_de(a, b),
        lambda: M.mse_top_de_normalized(a, r, b),
        lambda: M.l2_top_expressed(a, b, expressed_mean=r),
        lambda: M.l2_top_expressed(a, r, expressed_mean=b),
        lambda: M.pds(X[:, :1] * np.ones((1, n)), Y[:, :1] * np.ones((1, m))),
        lambda: M.energy_distance(X, Y),
        lambda: M.mmd(X, Y),
        lambda: M.diversity(X, Y),
        lambda: M.nonadditivity(X, Y),
        lambda: M.interaction_auprc(X, X, Y),
        lambda: M.top_de_genes(X, Y),
        lambda: M.pearson_delta(a, a, r, genes=np.ones(m, dtype=bool)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"\d"):
            call()
