"""Compositional causal VAE (pure torch): basal latent state + perturbation operators + covariate embeddings.

``z = z_basal + sum_i s_i(dose_i) delta_i + sum_k e_k[covariate_k] (+ gated pairwise interactions of combos)``.
``z_basal`` comes from an encoder of the cell's log1p(CP10k) expression and is pushed to carry no perturbation or
covariate information by adversarial classifiers behind a gradient-reversal layer (as in CPA). Counterfactuals
encode a cell, swap its perturbation part and decode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vcell._constants import REGISTRY_KEYS

from ._base import VCellModule
from ._likelihoods import log_nb as log_nb  # re-exported: the likelihoods lived here before _likelihoods.py
from ._likelihoods import log_normal, log_zinb, nb_log_prob_rows
from ._perturbation_encoders import (
    DoseResponse,
    GeneGraphOperators,
    OneHotOperators,
    PairInteractions,
    PerturbationEncoder,
    TableOperators,
)
from ._structured import PathwayDecoder, regulatory_penalty

LIKELIHOODS = ("nb", "zinb", "gaussian")
#: batch key of the target perturbation encoding in counterfactual batches
TARGET_ENCODING_KEY = "target_perturbation_encoding"
#: batch keys of the graph nodes of the encoding columns beyond ``n_atoms`` (atoms unseen in training; gene graph only)
EXTRA_NODES_KEY = "perturbation_extra_nodes"
TARGET_EXTRA_NODES_KEY = "target_perturbation_extra_nodes"
#: batch key of the per-cell sum of log(x!) of the counts (optional; see ``reconstruction_log_prob``)
LOG_X_FACTORIAL_KEY = "log_x_factorial"
#: batch key of the protein counts (cells x proteins; NaN rows: protein not measured), with ``n_proteins > 0``
PROTEIN_KEY = "protein"
#: modalities a counterfactual can be decoded in
MODALITIES = ("rna", "prot")
_TARGET_SUM = 1e4


@dataclass
class LossOutput:
    """What a module's ``loss`` returns: the objective, its named terms and extra metrics (all scalars)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-scale`` backward (gradient-reversal layer)."""
    return _GradReverse.apply(x, scale)


