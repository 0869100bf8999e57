"""Models that never lose to the baseline they could fall back to: :class:`Stacked` and :class:`Ensemble`.

Both combine the predictions of several predictors (a baseline, vcell models, peer adapters) with convex weights
fitted on *validation conditions only*: the members are fitted on the split's ``train`` cells, predict the held-out
``val`` conditions (of the same kind as the test ones), the weights minimise the squared error of the combined mean
prediction there, and the members are refitted on train+val to predict the test conditions.
"""

from __future__ import annotations

import hashlib
import itertools
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vcell._constants import CONTROL, DOSE_COL, PERT_COL
from vcell._settings import logger
from vcell._utils import get_matrix, is_count_matrix

from ._run import (
    BASELINE_METHODS,
    ModelSpec,
    PredictionRequest,
    Predictor,
    _capped,
    _expression_rows,
    _mean_rows,
    _resolve_models,
    _shallow_copy,
)

if TYPE_CHECKING:
    from anndata import AnnData

#: split kinds whose ``val`` cells are i.i.d. cells of training conditions: validation re-splits the training cells
RESPLIT_KINDS = ("unseen_cell_type", "unseen_dose")
#: ways to choose the validation conditions
VALIDATION_MODES = ("auto", "val", "resplit")
#: what the weights optimise on the validation conditions
OBJECTIVES = ("mse", "pearson_delta")


