"""GEARS (Roohani et al. 2023; ``cell-gears`` 0.1.2) in its own venv, as a :class:`vcell.bench.Predictor`.

GEARS predicts the expression of a control cell after perturbing one or two *genes*: a gene's perturbation
embedding is smoothed over a GO gene-gene graph, so GEARS can answer unseen single perturbations and combinations
(seen or unseen singles), for genes with a GO annotation. It has no cell-type (context) input, so it cannot do
cell-type transfer; for such requests (a perturbation trained in other contexts) the adapter returns a reason.

The gene -> GO-term map comes from ``gene2go``: by default the shared Bioconductor org.Hs.eg.db 3.16 annotation
(``shared/data/prior_knowledge/gene2go_human_orgHsEgDb_3.16.tsv.gz``), with :data:`SYMBOL_ALIASES` for targets
renamed by HGNC. For :func:`vcell.datasets.simulate` data, whose genes (``G0000``...) have no GO terms,
:func:`gene2go_from_simulation` builds the map from the simulation's program loadings (a gene's "terms" are the
programs it is loaded on, plus one term of its own so that every gene is a node). ``vcell.bench.run`` drops
``uns['vcell_simulation']`` (it holds the held-out outcomes) from the training AnnData it hands to models, so the
caller builds this map from the full simulated AnnData (the loadings are gene-level prior structure, like GO; no
outcome is read) and passes it as ``gene2go`` (``run_peers.py`` does). See ``workers/gears_worker.py`` for what is
GEARS' own code and what the worker does around it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._common import CONTROL, PERT_COL, SubprocessPeer, classify_request, contexts

if TYPE_CHECKING:
    from anndata import AnnData

    from vcell.bench import PredictionRequest

SHARED_GENE2GO = Path(__file__).resolve().parents[3] / "shared" / "data" / "prior_knowledge"
SHARED_GENE2GO = SHARED_GENE2GO / "gene2go_human_orgHsEgDb_3.16.tsv.gz"
#: old symbol -> symbol in org.Hs.eg.db 3.16 (Papalexi 2021 targets MARCH8, now MARCHF8)
SYMBOL_ALIASES = {"MARCH8": "MARCHF8"}


def gene2go_from_tsv(path: str | Path = SHARED_GENE2GO, aliases: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Gene symbol -> GO terms from a ``symbol, ..., go_id`` table; ``aliases`` old -> new symbol get the new terms."""
    import pandas as pd

    df = pd.read_csv(path, sep="\t", usecols=["symbol", "go_id"])
    g2g = {g: sorted(set(t)) for g, t in df.groupby("symbol")["go_id"]}
    for old, new in (SYMBOL_ALIASES if aliases is None else aliases).items():
        if new in g2g and old not in g2g:
            g2g[old] = g2g[new]
    return g2g


def gene2go_from_simulation(train: AnnData) -> dict[str, list[str]] | None:
    """Co-program membership of the genes of :func:`vcell.datasets.simulate` data, as GEARS' gene -> "GO terms".

    Each gene gets ``program<k>`` for every program loading it (``uns['vcell_simulation']['program_loadings']``)
    and a term of its own (``self:<gene>``). ``None`` if ``train`` is not simulated data.
    """
    sim = train.uns.get("vcell_simulation")
    if sim is None or "program_loadings" not in sim:
        return None
    W = np.asarray(sim["program_loadings"])
    if W.shape[1] != train.n_vars:
        return None
    return {
        str(g): [f"program{k}" for k in np.flatnonzero(W[:, j])] + [f"self:{g}"] for j, g in enumerate(train.var_names)
    }


@dataclass
class Gears(SubprocessPeer):
    """GEARS adapter.

    Parameters
    ----------
    name
        Label in the benchmark tables.
    epochs, batch_size, hidden_size, lr
        GEARS training (its defaults: 20 epochs, batch 32, hidden 64, lr 1e-3).
    max_cells_per_condition
        Subsample each training perturbation's cells to at most this many (``None``: all), to bound CPU time.
    gene2go
        Gene -> GO terms; ``None``: from the simulation's programs if the training AnnData still has them, else
        the shared GO table.
    timeout_s
        Wall-time limit of the worker.
    threads
        OpenMP/BLAS/torch threads of the worker (``None``: the libraries' default).
    """

    name: str = "GEARS"
    epochs: int = 20
    batch_size: int = 32
    hidden_size: int = 64
    lr: float = 1e-3
    k_go: int = 20
    max_cells_per_condition: int | None = None
    gene2go: dict[str, list[str]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.peer, self.worker = "gears", "gears_worker.py"
        self.options = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "hidden_size": self.hidden_size,
            "lr": self.lr,
            "k_go": self.k_go,
            "max_cells_per_condition": self.max_cells_per_condition,
            "gene2go": "gene2go.json",
        }
        self._g2g: dict[str, list[str]] | None = None

    def triage(
        self, train: AnnData, requests: Sequence[PredictionRequest], covariate_keys: Sequence[str]
    ) -> dict[str, str]:
        """Refuse context transfer (GEARS has no cell-type input); gene-graph membership is checked by the worker."""
        trained = set(train.obs[PERT_COL].astype(str)) - {CONTROL}
        n_ctx = len(set(contexts(train, covariate_keys)))
        out = {}
        for r in requests:
            if classify_request(r.perturbation, trained) == "seen":
                out[r.condition] = (
                    f"GEARS cannot do cell-type/context transfer: {r.perturbation!r} was trained in other contexts "
                    f"({n_ctx} in training) and GEARS has no cell-type or context input"
                )
        g2g = self.gene2go or gene2go_from_simulation(train)
        if g2g is None:
            g2g = gene2go_from_tsv()
        self._g2g = g2g
        return out

    def extra_inputs(self, workdir: Path, train: AnnData, requests: Sequence[PredictionRequest]) -> None:
        """Write ``gene2go.json`` for the worker: the genes the data and the requests name (keeps the file small)."""
        used = set(map(str, train.var_names))
        used |= {g for c in set(train.obs[PERT_COL].astype(str)) for g in c.split("+")}
        used |= {g for r in requests for g in r.perturbation.split("+")}
        g2g = self._g2g or {}
        (workdir / "gene2go.json").write_text(json.dumps({g: t for g, t in g2g.items() if g in used}))


__all__ = ["Gears", "gene2go_from_simulation", "gene2go_from_tsv"]
