from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vcell._constants import REGISTRY_KEYS
from vcell.module import CausalVAEModule
from vcell.module._lora import (
    LoRALinear,
    TrainableRows,
    inject_lora,
    lora_parameters,
    merge_lora,
    merge_rows,
    train_rows,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "encoder": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
            "decoder": nn.Sequential(nn.Linear(3, 4)),
            "head": nn.Linear(3, 2),
        }
    )


def test_lora_linear_starts_identical_and_only_adapters_train():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    lora = LoRALinear(lin, rank=2)
    x = torch.randn(7, 5)
    assert torch.equal(lora(x), lin(x))
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert lora.lora_A.shape == (2, 5)
    assert lora.lora_B.shape == (3, 2)
    assert torch.count_nonzero(lora.lora_B) == 0


def test_lora_linear_hand_computed_output():
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
        lin.bias.zero_()
    lora = LoRALinear(lin, rank=1, alpha=2.0)  # scaling 2
    with torch.no_grad():
        lora.lora_A.copy_(torch.tensor([[1.0, 0.0]]))
        lora.lora_B.copy_(torch.tensor([[0.0], [3.0]]))
    # W + 2 * B A = [[1, 0], [6, 1]]; x = (1, 2) -> (1, 6 + 2) = (1, 8)
    out = lora(torch.tensor([[1.0, 2.0]]))
    assert out.tolist() == [[1.0, 8.0]]
    merged = lora.merged()
    assert type(merged) is nn.Linear
    assert merged.weight.tolist() == [[1.0, 0.0], [6.0, 1.0]]
    assert merged(torch.tensor([[1.0, 2.0]])).tolist() == [[1.0, 8.0]]
    assert merged.weight.requires_grad


def test_lora_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(2, 2), rank=0)
    with pytest.raises(TypeError, match="Linear"):
        LoRALinear(nn.ReLU())


def test_inject_names_forward_and_merge_round_trip():
    net = _net()
    keys = set(net.state_dict())
    x = torch.randn(6, 4)
    before = net["decoder"](net["encoder"](x))
    names = inject_lora(net, rank=2, target=["encoder", "decoder"], seed=0)
    assert names == ["encoder.0", "encoder.2", "decoder.0"]
    assert type(net["head"]) is nn.Linear  # not targeted
    assert torch.equal(net["decoder"](net["encoder"](x)), before)
    params = lora_parameters(net)
    assert len(params) == 6
    assert sum(p.numel() for p in params) == 2 * (4 + 8) + 2 * (8 + 3) + 2 * (3 + 4)
    # a second injection wraps nothing new (no adapter inside an adapter)
    with pytest.raises(ValueError, match="no torch.nn.Linear"):
        inject_lora(net, rank=2, target=["decoder.0.base"])
    # train the adapters a little, then merge: same outputs, plain Linear layers, the original state-dict keys
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        loss = net["decoder"](net["encoder"](x)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapted = net["decoder"](net["encoder"](x)).detach()
    assert not torch.allclose(adapted, before)
    assert merge_lora(net) == names
    assert set(net.state_dict()) == keys
    assert all(type(m) is not LoRALinear for m in net.modules())
    torch.testing.assert_close(net["decoder"](net["encoder"](x)), adapted)


def test_inject_seed_reproducible_and_unknown_target():
    a, b = _net(), _net()
    inject_lora(a, rank=3, seed=5)
    inject_lora(b, rank=3, seed=5)
    assert torch.equal(a["encoder"][0].lora_A, b["encoder"][0].lora_A)
    with pytest.raises(ValueError, match=r"\['missing'\]"):
        inject_lora(_net(), target=["missing"])


def test_merged_delta_has_the_adapter_rank():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    lora = LoRALinear(lin, rank=2)
    with torch.no_grad():
        lora.lora_B.normal_()
    delta = lora.merged().weight - lin.weight
    assert torch.linalg.matrix_rank(delta.detach()) == 2
    assert torch.equal(lora.merged().bias, lin.bias)


def test_train_rows_keeps_other_rows_bitwise_under_adamw():
    torch.manual_seed(0)
    emb = nn.Embedding(4, 3)
    w0 = emb.weight.detach().clone()
    values = train_rows(emb, "weight", [1, 3])
    assert isinstance(emb.parametrizations.weight[0], TrainableRows)
    assert torch.equal(emb.weight, w0)  # starts identical
    trainable = [p for p in emb.parameters() if p.requires_grad]
    assert len(trainable) == 1
    assert trainable[0] is values
    opt = torch.optim.AdamW(list(emb.parameters()), lr=0.1, weight_decay=0.5)  # frozen ones included: skipped
    for _ in range(3):
        loss = emb(torch.arange(4)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert merge_rows(emb) == ["weight"]
    assert set(emb.state_dict()) == {"weight"}
    assert torch.equal(emb.weight[[0, 2]], w0[[0, 2]])
    assert not torch.equal(emb.weight[[1, 3]], w0[[1, 3]])
    with pytest.raises(ValueError, match="out of range"):
        train_rows(nn.Embedding(2, 2), "weight", [2])


def test_causal_vae_module_with_adapters_starts_identical():
    torch.manual_seed(0)
    m = CausalVAEModule(12, 2, covariate_sizes=(3,), n_latent=4, n_hidden=8).eval()
    batch = {
        REGISTRY_KEYS.X_KEY: torch.as_tensor(np.random.default_rng(0).poisson(2.0, (5, 12)), dtype=torch.float32),
        REGISTRY_KEYS.PERT_ENCODING_KEY: torch.tensor([[1.0, 0.0]] * 5),
        REGISTRY_KEYS.COVARIATES_KEY: torch.zeros(5, 1, dtype=torch.long),
    }
    before = m(batch)["log_scale"]
    names = inject_lora(m, rank=2, seed=0)
    assert names == ["encoder.0", "encoder.4", "decoder.0", "decoder.4"]
    assert torch.equal(m(batch)["log_scale"], before)
