"""Fixtures of the training tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def run_script(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run a Python script text in a fresh process in ``tmp_path``, importing the vcell under test.

    One torch/OpenMP thread, warnings off; ``PYTHONPATH`` starts with the folder of the imported vcell (whatever the
    working directory), so the child runs the same code as the test.
    """
    import vcell

    src = str(Path(vcell.__file__).resolve().parents[1])
    path = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        file = tmp_path / "train_script.py"
        file.write_text(script)
        cmd = [sys.executable, str(file), *args]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)

    return run
