from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from vcell._constants import REGISTRY_KEYS
from vcell.module import CausalVAEModule
from vcell.module._causal_vae import TARGET_ENCODING_KEY, grad_reverse, log_nb, log_normal, log_zinb


def test_log_nb_matches_scipy():
    x = torch.tensor([0.0, 1.0, 3.0, 10.0, 57.0], dtype=torch.float64)
    mu = torch.tensor([0.5, 2.0, 3.0, 8.0, 40.0], dtype=torch.float64)
    theta = torch.tensor([0.3, 1.0, 5.0, 2.0, 100.0], dtype=torch.float64)
    expected = stats.nbinom.logpmf(x.numpy(), n=theta.numpy(), p=(theta / (theta + mu)).numpy())
    np.testing.assert_allclose(log_nb(x, mu, theta, eps=0.0).numpy(), expected, rtol=1e-10)


def test_log_zinb_by_hand():
    x = torch.tensor([0.0, 0.0, 4.0], dtype=torch.float64)
    mu = torch.tensor([2.0, 0.1, 3.0], dtype=torch.float64)
    theta = torch.tensor([1.5, 3.0, 0.7], dtype=torch.float64)
    logits = torch.tensor([0.3, -2.0, 1.0], dtype=torch.float64)
    pi = 1 / (1 + np.exp(-logits.numpy()))
    nb = stats.nbinom.pmf(x.numpy(), n=theta.numpy(), p=(theta / (theta + mu)).numpy())
    expected = np.where(x.numpy() == 0, np.log(pi + (1 - pi) * nb), np.log((1 - pi) * nb))
    np.testing.assert_allclose(log_zinb(x, mu, theta, logits, eps=0.0).numpy(), expected, rtol=1e-10)


def test_log_normal_matches_scipy():
    x, mean, log_var = torch.tensor([0.0, 1.5, -2.0]), torch.tensor([0.5, 1.0, 0.0]), torch.tensor([0.0, -1.0, 2.0])
    expected = stats.norm.logpdf(x.numpy(), loc=mean.numpy(), scale=np.exp(0.5 * log_var.numpy()))
    np.testing.assert_allclose(log_normal(x, mean, log_var).numpy(), expected, rtol=1e-5)


def test_grad_reverse_flips_and_scales_gradient():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    (grad_reverse(x, 0.5) * torch.tensor([3.0, 4.0])).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [-1.5, -2.0])


def _module(likelihood: str = "nb", **kw) -> CausalVAEModule:
    torch.manual_seed(0)
    defaults = {"n_conditions": 4, "covariate_sizes": (2, 3), "n_latent": 6, "n_hidden": 16, "dropout": 0.0}
    return CausalVAEModule(20, 3, likelihood=likelihood, counts=likelihood != "gaussian", **{**defaults, **kw})


def _batch(n: int = 7, counts: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.full((n, 20), 3.0), generator=g) if counts else torch.rand(n, 20, generator=g) * 3
    enc = torch.zeros(n, 3)
    enc[1, 0] = 1.0
    enc[2, [0, 1]] = 1.0
    return {
        REGISTRY_KEYS.X_KEY: x,
        REGISTRY_KEYS.PERT_ENCODING_KEY: enc,
        REGISTRY_KEYS.PERT_KEY: torch.tensor([0, 1, 2, 0, 3, 0, 1]),
        REGISTRY_KEYS.COVARIATES_KEY: torch.tensor([[0, 0], [1, 2], [0, 1], [1, 1], [0, 2], [1, 0], [0, 0]]),
    }


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "gaussian"])
def test_forward_loss_shapes_and_gradients(likelihood: str):
    m = _module(likelihood, pairs=np.array([[0, 1]]))
    batch = _batch(counts=likelihood != "gaussian")
    out = m(batch)
    assert out["z"].shape == (7, 6)
    assert out["z_basal"].shape == (7, 6)
    key = "mean" if likelihood == "gaussian" else "log_scale"
    assert out[key].shape == (7, 20)
    if likelihood != "gaussian":
        np.testing.assert_allclose(out["log_scale"].exp().sum(1).detach().numpy(), 1.0, rtol=1e-5)
    res = m.loss(batch, out)
    assert torch.isfinite(res.loss)
    assert {"reconstruction", "kl", "elbo", "adversary", "interaction_penalty"} <= set(res.terms)
    assert {"accuracy_perturbation", "accuracy_covariate0", "accuracy_covariate1"} <= set(res.metrics)
    res.loss.backward()
    # the operators of atoms 0 and 1 are used, the pair (0, 1) too; atom 2 never is
    assert m.perturbation.operators.weight.grad[:2].abs().sum() > 0
    assert m.perturbation.operators.weight.grad[2].abs().sum() == 0
    assert m.perturbation.interactions.gate.grad.abs().sum() > 0
    assert all(p.grad is not None for clf in m.adversaries for p in clf.parameters())


