"""Training throughput of vcell's CausalVAE vs scvi-tools' SCVI at equal sizes, on CPU (and GPU when present).

Both models train on the same data with the same latent size, hidden width, number of hidden layers and batch size,
for a fixed number of epochs (no early stopping), each holding out 10% of the cells, with the same likelihood
(``--scvi-likelihood nb``, the default: CausalVAE's negative binomial; ``zinb`` is scvi-tools' own default).
``--validation both`` (default): both run a validation pass every epoch. CausalVAE always does (validation ELBO and
the counterfactual score early stopping watches); SCVI does only with early stopping, so it is given
``check_val_every_n_epoch=1``. ``--validation none``: neither validates (CausalVAE with Lightning's
``limit_val_batches=0``). Throughput = training cells x epochs / wall time of ``model.train()`` (set-up, validation and
Lightning included, i.e. what a user waits for). Each repeat runs SCVI, then CausalVAE, so the two are measured
under about the same load; the table gives the median (and best) of each and the median CPU time (``cpu_s``, all
threads), and the last lines the ratio of every repeat's pair (wall-clock and CPU time) with its median and range.
On a shared machine the CPU-time ratio at one thread is the figure least disturbed by other processes.

Data: ``--data simulated`` (default; ``vcell.datasets.simulate``, ``--cells`` x ``--genes``, dense counts: ~1% zeros),
``--data kang`` (the real Kang 2018 PBMC counts from ``../shared/data``, 1,975 cells x 6,998 genes, 95% zeros), or
``--data PATH.h5ad``: any counts with ``obs['perturbation']`` (``'control'``) and ``obs['cell_type']``, e.g. a file
that ``benchmarks/scale.py`` generated (sparse negative-binomial counts, ~20% nonzero, ~700 UMI per cell).

FLOPs per cell are counted from the layer sizes: 2 x inputs x outputs per linear layer for the forward pass, as much
again for the weight gradients, and again for the input gradients except in the first layer (whose input is data).
SCVI computes its dropout head (a second gene-wide output layer) for every likelihood, but with ``nb`` nothing
depends on it, so it runs forward only.
The CPU's peak is measured with a 4096 x 4096 float32 matmul in torch with the same number of threads.
``--pure`` also times CausalVAE's module alone (forward, loss, backward, AdamW step in a plain loop over the same
batches, no Lightning, validation or set-up): the ceiling the ``train()`` loop can approach.

Usage: ``python benchmarks/causal_vae_speed.py [--threads 2] [--epochs 5] [--repeats 3] [--data simulated|kang|PATH]
[--validation both|none] [--scvi-likelihood nb|zinb] [--pure]``
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np

KANG = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kang2018_pbmc_ifnb_small.h5ad"


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


def linear_flops(layers: list[tuple[int, int]], *, n_first: int = 1) -> float:
    """Training FLOPs per cell of linear layers ``(n_in, n_out)``: forward, weight and input gradients (2 n_in n_out
    each), without the input gradients of the first ``n_first`` layers (their input is the data)."""
    return sum((4.0 if i < n_first else 6.0) * n_in * n_out for i, (n_in, n_out) in enumerate(layers))


def flops_causal_vae(G: int, H: int, L: int, n_adv_classes: list[int]) -> float:
    """Encoder (genes + own latent -> H -> 2L), decoder (L -> H -> G), one MLP L -> H/2 -> k per adversary."""
    layers = [(G + L, H), (H, 2 * L), (L, H), (H, G)]
    for k in n_adv_classes:
        layers += [(L, H // 2), (H // 2, k)]
    return linear_flops(layers)


def flops_scvi(G: int, H: int, L: int, likelihood: str = "zinb") -> float:
    """Encoder G -> H -> (mean, var); decoder L -> H -> (scale, dropout logits), both G wide (scvi-tools computes the
    dropout head for every likelihood; with ``nb`` the loss does not use it: forward only, 2 H G); the library-size
    encoder does not run with the observed library size."""
    if likelihood == "nb":
        return linear_flops([(G, H), (H, L), (H, L), (L, H), (H, G)]) + 2.0 * H * G
    return linear_flops([(G, H), (H, L), (H, L), (L, H), (H, G), (H, G)])


def load_data(args: argparse.Namespace):
    import anndata as ad

    import vcell

    if args.data == "kang":
        if not KANG.exists():
            msg = f"--data kang needs {KANG}"
            raise SystemExit(msg)
        return ad.read_h5ad(KANG)
    if args.data.endswith(".h5ad"):
        adata = ad.read_h5ad(args.data)
        missing = [k for k in ("perturbation", "cell_type") if k not in adata.obs]
        if missing:
            msg = f"--data {args.data}: obs lacks {missing} (needs 'perturbation' with 'control', and 'cell_type')"
            raise SystemExit(msg)
        return adata
    return vcell.datasets.simulate(
        n_cells=args.cells, n_genes=args.genes, n_perturbations=10, n_combos=10, cell_types=3, seed=0
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--data",
        default="simulated",
        help="simulated, kang, or an .h5ad of counts with obs 'perturbation' ('control') and 'cell_type' "
        "(e.g. a file of benchmarks/scale.py: sparse NB counts, ~20%% nonzero)",
    )
    parser.add_argument("--cells", type=int, default=10_000, help="simulated cells")
    parser.add_argument("--genes", type=int, default=2000, help="simulated genes")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--latent", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each model (median reported)")
    parser.add_argument(
        "--scvi-likelihood",
        default="nb",
        choices=["zinb", "nb"],
        help="SCVI's gene_likelihood (default nb: CausalVAE's likelihood; scvi-tools' own default is zinb)",
    )
    parser.add_argument(
        "--validation",
        default="both",
        choices=["both", "none"],
        help="both: a validation pass every epoch for both models (SCVI with check_val_every_n_epoch=1); none: neither",
    )
    parser.add_argument("--pure", action="store_true", help="also time CausalVAE's module in a plain torch loop")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import scvi

    import vcell

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("scvi").setLevel(logging.WARNING)
    vcell.settings.verbosity = "warning"
    H, L, B = args.hidden, args.latent, args.batch_size
    adata = load_data(args)
    G = adata.n_vars
    n_train = int(round(0.9 * adata.n_obs))
    X = adata.X
    nonzero = (X.nnz if hasattr(X, "nnz") else np.count_nonzero(X)) / (adata.n_obs * G)
    print(
        f"{args.data}: {adata.n_obs} cells x {G} genes ({100 * nonzero:.1f}% nonzero), n_hidden={H}, n_latent={L}, "
        f"1 hidden layer, batch {B}, {args.epochs} epochs, torch threads={torch.get_num_threads()}, "
        f"accelerator={args.accelerator}, SCVI gene_likelihood={args.scvi_likelihood!r}, "
        f"validation={args.validation}, load average {os.getloadavg()[0]:.1f}"
    )

    def run_scvi() -> tuple[float, float]:
        a = adata.copy()
        scvi.model.SCVI.setup_anndata(a)
        m = scvi.model.SCVI(a, n_hidden=H, n_latent=L, n_layers=1, gene_likelihood=args.scvi_likelihood)
        t0, c0 = time.perf_counter(), time.process_time()
        m.train(
            max_epochs=args.epochs,
            batch_size=B,
            accelerator=args.accelerator,
            devices=1,
            early_stopping=False,
            train_size=0.9,
            enable_progress_bar=False,
            **({"check_val_every_n_epoch": 1} if args.validation == "both" else {}),
        )
        return time.perf_counter() - t0, time.process_time() - c0

    def run_cvae() -> tuple[float, float, vcell.model.CausalVAE]:
        a = adata.copy()
        vcell.model.CausalVAE.setup_anndata(
            a, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
        )
        m = vcell.model.CausalVAE(a, n_hidden=H, n_latent=L, n_layers=1)
        t0, c0 = time.perf_counter(), time.process_time()
        m.train(
            max_epochs=args.epochs,
            batch_size=B,
            accelerator=args.accelerator,
            devices=1,
            early_stopping=False,
            seed=0,
            trainer_kwargs={
                "enable_progress_bar": False,
                **({"limit_val_batches": 0} if args.validation == "none" else {}),
            },
        )
        return time.perf_counter() - t0, time.process_time() - c0, m

    times: dict[str, list[float]] = {"SCVI": [], "CausalVAE": []}
    cpu: dict[str, list[float]] = {"SCVI": [], "CausalVAE": []}
    model = None
    for _ in range(args.repeats):
        dt, dc = run_scvi()
        times["SCVI"].append(dt)
        cpu["SCVI"].append(dc)
        dt, dc, model = run_cvae()
        times["CausalVAE"].append(dt)
        cpu["CausalVAE"].append(dc)
    n_classes = [len(model._conditions()), *(len(c) for c in model._categories)]
    flops = {"SCVI": flops_scvi(G, H, L, args.scvi_likelihood), "CausalVAE": flops_causal_vae(G, H, L, n_classes)}
    rates = {k: n_train * args.epochs / float(np.median(v)) for k, v in times.items()}
    peak = matmul_peak_gflops() if args.accelerator == "cpu" else np.nan
    if args.pure:
        pure_wall, pure_cpu = pure_loop_rate(model, B)
        times["CausalVAE module only"], rates["CausalVAE module only"] = [np.nan], pure_wall
        cpu["CausalVAE module only"] = [n_train * args.epochs / pure_cpu]
        flops["CausalVAE module only"] = flops["CausalVAE"]
    print(
        f"{'model':<22} {'train_s':>8} {'best_s':>7} {'cpu_s':>7} {'cells/s':>9} {'MFLOP/cell':>11} {'GFLOP/s':>8} "
        f"{'% peak':>7}"
    )
    for name, rate in rates.items():
        gflops = rate * flops[name] / 1e9
        print(
            f"{name:<22} {np.median(times[name]):8.2f} {np.min(times[name]):7.2f} {np.median(cpu[name]):7.2f} "
            f"{rate:9.0f} {flops[name] / 1e6:11.2f} {gflops:8.2f} {100 * gflops / peak:7.1f}"
        )
    cpu_ratio = np.median(cpu["SCVI"]) / np.median(cpu["CausalVAE"])
    print(
        f"CausalVAE / SCVI cells/s (medians): {rates['CausalVAE'] / rates['SCVI']:.2f}x wall-clock, "
        f"{cpu_ratio:.2f}x per CPU second"
    )
    # each repeat runs SCVI then CausalVAE back to back: their ratio is measured under (about) the same load
    paired = np.array(times["SCVI"][: args.repeats]) / np.array(times["CausalVAE"][: args.repeats])
    paired_cpu = np.array(cpu["SCVI"][: args.repeats]) / np.array(cpu["CausalVAE"][: args.repeats])
    print(
        f"paired ratio per repeat (wall): {' '.join(f'{r:.2f}' for r in paired)}; median {np.median(paired):.2f}x, "
        f"range {paired.min():.2f}-{paired.max():.2f}; per CPU second: median {np.median(paired_cpu):.2f}x, "
        f"range {paired_cpu.min():.2f}-{paired_cpu.max():.2f}"
    )
    if args.accelerator == "cpu":
        print(f"CPU matmul peak ({torch.get_num_threads()} threads, 4096^2 float32): {peak:.1f} GFLOP/s")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def pure_loop_rate(model, batch_size: int, n_steps: int = 60) -> tuple[float, float]:
    """Training cells per wall-clock and per CPU second of the model's module in a plain torch loop (forward, loss,
    backward, fused AdamW step)."""
    import torch

    from vcell.data import take_rows
    from vcell.train._plan import _adamw_impl

    tensors = model._training_tensors(model.adata)
    module = model.module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, **_adamw_impl(module))
    rng = np.random.default_rng(0)
    batches = [
        {k: take_rows(v, np.sort(rng.choice(model.adata.n_obs, batch_size, replace=False))) for k, v in tensors.items()}
        for _ in range(20)
    ]

    def step(batch: dict) -> None:
        loss = module.loss(batch, module(batch)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    for b in batches[:5]:
        step(b)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n_steps):
        step(batches[i % len(batches)])
    return n_steps * batch_size / (time.perf_counter() - t0), n_steps * batch_size / (time.process_time() - c0)


if __name__ == "__main__":
    main()
