from __future__ import annotations

import numpy as np
import pytest
import torch

from vcell.module import CausalVAEModule
from vcell.module._perturbation_encoders import (
    DoseResponse,
    GeneGraphOperators,
    OneHotOperators,
    PairInteractions,
    PerturbationEncoder,
    TableOperators,
)


def _enc(n: int = 9, n_atoms: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    enc = torch.rand(n, n_atoms, generator=g) * 2.0
    enc[torch.rand(n, n_atoms, generator=g) < 0.5] = 0.0
    enc[0] = 0.0
    enc[1, :2] = 1.0
    return enc


def _randomise(m: torch.nn.Module) -> None:
    torch.manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)


def _chain(n: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Path graph 0-1-...-(n-1) with weights 0.5..1."""
    return np.arange(n - 1), np.arange(1, n), np.linspace(0.5, 1.0, n - 1)


def test_shapes_and_seen_one_hot():
    torch.manual_seed(0)
    one = OneHotOperators(5, 3)
    assert one().shape == (5, 3)
    assert one() is one.weight
    assert 0.05 < float(one.weight.detach().std()) < 0.2
    masked = OneHotOperators(5, 3, seen_atoms=np.array([1, 1, 0, 1, 0]))
    out = masked()
    assert torch.equal(out[[2, 4]], torch.zeros(2, 3))
    assert torch.equal(out[[0, 1, 3]], masked.weight[[0, 1, 3]])
    table = TableOperators(np.random.default_rng(0).normal(size=(6, 4)), 3, n_hidden=8)
    assert table().shape == (6, 3)
    assert table.n_atoms == 6
    graph = GeneGraphOperators(_chain(), np.array([0, 4, -1]), dim=3, n_embed=5, n_hidden=7)
    assert graph().shape == (3, 3)
    assert DoseResponse(4)(_enc(9, 3)).shape == (9, 4)  # padded
    assert PairInteractions(np.array([[0, 1]]), 3)(torch.ones(9, 4)).shape == (9, 3)
    assert torch.equal(PairInteractions(None, 3)(torch.ones(9, 4)), torch.zeros(9, 3))


def test_dose_response_matches_causal_vae():
    seen = np.array([True, True, False, True])
    m = CausalVAEModule(10, 4, n_latent=3, n_hidden=8, seen_atoms=seen)
    _randomise(m)
    dose = DoseResponse(4, seen_atoms=seen)
    dose.load_state_dict({"log_ec50": m.log_ec50, "log_slope": m.log_slope, "seen_atoms": m.seen_atoms})
    enc = _enc()
    assert torch.equal(dose(enc), m.dose_scale(enc))
    assert torch.equal(dose(enc[:, :2]), m.dose_scale(enc[:, :2]))
    s = dose(enc)
    assert torch.equal(s[0], torch.zeros(4))
    assert s[1, 0].item() > 0
    # unseen atom 2 uses the mean curve of the seen ones
    ec50, slope = dose.params()
    assert torch.allclose(ec50[2], m.log_ec50[[0, 1, 3]].mean())
    assert torch.allclose(slope[2], m.log_slope[[0, 1, 3]].exp().mean())
    # initial curve: s = sigmoid(log(1) + 2) at dose 1
    assert torch.allclose(DoseResponse(2)(torch.ones(1, 2)), torch.sigmoid(torch.tensor(2.0)).expand(1, 2))
    with pytest.raises(ValueError, match="more than n_atoms"):
        dose(torch.ones(2, 5))


@pytest.mark.parametrize("kind", ["one_hot", "table"])
def test_perturbation_encoder_matches_causal_vae(kind: str):
    pairs = np.array([[0, 1], [1, 3]])
    feats = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32) if kind == "table" else None
    m = CausalVAEModule(10, 4, n_latent=3, n_hidden=8, pairs=pairs, perturbation_features=feats)
    _randomise(m)
    if kind == "table":
        ops = TableOperators(feats, 3, n_hidden=8)
        ops.mlp.load_state_dict(m.pert_mlp.state_dict())
    else:
        ops = OneHotOperators(4, 3)
        ops.load_state_dict({"weight": m.operators, "seen_atoms": m.seen_atoms})
    dose = DoseResponse(4)
    dose.load_state_dict({"log_ec50": m.log_ec50, "log_slope": m.log_slope, "seen_atoms": m.seen_atoms})
    inter = PairInteractions(pairs, 3)
    inter.load_state_dict({"pairs": m.pairs, "effect": m.pair_effect, "gate": m.pair_gate})
    pe = PerturbationEncoder(ops, dose, interactions=inter)
    enc = _enc()
    assert torch.allclose(pe(enc), m.perturbation_latent(enc), atol=1e-6)
    assert torch.equal(pe(enc), m.perturbation_latent(enc))
    assert torch.equal(pe.penalty(), torch.sigmoid(m.pair_gate).sum())
    assert pe(enc).abs().sum().item() > 0
    # without interactions: the plain sum s @ operators
    assert torch.equal(PerturbationEncoder(ops, dose)(enc), dose(enc) @ ops())
    assert PerturbationEncoder(ops, dose).penalty().item() == 0.0


def test_pair_interactions_by_hand():
    inter = PairInteractions(np.array([[0, 2]]), 2)
    assert torch.equal(inter.gate, torch.tensor([-2.0]))
    assert inter.effect.abs().sum().item() == 0
    with torch.no_grad():
        inter.effect.copy_(torch.tensor([[1.0, -2.0]]))
        inter.gate.fill_(0.0)
    s = torch.tensor([[0.5, 1.0, 0.4], [1.0, 1.0, 0.0]])
    expected = torch.tensor([[0.5 * 0.4 * 0.5 * 1.0, 0.5 * 0.4 * 0.5 * -2.0], [0.0, 0.0]])
    assert torch.allclose(inter(s), expected)
    assert inter.penalty().item() == pytest.approx(0.5)


def _dense_reference(graph: GeneGraphOperators, edges, atom_nodes: np.ndarray, n_nodes: int) -> torch.Tensor:
    """The same GNN on the full graph (dense adjacency), nodes the module pruned get random embeddings."""
    w = np.zeros((n_nodes, n_nodes))
    for s, t, v in zip(*edges, strict=True):
        if s != t:
            w[s, t] = w[t, s] = max(w[s, t], v)
    w += np.eye(n_nodes)
    d = w.sum(1)
    adj = torch.as_tensor(w / np.sqrt(d[:, None] * d[None, :]), dtype=torch.float32)
    h = torch.randn(n_nodes, graph.n_embed, generator=torch.Generator().manual_seed(9))
    h[graph.nodes] = graph.node_embedding
    seen = graph.seen_atoms.numpy()
    masked = set(atom_nodes[~seen]) - set(atom_nodes[seen])
    h[sorted(masked)] = 0.0
    for lin in graph.layers:
        h = h + torch.relu(adj @ lin(h))
    return graph.mlp(h[atom_nodes])


def test_gene_graph_exact_after_pruning():
    rng = np.random.default_rng(0)
    n = 60
    src, dst = rng.integers(0, n, 90), rng.integers(0, n, 90)
    edges = (src, dst, rng.uniform(0.1, 1.0, 90))
    atom_nodes = np.array([3, 17, 17, 42])
    seen = np.array([True, False, True, False])
    torch.manual_seed(0)
    graph = GeneGraphOperators(edges, atom_nodes, dim=4, n_nodes=n, n_embed=6, n_hidden=8, seen_atoms=seen)
    assert len(graph.nodes) < n  # pruned to the 2-hop neighbourhoods
    out = graph()
    assert torch.allclose(out[1], out[2], atol=1e-6)  # atoms sharing a node share a vector
    weights = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    grad = graph.node_embedding.grad.clone()
    graph.zero_grad()
    ref = _dense_reference(graph, edges, atom_nodes, n)
    assert torch.allclose(out, ref, atol=1e-5)
    (ref * weights).sum().backward()  # the sparse symmetric product's gradient matches the dense one
    assert torch.allclose(grad, graph.node_embedding.grad, atol=1e-5)
    assert grad.abs().sum().item() > 0


def test_unseen_gene_vector_comes_from_its_neighbours():
    # path 0-1-...-9; atom 0 (gene 0) unseen, atoms at genes 5 and 9 seen; 2 layers: gene 0 sees genes 1, 2 only
    torch.manual_seed(0)
    graph = GeneGraphOperators(_chain(), np.array([0, 5, 9]), dim=4, seen_atoms=np.array([False, True, True]))
    row = {int(v): i for i, v in enumerate(graph.nodes)}
    assert set(row) == {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}
    base = graph().detach()

    def perturbed(gene: int) -> torch.Tensor:
        with torch.no_grad():
            old = graph.node_embedding[row[gene]].clone()
            graph.node_embedding[row[gene]] += torch.randn(graph.n_embed)
            out = graph().detach()
            graph.node_embedding[row[gene]] = old
        return out

    for neighbour in (1, 2):
        assert not torch.allclose(perturbed(neighbour)[0], base[0])
    for gene in (0, 3, 4, 5):  # its own (masked) embedding and genes beyond 2 hops
        assert torch.equal(perturbed(gene)[0], base[0])
    assert not torch.allclose(perturbed(5)[1], base[1])  # a seen gene uses its own embedding
    # gradients reach the neighbours' embeddings from the unseen atom's vector
    graph()[0].sum().backward()
    grad = graph.node_embedding.grad.abs().sum(1)
    assert float(grad[row[1]]) > 0
    assert float(grad[row[0]]) == 0
    assert float(grad[row[3]]) == 0


def test_gene_graph_atoms_outside_the_graph():
    torch.manual_seed(0)
    graph = GeneGraphOperators(_chain(5), np.array([0, -1, -1]), dim=3, seen_atoms=np.array([True, True, False]))
    assert graph.nodes.tolist() == [0, 1, 2, 5, 6]  # two isolated nodes appended after the 5 genes
    out = graph().detach()
    assert not torch.allclose(out[1], out[2])
    with torch.no_grad():
        graph.node_embedding[4] += 1.0  # the unseen absent atom's own node: masked
    assert torch.equal(graph()[2], out[2])


def test_gene_graph_fits_seen_atoms():
    rng = np.random.default_rng(1)
    n = 50
    src = np.repeat(np.arange(n), 3)
    edges = (src, rng.integers(0, n, len(src)), rng.uniform(0.2, 1.0, len(src)))
    atom_nodes = rng.choice(n, 30, replace=False)
    torch.manual_seed(0)
    graph = GeneGraphOperators(edges, atom_nodes, dim=8, n_nodes=n, n_embed=16, n_hidden=32)
    target = torch.randn(30, 8, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(graph.parameters(), lr=1e-2)
    first = None
    for _ in range(300):
        loss = ((graph() - target) ** 2).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_gene_graph_predicts_unseen_atoms_of_a_smooth_signal():
    # ring lattice (3 neighbours each side), targets smooth along the ring; 20% of the genes are held out
    n = 120
    src = np.repeat(np.arange(n), 3)
    pos = np.arange(n) / n * 2 * np.pi
    target = torch.as_tensor(np.stack([np.sin(pos), np.cos(pos), np.sin(2 * pos)], 1), dtype=torch.float32)
    seen = torch.as_tensor(np.random.default_rng(0).random(n) > 0.2)
    torch.manual_seed(0)
    graph = GeneGraphOperators((src, (src + np.tile([1, 2, 3], n)) % n), np.arange(n), dim=3, seen_atoms=seen.numpy())
    opt = torch.optim.Adam(graph.parameters(), lr=1e-2)
    for _ in range(300):
        loss = ((graph()[seen] - target[seen]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        unseen = graph()[~seen]
    mse, zero = ((unseen - target[~seen]) ** 2).mean().item(), (target[~seen] ** 2).mean().item()
    assert mse < 0.5 * zero
    assert np.corrcoef(unseen.numpy().ravel(), target[~seen].numpy().ravel())[0, 1] > 0.8


def test_seeds_give_identical_results():
    def build() -> torch.Tensor:
        torch.manual_seed(4)
        graph = GeneGraphOperators(_chain(), np.array([0, 5]), dim=3, seen_atoms=np.array([False, True]))
        pe = PerturbationEncoder(graph, DoseResponse(2), interactions=PairInteractions(np.array([[0, 1]]), 3))
        return pe(_enc(5, 2))

    assert torch.equal(build(), build())
    torch.manual_seed(5)
    other = GeneGraphOperators(_chain(), np.array([0, 5]), dim=3)
    assert not torch.allclose(other().detach(), build().new_zeros(2, 3))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="seen_atoms"):
        OneHotOperators(3, 2, seen_atoms=np.array([True, False]))
    with pytest.raises(ValueError, match="features"):
        TableOperators(np.ones(4), 2)
    with pytest.raises(ValueError, match="n_nodes"):
        GeneGraphOperators(_chain(), np.array([0, 12]), dim=2, n_nodes=10)
    with pytest.raises(ValueError, match="weights"):
        GeneGraphOperators((np.array([0]), np.array([1]), np.array([-1.0])), np.array([0]), dim=2)
    with pytest.raises(ValueError, match="edges"):
        GeneGraphOperators((np.array([0]),), np.array([0]), dim=2)
    with pytest.raises(ValueError, match="integer source/target"):
        GeneGraphOperators((np.array([0]), np.array([1.5])), np.array([0]), dim=2)
    with pytest.raises(ValueError, match="atom_nodes"):
        GeneGraphOperators(_chain(), np.array([0.5]), dim=2)
    with pytest.raises(ValueError, match="pairs"):
        PairInteractions(np.array([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="atoms"):
        PerturbationEncoder(OneHotOperators(3, 2), DoseResponse(4))
    with pytest.raises(ValueError, match="pairs of atoms < 3"):
        PerturbationEncoder(
            OneHotOperators(3, 2), DoseResponse(3), interactions=PairInteractions(np.array([[0, 3]]), 2)
        )


@pytest.mark.gpu
def test_gene_graph_on_cuda_matches_cpu():
    torch.manual_seed(0)
    graph = GeneGraphOperators(_chain(), np.array([0, 5, -1]), dim=3, seen_atoms=np.array([False, True, True]))
    cpu = graph()
    cpu.sum().backward()
    grad = graph.node_embedding.grad.clone()
    graph.zero_grad()
    graph = graph.cuda()
    out = graph()
    out.sum().backward()
    assert torch.allclose(out.cpu(), cpu, atol=1e-5)
    assert torch.allclose(graph.node_embedding.grad.cpu(), grad, atol=1e-5)
