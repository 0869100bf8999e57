"""GEARS worker (runs in ``.venvs/gears``): train GEARS on the training cells, predict each requested control cell.

Usage: ``python gears_worker.py WORKDIR`` (files described in ``benchmarks/peers/_common.py``). Options
(``requests.json``): ``epochs``, ``batch_size``, ``hidden_size``, ``lr``, ``k_go`` (neighbours per gene in the GO
graph), ``max_cells_per_condition`` (subsample each training condition's cells, controls to 4x that, ``null`` = all) and ``gene2go``
(file name in WORKDIR of a JSON ``{gene: [terms]}``; GEARS' ``gene2go_all.pkl`` is written from it, so GEARS does
not download anything).

What is GEARS' own and what is not:

* data processing (``PertData.new_data_process``: DE genes, control pairing, cell graphs), the co-expression graph,
  the model (``GEARS.model_initialize``) and its training loop (``GEARS.train``, best epoch on validation
  conditions' top-20 DE MSE) are GEARS' code, unchanged;
* the split is set directly (``set2conditions``: the split's train conditions plus ``ctrl``, and its val
  conditions; no test set), instead of one of GEARS' own split recipes;
* the GO graph is computed here with GEARS' recipe for a custom gene set (``make_GO``: Jaccard index of GO terms
  between perturbable genes, edges > 0.1, the ``k_go + 1`` strongest per target gene) from the given ``gene2go``,
  and passed as ``G_go`` (GEARS' ``make_GO`` would start a 25-process pool and cache under ``./data``);
* prediction: ``GEARS.predict`` averages 300 random control cells; here each requested control cell is passed
  through GEARS' best model with the perturbation's graph (``create_cell_graph_for_prediction``), one row per cell.
"""

from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pandas as pd
from scipy import sparse
from worker_io import Job, seed_everything


def gears_condition(label: str) -> str:
    """vcell's canonical label -> GEARS' (``'ctrl'``, ``'A+ctrl'``, ``'A+B'``)."""
    if label == "control":
        return "ctrl"
    parts = label.split("+")
    return f"{parts[0]}+ctrl" if len(parts) == 1 else "+".join(parts)


def go_edges(gene2go: dict[str, list[str]], genes: list[str], k: int) -> pd.DataFrame:
    """GEARS' custom GO graph: Jaccard of GO term sets, > 0.1, the k+1 strongest incoming edges per target."""
    terms = sorted({t for g in genes for t in gene2go[g]})
    tix = {t: i for i, t in enumerate(terms)}
    rows = [i for i, g in enumerate(genes) for _ in gene2go[g]]
    cols = [tix[t] for g in genes for t in gene2go[g]]
    M = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(genes), len(terms)))
    M.data[:] = 1.0
    inter = (M @ M.T).toarray()
    size = np.asarray(M.sum(1)).ravel()
    jac = inter / (size[:, None] + size[None, :] - inter)
    out = []
    for j in range(len(genes)):  # j = target
        col = jac[:, j]
        keep = np.flatnonzero(col > 0.1)
        keep = keep[np.argsort(-col[keep], kind="stable")][: k + 1]
        out.extend((genes[i], genes[j], float(col[i])) for i in keep)
    return pd.DataFrame(out, columns=["source", "target", "importance"])


