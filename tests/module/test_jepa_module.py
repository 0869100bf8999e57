from __future__ import annotations

import numpy as np
import pytest
import torch

from vcell.module import (
    CellJEPAModule,
    JEPAModule,
    LatentTransitionModule,
    cosine_error,
    effective_rank,
    ema_update,
    retrieval_ranks,
)
from vcell.module._jepa import MASK_KEY, SOURCE_Z_KEY, TARGET_Z_KEY, covariance_loss, module_index, variance_loss

BLOCKS = [list(range(k, k + 5)) for k in range(0, 20, 5)]  # 4 disjoint modules of 5 genes


def _x(n: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 20, generator=g) * 3


def test_ema_update_hand_computed():
    target, online = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        target.weight.copy_(torch.tensor([[1.0, 2.0]]))
        target.bias.fill_(0.0)
        online.weight.copy_(torch.tensor([[3.0, -2.0]]))
        online.bias.fill_(1.0)
    ema_update(target, online, 0.9)
    # t <- 0.9 t + 0.1 o
    np.testing.assert_allclose(target.weight.detach().numpy(), [[1.2, 1.6]], rtol=1e-6)
    np.testing.assert_allclose(target.bias.detach().numpy(), [0.1], rtol=1e-6)
    np.testing.assert_allclose(online.weight.detach().numpy(), [[3.0, -2.0]])  # online untouched
    ema_update(target, online, 1.0)  # momentum 1: unchanged
    np.testing.assert_allclose(target.weight.detach().numpy(), [[1.2, 1.6]], rtol=1e-6)
    ema_update(target, online, 0.0)  # momentum 0: a copy
    np.testing.assert_allclose(target.weight.detach().numpy(), [[3.0, -2.0]])
    with pytest.raises(ValueError, match="momentum"):
        ema_update(target, online, 1.5)
    with pytest.raises(ValueError, match="same parameters"):
        ema_update(target, torch.nn.Linear(3, 1), 0.5)


def test_module_target_encoder_follows_by_ema():
    torch.manual_seed(0)
    m = JEPAModule(20, BLOCKS, n_latent=8, n_heads=2, ema_momentum=0.75)
    ctx, tgt = m.context_encoder, m.target_encoder
    # starts as a copy, excluded from gradients
    for a, b in zip(ctx.parameters(), tgt.parameters(), strict=True):
        assert torch.equal(a, b)
        assert not b.requires_grad
    before = tgt.weight.detach().clone()
    with torch.no_grad():
        ctx.weight.add_(1.0)
    m.update_target()
    np.testing.assert_allclose(tgt.weight.detach().numpy(), (before + 0.25).numpy(), rtol=1e-5, atol=1e-6)
    # a training step never changes the target directly
    x = _x()
    out = m({"X": x})
    m.loss({"X": x}, out).loss.backward()
    assert tgt.weight.grad is None
    assert ctx.weight.grad is not None
    # ema=False: the targets are the context encoder's own (stop-gradient) outputs
    plain = JEPAModule(20, BLOCKS, n_latent=8, n_heads=2, ema=False)
    assert plain.target_encoder is None
    plain.update_target()  # a no-op
    plain.eval()
    out = plain({"X": x})
    tokens = plain.context_encoder(plain.standardize(x))[0]
    np.testing.assert_allclose(
        out["target"].numpy(), torch.nn.functional.layer_norm(tokens, (8,)).detach().numpy(), atol=1e-5
    )


