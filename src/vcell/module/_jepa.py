"""Joint-embedding predictive pretraining over gene-module tokens, and a latent perturbation transition (pure torch).

**Tokens are gene modules.** Module ``k`` holds a set of genes (buffers ``gene_index`` / ``gene_mask``, padded to the
largest module). Its token is a learned linear map of its genes' standardised log1p values (``(x - gene_mean) /
gene_std``, buffers) plus a learned module-id embedding. A gene may belong to several modules.

**Pretraining** (:class:`JEPAModule`): for each cell a random share ``mask_ratio`` of the modules is masked. The
context encoder sees the visible modules only: masked tokens are dropped (transformer key-padding mask, or left out
of the pooled mean of the MLP encoder) and every gene of a masked module is set to its mean (0 after
standardisation) in the visible tokens too, so a gene shared with a masked module never leaks. The target encoder (an
EMA copy of the context encoder, or the context encoder itself under stop-gradient with ``ema=False``) sees all
modules; its output tokens of the masked modules, layer-normalised, are the targets. A predictor maps the context
tokens plus mask tokens carrying the masked modules' ids to predicted target embeddings; the loss is their mean
squared error (``objective="jepa"``). ``objective="reconstruction"`` (the control arm) instead decodes the masked
modules' genes from the same predictor outputs, with a mean squared error in log1p space. With ``anti_collapse``,
VICReg variance (hinge on each dimension's std of the cell embeddings, target 1) and covariance (squared
off-diagonal covariance) terms on the context cell embeddings are added. The cell embedding is the mean of the
encoder's output tokens (``n_latent`` dimensions). Every step logs the embedding std and effective rank.

**Transition** (:class:`LatentTransitionModule`): ``z_pert = z_ctrl + g(c, cov) - g(0, cov)`` with ``c`` the
:class:`~vcell.module.PerturbationEncoder` vector (a combination sums its singles' operators) and ``cov`` learned
covariate embeddings (so a control maps to itself), trained by MSE in embedding space; plus a decoder from
embeddings to log1p(CP10k) expression.

**Proteins** (``n_proteins > 0``, CITE-seq): the cell's protein values (log1p(counts per 1e4 of its protein library),
standardised with buffers ``protein_mean`` / ``protein_std``; ``batch[PROTEIN_LOG_KEY]``, a NaN row for a cell without
protein measurement) form one more token, the last: a learned linear map of all proteins plus a learned token-id
embedding. It is masked like a module (independently, with probability ``mask_ratio``), so the predictor learns to
predict proteins from RNA and RNA modules from proteins plus the visible modules. A cell without proteins has its
protein token hidden everywhere (context and target encoders; the predictor gets the mask token there) and it
never enters the loss. The cell embedding is the mean of the visible output tokens, the protein token included
where measured (a joint latent). :class:`LatentTransitionModule` then has a second decoder head for the proteins,
fitted by MSE on the measured cells only. With ``n_proteins=0`` none of this exists and the modules are exactly the
RNA-only ones (same parameters, same random draws).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vcell._constants import REGISTRY_KEYS

from ._base import VCellModule
from ._causal_vae import EXTRA_NODES_KEY, LossOutput
from ._perturbation_encoders import (
    DoseResponse,
    GeneGraphOperators,
    OneHotOperators,
    PerturbationEncoder,
    TableOperators,
    mlp,
)

ENCODERS = ("transformer", "mlp")
OBJECTIVES = ("jepa", "reconstruction")
#: batch keys: module mask of each cell (``True`` = masked); source / target embeddings of the transition
MASK_KEY = "module_mask"
#: batch key of the protein values (log1p(counts per 1e4 of the protein library); NaN rows: not measured)
PROTEIN_LOG_KEY = "protein_log1p"
SOURCE_Z_KEY = "z_source"
TARGET_Z_KEY = "z_target"


# ---------------------------------------------------------------------------------------------- pure functions
@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """Exponential moving average of parameters: ``t <- m t + (1 - m) o`` for every parameter pair (in place).

    Buffers are copied from ``online``. ``target`` and ``online`` must have the same structure.

    Examples
    --------
    >>> t, o = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    >>> _ = t.weight.data.fill_(1.0), o.weight.data.fill_(3.0)
    >>> ema_update(t, o, 0.75)
    >>> float(t.weight.detach())
    1.5
    """
    if not 0.0 <= float(momentum) <= 1.0:
        msg = f"momentum must be in [0, 1], got {momentum!r}"
        raise ValueError(msg)
    tp, op = list(target.parameters()), list(online.parameters())
    if len(tp) != len(op) or any(a.shape != b.shape for a, b in zip(tp, op, strict=True)):
        msg = "target and online modules must have the same parameters"
        raise ValueError(msg)
    for t, o in zip(tp, op, strict=True):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)


def variance_loss(z: torch.Tensor, *, target: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """VICReg variance term: mean over dimensions of ``relu(target - sqrt(var + eps))`` of the batch ``z`` ``(n, d)``."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(target - std).mean()


