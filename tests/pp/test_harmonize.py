from __future__ import annotations

import logging
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from vcell import pp
from vcell._constants import CONTROL, DOSE_COL, N_PERT_COL, PERT_COL

NEW_COLS = [PERT_COL, N_PERT_COL, DOSE_COL]


def _relab(report) -> dict:
    return {str(r): str(c) for r, c in zip(report["relabelled"]["raw"], report["relabelled"]["canonical"], strict=True)}


def make_adata(labels, **cols) -> ad.AnnData:
    n = len(labels)
    obs = pd.DataFrame({"perturbation": labels, **cols}, index=[f"c{i}" for i in range(n)])
    X = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    return ad.AnnData(X, obs=obs)


def result(adata) -> tuple[list[str], list[int], list[float]]:
    return (
        adata.obs[PERT_COL].astype(str).tolist(),
        adata.obs[N_PERT_COL].tolist(),
        adata.obs[DOSE_COL].tolist(),
    )


@pytest.fixture
def vcell_log(caplog):
    logger = logging.getLogger("vcell")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="vcell")
    yield caplog
    logger.removeHandler(caplog.handler)


# ---------------------------------------------------------------- label helpers


def test_split_perturbation():
    assert pp.split_perturbation("A+B") == ("A", "B")
    assert pp.split_perturbation("A") == ("A",)
    assert pp.split_perturbation(CONTROL) == ()


def test_canonical_label():
    assert pp.canonical_label(["B", "A"]) == "A+B"
    assert pp.canonical_label(("C", " A", "B")) == "A+B+C"
    assert pp.canonical_label([]) == CONTROL
    assert pp.canonical_label(["control", "A"]) == "A"
    assert pp.canonical_label(x for x in ["B", "A"]) == "A+B"
    for bad in (["A", "A"], ["A", ""], ["A+B"]):
        with pytest.raises(ValueError, match="component"):
            pp.canonical_label(bad)


def test_is_combo_and_n():
    assert pp.is_combo("A+B")
    assert not pp.is_combo("A")
    assert not pp.is_combo(CONTROL)
    assert [pp.n_perturbations(x) for x in ["control", "A", "A+B", "A+B+C"]] == [0, 1, 2, 3]


def test_helpers_roundtrip():
    for comps in [(), ("A",), ("B", "A"), ("Z", "a", "M")]:
        assert pp.split_perturbation(pp.canonical_label(comps)) == tuple(sorted(comps))


# ---------------------------------------------------------------- styles


def test_gears_style():
    adata = make_adata(["ctrl", "A+ctrl", "ctrl+B", "A+B", "B+A", "ctrl+ctrl"])
    pp.harmonize(adata, perturbation_key="perturbation", control="ctrl")
    labels, n, dose = result(adata)
    assert labels == ["control", "A", "B", "A+B", "A+B", "control"]
    assert n == [0, 1, 1, 2, 2, 0]
    assert dose == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert adata.obs[PERT_COL].dtype == "category"
    assert list(adata.obs[PERT_COL].cat.categories) == ["control", "A", "A+B", "B"]
    assert adata.obs[N_PERT_COL].dtype.kind == "i"
    assert adata.obs[DOSE_COL].dtype.kind == "f"
    rep = adata.uns["vcell_harmonize"]
    assert (rep["n_cells"], rep["n_control"], rep["n_single"], rep["n_combo"]) == (6, 2, 2, 2)
    assert _relab(rep) == {"ctrl": "control", "A+ctrl": "A", "ctrl+B": "B", "B+A": "A+B", "ctrl+ctrl": "control"}
    assert rep["merged"] == {"A+B": ["A+B", "B+A"], "control": ["ctrl", "ctrl+ctrl"]}
    assert rep["params"]["gears_ctrl"] is True
    assert rep["n_labels_raw"] == 6
    assert rep["n_labels"] == 4


