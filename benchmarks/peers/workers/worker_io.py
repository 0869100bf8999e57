"""Input/output of the peer workers (imported by the worker scripts, in the peers' own environments).

See ``benchmarks/peers/_common.py`` for the file protocol.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


class Job:
    """One worker run: read ``train.h5ad`` / ``requests.json`` from ``workdir``, collect predictions and reasons."""

    def __init__(self, workdir: str | Path) -> None:
        import anndata as ad

        self.workdir = Path(workdir)
        spec = json.loads((self.workdir / "requests.json").read_text())
        self.seed: int = int(spec["seed"])
        self.options: dict = spec.get("options", {})
        self.requests: list[dict] = spec["requests"]
        self.train = ad.read_h5ad(self.workdir / "train.h5ad")
        self.predictions: dict[str, np.ndarray] = {}
        self.reasons: dict[str, str] = {}
        self.t0 = time.perf_counter()
        self.fit_s = float("nan")

    def log(self, msg: str) -> None:
        """Print ``msg`` with the seconds since the job started (to the worker's log)."""
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    def path(self, name: str) -> Path:
        """A path inside the work folder."""
        return self.workdir / name

    def fitted(self) -> None:
        """Mark the end of training (the rest of the run counts as prediction time)."""
        self.fit_s = time.perf_counter() - self.t0
        self.t1 = time.perf_counter()

    def predict(self, i: int, X: np.ndarray) -> None:
        """Store the prediction of request ``i`` (one row per requested control cell)."""
        X = np.asarray(X, dtype=np.float32)
        n = len(self.requests[i]["controls"])
        if X.shape != (n, self.train.n_vars):
            msg = f"request {i}: prediction of shape {X.shape}, expected {(n, self.train.n_vars)}"
            raise ValueError(msg)
        self.predictions[str(i)] = X

    def refuse(self, i: int, reason: str) -> None:
        """Record why request ``i`` cannot be predicted."""
        self.reasons[str(i)] = reason

    def save(self) -> None:
        """Write ``predictions.npz``, ``reasons.json`` and ``timing.json``."""
        np.savez(self.path("predictions.npz"), **self.predictions)
        self.path("reasons.json").write_text(json.dumps(self.reasons))
        predict_s = time.perf_counter() - getattr(self, "t1", self.t0)
        self.path("timing.json").write_text(json.dumps({"fit_s": self.fit_s, "predict_s": predict_s}))
        print(f"saved {len(self.predictions)} predictions, {len(self.reasons)} refusals", file=sys.stderr)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and (if installed) torch."""
    import random

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (GEARS pairs controls with the legacy global RNG)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass
