"""``import vcell`` is light: under 3 s and no JAX, torch, scvi-tools, scanpy or Lightning (issue requirement).

The light subpackages (``pp``, ``metrics``, ``bench``, ``datasets``, ``pl``, ``tl``) import no torch, scvi-tools, JAX or
Lightning either; those load only when a model is built or trained (``vcell.model``, ``vcell.module``, ``vcell.data``
registration). Each import runs in a fresh interpreter, so modules already imported by this test session do not count.
Run with ``pytest -s tests/test_import.py`` to see the measured times.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MAX_IMPORT_SECONDS = 3.0

# never imported by `import vcell`
HEAVY_TOP = ("jax", "torch", "scvi", "scanpy", "lightning", "pytorch_lightning", "pertpy", "decoupler")
# never imported by the light subpackages
HEAVY_SUB = ("jax", "torch", "scvi", "lightning", "pytorch_lightning", "pertpy", "decoupler")
LIGHT_SUBPACKAGES = (
    "vcell.pp",
    "vcell.metrics",
    "vcell.bench",
    "vcell.datasets",
    "vcell.pl",
    "vcell.tl",
    "vcell.priors",
)

_PROBE = """
import json, sys, time
t0 = time.perf_counter()
{statement}
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "modules": sorted(m for m in sys.modules if "." not in m)}}))
"""


def _probe(statement: str) -> tuple[float, set[str]]:
    """Run ``statement`` in a fresh interpreter; its duration and the top-level modules loaded afterwards."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(statement=statement)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"`{statement}` failed in a fresh interpreter:\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["seconds"], set(result["modules"])


def test_probe_detects_heavy_imports():
    # the check below must be able to fail: importing numpy shows up in the probe's module list
    _, modules = _probe("import numpy")
    assert "numpy" in modules
    _, modules = _probe("pass")
    assert "numpy" not in modules


def test_import_vcell_is_fast_and_light():
    seconds, modules = _probe("import vcell; vcell.settings; vcell.__version__; dir(vcell)")
    print(f"\nimport vcell: {seconds:.3f} s")
    heavy = sorted(set(HEAVY_TOP) & modules)
    assert not heavy, f"`import vcell` imports {heavy}; keep heavy imports inside the submodules that need them"
    assert seconds < MAX_IMPORT_SECONDS, f"`import vcell` took {seconds:.2f} s; expected under {MAX_IMPORT_SECONDS} s"


@pytest.mark.parametrize("module", LIGHT_SUBPACKAGES)
def test_light_subpackages(module: str):
    seconds, modules = _probe(f"import {module}")
    print(f"\nimport {module}: {seconds:.3f} s")
    heavy = sorted(set(HEAVY_SUB) & modules)
    assert not heavy, f"`import {module}` imports {heavy}; import them lazily inside the functions that need them"


def test_lazy_attribute_access():
    # `vcell.pp` reached as an attribute (module __getattr__) works and still imports nothing heavy
    seconds, modules = _probe("import vcell; vcell.pp.harmonize; vcell.metrics.pearson_delta; vcell.bench.split")
    print(f"\nimport vcell + vcell.pp/metrics/bench attributes: {seconds:.3f} s")
    heavy = sorted(set(HEAVY_SUB) & modules)
    assert not heavy, f"attribute access to vcell.pp/metrics/bench imports {heavy}"
