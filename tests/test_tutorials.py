"""Execute the tutorials (jupytext MyST notebooks under ``tutorials/``) end to end, so they never go stale."""

from __future__ import annotations

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
