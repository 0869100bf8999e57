"""``benchmarks/scale.py --quick`` writes its table and checks (slow: about 3 min on 2 busy CPU cores)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"


@pytest.mark.slow
def test_scale_quick(tmp_path: Path) -> None:
    out = tmp_path / "scale"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--cache", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(out / "scale.csv")
    assert {"cells", "task", "model", "mode", "status", "peak_rss_gb", "time_s", "epoch_s"} <= set(df.columns)
    assert set(df["task"]) == {"train", "baseline", "bench.run", "predict"}
    assert set(df.loc[df["task"] != "predict", "cells"]) == {2000, 5000}
    assert df["status"].notna().all()
    assert (df["peak_rss_gb"] > 0).all()
    train = df[df["task"] == "train"]
    assert set(zip(train["cells"], train["mode"], strict=True)) == {
        (n, m) for n in (2000, 5000) for m in ("memory", "streamed")
    }
    assert (train["status"] == "ok").all(), train[["cells", "mode", "status"]].to_string()
    assert (train["steps"] > 0).all()
    assert (train["steps"] <= 20).all()  # --quick caps training at 20 steps
    assert (train["cells_per_s"] > 0).all()
    assert (train["epoch_s"] >= train["time_s"] * 0.99).all()  # an epoch estimate is never below the capped run
    report = (out / "scale.md").read_text(encoding="utf-8")
    assert "## Targets" in report
    assert "| cells" in report
    assert ("PASS" in report) or ("FAIL" in report)
    assert len(list((tmp_path / "cache").glob("*.h5ad"))) == 2  # one cached file per size
