from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from vcell.train import TrainingPlan
from vcell.train._plan import _adamw_impl


class _Toy(nn.Module):
    """``loss = mean((w x - y)^2)`` with two extra named terms; a constant ``w`` (lr 0) keeps the values known."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([2.0]))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.w * batch["x"]

    def loss(self, batch: dict[str, torch.Tensor], out: torch.Tensor) -> dict[str, torch.Tensor]:
        err = out - batch["y"]
        return {"loss": (err**2).mean(), "abs": err.abs().mean(), "n_pos": (err > 0).float().mean()}


class _Loader:
    """A sized iterable of fixed batches (Lightning reads a bare list as several dataloaders)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _batches(sizes: list[int], seed: int) -> _Loader:
    g = torch.Generator().manual_seed(seed)
    return _Loader([{"x": torch.randn(n, generator=g), "y": torch.randn(n, generator=g)} for n in sizes])


def _fit(train: _Loader, val: _Loader, **trainer_kwargs) -> TrainingPlan:
    import lightning

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    plan = TrainingPlan(_Toy(), lr=0.0, weight_decay=0.0)
    kwargs = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}
    kwargs |= {"enable_progress_bar": False, "num_sanity_val_steps": 0, "accelerator": "cpu", "devices": 1}
    trainer = lightning.Trainer(**kwargs, **trainer_kwargs)
    trainer.fit(plan, train_dataloaders=train, val_dataloaders=val)
    return plan


def test_epoch_means_are_batch_size_weighted_and_val_only_when_validated():
    train, val = _batches([5, 3, 8], seed=0), _batches([4, 6], seed=1)
    plan = _fit(train, val, max_epochs=4, check_val_every_n_epoch=2)

    def means(loader: _Loader) -> dict[str, float]:
        err = torch.cat([2.0 * b["x"] - b["y"] for b in loader.batches])
        return {
            "loss": float((err**2).mean()),
            "abs": float(err.abs().mean()),
            "n_pos": float((err > 0).float().mean()),
        }

    assert [h["epoch"] for h in plan.history] == [0, 1, 2, 3]
    for row in plan.history:
        for key, value in means(train).items():
            np.testing.assert_allclose(row[f"train_{key}"], value, rtol=1e-6)
        validated = row["epoch"] in (1, 3)  # every 2nd epoch
        assert ("val_loss" in row) == validated
        if validated:
            for key, value in means(val).items():
                np.testing.assert_allclose(row[f"val_{key}"], value, rtol=1e-6)


def test_adamw_is_fused_for_float_parameters_else_foreach():
    assert _adamw_impl(nn.Linear(3, 2)) == {"fused": True}
    odd = nn.Module()
    odd.p = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    assert _adamw_impl(odd) == {"foreach": True}
    assert _adamw_impl(nn.Module()) == {"foreach": True}