def test_gears_style_needs_the_control_label_named():
    # GEARS style data detected from "A+ctrl": ctrl tokens inside combos mean "no perturbation", but the
    # control cells must carry a label the user named, or harmonize refuses to guess
    adata = make_adata(["ctrl", "A+ctrl", "A+B"])
    with pytest.raises(ValueError, match="no control cells.*control='control'"):
        pp.harmonize(adata, perturbation_key="perturbation", control="control")
    pp.harmonize(adata, perturbation_key="perturbation", control="ctrl")
    assert result(adata)[0] == ["control", "A", "A+B"]
    assert adata.uns["vcell_harmonize"]["params"]["gears_ctrl"] is True


def test_ctrl_is_a_plain_label_without_gears_style():
    adata = make_adata(["NT", "ctrl", "A"])
    pp.harmonize(adata, perturbation_key="perturbation", control="NT")
    assert result(adata)[0] == ["control", "ctrl", "A"]
    assert adata.uns["vcell_harmonize"]["params"]["gears_ctrl"] is False


def test_scperturb_style():
    adata = make_adata(["control", "B_A", "A_B", "A", "C"])
    pp.harmonize(adata, perturbation_key="perturbation", control="control", sep="_")
    labels, n, _ = result(adata)
    assert labels == ["control", "A+B", "A+B", "A", "C"]
    assert n == [0, 2, 2, 1, 1]
    rep = adata.uns["vcell_harmonize"]
    assert _relab(rep) == {"B_A": "A+B", "A_B": "A+B"}
    assert rep["merged"] == {"A+B": ["A_B", "B_A"]}
    assert rep["params"]["sep"] == ["_"]


def test_several_separators_and_controls():
    adata = make_adata(["NT", "safe", "C_B+A", "A + B", " A ", "NT_A"])
    pp.harmonize(adata, perturbation_key="perturbation", control=["NT", "safe"], sep=("_", "+"))
    labels, n, _ = result(adata)
    assert labels == ["control", "control", "A+B+C", "A+B", "A", "A"]
    assert n == [0, 0, 3, 2, 1, 1]
    assert adata.uns["vcell_harmonize"]["params"]["control"] == ["NT", "safe"]


def test_combos_both_orders_three_way():
    adata = make_adata(["control", "C+A+B", "B+C+A", "A+B+C"])
    pp.harmonize(adata, perturbation_key="perturbation", control="control")
    assert result(adata)[0] == ["control", "A+B+C", "A+B+C", "A+B+C"]
    assert adata.uns["vcell_harmonize"]["merged"] == {"A+B+C": ["A+B+C", "B+C+A", "C+A+B"]}


def test_categorical_input_with_unused_ambiguous_category():
    labels = pd.Categorical(["control", "A", "B+A"], categories=["control", "A", "B+A", "A++B"])
    adata = make_adata(labels)
    pp.harmonize(adata, perturbation_key="perturbation", control="control")
    assert result(adata)[0] == ["control", "A", "A+B"]
    assert adata.uns["vcell_harmonize"]["n_labels_raw"] == 3


def test_non_string_labels():
    adata = make_adata([0, 1, 2, 1])
    pp.harmonize(adata, perturbation_key="perturbation", control="0")
    assert result(adata)[0] == ["control", "1", "2", "1"]


def test_idempotent():
    adata = make_adata(["ctrl", "B+ctrl", "B+A", "A+B"], dose=[np.nan, 5.0, 2.0, 2.0])
    pp.harmonize(adata, perturbation_key="perturbation", control="ctrl", dose_key="dose")
    first = adata.obs[NEW_COLS].copy()
    pp.harmonize(adata, perturbation_key=PERT_COL, control=CONTROL, dose_key=DOSE_COL)
    pd.testing.assert_frame_equal(adata.obs[NEW_COLS], first)
    rep = adata.uns["vcell_harmonize"]
    assert _relab(rep) == {}
    assert rep["merged"] == {}
    assert (rep["n_control"], rep["n_single"], rep["n_combo"]) == (1, 1, 2)


