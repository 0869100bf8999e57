"""``AdaptMixin.adapt``: fine-tune a trained CausalVAE on a new dataset with low-rank adapters and new rows only."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from vcell._constants import CONTROL, REGISTRY_KEYS
from vcell._settings import logger
from vcell._utils import check_positive_int, resolve_seed
from vcell.data import vcell_state
from vcell.module._lora import inject_lora, merge_lora, merge_rows, train_rows

from ._base import check_train_args

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData
    from torch import nn

#: model attributes :meth:`AdaptMixin.adapt` reads (CausalVAE's vocabularies)
_NEEDED = ("atoms_", "pairs_", "covariate_names_", "_categories", "_conditions", "init_params_", "var_names_")


def _rna(adata: AnnData | MuData) -> AnnData:
    """The AnnData of ``adata`` (its ``rna`` modality when it is a MuData)."""
    if not hasattr(adata, "mod"):
        return adata
    if "rna" not in adata.mod:
        msg = f"MuData has no 'rna' modality; modalities: {list(adata.mod)}"
        raise KeyError(msg)
    return adata.mod["rna"]


def match_genes(reference: Sequence[str], adata: AnnData) -> AnnData:
    """``adata`` with exactly the genes of ``reference`` in that order (a reordered copy when only the order differs).

    Parameters
    ----------
    reference
        Genes the model was trained on.
    adata
        New data.

    Returns
    -------
    ``adata`` itself when its genes equal ``reference``; a copy reordered to ``reference`` when they are the same
    set in another order. A :class:`ValueError` names missing or unexpected genes otherwise.
    """
    ref = pd.Index([str(g) for g in reference])
    given = pd.Index([str(g) for g in adata.var_names])
    if given.has_duplicates:
        dup = given[given.duplicated()].unique()[:10].tolist()
        msg = f"adata.var_names has duplicated genes {dup}; make them unique (adata.var_names_make_unique())"
        raise ValueError(msg)
    missing = ref.difference(given, sort=False)
    if len(missing):
        msg = (
            f"adata lacks {len(missing)} of the {len(ref)} genes the model was trained on: {missing[:10].tolist()}"
            f"{' ...' if len(missing) > 10 else ''}; adapt() needs the same genes (add them as zero counts if they "
            "were not measured)"
        )
        raise ValueError(msg)
    extra = given.difference(ref, sort=False)
    if len(extra):
        msg = (
            f"adata has {len(extra)} genes the model was not trained on: {extra[:10].tolist()}"
            f"{' ...' if len(extra) > 10 else ''}; subset it to the model's genes: adata[:, model.var_names_].copy()"
        )
        raise ValueError(msg)
    if given.equals(ref):
        return adata
    logger.info("adapt: adata's genes reordered to the model's order (a copy)")
    return adata[:, given.get_indexer(ref)].copy()


def _index_map(old: Sequence[str], new: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions in ``old``, positions in ``new``) of the labels in both, and positions in ``new`` of new labels."""
    pos = {str(lab): i for i, lab in enumerate(old)}
    both = [(pos[str(lab)], j) for j, lab in enumerate(new) if str(lab) in pos]
    old_idx = np.array([i for i, _ in both], dtype=np.int64)
    new_idx = np.array([j for _, j in both], dtype=np.int64)
    fresh = np.array([j for j, lab in enumerate(new) if str(lab) not in pos], dtype=np.int64)
    return old_idx, new_idx, fresh


def _last_linear(seq: nn.Module) -> str:
    """Name (inside ``seq``) of its last :class:`torch.nn.Linear`."""
    from torch import nn

    return [n for n, m in seq.named_modules() if isinstance(m, nn.Linear)][-1]


