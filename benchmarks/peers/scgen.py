"""scGen (Lotfollahi et al. 2019) through ``pertpy.tl.Scgen``, in vcell's own environment (no subprocess).

scGen is a VAE on log-normalised expression; a perturbation is a vector in its latent space: the mean latent code
of the perturbed cells minus that of the control cells, each averaged with the cell types (contexts) weighted
equally (pertpy's ``balancer``). A control cell's counterfactual is the decoded ``z + delta``.

What it can answer here:

* a perturbation trained in other contexts (cell-type transfer, Kang 2018): scGen's own task;
* a combination whose singles were trained: ``z + delta_A + delta_B`` (scGen's latent vector arithmetic applied
  to a double; not in the scGen paper, reported as such);
* an unseen perturbation: no (scGen has no representation of a perturbation it never saw); a reason is returned.

Differences from ``Scgen.predict``: the latent deltas are computed as the exact balanced means (the expectation of
pertpy's unseeded resampling of cell types and its subsampling to equal sizes), so predictions are reproducible for a
seed; the decoder output is returned as it is (not clipped at 0).

Cost on this project's 2-core CPU (Kang 2018, ~1,700 training cells x 2,000 genes): ~12 s of fixed work per model
(JAX compiling the training and validation steps; ~20 s for the first model of a process, which also imports
pertpy) and ~1.3-2.2 s per epoch at batch 32. The benchmark run uses 20 epochs (``run_peers.BUDGETS``): on Kang CD4T
20 epochs gave Pearson delta 0.654 (40 epochs: 0.651; 10 epochs: 0.556), energy distance 2.42 (40 epochs: 2.02).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ._common import CONTROL, PERT_COL, classify_request, contexts, measure_in_process

if TYPE_CHECKING:
    from anndata import AnnData

    from vcell.bench import PredictionRequest


def _scvi_backend(scgen_cls: type) -> bool:
    """Whether ``pertpy.tl.Scgen`` is the scvi-tools model of pertpy < 1.4 (``train(plan_kwargs=...)``)."""
    import inspect

    return "plan_kwargs" in inspect.signature(scgen_cls.train).parameters


def _balanced_mean(Z: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """Mean of ``Z`` with every context weighted equally (mean over contexts of the per-context means)."""
    return np.mean([Z[ctx == c].mean(0) for c in np.unique(ctx)], axis=0)


@dataclass
class ScGen:
    """scGen adapter (a :class:`vcell.bench.Predictor`).

    Parameters
    ----------
    name
        Label in the benchmark tables.
    max_epochs, batch_size, early_stopping_patience, lr
        Training of ``pertpy.tl.Scgen`` (early stopping on scvi-tools' random 10% validation cells).
    n_latent, n_hidden, n_layers, dropout_rate
        ``pertpy.tl.Scgen`` architecture (its defaults).
    """

    name: str = "scGen"
    max_epochs: int = 40
    batch_size: int = 32
    early_stopping_patience: int = 25
    lr: float = 1e-3
    n_latent: int = 100
    n_hidden: int = 800
    n_layers: int = 2
    dropout_rate: float = 0.2
    last_resources: dict = field(default_factory=dict, repr=False)
    last_epochs: int = field(default=0, repr=False)

    def fit_predict(
        self,
        train: AnnData,
        requests: list[PredictionRequest],
        *,
        seed: int,
        covariate_keys: Sequence[str],
        layer: str | None,
    ) -> dict[str, np.ndarray | str]:
        """Train scGen on the training cells and predict every request it can (see the module docstring)."""
        import anndata as ad
        import pandas as pd

        try:
            from pertpy.tools import Scgen
        except ImportError as err:  # pertpy >= 1.4 without its JAX backend
            msg = f"scGen needs pertpy's Scgen: {err} (pertpy >= 1.4: pip install 'pertpy[jax]')"
            raise ImportError(msg) from err

        from vcell._utils import expression_for_eval

        cond = train.obs[PERT_COL].astype(str).to_numpy()
        trained = set(cond) - {CONTROL}
        out: dict[str, np.ndarray | str] = {}
        todo = []
        for r in requests:
            kind = classify_request(r.perturbation, trained)
            if kind == "unseen":
                out[r.condition] = (
                    "scGen cannot predict an unseen perturbation: a perturbation is the latent shift of its "
                    "trained cells, and no training cell carries "
                    f"{r.perturbation!r}"
                )
            else:
                todo.append(r)
        self.last_resources = {}
        if not todo:
            return out
        with measure_in_process() as m:
            t0 = time.perf_counter()
            ctx = contexts(train, covariate_keys)
            E = expression_for_eval(train, layer)
            a = ad.AnnData(
                X=E,
                obs=pd.DataFrame({"condition": cond, "context": ctx}, index=[f"c{i}" for i in range(train.n_obs)]),
            )
            a.var_names = train.var_names.astype(str)
            Scgen.setup_anndata(a, batch_key="condition", labels_key="context")
            old_api = _scvi_backend(Scgen)
            if old_api:
                import scvi

                scvi.settings.seed = int(seed)
            model = Scgen(
                a,
                n_hidden=self.n_hidden,
                n_latent=self.n_latent,
                n_layers=self.n_layers,
                dropout_rate=self.dropout_rate,
            )
            train_kw = {
                "max_epochs": self.max_epochs,
                "batch_size": self.batch_size,
                "early_stopping": True,
                "early_stopping_patience": self.early_stopping_patience,
            }
            if old_api:  # pertpy < 1.4: an scvi-tools model (JAX module, Lightning-style train), seeded above
                model.train(**train_kw, plan_kwargs={"lr": self.lr}, accelerator="cpu", enable_progress_bar=False)
                history = model.history.get("elbo_train") if hasattr(model, "history") else None
                decode_fn = model.module.as_bound().generative

                def decode(z: np.ndarray) -> np.ndarray:
                    return np.asarray(decode_fn(z)["px"], dtype=np.float32)
            else:  # pertpy >= 1.4: its own JAX training loop (needs ``pertpy[jax]``), seeded through train()
                model.train(**train_kw, lr=self.lr, seed=int(seed))
                history = model.history.get("train_loss")

                def decode(z: np.ndarray) -> np.ndarray:
                    return np.asarray(model._decode(z), dtype=np.float32)

            self.last_epochs = len(history) if history is not None else 0
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            Z = np.asarray(model.get_latent_representation(a, give_mean=True))
            z_ctrl = _balanced_mean(Z[cond == CONTROL], ctx[cond == CONTROL])
            for r in todo:
                parts = [r.perturbation] if r.perturbation in trained else r.perturbation.split("+")
                delta = sum(_balanced_mean(Z[cond == p], ctx[cond == p]) - z_ctrl for p in parts)
                z = Z[np.asarray(r.controls, dtype=int)] + delta
                out[r.condition] = decode(z)
            predict_s = time.perf_counter() - t0
        self.last_resources = {
            "fit_s": fit_s,
            "predict_s": predict_s,
            "peak_mem_mb": m["peak_mem_mb"],
            "start_mem_mb": m["start_mem_mb"],
        }
        return out
