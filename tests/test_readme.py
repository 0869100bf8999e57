"""README's notebook example runs, is out of distribution, and the number it quotes is the one it gives."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _notebook_example() -> str:
    text = README.read_text()
    section = text[text.index("## In a notebook") :]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    return code.split("# honest out-of-distribution benchmark")[0]  # bench.run (~25 s) is tested in tests/bench


def test_readme_notebook_example_is_out_of_distribution_and_quotes_its_r():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import vcell
    from vcell._utils import expression_for_eval

    code = _notebook_example()
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    plt.close("all")
    adata, train = scope["adata"], scope["train"]
    stimulated_cd4t = (adata.obs["cell_type"] == "CD4T") & (adata.obs["perturbation"] == "IFNb")
    assert stimulated_cd4t.any()
    assert not ((train.obs["cell_type"] == "CD4T") & (train.obs["perturbation"] == "IFNb")).any()
    cd4t_ctrl = ((adata.obs["cell_type"] == "CD4T") & (adata.obs["perturbation"] == "control")).to_numpy()
    np.testing.assert_array_equal(adata.obs["vcell_pred_source"].to_numpy(), cd4t_ctrl)
    space = vcell.pp.expression_space(adata, "vcell_pred")  # the model's default: log1p of the median library size
    assert space.basis == "median"
    E = expression_for_eval(adata, target_sum=space.target_sum)  # the truth in the predictions' space
    r = vcell.metrics.pearson_delta(adata.layers["vcell_pred"][cd4t_ctrl], E[stimulated_cd4t.to_numpy()], E[cd4t_ctrl])
    quoted = float(re.search(r"Pearson r of predicted vs true change ([0-9.]+)", code).group(1))
    assert r == pytest.approx(quoted, abs=0.005)
