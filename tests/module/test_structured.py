from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from vcell._constants import REGISTRY_KEYS
from vcell.module import CausalVAEModule, PathwayDecoder, gene_programs, regulatory_edges, regulatory_penalty

#: 3 programs over 8 genes: P0 = g0-g2, P1 = g2-g4 (weighted), P2 = g6
PROGRAMS = np.array(
    [
        [1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 2.0, -1.0, 0.5, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 0],
    ]
)


def _train(dec: PathwayDecoder, steps: int = 20) -> None:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(dec.parameters(), lr=0.05, weight_decay=0.1)
    z, y = torch.randn(64, dec.n_latent), torch.randn(64, dec.n_out_per_gene * dec.n_genes)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(dec(z), y).backward()
        opt.step()


@pytest.mark.parametrize("n_hidden", [0, 16])
def test_masked_weights_stay_zero_after_training(n_hidden):
    torch.manual_seed(0)
    dec = PathwayDecoder(5, 8, PROGRAMS, n_hidden=n_hidden)
    before = dec.program_weight.detach().clone()
    _train(dec)
    off = dec.mask == 0
    assert torch.equal(dec.program_weight[off], torch.zeros(int(off.sum())))
    assert torch.equal(dec.loadings[off], torch.zeros(int(off.sum())))
    assert (dec.program_weight[~off] != before[~off]).all()  # the allowed loadings did learn


@pytest.mark.parametrize("n_out_per_gene", [1, 2])
def test_program_factor_changes_only_its_genes(n_out_per_gene):
    torch.manual_seed(0)
    dec = PathwayDecoder(5, 8, PROGRAMS, n_out_per_gene=n_out_per_gene, n_hidden=8)
    _train(dec, steps=5)
    dec.eval()
    z = torch.randn(10, 5)
    base = dec(z)
    assert base.shape == (10, 8 * n_out_per_gene)
    for k in range(3):
        moved = (dec(z + 3.0 * torch.eye(5)[k]) - base).abs().amax(0).reshape(n_out_per_gene, 8)
        allowed = torch.as_tensor(PROGRAMS[k] != 0).expand(n_out_per_gene, 8)
        assert (moved[~allowed] == 0).all()
        assert (moved[allowed] > 0).all()
    free = (dec(z + 3.0 * torch.eye(5)[3]) - base).abs().amax(0)
    assert (free > 0).all()  # free factors reach every gene


def test_init_from_programs_and_reset():
    dec = PathwayDecoder(4, 8, PROGRAMS, init="programs")
    # column k = program k / max|program k| / sqrt(n_latent)
    expected = torch.as_tensor(PROGRAMS.T / np.abs(PROGRAMS).max(1) / 2.0, dtype=torch.float32)
    torch.testing.assert_close(dec.loadings, expected)
    with torch.no_grad():
        dec.program_weight.fill_(7.0)
    dec.reset_parameters()
    torch.testing.assert_close(dec.loadings, expected)
    rnd = PathwayDecoder(3, 8, PROGRAMS)
    assert rnd.n_free == 0
    assert rnd.free is None
    assert (rnd.program_weight[rnd.mask == 0] == 0).all()
    assert (rnd.program_weight.abs() <= 1 / np.sqrt(3)).all()


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((5, 7, PROGRAMS), {}, r"shape \(n_programs, n_genes=7\)"),
        ((2, 8, PROGRAMS), {}, "need n_latent >= 3"),
        ((5, 8, np.vstack([PROGRAMS, np.zeros(8)])), {}, r"row\(s\) \[3\]"),
        ((5, 8, PROGRAMS), {"n_out_per_gene": 3}, "n_out_per_gene"),
        ((5, 8, PROGRAMS), {"init": "xavier"}, "init must be"),
    ],
)
def test_decoder_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PathwayDecoder(*args, **kwargs)


def test_decoder_rejects_wrong_latent_size():
    with pytest.raises(ValueError, match="expected 5"):
        PathwayDecoder(5, 8, PROGRAMS)(torch.zeros(2, 4))


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "gaussian"])
def test_drop_in_decoder_for_causal_vae(likelihood):
    torch.manual_seed(0)
    n_genes, n_latent = 8, 6
    module = CausalVAEModule(n_genes, 2, n_latent=n_latent, n_hidden=16, likelihood=likelihood)
    module.decoder = PathwayDecoder(n_latent, n_genes, PROGRAMS, n_out_per_gene=2 if likelihood == "zinb" else 1)
    x = torch.poisson(torch.full((6, n_genes), 3.0))
    batch = {REGISTRY_KEYS.X_KEY: x, REGISTRY_KEYS.PERT_ENCODING_KEY: torch.eye(2)[[0, 1, 0, 1, 0, 1]]}
    out = module(batch)
    loss = module.loss(batch, out).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert module.decoder.program_weight.grad is not None


