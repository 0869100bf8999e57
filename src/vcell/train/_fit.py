"""Run a :class:`~vcell.train.TrainingPlan` under a Lightning Trainer: early stopping, best weights, quiet banner."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from vcell._settings import settings

from ._progress import progress_bar


class BestWeights:
    """Keeps (on CPU) the module weights of the validation epoch with the lowest ``monitor``.

    A plain object with Lightning's ``on_validation_end`` hook; wrap it with :func:`as_callback`.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor, self.best, self.state, self.epoch = monitor, np.inf, None, -1

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Copy the weights when ``monitor`` improved."""
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or not float(value) < self.best:
            return
        self.best, self.epoch = float(value), int(trainer.current_epoch)
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.module.state_dict().items()}


def as_callback(obj: Any) -> Any:
    """A :class:`lightning.pytorch.callbacks.Callback` forwarding its validation hooks to ``obj`` (lazy Lightning)."""
    import lightning

    class _Forward(lightning.pytorch.callbacks.Callback):
        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if hasattr(obj, "on_validation_epoch_end"):
                obj.on_validation_epoch_end(trainer, pl_module)

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if hasattr(obj, "on_validation_end"):
                obj.on_validation_end(trainer, pl_module)

    return _Forward()


def fit(
    plan: Any,
    train_dataloader: Iterable,
    val_dataloader: Iterable | None = None,
    *,
    max_epochs: int,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str | Any = "auto",
    num_nodes: int = 1,
    early_stopping: bool = True,
    early_stopping_patience: int = 20,
    callbacks: Sequence[Any] = (),
    trainer_kwargs: dict | None = None,
) -> int:
    """Fit ``plan`` with a :class:`lightning.Trainer`; with early stopping, restore the best epoch's weights.

    Early stopping watches ``plan.monitor`` (a validation value; needs ``val_dataloader``). ``callbacks`` run before
    the best-weights keeper (so values they log count). Lightning's banner is shown only with
    ``vcell.settings.verbosity == "debug"``; the progress bar follows ``vcell.settings.progress_bar`` unless
    ``trainer_kwargs`` says otherwise, and shows short metric names (:func:`vcell.train._progress.shown_name`:
    ``val_cf_mse`` for ``val_counterfactual_mse``) unless a progress bar is among the callbacks; the logged keys
    (``trainer.callback_metrics``, ``plan.history``, early stopping) are not changed.

    Parameters
    ----------
    plan
        A :class:`~vcell.train.TrainingPlan` (any LightningModule with ``.module`` and ``.monitor``).
    train_dataloader, val_dataloader
        Iterables of batches; ``val_dataloader=None`` trains without validation.
    max_epochs
        Maximum passes over the training batches.
    accelerator, devices, strategy, num_nodes
        Passed to :class:`lightning.Trainer`. ``strategy="ddp"`` with ``devices=N`` (and ``num_nodes=M``) trains in
        ``N * M`` processes (on CPU: gloo); batches come from :class:`vcell.data.CellBatches`, which gives every
        process its own share of each epoch, and the logged epoch means are over all processes. The names ``"ddp"``,
        ``"ddp_spawn"`` and ``"ddp_notebook"`` become a :class:`~lightning.pytorch.strategies.DDPStrategy` that finds
        unused parameters (a step may not use all of a vcell module's); pass a strategy object to choose otherwise.
    early_stopping
        Stop when ``plan.monitor`` has not improved for ``early_stopping_patience`` validations and keep the weights
        of its best epoch.
    early_stopping_patience
        Validations without improvement before stopping.
    callbacks
        Further Lightning callbacks.
    trainer_kwargs
        Further :class:`lightning.Trainer` arguments.

    Returns
    -------
    The epoch whose weights the module holds: the last one without early stopping; with it, the best validation
    epoch (-1 when no validation ran: the module then holds the last epoch's weights).
    """
    import lightning

    if isinstance(strategy, str) and strategy in ("ddp", "ddp_spawn", "ddp_notebook"):
        # vcell's modules hold parameters that a step may leave unused (adversaries, protein heads, unseen
        # perturbations' rows): DDP must look for them, or it stops with an error on the first step
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(
            find_unused_parameters=True, start_method={"ddp": "popen", "ddp_spawn": "spawn"}.get(strategy, "fork")
        )
    best = BestWeights(plan.monitor)
    cbs = list(callbacks)
    if early_stopping:
        cbs.append(as_callback(best))
        cbs.append(lightning.pytorch.callbacks.EarlyStopping(monitor=plan.monitor, patience=early_stopping_patience))
    kwargs = {
        "max_epochs": int(max_epochs),
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
        "num_nodes": int(num_nodes),
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": settings.progress_bar,
        **(trainer_kwargs or {}),
    }
    kwargs["callbacks"] = cbs + list(kwargs.get("callbacks") or [])
    if kwargs["enable_progress_bar"] and not any(
        isinstance(cb, lightning.pytorch.callbacks.ProgressBar) for cb in kwargs["callbacks"]
    ):  # Lightning's bar, showing short metric names (val_cf_mse); the logged keys are unchanged
        kwargs["callbacks"].append(progress_bar())
    if val_dataloader is None:
        kwargs["limit_val_batches"] = 0
    pl_logger = logging.getLogger("lightning.pytorch")
    level = pl_logger.level
    if settings.verbosity != "debug":  # Lightning's banner (GPU available, tips) only in debug mode
        pl_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # Lightning's own use of a deprecated torch API: its CombinedLoader flattens the dataloaders with
            # `LeafSpec()` (lightning/pytorch/utilities/_pytree.py), which torch deprecates; torch 2.13 warns with a
            # FutureWarning, which a DeprecationWarning-only filter let through. Every fit with any dataloader
            # triggers it and vcell cannot avoid it, so exactly that message is silenced here, the one place vcell
            # runs a Trainer.
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings(
                    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=category
                )
            trainer = lightning.Trainer(**kwargs)
            trainer.fit(plan, train_dataloaders=train_dataloader, val_dataloaders=val_dataloader)
    finally:
        pl_logger.setLevel(level)
    if not early_stopping:
        return len(plan.history) - 1
    if best.state is not None:
        plan.module.load_state_dict(best.state)
    return best.epoch