def test_reconstruction_is_sum_of_elementwise_nb():
    m = _module("nb", variational=False).eval()
    batch = _batch()
    out = m(batch)
    mu = out["lib"] * out["log_scale"].exp()
    theta = torch.exp(m.gene_param)
    expected = stats.nbinom.logpmf(
        batch[REGISTRY_KEYS.X_KEY].numpy(),
        n=theta.detach().numpy()[None, :],
        p=(theta / (theta + mu)).detach().numpy(),
    ).sum(1)
    np.testing.assert_allclose(
        m.reconstruction_log_prob(batch[REGISTRY_KEYS.X_KEY], out).detach().numpy(), expected, rtol=1e-4
    )


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_precomputed_log_factorial_gives_the_same_likelihood(likelihood: str):
    """Subtracting the per-cell sum of log(x!) once equals the elementwise lgamma(x + 1) inside the likelihood."""
    m = _module(likelihood, variational=False).eval()
    batch = _batch()
    x = batch[REGISTRY_KEYS.X_KEY]
    out = m(batch)
    per_cell = torch.lgamma(x + 1.0).sum(1)
    np.testing.assert_allclose(
        m.reconstruction_log_prob(x, out, per_cell).detach().numpy(),
        m.reconstruction_log_prob(x, out).detach().numpy(),
        rtol=1e-5,
    )


def test_dose_scale_is_log_dose_sigmoid_and_zero_when_inactive():
    m = _module()
    with torch.no_grad():
        m.perturbation.dose.log_ec50.copy_(torch.tensor([0.0, math.log(10.0), 1.0]))
        m.perturbation.dose.log_slope.copy_(torch.log(torch.tensor([1.0, 2.0, 1.0])))
    enc = torch.tensor([[1.0, 10.0, 0.0], [math.e, 100.0, 0.0]])
    s = m.dose_scale(enc).detach().numpy()
    expected = [[0.5, 0.5, 0.0], [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2 * math.log(10))), 0.0]]
    np.testing.assert_allclose(s, expected, rtol=1e-6)


def test_unseen_atoms_use_mean_dose_response_and_encodings_are_padded():
    m = _module(seen_atoms=np.array([True, True, False]))
    with torch.no_grad():
        m.perturbation.dose.log_ec50.copy_(torch.tensor([0.0, 2.0, 50.0]))
    ec50, _ = m.dose_params()
    np.testing.assert_allclose(ec50.detach().numpy(), [0.0, 2.0, 1.0])
    short = torch.tensor([[1.0, 0.0]])
    np.testing.assert_allclose(
        m.perturbation_latent(short).detach().numpy(),
        m.perturbation_latent(torch.tensor([[1.0, 0.0, 0.0]])).detach().numpy(),
    )


def test_interaction_only_acts_on_the_pair():
    m = _module(pairs=np.array([[0, 1]]))
    with torch.no_grad():
        m.perturbation.interactions.effect.fill_(1.0)
        m.perturbation.interactions.gate.fill_(10.0)
    enc = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    s = m.dose_scale(enc).detach()
    additive = (s @ m.perturbation.operators.weight.detach()).numpy()
    z = m.perturbation_latent(enc).detach().numpy()
    np.testing.assert_allclose(z[[0, 1, 3]], additive[[0, 1, 3]], atol=1e-6)
    gate = 1 / (1 + math.exp(-10.0))
    expected = additive[2] + float(s[2, 0] * s[2, 1]) * gate
    np.testing.assert_allclose(z[2], expected, rtol=1e-5)


def test_counterfactual_residual_identity_and_decoded_shape():
    m = _module("nb").eval()
    batch = _batch()
    batch[TARGET_ENCODING_KEY] = batch[REGISTRY_KEYS.PERT_ENCODING_KEY].clone()
    x_log, _ = m.log_normalise(batch[REGISTRY_KEYS.X_KEY])
    # swapping a cell's perturbation for its own changes nothing in residual mode
    np.testing.assert_allclose(m.counterfactual(batch).numpy(), x_log.numpy(), atol=1e-5)
    batch[TARGET_ENCODING_KEY] = torch.tensor([[0.0, 0.0, 1.0]]).repeat(7, 1)
    dec = m.counterfactual(batch, mode="decoded")
    assert dec.shape == (7, 20)
    assert bool((dec >= 0).all())
    params = m.generative_params(batch)
    np.testing.assert_allclose(
        params["mu"].sum(1).numpy(), batch[REGISTRY_KEYS.X_KEY].sum(1).clamp(min=1).numpy(), rtol=1e-4
    )