@pytest.mark.parametrize("encoder", ["transformer", "mlp"])
def test_masked_module_genes_are_hidden_from_the_context(encoder):
    torch.manual_seed(0)
    # module 4 overlaps modules 0 and 1: genes 3, 4 (module 0) and 5 (module 1)
    modules = [*BLOCKS, [3, 4, 5]]
    m = JEPAModule(20, modules, n_latent=8, n_heads=2, encoder=encoder).eval()
    x = _x(4)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[:, 1] = True  # genes 5..9 hidden
    tokens, z = m.context(x, mask)
    changed = x.clone()
    changed[:, 5:10] += torch.tensor([5.0, -1.0, 2.0, 3.0, 1.0])
    tokens2, z2 = m.context(changed, mask)
    np.testing.assert_allclose(z.detach().numpy(), z2.detach().numpy(), atol=1e-5)
    visible = ~mask[0]
    np.testing.assert_allclose(tokens[:, visible].detach().numpy(), tokens2[:, visible].detach().numpy(), atol=1e-5)
    # a gene of a visible module that is not hidden does change it
    other = x.clone()
    other[:, 0] += 3.0
    assert not torch.allclose(z, m.context(other, mask)[1], atol=1e-4)
    # gene 5 is shared by the masked module 1 and the visible module 4: hidden in module 4 too
    assert bool(m.hidden_genes(mask)[0, 5])
    assert not bool(m.hidden_genes(mask)[0, 4])
    # without the mask the same change moves the embedding
    assert not torch.allclose(m.embed(x), m.embed(changed), atol=1e-4)


def test_sample_mask_counts_and_membership():
    torch.manual_seed(0)
    m = JEPAModule(20, BLOCKS, n_latent=8, n_heads=2, mask_ratio=0.5)
    mask = m.sample_mask(100)
    assert mask.shape == (100, 4)
    assert (mask.sum(1) == 2).all()
    assert len({tuple(r) for r in mask.int().tolist()}) > 1  # rows differ
    # at least one module masked and one visible at extreme ratios
    assert (JEPAModule(20, BLOCKS, n_latent=8, n_heads=2, mask_ratio=0.01).sample_mask(5).sum(1) == 1).all()
    assert (JEPAModule(20, BLOCKS, n_latent=8, n_heads=2, mask_ratio=0.99).sample_mask(5).sum(1) == 3).all()
    # membership: every gene of each block in its module, nothing else
    expected = np.zeros((4, 20))
    for k, genes in enumerate(BLOCKS):
        expected[k, genes] = 1.0
    np.testing.assert_array_equal(m.membership.numpy(), expected)
    index, valid = module_index([[0, 1, 2], [3]], 5)
    np.testing.assert_array_equal(index.numpy(), [[0, 1, 2], [3, 5, 5]])
    np.testing.assert_array_equal(valid.numpy(), [[True, True, True], [True, False, False]])


def test_vicreg_terms_rank_and_retrieval_hand_computed():
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # dim 0: std sqrt(2 + 1e-4) > 1 -> 0; dim 1: std sqrt(1e-4) = 0.01 -> 0.99; mean 0.495
    assert float(variance_loss(z)) == pytest.approx(0.495, abs=1e-6)
    # cov [[2, 2], [2, 2]]: off-diagonal squares 4 + 4, divided by d = 2
    assert float(covariance_loss(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))) == pytest.approx(4.0)
    assert effective_rank(np.outer(np.arange(5.0), [1.0, 2.0, 3.0])) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])) == pytest.approx(2.0)
    np.testing.assert_allclose(
        cosine_error([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], [[2.0, 0.0], [1.0, 0.0], [1.0, 0]]),
        [
            0.0,
            1 - 1 / np.sqrt(2),
            1.0,
        ],
    )
    true = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pred = np.array([[1.0, 0.1], [1.0, 0.0], [0.9, 1.0]])
    # pred 0 nearest true 0; pred 1 nearest true 0 (cos 1), then true 2 (0.71), true 1 (0): rank 3; pred 2 nearest 2
    np.testing.assert_array_equal(retrieval_ranks(pred, true), [1, 3, 1])
    with pytest.raises(ValueError, match="same shape"):
        retrieval_ranks(pred[:2], true)


