"""AnnData plumbing shared by the models that encode perturbations: vocabulary, covariates, embeddings, graphs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vcell._constants import DOSE_COL, REGISTRY_KEYS
from vcell._settings import logger
from vcell._utils import check_obs_keys
from vcell.data._vocab import _components

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

    from vcell.data import Lookup


def label_codes_of(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, values)`` of per-cell labels: ``values[codes[i]]`` is cell ``i``'s label as text.

    A categorical Series is read through its codes (no string per cell); any other Series, and a categorical one
    with a missing value, is factorised as ``astype(str)`` writes it; an array or list as it is.
    """
    if isinstance(labels, pd.Series):
        if isinstance(labels.dtype, pd.CategoricalDtype):
            codes = labels.cat.codes.to_numpy()
            if not (codes.size and codes.min() < 0):
                return codes, np.asarray([str(c) for c in labels.cat.categories], dtype=object)
        labels = labels.astype(str).to_numpy()
    return pd.factorize(np.asarray(labels, dtype=object), use_na_sentinel=False)


def _edge_frame(spec: Any, what: str, weight: str, *, accepted: str, fmt: str) -> pd.DataFrame:
    """``source``, ``target`` (str) and ``weight`` (float64, default 1) columns of an edge table or dict of columns.

    Shared by the gene graph (``weight="importance"``) and the decoupler-format networks; ``accepted`` and ``fmt``
    word the errors.
    """
    if isinstance(spec, dict):
        spec = pd.DataFrame(spec)
    if not isinstance(spec, pd.DataFrame):
        msg = f"{what} must be None, {accepted}, got {type(spec).__name__}"
        raise ValueError(msg)
    missing = [c for c in ("source", "target") if c not in spec.columns]
    if missing:
        msg = f"{what} lacks column(s) {missing}; expected {fmt}: source, target, {weight}"
        raise KeyError(msg)
    return pd.DataFrame(
        {
            "source": spec["source"].astype(str).to_numpy(),
            "target": spec["target"].astype(str).to_numpy(),
            weight: spec[weight].to_numpy(dtype=np.float64) if weight in spec else 1.0,
        }
    )


def _as_anndata(data: AnnData | MuData | None, modality: str = "rna") -> AnnData | None:
    """The AnnData a model reads: ``data`` itself, or its ``modality`` when ``data`` is a MuData."""
    if data is None or not hasattr(data, "mod"):
        return data
    if modality not in data.mod:
        msg = f"MuData has no {modality!r} modality; modalities: {list(data.mod)}"
        raise KeyError(msg)
    return data.mod[modality]


def _from_uns(adata: AnnData | None, spec: Any, what: str) -> Any:
    """``adata.uns[spec]`` when ``spec`` is a string (KeyError naming ``what`` if absent), else ``spec`` itself."""
    if not isinstance(spec, str):
        return spec
    if adata is None or spec not in adata.uns:
        msg = f"{what} {spec!r} is not a key of adata.uns"
        raise KeyError(msg)
    return adata.uns[spec]


