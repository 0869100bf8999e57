"""One reading of perturbation labels across vcell: ``pp.harmonize``, ``bench.split`` and a model's ``predict``.

Property-based (hypothesis): for a generated raw label, the canonical label ``pp.harmonize`` writes is the
condition ``bench.split`` holds out and the condition a model predicts; a label harmonize rejects is rejected by the
others too; they share one parser (``vcell.pp._labels``), so every property holds.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import vcell
from vcell._constants import CONTROL, PERT_COL

NAMES = ["A", "B", "C", "D", "a", "Control", "x.y", "IFN b"]
WS = st.sampled_from(["", " ", "  ", "\t"])
SPLIT_KINDS = ["combo_half", "unseen_perturbation", "random_cells", "combo_seen0", "combo_seen2"]


@st.composite
def spelled(draw, components, *, controls: bool = True, ws: bool = True) -> str:
    """A raw spelling of a set of perturbations: shuffled, ``"control"`` tokens mixed in, whitespace."""
    w = WS if ws else st.just("")
    if not components:
        return draw(w) + CONTROL + draw(w)
    parts = draw(st.permutations(sorted(components)))
    if controls and draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), CONTROL)
    return draw(w) + (draw(w) + "+" + draw(w)).join(parts) + draw(w)


@st.composite
def accepted_labels(draw) -> tuple[str, str]:
    """``(raw, canonical)``: a raw label harmonize accepts (``control="control"``) and its canonical form."""
    comps = draw(st.frozensets(st.sampled_from(NAMES), max_size=3))
    return draw(spelled(comps)), (CONTROL if not comps else "+".join(sorted(comps)))


@st.composite
def rejected_labels(draw) -> str:
    """Raw labels harmonize rejects (``control="control"``): an empty component, a component twice."""
    a, b = draw(st.lists(st.sampled_from(NAMES), min_size=2, max_size=2, unique=True))
    w = draw(WS)
    return draw(
        st.sampled_from([f"{a}+{w}{a}", f"{a}+{b}+{w}{a}", f"{a}+{b}{w}+", f"+{w}{a}", f"{a}+{w}+{b}", f"{w}+{w}"])
    )


def _adata(labels: list[str]) -> ad.AnnData:
    n = len(labels)
    obs = pd.DataFrame({"raw": labels}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(np.zeros((n, 2), dtype=np.float32), obs=obs)


def harmonized(raw: str) -> str:
    """The canonical label ``pp.harmonize`` gives ``raw`` (with a control cell beside it)."""
    out = vcell.pp.harmonize(_adata(["control", raw]), perturbation_key="raw", control="control", copy=True)
    return str(out.obs[PERT_COL].iloc[1])


def split_reading(raw: str) -> list[str]:
    """The condition(s) ``bench.split`` reads in ``raw``: its test conditions when every perturbed cell has ``raw``."""
    adata = _adata(["control"] * 2 + [raw] * 5)
    vcell.bench.split(adata, kind="random_cells", perturbation_key="raw", control="control", seed=0)
    return adata.uns["vcell_split"]["test_conditions"]


# ---------------------------------------------------------------- harmonize vs bench.split


@given(accepted_labels())
def test_split_reads_a_label_as_harmonize_writes_it(label):
    raw, canonical = label
    assert harmonized(raw) == canonical
    if canonical != CONTROL:
        assert split_reading(raw) == [canonical]


@given(rejected_labels())
@example("A+A")
@example("A+B+")
def test_split_rejects_the_labels_harmonize_rejects(raw):
    with pytest.raises(ValueError, match="ambiguous") as err:
        harmonized(raw)
    assert repr(raw) in str(err.value)
    with pytest.raises(ValueError, match="label") as err:
        split_reading(raw)
    assert repr(raw) in str(err.value)


@st.composite
def raw_screens(draw):
    """A screen of singles and combinations of ``A..E`` in raw spellings, a few cells per spelling."""
    atoms = ["A", "B", "C", "D", "E"]
    singles = draw(st.lists(st.sampled_from(atoms), min_size=2, max_size=5, unique=True))
    pairs = [frozenset((a, b)) for i, a in enumerate(atoms) for b in atoms[i + 1 :]]
    combos = draw(st.lists(st.sampled_from(pairs), max_size=8, unique=True))
    sets = [frozenset(), *(frozenset([s]) for s in singles), *combos]
    labels = []
    for s in sets:
        labels += [draw(spelled(s)) for _ in range(draw(st.integers(2, 4)))]
    return labels


@given(raw_screens(), st.sampled_from(SPLIT_KINDS), st.integers(0, 3))
def test_split_of_raw_labels_equals_split_of_harmonized_labels(labels, kind, seed):
    adata = _adata(labels)
    vcell.pp.harmonize(adata, perturbation_key="raw", control="control")
    results = []
    for key in ("raw", PERT_COL):
        try:
            out = vcell.bench.split(adata, kind=kind, seed=seed, perturbation_key=key, copy=True)
        except ValueError as err:  # too few singles/combos for this kind: the same error both ways
            results.append(str(err))
        else:
            uns = out.uns["vcell_split"]
            results.append((out.obs["vcell_split"].tolist(), uns["held_out"], uns["test_conditions"]))
    assert results[0] == results[1]
    if not isinstance(results[1], str):
        canonical = set(adata.obs[PERT_COL].astype(str))
        assert set(results[1][1]) <= canonical
        assert set(results[1][2]) <= canonical


@given(st.sampled_from(["A", "B", "C"]), st.data())
def test_split_held_out_option_reads_raw_spellings(single, data):
    labels = ["control"] * 2 + [x for x in ("A", "B", "C", "A+B", "B+C") for _ in range(3)]
    adata = _adata(labels)
    spelling = data.draw(spelled(frozenset([single])))
    a = vcell.bench.split(adata, kind="unseen_perturbation", held_out=spelling, perturbation_key="raw", copy=True)
    b = vcell.bench.split(adata, kind="unseen_perturbation", held_out=single, perturbation_key="raw", copy=True)
    assert a.uns["vcell_split"]["held_out"] == [single]
    assert a.obs["vcell_split"].tolist() == b.obs["vcell_split"].tolist()


# ---------------------------------------------------------------- harmonize vs predict


ATOMS = ["A", "B", "C", "D"]


class _Models(dict):
    """Trained models by method; a short repr for hypothesis' reports (a model's repr prints its summary)."""

    def __repr__(self) -> str:
        return f"<Baselines {sorted(self)}>"


@pytest.fixture(scope="module")
def models():
    """Baselines trained on every single of ``ATOMS`` and some combinations (raw labels, harmonised by setup)."""
    rng = np.random.default_rng(0)
    conds = ["control", *ATOMS, "B+A", "C + A", "D+B+C"]
    labels = [c for c in conds for _ in range(8)]
    X = rng.uniform(0, 3, (len(labels), 15)).astype(np.float32)
    obs = pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))])
    out = _Models()
    for method in ("additive", "linear"):
        adata = ad.AnnData(X.copy(), obs=obs.copy(), var=pd.DataFrame(index=[f"g{i}" for i in range(15)]))
        vcell.model.Baseline.setup_anndata(adata, perturbation_key="perturbation", control="control")
        model = vcell.model.Baseline(adata, method=method)
        model.train()
        out[method] = model
    return out


atom_sets = st.frozensets(st.sampled_from(ATOMS), min_size=1, max_size=3)
methods = st.sampled_from(["additive", "linear"])


@given(methods, atom_sets, st.data())
def test_predict_does_not_depend_on_the_order_of_a_combination(models, method, comps, data):
    model = models[method]
    canonical = "+".join(sorted(comps))
    raw = data.draw(spelled(comps, controls=False, ws=False))
    want = model.predict(perturbation=canonical)
    np.testing.assert_array_equal(model.predict(perturbation=raw), want)
    many = dict(model.predict_many(perturbations=[raw, canonical]))
    np.testing.assert_array_equal(many[raw], want)
    np.testing.assert_array_equal(many[canonical], want)


@given(methods, atom_sets, st.data())
@example(method="additive", comps=frozenset("A"), data=None)
def test_predict_reads_a_label_as_harmonize_writes_it(models, method, comps, data):
    model = models[method]
    raw = data.draw(spelled(comps)) if data is not None else " A + control"
    canonical = harmonized(raw)
    np.testing.assert_array_equal(model.predict(perturbation=raw), model.predict(perturbation=canonical))


@given(methods, st.data())
@example(method="additive", data=None)
def test_predict_rejects_the_labels_harmonize_rejects(models, method, data):
    model = models[method]
    a, b = data.draw(st.lists(st.sampled_from(ATOMS), min_size=2, max_size=2, unique=True)) if data else ("A", "B")
    raw = data.draw(st.sampled_from([f"{a}+{a}", f"{a}+{b}+{a}", f"{a}+{b}+", f"+{a}", f"{a}++{b}"])) if data else "A+A"
    with pytest.raises(ValueError, match="ambiguous"):
        harmonized(raw)
    with pytest.raises((ValueError, KeyError)) as err:
        model.predict(perturbation=raw)
    assert repr(raw) in str(err.value)


@given(methods, atom_sets.filter(lambda s: len(s) > 1), st.data())
@example(method="additive", comps=frozenset("AB"), data=None)
def test_predicted_cells_carry_the_canonical_label(models, method, comps, data):
    model = models[method]
    raw = data.draw(spelled(comps, controls=False, ws=False)) if data is not None else "B+A"
    canonical = "+".join(sorted(comps))
    out = vcell.tl.predict_perturbation(model.adata, model, perturbations=raw, return_adata=True)
    np.testing.assert_array_equal(out.X, model.predict(perturbation=canonical))
    assert set(out.obs["perturbation"].astype(str)) == {canonical}
