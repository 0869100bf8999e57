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


def _reference_dose(enc: torch.Tensor, log_ec50: torch.Tensor, log_slope: torch.Tensor, seen: torch.Tensor):
    """CausalVAEModule's former inline dose-response code (the numbers published benchmarks were made with)."""
    enc = torch.nn.functional.pad(enc, (0, len(log_ec50) - enc.shape[1])) if enc.shape[1] < len(log_ec50) else enc
    active = enc > 0
    ec50, slope = log_ec50, torch.exp(log_slope)
    if not bool(seen.all()) and bool(seen.any()):
        ec50 = torch.where(seen, ec50, ec50[seen].mean())
        slope = torch.where(seen, slope, slope[seen].mean())
    log_dose = torch.log(torch.where(active, enc, torch.ones_like(enc)))
    return torch.sigmoid(slope * (log_dose - ec50)) * active


def _reference_latent(s: torch.Tensor, ops: torch.Tensor, pairs: torch.Tensor, effect, gate) -> torch.Tensor:
    """CausalVAEModule's former inline ``perturbation_latent`` given the dose responses ``s``."""
    z = s @ ops
    if len(pairs):
        coef = s[:, pairs[:, 0]] * s[:, pairs[:, 1]]
        z = z + coef @ (torch.sigmoid(gate)[:, None] * effect)
    return z


def test_dose_response_matches_the_former_inline_code():
    seen = np.array([True, True, False, True])
    m = CausalVAEModule(10, 4, n_latent=3, n_hidden=8, seen_atoms=seen)
    _randomise(m)
    dose = m.perturbation.dose
    assert isinstance(dose, DoseResponse)
    enc = _enc()
    ref = _reference_dose(enc, dose.log_ec50, dose.log_slope, torch.as_tensor(seen))
    assert torch.equal(dose(enc), ref)
    assert torch.equal(m.dose_scale(enc), ref)
    assert torch.equal(dose(enc[:, :2]), _reference_dose(enc[:, :2], dose.log_ec50, dose.log_slope, dose.seen_atoms))
    s = dose(enc)
    assert torch.equal(s[0], torch.zeros(4))
    assert s[1, 0].item() > 0
    # unseen atom 2 uses the mean curve of the seen ones
    ec50, slope = dose.params()
    assert torch.allclose(ec50[2], dose.log_ec50[[0, 1, 3]].mean())
    assert torch.allclose(slope[2], dose.log_slope[[0, 1, 3]].exp().mean())
    # columns beyond the trained atoms: that mean curve too
    extra = torch.tensor([[0.0, 2.0], [0.5, 0.0]])
    expected = torch.sigmoid(slope[2] * (torch.log(extra.clamp(min=1e-30)) - ec50[2])) * (extra > 0)
    assert torch.allclose(dose.unseen(extra), expected)
    # initial curve: s = sigmoid(log(1) + 2) at dose 1
    assert torch.allclose(DoseResponse(2)(torch.ones(1, 2)), torch.sigmoid(torch.tensor(2.0)).expand(1, 2))
    with pytest.raises(ValueError, match="more than n_atoms"):
        dose(torch.ones(2, 5))


@pytest.mark.parametrize("kind", ["one_hot", "table"])
def test_causal_vae_perturbation_latent_matches_the_former_inline_code(kind: str):
    pairs = np.array([[0, 1], [1, 3]])
    feats = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32) if kind == "table" else None
    m = CausalVAEModule(10, 4, n_latent=3, n_hidden=8, pairs=pairs, perturbation_features=feats)
    _randomise(m)
    pe = m.perturbation
    assert isinstance(pe.operators, TableOperators if kind == "table" else OneHotOperators)
    ops = pe.operators.mlp(pe.operators.features) if kind == "table" else pe.operators.weight
    if kind == "one_hot":
        assert pe.operators() is pe.operators.weight  # no copy: the same autograd graph as the inline code
    inter = pe.interactions
    enc = _enc()
    s = _reference_dose(enc, pe.dose.log_ec50, pe.dose.log_slope, pe.dose.seen_atoms)
    ref = _reference_latent(s, ops, inter.pairs, inter.effect, inter.gate)
    assert torch.equal(pe(enc), ref)
    assert torch.equal(m.perturbation_latent(enc), ref)
    assert torch.equal(m.operator_vectors(), ops)
    assert torch.equal(pe.penalty(), torch.sigmoid(inter.gate).sum())
    assert pe(enc).abs().sum().item() > 0
    # without interactions: the plain sum s @ operators
    assert torch.equal(PerturbationEncoder(pe.operators, pe.dose)(enc), pe.dose(enc) @ pe.operators())
    assert PerturbationEncoder(pe.operators, pe.dose).penalty().item() == 0.0
    with pytest.raises(ValueError, match="extra_nodes"):  # columns beyond the atoms need graph operators
        pe(torch.ones(2, 5), torch.zeros(1, dtype=torch.long))


def test_causal_vae_reset_keeps_the_former_random_draw_order():
    """Sub-modules first (registration order), then covariate embeddings, then the one-hot rows (seeded results)."""
    m = CausalVAEModule(10, 4, n_conditions=3, covariate_sizes=(2,), n_latent=3, n_hidden=8, pairs=np.array([[0, 1]]))
    torch.manual_seed(5)
    m.reset_parameters()
    weight = m.perturbation.operators.weight.detach().clone()
    torch.manual_seed(5)
    for sub in m.modules():
        if isinstance(sub, torch.nn.Linear | torch.nn.LayerNorm | torch.nn.Embedding):
            sub.reset_parameters()
    with torch.no_grad():
        m.covariates[0].weight.normal_(0.0, 0.1)
    assert torch.equal(weight, torch.empty(4, 3).normal_(0.0, 0.1))
    assert torch.equal(m.perturbation.dose.log_ec50, torch.full((4,), -2.0))
    assert torch.equal(m.perturbation.interactions.gate, torch.tensor([-2.0]))


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


def _dense_reference(graph: GeneGraphOperators, edges, nodes: np.ndarray, n_nodes: int, keep: set) -> torch.Tensor:
    """The same GNN on the full graph (dense adjacency), one propagation per node of ``nodes``.

    Nodes without a learned embedding (beyond ``n_layers`` hops of every seen atom) count as zero; each node's own
    embedding is zeroed unless it is in ``keep`` (the nodes of seen atoms).
    """
    w = np.zeros((n_nodes, n_nodes))
    for s, t, v in zip(*edges, strict=True):
        if s != t:
            w[s, t] = w[t, s] = max(w[s, t], v)
    w += np.eye(n_nodes)
    d = w.sum(1)
    adj = torch.as_tensor(w / np.sqrt(d[:, None] * d[None, :]), dtype=torch.float32)
    h0 = torch.zeros(n_nodes, graph.n_embed)
    h0[graph.nodes] = graph.node_embedding
    rows = []
    for node in nodes:
        mask = torch.ones(n_nodes, 1)
        if node not in keep:
            mask[node] = 0.0
        h = h0 * mask
        for lin in graph.layers:
            h = h + torch.relu(adj @ lin(h))
        rows.append(h[node])
    return graph.mlp(torch.stack(rows))