def convex_weights(A: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Weights ``w >= 0``, ``sum(w) == 1`` minimising ``||t - A w||^2`` (exactly, over the active sets).

    Parameters
    ----------
    A
        One column per component (its predictions, stacked over conditions and genes).
    t
        The truth, same rows as ``A``.

    Returns
    -------
    The weights, one per column of ``A``. Among equal losses the first-found (fewest components) wins, so a
    component that adds nothing gets weight 0.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.array([[0.0, 1.0], [0.0, 1.0]])
    >>> convex_weights(A, np.array([0.25, 0.25])).round(3).tolist()
    [0.75, 0.25]
    """
    A = np.asarray(A, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    k = A.shape[1]
    if k == 0:
        msg = "convex_weights needs at least one component (column of A)"
        raise ValueError(msg)
    if k > 12:
        msg = f"convex_weights enumerates active sets: at most 12 components, got {k}"
        raise ValueError(msg)
    G, b = A.T @ A, A.T @ t
    best, best_loss = None, np.inf
    scale = max(float(t @ t), 1e-12)
    for size in range(1, k + 1):
        for S in itertools.combinations(range(k), size):
            idx = list(S)
            # KKT of min ||t - A_S w||^2 s.t. 1'w = 1: [2G 1; 1' 0] [w; mu] = [2b; 1]
            K = np.zeros((size + 1, size + 1))
            K[:size, :size] = 2 * G[np.ix_(idx, idx)]
            K[:size, size] = K[size, :size] = 1.0
            rhs = np.concatenate([2 * b[idx], [1.0]])
            sol = np.linalg.lstsq(K, rhs, rcond=None)[0][:size]
            if (sol < -1e-10).any():
                continue
            w = np.zeros(k)
            w[idx] = np.clip(sol, 0, None)
            w /= w.sum()
            r = t - A @ w
            loss = float(r @ r)
            if loss < best_loss - 1e-9 * scale:
                best, best_loss = w, loss
    return best


def _simplex_grid(k: int, step: float) -> np.ndarray:
    """Every weight vector of ``k`` non-negative multiples of ``step`` summing to 1, the first weight's largest first.

    So that among equal scores the one closest to the first component (the base) wins.
    """
    n = round(1 / step)
    pts = [c for c in itertools.product(range(n, -1, -1), repeat=k) if sum(c) == n]
    return np.array(pts, dtype=np.float64) / n


def pearson_delta_weights(preds: np.ndarray, truth: np.ndarray, *, ctrl: np.ndarray, step: float = 0.05) -> np.ndarray:
    """Convex weights maximising the mean Pearson correlation of predicted and true changes over conditions.

    Parameters
    ----------
    preds
        ``(n_conditions, n_components, n_genes)`` mean predictions.
    truth
        ``(n_conditions, n_genes)`` true means.
    ctrl
        ``(n_conditions, n_genes)`` control means the changes are taken from.
    step
        Grid step over the simplex (at most 4 components at the default).

    Returns
    -------
    The weights; among equal scores, the one with the largest first weight.

    Examples
    --------
    >>> import numpy as np
    >>> ctrl = np.zeros((1, 4))
    >>> truth = np.array([[1.0, 2.0, 3.0, 4.0]])
    >>> noise = np.array([[1.0, -1.0, -1.0, 1.0]])  # uncorrelated with the true change
    >>> preds = np.stack([noise, truth], axis=1)
    >>> pearson_delta_weights(preds, truth, ctrl=ctrl).tolist()
    [0.0, 1.0]
    """
    k = preds.shape[1]
    grid = _simplex_grid(k, step)
    if len(grid) > 20_000:
        msg = f"objective='pearson_delta' searches a grid: too many components ({k}) for step {step}"
        raise ValueError(msg)
    D = preds - ctrl[:, None, :]  # conditions x components x genes
    T = truth - ctrl
    comb = np.einsum("gk,ckn->gcn", grid, D)  # grid x conditions x genes
    comb = comb - comb.mean(-1, keepdims=True)
    Tc = T - T.mean(-1, keepdims=True)
    num = (comb * Tc[None]).sum(-1)
    den = np.sqrt((comb**2).sum(-1) * (Tc**2).sum(-1)[None])
    r = np.divide(num, den, out=np.zeros_like(num), where=den > 0).mean(1)
    return grid[int(np.argmax(r > r.max() - 1e-12))]


def _fingerprint(data: AnnData, requests: list[PredictionRequest]) -> str:
    """Hash of the cells (names and split labels) and the requests: keys the member cache."""
    h = hashlib.sha1()
    h.update("\n".join(map(str, data.obs_names)).encode())
    if "vcell_split" in data.obs:
        h.update("\n".join(data.obs["vcell_split"].astype(str)).encode())
    for r in requests:
        h.update(f"{r.condition}\t{r.perturbation}\t{r.dose}".encode())
        h.update(np.asarray(r.controls, dtype=np.int64).tobytes())
    return h.hexdigest()


class _Combination:
    """Convex combination of predictors with weights fitted on validation conditions (see :class:`Stacked`)."""

    #: proteins are not combined: a Stacked/Ensemble gets RNA only from :func:`run`
    models_proteins = False

    def __init__(
        self,
        components: list[Predictor],
        *,
        name: str,
        validation: str,
        refit: bool,
        n_seeds: int,
        max_val_controls: int | None,
        weights: Sequence[float] | None,
        cache: dict | None,
        fallback: np.ndarray,
        objective: str = "mse",
    ) -> None:
        if not isinstance(name, str) or not name:
            msg = f"name must be a non-empty string, got {name!r}"
            raise ValueError(msg)
        if validation not in VALIDATION_MODES:
            msg = f"validation must be one of {VALIDATION_MODES}, got {validation!r}"
            raise ValueError(msg)
        if objective not in OBJECTIVES:
            msg = f"objective must be one of {OBJECTIVES}, got {objective!r}"
            raise ValueError(msg)
        if isinstance(n_seeds, bool) or not isinstance(n_seeds, (int, np.integer)) or n_seeds < 1:
            msg = f"n_seeds must be a positive integer, got {n_seeds!r}"
            raise ValueError(msg)
        if max_val_controls is not None and (
            isinstance(max_val_controls, bool) or not isinstance(max_val_controls, (int, np.integer))
        ):
            msg = f"max_val_controls must be a positive integer or None, got {max_val_controls!r}"
            raise ValueError(msg)
        if max_val_controls is not None and max_val_controls < 1:
            msg = f"max_val_controls must be a positive integer or None, got {max_val_controls!r}"
            raise ValueError(msg)
        if cache is not None and not isinstance(cache, dict):
            msg = f"cache must be a dict (shared between Stacked/Ensemble objects) or None, got {type(cache).__name__}"
            raise ValueError(msg)
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            msg = f"component names must be unique (base and members), got {names}"
            raise ValueError(msg)
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (len(components),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                msg = (
                    f"weights must be {len(components)} non-negative numbers (one per component {names}) with a "
                    f"positive sum, got {weights!r}"
                )
                raise ValueError(msg)
            weights = w / w.sum()
        self.name = name
        self.components = components
        self.validation = validation
        self.refit = bool(refit)
        self.n_seeds = int(n_seeds)
        self.max_val_controls = max_val_controls
        self.fixed_weights = weights
        self.cache = cache
        self.objective = objective
        self._fallback = fallback
        self.weights_: dict[str, float] = {}
        self.validation_: dict[str, Any] = {}
        self.last_resources: dict[str, Any] = {}

    # ------------------------------------------------------------------ members
    def _component_predict(
        self,
        comp: Predictor,
        data: AnnData,
        requests: list[PredictionRequest],
        *,
        seed: int,
        stage: str,
        covariate_keys: Sequence[str],
        layer: str | None,
    ) -> dict[str, np.ndarray | str]:
        """One component's predictions (mean over ``n_seeds`` fits), from the cache when it holds them."""
        key = None
        if self.cache is not None:
            key = (comp.name, stage, int(seed), self.n_seeds, _fingerprint(data, requests))
            if key in self.cache:
                return self.cache[key]
        runs = []
        for s in range(self.n_seeds):
            fit_data = data if isinstance(comp, ModelSpec) else data.copy()  # a ModelSpec copies what it writes
            runs.append(
                comp.fit_predict(
                    fit_data, requests, seed=int(seed) + 1000 * s, covariate_keys=covariate_keys, layer=layer
                )
            )
        out: dict[str, np.ndarray | str] = {}
        for req in requests:
            vals = [r.get(req.condition, f"{comp.name} returned no prediction for {req.condition!r}") for r in runs]
            bad = next((v for v in vals if isinstance(v, str) or isinstance(v, Mapping)), None)
            if bad is not None:
                out[req.condition] = bad if isinstance(bad, str) else f"{comp.name} returned a mapping"
                continue
            arrs = [np.asarray(v, dtype=np.float32) for v in vals]
            shape = (np.asarray(req.controls).size, data.n_vars)
            if any(a.shape != shape or not np.isfinite(a).all() for a in arrs):
                out[req.condition] = f"{comp.name} returned a wrong shape or non-finite values for {req.condition!r}"
                continue
            out[req.condition] = (
                arrs[0] if len(arrs) == 1 else np.mean(arrs, axis=0, dtype=np.float64).astype(np.float32)
            )
        if key is not None:
            self.cache[key] = out
        return out

    # ------------------------------------------------------------------ validation
    def _validation_set(
        self, train: AnnData, *, seed: int, covariate_keys: Sequence[str], layer: str | None
    ) -> tuple[AnnData, np.ndarray, list[PredictionRequest], dict[str, np.ndarray], str] | str:
        """Members' fitting cells, their positions in ``train``, the validation requests and truths, and the mode.

        Or a string saying why there are no validation conditions.
        """
        from vcell.data import context_labels, group_means

        from ._split import split

        if "vcell_split" not in train.obs:
            return "the training data have no obs['vcell_split'] (run through vcell.bench.run or vcell.bench.split)"
        info = dict(train.uns.get("vcell_split", {}))
        kind = info.get("kind")
        mode = self.validation
        if mode == "auto":
            mode = "resplit" if kind in RESPLIT_KINDS else "val"
        labels = train.obs["vcell_split"].astype(str).to_numpy()
        if mode == "val":
            is_val = labels == "val"
            if not is_val.any():
                return "the split has no val cells (val_frac=0?)"
            keep = labels == "train"
            a = train
        else:
            if kind is None:
                return "validation='resplit' needs uns['vcell_split']['kind'] (the split kind to re-draw)"
            params = {k: v for k, v in dict(info.get("params", {})).items() if k not in ("held_out", "held_out_dose")}
            a = _shallow_copy(train)
            a.obs = a.obs.drop(columns="vcell_split")
            try:
                split(a, kind=kind, seed=seed, overwrite=True, **params)
            except ValueError as err:
                return f"re-splitting the training cells ({kind!r}) failed: {err}"
            new = a.obs["vcell_split"].astype(str).to_numpy()
            is_val = new == "test"
            keep = ~is_val
        cond = a.obs[PERT_COL].astype(str).to_numpy()
        dose = a.obs[DOSE_COL].to_numpy(dtype=float) if DOSE_COL in a.obs else np.ones(a.n_obs)
        ctx = context_labels(a.obs, list(covariate_keys))
        is_val &= cond != CONTROL
        if not is_val.any():
            return "no perturbed validation cells"
        keep_pos = np.flatnonzero(keep)
        inner = a[keep].copy()
        inner.uns.pop("vcell_simulation", None)
        in_cond = cond[keep_pos]
        in_ctx = ctx[keep_pos]
        group = np.full(a.n_obs, None, dtype=object)
        keys = pd.Series(cond.astype(object) + "@" + pd.Series(dose).map(repr).to_numpy() + "|" + ctx.astype(object))
        group[is_val] = keys.to_numpy()[is_val]
        names = sorted(set(group[is_val]))
        requests = []
        for i, g in enumerate(names):
            sel = group == g
            ctrl = np.flatnonzero((in_cond == CONTROL) & (in_ctx == ctx[sel][0]))
            if not ctrl.size:
                ctrl = np.flatnonzero(in_cond == CONTROL)
            if not ctrl.size:
                return "no control cells among the members' training cells"
            ctrl = _capped(ctrl, self.max_val_controls, seed, i, tag=23)
            requests.append(PredictionRequest(g, str(cond[sel][0]), float(np.median(dose[sel])), ctrl))
        X = get_matrix(train, layer)
        transform = "log1p_cp10k" if is_count_matrix(X) else None
        means = group_means(X, group, transform=transform)
        truth = {g: means.loc[g].to_numpy(dtype=np.float64) for g in names}
        if self.objective == "pearson_delta":  # the control mean each validation prediction starts from
            Xi = get_matrix(inner, layer)
            for r in requests:
                truth[("ctrl", r.condition)] = _mean_rows(_expression_rows(Xi, r.controls, transform)).astype(
                    np.float64
                )
        return inner, keep_pos, requests, truth, mode

    def _fit_weights(
        self, train: AnnData, *, seed: int, covariate_keys: Sequence[str], layer: str | None
    ) -> tuple[np.ndarray, dict[str, Any], tuple | None]:
        """The weights (fitted on validation conditions, else the fallback with a warning) and what was seen."""
        if self.fixed_weights is not None:
            return self.fixed_weights, {"validation": "fixed weights", "n_val_conditions": 0}, None
        vs = self._validation_set(train, seed=seed, covariate_keys=covariate_keys, layer=layer)
        if isinstance(vs, str):
            msg = f"{self.name}: no validation conditions ({vs}); falling back to {self._fallback_text()}"
            warnings.warn(msg, UserWarning, stacklevel=3)
            logger.warning(msg)
            return self._fallback, {"validation": f"none: {vs}", "n_val_conditions": 0}, None
        inner, keep_pos, requests, truth, mode = vs
        preds = [
            self._component_predict(
                c, inner, requests, seed=seed, stage="val", covariate_keys=covariate_keys, layer=layer
            )
            for c in self.components
        ]
        usable = [r.condition for r in requests if all(not isinstance(p[r.condition], str) for p in preds)]
        info: dict[str, Any] = {"validation": mode, "objective": self.objective, "n_val_conditions": len(usable)}
        if not usable:
            why = "; ".join(
                f"{c.name}: {p[r.condition]}"
                for c, p in zip(self.components, preds, strict=True)
                for r in requests[:1]
                if isinstance(p[r.condition], str)
            )
            msg = f"{self.name}: no validation condition every component can predict ({why}); falling back to "
            msg += self._fallback_text()
            warnings.warn(msg, UserWarning, stacklevel=3)
            logger.warning(msg)
            info["validation"] = f"none: {why}"
            return self._fallback, info, (inner, keep_pos)
        t = np.concatenate([truth[g] for g in usable])
        A = np.column_stack([np.concatenate([p[g].mean(0, dtype=np.float64) for g in usable]) for p in preds])
        if self.objective == "mse":
            w = convex_weights(A, t)
        else:
            P = np.stack([np.stack([p[g].mean(0, dtype=np.float64) for p in preds]) for g in usable])
            C = np.stack([truth[("ctrl", g)] for g in usable])
            w = pearson_delta_weights(P, np.stack([truth[g] for g in usable]), ctrl=C)
        n = len(t)
        for c, col in zip(self.components, A.T, strict=True):
            info[f"val_mse:{c.name}"] = float(np.mean((t - col) ** 2))
        info[f"val_mse:{self.name}"] = float(np.sum((t - A @ w) ** 2) / n)
        info["val_conditions"] = ",".join(g.split("@")[0] + "|" + g.split("|", 1)[1] for g in usable)
        return w, info, (inner, keep_pos)

    def _fallback_text(self) -> str:
        return ", ".join(f"{c.name}={w:.3g}" for c, w in zip(self.components, self._fallback, strict=True))

    # ------------------------------------------------------------------ predictor
    def fit_predict(
        self,
        train: AnnData,
        requests: list[PredictionRequest],
        *,
        seed: int,
        covariate_keys: Sequence[str],
        layer: str | None,
    ) -> dict[str, np.ndarray | str]:
        """Fit the weights on validation conditions, then combine the components' predictions (see the class).

        Parameters
        ----------
        train
            Training cells (train+val of the split, ``obs['vcell_split']``), as :func:`vcell.bench.run` passes them.
        requests
            Conditions to predict.
        seed
            Seed of the components' fits (and of the control subsample of the validation requests).
        covariate_keys
            Context columns.
        layer
            Expression layer (``None``: ``X``).

        Returns
        -------
        Per condition, the combined ``(n_controls, n_genes)`` prediction, or a string saying why none.
        """
        t0 = time.perf_counter()
        w, info, inner = self._fit_weights(train, seed=seed, covariate_keys=covariate_keys, layer=layer)
        t_val = time.perf_counter() - t0
        if self.refit or inner is None:
            data, reqs, stage = train, requests, "full"
        else:  # the members fitted on the train cells only predict the test conditions (their controls mapped)
            data, keep_pos = inner
            where = np.full(train.n_obs, -1, dtype=np.int64)
            where[keep_pos] = np.arange(keep_pos.size)
            reqs = [PredictionRequest(r.condition, r.perturbation, r.dose, where[r.controls]) for r in requests]
            if any((r.controls < 0).any() for r in reqs):
                msg = f"{self.name}: refit=False but some control cells are validation cells"
                raise ValueError(msg)
            stage = "val"
        preds = [
            self._component_predict(c, data, reqs, seed=seed, stage=stage, covariate_keys=covariate_keys, layer=layer)
            if w[i] > 0
            else None
            for i, c in enumerate(self.components)
        ]
        out: dict[str, np.ndarray | str] = {}
        n_renorm = 0
        for req in requests:
            ok = [i for i, p in enumerate(preds) if p is not None and not isinstance(p[req.condition], str)]
            if not ok:
                errs = [f"{c.name}: {p[req.condition]}" for c, p in zip(self.components, preds, strict=True) if p]
                out[req.condition] = f"{self.name}: no component with weight > 0 predicts it ({'; '.join(errs)})"
                continue
            ww = w[ok] / w[ok].sum()
            n_renorm += len(ok) < int((w > 0).sum())
            acc = np.zeros_like(preds[ok[0]][req.condition], dtype=np.float64)
            for wi, i in zip(ww, ok, strict=True):
                acc += wi * preds[i][req.condition]
            out[req.condition] = acc.astype(np.float32)
        self.weights_ = {c.name: float(x) for c, x in zip(self.components, w, strict=True)}
        self.validation_ = info
        self.last_resources = {
            "fit_s": time.perf_counter() - t0,
            "validation_s": t_val,
            **{f"weight:{k}": v for k, v in self.weights_.items()},
            **info,
            "n_renormalised": n_renorm,
        }
        return out


class Stacked(_Combination):
    """A baseline plus learned corrections whose strength is fitted on validation conditions only.

    The prediction is ``base + sum_k a_k (member_k - base)`` with ``a_k >= 0`` and ``sum_k a_k <= 1``: a convex
    combination of the base and the members. The strengths ``a_k`` minimise the squared error of the combined mean
    prediction (all genes, log1p(CP10k)) over the *validation conditions*, predicted by the base and the members
    fitted on the split's ``train`` cells only; then base and members are refitted on train+val (``refit=True``)
    and combined with those strengths for the held-out conditions. A correction that does not generalise to the
    validation conditions gets strength 0, and the model is the base.

    Validation conditions (``validation="auto"``): the split's ``val`` conditions (``obs['vcell_split'] == 'val'``;
    held-out doubles, unseen perturbations... of the same kind as the test ones) for condition-level splits; for
    ``unseen_cell_type`` and ``unseen_dose``, whose ``val`` cells are i.i.d. cells of training conditions, the
    training cells are split again with the same kind and seed (:func:`vcell.bench.split`; another cell type or dose
    level is held out) and its test conditions validate. Each validation condition is a (perturbation, dose, context)
    predicted from the training controls of its context. Conditions that some component cannot predict (``additive``
    and a double with an unseen single) are left out of the fit. Without any validation condition the model warns
    and is the base.

    Parameters
    ----------
    base
        A baseline name (``"control"``, ``"mean"``, ``"additive"``, ``"linear"``), a :class:`ModelSpec` or any
        :class:`Predictor`.
    members
        The corrections: baseline or vcell model class names, :class:`ModelSpec` objects or predictors.
    name
        Label in the results.
    validation
        ``"auto"``, ``"val"`` (the split's val conditions) or ``"resplit"`` (re-split the training cells).
    refit
        Refit base and members on train+val before predicting the held-out conditions (else the fits on the train
        cells predict them).
    n_seeds
        Fits per component, with seeds ``seed + 1000 * i``, whose predictions are averaged (a seed ensemble).
    max_val_controls
        Most control cells a validation prediction starts from (seeded subsample; ``None``: all).
    weights
        Fixed weights (base first, then the members; normalised to sum 1) instead of fitted ones: e.g.
        ``[0, 1]`` is the member alone. No validation fit then.
    cache
        A dict shared between :class:`Stacked` / :class:`Ensemble` objects of one benchmark: a component's
        predictions are computed once per (name, stage, seed, cells, requests) and reused, so the same member is
        not retrained by every combination. Components with the same name must then be the same model.
    objective
        What the weights optimise over the validation conditions: ``"mse"`` (squared error of the mean prediction,
        exact by :func:`convex_weights`) or ``"pearson_delta"`` (mean Pearson correlation of predicted and true
        changes from the controls, :func:`pearson_delta_weights` on a 0.05 grid; at most 4 components).

    Attributes
    ----------
    weights_
        Fitted weight of each component (base and members) at the last :meth:`fit_predict`; the strength of the
        correction is ``1 - weights_[base]``.
    validation_
        How they were fitted: ``validation`` mode, ``n_val_conditions``, ``val_conditions``, and the validation MSE
        of every component alone (``val_mse:<name>``) and of the combination.
    last_resources
        Both of the above (weights as ``weight:<name>``) and ``fit_s``: :func:`run` writes them into its timings.

    Examples
    --------
    >>> import vcell
    >>> adata = vcell.datasets.simulate(n_cells=600, n_genes=30, n_perturbations=6, n_combos=10, seed=0)
    >>> model = vcell.bench.Stacked(base="additive", members=["linear"])
    >>> res = vcell.bench.run(
    ...     adata, models=["additive", model], splits=["combo_half"], seeds=[0], metrics=["pearson_delta"]
    ... )
    >>> sorted(model.weights_)
    ['additive', 'linear']
    >>> "weight:linear" in res.timings
    True
    """

    def __init__(
        self,
        base: str | Predictor = "additive",
        members: Sequence[str | Predictor] = (),
        *,
        name: str = "stacked",
        validation: str = "auto",
        refit: bool = True,
        n_seeds: int = 1,
        max_val_controls: int | None = 500,
        weights: Sequence[float] | None = None,
        cache: dict | None = None,
        objective: str = "mse",
    ) -> None:
        if isinstance(base, str) and base not in BASELINE_METHODS:
            msg = f"unknown base {base!r}: use one of the baselines {BASELINE_METHODS}, a ModelSpec or a Predictor"
            raise ValueError(msg)
        if not isinstance(base, str) and not isinstance(base, Predictor):
            msg = f"base must be a baseline name, a ModelSpec or a Predictor, got {type(base).__name__}"
            raise ValueError(msg)
        if isinstance(members, (str, Predictor)) or not len(members):
            msg = "members must be a non-empty list of model names, ModelSpec objects or predictors"
            raise ValueError(msg)
        components = _resolve_models([base, *members])
        fallback = np.zeros(len(components))
        fallback[0] = 1.0
        super().__init__(
            components,
            name=name,
            validation=validation,
            refit=refit,
            n_seeds=n_seeds,
            max_val_controls=max_val_controls,
            weights=weights,
            cache=cache,
            fallback=fallback,
            objective=objective,
        )
        self.base = components[0]
        self.members = components[1:]


class Ensemble(_Combination):
    """A convex combination of predictors with weights fitted on validation conditions only.

    The weights ``w_k >= 0``, ``sum_k w_k = 1`` minimise the squared error of the combined mean prediction (all
    genes, log1p(CP10k)) over the validation conditions, predicted by the members fitted on the split's ``train``
    cells; the members are then refitted on train+val and combined. Validation conditions as in :class:`Stacked`;
    without any, the ensemble warns and averages the members with equal weights. Members that include a baseline
    make it a :class:`Stacked` model with several corrections.

    Parameters
    ----------
    members
        At least two members: baseline or vcell model class names, :class:`ModelSpec` objects or predictors.
        A seed ensemble of one model: ``n_seeds``.
    name, validation, refit, n_seeds, max_val_controls, cache, objective
        As in :class:`Stacked`.
    weights
        Fixed weights (one per member, normalised) instead of fitted ones.

    Attributes
    ----------
    weights_, validation_, last_resources
        As in :class:`Stacked`.

    Examples
    --------
    >>> import vcell
    >>> adata = vcell.datasets.simulate(n_cells=600, n_genes=30, n_perturbations=6, n_combos=10, seed=0)
    >>> ens = vcell.bench.Ensemble(["mean", "linear"])
    >>> res = vcell.bench.run(adata, models=[ens], splits=["combo_half"], seeds=[0], metrics=["pearson_delta"])
    >>> round(sum(ens.weights_.values()), 6)
    1.0
    """

    def __init__(
        self,
        members: Sequence[str | Predictor],
        *,
        name: str = "ensemble",
        validation: str = "auto",
        refit: bool = True,
        n_seeds: int = 1,
        max_val_controls: int | None = 500,
        weights: Sequence[float] | None = None,
        cache: dict | None = None,
        objective: str = "mse",
    ) -> None:
        if isinstance(members, (str, Predictor)) or len(members) < 2:
            msg = "an Ensemble needs at least two members (model names, ModelSpec objects or predictors)"
            raise ValueError(msg)
        components = _resolve_models(list(members))
        super().__init__(
            components,
            name=name,
            validation=validation,
            refit=refit,
            n_seeds=n_seeds,
            max_val_controls=max_val_controls,
            weights=weights,
            cache=cache,
            fallback=np.full(len(components), 1.0 / len(components)),
            objective=objective,
        )
        self.members = components
