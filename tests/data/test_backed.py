"""setup_anndata on a backed AnnData (``anndata.read_h5ad(path, backed="r")``), sparse and dense X."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

import vcell
from vcell.data import vcell_state


def _backed(tmp_path, *, kind: str, n_cells: int = 160, log: bool = False) -> tuple[ad.AnnData, ad.AnnData]:
    """A small simulated screen in memory, and the same written to an h5ad and read back backed."""
    adata = vcell.datasets.simulate(n_cells=n_cells, n_genes=40, n_perturbations=4, n_combos=2, seed=0)
    if log:
        adata.X = vcell._utils.log1p_cp10k(adata.X)
    dense = vcell._utils.to_dense(adata.X)
    adata.X = {"csr": sparse.csr_matrix, "csc": sparse.csc_matrix, "dense": np.asarray}[kind](dense)
    path = tmp_path / f"{kind}.h5ad"
    adata.write_h5ad(path)
    return adata, ad.read_h5ad(path, backed="r")


@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.filterwarnings("ignore:Training will be faster when sparse matrix is formatted as CSR:UserWarning")
def test_setup_anndata_accepts_backed_data(tmp_path, kind, log):
    mem, backed = _backed(tmp_path, kind=kind, log=log)
    assert backed.isbacked
    kwargs = {"perturbation_key": "perturbation", "control": "control", "covariate_keys": ["cell_type"]}
    vcell.model.Baseline.setup_anndata(backed, **kwargs)
    vcell.model.Baseline.setup_anndata(mem, **kwargs)
    assert backed.isbacked  # the matrix stays on disk
    manager = vcell.model.Baseline._get_most_recent_anndata_manager(backed, required=True)
    assert vcell_state(manager.registry)["counts"] is (not log)
    assert manager.summary_stats["n_vars"] == mem.n_vars
    assert backed.obs["vcell_perturbation"].equals(mem.obs["vcell_perturbation"])


def test_setup_anndata_checks_every_backed_value(tmp_path):
    mem, _ = _backed(tmp_path, kind="csr")
    X = mem.X.toarray()
    X[-1, 3] = -1.0  # the last cell: found by the chunked check
    mem.X = sparse.csr_matrix(X)
    mem.write_h5ad(tmp_path / "bad.h5ad")
    backed = ad.read_h5ad(tmp_path / "bad.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"adata\.X contains negative values"):
        vcell.model.Baseline.setup_anndata(backed, perturbation_key="perturbation", control="control")
