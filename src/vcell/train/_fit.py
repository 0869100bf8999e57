"""Run a :class:`~vcell.train.TrainingPlan` under a Lightning Trainer: early stopping, best weights, quiet banner."""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from vcell._settings import settings

from ._progress import progress_bar


class BestWeights:
    """Keeps (on CPU) the module weights of the validation epoch with the lowest ``monitor``.

    A plain object with Lightning's ``on_validation_end`` hook; wrap it with :func:`as_callback`.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor, self.best, self.state, self.epoch = monitor, np.inf, None, -1

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (tensors and numbers only)."""
        return {"best": float(self.best), "epoch": int(self.epoch), "state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.best, self.epoch, self.state = float(state["best"]), int(state["epoch"]), state["state"]

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Copy the weights when ``monitor`` improved."""
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or not float(value) < self.best:
            return
        self.best, self.epoch = float(value), int(trainer.current_epoch)
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.module.state_dict().items()}


class _Forward(Callback):
    """A Lightning callback forwarding its training-batch and validation hooks (and checkpoint state) to ``obj``."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if hasattr(self.obj, "on_train_batch_end"):
            self.obj.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if hasattr(self.obj, "on_validation_epoch_end"):
            self.obj.on_validation_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if hasattr(self.obj, "on_validation_end"):
            self.obj.on_validation_end(trainer, pl_module)

    @property
    def state_key(self) -> str:  # one entry per wrapped object type in a checkpoint
        return f"vcell_{type(self.obj).__name__}"

    def state_dict(self) -> dict[str, Any]:
        return self.obj.state_dict() if hasattr(self.obj, "state_dict") else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict and hasattr(self.obj, "load_state_dict"):
            self.obj.load_state_dict(state_dict)


def as_callback(obj: Any) -> Callback:
    """A :class:`lightning.pytorch.callbacks.Callback` forwarding its training-batch and validation hooks to ``obj``.

    The callback is picklable when ``obj`` is (``strategy="ddp_spawn"`` pickles the callbacks).
    """
    return _Forward(obj)


class _FinishEpoch(Callback):
    """First callback: sets the loader's epoch; the plan finishes its epoch before any checkpoint of it is written."""

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        # the training batches of this epoch are drawn as this epoch's (a resumed run continues the sequence)
        loader = trainer.train_dataloader
        if callable(getattr(loader, "set_epoch", None)):
            loader.set_epoch(int(trainer.current_epoch))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if hasattr(pl_module, "finish_train_epoch"):
            pl_module.finish_train_epoch()


class _SaveLast(Callback):
    """Writes the whole training state to ``path`` after every epoch.

    The file is written aside, then renamed, so a run killed while writing leaves the previous checkpoint whole.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        part = self.path.with_name(self.path.name + ".part")
        trainer.save_checkpoint(part)
        if trainer.is_global_zero:
            part.replace(self.path)
        trainer.strategy.barrier()


class _SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reader with ``torch.load(weights_only=True)``: a checkpoint cannot run code when read."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> dict[str, Any]:
        import torch

        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as err:  # truncated or foreign files
            msg = f"cannot read the training checkpoint {str(path)!r}: {err}"
            raise ValueError(msg) from err


class _ResultsLauncher(_MultiProcessingLauncher):
    """Lightning's launcher of spawned (or forked) processes, also returning what vcell reads after training.

    Lightning sends the weights and the logged metrics of process 0 back to the main process; this also sends the
    plan's per-epoch :attr:`~vcell.train.TrainingPlan.history` and the state of the callbacks that have one (the best
    weights of early stopping), so a model trained with ``strategy="ddp_spawn"`` ends as with ``"ddp"``.
    """

    def get_extra_results(self, trainer: Any) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        states = {i: cb.state_dict() for i, cb in enumerate(trainer.callbacks) if isinstance(cb, _Forward)}
        # through a file, as Lightning sends the weights: the queue's pipe is read only once the processes have
        # ended, so a large message (the best weights) would block the process writing it forever
        path = Path(tempfile.mkdtemp()) / "vcell_results.pt"
        torch.save({"history": getattr(trainer.lightning_module, "history", None), "callbacks": states}, path)
        extra["vcell"] = str(path)
        return extra

    def update_main_process_results(self, trainer: Any, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        if "vcell" not in extra:
            return
        path = Path(extra["vcell"])
        state = torch.load(path, weights_only=True)
        shutil.rmtree(path.parent, ignore_errors=True)
        if state["history"] is not None:
            trainer.lightning_module.history = state["history"]
        for i, cb_state in state["callbacks"].items():
            trainer.callbacks[i].load_state_dict(cb_state)


class _ProcessesDDP(DDPStrategy):
    """:class:`~lightning.pytorch.strategies.DDPStrategy` whose spawned processes send vcell's results back."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _MultiProcessingLauncher):
            self._launcher = _ResultsLauncher(self, start_method=self._start_method)


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
    checkpoint_path: str | Path | None = None,
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
        ``"ddp_spawn"`` pickles the plan, the loaders and the callbacks into the processes it starts (vcell's are
        picklable; a backed matrix is reopened from its HDF5 file), and the main process gets back process 0's
        weights, per-epoch history and callback state (early stopping's best weights).
    early_stopping
        Stop when ``plan.monitor`` has not improved for ``early_stopping_patience`` validations and keep the weights
        of its best epoch.
    early_stopping_patience
        Validations without improvement before stopping.
    callbacks
        Further Lightning callbacks.
    trainer_kwargs
        Further :class:`lightning.Trainer` arguments.
    checkpoint_path
        A folder for a checkpoint written after every epoch (``last.ckpt``: weights, optimizer, epoch, history, random
        state, early-stopping state). When it already holds one, training resumes from it, and reaches the weights an
        uninterrupted run with the same seed reaches (on CPU). Checkpoints are read with
        ``torch.load(weights_only=True)``: reading one cannot run code.

    Returns
    -------
    The epoch whose weights the module holds: the last one without early stopping; with it, the best validation
    epoch (-1 when no validation ran: the module then holds the last epoch's weights).
    """
    import lightning

    if isinstance(strategy, str) and strategy in ("ddp", "ddp_spawn", "ddp_notebook"):
        # vcell's modules hold parameters that a step may leave unused (adversaries, protein heads, unseen
        # perturbations' rows): DDP must look for them, or it stops with an error on the first step
        strategy = _ProcessesDDP(
            find_unused_parameters=True, start_method={"ddp": "popen", "ddp_spawn": "spawn"}.get(strategy, "fork")
        )
    best = BestWeights(plan.monitor)
    cbs = [_FinishEpoch(), *callbacks]
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
    resume = None
    if checkpoint_path is not None:
        folder = Path(checkpoint_path)
        if folder.exists() and not folder.is_dir():
            msg = f"checkpoint_path {str(folder)!r} is a file; pass a folder (vcell writes last.ckpt there)"
            raise ValueError(msg)
        kwargs["callbacks"].append(_SaveLast(folder / "last.ckpt"))
        kwargs["plugins"] = [*list(kwargs.get("plugins") or []), _SafeCheckpointIO()]
        last = folder / "last.ckpt"
        resume = str(last) if last.exists() else None
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
            trainer.fit(plan, train_dataloaders=train_dataloader, val_dataloaders=val_dataloader, ckpt_path=resume)
    finally:
        pl_logger.setLevel(level)
    if not early_stopping:
        return len(plan.history) - 1
    if best.state is not None:
        plan.module.load_state_dict(best.state)
    return best.epoch
