from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import special, stats

from vcell.module import _causal_vae, _likelihoods
from vcell.module._likelihoods import digamma, log_nb, nb_log_prob_rows


def _counts(n: int = 6, g: int = 9, dtype: torch.dtype = torch.float64, *, kind: str = "large") -> torch.Tensor:
    """Counts for the NB's paths: ``large`` (dense, many counts >= 10, where digamma takes its asymptotic series),
    ``small`` (dense, small counts: the recurrence matters) or ``sparse`` (~88% zeros: gamma functions at the nonzero
    counts only)."""
    gen = torch.Generator().manual_seed(0)
    scale = 3.0 if kind == "small" else 30.0
    x = torch.poisson(torch.rand(n, g, generator=gen, dtype=dtype) * scale, generator=gen)
    x[0, :2] = 0.0
    x[1, 0] = 2500.0 if kind != "small" else 40.0
    if kind == "sparse":
        x[torch.rand(n, g, generator=gen) < 0.88] = 0.0
        x[1, 0] = 2500.0
    nb = _likelihoods._NBRows
    assert (float((x > 0).float().mean()) < nb.SPARSE_BELOW) == (kind == "sparse")
    return x


KINDS = ["large", "small", "sparse"]


def test_old_import_path_still_works():
    assert _causal_vae.log_nb is _likelihoods.log_nb
    assert _causal_vae.log_zinb is _likelihoods.log_zinb
    assert _causal_vae.log_normal is _likelihoods.log_normal


def test_digamma_matches_scipy():
    y = np.concatenate([np.logspace(-6, 7, 400), np.arange(1, 60) + 0.25, [1.0, 2.0, 3.0, 4.0]])
    ours = digamma(torch.as_tensor(y, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ours, special.digamma(y), rtol=1e-9, atol=1e-9)
    # float32: as close to the truth as torch's own digamma
    ours32 = digamma(torch.as_tensor(y, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(ours32, special.digamma(y), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_nb_rows_value_is_sum_of_scipy_logpmf_without_factorial(kind: str):
    x = _counts(kind=kind)
    log_mu = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 2.0
    log_theta = torch.linspace(-3.0, 4.0, x.shape[1], dtype=torch.float64)
    mu, theta = log_mu.exp().numpy(), log_theta.exp().numpy()
    expected = stats.nbinom.logpmf(x.numpy(), n=theta, p=theta / (theta + mu)) + special.gammaln(x.numpy() + 1.0)
    got = nb_log_prob_rows(x, log_mu, log_theta, eps=0.0)
    np.testing.assert_allclose(got.numpy(), expected.sum(1), rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_nb_rows_gradients_are_exact(kind: str):
    x = _counts(4, 5, kind=kind)
    log_mu = (torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 1.0).requires_grad_()
    log_theta = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nb_log_prob_rows(x, a, b, eps=0.0), (log_mu, log_theta))


@pytest.mark.parametrize("kind", KINDS)
def test_nb_rows_float32_is_as_accurate_as_autograd_log_nb(kind: str):
    """Training path vs the elementwise autograd version in float32, both against float64: loss and gradients."""
    x = _counts(64, 300, torch.float32, kind=kind)
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(64, 300, generator=gen)
    log_theta = torch.randn(300, generator=gen) * 2.0  # theta from 0.01 to ~1000 (cancellation-prone)
    weights = torch.rand(64, generator=gen)

    def run(fast: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        hh, lt = h.to(dtype).requires_grad_(), log_theta.to(dtype).requires_grad_()
        xx = x.to(dtype)
        log_mu = torch.log(xx.sum(1, keepdim=True).clamp(min=1.0)) + torch.log_softmax(hh, -1)
        if fast:
            ll = nb_log_prob_rows(xx, log_mu, lt)
        else:
            ll = log_nb(xx, log_mu.exp(), lt.exp(), log_mu=log_mu, factorial=False).sum(1)
        return [t.double() for t in (ll.detach(), *torch.autograd.grad((ll * weights.to(dtype)).sum(), (hh, lt)))]

    truth = run(False, torch.float64)
    for fast, old, ref in zip(run(True, torch.float32), run(False, torch.float32), truth, strict=True):
        err_fast, err_old = float((fast - ref).abs().max()), float((old - ref).abs().max())
        scale = float(ref.abs().max())
        assert err_fast <= max(2 * err_old, 1e-6 * scale), (err_fast, err_old)
        assert err_fast <= 1e-3 * scale


def test_nb_rows_frozen_dispersion_and_fallback_shapes():
    x = _counts(3, 4)
    log_mu = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    log_theta = torch.zeros(4, dtype=torch.float64)  # frozen: no gradient asked for
    nb_log_prob_rows(x, log_mu, log_theta).sum().backward()
    assert log_mu.grad is not None
    assert log_theta.grad is None
    # any other shape goes through the elementwise version
    x3, mu3 = x[None].expand(2, 3, 4), log_mu.detach()[None].expand(2, 3, 4)
    out = nb_log_prob_rows(x3, mu3, log_theta)
    np.testing.assert_allclose(out[1].numpy(), nb_log_prob_rows(x, log_mu.detach(), log_theta).numpy(), rtol=1e-12)
