"""Resumable training: a run killed midway resumes from its checkpoint and reaches the uninterrupted run's weights.

Each run is a separate Python process; the interrupted one exits abruptly (``os._exit``) at the start of an epoch,
after the checkpoint of the epoch before was written, as a killed job would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

SCRIPT = r"""
import json, os, sys
import lightning
import numpy as np
import torch

torch.set_num_threads(1)
import vcell

out, name, ckpt, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


class Kill(lightning.pytorch.callbacks.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == kill_at:
            os._exit(3)


adata = vcell.datasets.simulate(n_cells=400, n_genes=30, n_perturbations=4, n_combos=2, seed=0)
Cls = getattr(vcell.model, name)
Cls.setup_anndata(adata, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"])
model = Cls(adata, **json.loads(sys.argv[5]))
model.train(
    max_epochs=5, batch_size=64, accelerator="cpu", seed=4, checkpoint_path=ckpt or None,
    trainer_kwargs={"enable_progress_bar": False, "callbacks": [Kill()]},
)
torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()}, out + ".pt")
hist = {k: v.iloc[:, 0].tolist() for k, v in model.history_.items()}
with open(out + ".json", "w") as f:
    json.dump(hist, f)
"""

MODELS = {
    "CausalVAE": {"n_latent": 4, "n_hidden": 16},
    "FlowMatching": {"n_components": 5, "n_hidden": 16, "n_layers": 2, "coupling_size": 64},
}


def _run(run_script: Callable, tmp_path: Path, name: str, tag: str, ckpt: str, kill_at: int) -> Any:
    return run_script(SCRIPT, str(tmp_path / tag), name, ckpt, str(kill_at), json.dumps(MODELS[name]))


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n != "CausalVAE" else n for n in MODELS]
)  # FlowMatching (pairs drawn per epoch) in the slow run: 3 trainings per model
def test_killed_run_resumes_to_the_same_weights(run_script: Callable, tmp_path: Path, name: str) -> None:
    full = _run(run_script, tmp_path, name, "full", "", -1)
    assert full.returncode == 0, full.stderr[-3000:]
    ckpt = tmp_path / "ckpt"
    killed = _run(run_script, tmp_path, name, "killed", str(ckpt), 3)
    assert killed.returncode == 3, killed.stderr[-3000:]  # stopped at the start of epoch 3
    assert (ckpt / "last.ckpt").exists()
    assert not (tmp_path / "killed.pt").exists()
    resumed = _run(run_script, tmp_path, name, "resumed", str(ckpt), -1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = torch.load(tmp_path / "full.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    h_full = json.loads((tmp_path / "full.json").read_text())
    h_res = json.loads((tmp_path / "resumed.json").read_text())
    assert h_res.keys() == h_full.keys()
    for key in h_full:
        np.testing.assert_allclose(h_res[key], h_full[key], rtol=1e-6, err_msg=key)


def test_checkpoint_path_must_be_a_folder(tmp_path: Path) -> None:
    import vcell

    adata = vcell.datasets.simulate(n_cells=200, n_genes=20, n_perturbations=3, n_combos=1, seed=0)
    vcell.model.CausalVAE.setup_anndata(adata, perturbation_key="perturbation", control="control")
    model = vcell.model.CausalVAE(adata, n_latent=4, n_hidden=16)
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        model.train(max_epochs=1, checkpoint_path=str(afile), trainer_kwargs={"enable_progress_bar": False})
