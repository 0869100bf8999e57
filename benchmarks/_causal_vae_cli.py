"""What the ``causal_vae_*.py`` benchmark scripts share: CausalVAE's options, quiet set-up and its ``ModelSpec``."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import vcell


def add_causal_vae_arguments(parser: argparse.ArgumentParser, *, epochs: int, epochs_help: str = "max epochs") -> None:
    """``--epochs``, ``--model-kwargs``, ``--train-kwargs``, ``--threads`` and ``--out``."""
    parser.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    parser.add_argument("--model-kwargs", default="{}", help="JSON dict of CausalVAE(...) arguments")
    parser.add_argument("--train-kwargs", default="{}", help="JSON dict of CausalVAE.train(...) arguments")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default="", help="folder for results.csv/summary.csv/timings.csv")


def quiet_setup(threads: int) -> None:
    """``threads`` torch CPU threads; Lightning's and vcell's logs at warning level."""
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    vcell.settings.verbosity = "warning"


def causal_vae_spec(args: argparse.Namespace, cls: Any = None, **init_kwargs: Any) -> vcell.bench.ModelSpec:
    """``ModelSpec("CausalVAE", ...)`` from the parsed options (``init_kwargs`` first, ``--model-kwargs`` over them)."""
    return vcell.bench.ModelSpec(
        "CausalVAE",
        cls or vcell.model.CausalVAE,
        {**init_kwargs, **json.loads(args.model_kwargs)},
        {"max_epochs": args.epochs, "trainer_kwargs": {"enable_progress_bar": False}, **json.loads(args.train_kwargs)},
    )
