"""Property-based tests of :func:`vcell.pp.harmonize` over generated label columns (hypothesis).

Labels are drawn as a set of single perturbations per cell (possibly none: a control), then written in a raw
spelling: components in any order, joined by one of the separators, padded with whitespace, control tokens mixed
into combinations. The canonical label such a raw label must give is known from the drawn set.
"""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from vcell import pp
from vcell._constants import CONTROL, DOSE_COL, N_PERT_COL, PERT_COL

# case variants ("a"/"A", "tp53"/"TP53") are distinct perturbations: matching is exact and case-sensitive
NAMES = ["A", "a", "B", "C", "TP53", "tp53", "KRAS", "Gene-1", "x.y", "IFN b"]
CONTROL_ALIASES = ["NT", "non-targeting", "ctrl", "Control"]
SEPS = ["+", "_", ("_", "+")]
WS = st.sampled_from(["", " ", "  ", "\t", " \t "])

names = st.sampled_from(NAMES)
perturbation_sets = st.frozensets(names, max_size=3)


@st.composite
def spellings(draw, components: frozenset[str], controls: list[str], sep: str | tuple[str, ...]) -> str:
    """A raw label of ``components``: shuffled, control tokens mixed in, whitespace around components."""
    seps = [sep] if isinstance(sep, str) else list(sep)
    if not components:
        return draw(WS) + draw(st.sampled_from(controls)) + draw(WS)
    parts = draw(st.permutations(sorted(components)))
    n_ctrl = draw(st.integers(0, 1))
    for _ in range(n_ctrl):
        parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(controls)))
    text = draw(WS) + parts[0]
    for p in parts[1:]:
        text += draw(WS) + draw(st.sampled_from(seps)) + draw(WS) + p
    return text + draw(WS)


@st.composite
def screens(draw, min_cells: int = 2, max_cells: int = 25):
    """``(adata, expected canonical label per cell, control aliases, sep)``; at least one control cell."""
    controls = draw(st.lists(st.sampled_from(CONTROL_ALIASES), min_size=1, max_size=2, unique=True))
    sep = draw(st.sampled_from(SEPS))
    n = draw(st.integers(min_cells, max_cells))
    sets = draw(st.lists(perturbation_sets, min_size=n, max_size=n))
    sets[draw(st.integers(0, n - 1))] = frozenset()  # a control cell
    raw = [draw(spellings(s, controls, sep)) for s in sets]
    expected = [CONTROL if not s else "+".join(sorted(s)) for s in sets]
    categorical = draw(st.booleans())
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(raw) if categorical else raw, "other": np.arange(n)},
        index=[f"cell{i}" for i in draw(st.permutations(range(n)))],  # obs_names not in sorted order
    )
    X = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    return ad.AnnData(X, obs=obs), expected, controls, sep


def _harmonize(adata, controls, sep, **kw):
    return pp.harmonize(adata, perturbation_key="perturbation", control=controls, sep=sep, copy=True, **kw)


# ---------------------------------------------------------------- canonical labels


@given(screens())
def test_canonical_label_is_the_sorted_set_whatever_the_spelling(screen):
    adata, expected, controls, sep = screen
    out = _harmonize(adata, controls, sep)
    assert out.obs[PERT_COL].astype(str).tolist() == expected
    assert out.obs[N_PERT_COL].tolist() == [0 if e == CONTROL else e.count("+") + 1 for e in expected]


@given(st.frozensets(names, min_size=2, max_size=3), st.data())
def test_combination_order_and_spacing_do_not_matter(components, data):
    spelled = data.draw(st.lists(spellings(components, ["NT"], "+"), min_size=2, max_size=6))
    adata = ad.AnnData(
        np.zeros((len(spelled) + 1, 2), dtype=np.float32),
        obs=pd.DataFrame({"perturbation": [*spelled, "NT"]}, index=[f"c{i}" for i in range(len(spelled) + 1)]),
    )
    labels = _harmonize(adata, "NT", "+").obs[PERT_COL].astype(str).tolist()
    assert set(labels[:-1]) == {"+".join(sorted(components))}
    assert labels[-1] == CONTROL


@given(screens())
def test_categorical_and_string_columns_give_the_same_labels(screen):
    adata, _, controls, sep = screen
    other = adata.copy()
    col = adata.obs["perturbation"]
    other.obs["perturbation"] = (
        col.astype(str) if isinstance(col.dtype, pd.CategoricalDtype) else pd.Categorical(col.astype(str))
    )
    a, b = _harmonize(adata, controls, sep), _harmonize(other, controls, sep)
    pd.testing.assert_frame_equal(a.obs[[PERT_COL, N_PERT_COL, DOSE_COL]], b.obs[[PERT_COL, N_PERT_COL, DOSE_COL]])