def _row_maps(base: Any, new: Any) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    """Per state-dict key of ``new.module`` whose rows are labelled: (old rows, new rows, fresh rows, init rule).

    Init rules of the fresh rows: ``"mean"`` (mean of the trained rows), ``"zero"``, ``"keep"`` (the fresh module's).
    """
    atoms = _index_map(base.atoms_, new.atoms_)
    maps = {
        "perturbation.operators.weight": (*atoms, "zero"),
        "perturbation.dose.log_ec50": (*atoms, "mean"),
        "perturbation.dose.log_slope": (*atoms, "mean"),
        "perturbation.interactions.effect": (*_index_map(base.pairs_, new.pairs_), "keep"),
        "perturbation.interactions.gate": (*_index_map(base.pairs_, new.pairs_), "keep"),
    }
    ops_old, ops_new = base.module.perturbation.operators, new.module.perturbation.operators
    if hasattr(ops_new, "node_embedding"):  # gene graph: embedded nodes, by node index
        nodes = _index_map(ops_old.nodes.tolist(), ops_new.nodes.tolist())
        maps["perturbation.operators.node_embedding"] = (*nodes, "keep")
    for k, (old_cats, new_cats) in enumerate(zip(base._categories, new._categories, strict=True)):
        maps[f"covariates.{k}.weight"] = (*_index_map(old_cats, new_cats), "mean")
    labels_old = {"perturbation": base._conditions(), **dict(zip(base.covariate_names_, base._categories, strict=True))}
    labels_new = {"perturbation": new._conditions(), **dict(zip(new.covariate_names_, new._categories, strict=True))}
    for j, name in enumerate(new.module.adversary_names):
        last = _last_linear(new.module.adversaries[j])
        rows = _index_map(labels_old[name], labels_new[name])
        maps[f"adversaries.{j}.{last}.weight"] = (*rows, "zero")
        maps[f"adversaries.{j}.{last}.bias"] = (*rows, "mean")
    return maps


def _old_key(key: str, base_module: Any, new_module: Any) -> str | None:
    """Key of ``base_module``'s state dict holding the values of ``new_module``'s ``key`` (adversaries by name)."""
    if not key.startswith("adversaries."):
        return key
    _, j, rest = key.split(".", 2)
    name = new_module.adversary_names[int(j)]
    if name not in base_module.adversary_names:
        return None
    return f"adversaries.{base_module.adversary_names.index(name)}.{rest}"


@torch.no_grad()
def _transfer(base: Any, new: Any) -> dict[str, np.ndarray | None]:
    """Copy ``base``'s trained weights into ``new.module``, matching labelled rows by name.

    Returns, per parameter name of ``new.module``, the rows that are new (``None``: the whole parameter is new).
    """
    src = base.module.state_dict()
    dst = new.module.state_dict()
    maps = _row_maps(base, new)
    fresh_rows: dict[str, np.ndarray | None] = {}
    for key, value in dst.items():
        if key.rpartition(".")[2] in ("pairs", "seen_atoms", "features"):  # from the new vocabulary (same old rows)
            continue
        okey = _old_key(key, base.module, new.module)
        if okey is None or okey not in src:
            fresh_rows[key] = None
            continue
        old = src[okey].to(value.device)
        if key in maps:
            old_idx, new_idx, fresh, rule = maps[key]
            trained = old[torch.as_tensor(old_idx)]
            value[torch.as_tensor(new_idx)] = trained
            if fresh.size:
                f = torch.as_tensor(fresh)
                if rule == "zero":
                    value[f] = 0.0
                elif rule == "mean" and len(old_idx):
                    value[f] = trained.mean(0, keepdim=True).expand(len(fresh), *value.shape[1:]).to(value.dtype)
            fresh_rows[key] = fresh
        elif old.shape != value.shape:
            msg = f"adapt: parameter {key!r} has shape {tuple(old.shape)} in the base model, {tuple(value.shape)} now"
            raise RuntimeError(msg)
        else:
            value.copy_(old)
    new.module.load_state_dict(dst)
    return fresh_rows


