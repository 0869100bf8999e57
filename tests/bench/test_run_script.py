"""``benchmarks/run_baselines.py --quick`` writes every output it promises (slow: about 30 s on 2 CPU cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "run_baselines.py"


@pytest.mark.slow
def test_run_baselines_quick(tmp_path: Path) -> None:
    out = tmp_path / "baselines"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tasks = ["kang2018", "simulated_combos"]
    if "[skip] papalexi2021" not in proc.stdout:
        tasks.append("papalexi2021")
    for task in tasks:
        for name in ("results.csv", "summary.csv", "timings.csv"):
            assert (out / task / name).stat().st_size > 0, f"{task}/{name} missing or empty"
        assert list((out / task).glob("*.png")), f"no figure for {task}"
        res = pd.read_csv(out / task / "results.csv")
        assert {"model", "split", "seed", "perturbation", "metric", "value", "ceiling", "error"} <= set(res.columns)
        assert {"control", "mean", "additive", "linear"} <= set(res["model"])
        assert set(res["seed"]) == {1}  # --quick keeps the first seed
    assert len(list((out / "simulated_combos").glob("simulated_combos_combo_*.png"))) == 4
    sim = pd.read_csv(out / "simulated_combos" / "results.csv")
    assert "interaction_auprc" in set(sim["metric"])
    kang = pd.read_csv(out / "kang2018" / "summary.csv")
    assert set(kang["split"]) == {"unseen_cell_type:B", "unseen_cell_type:NK"}
    report = (out / "benchmarks.md").read_text(encoding="utf-8")  # --quick writes the report next to the CSVs
    for heading in ("## Protocol", "## 1. Kang 2018", "## 3. Simulated double perturbations", "## Notes"):
        assert heading in report
    assert "kang2018/kang2018.png" in report
    info = json.loads((out / "run_info.json").read_text(encoding="utf-8"))
    assert info["quick"] is True
    assert info["seeds"] == [1]
    assert info["total_s"] > 0
