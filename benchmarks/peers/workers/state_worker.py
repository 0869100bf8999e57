"""STATE worker (runs in ``.venvs/state``): ``state tx train`` then ``state tx infer`` on the training cells.

Usage: ``python state_worker.py WORKDIR`` (files described in ``benchmarks/peers/_common.py``). Options: ``max_steps``,
``batch_size``, ``cell_set_len``, ``hidden_dim``, ``n_layers``, ``lr``, ``model`` (a STATE model config name).

STATE's state-transition model is trained offline (``use_wandb=false``) on the expression itself (``embed_key``
null, ``output_space=all``: no pretrained cell embeddings are available offline), with one-hot perturbations.
Training data: the split's train+val cells in one h5 file, context = cell type (``obs['context']``); no validation
set (STATE splits validation by perturbation per cell type, which would remove the only perturbation from a cell
type in cell-type transfer), so the final checkpoint is used.

Prediction uses ``state tx infer`` (STATE's "virtual experiment"): for each request, the requested control cells
(label ``control``) and as many copies labelled with the perturbation, grouped per request; STATE pairs each copy
with a control cell drawn at random from that group (``--seed``), so the rows are STATE's predicted perturbed
population from exactly the requested controls (not a row-by-row counterfactual). STATE clips gene-space outputs to
[0, 14]. A perturbation absent from STATE's one-hot map would silently fall back to the control one-hot, so the
adapter refuses unseen perturbations before calling the worker.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from worker_io import Job

STATE_BIN = Path(sys.executable).parent / "state"


def main(workdir: str) -> None:
    import anndata as ad
    from scipy import sparse

    job = Job(workdir)
    opt = {
        "max_steps": 400,
        "batch_size": 8,
        "cell_set_len": 64,
        "hidden_dim": 128,
        "n_layers": 2,
        "lr": 1e-4,
        "model": "state_sm",
    } | job.options
    tr = job.train
    X = tr.X.toarray() if sparse.issparse(tr.X) else np.asarray(tr.X)
    data_dir = job.path("state_data")
    data_dir.mkdir(exist_ok=True)
    obs = pd.DataFrame(
        {
            "pert": tr.obs["condition"].astype(str).to_numpy(),
            "context": tr.obs["context"].astype(str).to_numpy(),
            "batch": "b0",
        },
        index=tr.obs_names,
    )
    genes = [str(g) for g in tr.var_names]
    var = pd.DataFrame({"gene_name": genes}, index=pd.Index(genes))  # cell-load reads var/gene_name
    ad.AnnData(X=X.astype(np.float32), obs=obs, var=var).write_h5ad(data_dir / "train.h5")
    toml = job.path("experiment.toml")
    toml.write_text(f'[datasets]\nvcell = "{data_dir}"\n\n[training]\nvcell = "train"\n')
    run_dir = job.path("state_run")
    steps = int(opt["max_steps"])
    h, L = int(opt["hidden_dim"]), int(opt["n_layers"])
    cmd = [
        str(STATE_BIN),
        "tx",
        "train",
        f"model={opt['model']}",
        f"data.kwargs.toml_config_path={toml}",
        "data.kwargs.embed_key=null",
        "data.kwargs.output_space=all",
        "data.kwargs.pert_col=pert",
        "data.kwargs.cell_type_key=context",
        "data.kwargs.batch_col=batch",
        "data.kwargs.control_pert=control",
        "data.kwargs.num_workers=0",
        "data.kwargs.pin_memory=false",
        f"training.max_steps={steps}",
        f"training.batch_size={int(opt['batch_size'])}",
        f"training.lr={float(opt['lr'])}",
        f"training.train_seed={job.seed}",
        f"training.val_freq={steps + 1}",
        f"training.ckpt_every_n_steps={steps + 1}",
        f"model.kwargs.cell_set_len={int(opt['cell_set_len'])}",
        f"model.kwargs.hidden_dim={h}",
        f"model.kwargs.n_encoder_layers={L}",
        f"model.kwargs.n_decoder_layers={L}",
        f"model.kwargs.transformer_backbone_kwargs.hidden_size={h}",
        f"model.kwargs.transformer_backbone_kwargs.intermediate_size={4 * h}",
        f"model.kwargs.transformer_backbone_kwargs.num_hidden_layers={L}",
        "model.kwargs.transformer_backbone_kwargs.num_attention_heads=4",
        "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=4",
        f"model.kwargs.transformer_backbone_kwargs.head_dim={h // 4}",
        "model.device=cpu",
        "training.devices=1",
        "use_wandb=false",
        f"output_dir={job.workdir}",
        "name=state_run",
        "overwrite=true",
    ]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=job.workdir)
    job.fitted()

    # one virtual experiment for all requests: per request, its controls and as many perturbed copies
    blocks, where = [], {}
    n = 0
    for i, req in enumerate(job.requests):
        ctrl = np.asarray(req["controls"], dtype=int)
        k = ctrl.size
        o = pd.DataFrame(
            {
                "pert": ["control"] * k + [req["perturbation"]] * k,
                "group": f"r{i}",
                "batch": "b0",
            },
            index=[f"r{i}_c{j}" for j in range(k)] + [f"r{i}_p{j}" for j in range(k)],
        )
        blocks.append(ad.AnnData(X=np.vstack([X[ctrl], X[ctrl]]).astype(np.float32), obs=o))
        where[i] = (n + k, n + 2 * k)
        n += 2 * k
    inp = ad.concat(blocks)
    inp.var_names = tr.var_names
    inp.write_h5ad(job.path("infer_in.h5ad"))
    out_path = job.path("infer_out.h5ad")
    cmd = [
        str(STATE_BIN),
        "tx",
        "infer",
        "--model-dir",
        str(run_dir),
        "--checkpoint",
        str(run_dir / "checkpoints" / "final.ckpt"),
        "--adata",
        str(job.path("infer_in.h5ad")),
        "--pert-col",
        "pert",
        "--celltype-col",
        "group",
        "--batch-col",
        "batch",
        "--control-pert",
        "control",
        "--seed",
        str(job.seed),
        "--output",
        str(out_path),
        "--quiet",
    ]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=job.workdir)
    res = ad.read_h5ad(out_path)
    P = res.X.toarray() if sparse.issparse(res.X) else np.asarray(res.X)
    for i, (a, b) in where.items():
        job.predict(i, P[a:b])
    job.save()


if __name__ == "__main__":
    main(sys.argv[1])