# ---------------------------------------------------------------- doses


def test_numeric_dose():
    adata = make_adata(["control", "A", "A+B", "B"], dose=[7.0, 10.0, 20.0, 0.5])
    pp.harmonize(adata, perturbation_key="perturbation", control="control", dose_key="dose")
    assert result(adata)[2] == [0.0, 10.0, 20.0, 0.5]
    assert adata.obs["dose"].tolist() == [7.0, 10.0, 20.0, 0.5]  # original column untouched
    assert adata.uns["vcell_harmonize"]["params"]["dose_key"] == "dose"


def test_numeric_dose_nan_for_controls_is_fine_and_ints_work():
    adata = make_adata(["control", "A"], dose=[np.nan, 3.0])
    pp.harmonize(adata, perturbation_key="perturbation", control="control", dose_key="dose")
    assert result(adata)[2] == [0.0, 3.0]
    adata = make_adata(["control", "A"], dose=[0, 3])
    pp.harmonize(adata, perturbation_key="perturbation", control="control", dose_key="dose")
    assert result(adata)[2] == [0.0, 3.0]


def test_categorical_numeric_dose():
    adata = make_adata(["control", "A", "B"], dose=pd.Categorical([0.0, 10.0, 100.0]))
    pp.harmonize(adata, perturbation_key="perturbation", control="control", dose_key="dose")
    assert result(adata)[2] == [0.0, 10.0, 100.0]


def test_string_combo_doses():
    adata = make_adata(
        ["control", "A+B", "A", "B+ctrl", "A+B", "C"],
        dose=["0", "10+10", "5", "3+0", "20", "1e2"],
    )
    pp.harmonize(adata, perturbation_key="perturbation", control="control", dose_key="dose")
    assert result(adata)[2] == [0.0, 10.0, 5.0, 3.0, 20.0, 100.0]


def test_string_doses_scperturb_sep():
    adata = make_adata(["control", "A_B", "B"], dose=["", "10_10", "2.5"])
    pp.harmonize(adata, perturbation_key="perturbation", control="control", sep="_", dose_key="dose")
    assert result(adata)[2] == [0.0, 10.0, 2.5]


def test_string_dose_different_per_component_raises():
    adata = make_adata(["control", "A+B"], dose=["0", "10+20"])
    with pytest.raises(ValueError, match=r"'10\+20' of label 'A\+B'.*per-component doses are not supported yet"):
        pp.harmonize(adata, perturbation_key="perturbation", control="control", dose_key="dose")


def test_string_dose_wrong_number_of_components_raises():
    adata = make_adata(["control", "A+B"], dose=["0", "1+1+1"])
    with pytest.raises(ValueError, match="3 components but the label has 2"):
        pp.harmonize(adata, perturbation_key="perturbation", control="control", dose_key="dose")


def test_string_dose_not_a_number_raises():
    adata = make_adata(["control", "A"], dose=["0", "high"])
    with pytest.raises(ValueError, match="'high'.*not a number"):
        pp.harmonize(adata, perturbation_key="perturbation", control="control", dose_key="dose")


@pytest.mark.parametrize("dose", [[0.0, np.nan, 1.0], ["0", None, "1"], ["0", "nan", "1"]])
def test_nan_dose_for_perturbed_cell_raises(dose):
    adata = make_adata(["control", "A+B", "C"], dose=dose)
    with pytest.raises(ValueError, match=r"'dose'.*missing \(NaN\).*'A\+B'"):
        pp.harmonize(adata, perturbation_key="perturbation", control="control", dose_key="dose")
    assert PERT_COL not in adata.obs


# ---------------------------------------------------------------- errors


