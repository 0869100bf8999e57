"""Lightning callbacks of vcell's models (plain objects with Lightning hook names; wrap with :func:`as_callback`)."""

from __future__ import annotations

from typing import Any

import torch


class CounterfactualValidation:
    """Lightning callback logging ``val_counterfactual_mse`` after each validation epoch.

    For every (condition, context) group of perturbed validation cells: the mean counterfactual of training control
    cells of that context under the group's condition, against the group's mean log1p(CP10k) expression; the squared
    error averaged over genes, then over groups. This scores what the model is for (counterfactuals of controls) on
    held-out cells, unlike the ELBO, whose minimum comes before the adversaries have cleaned ``z_basal``.

    ``contexts``: per context, ``(controls, encodings, groups)``: a batch of its sampled training controls, the
    target encodings of its groups (one row each) and those groups' rows in ``targets``. The controls of a context
    are shared by its groups, so they are encoded once per validation
    (:meth:`~vcell.module.CausalVAEModule.mean_counterfactuals`) and only the targets' states are decoded per group.

    With ``protein_targets`` (a model with proteins; the groups' mean proteins in log1p(counts per 1e4 of the
    protein library), NaN rows for groups without measured proteins) the protein counterfactuals' squared error,
    averaged the same way over the groups that have proteins, is added, so early stopping also waits for the
    protein head.
    """

    def __init__(
        self,
        contexts: list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]],
        targets: torch.Tensor,
        mode: str,
        *,
        protein_targets: torch.Tensor | None = None,
    ) -> None:
        self.contexts, self.targets, self.mode = contexts, targets, mode
        self.protein_targets = protein_targets

    def _mse(self, module: Any, device: Any, targets: torch.Tensor, modality: str) -> torch.Tensor:
        means = torch.zeros(targets.shape, device=device)
        for controls, encodings, groups in self.contexts:
            batch = {k: v.to(device) for k, v in controls.items()}
            pred = module.mean_counterfactuals(batch, encodings.to(device), mode=self.mode, modality=modality)
            means[groups.to(device)] = pred
        err = ((means - targets.to(device)) ** 2).mean(1)
        return err[torch.isfinite(err)].mean()

    def score(self, module: Any, device: Any = "cpu") -> torch.Tensor:
        """``val_counterfactual_mse`` of ``module`` (in eval mode, without gradients)."""
        was_training = module.training
        module.eval()
        with torch.no_grad():
            value = self._mse(module, device, self.targets, "rna")
            if self.protein_targets is not None and torch.isfinite(self.protein_targets).all(1).any():
                value = value + self._mse(module, device, self.protein_targets, "prot")
        module.train(was_training)
        return value

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not len(self.targets):
            return
        value = self.score(pl_module.module, pl_module.device)  # the same on every process (same weights, groups)
        pl_module.log("val_counterfactual_mse", value, prog_bar=True, sync_dist=trainer.world_size > 1)


class TargetEMA:
    """Lightning callback: one EMA step of a JEPA's target encoder after every optimizer step (CellJEPA)."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Move the target encoder towards the context encoder (``module.update_target``)."""
        pl_module.module.update_target()
