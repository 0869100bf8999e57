"""Run the docstring examples of the fast modules (DESIGN.md: "a doctested Example per public function").

``--doctest-modules`` over the whole package would import the model stack (torch, scvi-tools, JAX) and train models,
so only modules whose examples run in well under a second are collected here: every module of ``vcell.pp``,
``vcell.metrics``, ``vcell.datasets`` and ``vcell.pl`` (new files there are picked up automatically), plus
``vcell.bench._split``, ``vcell.bench._leakage``, ``vcell.data._vocab``, ``vcell.data._datamodule`` and
``vcell.data._chunked``.

Not run here (their examples train models or import scvi-tools; run them with
``python -m doctest -o ELLIPSIS -o NORMALIZE_WHITESPACE <file>`` or ``pytest --doctest-modules <file>``):
``vcell.bench._run`` (bench.run trains the baselines, ~5 s), ``vcell.tl._predict`` (fits a Baseline, ~6 s),
``vcell.model`` (scvi-tools models), ``vcell.module`` (torch), ``vcell.data._registry`` (scvi-tools' AnnDataManager),
``vcell.cli``.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

WHOLE_PACKAGES = ("vcell.pp", "vcell.metrics", "vcell.datasets", "vcell.pl")
EXTRA_MODULES = (
    "vcell.bench._split",
    "vcell.bench._leakage",
    "vcell.data._vocab",
    "vcell.data._datamodule",
    "vcell.data._chunked",
)
# modules without examples (private helpers); every other collected module must have at least one
NO_EXAMPLES = {"vcell.metrics._common", "vcell.pl._utils"}

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules() -> list[str]:
    names = []
    for pkg_name in WHOLE_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        names.append(pkg_name)
        names.extend(f"{pkg_name}.{info.name}" for info in pkgutil.iter_modules(pkg.__path__))
    return [*names, *EXTRA_MODULES]


MODULES = _modules()


def _run_doctests(module_name: str) -> tuple[int, list[str]]:
    """Number of examples run and the failure reports of one module's doctests."""
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    report: list[str] = []
    attempted = 0
    for test in finder.find(module, module_name):
        result = runner.run(test, out=report.append, clear_globs=True)
        attempted += result.attempted
    return attempted, report


@pytest.fixture(autouse=True)
def _agg_backend():
    import matplotlib

    matplotlib.use("Agg")
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.mark.parametrize("module_name", MODULES)
def test_doctests(module_name: str):
    attempted, report = _run_doctests(module_name)
    assert not report, f"doctest failures in {module_name}:\n" + "".join(report)
    is_package = module_name in WHOLE_PACKAGES
    if not is_package and module_name not in NO_EXAMPLES:
        assert attempted > 0, f"{module_name} has no doctested examples"


def test_runner_reports_failures(tmp_path, monkeypatch):
    # the check must be able to fail: a module with a wrong example yields a report
    (tmp_path / "vcell_doctest_probe.py").write_text(
        'def f():\n    """Add.\n\n    Examples\n    --------\n    >>> 1 + 1\n    3\n    """\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    attempted, report = _run_doctests("vcell_doctest_probe")
    assert attempted == 1
    assert report
    assert "Expected:\n    3\nGot:\n    2" in "".join(report)
