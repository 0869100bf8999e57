"""One generic Lightning training plan: any vcell module with ``forward(batch)`` and ``loss(batch, out)``."""

from __future__ import annotations

from typing import Any

import lightning
import torch
from torch import nn


def _terms(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(objective, named scalars) of a module's loss output: a ``LossOutput``-like object, a dict or a tensor."""
    if isinstance(out, torch.Tensor):
        return out, {}
    if isinstance(out, dict):
        return out["loss"], {k: v for k, v in out.items() if k != "loss"}
    named = {**dict(getattr(out, "terms", {}) or {}), **dict(getattr(out, "metrics", {}) or {})}
    return out.loss, named


class TrainingPlan(lightning.LightningModule):
    """Train a vcell module: ``loss = module.loss(batch, module(batch))``, with one AdamW optimizer.

    Every named term and metric of the loss output is averaged over each epoch (weighted by batch size) and
    logged as ``train_<name>`` / ``val_<name>``, together with ``train_loss`` / ``val_loss``; the epoch means are
    also kept in :attr:`history` (one dict per epoch, with everything else logged that epoch, e.g. by callbacks;
    ``val_*`` values only for epochs that ran a validation, e.g. every ``check_val_every_n_epoch``-th). Adversarial
    training works through gradient reversal inside the module, so no second optimizer is needed.

    Parameters
    ----------
    module
        A :class:`torch.nn.Module` with ``forward(batch) -> out`` and ``loss(batch, out)`` returning an object with
        ``.loss`` (and optionally ``.terms`` / ``.metrics`` dicts of scalars), a dict with ``"loss"``, or a tensor.
    lr
        Learning rate.
    weight_decay
        AdamW weight decay.
    lr_factor, lr_patience
        Reduce the learning rate by ``lr_factor`` when ``monitor`` has not improved for ``lr_patience`` epochs;
        ``lr_patience=None`` keeps it constant.
    monitor
        Logged value the learning-rate schedule watches.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        lr_factor: float = 0.5,
        lr_patience: int | None = None,
        monitor: str = "val_loss",
    ) -> None:
        super().__init__()
        self.module = module
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.lr_factor, self.lr_patience, self.monitor = float(lr_factor), lr_patience, monitor
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, dict[tuple[str, ...], torch.Tensor]] = {"train": {}, "val": {}}
        self._counts = {"train": 0, "val": 0}
        self._validated_epoch = -1
        self._finished_epoch = -1

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """The module's forward pass."""
        return self.module(batch)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        loss, named = _terms(self.module.loss(batch, self.module(batch)))
        n = next(iter(batch.values())).shape[0]
        names = ("loss", *named)
        with torch.no_grad():  # one stacked running sum per stage: two small ops per step, not two per term
            values = torch.stack([loss.detach(), *(torch.as_tensor(v, device=loss.device) for v in named.values())])
            values = values.to(loss.dtype) * n
        sums = self._sums[stage]
        sums[names] = sums[names] + values if names in sums else values
        self._counts[stage] += n
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimisation step."""
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate the validation terms."""
        self._step(batch, "val")

    def _flush(self, stage: str) -> None:
        n = self._counts[stage]
        if not n:
            return
        sums = self._sums[stage]
        if self._distributed():  # every process's sums and counts: the logged means are over all processes' items
            flat = torch.cat([*sums.values(), torch.as_tensor([float(n)], device=next(iter(sums.values())).device)])
            flat = self.trainer.strategy.reduce(flat, reduce_op="sum")
            n, at = float(flat[-1]), 0
            for names in sums:
                sums[names], at = flat[at : at + len(names)], at + len(names)
        synced = self._distributed()  # equal on every process already: no warning, the mean of equal values
        means: dict[str, float] = {}
        for names, total in sums.items():  # one host sync per stage and epoch
            means.update(zip(names, (total / n).tolist(), strict=True))
        for key, value in means.items():
            self.log(f"{stage}_{key}", value, prog_bar=key == "loss", on_step=False, on_epoch=True, sync_dist=synced)
        self._sums[stage] = {}
        self._counts[stage] = 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the history and the random state, so a resumed run continues the same sequence of draws."""
        checkpoint["vcell"] = {
            "history": self.history,
            "validated_epoch": self._validated_epoch,
            "torch_rng": torch.get_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`on_save_checkpoint` kept."""
        state = checkpoint.get("vcell") or {}
        self.history = list(state.get("history", []))
        self._validated_epoch = int(state.get("validated_epoch", -1))
        if "torch_rng" in state:
            self._resume_rng = state["torch_rng"]

    def on_train_start(self) -> None:
        rng = getattr(self, "_resume_rng", None)
        if rng is not None:  # after Lightning's restore (which itself draws nothing from torch's generator)
            torch.set_rng_state(rng)
            self._resume_rng = None
        # Every process starts from the same seed (the same weights); without this, every process would also draw
        # the same noise (reparametrisation, flow times, diffusion noise) for its different cells. Process 0 keeps the
        # stream of a single-process run.
        if self._distributed() and self.global_rank > 0:
            torch.manual_seed(torch.initial_seed() + int(self.global_rank))

    def _distributed(self) -> bool:
        trainer = self._trainer
        return trainer is not None and int(getattr(trainer, "world_size", 1)) > 1

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._flush("val")
            self._validated_epoch = int(self.current_epoch)
        else:
            self._sums["val"], self._counts["val"] = {}, 0

    def on_train_epoch_end(self) -> None:
        self.finish_train_epoch()

    def finish_train_epoch(self) -> None:
        """Log the epoch's training means and append the epoch to :attr:`history` (once per epoch).

        Called by :func:`vcell.train.fit`'s first callback, so that it runs before the checkpoint callback saves the
        epoch (Lightning calls callbacks' ``on_train_epoch_end`` before the module's); again by the module's own hook,
        where it does nothing the second time.
        """
        if self._finished_epoch == int(self.current_epoch):
            return
        self._finished_epoch = int(self.current_epoch)
        self._flush("train")
        logged = {k: float(v) for k, v in self.trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        if self._validated_epoch != int(self.current_epoch):  # no validation this epoch (check_val_every_n_epoch)
            logged = {k: v for k, v in logged.items() if not k.startswith("val_")}
        self.history.append({"epoch": int(self.current_epoch), **logged})

    def configure_optimizers(self) -> Any:
        """AdamW (fused into one kernel per tensor where torch has one), optionally with a reduce-on-plateau schedule."""
        opt = torch.optim.AdamW(
            self.module.parameters(), lr=self.lr, weight_decay=self.weight_decay, **_adamw_impl(self.module)
        )
        if self.lr_patience is None:
            return opt
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=self.lr_factor, patience=self.lr_patience)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.monitor}}


def _adamw_impl(module: nn.Module) -> dict[str, bool]:
    """``fused=True`` when every parameter is a float tensor on a device with a fused AdamW, else ``foreach=True``.

    Fused: one kernel per parameter tensor for the whole update (CPU: about 4x faster than ``foreach``, which on CPU
    loops over the tensors once per elementwise op); deterministic, and the same numbers as the per-tensor loop up
    to float32 rounding (a different order of the same operations).
    """
    params = list(module.parameters())
    fused_ok = bool(params) and all(
        p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        and p.device.type in ("cpu", "cuda", "mps", "xpu")
        for p in params
    )
    return {"fused": True} if fused_ok else {"foreach": True}
