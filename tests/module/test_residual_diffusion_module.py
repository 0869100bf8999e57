"""ResidualDiffusionModule: schedule, v-parameterisation, seeded DDIM sampling, and a planted bimodal residual."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vcell.module import ResidualDiffusionModule
from vcell.module._residual_diffusion import CONDITION_KEY, RESIDUAL_KEY, cosine_alpha_bar


def test_cosine_schedule_goes_from_signal_to_noise():
    a = cosine_alpha_bar(torch.linspace(0, 1, 101))
    assert a[0] > 0.9999
    assert a[-1] < 1e-4
    assert torch.all(a[1:] < a[:-1])
    # the cosine schedule's midpoint: cos^2(pi/4 * (0.5 + s) / (0.5 ... )) is about one half
    assert abs(float(cosine_alpha_bar(torch.tensor(0.5))) - 0.5) < 0.02


def test_v_target_recovers_clean_data():
    torch.manual_seed(0)
    m = ResidualDiffusionModule(3, 0, n_hidden=16, n_layers=1)
    m.eval()  # fixed noise in eval mode
    x0 = torch.randn(64, 3)
    out = m({RESIDUAL_KEY: x0})
    out2 = m({RESIDUAL_KEY: x0})
    assert torch.equal(out["target"], out2["target"])  # validation noise is fixed
    # rebuild x_t and check x0 = sqrt(a) x_t - sqrt(1 - a) v with the true v
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = cosine_alpha_bar(t)[:, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(out["target"], a.sqrt() * eps - (1 - a).sqrt() * x0)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * out["target"], x0, atol=1e-5, rtol=1e-5)


def _fit(m: ResidualDiffusionModule, x: torch.Tensor, cond: torch.Tensor, steps: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    m.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (256,))
        out = m({RESIDUAL_KEY: x[idx], CONDITION_KEY: cond[idx]})
        loss = m.loss({}, out)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()


@pytest.fixture(scope="module")
def planted():
    """Condition 1: bimodal first coordinate (30% at +2, 70% at -1); condition 0: unimodal at 0. sd 0.3.

    Small on purpose (1000 cells, one block of 32 units, 300 steps, under a second on one core): it passes
    the unchanged thresholds below with three other data and torch seeds too (was 3000 cells, 64 x 2, 1500 steps).
    """
    gen = torch.Generator().manual_seed(1)
    n = 1000
    cond = (torch.rand(n, generator=gen) < 0.5).float()[:, None]
    high = torch.rand(n, generator=gen) < 0.3
    x = 0.3 * torch.randn(n, 3, generator=gen)
    x[:, 0] += cond[:, 0] * torch.where(high, 2.0, -1.0)
    torch.manual_seed(0)
    m = ResidualDiffusionModule(3, 1, n_hidden=32, n_layers=1, p_uncond=0.1)
    _fit(m, x, cond, steps=300)
    return m


def test_learns_planted_bimodal_residual(planted):
    s = planted.sample(torch.ones(4000, 1), n_steps=50, generator=torch.Generator().manual_seed(0)).numpy()
    v = s[:, 0]
    high = v > 0.5
    assert abs(high.mean() - 0.3) < 0.06  # mode weights
    assert abs(v[high].mean() - 2.0) < 0.3  # both modes where they were planted
    assert abs(v[~high].mean() + 1.0) < 0.3
    assert np.mean(np.abs(v - 0.5) < 0.4) < 0.08  # little mass between the modes
    assert 0.15 < s[:, 1].std() < 0.45
    # the other condition stays unimodal at 0
    s0 = planted.sample(torch.zeros(2000, 1), n_steps=50, generator=torch.Generator().manual_seed(0)).numpy()
    assert abs(s0[:, 0].mean()) < 0.2
    assert s0[:, 0].std() < 0.5


def test_sampling_is_seeded_and_step_count_is_an_argument(planted):
    c = torch.ones(50, 1)
    a = planted.sample(c, n_steps=10, generator=torch.Generator().manual_seed(3))
    b = planted.sample(c, n_steps=10, generator=torch.Generator().manual_seed(3))
    d = planted.sample(c, n_steps=10, generator=torch.Generator().manual_seed(4))
    assert a.shape == (50, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, d)
    e1 = planted.sample(c, n_steps=10, eta=1.0, generator=torch.Generator().manual_seed(3))
    e2 = planted.sample(c, n_steps=10, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(e1, e2)
    assert not torch.equal(e1, a)  # eta > 0 adds noise along the way
    one = planted.sample(c, n_steps=1, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(one).all()


def test_guidance_changes_samples(planted):
    c = torch.ones(500, 1)
    plain = planted.sample(c, n_steps=20, generator=torch.Generator().manual_seed(0))
    guided = planted.sample(c, n_steps=20, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(guided).all()
    assert not torch.allclose(plain, guided)
