from __future__ import annotations

import numpy as np
import pytest
import torch

import vcell
from vcell.model import CausalVAE

QUIET = {"enable_progress_bar": False}
SIZES = {"n_latent": 4, "n_hidden": 16}


_AdaptableCausalVAE = CausalVAE  # adapt() comes from AdaptMixin


@pytest.fixture(scope="module")
def sim():
    """Three cell types and three perturbations; the base model never sees type2 nor the perturbation G_new."""
    adata = vcell.datasets.simulate(n_cells=360, n_genes=24, n_perturbations=3, n_combos=0, cell_types=3, seed=1)
    perts = sorted(set(adata.obs["perturbation"].astype(str)) - {"control"})
    return adata, perts


@pytest.fixture(scope="module")
def base(sim):
    adata, perts = sim
    keep = (adata.obs["cell_type"] != "type2").to_numpy() & (adata.obs["perturbation"] != perts[2]).to_numpy()
    old = adata[keep].copy()
    _AdaptableCausalVAE.setup_anndata(
        old, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
    )
    model = _AdaptableCausalVAE(old, **SIZES)
    model.train(max_epochs=3, seed=0, accelerator="cpu", trainer_kwargs=QUIET)
    return model


def _new(sim, *, with_new_perturbation: bool = False):
    adata, perts = sim
    keep = (adata.obs["cell_type"] == "type2").to_numpy(copy=True)
    if not with_new_perturbation:
        keep &= (adata.obs["perturbation"] != perts[2]).to_numpy()
    return adata[keep].copy()


def _adapt(model, new, **kw):
    args = {"rank": 2, "max_epochs": 3, "seed": 0, "accelerator": "cpu", "trainer_kwargs": QUIET}
    return model.adapt(new, **{**args, **kw})


def test_adapted_model_starts_identical_and_base_is_unchanged(base, sim):
    """Before training (max_epochs=0) the adapted model predicts exactly as the base for everything the base knows."""
    state = {k: v.clone() for k, v in base.module.state_dict().items()}
    pert = base.vocab.atoms[0]
    before = base.predict(perturbation=pert)
    adapted = _adapt(base, _new(sim), max_epochs=0)
    assert adapted is not base
    assert type(adapted) is _AdaptableCausalVAE
    np.testing.assert_array_equal(adapted.predict(base.adata, perturbation=pert), before)
    trained = _adapt(base, _new(sim))
    assert not np.array_equal(trained.predict(base.adata, perturbation=pert), before)
    # the base model is untouched
    assert all(torch.equal(state[k], v) for k, v in base.module.state_dict().items())
    np.testing.assert_array_equal(base.predict(perturbation=pert), before)


