"""Conditional denoising diffusion on low-dimensional residuals (pure torch): cosine schedule, v-prediction, DDIM.

The data ``x0`` are residual coordinates (``d`` numbers per cell, standardised); the condition is a vector per cell
(``c`` numbers). Training: ``t ~ U(0, 1)``, ``x_t = sqrt(a(t)) x0 + sqrt(1 - a(t)) eps`` with the cosine schedule
``a(t) = cos^2(pi/2 (t + s) / (1 + s)) / cos^2(pi/2 s / (1 + s))`` (Nichol & Dhariwal 2021), and the network predicts
``v = sqrt(a) eps - sqrt(1 - a) x0`` (Salimans & Ho 2022; stable at both ends of the schedule). Classifier-free
guidance: the condition is dropped (replaced by zeros and a flag) with probability ``p_uncond``. Sampling: DDIM
(Song et al. 2021) over any number of steps, ``eta = 0`` deterministic given the starting noise.

The module knows nothing of modalities: for an RNA + protein :class:`vcell.model.ResidualDiffusion` the coordinates
are those of the joint residual ``[genes, w * proteins]`` (or of the CausalVAE's joint latent state).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._base import VCellModule

#: batch keys of this module
RESIDUAL_KEY = "residual"
CONDITION_KEY = "condition"
#: clamp of the cumulative signal level ``a(t)``
_A_MIN, _A_MAX = 1e-5, 1.0 - 1e-5


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Cumulative signal level ``a(t)`` of the cosine schedule for ``t`` in ``[0, 1]`` (1 at ``t = 0``, 0 at 1)."""
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return (f / f0).clamp(_A_MIN, _A_MAX)


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of times ``t`` (shape ``(n,)``, in ``[0, 1]``) into ``dim`` features."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=t.dtype) / max(half - 1, 1))
    angles = 1000.0 * t[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class _Block(nn.Module):
    """Pre-norm residual MLP block whose hidden units are shifted by the (time, condition) embedding."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        u = nn.functional.silu(self.fc1(self.norm(h)) + emb)
        return h + self.fc2(self.drop(u))


class ResidualDiffusionModule(VCellModule):
    """Denoiser ``v(x_t, t | condition)`` and its diffusion loss and sampler.

    Parameters
    ----------
    n_dims
        Dimension ``d`` of the residual coordinates.
    n_condition
        Dimension ``c`` of the condition vector (0: unconditional).
    n_hidden
        Width of the residual MLP.
    n_layers
        Residual blocks.
    dropout
        Dropout inside the blocks.
    p_uncond
        Probability of dropping the condition in training (classifier-free guidance; 0 disables it).
    time_dim
        Features of the sinusoidal time embedding.
    """

    def __init__(
        self,
        n_dims: int,
        n_condition: int,
        *,
        n_hidden: int = 256,
        n_layers: int = 3,
        dropout: float = 0.0,
        p_uncond: float = 0.1,
        time_dim: int = 64,
    ) -> None:
        super().__init__()
        self.n_dims, self.n_condition, self.p_uncond = int(n_dims), int(n_condition), float(p_uncond)
        self.time_dim = int(time_dim)
        self.inp = nn.Linear(self.n_dims, n_hidden)
        # condition, plus one "dropped" flag for classifier-free guidance
        self.emb = nn.Sequential(
            nn.Linear(self.time_dim + self.n_condition + 1, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_hidden)
        )
        self.blocks = nn.ModuleList([_Block(n_hidden, dropout) for _ in range(int(n_layers))])
        self.out_norm = nn.LayerNorm(n_hidden)
        self.out = nn.Linear(n_hidden, self.n_dims)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def reset_parameters(self) -> None:
        """Re-draw every weight (from torch's global generator), the output layer at zero."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """Predicted ``v`` at noisy coordinates ``x`` and times ``t``; ``dropped`` (0/1 per cell) masks ``cond``."""
        cond = cond * (1.0 - dropped[:, None])
        e = self.emb(torch.cat([time_embedding(t, self.time_dim), cond, dropped[:, None]], dim=1))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, e)
        return self.out(nn.functional.silu(self.out_norm(h)))

    def _noise(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, eps, drop)`` of a batch: random in training, fixed (seed 0) in eval mode so validation is comparable."""
        n = x0.shape[0]
        gen = None
        if not self.training:
            gen = torch.Generator(device=x0.device).manual_seed(0)
        t = torch.rand(n, device=x0.device, generator=gen)
        eps = torch.randn(x0.shape, device=x0.device, generator=gen, dtype=x0.dtype)
        u = torch.rand(n, device=x0.device, generator=gen)
        drop = (u < self.p_uncond).to(x0.dtype) if self.training else torch.zeros(n, device=x0.device)
        return t, eps, drop

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Noise a batch of residual coordinates and predict ``v``."""
        x0 = batch[RESIDUAL_KEY]
        cond = batch.get(CONDITION_KEY, x0.new_zeros((x0.shape[0], 0)))
        t, eps, drop = self._noise(x0)
        a = cosine_alpha_bar(t)[:, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = a.sqrt() * eps - (1 - a).sqrt() * x0
        return {"v": self.velocity(x_t, t, cond, drop), "target": target}

    def loss(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean squared error of ``v`` (per coordinate)."""
        mse = ((out["v"] - out["target"]) ** 2).mean()
        return {"loss": mse, "v_mse": mse.detach()}

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        *,
        n_steps: int = 50,
        eta: float = 0.0,
        guidance_scale: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw one residual per row of ``cond`` with a DDIM sampler of ``n_steps`` steps.

        Parameters
        ----------
        cond
            Conditions ``(n, c)``.
        n_steps
            Denoising steps (from ``t = 1`` to ``0`` on an even grid).
        eta
            DDIM stochasticity: 0 deterministic given the starting noise, 1 the ancestral (DDPM-like) sampler.
        guidance_scale
            Classifier-free guidance ``w``: ``v = (1 + w) v(cond) - w v(no condition)``; 0 uses the conditional
            model only.
        generator
            Torch generator of all the noise (seeded by the caller).

        Returns
        -------
        Tensor ``(n, d)`` of residual coordinates.
        """
        n = cond.shape[0]
        dev = cond.device
        x = torch.randn((n, self.n_dims), device=dev, generator=generator, dtype=cond.dtype)
        times = torch.linspace(1.0, 0.0, int(n_steps) + 1, device=dev, dtype=cond.dtype)
        keep, drop = torch.zeros(n, device=dev, dtype=cond.dtype), torch.ones(n, device=dev, dtype=cond.dtype)
        for i in range(int(n_steps)):
            t, t_next = times[i], times[i + 1]
            a, a_next = cosine_alpha_bar(t), cosine_alpha_bar(t_next)
            tt = t.expand(n)
            v = self.velocity(x, tt, cond, keep)
            if guidance_scale:
                v = (1.0 + guidance_scale) * v - guidance_scale * self.velocity(x, tt, cond, drop)
            x0 = a.sqrt() * x - (1 - a).sqrt() * v
            eps = (1 - a).sqrt() * x + a.sqrt() * v
            if i == int(n_steps) - 1:
                x = x0
                break
            sigma = eta * ((1 - a_next) / (1 - a)).sqrt() * (1 - a / a_next).clamp_min(0).sqrt()
            x = a_next.sqrt() * x0 + (1 - a_next - sigma**2).clamp_min(0).sqrt() * eps
            if eta:
                x = x + sigma * torch.randn(x.shape, device=dev, generator=generator, dtype=x.dtype)
        return x