def test_gene_programs_maps_network():
    net = pd.DataFrame(
        {
            "source": ["A", "A", "A", "B", "B", "C", "A"],
            "target": ["g1", "g0", "zz", "g2", "g1", "g0", "g1"],
            "weight": [1.0, -2.0, 5.0, 3.0, 0.5, 1.0, 1.0],
        }
    )
    names, prog = gene_programs(net["source"], net["target"], ["g0", "g1", "g2"], weight=net["weight"], min_genes=2)
    assert names.tolist() == ["A", "B"]  # C has one gene; zz is not a model gene
    np.testing.assert_array_equal(prog, [[-2.0, 2.0, 0.0], [0.0, 0.5, 3.0]])  # repeated A->g1 adds up
    _, member = gene_programs(net["source"], net["target"], ["g0", "g1", "g2"], min_genes=1)
    np.testing.assert_array_equal(member, [[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="min_genes=5"):
        gene_programs(net["source"], net["target"], ["g0", "g1", "g2"])
    with pytest.raises(ValueError, match="same length"):
        gene_programs(["A"], ["g0", "g1"], ["g0", "g1"])


def test_regulatory_edges_maps_and_cleans():
    src = ["T1", "T1", "T2", "T1", "T2", "T2", "T3", "T1", "T2"]
    tgt = ["g1", "g2", "g1", "T1", "T2", "g9", "g1", "g1", "T1"]
    w = [1, -1, 1, 0, 1, 1, -1, 1, -1]
    genes = ["T1", "T2", "g1", "g2"]
    tf, target, sign = regulatory_edges(src, tgt, w, genes)
    # T1->T1 (weight 0), T2->T2 (self), T2->g9 and T3->g1 (not genes) are dropped; T1->g1 twice, same sign: once
    assert list(zip(tf.tolist(), target.tolist(), sign.tolist(), strict=True)) == [
        (0, 2, 1.0),
        (0, 3, -1.0),
        (1, 0, -1.0),
        (1, 2, 1.0),
    ]
    tf, target, _ = regulatory_edges(["A", "A"], ["B", "B"], [1.0, -1.0], ["A", "B"])
    assert len(tf) == len(target) == 0  # conflicting repeats dropped
    with pytest.raises(ValueError, match="unique"):
        regulatory_edges(src, tgt, w, ["T1", "T1"])
    with pytest.raises(ValueError, match="same length"):
        regulatory_edges(src, tgt, w[:-1], genes)


def test_regulatory_penalty_values():
    tf, target, sign = np.array([0, 0]), np.array([1, 2]), np.array([1.0, -1.0])  # 0 activates 1, represses 2
    consistent = torch.tensor([[1.0, 2.0, -0.5], [-1.0, -1.0, 3.0], [0.0, 5.0, 5.0]])
    assert regulatory_penalty(consistent, tf, target, sign).item() == 0.0
    wrong = torch.tensor([[1.0, -2.0, 0.5]])  # products s * d_tf * d_target = -2 and -0.5
    assert regulatory_penalty(wrong, tf, target, sign).item() == pytest.approx((2.0 + 0.5) / 2)
    assert regulatory_penalty(wrong[0], tf, target, sign).item() == pytest.approx(1.25)  # 1-D input
    small = torch.tensor([[0.1, 0.1, -0.1]])  # consistent, products 0.01: penalised only with a margin
    assert regulatory_penalty(small, tf, target, sign).item() == 0.0
    assert regulatory_penalty(small, tf, target, sign, margin=0.5).item() == pytest.approx(0.49)
    assert regulatory_penalty(wrong, torch.as_tensor(tf), torch.as_tensor(target), torch.as_tensor(sign)).item() == 1.25


def test_regulatory_penalty_gradient_moves_towards_consistency():
    tf, target, sign = np.array([0, 0]), np.array([1, 2]), np.array([1.0, -1.0])
    delta = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    opt = torch.optim.SGD([delta], lr=0.1)
    values = []
    for _ in range(30):
        opt.zero_grad()
        loss = regulatory_penalty(delta, tf, target, sign)
        loss.backward()
        opt.step()
        values.append(loss.item())
    assert values[0] > values[5] > values[-1]
    assert values[-1] == 0.0
    d = delta.detach()[0]
    assert d[0] * d[1] >= 0  # activation: same sign
    assert d[0] * d[2] <= 0  # repression: opposite signs
    # a consistent delta gets no gradient at all
    ok = torch.tensor([[1.0, 2.0, -0.5]], requires_grad=True)
    regulatory_penalty(ok, tf, target, sign).backward()
    assert torch.equal(ok.grad, torch.zeros_like(ok))


def test_regulatory_penalty_edge_cases():
    delta = torch.ones(2, 3, requires_grad=True)
    empty = np.zeros(0, dtype=np.int64)
    out = regulatory_penalty(delta, empty, empty, np.zeros(0))
    assert out.item() == 0.0
    out.backward()  # still attached to the graph
    with pytest.raises(ValueError, match="outside"):
        regulatory_penalty(delta, np.array([0]), np.array([3]), np.array([1.0]))
    with pytest.raises(ValueError, match="same length"):
        regulatory_penalty(delta, np.array([0, 1]), np.array([2]), np.array([1.0]))
    with pytest.raises(ValueError, match="delta must be"):
        regulatory_penalty(torch.ones(2, 2, 2), np.array([0]), np.array([1]), np.array([1.0]))


def test_real_collectri_edges(shared_data):
    net = pd.read_csv(shared_data / "prior_knowledge" / "collectri_human.csv")
    genes = ["MYC", "TERT", "TP53", "CDKN1A", "MDM2", "BAX", "NOT_A_GENE"]
    tf, target, sign = regulatory_edges(net["source"], net["target"], net["weight"], genes)
    pairs = {(genes[i], genes[j]): s for i, j, s in zip(tf, target, sign, strict=True)}
    assert pairs[("TP53", "CDKN1A")] == 1.0
    assert pairs[("MYC", "TERT")] == 1.0
    assert all(a != b for a, b in pairs)
    assert not any("NOT_A_GENE" in p for p in pairs)