def covariance_loss(z: torch.Tensor) -> torch.Tensor:
    """VICReg covariance term: sum of squared off-diagonal covariances of ``z`` ``(n, d)``, divided by ``d``."""
    n, d = z.shape
    zc = z - z.mean(dim=0)
    cov = zc.T @ zc / max(n - 1, 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return (off**2).sum() / d


def _effective_rank(z: torch.Tensor) -> torch.Tensor:
    """:func:`effective_rank` as a 0-d tensor on ``z``'s device (no host sync)."""
    z = z.detach().to(torch.float64)
    s = torch.linalg.svdvals(z - z.mean(dim=0))
    p = s / s.sum().clamp(min=1e-300)
    entropy = -(torch.where(p > 0, p * p.clamp(min=1e-300).log(), p.new_zeros(())).sum())
    return torch.where(s.sum() > 0, torch.exp(entropy), s.new_ones(()))


def effective_rank(z: torch.Tensor | np.ndarray) -> float:
    """``exp`` of the entropy of the normalised singular values of the centred matrix ``z`` ``(n, d)`` (1 to ``d``).

    Examples
    --------
    >>> round(effective_rank(np.eye(4)), 3)
    3.0
    """
    return float(_effective_rank(torch.as_tensor(np.asarray(z) if isinstance(z, np.ndarray) else z)))


def cosine_error(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """``1 - cos(pred_i, true_i)`` for each row pair of ``pred`` and ``true`` ``(n, d)`` (1 for a zero row)."""
    pred, true = np.atleast_2d(np.asarray(pred, dtype=np.float64)), np.atleast_2d(np.asarray(true, dtype=np.float64))
    denom = np.linalg.norm(pred, axis=1) * np.linalg.norm(true, axis=1)
    cos = np.where(denom > 0, (pred * true).sum(1) / np.where(denom > 0, denom, 1.0), 0.0)
    return 1.0 - cos


def retrieval_ranks(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Rank (1 = nearest) of ``true[i]`` among all rows of ``true`` by cosine similarity to ``pred[i]``.

    Ties count against the match (a tie with another row gives the worse rank).

    Examples
    --------
    >>> retrieval_ranks(np.array([[1.0, 0.1], [1.0, 0.0]]), np.array([[0.0, 1.0], [1.0, 0.0]]))
    array([2, 1])
    """
    pred, true = np.atleast_2d(np.asarray(pred, dtype=np.float64)), np.atleast_2d(np.asarray(true, dtype=np.float64))
    if pred.shape != true.shape:
        msg = f"pred and true must have the same shape, got {pred.shape} and {true.shape}"
        raise ValueError(msg)

    def unit(a: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(a, axis=1, keepdims=True)
        return a / np.where(norm > 0, norm, 1.0)

    sim = unit(pred) @ unit(true).T
    own = np.diagonal(sim)[:, None]
    return (sim >= own - 1e-12).sum(axis=1).astype(np.int64)


# ---------------------------------------------------------------------------------------------- encoder parts
def module_index(modules: Sequence[Sequence[int]], n_genes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ``(n_modules, max_size)`` gene indices (padding: ``n_genes``) and validity mask of ``modules``."""
    if len(modules) < 2:
        msg = f"at least 2 gene modules are needed (one visible, one masked), got {len(modules)}"
        raise ValueError(msg)
    size = max(len(m) for m in modules)
    if min(len(m) for m in modules) < 1:
        msg = "every gene module needs at least one gene"
        raise ValueError(msg)
    index = torch.full((len(modules), size), int(n_genes), dtype=torch.long)
    for k, genes in enumerate(modules):
        genes = np.asarray(genes, dtype=np.int64)
        if genes.min() < 0 or genes.max() >= n_genes:
            msg = f"module {k} has gene indices outside [0, {n_genes})"
            raise ValueError(msg)
        index[k, : len(genes)] = torch.as_tensor(genes)
    return index, index < int(n_genes)


class TokenMixer(nn.Module):
    """Mixes ``(n, n_tokens, dim)`` tokens; hidden tokens (``hidden`` ``(n, n_tokens)``, ``True``) are not read.

    ``kind="transformer"``: a pre-norm :class:`torch.nn.TransformerEncoder` with a key-padding mask.
    ``kind="mlp"``: ``h = MLP(token)``, ``out = h + MLP(mean of h over the visible tokens)`` (a DeepSets mixer).
    """

    def __init__(self, dim: int, *, kind: str, n_layers: int, n_heads: int, n_hidden: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "transformer":
            layer = nn.TransformerEncoderLayer(
                dim, n_heads, dim_feedforward=n_hidden, dropout=0.0, batch_first=True, norm_first=True
            )
            self.net = nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        else:
            self.token = mlp(dim, n_hidden, dim, n_layers=n_layers)
            self.pool = mlp(dim, n_hidden, dim, n_layers=1)
            self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Output tokens (same shape); those at hidden positions are not used by the caller."""
        if self.kind == "transformer":
            return self.net(tokens, src_key_padding_mask=hidden)
        h = self.token(tokens)
        w = torch.ones(h.shape[:2], device=h.device, dtype=h.dtype) if hidden is None else (~hidden).to(h.dtype)
        pooled = (h * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1.0)
        return self.norm(h + self.pool(pooled)[:, None, :])


class ModuleEncoder(nn.Module):
    """Gene-module tokens (per-module linear map of its genes + module-id embedding) then a :class:`TokenMixer`.

    With ``n_proteins``, one more token (the last): a linear map of the standardised protein values plus its own id
    embedding. The cell embedding is the mean of the visible output tokens, the protein token's included.
    """

    def __init__(
        self,
        gene_index: torch.Tensor,
        gene_mask: torch.Tensor,
        dim: int,
        *,
        kind: str,
        n_layers: int,
        n_heads: int,
        n_proteins: int = 0,
    ) -> None:
        super().__init__()
        n_modules, size = gene_index.shape
        self.n_modules, self.n_proteins = int(n_modules), int(n_proteins)
        self.register_buffer("gene_index", gene_index.clone())
        self.register_buffer("gene_mask", gene_mask.clone())
        self.weight = nn.Parameter(torch.zeros(n_modules, size, dim))
        self.bias = nn.Parameter(torch.zeros(n_modules, dim))
        self.module_embedding = nn.Parameter(torch.zeros(n_modules, dim))
        self.mixer = TokenMixer(dim, kind=kind, n_layers=n_layers, n_heads=n_heads, n_hidden=2 * dim)
        if self.n_proteins:  # registered last: an RNA-only encoder has exactly the RNA-only parameters
            self.protein_weight = nn.Parameter(torch.zeros(self.n_proteins, dim))
            self.protein_embedding = nn.Parameter(torch.zeros(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Token maps ``N(0, 1/sqrt(module size))``, module ids ``N(0, 0.02)`` (torch's global RNG).

        The protein token's map is ``N(0, 1/sqrt(n_proteins))`` and its id ``N(0, 0.02)``, drawn after the modules'.
        """
        with torch.no_grad():
            sizes = self.gene_mask.sum(1).clamp(min=1).to(self.weight.dtype)
            self.weight.normal_().mul_(sizes.rsqrt()[:, None, None])
            self.bias.zero_()
            self.module_embedding.normal_(0.0, 0.02)
            if self.n_proteins:
                self.protein_weight.normal_().mul_(self.n_proteins**-0.5)
                self.protein_embedding.normal_(0.0, 0.02)

    def tokens(self, x_std: torch.Tensor, p_std: torch.Tensor | None = None) -> torch.Tensor:
        """``(n, n_tokens, dim)`` input tokens of standardised expression ``x_std`` (and proteins ``p_std``)."""
        padded = torch.cat([x_std, x_std.new_zeros(x_std.shape[0], 1)], dim=1)[:, self.gene_index]
        padded = padded * self.gene_mask.to(padded.dtype)
        tokens = torch.einsum("nms,msd->nmd", padded, self.weight) + self.bias + self.module_embedding
        if not self.n_proteins:
            return tokens
        if p_std is None:
            msg = "this encoder has a protein token: pass the standardised protein values"
            raise ValueError(msg)
        protein = p_std @ self.protein_weight + self.protein_embedding
        return torch.cat([tokens, protein[:, None, :]], dim=1)

    def forward(
        self, x_std: torch.Tensor, hidden: torch.Tensor | None = None, p_std: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output tokens ``(n, n_tokens, dim)`` and cell embeddings ``(n, dim)`` (mean over the visible tokens)."""
        out = self.mixer(self.tokens(x_std, p_std), hidden)
        w = torch.ones(out.shape[:2], device=out.device, dtype=out.dtype) if hidden is None else (~hidden).to(out.dtype)
        return out, (out * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1.0)


class JEPAModule(VCellModule):
    """Masked gene-module embedding prediction (see the module docstring).

    Parameters
    ----------
    n_genes
        Number of genes.
    modules
        Gene indices of each module (at least 2 modules).
    n_latent
        Token and cell-embedding dimension.
    encoder
        ``"transformer"`` or ``"mlp"``.
    n_layers, n_heads
        Depth of the encoder (and heads of the transformer); the predictor has one layer of the same kind.
    objective
        ``"jepa"`` (predict target embeddings) or ``"reconstruction"`` (decode the masked genes).
    ema, ema_momentum
        EMA target encoder and its momentum (:meth:`update_target`); ``ema=False``: the context encoder under
        stop-gradient.
    anti_collapse, variance_weight, covariance_weight
        VICReg terms on the context cell embeddings and their weights.
    mask_ratio
        Share of modules masked per cell (at least 1, at most ``n_modules - 1``); the protein token is masked with
        this probability on its own.
    n_proteins
        Proteins measured beside RNA (one protein token, ``batch[PROTEIN_LOG_KEY]``); 0 (default): RNA only.
    """

    def __init__(
        self,
        n_genes: int,
        modules: Sequence[Sequence[int]],
        *,
        n_latent: int = 64,
        encoder: str = "transformer",
        n_layers: int = 2,
        n_heads: int = 4,
        objective: str = "jepa",
        ema: bool = True,
        ema_momentum: float = 0.996,
        anti_collapse: bool = True,
        variance_weight: float = 1.0,
        covariance_weight: float = 0.04,
        mask_ratio: float = 0.5,
        n_proteins: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(n_proteins, bool) or int(n_proteins) != n_proteins or n_proteins < 0:
            msg = f"n_proteins must be a non-negative integer, got {n_proteins!r}"
            raise ValueError(msg)
        if encoder not in ENCODERS:
            msg = f"encoder must be one of {ENCODERS}, got {encoder!r}"
            raise ValueError(msg)
        if objective not in OBJECTIVES:
            msg = f"objective must be one of {OBJECTIVES}, got {objective!r}"
            raise ValueError(msg)
        if not 0.0 < float(mask_ratio) < 1.0:
            msg = f"mask_ratio must be in (0, 1), got {mask_ratio!r}"
            raise ValueError(msg)
        if not 0.0 <= float(ema_momentum) <= 1.0:
            msg = f"ema_momentum must be in [0, 1], got {ema_momentum!r}"
            raise ValueError(msg)
        if encoder == "transformer" and int(n_latent) % int(n_heads):
            msg = f"n_latent ({n_latent}) must be divisible by n_heads ({n_heads})"
            raise ValueError(msg)
        self.n_genes, self.n_latent, self.objective = int(n_genes), int(n_latent), objective
        self.ema, self.ema_momentum, self.mask_ratio = bool(ema), float(ema_momentum), float(mask_ratio)
        self.anti_collapse = bool(anti_collapse)
        self.variance_weight, self.covariance_weight = float(variance_weight), float(covariance_weight)
        index, valid = module_index(modules, self.n_genes)
        self.n_modules, self.n_proteins = int(index.shape[0]), int(n_proteins)
        #: gene-module tokens, plus the protein token (the last) with proteins
        self.n_tokens = self.n_modules + (1 if self.n_proteins else 0)
        self.register_buffer("gene_mean", torch.zeros(self.n_genes))
        self.register_buffer("gene_std", torch.ones(self.n_genes))
        if self.n_proteins:
            self.register_buffer("protein_mean", torch.zeros(self.n_proteins))
            self.register_buffer("protein_std", torch.ones(self.n_proteins))
        member = torch.zeros(self.n_modules, self.n_genes + 1)
        member.scatter_(1, index, 1.0)
        self.register_buffer("membership", member[:, : self.n_genes], persistent=False)
        kw = {"kind": encoder, "n_heads": int(n_heads)}
        self.context_encoder = ModuleEncoder(
            index, valid, self.n_latent, n_layers=int(n_layers), n_proteins=self.n_proteins, **kw
        )
        self.target_encoder = copy.deepcopy(self.context_encoder) if self.ema else None
        if self.target_encoder is not None:
            self.target_encoder.requires_grad_(False)
        self.mask_token = nn.Parameter(torch.zeros(self.n_latent))
        self.predictor = TokenMixer(self.n_latent, n_layers=1, n_hidden=2 * self.n_latent, **kw)
        self.predictor_embedding = nn.Parameter(torch.zeros(self.n_tokens, self.n_latent))
        n_out = max(int(index.shape[1]), self.n_proteins) if objective == "reconstruction" else self.n_latent
        self.head_weight = nn.Parameter(torch.zeros(self.n_tokens, self.n_latent, n_out))
        self.head_bias = nn.Parameter(torch.zeros(self.n_tokens, n_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re-)initialise every parameter with torch's global RNG; the target encoder copies the context encoder."""
        for m in self.modules():
            if isinstance(m, nn.MultiheadAttention):  # torch names its initialiser _reset_parameters
                m._reset_parameters()
            elif m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        with torch.no_grad():
            self.mask_token.normal_(0.0, 0.02)
            self.predictor_embedding.normal_(0.0, 0.02)
            self.head_weight.normal_().mul_(self.n_latent**-0.5)
            self.head_bias.zero_()
            if self.target_encoder is not None:
                self.target_encoder.load_state_dict(self.context_encoder.state_dict())

    def set_scale(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Per-gene mean and std (of log1p expression) that standardise the inputs; std 0 counts as 1."""
        std = np.asarray(std, dtype=np.float32).ravel()
        with torch.no_grad():
            self.gene_mean.copy_(torch.as_tensor(np.asarray(mean, dtype=np.float32).ravel()))
            self.gene_std.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0)))

    def set_protein_scale(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Per-protein mean and std (of log1p(counts per 1e4 of the protein library)); std 0 counts as 1."""
        if not self.n_proteins:
            msg = "this module has no proteins (n_proteins=0)"
            raise ValueError(msg)
        std = np.asarray(std, dtype=np.float32).ravel()
        with torch.no_grad():
            self.protein_mean.copy_(torch.as_tensor(np.asarray(mean, dtype=np.float32).ravel()))
            self.protein_std.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0)))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - gene_mean) / gene_std`` clipped to [-10, 10]."""
        return ((x - self.gene_mean) / self.gene_std).clamp(-10.0, 10.0)

    def protein_inputs(self, p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised protein values (0 on unmeasured rows) and which cells were measured (no NaN in the row)."""
        if p is None:
            msg = f"this module models {self.n_proteins} proteins: the batch needs {PROTEIN_LOG_KEY!r}"
            raise ValueError(msg)
        observed = torch.isfinite(p).all(dim=1)
        p_std = ((torch.nan_to_num(p, nan=0.0) - self.protein_mean) / self.protein_std).clamp(-10.0, 10.0)
        return torch.where(observed[:, None], p_std, torch.zeros_like(p_std)), observed

    def available(self, observed: torch.Tensor) -> torch.Tensor:
        """``(n, n_tokens)``: tokens a cell has (every module; the protein token where proteins were measured)."""
        return torch.cat([observed.new_ones(observed.shape[0], self.n_modules), observed[:, None]], dim=1)

    def sample_mask(self, n: int, *, device: torch.device | None = None) -> torch.Tensor:
        """``(n, n_tokens)`` boolean mask, ``round(mask_ratio * n_modules)`` (1 to n_modules - 1) modules per row.

        With proteins the last column, the protein token, is masked with probability ``mask_ratio``.
        """
        k = min(max(round(self.mask_ratio * self.n_modules), 1), self.n_modules - 1)
        order = torch.rand(n, self.n_modules, device=device).argsort(dim=1)
        if not self.n_proteins:
            return order < k
        return torch.cat([order < k, torch.rand(n, 1, device=device) < self.mask_ratio], dim=1)

    def hidden_genes(self, mask: torch.Tensor) -> torch.Tensor:
        """``(n, n_genes)``: genes of any masked module."""
        return (mask[:, : self.n_modules].to(self.membership.dtype) @ self.membership) > 0

    def context(
        self, x: torch.Tensor, mask: torch.Tensor, p: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context tokens and cell embeddings of log1p ``x`` with the ``mask``-ed modules (and their genes) hidden.

        With proteins (``p``, NaN rows unmeasured) the protein token is hidden where masked or unmeasured.
        """
        x_std = self.standardize(x).masked_fill(self.hidden_genes(mask), 0.0)
        if not self.n_proteins:
            return self.context_encoder(x_std, mask)
        p_std, observed = self.protein_inputs(p)
        hidden = mask | ~self.available(observed)
        return self.context_encoder(x_std, hidden, p_std.masked_fill(hidden[:, -1:], 0.0))

    @torch.no_grad()
    def embed(self, x: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
        """Cell embeddings ``(n, n_latent)`` of log1p ``x``: the context encoder with every module visible.

        With proteins, ``p`` holds them (NaN rows: not measured, protein token hidden).
        """
        if not self.n_proteins:
            return self.context_encoder(self.standardize(x))[1]
        p_std, observed = self.protein_inputs(p)
        return self.context_encoder(self.standardize(x), ~self.available(observed), p_std)[1]

    @torch.no_grad()
    def update_target(self) -> None:
        """One EMA step of the target encoder (no-op with ``ema=False``)."""
        if self.target_encoder is not None:
            ema_update(self.target_encoder, self.context_encoder, self.ema_momentum)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Predictions and targets of the masked modules (``batch[MASK_KEY]``, else a random mask).

        ``out["mask"]`` marks the tokens scored: masked ones the cell has (an unmeasured protein token is never).
        """
        x = batch[REGISTRY_KEYS.X_KEY]
        mask = batch.get(MASK_KEY)
        mask = self.sample_mask(x.shape[0], device=x.device) if mask is None else mask.bool()
        p = batch.get(PROTEIN_LOG_KEY)
        tokens, z = self.context(x, mask, p)
        pos = self.predictor_embedding.expand(x.shape[0], -1, -1)
        target_hidden = None
        if self.n_proteins:  # an unmeasured protein token is a mask token for the predictor, and never scored
            p_std, observed = self.protein_inputs(p)
            target_hidden = ~self.available(observed)
            pred_in = torch.where((mask | target_hidden)[..., None], self.mask_token + pos, tokens + pos)
            mask = mask & ~target_hidden
        else:
            pred_in = torch.where(mask[..., None], self.mask_token + pos, tokens + pos)
        pred = self.predictor(pred_in)
        out = torch.einsum("nmd,mdo->nmo", pred, self.head_weight) + self.head_bias
        result = {"z": z, "pred": out, "mask": mask}
        if self.objective == "jepa":  # the reconstruction arm's targets are the genes of batch[X_KEY]
            with torch.no_grad():
                enc = self.target_encoder if self.target_encoder is not None else self.context_encoder
                if self.n_proteins:
                    full = enc(self.standardize(x), target_hidden, p_std)[0]
                else:
                    full = enc(self.standardize(x))[0]
                result["target"] = F.layer_norm(full, (self.n_latent,))
        return result

    def loss(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> LossOutput:
        """Embedding MSE (or log1p reconstruction MSE) over the masked modules, plus the VICReg terms."""
        mask, z = out["mask"], out["z"]
        if self.objective == "jepa":
            err = ((out["pred"] - out["target"]) ** 2).mean(-1)
            main = (err * mask).sum() / mask.sum().clamp(min=1)
        else:
            enc = self.context_encoder
            x = batch[REGISTRY_KEYS.X_KEY]
            xp = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)[:, enc.gene_index]
            pad = lambda v: torch.cat([v, v.new_ones(1)])[enc.gene_index]
            m, size = enc.gene_index.shape
            if not self.n_proteins:
                recon = out["pred"] * pad(self.gene_std) + pad(self.gene_mean)
                w = mask[..., None] & enc.gene_mask
                main = (((recon - xp) ** 2) * w).sum() / w.sum().clamp(min=1)
            else:  # masked genes and, where scored, the proteins: one mean squared error in log1p space
                recon = out["pred"][:, :m, :size] * pad(self.gene_std) + pad(self.gene_mean)
                w = mask[:, :m, None] & enc.gene_mask
                p = torch.nan_to_num(batch[PROTEIN_LOG_KEY], nan=0.0)
                p_recon = out["pred"][:, m, : self.n_proteins] * self.protein_std + self.protein_mean
                wp = mask[:, m, None].expand(-1, self.n_proteins)
                sse = (((recon - xp) ** 2) * w).sum() + (((p_recon - p) ** 2) * wp).sum()
                main = sse / (w.sum() + wp.sum()).clamp(min=1)
        var, cov = variance_loss(z), covariance_loss(z)
        loss = main
        if self.anti_collapse:
            loss = loss + self.variance_weight * var + self.covariance_weight * cov
        with torch.no_grad():
            std = z.std(dim=0).mean() if z.shape[0] > 1 else z.new_zeros(())
            rank = _effective_rank(z).to(z.dtype)
        terms = {self.objective: main.detach(), "variance": var.detach(), "covariance": cov.detach()}
        return LossOutput(loss=loss, terms=terms, metrics={"embedding_std": std, "effective_rank": rank})


# ---------------------------------------------------------------------------------------------- transition
class LatentTransitionModule(VCellModule):
    """``z_pert = z_ctrl + g(c, cov) - g(0, cov)`` and a decoder from embeddings to log1p expression.

    Parameters
    ----------
    n_latent, n_genes
        Embedding dimension and number of genes.
    n_atoms
        Single perturbations the perturbation encoder knows.
    covariate_sizes
        Categories of each covariate (a learned embedding each).
    n_hidden
        Width of ``g`` and of the decoder's hidden layer.
    decoder
        ``"mlp"`` (one hidden layer) or ``"linear"``.
    perturbation_features, gene_graph, atom_nodes, n_graph_nodes, graph_layers, graph_own_embedding, seen_atoms
        Perturbation operators as in :class:`~vcell.module.FlowMatchingModule` (table, gene graph, else one-hot).
    log_dose_init
        Initial log-EC50 of the dose responses.
    n_proteins
        Proteins measured beside RNA: a second decoder head (same shape as the gene decoder) maps embeddings to
        their log1p(counts per 1e4 of the protein library), fitted by MSE on the cells whose ``batch[PROTEIN_LOG_KEY]``
        row has no NaN. 0 (default): RNA only.
    """

    def __init__(
        self,
        n_latent: int,
        n_genes: int,
        n_atoms: int,
        *,
        covariate_sizes: tuple[int, ...] = (),
        n_hidden: int = 128,
        decoder: str = "mlp",
        perturbation_features: np.ndarray | None = None,
        gene_graph: tuple[np.ndarray, ...] | None = None,
        atom_nodes: np.ndarray | None = None,
        n_graph_nodes: int | None = None,
        graph_layers: int = 1,
        graph_own_embedding: bool = True,
        seen_atoms: np.ndarray | None = None,
        log_dose_init: float = 0.0,
        n_proteins: int = 0,
    ) -> None:
        super().__init__()
        if decoder not in ("mlp", "linear"):
            msg = f"decoder must be 'mlp' or 'linear', got {decoder!r}"
            raise ValueError(msg)
        self.n_latent, self.n_genes, n_hidden = int(n_latent), int(n_genes), int(n_hidden)
        if gene_graph is not None:
            ops = GeneGraphOperators(
                gene_graph,
                atom_nodes,
                dim=n_hidden,
                n_nodes=n_graph_nodes,
                n_layers=graph_layers,
                own_embedding=graph_own_embedding,
                n_hidden=n_hidden,
                seen_atoms=seen_atoms,
            )
        elif perturbation_features is not None:
            ops = TableOperators(perturbation_features, n_hidden, n_hidden=n_hidden)
        else:
            ops = OneHotOperators(int(n_atoms), n_hidden, seen_atoms=seen_atoms)
        dose = DoseResponse(int(n_atoms), log_dose_init=log_dose_init, seen_atoms=seen_atoms)
        self.perturbation = PerturbationEncoder(ops, dose)
        self.covariates = nn.ModuleList([nn.Embedding(max(int(k), 1), n_hidden) for k in covariate_sizes])
        self.shift = mlp(n_hidden, n_hidden, self.n_latent, n_layers=1)
        n_dec = 0 if decoder == "linear" else 1
        self.decoder = mlp(self.n_latent, n_hidden, self.n_genes, n_layers=n_dec)
        self.n_proteins = int(n_proteins)
        if self.n_proteins:  # registered last: RNA-only modules draw their initial weights exactly as before
            self.protein_decoder = mlp(self.n_latent, n_hidden, self.n_proteins, n_layers=n_dec)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re-)initialise every parameter (torch's global RNG)."""
        ops = self.perturbation.operators
        for m in self.modules():
            if m is not self and m is not ops and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        if hasattr(ops, "reset_parameters"):
            ops.reset_parameters()
        with torch.no_grad():
            for emb in self.covariates:
                emb.weight.normal_(0.0, 0.1)

    def delta(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embedding shift ``g(c, cov) - g(0, cov)`` ``(n, n_latent)`` of the batch's perturbation encoding."""
        c = self.perturbation(batch[REGISTRY_KEYS.PERT_ENCODING_KEY], batch.get(EXTRA_NODES_KEY))
        cov = torch.zeros_like(c)
        if self.covariates:
            codes = batch[REGISTRY_KEYS.COVARIATES_KEY]
            cov = cov + sum(emb(codes[:, k]) for k, emb in enumerate(self.covariates))
        return self.shift(c + cov) - self.shift(cov)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """log1p(CP10k) expression (unclipped) of embeddings ``z``."""
        return self.decoder(z)

    def decode_protein(self, z: torch.Tensor) -> torch.Tensor:
        """Proteins in log1p(counts per 1e4 of the protein library) (unclipped) of embeddings ``z``."""
        if not self.n_proteins:
            msg = "this module has no protein decoder (n_proteins=0)"
            raise ValueError(msg)
        return self.protein_decoder(z)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Predicted target embeddings ``z_source + delta`` and decoded target expression (and proteins)."""
        out = {"z": batch[SOURCE_Z_KEY] + self.delta(batch), "x": self.decode(batch[TARGET_Z_KEY])}
        if self.n_proteins:
            out["p"] = self.decode_protein(batch[TARGET_Z_KEY])
        return out

    def loss(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> LossOutput:
        """Transition MSE in embedding space plus decoder MSE in log1p space (plus the measured proteins' MSE)."""
        trans = F.mse_loss(out["z"], batch[TARGET_Z_KEY])
        dec = F.mse_loss(out["x"], batch[REGISTRY_KEYS.X_KEY])
        terms = {"transition_mse": trans.detach(), "decoder_mse": dec.detach()}
        if not self.n_proteins:
            return LossOutput(loss=trans + dec, terms=terms)
        p = batch[PROTEIN_LOG_KEY]
        w = torch.isfinite(p).all(dim=1, keepdim=True).expand_as(p)
        sq = torch.where(w, (out["p"] - torch.nan_to_num(p, nan=0.0)) ** 2, torch.zeros_like(p))
        prot = sq.sum() / w.sum().clamp(min=1)
        terms["protein_decoder_mse"] = prot.detach()
        return LossOutput(loss=trans + dec + prot, terms=terms)


class CellJEPAModule(VCellModule):
    """Container of a :class:`JEPAModule` (``jepa``) and a :class:`LatentTransitionModule` (``transition``)."""

    def __init__(self, jepa: JEPAModule, transition: LatentTransitionModule) -> None:
        super().__init__()
        self.jepa, self.transition = jepa, transition

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover - by stage
        """Not used: each stage trains its own sub-module."""
        msg = "train CellJEPAModule's stages through .jepa and .transition"
        raise NotImplementedError(msg)
