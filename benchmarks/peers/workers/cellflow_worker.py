"""CellFlow worker (runs in ``.venvs/cellflow``): flow matching from control to perturbed cells in PCA space.

Usage: ``python cellflow_worker.py WORKDIR`` (files described in ``benchmarks/peers/_common.py``). Options:
``n_pcs``, ``num_iterations``, ``batch_size``, ``width`` (hidden width of the velocity field and encoders),
``condition_dim``, ``lr``, ``ode_steps`` / ``ode_tol`` (ODE solve of the prediction: fixed Tsit5 steps, or ``0`` for
an adaptive step with ``rtol = atol = ode_tol``; CellFlow's default is adaptive with 1e-5).

Set-up (CellFlow's own API: ``CellFlow.prepare_data`` / ``prepare_model`` / ``train`` / ``predict``, OT flow matching):

* cells are represented by ``n_pcs`` principal components of log1p(CP10k), fitted on the training cells (CellFlow's
  usual ``obsm['X_pca']``); predictions are mapped back to genes with the same PCA (``mean + Z @ components``);
* perturbations: up to two per cell (``pert_1``, ``pert_2``), each a one-hot vector over the trained single genes /
  labels, pooled by CellFlow's attention pooling; a single has ``pert_2 = 'none'`` (a zero vector);
* context (cell type): a sample covariate represented by the mean PCA coordinates of that context's control cells,
  and a split covariate, so that each context's controls are the source of its own perturbed cells. This lets a
  context without perturbed training cells (cell-type transfer) be embedded from its controls;
* the source of each prediction is the requested control cells, one output row per control cell.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from worker_io import Job


def main(workdir: str) -> None:
    import anndata as ad
    import jax
    import optax
    from scipy import sparse

    job = Job(workdir)
    opt = {
        "n_pcs": 50,
        "num_iterations": 2000,
        "batch_size": 256,
        "width": 256,
        "condition_dim": 64,
        "lr": 1e-4,
        "ode_steps": 0,
        "ode_tol": 1e-5,
    } | job.options
    import cellflow

    job.log("imported cellflow")
    tr = job.train
    X = tr.X.toarray() if sparse.issparse(tr.X) else np.asarray(tr.X, dtype=np.float64)
    cond = tr.obs["condition"].astype(str).to_numpy()
    ctx = tr.obs["context"].astype(str).to_numpy()
    # PCA of the training cells
    mu = X.mean(0)
    n_pcs = int(min(opt["n_pcs"], X.shape[1] - 1, X.shape[0] - 1))
    _, _, Vt = np.linalg.svd(X - mu, full_matrices=False)
    W = Vt[:n_pcs]  # components x genes
    Z = ((X - mu) @ W.T).astype(np.float32)

    singles = sorted({g for c in set(cond) - {"control"} for g in c.split("+")})
    eye = np.eye(len(singles), dtype=np.float32)
    pert_emb = {g: eye[i] for i, g in enumerate(singles)} | {"none": np.zeros(len(singles), dtype=np.float32)}
    ctx_emb = {c: Z[(ctx == c) & (cond == "control")].mean(0) for c in np.unique(ctx)}

    def parts(label: str) -> tuple[str, str]:
        p = label.split("+")
        return p[0], (p[1] if len(p) > 1 else "none")

    obs = pd.DataFrame(
        {
            "control": cond == "control",
            "pert_1": [parts(c)[0] if c != "control" else "none" for c in cond],
            "pert_2": [parts(c)[1] if c != "control" else "none" for c in cond],
            "context": ctx,
        },
        index=tr.obs_names,
    )
    for col in ("pert_1", "pert_2", "context"):
        obs[col] = obs[col].astype("category")
    # CellFlow needs perturbed cells for every control population: the controls of a context without perturbed
    # training cells (the held-out cell type) are left out of training; they are the source at prediction time
    has_target = {c for c in np.unique(ctx) if ((ctx == c) & (cond != "control")).any()}
    fit = np.isin(ctx, sorted(has_target))
    a = ad.AnnData(X=Z[fit], obs=obs[fit].copy())
    a.obsm["X_pca"] = Z[fit]
    a.uns["pert_emb"] = pert_emb
    a.uns["ctx_emb"] = ctx_emb

    job.log("PCA done")
    cf = cellflow.model.CellFlow(a, solver="otfm")
    cf.prepare_data(
        sample_rep="X_pca",
        control_key="control",
        perturbation_covariates={"pert": ("pert_1", "pert_2")},
        perturbation_covariate_reps={"pert": "pert_emb"},
        sample_covariates=["context"],
        sample_covariate_reps={"context": "ctx_emb"},
        split_covariates=["context"],
        max_combination_length=2,
    )
    job.log("prepare_data done")
    w = int(opt["width"])
    cf.prepare_model(
        condition_embedding_dim=int(opt["condition_dim"]),
        time_encoder_dims=(w, w),
        hidden_dims=(w, w),
        decoder_dims=(w, w),
        layers_before_pool={
            "pert": ({"layer_type": "mlp", "dims": (w, w)},),
            "context": ({"layer_type": "mlp", "dims": (w, w)},),
        },
        layers_after_pool=({"layer_type": "mlp", "dims": (w,)},),
        cond_output_dropout=0.5,
        optimizer=optax.adam(float(opt["lr"])),
        seed=job.seed,
    )
    job.log("prepare_model done")
    cf.train(num_iterations=int(opt["num_iterations"]), batch_size=int(opt["batch_size"]), valid_freq=10**9)
    job.log("trained")
    job.fitted()

    import diffrax

    # ODE of the prediction, built once: new objects per call would miss CellFlow's cache of compiled predict
    # functions and recompile for every request. ode_steps > 0: Tsit5 with that many fixed steps on [0, 1]
    # (flow-matching paths are nearly straight); 0: CellFlow's default (Tsit5, PID controller, rtol = atol = ode_tol)
    n_steps = int(opt["ode_steps"])
    if n_steps > 0:
        ode = {"solver": diffrax.Tsit5(), "stepsize_controller": diffrax.ConstantStepSize(), "dt0": 1.0 / n_steps}
    else:
        tol = float(opt["ode_tol"])
        ode = {"solver": diffrax.Tsit5(), "stepsize_controller": diffrax.PIDController(rtol=tol, atol=tol), "dt0": None}
    known = set(singles)
    for i, req in enumerate(job.requests):
        p1, p2 = parts(req["perturbation"])
        missing = [g for g in (p1, p2) if g != "none" and g not in known]
        if missing:
            job.refuse(i, f"CellFlow (one-hot perturbations) has no representation of the untrained {missing}")
            continue
        ctrl = np.asarray(req["controls"], dtype=int)
        c = str(ctx[ctrl[0]])
        if (ctx[ctrl] != c).any():
            job.refuse(i, "CellFlow: the requested control cells span several contexts")
            continue
        src = ad.AnnData(
            X=Z[ctrl],
            obs=pd.DataFrame(
                {"control": True, "context": pd.Categorical([c] * ctrl.size)}, index=[f"s{j}" for j in range(ctrl.size)]
            ),
        )
        src.obsm["X_pca"] = Z[ctrl]
        src.uns["pert_emb"], src.uns["ctx_emb"] = pert_emb, ctx_emb  # CellFlow reads representations from here
        cov = pd.DataFrame(
            {"pert_1": [p1], "pert_2": [p2], "context": [c], "control": [False], "condition_id": [f"r{i}"]}
        )
        for col in ("pert_1", "pert_2", "context"):
            cov[col] = cov[col].astype("category")
        out = cf.predict(
            src,
            covariate_data=cov,
            sample_rep="X_pca",
            condition_id_key="condition_id",
            rng=jax.random.PRNGKey(job.seed),
            **ode,
        )
        job.log(f"predicted request {i}")
        Zp = np.asarray(out[f"r{i}"], dtype=np.float64)
        job.predict(i, mu + Zp @ W)
    job.save()


if __name__ == "__main__":
    main(sys.argv[1])