def test_missing_perturbation_key():
    adata = make_adata(["control", "A"])
    with pytest.raises(KeyError, match="'condition'.*available columns: 'perturbation'"):
        pp.harmonize(adata, perturbation_key="condition", control="control")


def test_missing_dose_key():
    adata = make_adata(["control", "A"])
    with pytest.raises(KeyError, match="dose_key 'dose_value'.*'perturbation'"):
        pp.harmonize(adata, perturbation_key="perturbation", control="control", dose_key="dose_value")


def test_no_control_cells():
    adata = make_adata(["NT", "A", "A", "B"])
    with pytest.raises(ValueError, match=r"control='ctrl'.*'A' \(2 cells\), 'NT' \(1 cells\), 'B' \(1 cells\)"):
        pp.harmonize(adata, perturbation_key="perturbation", control="ctrl")
    with pytest.raises(ValueError, match=r"control=\['x', 'y'\]"):
        pp.harmonize(adata, perturbation_key="perturbation", control=["x", "y"])


@pytest.mark.parametrize(
    ("label", "reason"),
    [
        ("A++B", "empty component"),
        ("+A", "empty component"),
        ("A+", "empty component"),
        ("A+A", "component 'A' appears twice"),
        ("A+ctrl+A", "component 'A' appears twice"),
    ],
)
def test_ambiguous_labels(label, reason):
    adata = make_adata(["ctrl", "B", label])
    with pytest.raises(ValueError, match="ambiguous") as info:
        pp.harmonize(adata, perturbation_key="perturbation", control="ctrl")
    assert repr(label) in str(info.value)
    assert reason in str(info.value)


def test_ambiguous_canonical_separator_inside_component():
    adata = make_adata(["control", "A+B_C"])
    with pytest.raises(ValueError, match=r"'A\+B_C'.*contains '\+'.*pass it in sep="):
        pp.harmonize(adata, perturbation_key="perturbation", control="control", sep="_")
    pp.harmonize(adata, perturbation_key="perturbation", control="control", sep=["_", "+"])
    assert result(adata)[0] == ["control", "A+B+C"]


def test_ambiguous_control_component():
    adata = make_adata(["NT", "control", "A"])
    with pytest.raises(ValueError, match=r"'control'.*canonical control name.*\['NT'\]"):
        pp.harmonize(adata, perturbation_key="perturbation", control="NT")
    pp.harmonize(adata, perturbation_key="perturbation", control=["NT", "control"])
    assert result(adata)[0] == ["control", "control", "A"]


def test_several_ambiguous_labels_listed_together():
    adata = make_adata(["control", "A++B", "C+C"])
    with pytest.raises(ValueError, match=r"'A\+\+B'.*'C\+C'"):
        pp.harmonize(adata, perturbation_key="perturbation", control="control")


@pytest.mark.parametrize("missing", [np.nan, None, "", "  "])
def test_missing_labels(missing):
    adata = make_adata(["control", missing, "A", missing])
    with pytest.raises(ValueError, match=r"obs\['perturbation'\] has 2 cells with a missing label"):
        pp.harmonize(adata, perturbation_key="perturbation", control="control")


def test_missing_labels_categorical():
    adata = make_adata(pd.Categorical(["control", None, "A"]))
    with pytest.raises(ValueError, match="1 cells with a missing label"):
        pp.harmonize(adata, perturbation_key="perturbation", control="control")


@pytest.mark.parametrize(("kwargs", "match"), [({"control": []}, "control is empty"), ({"sep": ""}, "sep must")])
def test_bad_parameters(kwargs, match):
    adata = make_adata(["control", "A"])
    params = {"control": "control", **kwargs}
    with pytest.raises(ValueError, match=match):
        pp.harmonize(adata, perturbation_key="perturbation", **params)


# ---------------------------------------------------------------- AnnData contract