class PerturbationInputs:
    """Mixin of the models that encode perturbations like CausalVAE (CausalVAE, FlowMatching, CellJEPA).

    Registry conditions and covariate categories, covariate codes, perturbation embedding tables, gene graphs and
    their arrays, encodings of query conditions (through the model's ``_encode_query``), the initial log-dose, the
    training/validation split and batching helpers. The methods read the attributes the model sets in ``__init__``
    (``registry_``, ``vocab``, ``atoms_``, ``_graph_nodes``, ``_categories``, ``covariate_names_``, ``is_trained_``).
    """

    def _conditions(self) -> list[str]:
        mapping = self.registry_["field_registries"][REGISTRY_KEYS.PERT_KEY]["state_registry"]["categorical_mapping"]
        return [str(c) for c in mapping]

    def _covariate_categories(self) -> tuple[list[str], list[list[str]]]:
        """Names and categories of the covariates the module embeds (covariate keys, then the batch key)."""
        fields = self.registry_["field_registries"]
        state = fields[REGISTRY_KEYS.COVARIATES_KEY]["state_registry"]
        names = [str(k) for k in state.get("field_keys", [])]
        cats = [[str(c) for c in state["mappings"][k]] for k in names]
        batch_key = self.registry_["setup_args"].get("batch_key")
        if batch_key is not None:
            names.append(str(batch_key))
            cats.append([str(c) for c in fields[REGISTRY_KEYS.BATCH_KEY]["state_registry"]["categorical_mapping"]])
        return names, cats

    def _covariate_codes(self, adata: AnnData, idx: np.ndarray) -> np.ndarray:
        check_obs_keys(adata, self.covariate_names_, what="covariate key")
        out = np.zeros((len(idx), len(self.covariate_names_)), dtype=np.int64)
        for k, (name, cats) in enumerate(zip(self.covariate_names_, self._categories, strict=True)):
            values = adata.obs[name].astype(str).to_numpy()[idx]
            codes = pd.Index(cats).get_indexer(values)
            if (codes < 0).any():
                bad = sorted(set(values[codes < 0]))[:5]
                msg = f"obs[{name!r}] has values the model never saw: {bad}; known: {cats[:10]}"
                raise KeyError(msg)
            out[:, k] = codes
        return out

    def _covariate_lookup(self, adata: AnnData) -> Lookup:
        """:meth:`_covariate_codes` of every cell as a :class:`vcell.data.Lookup` of the distinct rows of codes.

        The same rows (int64) as ``_covariate_codes(adata, np.arange(adata.n_obs))``, held as the distinct
        combinations and a code per cell (one byte per cell for up to 128 combinations instead of 8 bytes per
        covariate).
        """
        import torch

        from vcell.data import Lookup

        codes = self._covariate_codes(adata, np.arange(adata.n_obs))
        if not codes.shape[1]:  # no covariates: one empty row shared by every cell
            return Lookup(torch.as_tensor(np.zeros((1, 0), dtype=np.int64)), np.zeros(adata.n_obs, dtype=np.int8))
        table, inverse = np.unique(codes, axis=0, return_inverse=True)
        return Lookup(torch.as_tensor(table), inverse.reshape(-1))

    def _condition_lookup(self, labels: Any, doses: np.ndarray | float) -> Lookup:
        """Encodings of every cell's (label, dose) as a :class:`vcell.data.Lookup` of the distinct ones.

        The same values as ``_encode(labels, doses)`` row for row, held as the distinct rows and a code per cell
        (a dense cells x perturbations matrix grows with both: 1M cells x 100 perturbations is 0.4 GB). ``labels``:
        one per cell, an array or a categorical Series (then read through its codes, no string per cell).
        """
        import torch

        from vcell.data import Lookup

        label_codes, label_values = label_codes_of(labels)
        doses = np.broadcast_to(np.asarray(doses, dtype=np.float32), (len(label_codes),))
        dose_codes, dose_values = pd.factorize(doses, use_na_sentinel=False)
        pair = label_codes.astype(np.int64) * len(dose_values) + dose_codes
        distinct, codes = np.unique(pair, return_inverse=True)
        del pair, dose_codes
        table = self._encode(
            np.asarray(label_values, dtype=object)[distinct // len(dose_values)],
            np.asarray(dose_values, dtype=np.float32)[distinct % len(dose_values)],
        )
        return Lookup(torch.as_tensor(table), codes.reshape(-1))

    def _embedding_table(self, adata: AnnData | None, spec: str | pd.DataFrame | None) -> pd.DataFrame | None:
        if spec is None:
            return None
        spec = _from_uns(adata, spec, "perturbation_embedding")
        if not isinstance(spec, pd.DataFrame):
            msg = f"perturbation_embedding must be None, a DataFrame or a key of adata.uns, got {type(spec).__name__}"
            raise ValueError(msg)
        table = spec.copy()
        table.index = table.index.astype(str)
        if table.index.has_duplicates:
            msg = f"perturbation_embedding has duplicated rows: {table.index[table.index.duplicated()][:5].tolist()}"
            raise ValueError(msg)
        missing = [a for a in self.vocab.atoms if a not in table.index]
        if missing:
            msg = f"perturbation_embedding has no row for training perturbation(s) {missing[:10]}"
            raise KeyError(msg)
        values = table.to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            msg = "perturbation_embedding holds NaN or infinite values"
            raise ValueError(msg)
        return table.astype(np.float32)

    def _gene_graph(self, adata: AnnData | None, spec: str | pd.DataFrame | None) -> pd.DataFrame | None:
        """The validated gene graph (``source``, ``target``, ``importance``; names as str, weights float64)."""
        self._graph_nodes: pd.Index | None = None
        if spec is None:
            return None
        graph = _edge_frame(
            _from_uns(adata, spec, "gene_graph"),
            "gene_graph",
            "importance",
            accepted="a DataFrame or a key of adata.uns",
            fmt="GEARS' format",
        )
        w = graph["importance"].to_numpy()
        if not np.isfinite(w).all() or (w < 0).any():
            msg = "gene_graph importance values must be finite and >= 0"
            raise ValueError(msg)
        names = pd.unique(np.r_[graph["source"].to_numpy(), graph["target"].to_numpy()])  # hashing: fast on 400k edges
        self._graph_nodes = pd.Index(np.sort(names.astype(str)))
        return graph

    def _graph_arrays(self, graph: pd.DataFrame, graph_layers: int, own_embedding: bool) -> dict[str, Any]:
        """The module's gene-graph arguments: integer edges and each atom's node (``-1``: an isolated node)."""
        nodes = self._graph_nodes
        atom_nodes = nodes.get_indexer(self.atoms_).astype(np.int64)
        absent = [a for a, i in zip(self.atoms_, atom_nodes, strict=True) if i < 0]
        if absent and len(absent) == len(self.atoms_):
            msg = (
                f"none of the training perturbations is a node of the gene_graph (e.g. {absent[:5]}; nodes e.g. "
                f"{nodes[:5].tolist()}); name the graph's nodes by perturbation label"
            )
            raise KeyError(msg)
        if absent:
            logger.warning(
                "gene_graph: %d training perturbation(s) are not graph nodes and get free operators (as one-hot): %s",
                len(absent),
                absent[:10],
            )
        edges = (
            nodes.get_indexer(graph["source"]).astype(np.int64),
            nodes.get_indexer(graph["target"]).astype(np.int64),
            graph["importance"].to_numpy(dtype=np.float64),
        )
        return {
            "gene_graph": edges,
            "atom_nodes": atom_nodes,
            "n_graph_nodes": len(nodes),
            "graph_layers": graph_layers,
            "graph_own_embedding": bool(own_embedding),
        }

    def _genes(self) -> list[str]:
        """The model's genes (from the registry when the model was loaded without data)."""
        if hasattr(self, "var_names_"):
            return list(self.var_names_)
        state = self.registry_["field_registries"][REGISTRY_KEYS.X_KEY]["state_registry"]
        return [str(g) for g in state["column_names"]]

    def _encode(self, labels: Sequence[str], doses: np.ndarray | float) -> np.ndarray:
        """Dose-scaled multi-hot encoding over the module's atoms; a clear KeyError for unknown perturbations."""
        out, nodes = self._encode_query(labels, doses)
        if nodes.size:  # gene-graph nodes unseen in training are encoded by _encode_query, for predictions only
            names = self._graph_nodes[nodes].tolist()
            msg = f"perturbation(s) {names} were never seen in training; they can be predicted but not trained on"
            raise KeyError(msg)
        return out

    def _log_dose_init(self, adata: AnnData | None) -> float:
        if adata is None or DOSE_COL not in adata.obs:
            return 0.0
        doses = adata.obs[DOSE_COL].to_numpy(dtype=float)
        doses = np.unique(doses[np.isfinite(doses) & (doses > 0)])
        if doses.size == 0:
            return 0.0
        if doses.size == 1:  # one dose: start near saturation
            return float(np.log(doses[0]) - 2.0)
        return float(np.median(np.log(doses)))

    def _split(self, adata: AnnData, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Training and validation cells, never ``obs['vcell_split'] == 'test'`` ones.

        ``obs['vcell_split']``'s ``train``/``val`` cells when it has ``val`` cells, else a seeded
        ``validation_fraction`` of the non-test cells for validation (none below 20 cells) and the rest for training.
        """
        if "vcell_split" in adata.obs and (adata.obs["vcell_split"] == "val").any():
            split = adata.obs["vcell_split"].astype(str).to_numpy()
            return np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
        idx = self._non_test_cells(adata)
        if not len(idx):
            msg = "no cells to train on: every cell has obs['vcell_split'] == 'test'"
            raise ValueError(msg)
        order = np.random.default_rng(seed).permutation(idx)
        n_val = int(round(validation_fraction * len(idx))) if len(idx) >= 20 else 0
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    def _chunks(self, idx: np.ndarray, batch_size: int):
        for start in range(0, len(idx), batch_size):
            yield idx[start : start + batch_size]

    def _encode_query(self, labels: Sequence[str], doses: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Dose-scaled multi-hot encoding and the graph nodes of its extra columns; KeyError for unknown labels.

        Columns: the module's atoms, then (gene graph only) one per graph node never seen in training that the
        labels use; the second array holds those nodes' indices (empty without them).
        """
        # each distinct label parsed once (a training set of 1M cells has a few hundred), then expanded per cell
        codes, distinct = pd.factorize(np.asarray([str(x) for x in labels], dtype=object), sort=False)
        distinct = [str(x) for x in distinct]
        unknown = sorted({a for lab in distinct for a in _components(lab) if a not in self._atom_index})
        graph = self._graph_nodes
        extra = [a for a in unknown if graph is not None and a in graph]
        unknown = [a for a in unknown if graph is None or a not in graph]
        if unknown:
            if graph is not None:
                msg = f"perturbation(s) {unknown} were never seen in training and are not nodes of the gene_graph"
                raise KeyError(msg)
            if len(self.atoms_) == self.vocab.n_atoms:
                self.vocab.check(
                    unknown,
                    what=f"{type(self).__name__} (one-hot perturbation encoder; pass perturbation_embedding= or gene_graph=)",
                )
            msg = f"perturbation(s) {unknown} were never seen in training and have no row in the perturbation_embedding"
            raise KeyError(msg)
        column = {**self._atom_index, **{a: len(self.atoms_) + i for i, a in enumerate(extra)}}
        table = np.zeros((len(distinct), len(column)), dtype=np.float32)
        for i, lab in enumerate(distinct):
            for a in _components(lab):
                table[i, column[a]] = 1.0
        out = table[codes] if len(codes) else np.zeros((0, len(column)), dtype=np.float32)
        out *= np.broadcast_to(np.asarray(doses, dtype=np.float32), (len(codes),))[:, None]
        nodes = graph.get_indexer(extra).astype(np.int64) if extra else np.zeros(0, dtype=np.int64)
        return out, nodes