def test_losses_and_diagnostics():
    torch.manual_seed(0)
    x = _x(32)
    for objective in ("jepa", "reconstruction"):
        m = JEPAModule(20, BLOCKS, n_latent=8, n_heads=2, objective=objective)
        out = m({"X": x})
        res = m.loss({"X": x}, out)
        assert set(res.terms) == {objective, "variance", "covariance"}
        assert set(res.metrics) == {"embedding_std", "effective_rank"}
        assert 1.0 <= float(res.metrics["effective_rank"]) <= 8.0
        expected = res.terms[objective] + res.terms["variance"] + 0.04 * res.terms["covariance"]
        assert float(res.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
        off = JEPAModule(20, BLOCKS, n_latent=8, n_heads=2, objective=objective, anti_collapse=False)
        res = off.loss({"X": x}, off({"X": x}))
        assert float(res.loss.detach()) == pytest.approx(float(res.terms[objective]), rel=1e-6)
    # reconstruction with a zero head predicts each gene's mean: the loss is the masked genes' squared deviation
    m = JEPAModule(20, BLOCKS, n_latent=8, n_heads=2, objective="reconstruction", anti_collapse=False)
    mean = x.mean(0)
    m.set_scale(mean.numpy(), x.std(0).numpy())
    with torch.no_grad():
        m.head_weight.zero_()
        m.head_bias.zero_()
    mask = torch.zeros(32, 4, dtype=torch.bool)
    mask[:, 2] = True  # genes 10..14
    res = m.loss({"X": x}, m({"X": x, MASK_KEY: mask}))
    expected = ((x[:, 10:15] - mean[10:15]) ** 2).mean()
    assert float(res.loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_transition_is_identity_for_controls_and_decodes():
    torch.manual_seed(0)
    t = LatentTransitionModule(8, 20, 3, covariate_sizes=(2,), n_hidden=16, decoder="linear")
    enc = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    batch = {"perturbation_encoding": enc, "covariates": torch.tensor([[0], [1], [1]])}
    delta = t.delta(batch).detach()
    assert delta.shape == (3, 8)
    np.testing.assert_allclose(delta[0].detach().numpy(), 0.0, atol=1e-7)
    assert float(delta[1].abs().sum()) > 0
    z = torch.randn(3, 8)
    batch.update({SOURCE_Z_KEY: z, TARGET_Z_KEY: z + 1, "X": torch.zeros(3, 20)})
    res = t.loss(batch, t(batch))
    assert set(res.terms) == {"transition_mse", "decoder_mse"}
    assert t.decode(z).shape == (3, 20)
    whole = CellJEPAModule(JEPAModule(20, BLOCKS, n_latent=8, n_heads=2), t)
    assert {"jepa", "transition"} <= {n for n, _ in whole.named_children()}


def test_errors():
    with pytest.raises(ValueError, match="encoder"):
        JEPAModule(20, BLOCKS, encoder="cnn")
    with pytest.raises(ValueError, match="objective"):
        JEPAModule(20, BLOCKS, objective="contrastive")
    with pytest.raises(ValueError, match="mask_ratio"):
        JEPAModule(20, BLOCKS, mask_ratio=1.0)
    with pytest.raises(ValueError, match="ema_momentum"):
        JEPAModule(20, BLOCKS, ema_momentum=2.0)
    with pytest.raises(ValueError, match="n_heads"):
        JEPAModule(20, BLOCKS, n_latent=10, n_heads=4)
    with pytest.raises(ValueError, match="at least 2"):
        JEPAModule(20, [list(range(20))])
    with pytest.raises(ValueError, match="outside"):
        JEPAModule(20, [[0, 1], [25]])
    with pytest.raises(ValueError, match="decoder"):
        LatentTransitionModule(8, 20, 3, decoder="gp")


@pytest.mark.parametrize("encoder", ["transformer", "mlp"])
def test_reset_parameters_is_seeded(encoder):
    """Every weight (attention projections included) is re-drawn from torch's global RNG."""
    a = JEPAModule(20, BLOCKS, n_latent=8, n_heads=2, encoder=encoder)
    b = JEPAModule(20, BLOCKS, n_latent=8, n_heads=2, encoder=encoder)
    for m in (a, b):
        torch.manual_seed(3)
        m.reset_parameters()
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
