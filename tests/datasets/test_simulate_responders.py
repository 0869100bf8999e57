"""``simulate(responder_fraction=...)``: bimodal responders (non-responders are drawn like controls)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import sparse

from vcell._utils import log1p_cp10k
from vcell.datasets import simulate

SMALL = {"n_cells": 300, "n_genes": 30, "n_perturbations": 3, "n_combos": 2}
# two singles, no combos: 400 controls and 800 cells per single, about 400 responders each at fraction 0.5
MIXTURE = {"n_cells": 2000, "n_genes": 40, "n_perturbations": 2, "n_combos": 0}


def _x_hash(X) -> str:
    X = sparse.csr_matrix(X)
    X.sort_indices()
    h = hashlib.sha256()
    for arr in (X.indptr.astype(np.int64), X.indices.astype(np.int64), X.data.astype(np.float32)):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


# SHA-256 of X from simulate() before responder_fraction existed (same numpy, same arguments): the default must not
# change a single draw of the main random stream
HASH_SMALL_SEED3 = "874e8b6f38751486d52235e56555a4a4ddbe306c45b2ca69b22ac12ecb6560c6"
HASH_DOSES_TYPES_SEED4 = "38977f3559a54810a00b1d46d7373b8ca9b69daf24403b370f7957dad8905957"
HASH_PROTEIN_SEED5 = (
    "82c2bf008ea4c64dc4cbf89627f90f0c117082a4f2a14253e4fc701ff08e5186",  # rna
    "da51c2994f212a061226fe91d5da434c92834a6ac10aa3463b90f569f917fb70",  # prot
)


def test_default_is_bitwise_unchanged():
    assert _x_hash(simulate(**SMALL, seed=3).X) == HASH_SMALL_SEED3
    assert _x_hash(simulate(**SMALL, cell_types=2, doses=[0.1, 1.0], seed=4).X) == HASH_DOSES_TYPES_SEED4
    mdata = simulate(n_cells=200, n_genes=30, n_perturbations=3, n_combos=1, protein=True, seed=5)
    assert (_x_hash(mdata["rna"].X), _x_hash(mdata["prot"].X)) == HASH_PROTEIN_SEED5


def test_explicit_one_equals_default_and_fraction_changes_counts():
    default = simulate(**SMALL, seed=3)
    explicit = simulate(**SMALL, responder_fraction=1.0, seed=3)
    assert (default.X != explicit.X).nnz == 0
    assert default.obs.equals(explicit.obs)
    half = simulate(**SMALL, responder_fraction=0.5, seed=3)
    # same labels, cell types and doses; only the non-responders' (and later cells') counts change
    assert half.obs.drop(columns="responder").equals(default.obs.drop(columns="responder"))
    assert (half.X != default.X).nnz > 0
    assert _x_hash(half.X) != HASH_SMALL_SEED3


def test_responder_column_and_uns():
    adata = simulate(**SMALL, seed=3)
    perturbed = (adata.obs["perturbation"] != "control").to_numpy()
    assert adata.obs["responder"].dtype == bool
    np.testing.assert_array_equal(adata.obs["responder"].to_numpy(), perturbed)
    truth = adata.uns["vcell_simulation"]
    assert truth["responder_fraction"] == 1.0
    assert truth["params"]["responder_fraction"] == 1.0

    half = simulate(**SMALL, responder_fraction=0.25, seed=3)
    resp = half.obs["responder"].to_numpy()
    assert not resp[~perturbed].any()  # controls are never responders
    assert 0 < resp.sum() < perturbed.sum()
    assert half.uns["vcell_simulation"]["responder_fraction"] == 0.25
    # the truth stays the responders': the true log-means do not depend on responder_fraction
    np.testing.assert_array_equal(half.uns["vcell_simulation"]["true_log_mean"], truth["true_log_mean"])


def test_responders_are_nested_in_the_fraction():
    # one coin per cell from its own stream: a responder at 0.3 is a responder at 0.6
    low = simulate(**SMALL, responder_fraction=0.3, seed=8).obs["responder"].to_numpy()
    high = simulate(**SMALL, responder_fraction=0.6, seed=8).obs["responder"].to_numpy()
    assert not (low & ~high).any()
    assert high.sum() > low.sum()


def test_share_of_responders_is_binomial():
    adata = simulate(**MIXTURE, responder_fraction=0.5, seed=0)
    perturbed = (adata.obs["perturbation"] != "control").to_numpy()
    n = int(perturbed.sum())
    assert n == 1600
    share = adata.obs["responder"].to_numpy()[perturbed].mean()
    # binomial sd = sqrt(0.25 / 1600) = 0.0125; allow 4 sd
    assert abs(share - 0.5) < 4 * 0.0125
    for pert in adata.uns["vcell_simulation"]["perturbations"]:
        in_pert = (adata.obs["perturbation"] == pert).to_numpy()
        assert abs(adata.obs["responder"].to_numpy()[in_pert].mean() - 0.5) < 4 * np.sqrt(0.25 / in_pert.sum())


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(x.size))


def test_non_responders_look_like_controls_and_response_is_bimodal():
    adata = simulate(**MIXTURE, responder_fraction=0.5, seed=0)
    truth = adata.uns["vcell_simulation"]
    expr = log1p_cp10k(adata.X)
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    resp = adata.obs["responder"].to_numpy()
    ctrl = expr[labels == "control"]
    for pert in truth["perturbations"]:
        # the target gene is knocked down by 1-2 (log scale) in responders: a strongly affected gene
        g = list(adata.var_names).index(pert)
        in_pert = labels == pert
        m_ctrl, se_ctrl = _mean_se(ctrl[:, g])
        m_non, se_non = _mean_se(expr[in_pert & ~resp, g])
        m_resp, se_resp = _mean_se(expr[in_pert & resp, g])
        # non-responders: the controls' distribution (means within 4 joint standard errors)
        assert abs(m_non - m_ctrl) < 4 * np.hypot(se_non, se_ctrl), (pert, m_non, m_ctrl)
        # responders: knocked down, far from the controls
        assert m_ctrl - m_resp > 10 * np.hypot(se_resp, se_ctrl), (pert, m_resp, m_ctrl)
        # bimodal within one condition: the two components' means are separated by > 3 standard errors
        assert abs(m_non - m_resp) > 3 * np.hypot(se_non, se_resp)
        # and the condition's mean is the mixture's, about halfway between
        m_all = expr[in_pert, g].mean()
        assert min(m_non, m_resp) < m_all < max(m_non, m_resp)

    # with every cell responding the same gene shows one (knocked-down) component
    full = simulate(**MIXTURE, seed=0)
    expr_full = log1p_cp10k(full.X)
    pert = truth["perturbations"][0]
    g = list(full.var_names).index(pert)
    in_pert = full.obs["perturbation"].astype(str).to_numpy() == pert
    assert expr_full[in_pert, g].mean() < expr[(labels == pert) & ~resp, g].mean() - 0.5


def test_non_responders_carry_no_program_effect():
    # the gene most moved by the programs (not a target) follows the controls in non-responders too
    adata = simulate(**MIXTURE, responder_fraction=0.5, seed=1)
    truth = adata.uns["vcell_simulation"]
    labels = list(truth["true_log_mean_labels"])
    ctrl_row = truth["true_log_mean"][labels.index("control|type0")]
    expr = log1p_cp10k(adata.X)
    obs_labels = adata.obs["perturbation"].astype(str).to_numpy()
    resp = adata.obs["responder"].to_numpy()
    targets = [list(adata.var_names).index(p) for p in truth["perturbations"]]
    for pert in truth["perturbations"]:
        shift = truth["true_log_mean"][labels.index(f"{pert}|type0")] - ctrl_row
        shift[targets] = 0.0
        g = int(np.argmax(np.abs(shift)))
        assert abs(shift[g]) > 0.3  # a real program effect
        m_ctrl, se_ctrl = _mean_se(expr[obs_labels == "control", g])
        m_non, se_non = _mean_se(expr[(obs_labels == pert) & ~resp, g])
        m_resp, se_resp = _mean_se(expr[(obs_labels == pert) & resp, g])
        assert abs(m_non - m_ctrl) < 4 * np.hypot(se_non, se_ctrl)
        assert np.sign(m_resp - m_ctrl) == np.sign(shift[g])
        assert abs(m_resp - m_ctrl) > 4 * np.hypot(se_resp, se_ctrl)


def test_protein_and_mudata_obs_carry_responders():
    mdata = simulate(
        n_cells=200, n_genes=30, n_perturbations=3, n_combos=1, protein=True, responder_fraction=0.5, seed=5
    )
    rna_resp = mdata["rna"].obs["responder"].to_numpy()
    np.testing.assert_array_equal(mdata["prot"].obs["responder"].to_numpy(), rna_resp)
    np.testing.assert_array_equal(mdata.obs["responder"].to_numpy().astype(bool), rna_resp)
    assert mdata.uns["vcell_simulation"]["responder_fraction"] == 0.5


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_invalid_responder_fraction(bad):
    with pytest.raises(ValueError, match="responder_fraction"):
        simulate(**SMALL, responder_fraction=bad, seed=0)


def test_h5ad_roundtrip_keeps_responders(tmp_path):
    import anndata as ad

    adata = simulate(**SMALL, responder_fraction=0.5, seed=2)
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.obs["responder"].to_numpy(), adata.obs["responder"].to_numpy())
    assert back.uns["vcell_simulation"]["responder_fraction"] == 0.5
