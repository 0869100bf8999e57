from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import vcell
from vcell._constants import REGISTRY_KEYS
from vcell.data import (
    CellBatches,
    Pairs,
    PerturbationVocab,
    RowReader,
    context_labels,
    control_mask,
    pair_controls,
)


def _toy(n_per=20, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    labels = ["ctrl"] * (2 * n_per) + ["A+ctrl"] * n_per + ["B+ctrl"] * n_per + ["A+B"] * n_per
    n = len(labels)
    X = rng.poisson(5, size=(n, 30)).astype(np.float32)
    obs = pd.DataFrame(
        {"condition": labels, "cell_type": np.tile(["t1", "t2"], n // 2)}, index=[f"c{i}" for i in range(n)]
    )
    return ad.AnnData(X=sparse.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(30)]))


def test_vocab_encodes_combos_as_sum_of_singles():
    vocab = PerturbationVocab(["control", "B", "A", "A+B", "C+A"])
    assert vocab.atoms == ["A", "B", "C"]
    enc = vocab.encode(["A+B", "A", "B", "control"], doses=[1.0, 2.0, 1.0, 0.0])
    np.testing.assert_array_equal(enc, [[1, 1, 0], [2, 0, 0], [0, 1, 0], [0, 0, 0]])
    assert "A+C" in vocab
    assert "D" not in vocab


def test_vocab_unknown_perturbation_names_it():
    vocab = PerturbationVocab(["A", "B"])
    with pytest.raises(KeyError, match="'Z'"):
        vocab.encode(["A+Z"])


def test_pair_controls_respects_context():
    ctx = np.array(["a"] * 6 + ["b"] * 6)
    is_ctrl = np.array([True, True, False, False, False, False] * 2)
    idx = pair_controls(ctx, is_ctrl, n_pairs=5, seed=1)
    assert idx.shape == (12, 5)
    assert np.all(ctx[idx] == ctx[:, None])
    assert np.all(is_ctrl[idx])
    np.testing.assert_array_equal(idx, pair_controls(ctx, is_ctrl, n_pairs=5, seed=1))


def test_pair_controls_without_controls_raises():
    with pytest.raises(ValueError, match="no control cells"):
        pair_controls(np.array(["a", "a"]), np.array([False, False]))


def test_context_labels_joint():
    obs = pd.DataFrame({"ct": ["x", "y"], "batch": ["1", "2"]})
    assert context_labels(obs, ["ct", "batch"]).tolist() == ["x|1", "y|2"]
    assert context_labels(obs, []).tolist() == ["all", "all"]


def test_context_labels_of_categorical_columns_share_one_string_per_context():
    """Categorical columns: the labels of joining each cell's ``astype(str)`` values, one string object per context."""
    from vcell.data._registry import _joined_labels

    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {
            "ct": pd.Categorical(rng.choice(["x", "y", "z"], 200)),
            "dose": pd.Categorical(rng.choice([1.0, 2.5, np.nan], 200)),
            "batch": pd.Categorical(rng.choice([3, 4], 200), categories=[4, 3, 9]),
        }
    )
    for keys in (["ct"], ["ct", "dose"], ["batch", "dose", "ct"]):
        fast = context_labels(obs, keys)
        assert fast.dtype == object
        np.testing.assert_array_equal(fast, _joined_labels(obs, keys))
        assert len({id(v) for v in fast}) == len(set(fast))  # one object per distinct label, not one per cell
    assert context_labels(obs, ["batch", "ct"])[:1].tolist() == [f"{obs['batch'][0]}|{obs['ct'][0]}"]
    assert context_labels(obs.iloc[:0], ["ct", "dose"]).shape == (0,)


