"""Progress bars show short metric names; training emits no Lightning deprecation warning."""

from __future__ import annotations

import warnings

import lightning
import pytest

import vcell
from vcell.train._progress import MAX_SHOWN_NAME, shown_metrics, shown_name


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("val_counterfactual_mse", "val_cf_mse"),
        ("train_loss", "train_loss"),
        ("val_loss", "val_loss"),
        ("train_adversary_accuracy", "train_a_acc"),
        ("train_effective_rank", "train_e_rank"),
    ],
)
def test_shown_name(key, shown):
    assert shown_name(key) == shown
    assert len(shown_name(key)) <= MAX_SHOWN_NAME


def test_shown_metrics_keep_every_value_under_distinct_short_names():
    metrics = {"val_some_long_metric_name_a": 1.0, "val_some_long_metric_name_b": 2.0, "train_loss": 3.0}
    shown = shown_metrics(metrics)
    assert sorted(shown.values()) == [1.0, 2.0, 3.0]
    assert all(len(k) <= MAX_SHOWN_NAME for k in shown)


class _Spy(lightning.pytorch.callbacks.Callback):
    """Records what the progress bar shows and what Lightning logged, at the end of each epoch."""

    def __init__(self) -> None:
        self.shown: list[dict] = []
        self.logged: list[set] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.shown.append(trainer.progress_bar_callback.get_metrics(trainer, pl_module))
        self.logged.append(set(trainer.callback_metrics))


def test_training_bar_names_short_logged_keys_unchanged_and_no_lightning_deprecation():
    adata = vcell.datasets.simulate(n_cells=200, n_genes=20, n_perturbations=2, n_combos=0, seed=0)
    vcell.model.CausalVAE.setup_anndata(adata, perturbation_key="perturbation", control="control")
    model = vcell.model.CausalVAE(adata, n_latent=4, n_hidden=16)
    spy = _Spy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train(
            max_epochs=2,
            seed=0,
            accelerator="cpu",
            trainer_kwargs={"enable_progress_bar": True, "callbacks": [spy]},
        )
    deprecations = [
        w
        for w in caught
        if issubclass(w.category, DeprecationWarning | FutureWarning)
        and ("lightning" in w.filename or "lightning" in str(w.message).lower() or "LeafSpec" in str(w.message))
    ]
    assert not deprecations, [f"{w.filename}: {w.message}" for w in deprecations]
    assert len(spy.shown) == 2
    shown = spy.shown[-1]
    assert all(len(k) <= MAX_SHOWN_NAME for k in shown), list(shown)
    assert "val_cf_mse" in shown
    # the logged keys are unchanged: early stopping, history and users' callbacks read them
    assert {"val_counterfactual_mse", "val_loss", "train_loss"} <= spy.logged[-1]
    assert "val_counterfactual_mse" in model.history_