@given(screens())
def test_control_cells_stay_control(screen):
    adata, expected, controls, sep = screen
    out = _harmonize(adata, controls, sep)
    raw = adata.obs["perturbation"].astype(str).str.strip()
    is_alias = raw.isin(controls).to_numpy()
    is_ctrl = (out.obs[PERT_COL] == CONTROL).to_numpy()
    assert is_ctrl[is_alias].all()  # every cell labelled with a control alias is a control
    np.testing.assert_array_equal(is_ctrl, np.asarray(expected) == CONTROL)  # and only those
    assert (out.obs.loc[is_ctrl, N_PERT_COL] == 0).all()
    assert (out.obs.loc[is_ctrl, DOSE_COL] == 0.0).all()
    assert (out.obs.loc[~is_ctrl, DOSE_COL] == 1.0).all()
    assert out.obs[PERT_COL].cat.categories[0] == CONTROL


# ---------------------------------------------------------------- cells and data untouched


@given(screens())
def test_never_drops_reorders_or_changes_cells(screen):
    adata, _, controls, sep = screen
    before = adata.copy()
    out = _harmonize(adata, controls, sep)
    assert out.n_obs == before.n_obs
    assert out.obs_names.equals(before.obs_names)
    assert out.var_names.equals(before.var_names)
    np.testing.assert_array_equal(out.X, before.X)
    assert out.X.dtype == before.X.dtype
    pd.testing.assert_frame_equal(out.obs[["perturbation", "other"]], before.obs[["perturbation", "other"]])
    # copy=True leaves the input as it was
    assert list(adata.obs.columns) == list(before.obs.columns)
    np.testing.assert_array_equal(adata.X, before.X)


@given(screens())
def test_in_place_writes_only_the_canonical_columns(screen):
    adata, _, controls, sep = screen
    X = adata.X
    before = adata.copy()
    assert pp.harmonize(adata, perturbation_key="perturbation", control=controls, sep=sep) is None
    assert adata.X is X
    np.testing.assert_array_equal(adata.X, before.X)
    assert adata.obs_names.equals(before.obs_names)
    assert list(adata.obs.columns) == [*before.obs.columns, PERT_COL, N_PERT_COL, DOSE_COL]
    pd.testing.assert_frame_equal(adata.obs[list(before.obs.columns)], before.obs)


@given(screens(min_cells=4), st.data())
def test_view_gives_the_labels_of_its_cells_and_leaves_the_parent(screen, data):
    adata, expected, controls, sep = screen
    ctrl_cell = expected.index(CONTROL)
    others = data.draw(st.lists(st.sampled_from(range(adata.n_obs)), max_size=adata.n_obs, unique=True))
    idx = [ctrl_cell, *(i for i in others if i != ctrl_cell)]
    view = adata[idx]
    parent_cols = list(adata.obs.columns)
    pp.harmonize(view, perturbation_key="perturbation", control=controls, sep=sep)
    assert view.obs[PERT_COL].astype(str).tolist() == [expected[i] for i in idx]
    assert view.obs_names.equals(adata.obs_names[idx])
    assert list(adata.obs.columns) == parent_cols


# ---------------------------------------------------------------- idempotent


@given(screens(), st.booleans())
def test_harmonizing_harmonized_data_changes_nothing(screen, with_dose):
    adata, _, controls, sep = screen
    if with_dose:
        adata.obs["dose"] = np.linspace(0.5, 5.0, adata.n_obs)
    once = _harmonize(adata, controls, sep, dose_key="dose" if with_dose else None)
    twice = pp.harmonize(
        once, perturbation_key=PERT_COL, control=CONTROL, dose_key=DOSE_COL if with_dose else None, copy=True
    )
    cols = [PERT_COL, N_PERT_COL, DOSE_COL]
    pd.testing.assert_frame_equal(twice.obs[cols], once.obs[cols])
    assert twice.obs_names.equals(once.obs_names)
    np.testing.assert_array_equal(twice.X, once.X)
    assert twice.uns["vcell_harmonize"]["relabelled"] == {"raw": [], "canonical": []}
    assert twice.uns["vcell_harmonize"]["merged"] == {}


# ---------------------------------------------------------------- doses


@st.composite
def dosed_screens(draw):
    adata, expected, controls, sep = draw(screens())
    doses = draw(st.lists(st.floats(0.001, 1e4), min_size=adata.n_obs, max_size=adata.n_obs))
    style = draw(st.sampled_from(["number", "string", "per_component"]))
    if style == "number":
        col = doses
    else:
        col = []
        raws = adata.obs["perturbation"].astype(str)
        for d, e, raw in zip(doses, expected, raws, strict=True):
            text = repr(float(d))
            n_raw = len(re.split(r"[+_]", raw))
            joiner = sep if isinstance(sep, str) else sep[0]
            col.append(joiner.join([text] * n_raw) if style == "per_component" and e != CONTROL else text)
    adata.obs["dose"] = col
    return adata, expected, controls, sep, np.asarray(doses, dtype=np.float64)