def main(workdir: str) -> None:
    import anndata as ad
    import torch
    from torch_geometric.loader import DataLoader

    job = Job(workdir)
    opt = {
        "epochs": 20,
        "batch_size": 32,
        "hidden_size": 64,
        "lr": 1e-3,
        "k_go": 20,
        "max_cells_per_condition": None,
        "gene2go": "gene2go.json",
    } | job.options
    from gears import GEARS, PertData
    from gears.utils import GeneSimNetwork, create_cell_graph_for_prediction

    seed_everything(job.seed)  # after importing gears, which calls torch.manual_seed(0)

    gene2go = json.loads(job.path(opt["gene2go"]).read_text())
    data_path = job.path("gears_data")
    data_path.mkdir(exist_ok=True)
    for name in ("gene2go_all.pkl", "gene2go.pkl"):  # GEARS looks for these before downloading
        with (data_path / name).open("wb") as fh:
            pickle.dump(gene2go, fh)

    tr = job.train
    cond = tr.obs["condition"].astype(str).to_numpy()
    genes = list(tr.var_names.astype(str))
    # GEARS' perturbable genes with default_pert_graph=False: expressed genes + perturbed genes, if in gene2go
    # (the requests name the held-out perturbations: their genes join the graph, as in GEARS' own processing)
    pert_genes = {g for c in set(cond) - {"control"} for g in c.split("+")}
    pert_genes |= {g for r in job.requests for g in r["perturbation"].split("+")}
    pert_names = sorted(g for g in set(genes) | pert_genes if g in gene2go)
    in_graph = set(pert_names)
    usable = np.array([c == "control" or all(g in in_graph for g in c.split("+")) for c in cond])
    dropped = sorted(set(cond[~usable]))
    if dropped:
        print(f"GEARS: {len(dropped)} training conditions not in the GO graph, left out: {dropped}", file=sys.stderr)
    rng = np.random.default_rng(job.seed)
    keep = usable.copy()
    if opt["max_cells_per_condition"]:
        cap = int(opt["max_cells_per_condition"])
        for c in set(cond[usable]):
            idx = np.flatnonzero(cond == c)
            limit = 4 * cap if c == "control" else cap  # keep a larger pool of control cells for pairing
            if idx.size > limit:
                keep[rng.choice(idx, idx.size - limit, replace=False)] = False
    g_obs = pd.DataFrame(
        {"condition": [gears_condition(c) for c in cond[keep]], "cell_type": "all"}, index=tr.obs_names[keep]
    )
    X = sparse.csr_matrix(tr.X[keep], dtype=np.float32)
    gad = ad.AnnData(X=X, obs=g_obs, var=pd.DataFrame({"gene_name": genes}, index=genes))

    # GEARS' perturbable genes are read from gene_set_path (else only the expressed and trained genes would be)
    with (data_path / "pert_genes.pkl").open("wb") as fh:
        pickle.dump(sorted(set(genes) | pert_genes), fh)
    pert_data = PertData(str(data_path), gene_set_path=str(data_path / "pert_genes.pkl"), default_pert_graph=False)
    pert_data.new_data_process(dataset_name="vcell", adata=gad)
    split = tr.obs["split"].astype(str).to_numpy()[keep]
    conds = g_obs["condition"].to_numpy()
    val = sorted(set(conds[split == "val"]) - {"ctrl"})
    train_c = sorted(set(conds[split != "val"]) - set(val))
    if not val:  # GEARS needs validation conditions to pick its best epoch
        cand = sorted(set(train_c) - {"ctrl"})
        val = sorted(rng.choice(cand, max(1, len(cand) // 10), replace=False).tolist())
        train_c = [c for c in train_c if c not in val]
    pert_data.split, pert_data.seed, pert_data.train_gene_set_size = "no_test", job.seed, 0.75
    pert_data.subgroup = None
    pert_data.set2conditions = {"train": train_c, "val": val}
    pert_data.get_dataloader(batch_size=opt["batch_size"], test_batch_size=opt["batch_size"])
    print(f"GEARS: {len(train_c)} train / {len(val)} val conditions, {len(pert_data.pert_names)} genes in the GO graph")

    # GEARS() averages adata.X over controls and fails on a sparse matrix: densify for construction only
    pert_data.adata.X = pert_data.adata.X.toarray()
    model = GEARS(pert_data, device="cpu")
    pert_data.adata.X = sparse.csr_matrix(pert_data.adata.X)
    model.adata = pert_data.adata
    pert_list = list(pert_data.pert_names)
    edges = go_edges(gene2go, pert_list, int(opt["k_go"]))
    net = GeneSimNetwork(edges, pert_list, node_map=pert_data.node_map_pert)
    model.model_initialize(hidden_size=int(opt["hidden_size"]), G_go=net.edge_index, G_go_weight=net.edge_weight)
    model.train(epochs=int(opt["epochs"]), lr=float(opt["lr"]))
    job.fitted()

    best = model.best_model.eval()
    Xall = tr.X.toarray() if sparse.issparse(tr.X) else np.asarray(tr.X)
    node = {g: i for i, g in enumerate(pert_list)}
    for i, req in enumerate(job.requests):
        parts = req["perturbation"].split("+")
        missing = [g for g in parts if g not in node]
        if missing:
            job.refuse(
                i,
                f"GEARS cannot predict {req['perturbation']!r}: {missing} not in its GO gene graph "
                "(no GO annotation for the gene)",
            )
            continue
        idx = [node[g] for g in parts]
        graphs = [create_cell_graph_for_prediction(x[None, :], idx, parts) for x in Xall[req["controls"]]]
        out = []
        with torch.no_grad():
            for batch in DataLoader(graphs, batch_size=256, shuffle=False):
                out.append(best(batch).cpu().numpy())
        job.predict(i, np.concatenate(out, axis=0))
    job.save()


if __name__ == "__main__":
    main(sys.argv[1])
