"""Closed-form baselines: control, mean, additive, linear (BENCHMARK.md) and interaction (fitted on training doubles)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from vcell._constants import CONTROL, DOSE_COL, PERT_COL
from vcell._settings import logger
from vcell._utils import group_means
from vcell.data._vocab import _components
from vcell.module import BASELINE_METHODS, INTERACTION_FEATURES, BaselineModule, fit_interaction

from ._base import Capabilities, PerturbationModel, check_hyperparameters

if TYPE_CHECKING:
    from anndata import AnnData

EmbeddingSpec = Literal["auto", "gene", "training"] | pd.DataFrame


class Baseline(PerturbationModel):
    """Closed-form baselines of perturbation response, behind the interface of every vcell model.

    All work in log1p(CP10k) space and shift each control cell (so predicted cells keep the control
    cells' variation); the shift is estimated against the control mean of the same context (covariates
    and batch). Effects are taken as linear in dose.

    * ``control``: no change.
    * ``mean``: the mean shift of all perturbed training cells (the baseline that matched GEARS on Norman).
    * ``additive``: sum of the single perturbations' shifts; for a context where a single was not seen
      (cell-type transfer), its mean shift over the contexts where it was seen.
    * ``linear``: Ahlmann-Eltze et al. 2025, ``Y ~ G W P^T + b`` fitted by ridge regression on the training
      conditions' mean shifts ``Y`` (genes x conditions), ``G`` = top ``n_components`` principal
      components of ``Y`` (genes), ``b`` = mean shift, ``P`` = perturbation embedding: rows of ``G`` for
      perturbed genes (``"gene"``), the training conditions' principal-component scores (``"training"``,
      seen singles only), or a given table (index = single perturbations). Combinations sum their singles'
      embeddings.
    * ``interaction``: a genetic-interaction model in the spirit of Norman et al. 2019 (Science), whose double
      ``A+B`` responds ``c1 dA + c2 dB + c3 dA ⊙ dB`` (``dA``, ``dB`` the singles' shifts, per gene). For an unseen
      double the pair's own coefficients are unknown, so one set shared by all pairs and genes is fitted on the
      *training* doubles' mean shifts: ``c1 (dA + dB) + c3 dA ⊙ dB + c4 median(dA, dB, 0)``, where
      ``median(dA, dB, 0)`` is ``sign * min(|dA|, |dB|)`` for a gene both singles move the same way and 0 otherwise
      (saturation when ``c4 < 0``, synergy when ``c4 > 0``). ``dA``, ``dB`` are ``additive``'s per-context shifts
      (scaled by dose); a combination of more than two singles sums the pair terms over its pairs. The fit is a ridge
      regression of each training double's residual from additivity on these three features, shrunk towards
      ``additive`` (``c1 = 1, c3 = c4 = 0``) by a penalty relative to each feature's scale, chosen by
      leave-one-double-out cross-validation on the training doubles (:func:`vcell.module.fit_interaction`; the grid
      includes infinity, i.e. ``additive`` itself). Singles are predicted as by ``additive``, and so is every
      combination when training has no double (fewer than two with ``interaction_ridge=None``): a
      :class:`UserWarning` says so. Fitted values: ``interaction_coef_`` (``{"sum": c1, "product": c3,
      "saturation": c4}``), ``interaction_ridge_``, ``interaction_cv_`` and ``n_interaction_doubles_``.

    Parameters
    ----------
    adata
        Data registered with :meth:`setup_anndata`; the model is fitted on all its cells but those with
        ``obs['vcell_split'] == 'test'`` (:func:`vcell.bench.split`), as every vcell model.
    method
        One of ``"control"``, ``"mean"``, ``"additive"``, ``"linear"``, ``"interaction"``.
    n_components
        ``K`` of the linear baseline (capped by the number of training conditions).
    ridge
        Ridge penalty of the linear baseline (Ahlmann-Eltze: 0.1).
    perturbation_embedding
        ``"auto"`` (``"gene"`` when every single perturbation is a measured gene, else ``"training"``),
        ``"gene"``, ``"training"``, or a :class:`pandas.DataFrame` indexed by single perturbation.
    interaction_ridge
        Ridge penalty of the ``interaction`` baseline, relative to each feature's sum of squares (``0``: least
        squares); ``None`` chooses it by leave-one-double-out cross-validation on the training doubles.

    Notes
    -----
    With proteins (a MuData registered with ``setup_anndata(mdata, protein_modality=...)``) every baseline works on
    the joint features: genes in log1p(CP10k) followed by proteins in log1p(counts per 1e4 of the protein library).
    Means over cells skip the cells without protein measurement (NaN or zero-total rows); a protein shift no
    training cell measured is 0. ``linear`` fits one joint ``G`` over genes and proteins. ``predict(...,
    modality="prot")`` returns the protein part; control cells without proteins give NaN rows there (a baseline
    shifts the cell's own values and has none to shift).

    Examples
    --------
    Out of distribution: the IFN-beta-stimulated CD4 T cells are held out (:func:`vcell.bench.split`; the model
    skips ``obs['vcell_split'] == 'test'`` cells) and predicted from the CD4T control cells.

    >>> import vcell
    >>> adata = vcell.datasets.kang2018()
    >>> vcell.bench.split(adata, kind="unseen_cell_type", held_out="CD4T", perturbation_key="perturbation")
    >>> vcell.model.Baseline.setup_anndata(
    ...     adata, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
    ... )
    >>> model = vcell.model.Baseline(adata, method="additive")
    >>> model.train()  # every cell but the test cells: no stimulated CD4T cell
    >>> cd4t = ((adata.obs["cell_type"] == "CD4T") & (adata.obs["perturbation"] == "control")).to_numpy()
    >>> model.predict(perturbation="IFNb", controls=cd4t).shape
    (278, 6998)
    """

    capabilities = Capabilities(learned=False, can_sample=False, models_proteins=True)

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        *,
        method: str = "additive",
        n_components: int = 10,
        ridge: float = 0.1,
        perturbation_embedding: EmbeddingSpec = "auto",
        interaction_ridge: float | None = None,
    ) -> None:
        check_hyperparameters(
            n_components=(n_components, "int>=1"), ridge=(ridge, ">=0"), interaction_ridge=(interaction_ridge, ">=0")
        )
        super().__init__(adata, registry=registry)
        if method not in BASELINE_METHODS:
            msg = f"method must be one of {BASELINE_METHODS}, got {method!r}"
            raise ValueError(msg)
        if isinstance(perturbation_embedding, str) and perturbation_embedding not in ("auto", "gene", "training"):
            msg = f"perturbation_embedding must be 'auto', 'gene', 'training' or a DataFrame, got {perturbation_embedding!r}"
            raise ValueError(msg)
        self.method = method
        self.ridge = float(ridge)
        self.interaction_ridge = None if interaction_ridge is None else float(interaction_ridge)
        self.perturbation_embedding = perturbation_embedding
        n_genes = self.summary_stats["n_vars"] + len(self.protein_names_)  # features: genes, then proteins
        self.contexts_: list[str] = []
        if adata is not None:
            self.contexts_ = sorted(set(self._contexts(adata)))
        n_ctx = max(len(self.contexts_), 1)
        self.n_components = int(n_components)
        self.module = BaselineModule(n_genes, self.vocab.n_atoms, n_ctx, method=method, n_components=self.n_components)
        self._model_summary_string = (
            f"Baseline(method={method!r}): {self.vocab.n_atoms} single perturbations, {n_ctx} contexts"
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ fitting
    def train(self, **kwargs: Any) -> None:
        """Fit the baseline in closed form on the registered cells, except ``obs['vcell_split'] == 'test'`` ones.

        Every fitted quantity is a mean over groups of cells of their shift from the control mean of their context;
        the means are read from the registered matrix in row blocks (:func:`vcell.data.group_sums`), so a sparse or
        backed matrix is never densified.

        Parameters
        ----------
        **kwargs
            Training arguments of the learned models (``max_epochs``, ``batch_size``, ...), accepted so that
            benchmark code can treat every model alike; a closed-form fit ignores them, but checks them as every
            model does (:func:`vcell.model._base.check_train_args`: ``max_epochs=0`` is a ValueError here too).
        """
        self._check_train(**kwargs)
        adata = self.adata
        fit = np.zeros(adata.n_obs, dtype=bool)
        fit[self._non_test_cells(adata)] = True  # as every vcell model: held-out test cells are never fitted
        ctx = self._contexts(adata)
        cond = adata.obs[PERT_COL].astype(str).to_numpy()
        dose = adata.obs[DOSE_COL].to_numpy(dtype=np.float64)
        is_ctrl = fit & (cond == CONTROL)
        if not is_ctrl.any():
            msg = f"no control cells in the training data (obs[{PERT_COL!r}] == {CONTROL!r})"
            raise ValueError(msg)
        pert = fit & ~is_ctrl
        if pert.any():
            single = {c: len(_components(c)) == 1 for c in np.unique(cond[pert])}
            is_single = pert & np.array([single.get(c, False) for c in cond])
            # effects are linear in dose; perturbed cells' doses are > 0 (_check_train), controls' are not used
            per_dose = np.divide(1.0, dose, out=np.zeros_like(dose), where=dose > 0)
            groups = {
                "mean": (np.where(pert, "all", None), None),
                "additive": (np.where(is_single, cond.astype(object) + "\t" + ctx.astype(object), None), per_dose),
            }
            if self.method == "linear":
                groups["linear"] = (np.where(pert, cond, None), per_dose)
            if self.method == "interaction":  # combinations' mean shifts, per context and dose (not per dose unit)
                is_combo = pert & ~is_single
                key = cond.astype(object) + "\t" + ctx.astype(object) + "\t" + dose.astype(str).astype(object)
                groups["interaction"] = (np.where(is_combo, key, None), None)
            means = self._shift_means(adata, ctx, is_ctrl, groups)
            self.module.mean_shift.copy_(torch.as_tensor(np.nan_to_num(means["mean"].to_numpy()[0])))
            self._fit_additive(means["additive"].fillna(0.0))  # proteins no cell measured: no change
            if self.method == "linear":
                self._fit_linear(means["linear"].fillna(0.0))
            if self.method == "interaction":
                self._fit_interaction(means["interaction"].fillna(0.0))
        else:
            logger.info("no perturbed cells in the training data: every baseline predicts no change")
        self.module.eval()
        self.is_trained_ = True

    def _shift_means(
        self, adata: AnnData, ctx: np.ndarray, is_ctrl: np.ndarray, groups: dict[str, tuple[np.ndarray, Any]]
    ) -> dict[str, pd.DataFrame]:
        """Per group, the mean over its cells of ``w * (x - ref)``: features (genes, then proteins) x groups.

        ``groups`` maps a name to (label per cell, ``None`` outside every group; weight ``w`` per cell or ``None``
        for 1). ``x`` is a cell's log1p(CP10k) expression (the registered values for log data) and ``ref`` the mean
        of the control cells ``is_ctrl`` of its context (of all of them for a context without controls). Genes are
        read once, in row blocks: the mean of ``w * (x - ref)`` is that of ``w * x`` minus that of ``w * ref``, and
        ``ref`` takes one value per context. Proteins (dense in ``obsm``, NaN for cells without measurement) skip NaN.
        """
        from scipy import sparse

        from vcell._utils import get_matrix
        from vcell.data._chunked import _design, group_sums

        ref_ctx = pd.Index(sorted(set(ctx[is_ctrl])))
        ref_row = ref_ctx.get_indexer(ctx)
        ref_row[ref_row < 0] = len(ref_ctx)  # contexts without controls: the mean of all controls
        n = len(ctx)
        ref_of = sparse.csr_matrix((np.ones(n), (np.arange(n), ref_row)), shape=(n, len(ref_ctx) + 1))
        designs, blocks = {}, []
        for name, (labels, weights) in groups.items():
            ind, index = _design(labels)
            W = ind if weights is None else ind @ sparse.diags(np.asarray(weights, dtype=np.float64))
            designs[name] = (index, W, np.asarray(ind.sum(axis=1)).ravel())
            blocks.append(W)
        ctrl_ind, _ = _design(np.where(is_ctrl, ctx, None))  # rows in the order of ref_ctx (sorted)
        all_ctrl = sparse.csr_matrix(is_ctrl.astype(np.float64)[None])
        n_ref = ctrl_ind.shape[0] + 1
        sums, _ = group_sums(
            get_matrix(adata, self._layer()),
            sparse.vstack([ctrl_ind, all_ctrl, *blocks]),
            transform="log1p_cp10k" if self.counts_ else None,
        )
        ref = sums[:n_ref] / np.asarray(sparse.vstack([ctrl_ind, all_ctrl]).sum(axis=1))  # context control means
        P = self._cell_proteins(adata)
        if P is not None:  # proteins: in memory already, NaN rows skipped
            ctrl_means = group_means(P[is_ctrl], ctx[is_ctrl], skipna=True).reindex(ref_ctx).to_numpy()
            glob = group_means(P[is_ctrl], np.zeros(int(is_ctrl.sum())), skipna=True).to_numpy()
            D = P - np.vstack([ctrl_means, glob])[ref_row]
        out, row = {}, n_ref
        for name, (index, W, n_cells) in designs.items():
            k = len(index)
            means = (sums[row : row + k] - (W @ ref_of) @ ref) / np.maximum(n_cells, 1)[:, None]
            row += k
            if P is not None:
                labels, weights = groups[name]
                inside = np.flatnonzero(pd.notna(labels))
                w = np.ones(len(inside)) if weights is None else np.asarray(weights)[inside]
                prot = group_means(D[inside] * w[:, None], labels[inside], skipna=True).reindex(index).to_numpy()
                means = np.hstack([means, prot.reshape(k, P.shape[1])])
            out[name] = pd.DataFrame(means, index=index)
        return out

    def _fit_additive(self, means: pd.DataFrame) -> None:
        """Per-dose shift of each single perturbation in each context (``means`` indexed by single, tab, context)."""
        shifts = np.zeros(self.module.atom_shift.shape, dtype=np.float64)
        seen = np.zeros(self.module.atom_seen.shape, dtype=bool)
        atom_index = {a: i for i, a in enumerate(self.vocab.atoms)}
        ctx_index = {c: i for i, c in enumerate(self.contexts_)}
        for key, row in zip(means.index, means.to_numpy(), strict=True):
            a, c = key.split("\t")
            shifts[ctx_index[c], atom_index[a]] = row
            seen[ctx_index[c], atom_index[a]] = True
        n_ctx = len(self.contexts_)
        counts = seen[:n_ctx].sum(0)  # contexts in which each single was seen
        fallback = shifts[:n_ctx].sum(0) / np.maximum(counts, 1)[:, None]
        shifts[n_ctx] = fallback
        seen[n_ctx] = counts > 0
        for c in range(n_ctx):
            shifts[c][~seen[c]] = fallback[~seen[c]]
        self.atoms_seen_as_single_ = [a for a, s in zip(self.vocab.atoms, counts > 0, strict=True) if s]
        self.module.atom_shift.copy_(torch.as_tensor(shifts))
        self.module.atom_seen.copy_(torch.as_tensor(seen))

    def _fit_interaction(self, means: pd.DataFrame) -> None:
        """Coefficients of the ``interaction`` baseline from the training combinations' mean shifts ``means``.

        ``means`` is indexed by condition, tab, context, tab, dose. Each combination whose singles were all seen as
        singles contributes its residual from additivity and its pair features (:meth:`BaselineModule.pair_features`,
        from the singles' training shifts) as sufficient statistics per condition; :func:`vcell.module.fit_interaction`
        fits the shared coefficients. Without usable combinations the model is ``additive`` (with a warning).
        """
        seen = set(self.atoms_seen_as_single_)
        ctx_index = {c: i for i, c in enumerate(self.contexts_)}
        usable = []
        for i, key in enumerate(means.index.astype(str)):
            c, context, d = key.split("\t")
            if all(a in seen for a in _components(c)):
                usable.append((i, c, ctx_index[context], float(d)))
        conditions = sorted({c for _, c, _, _ in usable})
        self.n_interaction_doubles_ = len(conditions)
        self.interaction_cv_: dict[float, float] = {}
        self.interaction_ridge_: float | None = None
        self.module.gi_coef.copy_(torch.tensor([1.0, 0.0, 0.0]))
        need = 1 if self.interaction_ridge is not None else 2
        if len(conditions) < need:
            msg = (
                f"Baseline('interaction'): {len(conditions)} training combination(s) with every single seen (needs "
                f"{need}{'' if self.interaction_ridge is not None else ' to choose the ridge by cross-validation'}); "
                "falling back to the additive baseline for every combination"
            )
            warnings.warn(msg, UserWarning, stacklevel=3)
            self._set_interaction_coef()
            return
        n_feat = len(INTERACTION_FEATURES)
        xtx, xty, yty = (
            np.zeros((len(conditions), n_feat, n_feat)),
            np.zeros((len(conditions), n_feat)),
            np.zeros(len(conditions)),
        )
        row_of = {c: j for j, c in enumerate(conditions)}
        Y = means.to_numpy(dtype=np.float64)
        with torch.no_grad():
            module = self.module.to("cpu")
            for i, c, k, d in usable:  # one row per combination, context and dose: features x genes, small
                enc = torch.as_tensor(self.vocab.encode([c], d))
                s, product, saturation, _ = module.pair_features(enc, torch.tensor([k]))
                X = torch.stack([s[0], product[0], saturation[0]], 1).numpy().astype(np.float64)  # genes x 3
                r = Y[i] - X[:, 0]
                j = row_of[c]
                xtx[j] += X.T @ X
                xty[j] += X.T @ r
                yty[j] += r @ r
        beta, lam, cv = fit_interaction(xtx, xty, yty, ridge=self.interaction_ridge)
        self.interaction_ridge_, self.interaction_cv_ = lam, cv
        self.module.gi_coef.copy_(torch.as_tensor(beta + np.array([1.0, 0.0, 0.0])))
        self._set_interaction_coef()

    def _set_interaction_coef(self) -> None:
        self.interaction_coef_ = dict(zip(INTERACTION_FEATURES, self.module.gi_coef.tolist(), strict=True))

    def _embedding_mode(self) -> str | pd.DataFrame:
        spec = self.perturbation_embedding
        if isinstance(spec, pd.DataFrame) or spec != "auto":
            return spec
        genes = set(self.var_names_)
        return "gene" if self.vocab.n_atoms and all(a in genes for a in self.vocab.atoms) else "training"

    def _fit_linear(self, means: pd.DataFrame) -> None:
        """Ridge fit of ``Y ~ G W P^T + b`` on the per-dose mean shifts of the training conditions (``means``)."""
        Y = means.to_numpy().T.astype(np.float64)  # features (genes, proteins) x conditions
        conditions = list(means.index.astype(str))
        b = Y.mean(1)
        Yc = Y - b[:, None]
        U, S, Vt = np.linalg.svd(Yc, full_matrices=False)
        K = self.n_components
        k = min(K, len(conditions))
        G = np.zeros((Y.shape[0], K))
        G[:, :k] = U[:, :k]
        mode = self._embedding_mode()
        P_atoms = np.zeros((self.vocab.n_atoms, K))
        ok = np.zeros(self.vocab.n_atoms, dtype=bool)
        if isinstance(mode, pd.DataFrame):
            emb = mode.reindex(self.vocab.atoms)
            ok = emb.notna().all(1).to_numpy()
            width = min(K, emb.shape[1])
            P_atoms[:, :width] = np.nan_to_num(emb.to_numpy(dtype=np.float64))[:, :width]
        elif mode == "gene":
            gene_index = {g: i for i, g in enumerate(self.var_names_)}
            for i, a in enumerate(self.vocab.atoms):
                if a in gene_index:
                    P_atoms[i] = G[gene_index[a]]
                    ok[i] = True
        else:  # training: principal-component scores of the seen singles
            scores = Vt[:k].T * S[:k]  # conditions x k
            for j, c in enumerate(conditions):
                parts = _components(c)
                if len(parts) == 1:
                    i = self.vocab.atoms.index(parts[0])
                    P_atoms[i, :k] = scores[j] / max(S[0], 1e-12)
                    ok[i] = True
        enc = self.vocab.encode(conditions).astype(np.float64)  # conditions x atoms
        usable = (enc[:, ~ok].sum(1) == 0) if (~ok).any() else np.ones(len(conditions), dtype=bool)
        P = enc[usable] @ P_atoms  # conditions x K
        Yu = Yc[:, usable]
        lam = self.ridge
        W = np.linalg.solve(G.T @ G + lam * np.eye(K), G.T @ Yu @ P) @ np.linalg.inv(P.T @ P + lam * np.eye(K))
        m = self.module  # np.array: writable copies (pandas 3 hands out read-only arrays)
        m.lin_G.copy_(torch.as_tensor(np.array(G)))
        m.lin_W.copy_(torch.as_tensor(np.array(W)))
        m.lin_b.copy_(torch.as_tensor(np.array(b)))
        m.lin_P.copy_(torch.as_tensor(np.array(P_atoms)))
        m.lin_P_ok.copy_(torch.as_tensor(np.array(ok)))
        self.linear_embedding_mode_ = mode if isinstance(mode, str) else "table"

    def _features(self, adata: AnnData, idx: np.ndarray | None = None) -> np.ndarray:
        """log1p(CP10k) expression of cells ``idx`` (all: ``None``), then their proteins (NaN rows if unmeasured)."""
        E, P = self._expression(adata, idx), self._cell_proteins(adata, idx)
        return E if P is None else np.hstack([E, P])

    # ------------------------------------------------------------------ prediction
    def _check_predictable(self, perturbation: str) -> None:
        if self.method in ("control", "mean"):
            return  # these predict the same for every perturbation, seen or not
        parts = _components(perturbation)
        if self.method == "linear":
            self._linear_embedding(perturbation)  # raises for a component without an embedding
            return
        self.vocab.check([perturbation], what=f"Baseline({self.method!r})")
        if self.method in ("additive", "interaction"):
            missing = [a for a in parts if a not in set(getattr(self, "atoms_seen_as_single_", self.vocab.atoms))]
            if missing:
                msg = f"{self.method} baseline needs every component of {perturbation!r} seen as a single; not seen: {missing}"
                raise KeyError(msg)

    def _linear_embedding(self, perturbation: str) -> np.ndarray:
        """Embedding ``p`` (length ``K``) of a condition: the sum of its singles' embeddings.

        A single in the training vocabulary uses its fitted row; one outside it (an unseen perturbation)
        uses its gene's row of ``G`` in ``"gene"`` mode, or its row of the given embedding table.
        """
        m = self.module
        K = m.lin_P.shape[1]
        mode = getattr(self, "linear_embedding_mode_", "training")
        ok = m.lin_P_ok.cpu().numpy()
        gene_index = {g: i for i, g in enumerate(self.var_names_)}
        table = self.perturbation_embedding if isinstance(self.perturbation_embedding, pd.DataFrame) else None
        out, missing = np.zeros(K), []
        for a in _components(perturbation):
            i = self.vocab.atoms.index(a) if a in self.vocab.atoms else -1
            if i >= 0 and ok[i]:
                out += m.lin_P[i].cpu().numpy()
            elif mode == "gene" and a in gene_index:
                out += m.lin_G[gene_index[a]].cpu().numpy()
            elif table is not None and a in table.index and table.loc[a].notna().all():
                row = table.loc[a].to_numpy(dtype=np.float64)[:K]
                out[: row.size] += row
            else:
                missing.append(a)
        if missing:
            msg = (
                f"linear baseline has no perturbation embedding for {missing} (embedding mode {mode!r}: "
                "'training' covers singles seen in training, 'gene' measured genes); pass perturbation_embedding="
                "a DataFrame indexed by perturbation"
            )
            raise KeyError(msg)
        return out.astype(np.float32)

    def predict(
        self,
        adata: AnnData | None = None,
        *,
        perturbation: str,
        controls: Any = None,
        dose: float = 1.0,
        seed: int | None = None,
        modality: str = "rna",
    ) -> np.ndarray:
        """Counterfactual expression of control cells under ``perturbation`` (float32, in the space asked for).

        The baseline computes in log1p(CP10k) (the registered values for log data); ``space`` converts the result.

        Parameters
        ----------
        adata
            Data holding the control cells (same genes as in training); ``None`` uses the training data.
        perturbation
            Canonical condition, e.g. ``"IFNb"`` or ``"A+B"``; ``"control"`` returns the cells unchanged.
        controls
            Cells to start from: ``None`` (all control cells), a boolean mask, indices or obs names.
        dose
            Dose of the perturbation (effects are linear in dose).
        seed
            Unused (the baselines are deterministic); accepted for a uniform interface.
        modality
            ``"rna"`` or, for a model registered with proteins, ``"prot"`` (log1p(counts per 1e4 of the protein
            library); NaN rows for control cells without protein measurement).
        space
            Expression space of the returned RNA (:meth:`vcell.model.PerturbationModel.predict`): ``None`` (the model's
            ``output_space``), ``"log1p_cp10k"``, ``"median"``, ``"model"``, a target sum or an ``ExpressionSpace``.

        Returns
        -------
        Array of shape ``(n_selected_cells, n_genes)`` (``"prot"``: ``(n_selected_cells, n_proteins)``).
        """
        return super().predict(
            adata, perturbation=perturbation, controls=controls, dose=dose, seed=seed, modality=modality
        )

    def _context_codes(self, adata: AnnData, idx: np.ndarray) -> np.ndarray:
        """Context index of cells ``idx`` (``-1``: a context unseen in training)."""
        ctx_index = {c: i for i, c in enumerate(self.contexts_)}
        return np.array([ctx_index.get(c, -1) for c in self._contexts(adata)[idx]], dtype=np.int64)

    def _modality_part(self, out: np.ndarray, modality: str) -> np.ndarray:
        """The genes (``"rna"``) or proteins (``"prot"``) of joint features ``out``, float32, C-contiguous."""
        n_genes = self.summary_stats["n_vars"]
        part = slice(0, n_genes) if modality == "rna" else slice(n_genes, None)
        return np.ascontiguousarray(out[:, part], dtype=np.float32)

    def _shifted(self, X: np.ndarray, ctx: np.ndarray, perturbation: str, dose: float) -> np.ndarray:
        """Counterfactual features of cells ``X`` (contexts ``ctx``) under ``perturbation``: ``clamp(x + shift, 0)``.

        The shift depends on the cell only through its context, so it is computed once per context present (the
        module's :meth:`~vcell.module.BaselineModule.shift` on one row per context: matrix products of the
        perturbation's code with that context's shifts) and added to each cell; nothing of size cells x
        perturbations x genes is built. ``control`` returns a copy of ``X``.
        """
        if perturbation == CONTROL:
            return X.copy()
        if self.method in ("additive", "interaction"):
            enc = self.vocab.encode([perturbation], dose)
        else:  # the other baselines do not read the code: any non-zero code means "perturbed"
            enc = np.full((1, self.vocab.n_atoms), dose / max(self.vocab.n_atoms, 1), dtype=np.float32)
        contexts, rows = np.unique(ctx, return_inverse=True)
        emb = None
        if self.method == "linear":
            emb = torch.as_tensor(
                np.repeat((self._linear_embedding(perturbation) * np.float32(dose))[None], len(contexts), 0)
            )
        with torch.no_grad():
            module = self.module.to("cpu")
            shift = module.shift(torch.as_tensor(np.repeat(enc, len(contexts), 0)), torch.as_tensor(contexts), emb)
            x = torch.as_tensor(X)
            if len(contexts) == 1:
                out = x + shift[0]
            else:  # the cells' shifts gathered into the output, then added to in place: one cells x genes array
                out = shift[torch.as_tensor(rows.reshape(-1))]
                out = out.add_(x) if out.dtype == torch.result_type(out, x) else out + x
            out.clamp_(min=0.0)
        return out.numpy()

    def _predict(
        self,
        adata: AnnData,
        idx: np.ndarray,
        perturbations: list[str],
        *,
        dose: float,
        seed: int | None,
        modalities: tuple[str, ...],
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """Every perturbation checked now; then the cells' features and contexts read once, shifts per context."""
        for perturbation in perturbations:
            if perturbation != CONTROL:
                self._check_predictable(perturbation)

        def run() -> Iterator[tuple[str, dict[str, np.ndarray]]]:
            X, ctx = self._features(adata, idx), self._context_codes(adata, idx)
            for p in perturbations:
                out = self._shifted(X, ctx, p, dose)
                yield p, {m: self._modality_part(out, m) for m in modalities}

        return run()