def test_gene_graph_exact_after_pruning():
    rng = np.random.default_rng(0)
    n = 60
    src, dst = rng.integers(0, n, 90), rng.integers(0, n, 90)
    edges = (src, dst, rng.uniform(0.1, 1.0, 90))
    atom_nodes = np.array([3, 17, 17, 42])
    seen = np.array([True, False, True, False])
    torch.manual_seed(0)
    graph = GeneGraphOperators(edges, atom_nodes, dim=4, n_nodes=n, n_embed=6, n_hidden=8, seen_atoms=seen)
    # embedded nodes: the 2-hop neighbourhoods of the seen atoms' genes
    near = np.zeros((n, n), dtype=bool)
    near[src, dst] = near[dst, src] = True
    near |= np.eye(n, dtype=bool)
    two_hops = (near.astype(int) @ near.astype(int)) > 0
    assert graph.nodes.tolist() == np.flatnonzero(two_hops[[3, 17]].any(0)).tolist()
    assert len(graph.nodes) < n
    out = graph()
    assert torch.allclose(out[1], out[2], atol=1e-6)  # atoms sharing a node share a vector
    weights = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    grad = graph.node_embedding.grad.clone()
    graph.zero_grad()
    ref = _dense_reference(graph, edges, atom_nodes, n, keep={3, 17})
    assert torch.allclose(out, ref, atol=1e-5)
    (ref * weights).sum().backward()  # the sparse symmetric product's gradient matches the dense one
    assert torch.allclose(grad, graph.node_embedding.grad, atol=1e-5)
    assert grad.abs().sum().item() > 0
    # any graph node as an unseen atom: the same as an unseen atom of the module
    nodes = np.array([42, 5, 17, 3])
    vec = graph.node_vectors(nodes)
    assert torch.allclose(vec[0], out[3], atol=1e-6)
    assert torch.allclose(vec[2:], out[[1, 0]], atol=1e-6)  # nodes of seen atoms keep their embedding
    assert torch.allclose(vec, _dense_reference(graph, edges, nodes, n, keep={3, 17}), atol=1e-5)
    # each node on its own: a vector does not depend on which other nodes are asked for
    assert torch.allclose(graph.node_vectors(nodes[1:2])[0], vec[1], atol=1e-6)
    with pytest.raises(ValueError, match="n_nodes"):
        graph.node_vectors(np.array([n]))


def _with_noisy_node(graph: GeneGraphOperators, node_row: int) -> torch.Tensor:
    """The graph's operators with random noise added to one node's embedding (restored afterwards)."""
    with torch.no_grad():
        old = graph.node_embedding[node_row].clone()
        graph.node_embedding[node_row] += torch.randn(graph.n_embed)
        out = graph().detach()
        graph.node_embedding[node_row] = old
    return out


def test_unseen_gene_vector_comes_from_its_neighbours():
    # path 0-1-...-9; atom 0 (gene 0) unseen, atoms at genes 3 and 9 seen; 2 layers: gene 0 sees genes 1, 2 only
    torch.manual_seed(0)
    graph = GeneGraphOperators(_chain(), np.array([0, 3, 9]), dim=4, seen_atoms=np.array([False, True, True]))
    row = {int(v): i for i, v in enumerate(graph.nodes)}
    assert set(row) == {1, 2, 3, 4, 5, 7, 8, 9}  # within 2 hops of a seen gene: what training can reach
    base = graph().detach()

    def perturbed(gene: int) -> torch.Tensor:
        return _with_noisy_node(graph, row[gene])

    for neighbour in (1, 2):
        assert not torch.allclose(perturbed(neighbour)[0], base[0])
    for gene in (3, 4, 5):  # genes beyond 2 hops
        assert torch.equal(perturbed(gene)[0], base[0])
    assert not torch.allclose(perturbed(3)[1], base[1])  # a seen gene uses its own embedding
    assert torch.allclose(graph.node_vectors(np.array([0]))[0], base[0], atol=1e-6)
    # gradients reach the neighbours' embeddings from the unseen atom's vector
    graph()[0].sum().backward()
    grad = graph.node_embedding.grad.abs().sum(1)
    assert float(grad[row[1]]) > 0
    assert float(grad[row[3]]) == 0