def test_setup_anndata_registers_fields_and_documented_keys_only():
    adata = _toy()
    before_obs, before_uns = set(adata.obs.columns), set(adata.uns)
    X_before = adata.X.copy()
    vcell.model.Baseline.setup_anndata(
        adata, perturbation_key="condition", control="ctrl", covariate_keys=["cell_type"]
    )
    added_obs = set(adata.obs.columns) - before_obs
    assert {"vcell_perturbation", "vcell_n_perturbations", "vcell_dose"} <= added_obs
    assert all(c.startswith(("vcell_", "_scvi_")) for c in added_obs)
    assert all(k.startswith(("vcell_", "_scvi_")) for k in set(adata.uns) - before_uns)
    assert (adata.X != X_before).nnz == 0
    assert adata.obs["condition"].tolist()[:1] == ["ctrl"]
    model = vcell.model.Baseline(adata)
    assert model.vocab.atoms == ["A", "B"]
    assert model.context_keys_ == ["cell_type"]


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"perturbation_key": "nope", "control": "ctrl"}, KeyError, "nope"),
        ({"perturbation_key": "condition", "control": "ctrl", "covariate_keys": ["tissue"]}, KeyError, "tissue"),
        ({"perturbation_key": "condition", "control": "ctrl", "layer": "counts"}, KeyError, "counts"),
        ({"perturbation_key": "condition", "control": "DMSO"}, ValueError, "DMSO"),
    ],
)
def test_setup_anndata_bad_input(kwargs, err, match):
    adata = _toy()
    with pytest.raises(err, match=match):
        vcell.model.Baseline.setup_anndata(adata, **kwargs)


@pytest.mark.parametrize("bad", [np.nan, -1.0])
def test_setup_anndata_rejects_nan_and_negative(bad):
    adata = _toy()
    X = adata.X.toarray()
    X[3, 4] = bad
    adata.X = X
    with pytest.raises(ValueError, match="NaN|negative"):
        vcell.model.Baseline.setup_anndata(adata, perturbation_key="condition", control="ctrl")


def test_registry_batches_pair_same_context():
    """CellBatches over registry fields, each cell paired with a control of its context drawn every pass."""
    adata = _toy()
    vcell.model.Baseline.setup_anndata(
        adata, perturbation_key="condition", control="ctrl", covariate_keys=["cell_type"]
    )
    model = vcell.model.Baseline(adata)
    manager = model.adata_manager
    ctx = context_labels(adata.obs, ["cell_type"])
    is_ctrl = control_mask(adata)

    def draw(rng):
        cells = np.arange(adata.n_obs)
        return Pairs(cells, pair_controls(ctx, is_ctrl, seed=int(rng.integers(2**31)))[:, 0])

    fields = {
        REGISTRY_KEYS.X_KEY: RowReader(manager.get_from_registry(REGISTRY_KEYS.X_KEY)),
        REGISTRY_KEYS.COVARIATES_KEY: np.asarray(manager.get_from_registry(REGISTRY_KEYS.COVARIATES_KEY)),
    }
    dl = CellBatches(
        fields, draw, batch_size=16, seed=3, source_fields={REGISTRY_KEYS.CONTROL_X_KEY: REGISTRY_KEYS.X_KEY}
    )
    batches = list(dl)
    assert len(batches) == len(dl) == int(np.ceil(adata.n_obs / 16))
    b = batches[0]
    assert b[REGISTRY_KEYS.X_KEY].shape == b[REGISTRY_KEYS.CONTROL_X_KEY].shape == (16, 30)
    # every paired control row equals some control cell of the same cell type
    X = adata.X.toarray()
    types = np.asarray(manager.get_from_registry(REGISTRY_KEYS.COVARIATES_KEY))[:, 0]
    for batch in batches:
        cov = batch[REGISTRY_KEYS.COVARIATES_KEY].numpy().ravel()
        for row, code in zip(batch[REGISTRY_KEYS.CONTROL_X_KEY].numpy(), cov, strict=True):
            matches = np.flatnonzero(is_ctrl & np.all(X == row, axis=1))
            assert matches.size >= 1
            assert code in types[matches]
    n_seen = sum(len(b[REGISTRY_KEYS.X_KEY]) for b in batches)
    assert n_seen == adata.n_obs