def counterfactual_error(
    module: nn.Module, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], *, control_code: int, mode: str
) -> torch.Tensor:
    """Squared error (summed over genes) of the mean counterfactual of a batch's control cells, per perturbed group.

    For every (condition, context) group of perturbed cells in ``batch`` whose context has control cells in the
    batch: the control cells' counterfactual under the group's perturbation (posterior means, ``mode`` as in
    ``CausalVAEModule.counterfactual``), averaged over cells, against the group's mean log1p(CP10k) expression.
    The errors are averaged over groups (0 when there is none). Differentiable.

    Parameters
    ----------
    module
        A :class:`~vcell.module.CausalVAEModule`.
    batch
        Training batch (needs the condition codes under ``REGISTRY_KEYS.PERT_KEY``).
    out
        ``module(batch)``.
    control_code
        Condition code of control cells.
    mode
        ``"residual"`` or ``"decoded"``.
    """
    codes = batch[REGISTRY_KEYS.PERT_KEY].reshape(-1).long()
    n = codes.shape[0]
    cov = batch.get(REGISTRY_KEYS.COVARIATES_KEY)
    cov = torch.zeros((n, 0), dtype=torch.long, device=codes.device) if cov is None else cov.long().reshape(n, -1)
    ctx = torch.unique(cov, dim=0, return_inverse=True)[1] if cov.shape[1] else torch.zeros_like(codes)
    is_ctrl = codes == control_code
    z0 = out["mu"] + module.covariate_latent(cov if cov.shape[1] else None)
    enc = batch[REGISTRY_KEYS.PERT_ENCODING_KEY]
    errors = []
    for g in torch.unique(ctx[is_ctrl]).tolist():
        ctrl = is_ctrl & (ctx == g)
        m0 = module.mean_log1p(module.decode(z0[ctrl]))
        for c in torch.unique(codes[(ctx == g) & ~is_ctrl]).tolist():
            members = (ctx == g) & (codes == c)
            target = enc[members].mean(0, keepdim=True).expand(int(ctrl.sum()), -1)
            m_t = module.mean_log1p(module.decode(z0[ctrl] + module.perturbation_latent(target)))
            pred = m_t if mode == "decoded" else (out["x_log"][ctrl] + m_t - m0).clamp(min=0.0)
            errors.append(((pred.mean(0) - out["x_log"][members].mean(0)) ** 2).sum())
    return torch.stack(errors).mean() if errors else out["mu"].new_zeros(())


def _add_counterfactual_loss(module: nn.Module, weight: float, *, control_code: int, mode: str) -> None:
    """Make ``module.loss`` (this instance only) add ``weight`` times :func:`counterfactual_error`."""
    class_loss = type(module).loss

    def loss(batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> Any:
        res = class_loss(module, batch, out)
        cf = counterfactual_error(module, batch, out, control_code=control_code, mode=mode)
        return dataclasses.replace(
            res, loss=res.loss + weight * cf, terms={**res.terms, "counterfactual_error": cf.detach()}
        )

    module.loss = loss


def _n_params(module: nn.Module, *, trainable: bool = False) -> int:
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable))