def test_compose_shifts_adds_the_single_changes():
    """compose='shifts': a double's change is the sum of its singles' decoded changes; singles are unaffected."""
    m = _module("nb").eval()
    with torch.no_grad():
        m.perturbation.operators.weight.mul_(20.0)  # effects large enough for the decoder's non-additivity to show
    batch = _batch()

    def cf(target: list[float], **kw) -> np.ndarray:
        batch[TARGET_ENCODING_KEY] = torch.tensor([target]).repeat(7, 1)
        return m.counterfactual(batch, mode="decoded", **kw).numpy()

    base = cf([0.0, 0.0, 0.0])
    a, b = cf([1.0, 0.0, 0.0]), cf([0.0, 1.0, 0.0])
    np.testing.assert_allclose(cf([1.0, 0.0, 0.0], compose="shifts"), a, atol=1e-6)
    shifts = cf([1.0, 1.0, 0.0], compose="shifts")
    np.testing.assert_allclose(shifts, np.clip(base + (a - base) + (b - base), 0, None), atol=1e-4)
    assert np.abs(shifts - cf([1.0, 1.0, 0.0], compose="latent")).max() > 1e-3
    with pytest.raises(ValueError, match="compose"):
        cf([1.0, 1.0, 0.0], compose="sum")


def test_embedding_table_operators_and_bad_likelihood():
    feats = np.eye(3, 5, dtype=np.float32)
    m = _module(perturbation_features=feats)
    assert not hasattr(m.perturbation.operators, "weight")  # an MLP of the table, no free rows
    assert m.operator_vectors().shape == (3, 6)
    with pytest.raises(ValueError, match="likelihood"):
        CausalVAEModule(20, 3, likelihood="poisson")


def test_reset_parameters_is_seeded():
    m1, m2 = _module(), _module()
    torch.manual_seed(3)
    m1.reset_parameters()
    torch.manual_seed(3)
    m2.reset_parameters()
    for (n1, p1), (_, p2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(p1, p2), n1


@pytest.mark.parametrize("n_layers", [0, 1, 2])
def test_split_first_layer_equals_the_concatenated_encoder(n_layers):
    """encode() splits the first layer over [x_log, z_known]: same values and gradients as the concatenation."""
    torch.manual_seed(0)
    m = CausalVAEModule(7, 2, n_latent=3, n_hidden=8, n_layers=n_layers, dropout=0.0)
    x = torch.rand(5, 7)
    z_known = torch.randn(5, 3, requires_grad=True)
    mean, logvar = m.encode(x, z_known)
    ref = m.encoder(torch.cat([x, z_known], 1))
    torch.testing.assert_close(mean, ref[:, :3])
    torch.testing.assert_close(logvar, ref[:, 3:].clamp(-10.0, 10.0))
    (mean.sum() + logvar.sum()).backward()
    grad_w, grad_z = m.encoder[0].weight.grad.clone(), z_known.grad.clone()
    m.zero_grad()
    z2 = z_known.detach().clone().requires_grad_(True)
    ref = m.encoder(torch.cat([x, z2], 1))
    (ref[:, :3].sum() + ref[:, 3:].clamp(-10.0, 10.0).sum()).backward()
    torch.testing.assert_close(m.encoder[0].weight.grad, grad_w)
    torch.testing.assert_close(z2.grad, grad_z)
    mean0, _ = m.encode(x)  # z_known = 0 (a float) still works
    torch.testing.assert_close(mean0, m.encoder(torch.cat([x, torch.zeros(5, 3)], 1))[:, :3])


@pytest.mark.parametrize("mode", ["residual", "decoded"])
@pytest.mark.parametrize("modality", ["rna", "prot"])
def test_mean_counterfactuals_equal_the_mean_of_counterfactual(mode: str, modality: str):
    """Encoding the cells once for all targets (validation's shortcut) gives counterfactual()'s means."""
    m = _module("nb", n_proteins=4, pairs=np.array([[0, 1]])).eval()
    with torch.no_grad():
        m.perturbation.operators.weight.mul_(10.0)
        m.perturbation.interactions.effect.fill_(1.0)
    batch = _batch()
    prot = torch.poisson(torch.full((7, 4), 20.0), generator=torch.Generator().manual_seed(2))
    prot[3] = float("nan")  # a cell without protein measurement: its own protein values are m(z_own)
    batch["protein"] = prot
    targets = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.5, 1.0], [0.0, 0.0, 2.0]])
    expected = []
    for target in targets:
        batch[TARGET_ENCODING_KEY] = target.repeat(7, 1)
        expected.append(m.counterfactual(batch, mode=mode, modality=modality).mean(0))
    expected = torch.stack(expected).numpy()
    del batch[TARGET_ENCODING_KEY]
    for chunk in (7, 14, 512):  # one target per decoder pass, two, all at once
        got = m.mean_counterfactuals(batch, targets, mode=mode, modality=modality, chunk=chunk)
        assert got.shape == (5, 4 if modality == "prot" else 20)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert m.mean_counterfactuals(batch, targets[:0], modality=modality).shape == (0, 4 if modality == "prot" else 20)
    with pytest.raises(ValueError, match="modality"):
        m.mean_counterfactuals(batch, targets, modality="atac")
