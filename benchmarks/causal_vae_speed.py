"""Training throughput of vcell's CausalVAE vs scvi-tools' SCVI at equal sizes, on CPU (and GPU when present).

Both models train on the same simulated counts (``vcell.datasets.simulate``, 2,000 genes) with the same latent size,
hidden width, number of hidden layers and batch size, for a fixed number of epochs (no early stopping), each holding
out 10% of the cells for a validation pass per epoch (the defaults of both). Throughput = training cells x epochs /
wall time of ``model.train()`` (validation and Lightning's set-up included, i.e. what a user waits for).

FLOPs per cell are estimated from the layer sizes (2 x inputs x outputs per linear layer and cell, x3 for forward plus
backward); the CPU's peak is measured with a large float32 matmul in torch with the same number of threads.

Usage: ``python benchmarks/causal_vae_speed.py [--threads 2] [--cells 10000] [--epochs 5] [--accelerator cpu]``
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np


def matmul_peak_gflops(n: int = 4096, repeats: int = 3) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def linear_flops(sizes: list[tuple[int, int]]) -> float:
    """Forward + backward FLOPs per cell of a stack of linear layers (2 n_in n_out, x3 for backward)."""
    return 3.0 * sum(2.0 * i * o for i, o in sizes)


def flops_causal_vae(G: int, H: int, L: int, n_adv_classes: list[int]) -> float:
    layers = [(G, H), (H, 2 * L), (L, H), (H, G)]
    layers += [(L, H // 2), *((H // 2, k) for k in n_adv_classes)]
    return linear_flops(layers)


def flops_scvi(G: int, H: int, L: int) -> float:
    # encoder G->H->(mean, var) L each; decoder L->H->G (scale) ; library encoder G->H->1 (+1)
    return linear_flops([(G, H), (H, L), (H, L), (L, H), (H, G), (G, H), (H, 1), (H, 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--latent", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each model (best is kept)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import scvi

    import vcell

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("scvi").setLevel(logging.WARNING)
    vcell.settings.verbosity = "warning"
    G, H, L, B = args.genes, args.hidden, args.latent, args.batch_size
    adata = vcell.datasets.simulate(
        n_cells=args.cells, n_genes=G, n_perturbations=10, n_combos=10, cell_types=3, seed=0
    )
    n_train = int(round(0.9 * adata.n_obs))
    print(
        f"{adata.n_obs} cells x {G} genes, n_hidden={H}, n_latent={L}, 1 hidden layer, batch {B}, {args.epochs} epochs, "
        f"torch threads={torch.get_num_threads()}, accelerator={args.accelerator}, load average {os.getloadavg()[0]:.1f}"
    )

    def run_scvi() -> float:
        a = adata.copy()
        scvi.model.SCVI.setup_anndata(a)
        m = scvi.model.SCVI(a, n_hidden=H, n_latent=L, n_layers=1)
        t0 = time.perf_counter()
        m.train(
            max_epochs=args.epochs,
            batch_size=B,
            accelerator=args.accelerator,
            devices=1,
            early_stopping=False,
            train_size=0.9,
            enable_progress_bar=False,
        )
        return time.perf_counter() - t0

    def run_cvae() -> tuple[float, vcell.model.CausalVAE]:
        a = adata.copy()
        vcell.model.CausalVAE.setup_anndata(
            a, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
        )
        m = vcell.model.CausalVAE(a, n_hidden=H, n_latent=L, n_layers=1)
        t0 = time.perf_counter()
        m.train(
            max_epochs=args.epochs,
            batch_size=B,
            accelerator=args.accelerator,
            devices=1,
            early_stopping=False,
            seed=0,
            trainer_kwargs={"enable_progress_bar": False},
        )
        return time.perf_counter() - t0, m

    t_scvi, t_cvae = np.inf, np.inf
    model = None
    for _ in range(args.repeats):
        t_scvi = min(t_scvi, run_scvi())
        dt, model = run_cvae()
        t_cvae = min(t_cvae, dt)
    n_classes = [len(model._conditions()), *(len(c) for c in model._categories)]
    rate_scvi = n_train * args.epochs / t_scvi
    rate_cvae = n_train * args.epochs / t_cvae
    f_cvae, f_scvi = flops_causal_vae(G, H, L, n_classes), flops_scvi(G, H, L)
    print(f"{'model':<10} {'train_s':>8} {'cells/s':>9} {'MFLOP/cell':>11} {'GFLOP/s':>8}")
    print(f"{'SCVI':<10} {t_scvi:8.2f} {rate_scvi:9.0f} {f_scvi / 1e6:11.2f} {rate_scvi * f_scvi / 1e9:8.2f}")
    print(f"{'CausalVAE':<10} {t_cvae:8.2f} {rate_cvae:9.0f} {f_cvae / 1e6:11.2f} {rate_cvae * f_cvae / 1e9:8.2f}")
    print(f"CausalVAE / SCVI cells/s: {rate_cvae / rate_scvi:.2f}x")
    if args.accelerator == "cpu":
        peak = matmul_peak_gflops()
        print(
            f"CPU matmul peak ({torch.get_num_threads()} threads, 4096^2 float32): {peak:.1f} GFLOP/s; "
            f"CausalVAE uses {100 * rate_cvae * f_cvae / 1e9 / peak:.1f}%, SCVI {100 * rate_scvi * f_scvi / 1e9 / peak:.1f}%"
        )


if __name__ == "__main__":
    main()
