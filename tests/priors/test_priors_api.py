"""vcell.priors as a package: light import, doctested examples, numpy docstrings naming every parameter."""

from __future__ import annotations

import doctest
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys

import pytest

import vcell.priors

MODULES = [f"vcell.priors.{m.name}" for m in pkgutil.iter_modules(vcell.priors.__path__)]
NO_EXAMPLES = {"vcell.priors._io"}


def test_import_priors_is_light():
    code = "import json, sys; import vcell.priors; print(json.dumps(sorted(m for m in sys.modules if '.' not in m)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    modules = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    heavy = sorted(modules & {"decoupler", "rdkit", "torch", "scvi", "scanpy", "anndata", "jax", "lightning"})
    assert not heavy, f"`import vcell.priors` loads {heavy}"


def test_lazy_attribute():
    import vcell

    assert vcell.priors.go_graph is vcell.priors._graph.go_graph


@pytest.mark.parametrize("module_name", MODULES)
def test_doctests(module_name: str):
    if module_name == "vcell.priors._drugs":
        pytest.importorskip("rdkit")
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, module_name):
        runner.run(test, out=report.append, clear_globs=True)
    assert not report, "".join(report)
    if module_name not in NO_EXAMPLES:
        assert runner.tries > 0, f"{module_name} has no doctested examples"


@pytest.mark.parametrize("name", vcell.priors.__all__)
def test_docstrings_name_every_parameter(name: str):
    f = getattr(vcell.priors, name)
    doc = inspect.cleandoc(f.__doc__)
    after = doc.split("Parameters\n----------\n")[1]
    params_section = re.split(r"\n\n(?=\S[^\n]*\n-{3,})", after)[0]  # up to the next section title
    documented = {line.split(":")[0].strip() for line in params_section.splitlines() if line and not line[0].isspace()}
    missing = [p for p in inspect.signature(f).parameters if p not in documented]
    assert not missing, f"{name}: parameters {missing} undocumented"
    assert "Returns" not in documented
    assert "Examples\n--------\n>>>" in doc
    positional = [
        p
        for p in inspect.signature(f).parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    assert len(positional) <= 2
