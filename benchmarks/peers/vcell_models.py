"""vcell's own learned models in the peers' run, scored exactly like the peers and the baselines.

A learned vcell model is a :class:`vcell.bench.ModelSpec`; :class:`VcellModel` runs it inside the peers' run with
two differences from a plain ``ModelSpec`` in ``vcell.bench.run``:

* the model is registered on the raw counts (``X``), not on the benchmark's ``log1p_cp10k`` layer: count
  likelihoods (CausalVAE's default negative binomial) need counts, and refuse a log-normalised matrix;
* its log1p(CP10k) predictions are put on the benchmark layer's normalisation. On Kang the benchmark layer is
  log1p(CP10k) with each cell's library size over *all* genes, restricted to 2,000 HVGs afterwards, while a model
  on the HVG counts normalises by the library size over the HVGs. Each predicted row starts from one control cell,
  so it is rescaled by that cell's ratio ``r = library over the model's genes / library of the benchmark layer``:
  ``log1p(expm1(y) * r)`` (exact for log1p(CP10k); ``r = 1`` when the model sees every gene, as on Papalexi and the
  simulation).

A model with one-hot perturbations (no ``perturbation_embedding`` in its ``init_kwargs``) cannot predict a
perturbation none of whose training cells it saw; such requests get a reason before training, and a split with
nothing left to answer (Papalexi's unseen knock-outs) trains nothing. A model that fails while training returns
the error as its reason for every request (recorded as a refusal by ``bench.run(on_error="skip")``) instead of
stopping the whole run.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

    from vcell.bench import PredictionRequest

#: obs column with each cell's library size behind the benchmark's log1p(CP10k) layer (set by ``run_peers.py``)
LIBRARY_KEY = "peers_library_size"


def rescale_log1p_cp10k(Y: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """Re-normalise log1p(CP10k) rows: ``log1p(expm1(Y) * ratio[:, None])`` (``ratio``: old / new library size).

    Examples
    --------
    >>> import numpy as np
    >>> counts = np.array([[10.0, 30.0]])  # 40 counts on these genes, 80 over all genes
    >>> y_genes = np.log1p(counts / 40 * 1e4)
    >>> np.allclose(rescale_log1p_cp10k(y_genes, np.array([40 / 80])), np.log1p(counts / 80 * 1e4))
    True
    """
    Y = np.asarray(Y, dtype=np.float64)
    ratio = np.asarray(ratio, dtype=np.float64).reshape(-1, 1)
    return np.log1p(np.expm1(np.clip(Y, 0.0, None)) * ratio).astype(np.float32)


@dataclass
class VcellModel:
    """A vcell model (a :class:`vcell.bench.ModelSpec`) on the counts, answering in the benchmark's normalisation.

    Parameters
    ----------
    spec
        The model, its ``init_kwargs`` and ``train_kwargs``.
    model_layer
        Layer the model is registered on (``None``: ``X``, the raw counts in the peers' tasks).
    library_key
        obs column of the library size behind the benchmark layer; if missing, predictions are not rescaled.
    """

    spec: Any
    model_layer: str | None = None
    library_key: str = LIBRARY_KEY
    name: str = ""
    last_resources: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.name = self.name or self.spec.name

    def triage(self, train: AnnData, requests: Sequence[PredictionRequest]) -> dict[str, str]:
        """Reasons for the requests a one-hot model cannot answer: a component without training cells."""
        if self.spec.init_kwargs.get("perturbation_embedding") is not None:
            return {}
        from vcell._constants import CONTROL, PERT_COL

        trained = {p for c in set(train.obs[PERT_COL].astype(str)) - {CONTROL} for p in c.split("+")}
        out = {}
        for r in requests:
            missing = [p for p in r.perturbation.split("+") if p not in trained]
            if missing:
                out[r.condition] = (
                    f"{self.name} (one-hot perturbations: no perturbation_embedding given) cannot predict "
                    f"{r.perturbation!r}: no training cell carries {missing}"
                )
        return out

    def fit_predict(
        self,
        train: AnnData,
        requests: list[PredictionRequest],
        *,
        seed: int,
        covariate_keys: Sequence[str],
        layer: str | None,
    ) -> dict[str, np.ndarray | str]:
        """Train on the counts of the training cells, predict, rescale to the benchmark layer's library sizes."""
        from vcell._utils import get_matrix, is_count_matrix

        self.last_resources = {}
        refused = self.triage(train, requests)
        todo = [r for r in requests if r.condition not in refused]
        if not todo:
            return refused
        M = get_matrix(train, self.model_layer)
        try:
            out = self.spec.fit_predict(train, todo, seed=seed, covariate_keys=covariate_keys, layer=self.model_layer)
        except Exception as err:  # noqa: BLE001 (one failing model must not end the benchmark run)
            traceback.print_exc(file=sys.stderr)
            msg = f"{self.name} failed: {type(err).__name__}: {err}"
            return refused | {r.condition: msg for r in todo}
        out = refused | out
        self.last_resources = dict(getattr(self.spec, "last_resources", {}) or {})
        if self.library_key not in train.obs or not is_count_matrix(M):
            return out
        lib_model = np.asarray(M.sum(axis=1)).ravel()
        lib_bench = train.obs[self.library_key].to_numpy(dtype=np.float64)
        for r in todo:
            Y = out.get(r.condition)
            if isinstance(Y, np.ndarray):
                c = np.asarray(r.controls, dtype=int)
                out[r.condition] = rescale_log1p_cp10k(Y, lib_model[c] / np.maximum(lib_bench[c], 1e-12))
        return out


#: CausalVAE's training settings per task beyond its defaults (the same as ``benchmarks/causal_vae_combos.py``:
#: on the simulated combos early stopping fires before the singles' strong effects are learned)
CAUSAL_VAE_TASK_KWARGS = {"combos": {"max_epochs": 300, "lr": 3e-3, "early_stopping": False}}


def causal_vae(quick: bool = False, task: str = "") -> Any:
    """``vcell.model.CausalVAE`` with its defaults, at most 200 epochs (2 with ``quick``), no progress bar.

    ``task`` picks the per-task settings of :data:`CAUSAL_VAE_TASK_KWARGS` (ignored with ``quick``).
    """
    import vcell

    train_kwargs = {"max_epochs": 2 if quick else 200, "trainer_kwargs": {"enable_progress_bar": False}}
    if not quick:
        train_kwargs.update(CAUSAL_VAE_TASK_KWARGS.get(task, {}))
    return VcellModel(vcell.bench.ModelSpec("CausalVAE", vcell.model.CausalVAE, {}, train_kwargs))


#: vcell models that ``run_peers.py --models`` can add: name -> factory(quick)
MODELS = {"CausalVAE": causal_vae}

__all__ = ["LIBRARY_KEY", "MODELS", "VcellModel", "causal_vae", "rescale_log1p_cp10k"]