@given(dosed_screens())
def test_doses_are_read_per_cell_and_controls_get_zero(screen):
    adata, expected, controls, sep, doses = screen
    out = _harmonize(adata, controls, sep, dose_key="dose")
    is_ctrl = np.asarray(expected) == CONTROL
    got = out.obs[DOSE_COL].to_numpy()
    np.testing.assert_array_equal(got[is_ctrl], 0.0)
    np.testing.assert_allclose(got[~is_ctrl], doses[~is_ctrl], rtol=1e-12)


@given(screens(min_cells=3), st.data())
def test_a_missing_dose_of_a_perturbed_cell_names_its_label(screen, data):
    adata, expected, controls, sep = screen
    perturbed = [i for i, e in enumerate(expected) if e != CONTROL]
    assume(perturbed)
    i = data.draw(st.sampled_from(perturbed))
    dose = np.ones(adata.n_obs)
    dose[i] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    adata.obs["dose"] = dose if data.draw(st.booleans()) else [str(d) for d in dose]
    with pytest.raises(ValueError, match=r"obs\['dose'\] is missing \(NaN\) or infinite") as err:
        _harmonize(adata, controls, sep, dose_key="dose")
    assert repr(str(adata.obs["perturbation"].iloc[i])) in str(err.value)


# ---------------------------------------------------------------- rejected labels


@st.composite
def ambiguous_labels(draw) -> str:
    """Raw labels harmonize must reject (control aliases ``["NT"]``, ``sep="+"``)."""
    a, b = draw(st.lists(names, min_size=2, max_size=2, unique=True))
    ws = draw(WS)
    kind = draw(
        st.sampled_from(["twice", "leading", "trailing", "double_sep", "only_sep", "control_component", "control"])
    )
    return {
        "twice": f"{a}{ws}+{ws}{b}+{a}",
        "leading": f"+{ws}{a}",
        "trailing": f"{a}{ws}+{ws}{b}{ws}+",
        "double_sep": f"{a}+{ws}+{b}",
        "only_sep": f"{ws}+{ws}",
        # the canonical control name, but not one of the control aliases: ambiguous
        "control_component": f"{a}+{ws}{CONTROL}",
        "control": f"{ws}{CONTROL}",
    }[kind]


@given(st.lists(perturbation_sets, min_size=1, max_size=10), ambiguous_labels(), st.data())
@example(sets=[frozenset()], bad="A+A", data=None)
@example(sets=[frozenset("B")], bad="A+B+", data=None)
def test_rejected_labels_raise_value_error_naming_the_label(sets, bad, data):
    raw = ["NT"] + [data.draw(spellings(s, ["NT"], "+")) if data else "+".join(sorted(s)) or "NT" for s in sets]
    i = data.draw(st.integers(1, len(raw))) if data else len(raw)
    raw.insert(i, bad)
    adata = ad.AnnData(
        np.zeros((len(raw), 1), dtype=np.float32),
        obs=pd.DataFrame({"perturbation": raw}, index=[f"c{i}" for i in range(len(raw))]),
    )
    with pytest.raises(ValueError, match=r"ambiguous perturbation label\(s\) in obs\['perturbation'\]") as err:
        _harmonize(adata, "NT", "+")
    assert repr(bad) in str(err.value)


@given(screens(), st.sampled_from(["", " ", "\t", None, np.nan]), st.data())
def test_missing_labels_raise_value_error_naming_the_column(screen, missing, data):
    adata, _, controls, sep = screen
    labels = adata.obs["perturbation"].astype(str).to_numpy(dtype=object)
    labels[data.draw(st.integers(0, adata.n_obs - 1))] = missing
    adata.obs["perturbation"] = labels
    with pytest.raises(ValueError, match=r"obs\['perturbation'\] has 1 cells with a missing label"):
        _harmonize(adata, controls, sep)


@given(st.lists(perturbation_sets.filter(bool), min_size=1, max_size=10), st.data())
def test_no_control_cell_raises_value_error_naming_the_controls(sets, data):
    raw = [data.draw(spellings(s, ["NT"], "+")) for s in sets]
    adata = ad.AnnData(
        np.zeros((len(raw), 1), dtype=np.float32),
        obs=pd.DataFrame({"perturbation": raw}, index=[f"c{i}" for i in range(len(raw))]),
    )
    with pytest.raises(ValueError, match=r"no control cells.*control=\['NT', 'ctrl'\]"):
        _harmonize(adata, ["NT", "ctrl"], "+")
