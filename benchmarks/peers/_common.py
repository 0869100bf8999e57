"""Shared plumbing of the peer adapters: request triage, resource measurement, subprocess workers.

Every adapter is a :class:`vcell.bench.Predictor`: ``fit_predict(train, requests, *, seed, covariate_keys, layer)``
returns, per requested condition, a ``(len(request.controls), n_genes)`` array in log1p(CP10k), or a string saying
why the peer cannot predict it. Peers that live in their own virtual environment (GEARS, STATE, CellFlow) get
the training cells and the requests through files in a temporary folder and answer through files:

``train.h5ad``
    ``X``: log1p(CP10k) expression (float32 CSR) of the training cells (train + val of the split, nothing
    held out), ``var_names`` the genes; ``obs['condition']`` canonical labels (``'control'``, ``'A'``, ``'A+B'``),
    ``obs['context']`` the covariates joined by ``'|'`` (``'all'`` without covariates), ``obs['split']``
    (``train``/``val``).
``requests.json``
    ``{"seed": int, "options": {...}, "requests": [{"condition", "perturbation", "dose", "controls"}]}``; ``controls``
    are row positions in ``train.h5ad``.
``predictions.npz`` / ``reasons.json`` (written by the worker)
    One array per predicted condition (key = index of the request) and, for the others, the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData

    from vcell.bench import PredictionRequest

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
WORKERS = HERE / "workers"
#: column of the canonical perturbation labels in the training AnnData handed to predictors
PERT_COL = "vcell_perturbation"
CONTROL = "control"


def venv_python(peer: str) -> Path:
    """Interpreter of a peer's virtual environment (built by ``setup_envs.sh``)."""
    return VENVS / peer / "bin" / "python"


def venv_ready(peer: str) -> bool:
    """Whether ``setup_envs.sh`` finished building the peer's environment."""
    return (VENVS / peer / ".ok").is_file() and venv_python(peer).is_file()


def contexts(train: AnnData, covariate_keys: Sequence[str]) -> np.ndarray:
    """Context label per cell: the covariates joined by ``'|'``, or ``'all'`` without covariates."""
    if not covariate_keys:
        return np.full(train.n_obs, "all", dtype=object)
    cols = [train.obs[k].astype(str).to_numpy() for k in covariate_keys]
    out = cols[0].astype(object)
    for c in cols[1:]:
        out = out + "|" + c
    return out


def classify_request(pert: str, trained: set[str]) -> str:
    """What a request asks of a model, given the training conditions.

    Returns
    -------
    ``'seen'`` (the perturbation was trained, in other contexts: context transfer), ``'combo'`` (a combination
    whose parts were all trained as singles), ``'unseen'`` (otherwise: an unseen perturbation or a combination
    with an unseen part).
    """
    if pert in trained:
        return "seen"
    parts = pert.split("+")
    if len(parts) > 1 and all(p in trained for p in parts):
        return "combo"
    return "unseen"