def test_copy_true_leaves_input_untouched():
    adata = make_adata(["ctrl", "A+ctrl", "B+A"])
    before_obs = adata.obs.copy()
    before_X = adata.X.copy()
    out = pp.harmonize(adata, perturbation_key="perturbation", control="ctrl", copy=True)
    assert isinstance(out, ad.AnnData)
    assert out is not adata
    pd.testing.assert_frame_equal(adata.obs, before_obs)
    assert "vcell_harmonize" not in adata.uns
    np.testing.assert_array_equal(adata.X, before_X)
    assert result(out)[0] == ["control", "A", "A+B"]
    assert out.obs_names.tolist() == adata.obs_names.tolist()


def test_copy_false_adds_exactly_documented_keys():
    adata = make_adata(["ctrl", "A+ctrl", "B+A", "A"])
    adata.uns["other"] = {"x": 1}
    adata.layers["counts"] = adata.X.copy()
    before_obs = adata.obs.copy()
    before_X = adata.X.copy()
    before = (list(adata.obs.columns), set(adata.uns), set(adata.layers), list(adata.var.columns), adata.obs_names)
    ret = pp.harmonize(adata, perturbation_key="perturbation", control="ctrl")
    assert ret is None
    assert list(adata.obs.columns) == before[0] + NEW_COLS
    assert set(adata.uns) == before[1] | {"vcell_harmonize"}
    assert set(adata.layers) == before[2]
    assert list(adata.var.columns) == before[3]
    assert adata.obs_names.equals(before[4])  # nothing dropped or reordered
    pd.testing.assert_frame_equal(adata.obs[before_obs.columns], before_obs)  # raw column unchanged
    np.testing.assert_array_equal(adata.X, before_X)


def test_view_is_made_actual():
    adata = make_adata(["control", "A", "B", "A+B"])
    view = adata[[0, 1, 3]]
    pp.harmonize(view, perturbation_key="perturbation", control="control")
    assert not view.is_view
    assert result(view)[0] == ["control", "A", "A+B"]
    assert PERT_COL not in adata.obs


def test_report_logged_and_h5ad_writable(tmp_path, vcell_log):
    adata = make_adata(["ctrl", "A+ctrl", "B+A", "A+B"], dose=[0.0, 1.0, 2.0, 2.0])
    pp.harmonize(adata, perturbation_key="perturbation", control="ctrl", dose_key="dose")
    text = vcell_log.text
    assert "4 cells, 1 control, 1 single, 2 combination" in text
    assert "'A+ctrl' -> 'A'" in text
    path = tmp_path / "h.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    rep = back.uns["vcell_harmonize"]
    assert _relab(rep) == _relab(adata.uns["vcell_harmonize"])
    assert list(rep["merged"]["A+B"]) == ["A+B", "B+A"]
    assert list(rep["params"]["control"]) == ["ctrl"]
    assert rep["params"]["dose_key"] == "dose"
    pd.testing.assert_frame_equal(back.obs[NEW_COLS], adata.obs[NEW_COLS])


def test_report_without_dose_key_writable(tmp_path):
    adata = make_adata(["control", "A"])
    pp.harmonize(adata, perturbation_key="perturbation", control="control")
    assert adata.uns["vcell_harmonize"]["params"]["dose_key"] == ""
    adata.write_h5ad(tmp_path / "a.h5ad")
    assert _relab(ad.read_h5ad(tmp_path / "a.h5ad").uns["vcell_harmonize"]) == {}


def test_million_cells_fast():
    rng = np.random.default_rng(0)
    cats = ["ctrl", *[f"G{i}+ctrl" for i in range(200)], *[f"G{i}+G{i + 1}" for i in range(200)]]
    codes = rng.integers(0, len(cats), size=1_000_000)
    obs = pd.DataFrame({"condition": pd.Categorical.from_codes(codes, categories=cats)})
    adata = ad.AnnData(obs=obs)
    t0 = time.perf_counter()
    pp.harmonize(adata, perturbation_key="condition", control="ctrl")
    elapsed = time.perf_counter() - t0
    assert elapsed < 10
    n = adata.obs[N_PERT_COL].to_numpy()
    expected_n = np.where(codes == 0, 0, np.where(codes <= 200, 1, 2))
    np.testing.assert_array_equal(n, expected_n)
    assert adata.obs[PERT_COL].iloc[np.flatnonzero(codes == 1)[0]] == "G0"