def test_only_adapters_and_new_rows_change(base, sim):
    new = _new(sim, with_new_perturbation=True)
    adapted = _adapt(base, new, max_epochs=5)
    s = adapted.adapt_summary_
    assert s["new_categories"] == {"cell_type": ["type2"]}
    assert s["new_perturbations"] == [sim[1][2]]
    assert s["lora_layers"] == ["encoder.0", "encoder.4", "decoder.0", "decoder.4"]
    old, now = base.module.state_dict(), adapted.module.state_dict()
    assert set(old) == set(now)
    n_genes, n_lat, n_hid = new.n_vars, SIZES["n_latent"], SIZES["n_hidden"]
    # hand count: adapters r (in + out) per layer; new rows: cell-type embedding + its adversary output (weight, bias),
    # the new operator + EC50 + slope, and the perturbation adversary's output for the new condition
    lora = 2 * ((n_genes + n_lat + n_hid) + (n_hid + 2 * n_lat) + (n_lat + n_hid) + (n_hid + n_genes))
    rows = (n_lat + n_hid // 2 + 1) + (n_lat + 1 + 1) + (n_hid // 2 + 1)
    assert s["n_trainable"] == lora + rows
    assert s["n_total"] == sum(v.numel() for v in adapted.module.parameters())
    assert s["trainable_fraction"] < 0.5

    atom_old = [base.atoms_.index(a) for a in base.atoms_]
    atom_new = [adapted.atoms_.index(a) for a in base.atoms_]
    fresh_atom = adapted.atoms_.index(sim[1][2])
    for key, value in old.items():
        mine = now[key]
        if key in {"encoder.0.weight", "encoder.4.weight", "decoder.0.weight", "decoder.4.weight"}:
            sv = torch.linalg.svdvals((mine - value).double())  # rank 2 up to float32 round-off of W + BA
            assert sv[0] > 0, key
            assert sv[2] < 1e-3 * sv[0], key
        elif key.startswith(("perturbation.operators.", "perturbation.dose.")):  # rows of atoms
            assert torch.equal(mine[atom_new], value[atom_old]), key
        elif key == "covariates.0.weight":
            assert torch.equal(mine[:2], value)
            assert mine.shape[0] == 3
            assert not torch.equal(mine[2], value.mean(0))  # the new row trained away from its start
        elif key.startswith("adversaries.") and mine.shape != value.shape:
            assert torch.equal(mine[: value.shape[0]], value), key  # old classes' outputs unchanged
        else:
            assert torch.equal(mine, value), key  # biases, LayerNorms, dispersion, adversaries' hidden layers
    assert not torch.equal(now["perturbation.operators.weight"][fresh_atom], torch.zeros(n_lat))
    # the adapted model predicts the new perturbation in the new cell type, and still knows the old ones
    pred = adapted.predict(perturbation=sim[1][2])
    assert pred.shape == (int((new.obs["perturbation"] == "control").sum()), new.n_vars)
    assert np.isfinite(pred).all()
    assert adapted.predict(perturbation=sim[1][0]).shape == pred.shape


def test_rank_zero_trains_new_rows_only(base, sim):
    adapted = _adapt(base, _new(sim), rank=0)
    s = adapted.adapt_summary_
    assert s["lora_layers"] == []
    assert s["n_trainable"] == SIZES["n_latent"] + SIZES["n_hidden"] // 2 + 1
    old, now = base.module.state_dict(), adapted.module.state_dict()
    assert torch.equal(now["decoder.0.weight"], old["decoder.0.weight"])


def test_mismatched_genes_give_clear_errors(base, sim):
    new = _new(sim)
    with pytest.raises(ValueError, match=r"lacks 2 of the 24 genes.*'G0000', 'G0001'"):
        base.adapt(new[:, 2:].copy())
    extra = new.copy()
    extra.var_names = [*new.var_names[:-1], "NOTAGENE"]
    with pytest.raises(ValueError, match="lacks 1 of the 24 genes"):
        base.adapt(extra)
    with pytest.raises(ValueError, match=r"rank must be"):
        base.adapt(new, rank=-1)


def test_reordered_genes_equal_ordered(base, sim):
    new = _new(sim)
    a = _adapt(base, new.copy())
    b = _adapt(base, new[:, new.var_names[::-1]].copy())
    assert list(b.adata.var_names) == list(base.var_names_)
    pert = base.vocab.atoms[0]
    np.testing.assert_array_equal(a.predict(perturbation=pert), b.predict(perturbation=pert))


def test_seed_reproducibility(base, sim):
    pert = base.vocab.atoms[1]
    a = _adapt(base, _new(sim), seed=3).predict(perturbation=pert)
    b = _adapt(base, _new(sim), seed=3).predict(perturbation=pert)
    c = _adapt(base, _new(sim), seed=4).predict(perturbation=pert)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_save_load_round_trip(base, sim, tmp_path):
    new = _new(sim, with_new_perturbation=True)
    adapted = _adapt(base, new)
    pert = sim[1][2]
    pred = adapted.predict(perturbation=pert)
    adapted.save(tmp_path / "adapted", overwrite=True)
    loaded = _AdaptableCausalVAE.load(tmp_path / "adapted", adata=new, accelerator="cpu")
    np.testing.assert_array_equal(loaded.predict(perturbation=pert), pred)
    assert loaded.adapt_summary_ == adapted.adapt_summary_
    assert loaded.atoms_ == adapted.atoms_
    # loaded without data: predicts for data passed in
    with pytest.warns(UserWarning, match="no saved anndata"):
        bare = _AdaptableCausalVAE.load(tmp_path / "adapted", accelerator="cpu")
    np.testing.assert_array_equal(bare.predict(new, perturbation=pert), pred)


def test_untrained_model_refuses():
    adata = vcell.datasets.simulate(n_cells=120, n_genes=12, n_perturbations=2, n_combos=0, seed=0)
    _AdaptableCausalVAE.setup_anndata(adata, perturbation_key="perturbation", control="control")
    model = _AdaptableCausalVAE(adata, **SIZES)
    with pytest.raises(RuntimeError, match="not trained"):
        model.adapt(adata.copy())


def test_counterfactual_error_matches_module_counterfactual():
    """The training term equals the squared error of the module's own (no-grad) counterfactual means."""
    from vcell._constants import REGISTRY_KEYS
    from vcell.model._adapt import counterfactual_error
    from vcell.module import CausalVAEModule
    from vcell.module._causal_vae import TARGET_ENCODING_KEY

    torch.manual_seed(0)
    m = CausalVAEModule(10, 2, n_conditions=3, covariate_sizes=(2,), n_latent=3, n_hidden=8).eval()
    x = torch.as_tensor(np.random.default_rng(0).poisson(3.0, (7, 10)), dtype=torch.float32)
    codes = torch.tensor([0, 0, 0, 1, 1, 0, 2])  # 0 = control; context 1 has a control and a code-2 cell
    enc = torch.tensor([[0, 0], [0, 0], [0, 0], [1, 0], [1, 0], [0, 0], [0, 1]], dtype=torch.float32)
    cov = torch.tensor([[0], [0], [0], [0], [0], [1], [1]])
    batch = {
        REGISTRY_KEYS.X_KEY: x,
        REGISTRY_KEYS.PERT_KEY: codes,
        REGISTRY_KEYS.PERT_ENCODING_KEY: enc,
        REGISTRY_KEYS.COVARIATES_KEY: cov,
    }
    got = counterfactual_error(m, batch, m(batch), control_code=0, mode="residual")
    x_log = torch.log1p(x * 1e4 / x.sum(1, keepdim=True))
    expected = []
    for ctrl, members, target in (([0, 1, 2], [3, 4], [1.0, 0.0]), ([5], [6], [0.0, 1.0])):
        sub = {k: v[ctrl] for k, v in batch.items()}
        sub[TARGET_ENCODING_KEY] = torch.tensor([target] * len(ctrl))
        pred = m.counterfactual(sub, mode="residual").mean(0)
        expected.append(((pred - x_log[members].mean(0)) ** 2).sum())
    torch.testing.assert_close(got, torch.stack(expected).mean())


def test_objective_terms_and_clean_module(base, sim):
    with_cf = _adapt(base, _new(sim))
    assert "train_counterfactual_error" in with_cf.history_
    assert "loss" not in with_cf.module.__dict__  # the instance-level objective is removed after training
    without = _adapt(base, _new(sim), counterfactual_weight=0.0)
    assert "train_counterfactual_error" not in without.history_
