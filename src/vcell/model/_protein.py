"""Protein counts beside RNA (CITE-seq): registration from a MuData and what every model reads of them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vcell._utils import get_matrix, log1p_cp10k, to_dense
from vcell.data._registry import VCELL_STATE_KEY, vcell_state
from vcell.module._causal_vae import MODALITIES

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

#: ``obsm`` key of the RNA modality holding the registered protein counts (``setup_anndata(protein_modality=)``)
PROTEIN_OBSM_KEY = "vcell_protein"


def protein_copy(mdata: MuData, protein_modality: str, rna_modality: str, layer: str | None) -> np.ndarray:
    """Dense float32 copy of the protein counts of ``mdata[protein_modality]`` in the RNA modality's cell order.

    KeyError for a missing modality/layer, ValueError when the cells differ or values are negative.
    """
    if protein_modality not in mdata.mod:
        msg = f"MuData has no {protein_modality!r} modality (protein_modality); modalities: {list(mdata.mod)}"
        raise KeyError(msg)
    rna, prot = mdata.mod[rna_modality], mdata.mod[protein_modality]
    if not rna.obs_names.equals(prot.obs_names):
        if set(rna.obs_names) == set(prot.obs_names) and prot.obs_names.is_unique:
            prot = prot[rna.obs_names]  # same cells, other order
        else:
            n_diff = len(set(rna.obs_names).symmetric_difference(set(prot.obs_names)))
            msg = (
                f"cells differ between modalities {rna_modality!r} ({rna.n_obs} cells) and {protein_modality!r} "
                f"({prot.n_obs} cells): {n_diff} obs_names are in only one of them; subset both to the same cells "
                "(proteins missing for some cells can be NaN rows)"
            )
            raise ValueError(msg)
    if layer is not None and layer not in prot.layers:
        msg = f"protein_layer {layer!r} is not a layer of mdata[{protein_modality!r}]; layers: {list(prot.layers)}"
        raise KeyError(msg)
    P = to_dense(get_matrix(prot, layer)).astype(np.float32, copy=True)
    finite = P[np.isfinite(P)]
    if finite.size and finite.min() < 0:
        msg = (
            f"mdata[{protein_modality!r}] ({'X' if layer is None else f'layer {layer!r}'}) holds negative values; "
            "protein counts were expected (CLR-normalised values are not counts: pass protein_layer=)"
        )
        raise ValueError(msg)
    return P


def protein_log1p(counts: np.ndarray) -> np.ndarray:
    """log1p(counts per 1e4 of each cell's protein library), float32; NaN rows for unmeasured cells.

    A cell is unmeasured when its row holds a NaN or sums to zero.
    """
    counts = np.asarray(counts, dtype=np.float32)
    measured = np.isfinite(counts).all(axis=1) & (np.nan_to_num(counts).sum(axis=1) > 0)
    out = np.full(counts.shape, np.nan, dtype=np.float32)
    if measured.any():
        out[measured] = log1p_cp10k(counts[measured])
    return out


def protein_info(mdata: MuData, protein_modality: str, protein_layer: str | None) -> tuple[np.ndarray, dict]:
    """The protein counts to register (RNA cell order) and the registry record of them (checks ``mdata``)."""
    if not hasattr(mdata, "mod"):
        msg = "protein_modality needs a MuData (with an 'rna' and a protein modality), got an AnnData"
        raise ValueError(msg)
    if "rna" not in mdata.mod:
        msg = f"MuData has no 'rna' modality; modalities: {list(mdata.mod)}"
        raise KeyError(msg)
    counts = protein_copy(mdata, str(protein_modality), "rna", protein_layer)
    info = {
        "modality": str(protein_modality),
        "layer": protein_layer,
        "obsm_key": PROTEIN_OBSM_KEY,
        "names": [str(n) for n in mdata.mod[protein_modality].var_names],
    }
    return counts, info


def record_protein(manager_registry: dict, info: dict) -> None:
    """Store the protein record ``info`` in the vcell state of an scvi-tools registry."""
    state = manager_registry.setdefault(VCELL_STATE_KEY, {"counts": True, "context_keys": []})
    state["protein"] = info


def registered_protein(registry: dict) -> dict:
    """The protein record of a model's registry (empty without proteins)."""
    return dict(vcell_state(registry).get("protein") or {})


class ProteinData:
    """Mixin of :class:`~vcell.model.PerturbationModel`: the registered protein counts of a model's cells.

    Reads ``protein_names_`` and ``protein_modality_`` (set in ``PerturbationModel.__init__``; empty / ``None``
    for an RNA-only model).
    """

    protein_names_: list[str]
    protein_modality_: str | None

    def _attach_protein(self, adata: AnnData | MuData | None) -> None:
        """Copy a MuData's protein counts into its RNA modality's ``obsm['vcell_protein']`` when absent."""
        if adata is None or not hasattr(adata, "mod") or not self.protein_names_ or "rna" not in adata.mod:
            return
        rna = adata.mod["rna"]
        if PROTEIN_OBSM_KEY in rna.obsm:
            return
        prot_mod = self.protein_modality_
        if prot_mod in adata.mod and list(map(str, adata.mod[prot_mod].var_names)) != self.protein_names_:
            msg = f"mdata[{prot_mod!r}] does not hold the model's proteins {self.protein_names_[:10]}"
            raise KeyError(msg)
        layer = registered_protein(self.registry_).get("layer")
        rna.obsm[PROTEIN_OBSM_KEY] = protein_copy(adata, prot_mod, "rna", layer)

    def _protein_rows(self, adata: AnnData, idx: np.ndarray | None = None) -> np.ndarray:
        """Registered protein counts of cells ``idx`` (all: ``None``), float32, NaN rows for unmeasured cells."""
        if PROTEIN_OBSM_KEY not in adata.obsm:
            msg = (
                f"adata.obsm[{PROTEIN_OBSM_KEY!r}] (protein counts) is missing: pass the MuData with its "
                f"{self.protein_modality_!r} modality, or register it with setup_anndata(protein_modality=)"
            )
            raise KeyError(msg)
        P = np.asarray(adata.obsm[PROTEIN_OBSM_KEY], dtype=np.float32)
        if P.shape[1] != len(self.protein_names_):
            msg = f"adata.obsm[{PROTEIN_OBSM_KEY!r}] has {P.shape[1]} columns, the model {len(self.protein_names_)} proteins"
            raise ValueError(msg)
        return P if idx is None else P[idx]

    def _protein_expression(self, adata: AnnData, idx: np.ndarray | None = None) -> np.ndarray:
        """Proteins of cells ``idx`` in log1p(counts per 1e4 of the protein library); NaN rows for unmeasured cells.

        The space of ``predict(modality="prot")``. A row of NaN or of zeros (no measurement) gives a NaN row.
        """
        return protein_log1p(self._protein_rows(adata, idx))

    def _cell_proteins(self, adata: AnnData, idx: np.ndarray | None = None) -> np.ndarray | None:
        """:meth:`_protein_expression` of cells ``idx`` for a model with proteins; ``None`` for an RNA-only model."""
        return self._protein_expression(adata, idx) if self.protein_names_ else None

    def _check_modality(self, modality: str) -> None:
        """ValueError unless ``modality`` is ``"rna"`` or, for a model with proteins, ``"prot"``."""
        if modality not in MODALITIES or (modality == "prot" and not self.protein_names_):
            msg = f"modality must be 'rna' or, for a model set up with protein_modality=, 'prot'; got {modality!r}" + (
                "" if self.protein_names_ else " (this model has no proteins)"
            )
            raise ValueError(msg)


#: ``obsm`` key of the sampled proteins in what a protein model's ``sample()`` returns
SAMPLED_PROTEIN_KEY = "protein"


def with_sampled_proteins(cells: AnnData, values: np.ndarray, names: list[str]) -> AnnData:
    """``cells`` (a model's ``sample()`` output) with ``obsm['protein']``: sampled proteins as a DataFrame.

    ``values`` (cells x proteins) are in log1p(counts per 1e4 of the protein library), the space of
    ``predict(modality="prot")``; columns are the model's protein names, the index the cells' ``obs_names``.
    """
    import pandas as pd

    values = np.asarray(values, dtype=np.float32)
    if values.shape != (cells.n_obs, len(names)):
        msg = f"sampled proteins have shape {values.shape}, expected ({cells.n_obs}, {len(names)})"
        raise ValueError(msg)
    cells.obsm[SAMPLED_PROTEIN_KEY] = pd.DataFrame(values, index=cells.obs_names.copy(), columns=list(names))
    return cells