# ---------------------------------------------------------------- real data


def test_kang(kang_path):
    adata = ad.read_h5ad(kang_path)
    n = adata.n_obs
    pp.harmonize(adata, perturbation_key="perturbation", control="control")
    assert adata.n_obs == n == 1975
    counts = adata.obs[PERT_COL].value_counts()
    assert counts["control"] == 936
    assert counts["IFNb"] == 1039
    rep = adata.uns["vcell_harmonize"]
    assert (rep["n_control"], rep["n_single"], rep["n_combo"]) == (936, 1039, 0)
    assert _relab(rep) == {}
    assert (adata.obs[DOSE_COL][adata.obs[PERT_COL] == "IFNb"] == 1.0).all()


def test_papalexi(papalexi_path):
    adata = ad.read_h5ad(papalexi_path)
    raw = adata.obs["perturbation"].copy()
    pp.harmonize(adata, perturbation_key="perturbation", control="control")
    assert adata.n_obs == 20729
    counts = adata.obs[PERT_COL].value_counts()
    assert counts["control"] == 2386
    assert len(counts) == 26
    assert counts["IFNGR1"] == 1341
    assert counts["SPI1"] == 48
    rep = adata.uns["vcell_harmonize"]
    assert (rep["n_control"], rep["n_single"], rep["n_combo"]) == (2386, 20729 - 2386, 0)
    assert (adata.obs[PERT_COL].astype(str) == raw.astype(str)).all()
    pd.testing.assert_series_equal(adata.obs["perturbation"], raw)


# ---------------------------------------------------------------- one report line per call


@pytest.fixture
def root_handler():
    """A handler on the root logger, as ``logging.basicConfig`` in a notebook (or scanpy/scvi-tools' setup) adds."""
    import sys

    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


def test_one_report_line_per_call(capsys, root_handler):
    import scanpy  # noqa: F401  (scanpy and scvi-tools configure logging of their own on import)
    import scvi  # noqa: F401

    import vcell
    from vcell._settings import _configure_logger

    _configure_logger()  # as a second import of vcell would: still one handler
    ours = [h for h in logging.getLogger("vcell").handlers if getattr(h, "_vcell_handler", False)]
    assert len(ours) == 1
    adata = make_adata(["ctrl", "A+ctrl", "B+A", "A+B"] * 5)
    capsys.readouterr()
    for n in (1, 2, 3):
        pp.harmonize(adata, perturbation_key="perturbation", control="ctrl")
        assert capsys.readouterr().err.count("harmonize obs['perturbation']") == 1, f"call {n}"
    # a model's setup_anndata harmonises again; the labels it writes are those already there: no second report
    vcell.model.Baseline.setup_anndata(adata, perturbation_key="perturbation", control="ctrl")
    assert "harmonize" not in capsys.readouterr().err
    # on data not harmonised before, setup_anndata's report is the call's one line
    fresh = make_adata(["ctrl", "A+ctrl", "B+A", "A+B"] * 5)
    vcell.model.Baseline.setup_anndata(fresh, perturbation_key="perturbation", control="ctrl")
    assert capsys.readouterr().err.count("harmonize obs['perturbation']") == 1


def test_one_report_record_per_call(vcell_log):
    adata = make_adata(["ctrl", "A", "B"] * 3)
    for _ in range(2):
        pp.harmonize(adata, perturbation_key="perturbation", control="ctrl")
    assert sum("harmonize obs['perturbation']" in r.getMessage() for r in vcell_log.records) == 2
