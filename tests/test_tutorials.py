"""Docs content: the tutorials (jupytext MyST notebooks in ``tutorials/``) execute; the API reference is complete."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.md"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # real files beyond the bundled data come from $VCELL_DATA, as in the docs build (docs/conf.py, docs/tutorials.md)
    shared = TUTORIALS.parents[1] / "shared" / "data"
    if "VCELL_DATA" not in os.environ and shared.is_dir():
        monkeypatch.setenv("VCELL_DATA", str(shared))
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


# ---------------------------------------------------------------------------------------------------------------------
# the API reference links each public name to the tutorials that use it (docs/_tutorial_links.py, docs/conf.py)
# ---------------------------------------------------------------------------------------------------------------------
#: public names of docs/api.md that no tutorial uses, each with why (a name that a tutorial starts using may stay
#: here; the test below only fails for a name neither used nor listed)
NOT_IN_TUTORIALS: dict[str, str] = {
    **dict.fromkeys(
        ["pp.ExpressionSpace", "pp.expression_space", "pp.set_expression_space"], "docs page 'Expression spaces'"
    ),
    **dict.fromkeys(
        ["pp.canonical_label", "pp.is_combo", "pp.n_perturbations"], "label helpers (pp.harmonize uses them)"
    ),
    **dict.fromkeys(
        ["model.CellJEPA", "model.FlowMatching", "model.ResidualDiffusion"],
        "docs pages of the models; too slow to train within a tutorial's 5 minutes on 2 CPU cores",
    ),
    **dict.fromkeys(["model.PerturbationModel", "model.Capabilities"], "for model authors: docs 'Adding a model'"),
    **dict.fromkeys(
        ["metrics.perturbed_centroid_reference", "metrics.de_genes_fdr", "metrics.fit_pca", "metrics.pca_project"],
        "building blocks of metrics.evaluate",
    ),
    **dict.fromkeys(
        ["metrics.mae", "metrics.l2_top_expressed", "metrics.diversity", "metrics.direction_accuracy"],
        "docs page 'Metrics'; bench.run computes them",
    ),
    **dict.fromkeys(
        [
            "priors.read_gmt",
            "priors.go_graph",
            "bench.summarize",
            "bench.BenchmarkResult",
            "bench.BASELINES",
            "datasets.rename_modalities",
        ],
        "helpers around what the tutorials show (bench.run returns a BenchmarkResult; read_gmt/go_graph read priors)",
    ),
    **dict.fromkeys(
        ["bench.Stacked", "bench.Ensemble", "bench.convex_weights", "bench.pearson_delta_weights"],
        "docs page 'Stacked models and ensembles' (each fit trains its members twice: beyond a tutorial's 5 minutes)",
    ),
    **dict.fromkeys(["datasets.available", "datasets.load"], "the CLI's --data resolver; docs 'Quickstart'"),
    **dict.fromkeys(
        [
            "data.setup_perturbation_anndata",
            "data.vcell_state",
            "data.registered_conditions",
            "data.control_mask",
            "data.context_labels",
            "data.PerturbationVocab",
            "data.Lookup",
            "data.Pairs",
            "data.RowReader",
            "data.take_rows",
            "data.pair_controls",
            "data.iter_row_blocks",
            "data.check_finite_nonnegative",
            "data.is_count_matrix",
            "data.check_expression",
            "data.log1p_cp10k_block",
            "data.group_sums",
            "data.gene_mean_var",
        ],
        "data layer for model developers: docs 'Large screens' and 'Adding a model'",
    ),
}


def _tutorial_links():
    import importlib.util

    path = API_MD.parent / "_tutorial_links.py"
    spec = importlib.util.spec_from_file_location("_tutorial_links", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_api_entry_is_used_by_a_tutorial_or_listed():
    """ "The API reference links each public function to the tutorial that uses it": no entry falls through."""
    import vcell

    links = _tutorial_links()
    used = links.uses(TUTORIALS, by_name={"metrics": list(vcell.metrics.METRICS)})
    entries = _api_entries()
    uncovered = [e for e in entries if e not in used and e not in NOT_IN_TUTORIALS]
    assert not uncovered, (
        f"docs/api.md entries that no tutorial uses: {uncovered}; use them in a tutorial (as vcell.<sub>.<name>) "
        "or add them to NOT_IN_TUTORIALS with the reason"
    )
    unknown = sorted(set(NOT_IN_TUTORIALS) - set(entries))
    assert not unknown, f"NOT_IN_TUTORIALS lists names that docs/api.md does not: {unknown}"


def test_tutorial_links_rubric(tmp_path: Path):
    links = _tutorial_links()
    (tmp_path / "a.md").write_text(
        "```{code-cell} ipython3\nvcell.pp.harmonize(adata)\n```\nand {func}`vcell.pl.benchmark`\n"
    )
    (tmp_path / "b.md").write_text("vcell.model.Baseline.setup_anndata(x); metrics=['mmd']\n")
    used = links.uses(tmp_path, by_name={"metrics": ["mmd", "mae"]})
    assert used == {"pl.benchmark": ["a"], "pp.harmonize": ["a"], "model.Baseline": ["b"], "metrics.mmd": ["b"]}
    text = links.rubric("vcell.pp.harmonize", used)
    assert ".. rubric:: Used in tutorials" in text
    assert ":doc:`/tutorials/a`" in text
    assert links.rubric("vcell.pp.log_normalize", used) == ""


def test_tutorials_reading_real_files_are_found(tmp_path: Path):
    """The docs build leaves exactly the tutorials that read ``$VCELL_DATA`` unexecuted where it names no folder."""
    links = _tutorial_links()
    (tmp_path / "reads.md").write_text('DATA = Path(os.environ.get("VCELL_DATA", "../../shared/data"))\n')
    (tmp_path / "bundled.md").write_text("adata = vcell.datasets.kang2018()\n")
    assert links.reading_data(tmp_path) == ["reads"]
    # the real tutorials: those that read the prior-knowledge tables or Papalexi, and not those on bundled data
    readers = links.reading_data(TUTORIALS)
    assert {"papalexi_unseen_knockouts", "drugs_doses", "interpretability"} <= set(readers)
    assert "kang2018_celltype_transfer" not in readers