def test_gene_graph_without_own_embedding_uses_neighbours_for_seen_atoms_too():
    # path 0-1-...-9, 1 layer; seen atoms at genes 3 and 6: each is a function of its two neighbours only
    torch.manual_seed(0)
    graph = GeneGraphOperators(_chain(), np.array([3, 6]), dim=4, n_layers=1, own_embedding=False)
    row = {int(v): i for i, v in enumerate(graph.nodes)}
    base = graph().detach()

    def perturbed(gene: int) -> torch.Tensor:
        return _with_noisy_node(graph, row[gene])

    assert torch.equal(perturbed(3)[0], base[0])  # its own node is left out
    assert not torch.allclose(perturbed(2)[0], base[0])
    assert not torch.allclose(perturbed(4)[0], base[0])
    assert torch.equal(perturbed(5)[0], base[0])  # beyond 1 hop
    # a seen atom's vector is the rule applied to an unseen gene at the same node
    assert torch.allclose(graph.node_vectors(np.array([3, 6])), base, atol=1e-6)
    torch.manual_seed(0)
    with_own = GeneGraphOperators(_chain(), np.array([3, 6]), dim=4, n_layers=1)
    assert not torch.allclose(with_own(), base)


def test_gene_graph_atoms_outside_the_graph():
    torch.manual_seed(0)
    graph = GeneGraphOperators(_chain(5), np.array([0, -1, -1]), dim=3, seen_atoms=np.array([True, True, False]))
    assert graph.nodes.tolist() == [0, 1, 2, 5]  # the seen absent atom's isolated node appended after the 5 genes
    out = graph().detach()
    assert not torch.allclose(out[1], out[2])
    with torch.no_grad():
        graph.node_embedding += 1.0  # the unseen absent atom has no neighbour and no embedding: a constant vector
    assert torch.equal(graph()[2], out[2])
    assert not torch.allclose(graph()[1], out[1])


def test_perturbation_encoder_extra_graph_columns():
    """Columns beyond the atoms are graph nodes unseen in training: their vectors, the mean dose response."""
    torch.manual_seed(0)
    graph = GeneGraphOperators(_chain(), np.array([2, 5]), dim=3, n_layers=1)
    pe = PerturbationEncoder(graph, DoseResponse(2), interactions=PairInteractions(np.array([[0, 1]]), 3))
    _randomise(pe)
    enc = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.5, 0.0]])
    nodes = torch.tensor([3, 8])
    z = pe(enc, nodes)
    expected = pe(enc[:, :2])
    expected = expected + pe.dose.unseen(enc[:, 2:]) @ graph.node_vectors(nodes)
    assert torch.allclose(z, expected, atol=1e-6)
    assert torch.equal(pe(enc, nodes.expand(4, 2)), z)  # per-cell rows of the same nodes
    assert torch.equal(z[0], pe(enc[:, :2])[0])
    assert not torch.allclose(z[1], z[0])
    # no node within 1 hop of node 8 is within 1 hop of the atoms' genes 2 and 5: its vector ignores every embedding
    vec = graph.node_vectors(np.array([8, 4]))
    with torch.no_grad():
        graph.node_embedding.add_(1.0)
    after = graph.node_vectors(np.array([8, 4]))
    assert torch.equal(after[0], vec[0])
    assert not torch.allclose(after[1], vec[1])
    with pytest.raises(ValueError, match="extra_nodes"):
        pe(enc)


def test_gene_graph_fits_seen_atoms():
    rng = np.random.default_rng(1)
    n = 50
    src = np.repeat(np.arange(n), 3)
    edges = (src, rng.integers(0, n, len(src)), rng.uniform(0.2, 1.0, len(src)))
    atom_nodes = rng.choice(n, 30, replace=False)
    torch.manual_seed(0)
    graph = GeneGraphOperators(edges, atom_nodes, dim=8, n_nodes=n, n_embed=16, n_hidden=32)
    target = torch.randn(30, 8, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(graph.parameters(), lr=3e-2)
    first = None
    for _ in range(60):  # the loss falls below 0.001 of its first value (formerly 300 steps at lr 1e-2)
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
    opt = torch.optim.Adam(graph.parameters(), lr=3e-2)
    for _ in range(60):  # fits closer than 300 steps at lr=1e-2 did (unseen mse/zero 0.09 vs 0.29, r 0.96 vs 0.88)
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
