"""STATE (Arc Institute, ``arc-state`` 0.11.1) in its own venv, as a :class:`vcell.bench.Predictor`.

STATE's state-transition model maps a *set* of control cells of one context (cell type) to the perturbed set, with
a one-hot perturbation. Offline there are no pretrained cell embeddings, so it is trained on the expression itself
(log1p(CP10k) of the benchmark's genes). It can therefore answer context transfer (a perturbation trained in other
cell types, from the target type's controls) and nothing about a perturbation it never trained: unseen single
perturbations and unseen combinations ``A+B`` (a one-hot label of its own, even when ``A`` and ``B`` were trained)
get a reason string. See ``workers/state_worker.py`` for the training and inference commands.

Cost on this project's 2-core CPU (Kang 2018, ~1,700 training cells x 2,000 genes, one held-out cell type): the
fixed part is ~10 s for ``state tx train`` (interpreter, hydra, cell-load's set-up) and ~8 s for ``state tx
infer``; a training step of the small model below (4 sets of 32 cells) takes ~0.1 s with one thread. With torch's
default two threads on a machine shared with other jobs a step took ~1.5 s (threads spinning against the other
processes), which is why ``run_peers.py`` runs the worker with ``threads=1``. The benchmark run uses 200 steps
(``run_peers.BUDGETS``): 40-55 s per split. 400 steps improved Kang CD4T (Pearson delta 0.57 -> 0.62, energy distance
2.90 -> 1.70) at ~+17 s per split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._common import CONTROL, PERT_COL, SubprocessPeer, classify_request

if TYPE_CHECKING:
    from anndata import AnnData

    from vcell.bench import PredictionRequest


@dataclass
class State(SubprocessPeer):
    """STATE adapter.

    Parameters
    ----------
    name
        Label in the benchmark tables.
    max_steps, batch_size, lr
        ``state tx train`` training (``training.max_steps``, ``training.batch_size`` in cell sets, ``training.lr``).
    cell_set_len, hidden_dim, n_layers
        Size of STATE's set transformer (a small ``state_sm``: the default 672-wide, 4+4-layer model does not
        train in minutes on a CPU).
    timeout_s
        Wall-time limit of the worker.
    threads
        OpenMP/BLAS/torch threads of the worker and of ``state tx train``/``infer`` (``None``: torch's default).
    """

    name: str = "STATE"
    max_steps: int = 400
    batch_size: int = 8
    lr: float = 1e-4
    cell_set_len: int = 64
    hidden_dim: int = 128
    n_layers: int = 2

    def __post_init__(self) -> None:
        self.peer, self.worker = "state", "state_worker.py"
        self.options = {
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "cell_set_len": self.cell_set_len,
            "hidden_dim": self.hidden_dim,
            "n_layers": self.n_layers,
        }

    def triage(
        self, train: AnnData, requests: Sequence[PredictionRequest], covariate_keys: Sequence[str]
    ) -> dict[str, str]:
        """Refuse every perturbation without training cells of its own (one-hot encoding)."""
        trained = set(train.obs[PERT_COL].astype(str)) - {CONTROL}
        out = {}
        for r in requests:
            kind = classify_request(r.perturbation, trained)
            if kind != "seen":
                what = "combination" if kind == "combo" else "perturbation"
                out[r.condition] = (
                    f"STATE (one-hot perturbations, no pretrained gene embeddings offline) cannot predict the unseen "
                    f"{what} {r.perturbation!r}: it has no training cells"
                )
        return out