class AdaptMixin:
    """Adds :meth:`adapt` to a trained :class:`~vcell.model.CausalVAE` (``class M(AdaptMixin, CausalVAE)``)."""

    def adapt(
        self,
        adata: AnnData | MuData,
        *,
        rank: int = 4,
        alpha: float | None = None,
        target: Sequence[str] = ("encoder", "decoder"),
        max_epochs: int = 100,
        lr: float = 3e-3,
        batch_size: int = 128,
        train_new_embeddings: bool = True,
        train_dispersion: bool = False,
        adversary_weight: float = 0.0,
        counterfactual_weight: float = 1.0,
        weight_decay: float = 0.0,
        early_stopping: bool = False,
        validation_fraction: float = 0.0,
        perturbation_key: str | None = None,
        control: str | Sequence[str] | None = None,
        seed: int | None = None,
        accelerator: str = "auto",
        devices: int | str = "auto",
        trainer_kwargs: dict | None = None,
    ) -> Any:
        """Fine-tune a copy of this trained model on new data, training only low-rank adapters and new rows.

        The new data must hold the model's genes (reordered if needed). They are registered with this model's
        setup, extended by their new categories (scvi-tools' registry transfer, as in reference mapping with
        ``extend_categories=True``): a new cell type or batch gets a new covariate-embedding row (started at the
        mean of the trained rows), a new perturbation a new operator (started at zero) and dose-response curve
        (started at the trained mean), new combinations new interaction terms. A new model is built with the
        extended vocabularies and this model's weights; then every trained weight is frozen and only

        - a rank-``rank`` LoRA update ``W + (alpha / rank) B A`` of every linear layer of the ``target``
          submodules (``B`` starts at zero, so before training the adapted model predicts exactly as this one),
        - the new rows (``train_new_embeddings``), including the adversaries' outputs for new classes,
        - the genes' dispersions (``train_dispersion``)

        are trained on the new cells, with the same Lightning training as :meth:`~vcell.model.CausalVAE.train`
        (the optimizer skips frozen parameters, so they stay bitwise unchanged). The objective is the model's loss
        plus ``counterfactual_weight`` times the counterfactual error of the batch (:func:`counterfactual_error`):
        for each perturbation and context, the squared difference (summed over genes) between the mean
        counterfactual of the batch's control cells and the mean of its perturbed cells. With a few cells the ELBO
        alone fits each cell but lets the perturbation's effect leak into the encoded basal state (the
        adversaries that prevent this in training need many cells), which shrinks predicted responses; the
        counterfactual term fits what predictions are made of. Afterwards the adapters are merged
        into the weights (``W + (alpha / rank) B A``) and the new rows into their tables, so the result is a plain
        model of the same class with extended vocabularies: it predicts, saves and loads like any other (no adapter
        layers to rebuild), and it still knows every category of this model. This model is not changed.

        Parameters
        ----------
        adata
            New data (AnnData, or MuData with an ``rna`` modality) with the same genes, the same kind of matrix
            (counts or log-normalised) and the same ``obs`` columns as this model's setup (perturbation, covariates,
            batch; dose if one was registered). A view, this model's own training data or data whose genes need
            reordering is copied first; otherwise ``adata`` is registered in place (as ``setup_anndata`` does).
        rank
            Rank of the adapters; ``0`` trains no adapter (only new rows and, optionally, dispersions).
        alpha
            Adapter scale numerator (``None``: ``rank``).
        target
            Submodules of the module whose linear layers get adapters (``"encoder"``, ``"decoder"``, and with a
            perturbation embedding table or gene graph ``"perturbation"``).
        max_epochs, lr, batch_size, weight_decay, early_stopping, validation_fraction, seed, accelerator, devices, trainer_kwargs
            Training options, as in :meth:`~vcell.model.CausalVAE.train` (``seed`` also draws the adapters' ``A``;
            ``None`` uses ``vcell.settings.seed``). With few cells the defaults train on all of them for
            ``max_epochs`` (no validation split, no early stopping).
        train_new_embeddings
            Train the new rows (else they stay at their starting values).
        train_dispersion
            Also train the per-gene dispersion (NB/ZINB) or variance (Gaussian).
        counterfactual_weight
            Weight of the counterfactual error in the objective (0: the model's loss only).
        adversary_weight
            Strength of the (frozen) adversaries' reversed gradient into the encoder's adapters during adaptation;
            ``0`` (default): the adversaries only report (a few cells cannot re-train them).
        perturbation_key, control
            Perturbation column and control label(s) of ``adata`` when they differ from this model's setup.

        Returns
        -------
        The adapted model (same class), trained.

        Sets the following fields
        -------------------------
        ``adata.obs['vcell_perturbation']``, ``['vcell_n_perturbations']``, ``['vcell_dose']``, ``adata.obs['_scvi_*']``, ``adata.uns['_scvi_*']``
            The registration of ``adata`` (as :meth:`~vcell.model.CausalVAE.setup_anndata`).
        ``adapted.adapt_summary_``
            Dict: ``rank``, ``alpha``, ``lora_layers``, ``new_categories`` (per covariate), ``new_perturbations``,
            ``new_conditions``, ``n_trainable`` / ``n_total`` parameters (and their ratio ``trainable_fraction``;
            ``n_total`` counts the adapted model's parameters without adapters), ``epochs``, ``seconds``.
        ``adapted.history_``, ``adapted.adversary_accuracy_``
            As after :meth:`~vcell.model.CausalVAE.train`, for the adaptation.

        Examples
        --------
        >>> import vcell
        >>> adata = vcell.datasets.simulate(
        ...     n_cells=300, n_genes=30, n_perturbations=2, n_combos=0, cell_types=3, seed=0
        ... )
        >>> old = adata[adata.obs["cell_type"] != "type2"].copy()
        >>> vcell.model.CausalVAE.setup_anndata(
        ...     old, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
        ... )
        >>> model = vcell.model.CausalVAE(old, n_latent=4, n_hidden=16)
        >>> model.train(max_epochs=2, seed=0, trainer_kwargs={"enable_progress_bar": False})
        >>> new = adata[adata.obs["cell_type"] == "type2"].copy()  # few-shot: adapting fits type2's own cells
        >>> adapted = model.adapt(new, rank=2, max_epochs=2, seed=0, trainer_kwargs={"enable_progress_bar": False})
        >>> adapted.adapt_summary_["new_categories"]
        {'cell_type': ['type2']}
        """
        missing = [a for a in _NEEDED if not hasattr(self, a)]
        if missing:
            msg = f"adapt() needs a CausalVAE-like model; {type(self).__name__} lacks {missing}"
            raise TypeError(msg)
        if not getattr(self, "is_trained_", False):
            msg = "the model is not trained: call model.train() before model.adapt()"
            raise RuntimeError(msg)
        if int(rank) < 0:
            msg = f"rank must be a non-negative integer, got {rank!r}"
            raise ValueError(msg)
        # max_epochs=0: the adapted model as built (new rows at their starting values, adapters at zero), untrained
        check_positive_int(max_epochs, name="max_epochs", minimum=0)
        check_train_args(
            lr=lr, batch_size=batch_size, weight_decay=weight_decay, validation_fraction=validation_fraction
        )
        seed = resolve_seed(seed)
        t0 = time.perf_counter()
        adata = _rna(adata)
        fitted = match_genes(self.var_names_, adata)
        if fitted is adata and (adata.is_view or adata is getattr(self, "adata", None)):
            fitted = adata.copy()
        adata = fitted

        cls = type(self)
        setup_args = dict(self.registry_["setup_args"])
        if perturbation_key is not None:
            setup_args["perturbation_key"] = perturbation_key
        if control is not None:
            setup_args["control"] = control
        cls.setup_anndata(adata, **setup_args, source_registry=self.registry_, extend_categories=True)
        counts = bool(vcell_state(cls._get_most_recent_anndata_manager(adata).registry)["counts"])
        if counts != bool(self.counts_):
            kinds = {True: "raw counts", False: "log-normalised values"}
            msg = f"the model was trained on {kinds[bool(self.counts_)]}, but adata holds {kinds[counts]}"
            raise ValueError(msg)

        init = self.init_params_
        kwargs = {k: v for group in init.get("kwargs", {}).values() for k, v in group.items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            new = cls(adata, **init["non_kwargs"], **kwargs)
        device = next(self.module.parameters()).device
        new.module.to(device)
        fresh = _transfer(self, new)
        module = new.module
        n_total = _n_params(module)

        for p in module.parameters():
            p.requires_grad_(False)
        if train_new_embeddings:
            for key, rows in fresh.items():
                owner_name, _, attr = key.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                if not isinstance(getattr(owner, attr, None), torch.nn.Parameter):
                    continue
                if rows is None:
                    getattr(owner, attr).requires_grad_(True)
                elif rows.size:
                    train_rows(owner, attr, rows)
        if train_dispersion:
            module.gene_param.requires_grad_(True)
        lora_layers = inject_lora(module, int(rank), target=target, alpha=alpha, seed=seed) if rank else []
        n_trainable = _n_params(module, trainable=True)
        adversary_weight_before = module.adversary_weight
        module.adversary_weight = float(adversary_weight)
        conditions = new._conditions()
        if counterfactual_weight and CONTROL in conditions:
            _add_counterfactual_loss(
                module, float(counterfactual_weight), control_code=conditions.index(CONTROL), mode=new.prediction
            )

        new.is_trained_ = True  # keeps train() from re-initialising the weights
        try:
            if int(max_epochs) == 0:
                new._check_train()  # the new cells' doses, as any training would check them
            else:
                new.train(
                    max_epochs=int(max_epochs),
                    lr=lr,
                    batch_size=batch_size,
                    accelerator=accelerator,
                    devices=devices,
                    early_stopping=early_stopping,
                    seed=seed,
                    trainer_kwargs=trainer_kwargs,
                    weight_decay=weight_decay,
                    validation_fraction=validation_fraction,
                )
        finally:
            merge_lora(module)
            merge_rows(module)
            for p in module.parameters():
                p.requires_grad_(True)
            module.adversary_weight = adversary_weight_before
            module.__dict__.pop("loss", None)
            module.eval()

        new_categories = {
            name: [c for c in new_cats if c not in set(old_cats)]
            for name, old_cats, new_cats in zip(self.covariate_names_, self._categories, new._categories, strict=True)
        }
        summary = {
            "rank": int(rank),
            "alpha": float(rank if alpha is None else alpha) if rank else None,
            "lora_layers": lora_layers,
            "new_categories": {k: v for k, v in new_categories.items() if v},
            "new_perturbations": [a for a in new.atoms_ if a not in set(self.atoms_)],
            "new_conditions": [c for c in new._conditions() if c not in set(self._conditions())],
            "n_trainable": n_trainable,
            "n_total": n_total,
            "trainable_fraction": n_trainable / max(n_total, 1),
            "epochs": len(next(iter(new.history_.values()))) if new.history_ else 0,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        new.adapt_summary_ = summary
        logger.info(
            "adapted %s: %d of %d parameters trained (%.2f%%), new categories %s, new perturbations %s",
            cls.__name__,
            n_trainable,
            n_total,
            100 * summary["trainable_fraction"],
            summary["new_categories"],
            summary["new_perturbations"],
        )
        return new