def mlp(n_in: int, n_hidden: int, n_out: int, *, n_layers: int = 1, dropout: float = 0.0) -> nn.Sequential:
    """``n_layers`` hidden layers (Linear, LayerNorm, ReLU, Dropout) then a Linear output layer."""
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [nn.Linear(n_in if i == 0 else n_hidden, n_hidden), nn.LayerNorm(n_hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(n_hidden if n_layers else n_in, n_out))
    return nn.Sequential(*layers)


class CausalVAEModule(VCellModule):
    """Causal VAE of perturbation responses (see the module docstring).

    Parameters
    ----------
    n_genes
        Number of genes.
    n_atoms
        Number of single perturbations the module can encode (training vocabulary plus extra rows of an
        embedding table); encodings with fewer columns are zero-padded.
    n_conditions
        Number of condition labels (classes of the perturbation adversary); 0 disables it.
    covariate_sizes
        Number of categories of each categorical covariate (cell type, batch, ...).
    covariate_names
        Names of the covariates (labels of the adversaries' metrics); default ``covariate0, ...``.
    n_latent, n_hidden, n_layers, dropout
        Sizes of the latent space and of the encoder/decoder MLPs.
    likelihood
        ``"nb"`` (counts, library size as in scVI), ``"zinb"`` or ``"gaussian"`` (on log1p(CP10k)).
    counts
        Whether ``batch[X_KEY]`` holds raw counts (normalised to log1p(CP10k) for the encoder) or log1p(CP10k).
    variational
        Sample ``z_basal`` from a Gaussian posterior with a KL term; ``False``: deterministic autoencoder.
    kl_weight
        Weight of the KL term.
    perturbation_features
        ``(n_atoms, d)`` embedding table: operators are ``MLP(features)``; ``None``: one learned operator per atom.
    gene_graph
        ``(source, target)`` or ``(source, target, weight)`` integer arrays of a gene graph's edges: operators come
        from a graph neural network (:class:`~vcell.module.GeneGraphOperators`), so that any graph node can be
        encoded as an atom unseen in training (encoding columns beyond ``n_atoms``, with their nodes in
        ``batch[EXTRA_NODES_KEY]`` / ``batch[TARGET_EXTRA_NODES_KEY]``). Exclusive with ``perturbation_features``.
    atom_nodes
        With ``gene_graph``: ``(n_atoms,)`` graph node of each atom (``-1``: not in the graph, an isolated node).
    n_graph_nodes
        With ``gene_graph``: number of graph nodes (``None``: largest index + 1).
    graph_layers, graph_embed
        With ``gene_graph``: propagation steps (hops an unseen gene borrows from) and node embedding size.
    graph_own_embedding
        With ``gene_graph``: seen atoms also use their own node's embedding (``False``: neighbours only, as unseen
        atoms; see :class:`GeneGraphOperators`).
    seen_atoms
        Which atoms were seen in training (unseen ones use the mean dose-response; one-hot: a zero operator;
        gene graph: an operator from the graph neighbours); ``None``: all.
    pairs
        ``(n_pairs, 2)`` atom indices of combinations with a learned, gated interaction.
    adversary_weight
        Scale of the reversed gradient from the adversaries into the encoder (0: no adversarial pressure).
    interaction_penalty
        Weight of the sparsity penalty on the interaction gates.
    log_dose_init
        Initial log-EC50 of every dose-response curve.
    condition_encoder
        Give the encoder the cell's own perturbation and covariate latents as input (a conditional encoder), so it
        can explain them away rather than copy them into ``z_basal``.
    programs
        ``(n_programs, n_genes)`` gene-program weights (e.g. from :func:`~vcell.module.gene_programs` of PROGENy or
        Hallmark): the decoder becomes a :class:`~vcell.module.PathwayDecoder` whose first ``n_programs`` latent
        factors load only on their program's genes (the other ``n_latent - n_programs`` go through an MLP of
        ``n_hidden`` x ``n_layers``); ``None``: an MLP decoder.
    pathway_init
        With ``programs``: ``"programs"`` (factor k starts as program k's weights) or ``"random"`` (on the mask).
    regulatory
        ``(tf_idx, target_idx, sign)`` signed TF->target edges over the genes (from
        :func:`~vcell.module.regulatory_edges`, e.g. of CollecTRI): the loss gains
        ``regulatory_weight * sum_e relu(-s_e * delta_tf * delta_target)``, averaged over the perturbed cells of a
        batch, where ``delta`` is each cell's decoded change vs its unperturbed state (``z_basal + z_cov``) in
        log1p(CP10k) (:func:`~vcell.module.regulatory_penalty` times the number of edges). ``None``: no penalty.
    regulatory_weight
        Weight of that penalty (0 switches it off).
    n_proteins
        Number of proteins measured beside RNA (CITE-seq), ``batch[PROTEIN_KEY]`` holding their counts; 0 (default):
        RNA only, and nothing below exists. With proteins the encoder also sees the cell's log1p(protein counts per
        1e4 of its protein library) (zeros for a cell without protein), so ``z_basal`` is a joint latent, and a
        second decoder head (an MLP of ``n_hidden`` x ``n_layers``) gives each protein's share of the protein
        library. Protein counts follow a negative binomial with the cell's observed protein library size and a
        learned dispersion per protein: the RNA model's choice, which suits antibody counts well enough for
        predicting mean responses (totalVI's background/foreground mixture is left out: the background is absorbed
        into the shares; it matters for calling a protein present, less for mean shifts). Cells whose protein row
        holds a NaN or sums to 0 count as unmeasured: they are left out of the protein likelihood.
    protein_weight
        Weight of the protein reconstruction term in the loss (with ``n_proteins``).
    """

    def __init__(
        self,
        n_genes: int,
        n_atoms: int,
        *,
        n_conditions: int = 0,
        covariate_sizes: tuple[int, ...] = (),
        covariate_names: tuple[str, ...] | None = None,
        n_latent: int = 32,
        n_hidden: int = 256,
        n_layers: int = 1,
        dropout: float = 0.1,
        likelihood: str = "nb",
        counts: bool = True,
        variational: bool = True,
        kl_weight: float = 1.0,
        perturbation_features: np.ndarray | None = None,
        gene_graph: tuple[np.ndarray, ...] | None = None,
        atom_nodes: np.ndarray | None = None,
        n_graph_nodes: int | None = None,
        graph_layers: int = 1,
        graph_embed: int = 64,
        graph_own_embedding: bool = True,
        seen_atoms: np.ndarray | None = None,
        pairs: np.ndarray | None = None,
        adversary_weight: float = 1.0,
        interaction_penalty: float = 1e-2,
        log_dose_init: float = -2.0,
        condition_encoder: bool = True,
        programs: np.ndarray | None = None,
        pathway_init: str = "programs",
        regulatory: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        regulatory_weight: float = 0.3,
        n_proteins: int = 0,
        protein_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            msg = f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}"
            raise ValueError(msg)
        self.n_genes, self.n_atoms, self.n_latent = int(n_genes), int(n_atoms), int(n_latent)
        self.likelihood, self.counts, self.variational = likelihood, bool(counts), bool(variational)
        self.kl_weight, self.adversary_weight = float(kl_weight), float(adversary_weight)
        self.interaction_penalty, self.log_dose_init = float(interaction_penalty), float(log_dose_init)
        self.condition_encoder = bool(condition_encoder)
        self.n_proteins, self.protein_weight = int(n_proteins), float(protein_weight)
        if self.n_proteins < 0 or not np.isfinite(self.protein_weight) or self.protein_weight < 0:
            msg = f"n_proteins must be >= 0 and protein_weight a finite number >= 0, got {n_proteins!r}, {protein_weight!r}"
            raise ValueError(msg)
        n_in = n_genes + self.n_proteins + (n_latent if condition_encoder else 0)
        self.encoder = mlp(n_in, n_hidden, 2 * n_latent, n_layers=n_layers, dropout=dropout)
        n_out = 2 * n_genes if likelihood == "zinb" else n_genes
        if programs is None:
            self.decoder = mlp(n_latent, n_hidden, n_out, n_layers=n_layers, dropout=dropout)
        else:  # first n_programs latent factors tied to gene programs (masked linear), the rest through an MLP
            self.decoder = PathwayDecoder(
                n_latent,
                n_genes,
                programs,
                n_out_per_gene=2 if likelihood == "zinb" else 1,
                n_hidden=n_hidden,
                n_layers=n_layers,
                dropout=dropout,
                init=pathway_init,
            )
        self.regulatory_weight = float(regulatory_weight)
        if not np.isfinite(self.regulatory_weight) or self.regulatory_weight < 0:
            msg = f"regulatory_weight must be a finite number >= 0, got {regulatory_weight!r}"
            raise ValueError(msg)
        reg = [np.zeros(0, dtype=np.int64)] * 2 + [np.zeros(0)] if regulatory is None else list(regulatory)
        if len(reg) != 3 or len({len(np.asarray(r)) for r in reg}) != 1:
            msg = "regulatory must be (tf_idx, target_idx, sign) arrays of one length"
            raise ValueError(msg)
        idx = np.concatenate([np.asarray(r, dtype=np.int64).ravel() for r in reg[:2]])
        if idx.size and not 0 <= idx.min() <= idx.max() < n_genes:
            msg = f"regulatory edges hold gene indices outside [0, n_genes={n_genes})"
            raise ValueError(msg)
        for name, r in zip(("regulatory_tf", "regulatory_target"), reg[:2], strict=True):
            self.register_buffer(name, torch.as_tensor(np.asarray(r, dtype=np.int64)), persistent=False)
        self.register_buffer("regulatory_sign", torch.as_tensor(np.sign(reg[2]), dtype=torch.float32), persistent=False)
        self.gene_param = nn.Parameter(torch.zeros(n_genes))  # NB: log theta; Gaussian: log variance
        self.covariates = nn.ModuleList([nn.Embedding(max(int(k), 1), n_latent) for k in covariate_sizes])
        # perturbation operators (one-hot rows, an MLP of a fixed feature table or a gene-graph GNN), dose-response
        # curves and gated pair interactions
        if gene_graph is not None:
            if perturbation_features is not None or atom_nodes is None:
                msg = "gene_graph needs atom_nodes and excludes perturbation_features"
                raise ValueError(msg)
            ops = GeneGraphOperators(
                gene_graph,
                atom_nodes,
                dim=n_latent,
                n_nodes=n_graph_nodes,
                n_layers=graph_layers,
                n_embed=graph_embed,
                own_embedding=graph_own_embedding,
                n_hidden=n_hidden,
                seen_atoms=seen_atoms,
            )
        elif perturbation_features is not None:
            ops = TableOperators(perturbation_features, n_latent, n_hidden=n_hidden)
        else:
            ops = OneHotOperators(n_atoms, n_latent, seen_atoms=seen_atoms)
        if ops.n_atoms != self.n_atoms:
            msg = f"the perturbation operators have {ops.n_atoms} atoms, expected n_atoms={self.n_atoms}"
            raise ValueError(msg)
        dose = DoseResponse(n_atoms, log_dose_init=log_dose_init, seen_atoms=seen_atoms)
        self.perturbation = PerturbationEncoder(ops, dose, interactions=PairInteractions(pairs, n_latent))
        # adversaries on z_basal
        sizes = ([n_conditions] if n_conditions > 1 else []) + [int(k) for k in covariate_sizes]
        cov_names = list(covariate_names or [f"covariate{i}" for i in range(len(covariate_sizes))])
        self.adversary_names = (["perturbation"] if n_conditions > 1 else []) + cov_names
        self.adversaries = nn.ModuleList([mlp(n_latent, n_hidden // 2, k, n_layers=1) for k in sizes])
        self.adversary_active = [k > 1 for k in sizes]
        if self.n_proteins:  # registered last: RNA-only modules draw their initial weights exactly as before
            self.protein_decoder = mlp(n_latent, n_hidden, self.n_proteins, n_layers=n_layers, dropout=dropout)
            self.protein_param = nn.Parameter(torch.zeros(self.n_proteins))  # log theta of the protein NB
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re-)initialise every parameter (with torch's global RNG: seed it first).

        Sub-modules in registration order, then the covariate embeddings (``N(0, 0.1)``), then the perturbation
        operators' own parameters (one-hot rows ``N(0, 0.1)``, graph node embeddings): the order of the random draws
        of earlier versions, so seeded one-hot models reproduce their results.
        """
        ops = self.perturbation.operators
        for m in self.modules():
            if m is not self and m is not ops and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        with torch.no_grad():
            for emb in self.covariates:
                emb.weight.normal_(0.0, 0.1)
            if hasattr(ops, "reset_parameters"):
                ops.reset_parameters()
            self.gene_param.zero_()
            if self.n_proteins:
                self.protein_param.zero_()

    # ------------------------------------------------------------------------- pieces
    def _pad(self, enc: torch.Tensor) -> torch.Tensor:
        return F.pad(enc, (0, self.n_atoms - enc.shape[1])) if enc.shape[1] < self.n_atoms else enc

    def operator_vectors(self) -> torch.Tensor:
        """Latent operator ``delta_i`` of every atom at full effect, shape ``(n_atoms, n_latent)``."""
        return self.perturbation.operators()

    def dose_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-EC50 and slope per atom; atoms unseen in training get the mean over the seen ones."""
        return self.perturbation.dose.params()

    def dose_scale(self, enc: torch.Tensor) -> torch.Tensor:
        """``s_i(dose_i)``: sigmoid in log-dose (0 for inactive atoms); ``enc`` is the dose-scaled multi-hot."""
        return self.perturbation.dose(enc)

    def perturbation_latent(self, enc: torch.Tensor, extra_nodes: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_i s_i delta_i`` plus the gated pairwise interactions of the seen combinations.

        ``extra_nodes``: graph nodes of the columns of ``enc`` beyond ``n_atoms`` (gene graph only; see
        :meth:`vcell.module.PerturbationEncoder.forward`).
        """
        return self.perturbation(enc, extra_nodes)

    def covariate_latent(self, cov: torch.Tensor | None) -> torch.Tensor | float:
        """Sum of the covariate embeddings (``cov``: integer codes, one column per covariate)."""
        if cov is None or not len(self.covariates):
            return 0.0
        cov = cov.long().reshape(cov.shape[0], -1)
        return sum(emb(cov[:, k]) for k, emb in enumerate(self.covariates))

    def log_normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log1p(CP10k) of ``x``, library size); identity when ``x`` is already log-normalised."""
        if not self.counts:
            return x, torch.full((x.shape[0], 1), _TARGET_SUM, device=x.device, dtype=x.dtype)
        lib = x.sum(1, keepdim=True).clamp(min=1.0)
        return torch.log1p(x * (_TARGET_SUM / lib)), lib

    def encode(self, x_log: torch.Tensor, z_known: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of ``z_basal`` from log1p(CP10k) expression.

        With ``condition_encoder``, the encoder also sees ``z_known`` (the cell's own perturbation and covariate
        latents), so it can explain them away instead of copying them into ``z_basal``.
        """
        if not self.condition_encoder:
            h = self.encoder(x_log)
            return h[:, : self.n_latent], h[:, self.n_latent :].clamp(-10.0, 10.0)
        z_known = torch.as_tensor(z_known).to(x_log).expand(x_log.shape[0], self.n_latent)
        first = self.encoder[0]
        base = first if type(first) is nn.Linear else first.base  # a LoRA-adapted layer wraps the trained one
        # the first layer on [x_log, z_known] as two products: the data columns need no input gradient, so
        # backward skips the (cells x genes x hidden) product a concatenated input would cost
        n_x = x_log.shape[1]
        h = F.linear(x_log, base.weight[:, :n_x], base.bias) + F.linear(z_known, base.weight[:, n_x:])
        if base is not first:  # the adapter's low-rank update, on the concatenation (0 for a new adapter)
            h = h + first.update(torch.cat([x_log, z_known], 1))
        h = self.encoder[1:](h)
        return h[:, : self.n_latent], h[:, self.n_latent :].clamp(-10.0, 10.0)

    def decode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decoder output: ``log_scale`` (log gene shares) and ``pi_logits`` (ZINB), or ``mean`` (Gaussian)."""
        h = self.decoder(z)
        if self.likelihood == "gaussian":
            return {"mean": h}
        out = {"log_scale": torch.log_softmax(h[:, : self.n_genes], dim=-1)}
        if self.likelihood == "zinb":
            out["pi_logits"] = h[:, self.n_genes :]
        return out

    def protein_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Protein counts of a batch (NaN -> 0), their log1p(per 1e4 of the protein library), library and mask.

        Keys ``p`` (counts), ``p_log`` (zeros for unmeasured cells), ``p_lib`` (``(cells, 1)``, at least 1) and
        ``p_observed`` (bool per cell: no NaN and a positive total). Empty without proteins.
        """
        if not self.n_proteins:
            return {}
        raw = batch[PROTEIN_KEY]
        observed = torch.isfinite(raw).all(1)
        p = torch.where(torch.isfinite(raw), raw, torch.zeros_like(raw)).clamp(min=0.0)
        total = p.sum(1, keepdim=True)
        observed = observed & (total[:, 0] > 0)
        p_lib = total.clamp(min=1.0)
        p_log = torch.log1p(p * (_TARGET_SUM / p_lib)) * observed[:, None].to(p.dtype)
        return {"p": p, "p_log": p_log, "p_lib": p_lib, "p_observed": observed}

    def decode_protein(self, z: torch.Tensor) -> torch.Tensor:
        """Log share of each protein in the protein library, ``(cells, n_proteins)``."""
        return torch.log_softmax(self.protein_decoder(z), dim=-1)

    def protein_mean_log1p(self, z: torch.Tensor) -> torch.Tensor:
        """Decoded mean protein expression of latent states ``z``: log1p(counts per 1e4 of the protein library)."""
        return torch.log1p(_TARGET_SUM * torch.exp(self.decode_protein(z)))

    def protein_log_prob(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-cell NB log-likelihood of the protein counts (0 for unmeasured cells); ``out`` from :meth:`forward`."""
        log_mu = torch.log(out["p_lib"]) + out["protein_log_scale"]
        ll = nb_log_prob_rows(out["p"], log_mu, self.protein_param) - torch.lgamma(out["p"] + 1.0).sum(1)
        return torch.where(out["p_observed"], ll, torch.zeros_like(ll))

    def mean_log1p(self, dec: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoded mean expression in log1p(CP10k) space."""
        if self.likelihood == "gaussian":
            return dec["mean"].clamp(min=0.0)
        scale = torch.exp(dec["log_scale"])
        if self.likelihood == "zinb":
            scale = scale * torch.sigmoid(-dec["pi_logits"])
        return torch.log1p(_TARGET_SUM * scale)

    # ------------------------------------------------------------------------- training
    def _encode_batch(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_log, lib, z_cov, z_own, mu, log_var)``: what every pass over a batch starts from.

        The batch's log1p(CP10k) expression and library size, its covariate latent, its own covariate +
        perturbation latent, and the posterior of ``z_basal`` given them.
        """
        x_log, lib = self.log_normalise(batch[REGISTRY_KEYS.X_KEY])
        z_cov = self.covariate_latent(batch.get(REGISTRY_KEYS.COVARIATES_KEY))
        z_own = z_cov + self.perturbation_latent(batch[REGISTRY_KEYS.PERT_ENCODING_KEY], batch.get(EXTRA_NODES_KEY))
        x_in = torch.cat([x_log, self.protein_inputs(batch)["p_log"]], 1) if self.n_proteins else x_log
        mu, log_var = self.encode(x_in, z_own)
        return x_log, lib, z_cov, z_own, mu, log_var

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encode, compose the latent and decode a batch of cells."""
        x_log, lib, _, z_known, mu, log_var = self._encode_batch(batch)
        z_basal = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var) if self.variational and self.training else mu
        z = z_basal + z_known
        out = {"x_log": x_log, "lib": lib, "mu": mu, "log_var": log_var, "z_basal": z_basal, "z": z, **self.decode(z)}
        if self.n_proteins:
            out.update(self.protein_inputs(batch), protein_log_scale=self.decode_protein(z))
        return out

    def reconstruction_log_prob(
        self, x: torch.Tensor, out: dict[str, torch.Tensor], log_x_factorial: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-cell log-likelihood of the observed data under the decoded distribution.

        ``log_x_factorial`` (counts only, optional): the per-cell sum of ``log(x!)``, computed once per dataset
        so that training does not evaluate an ``lgamma`` per count that no parameter depends on. The negative
        binomial runs through :func:`vcell.module._likelihoods.nb_log_prob_rows` (fused backward pass).
        """
        if self.likelihood == "gaussian":
            return log_normal(out["x_log"], out["mean"], self.gene_param).sum(1)
        log_mu = torch.log(out["lib"]) + out["log_scale"]
        full = log_x_factorial is None
        if self.likelihood == "zinb":
            mu, theta = torch.exp(log_mu), torch.exp(self.gene_param)
            ll = log_zinb(x, mu, theta, out["pi_logits"], factorial=full).sum(1)
            return ll if full else ll - log_x_factorial.reshape(-1)
        ll = nb_log_prob_rows(x, log_mu, self.gene_param)
        return ll - (torch.lgamma(x + 1.0).sum(1) if full else log_x_factorial.reshape(-1))

    def loss(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> LossOutput:
        """Negative ELBO + adversaries' cross-entropy (reversed into the encoder) + interaction sparsity."""
        recon = -self.reconstruction_log_prob(batch[REGISTRY_KEYS.X_KEY], out, batch.get(LOG_X_FACTORIAL_KEY)).mean()
        kl = torch.zeros((), device=recon.device)
        if self.variational:
            kl = 0.5 * (out["mu"] ** 2 + out["log_var"].exp() - out["log_var"] - 1.0).sum(1).mean()
        terms = {"reconstruction": recon, "kl": kl, "elbo": recon + kl}
        metrics: dict[str, torch.Tensor] = {}
        adv = torch.zeros((), device=recon.device)
        if self.adversaries:
            z_rev = grad_reverse(out["z_basal"], self.adversary_weight)
            targets = []
            if self.adversary_names and self.adversary_names[0] == "perturbation":
                targets.append(batch[REGISTRY_KEYS.PERT_KEY].long().reshape(-1))
            cov = batch.get(REGISTRY_KEYS.COVARIATES_KEY)
            if len(self.covariates):
                cov = cov.long().reshape(cov.shape[0], -1)
                targets += [cov[:, k] for k in range(cov.shape[1])]
            for name, clf, active, y in zip(
                self.adversary_names, self.adversaries, self.adversary_active, targets, strict=True
            ):
                if not active:
                    continue
                logits = clf(z_rev)
                adv = adv + F.cross_entropy(logits, y)
                metrics[f"accuracy_{name}"] = (logits.argmax(1) == y).float().mean()
        terms["adversary"] = adv
        penalty = torch.zeros((), device=recon.device)
        if len(self.perturbation.interactions.pairs):
            penalty = self.interaction_penalty * self.perturbation.penalty()
        terms["interaction_penalty"] = penalty
        total = recon + self.kl_weight * kl + adv + penalty
        if len(self.regulatory_tf) and self.regulatory_weight > 0:  # only then: logged terms as before otherwise
            terms["regulatory_penalty"] = self.regulatory_weight * self.regulatory_loss(batch, out)
            total = total + terms["regulatory_penalty"]
        if self.n_proteins:  # mean over the batch's cells (unmeasured ones add 0)
            terms["protein_reconstruction"] = -self.protein_log_prob(out).mean()
            total = total + self.protein_weight * terms["protein_reconstruction"]
        return LossOutput(loss=total, terms=terms, metrics=metrics)

    def regulatory_loss(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unweighted TF->target sign penalty of a batch (see ``regulatory``); 0 without perturbed cells or edges.

        Per perturbed cell: the decoded change from its unperturbed latent ``z_basal + z_cov`` to its own ``z``
        (the decoded output of ``out``; one extra decoder pass for the unperturbed state), in log1p(CP10k); then
        :func:`~vcell.module.regulatory_penalty` summed over edges, averaged over those cells.
        """
        rows = torch.nonzero((batch[REGISTRY_KEYS.PERT_ENCODING_KEY] != 0).any(1)).flatten()
        if not len(rows) or not len(self.regulatory_tf):
            return out["z"].sum() * 0.0
        z_cov = self.covariate_latent(batch.get(REGISTRY_KEYS.COVARIATES_KEY))
        z_ref = out["z_basal"][rows] + (z_cov[rows] if isinstance(z_cov, torch.Tensor) else z_cov)
        own = {k: out[k][rows] for k in ("log_scale", "pi_logits", "mean") if k in out}
        delta = self.mean_log1p(own) - self.mean_log1p(self.decode(z_ref))
        edges = (self.regulatory_tf, self.regulatory_target, self.regulatory_sign)
        return regulatory_penalty(delta, *edges) * len(self.regulatory_tf)

    # ------------------------------------------------------------------------- inference
    @torch.no_grad()
    def counterfactual(
        self, batch: dict[str, torch.Tensor], *, mode: str = "residual", compose: str = "latent", modality: str = "rna"
    ) -> torch.Tensor:
        """log1p(CP10k) expression of the cells in ``batch`` under ``batch[TARGET_ENCODING_KEY]``.

        The cells' basal state is encoded (posterior mean); their own perturbation part
        (``batch[PERT_ENCODING_KEY]``, zeros for controls) is replaced by the target's. ``mode="decoded"`` returns
        the decoded mean; ``"residual"`` adds the decoded change ``m(z_target) - m(z_own)`` to the cells' own
        expression, so that cell-to-cell variation the latent space does not hold is kept.

        ``compose`` sets how a target with several active components (a combination) is decoded: ``"latent"``
        decodes the summed latent ``z + sum_i s_i delta_i (+ interaction)`` at once; ``"shifts"`` decodes each
        component on its own and adds their decoded changes from the unperturbed state ``m(z)`` (each cell's own
        state-dependent single responses, added in log1p space; no interaction term). A combination never seen
        in training puts the summed latent where the decoder was not trained; ``"shifts"`` stays where it was.

        ``modality="prot"`` (with ``n_proteins``) decodes the proteins instead, in log1p(counts per 1e4 of the
        protein library); in residual mode the change is added to the cell's own protein values (the decoded
        ``m(z_target)`` for cells without measured protein).
        """
        if compose not in ("latent", "shifts"):
            msg = f"compose must be 'latent' or 'shifts', got {compose!r}"
            raise ValueError(msg)
        state = self.counterfactual_state(batch, mode=mode, modalities=(modality,))
        target, nodes = batch[TARGET_ENCODING_KEY], batch.get(TARGET_EXTRA_NODES_KEY)
        return self.counterfactual_from_state(state, target, nodes, mode=mode, compose=compose, modality=modality)

    def counterfactual_state(
        self, batch: dict[str, torch.Tensor], *, mode: str = "residual", modalities: tuple[str, ...] = ("rna",)
    ) -> dict[str, Any]:
        """What :meth:`counterfactual` computes of the cells alone, whatever the target: reused across targets.

        ``z_base``: the cells' basal state plus covariates (``mu + z_cov``); with ``mode="residual"``, ``base``:
        per modality, the cells' own expression minus their decoded own state (:meth:`_residual_base`); ``m_base``:
        per modality, the decoded ``z_base`` (filled on demand by ``compose="shifts"``).
        """
        means = {modality: self._mean_fn(modality) for modality in modalities}
        x_log, _, z_cov, z_own, mu, _ = self._encode_batch(batch)
        state: dict[str, Any] = {"z_base": mu + z_cov, "m_base": {}, "base": {}}
        if mode != "decoded":
            for modality, mean_of in means.items():
                state["base"][modality] = self._residual_base(batch, x_log, mean_of(mu + z_own), modality)
        return state

    def counterfactual_from_state(
        self,
        state: dict[str, Any],
        target: torch.Tensor,
        nodes: torch.Tensor | None = None,
        *,
        mode: str = "residual",
        compose: str = "latent",
        modality: str = "rna",
    ) -> torch.Tensor:
        """:meth:`counterfactual` of the cells of ``state`` (:meth:`counterfactual_state`) under ``target``.

        ``target``: one encoding row per cell; ``nodes``: the graph nodes of its extra columns (or ``None``).
        """
        if compose not in ("latent", "shifts"):
            msg = f"compose must be 'latent' or 'shifts', got {compose!r}"
            raise ValueError(msg)
        mean_of = self._mean_fn(modality)
        z_base = state["z_base"]
        target = self._pad(target)
        active = torch.nonzero((target > 0).any(0)).flatten()
        if compose == "shifts" and len(active) > 1:
            if modality not in state["m_base"]:
                state["m_base"][modality] = mean_of(z_base)
            m_base = state["m_base"][modality]
            m_target = m_base.clone()
            for j in active.tolist():
                single = torch.zeros_like(target)
                single[:, j] = target[:, j]
                m_target += mean_of(z_base + self.perturbation_latent(single, nodes)) - m_base
        else:
            m_target = mean_of(z_base + self.perturbation_latent(target, nodes))
        if mode == "decoded":
            return m_target.clamp(min=0.0)
        return (state["base"][modality] + m_target).clamp(min=0.0)

    def _mean_fn(self, modality: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """Decoded mean of latent states in ``modality``'s log1p space (``rna`` or, with proteins, ``prot``)."""
        if modality not in MODALITIES or (modality == "prot" and not self.n_proteins):
            msg = f"modality must be 'rna' or, for a module with proteins, 'prot'; got {modality!r}"
            raise ValueError(msg)
        if modality == "prot":
            return self.protein_mean_log1p
        return lambda z: self.mean_log1p(self.decode(z))

    def _residual_base(
        self, batch: dict[str, torch.Tensor], x_log: torch.Tensor, m_own: torch.Tensor, modality: str
    ) -> torch.Tensor:
        """``own expression - m(z_own)``: what residual counterfactuals add the decoded target to.

        For proteins the own values are the measured ones, or ``m(z_own)`` (a base of 0) for unmeasured cells.
        """
        if modality == "prot":
            prot = self.protein_inputs(batch)
            x_log = torch.where(prot["p_observed"][:, None], prot["p_log"], m_own)
        return x_log - m_own

    @torch.no_grad()
    def mean_counterfactuals(
        self,
        batch: dict[str, torch.Tensor],
        targets: torch.Tensor,
        *,
        mode: str = "residual",
        modality: str = "rna",
        chunk: int = 512,
    ) -> torch.Tensor:
        """Mean counterfactual of all cells of ``batch`` under each row of ``targets``: ``(n_targets, n_features)``.

        Row ``k`` equals the mean over cells of :meth:`counterfactual` (``compose="latent"``) with every cell's
        target set to ``targets[k]`` (encodings of the module's atoms), but the cells are encoded, and their own
        state decoded, once for all targets; the targets' states are decoded about ``chunk`` cells at a time.
        """
        mean_of = self._mean_fn(modality)
        x_log, _, z_cov, z_own, mu, _ = self._encode_batch(batch)
        z_base = mu + z_cov
        base = self._residual_base(batch, x_log, mean_of(mu + z_own), modality) if mode == "residual" else None
        per = max(1, chunk // max(1, len(mu)))
        means = []
        for start in range(0, len(targets), per):
            shift = self.perturbation_latent(self._pad(targets[start : start + per]))  # (k, n_latent)
            z = (z_base[None] + shift[:, None]).reshape(-1, z_base.shape[1])
            m = mean_of(z).reshape(len(shift), len(mu), -1)
            means.append((m if base is None else m + base).clamp(min=0.0).mean(1))
        n_features = self.n_proteins if modality == "prot" else self.n_genes
        return torch.cat(means) if means else torch.zeros((0, n_features), device=mu.device)

    @torch.no_grad()
    def latent(self, batch: dict[str, torch.Tensor], *, full: bool = False) -> torch.Tensor:
        """Posterior mean of ``z_basal`` (``full``: plus the cells' own covariate and perturbation latents)."""
        *_, z_own, mu, _ = self._encode_batch(batch)
        return mu + z_own if full else mu

    @torch.no_grad()
    def counterfactual_latent(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Latent state of the cells under ``batch[TARGET_ENCODING_KEY]``.

        ``z_basal`` (posterior mean) + covariates + the target's perturbation latent: what :meth:`counterfactual`
        decodes with ``compose="latent"``.
        """
        _, _, z_cov, _, mu, _ = self._encode_batch(batch)
        return mu + z_cov + self.perturbation_latent(batch[TARGET_ENCODING_KEY], batch.get(TARGET_EXTRA_NODES_KEY))

    @torch.no_grad()
    def decode_log1p(self, z: torch.Tensor) -> torch.Tensor:
        """Decoded mean log1p(CP10k) expression of latent states ``z``."""
        return self.mean_log1p(self.decode(z))

    @torch.no_grad()
    def generative_params(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Decoded distribution of the cells' counterfactuals (``mu``/``theta``/``pi_logits``, or ``mean``/``std``).

        With proteins also ``protein_mu``/``protein_theta`` (negative binomial of the protein counts).
        """
        _, lib, z_cov, _, mu, _ = self._encode_batch(batch)
        target = self.perturbation_latent(batch[TARGET_ENCODING_KEY], batch.get(TARGET_EXTRA_NODES_KEY))
        z = mu + z_cov + target
        dec = self.decode(z)
        if self.likelihood == "gaussian":
            return {"mean": dec["mean"], "std": torch.exp(0.5 * self.gene_param).expand_as(dec["mean"])}
        x_mu = lib * torch.exp(dec["log_scale"])
        out = {"mu": x_mu, "theta": torch.exp(self.gene_param).expand_as(x_mu)}
        if self.likelihood == "zinb":
            out["pi_logits"] = dec["pi_logits"]
        if self.n_proteins:
            out.update(self._protein_params(batch, z))
        return out

    def _protein_params(self, batch: dict[str, torch.Tensor], z: torch.Tensor) -> dict[str, torch.Tensor]:
        """NB ``protein_mu``/``protein_theta`` of latent states ``z`` with the cells' protein libraries.

        A cell without measured proteins gets the mean library of the batch's measured cells (1e4 if none).
        """
        prot = self.protein_inputs(batch)
        lib, seen = prot["p_lib"], prot["p_observed"]
        fill = lib[seen].mean() if bool(seen.any()) else torch.tensor(_TARGET_SUM, dtype=lib.dtype, device=lib.device)
        lib = torch.where(seen[:, None], lib, fill)
        p_mu = lib * torch.exp(self.decode_protein(z))
        return {"protein_mu": p_mu, "protein_theta": torch.exp(self.protein_param).expand_as(p_mu)}
