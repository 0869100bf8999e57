"""Docs content: the tutorials (jupytext MyST notebooks in ``tutorials/``) execute; the API reference is complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.md"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_executes(path: Path, tmp_path: Path) -> None:
    jupytext = pytest.importorskip("jupytext", reason="executing tutorials needs jupytext (pip install jupytext)")
    nbclient = pytest.importorskip("nbclient", reason="executing tutorials needs nbclient (pip install nbclient)")
    pytest.importorskip("ipykernel", reason="executing tutorials needs ipykernel (pip install ipykernel)")

    nb = jupytext.read(path)
    assert any(cell.cell_type == "code" for cell in nb.cells), f"{path.name} has no code cells"
    # runs in a scratch folder so that files a tutorial writes do not land in the repository
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: cells raised {[e.get('ename') for e in errors]}"


def test_tutorials_are_myst_notebooks() -> None:
    """Every tutorial is a jupytext MyST notebook with a Python kernel (what myst-nb and the test above read)."""
    assert NOTEBOOKS, f"no tutorials found in {TUTORIALS}"
    for path in NOTEBOOKS:
        head = path.read_text(encoding="utf-8").split("---", 2)
        assert head[0] == "", f"{path.name} must start with a YAML front matter block"
        assert "format_name: myst" in head[1], f"{path.name}: front matter must declare jupytext format_name: myst"
        assert "kernelspec:" in head[1], f"{path.name}: front matter must declare a kernelspec"
        assert "```{code-cell} ipython3" in head[2], f"{path.name} has no {{code-cell}} cells"


API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"
SUBPACKAGES = ("pp", "tl", "pl", "metrics", "bench", "datasets", "model", "data")


def _api_entries() -> list[str]:
    """Names listed in the autosummary tables of docs/api.md (``pp.harmonize``, ...)."""
    return re.findall(r"^ {3}(\w+\.\w+)\s*$", API_MD.read_text(encoding="utf-8"), flags=re.MULTILINE)


def test_api_reference_names_exist() -> None:
    """Every entry of docs/api.md is a real public name (a typo would only warn in the docs build)."""
    import vcell

    entries = _api_entries()
    assert len(entries) > 20, "docs/api.md autosummary entries not found; the pattern of this test may be stale"
    missing = []
    for entry in entries:
        sub, name = entry.split(".")
        module = getattr(vcell, sub)
        if name not in getattr(module, "__all__", []) or not hasattr(module, name):
            missing.append(entry)
    assert not missing, f"docs/api.md lists names that vcell does not export: {missing}"


def test_api_reference_is_complete() -> None:
    """Every public function and class of the user-facing subpackages appears in docs/api.md."""
    import vcell

    listed = set(_api_entries())
    absent = [
        f"{sub}.{name}"
        for sub in SUBPACKAGES
        for name in getattr(vcell, sub).__all__
        if callable(getattr(getattr(vcell, sub), name)) and f"{sub}.{name}" not in listed
    ]
    assert not absent, f"public functions/classes missing from docs/api.md (add them to an autosummary table): {absent}"