def peak_rss_reset() -> None:
    """Reset this process's peak resident set size (Linux ``/proc/self/clear_refs``); no-op elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB since the last :func:`peak_rss_reset` (NaN if unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def current_rss_mb() -> float:
    """Current resident set size of this process in MiB (NaN if unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@contextmanager
def measure_in_process() -> Iterator[dict[str, float]]:
    """Measure wall time (``wall_s``), peak RSS of the whole process (``peak_mem_mb``) and RSS at the start."""
    out: dict[str, float] = {"start_mem_mb": current_rss_mb()}
    peak_rss_reset()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["wall_s"] = time.perf_counter() - t0
        out["peak_mem_mb"] = peak_rss_mb()


def _tree_rss_mb(pid: int) -> tuple[float, float]:
    """``(sum of current RSS, largest VmHWM)`` in MiB over a process and its descendants (0 if gone)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return 0.0, 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0
    total, hwm = 0.0, 0.0
    for p in procs:
        try:
            total += p.memory_info().rss / 2**20
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = max(hwm, int(line.split()[1]) / 1024)
        except (psutil.Error, OSError):
            continue
    return total, hwm


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that cap OpenMP, MKL, OpenBLAS and torch (intra-op) threads at ``threads``.

    On a small machine shared with other jobs, multi-threaded BLAS/torch kernels spin against the other processes:
    measured here, STATE's training steps ran at 0.66 step/s with 2 threads and 7.7 step/s with 1 while another
    job used the second core.
    """
    n = str(int(threads))
    return dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"), n)


def run_worker(
    cmd: Sequence[str], *, log: Path, timeout_s: float | None = None, env: dict[str, str] | None = None
) -> tuple[int, float, float]:
    """Run ``cmd`` (a worker in a peer's venv) and return ``(returncode, wall_s, peak_mem_mb)``.

    Peak memory is polled (every 0.1 s) over the worker and its descendants (e.g. ``state tx train``): the largest
    sum of their resident set sizes, or the largest single process's peak (``VmHWM``) if that is larger. (``wait4``'s
    ``ru_maxrss`` is not used: it counts the parent's memory copied at ``fork``.) Output goes to ``log``. On timeout
    the worker's process group is killed and the return code is 124.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    peak = 0.0
    with log.open("w") as fh:
        proc = subprocess.Popen(
            list(map(str, cmd)), stdout=fh, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
        deadline = None if timeout_s is None else t0 + timeout_s
        while True:
            total, hwm = _tree_rss_mb(proc.pid)
            peak = max(peak, total, hwm)
            rc = proc.poll()
            if rc is not None:
                break
            if deadline is not None and time.perf_counter() > deadline:
                os.killpg(proc.pid, 9)
                proc.wait()
                rc = 124
                break
            time.sleep(0.1)
    return rc, time.perf_counter() - t0, peak


def tail(path: Path, n: int = 15) -> str:
    """Last ``n`` lines of a text file (empty if missing)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def write_inputs(
    workdir: Path,
    train: AnnData,
    requests: Sequence[PredictionRequest],
    *,
    covariate_keys: Sequence[str],
    layer: str | None,
    seed: int,
    options: dict[str, Any],
) -> None:
    """Write ``train.h5ad`` and ``requests.json`` for a worker (see the module docstring)."""
    import anndata as ad
    from scipy import sparse

    from vcell._utils import expression_for_eval

    E = expression_for_eval(train, layer)
    obs = pd.DataFrame(
        {
            "condition": train.obs[PERT_COL].astype(str).to_numpy(),
            "context": contexts(train, covariate_keys),
            "split": train.obs["vcell_split"].astype(str).to_numpy() if "vcell_split" in train.obs else "train",
        },
        index=[f"cell{i}" for i in range(train.n_obs)],
    )
    out = ad.AnnData(X=sparse.csr_matrix(E.astype(np.float32)), obs=obs, var=pd.DataFrame(index=train.var_names))
    out.write_h5ad(workdir / "train.h5ad")
    payload = {
        "seed": int(seed),
        "options": options,
        "requests": [
            {
                "condition": r.condition,
                "perturbation": r.perturbation,
                "dose": float(r.dose),
                "controls": [int(i) for i in np.asarray(r.controls)],
            }
            for r in requests
        ],
    }
    (workdir / "requests.json").write_text(json.dumps(payload))


def read_outputs(workdir: Path, requests: Sequence[PredictionRequest]) -> dict[str, np.ndarray | str]:
    """Read a worker's ``predictions.npz`` and ``reasons.json`` back, keyed by request condition."""
    out: dict[str, np.ndarray | str] = {}
    reasons = {}
    if (workdir / "reasons.json").is_file():
        reasons = json.loads((workdir / "reasons.json").read_text())
    preds = {}
    if (workdir / "predictions.npz").is_file():
        with np.load(workdir / "predictions.npz") as z:
            preds = {k: z[k] for k in z.files}
    for i, r in enumerate(requests):
        if str(i) in preds:
            out[r.condition] = preds[str(i)].astype(np.float32)
        else:
            out[r.condition] = reasons.get(str(i), "the worker returned no prediction")
    return out


@dataclass
class SubprocessPeer:
    """A peer run by a worker script in its own virtual environment (base class of the GEARS/STATE/CellFlow adapters).

    Subclasses set ``peer`` (venv name), ``worker`` (script in ``workers/``) and implement :meth:`triage`, which
    returns a reason string for every request the peer cannot answer by design. ``threads`` (if set) caps the
    worker's OpenMP/BLAS/torch threads (:func:`thread_env`); JAX keeps its own thread pool.
    """

    name: str = "peer"
    timeout_s: float | None = 1800
    threads: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    keep_workdir: bool = False
    last_resources: dict = field(default_factory=dict, repr=False)
    last_log: str = field(default="", repr=False)
    peer: str = field(default="", init=False, repr=False)
    worker: str = field(default="", init=False, repr=False)

    def triage(
        self, train: AnnData, requests: Sequence[PredictionRequest], covariate_keys: Sequence[str]
    ) -> dict[str, str]:
        """Reasons, per condition, for the requests this peer cannot answer by design."""
        return {}

    def extra_inputs(self, workdir: Path, train: AnnData, requests: Sequence[PredictionRequest]) -> None:
        """Write peer-specific input files into ``workdir`` (hook; nothing by default)."""

    def fit_predict(
        self,
        train: AnnData,
        requests: list[PredictionRequest],
        *,
        seed: int,
        covariate_keys: Sequence[str],
        layer: str | None,
    ) -> dict[str, np.ndarray | str]:
        """Write the training cells, run the worker in the peer's venv, read the predictions back."""
        self.last_resources = {}
        out: dict[str, np.ndarray | str] = dict(self.triage(train, requests, covariate_keys))
        todo = [r for r in requests if r.condition not in out]
        if not todo:
            return out
        if not venv_ready(self.peer):
            msg = f"{self.name}: environment {VENVS / self.peer} not built (run benchmarks/peers/setup_envs.sh)"
            return out | {r.condition: msg for r in todo}
        workdir = Path(tempfile.mkdtemp(prefix=f"vcell_{self.peer}_"))
        try:
            write_inputs(
                workdir, train, todo, covariate_keys=covariate_keys, layer=layer, seed=seed, options=self.options
            )
            self.extra_inputs(workdir, train, todo)
            log = workdir / "worker.log"
            cmd = [venv_python(self.peer), WORKERS / self.worker, str(workdir)]
            env = thread_env(self.threads) if self.threads else None
            rc, wall_s, peak_mb = run_worker(cmd, log=log, timeout_s=self.timeout_s, env=env)
            self.last_log = log.read_text(errors="replace") if log.is_file() else ""
            timing = {}
            if (workdir / "timing.json").is_file():
                timing = json.loads((workdir / "timing.json").read_text())
            self.last_resources = {
                "fit_s": timing.get("fit_s", np.nan),
                "predict_s": timing.get("predict_s", np.nan),
                "worker_s": wall_s,
                "peak_mem_mb": peak_mb,
                "start_mem_mb": 0.0,  # a fresh process
            }
            if rc != 0:
                why = "timed out" if rc == 124 else f"exited with code {rc}"
                msg = f"{self.name} worker {why}: {tail(log, 6)}"
                print(msg, file=sys.stderr)
                return out | {r.condition: msg for r in todo}
            return out | read_outputs(workdir, todo)
        finally:
            if self.keep_workdir:
                print(f"{self.name}: kept {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Measured:
    """Wrap any predictor (e.g. a vcell baseline's :class:`vcell.bench.ModelSpec`) to record its peak memory too."""

    inner: Any
    name: str = ""
    last_resources: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.name = self.name or self.inner.name

    def fit_predict(self, train: AnnData, requests: list[PredictionRequest], **kwargs: Any) -> dict:
        """Delegate to the wrapped predictor, measuring wall time and peak RSS of the whole process."""
        with measure_in_process() as m:
            out = self.inner.fit_predict(train, requests, **kwargs)
        self.last_resources = {
            **(getattr(self.inner, "last_resources", {}) or {}),
            "peak_mem_mb": m["peak_mem_mb"],
            "start_mem_mb": m["start_mem_mb"],
        }
        return out
