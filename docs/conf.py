"""Sphinx configuration of the vcell documentation."""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from datetime import date
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))  # _tutorial_links.py

# sphinx-autodoc-typehints 3.x calls an API deprecated in Sphinx 9 (a Python warning per page, not a docs problem)
warnings.filterwarnings("ignore", message=r".*_RstSnippetParser\.set_application.*is deprecated")


def _mirror_tutorials(src: Path, dst: Path) -> None:
    """Copy the tutorials (jupytext MyST notebooks in ``tutorials/``) into ``docs/tutorials/`` (git-ignored).

    Sphinx reads documents only below ``docs/``; the notebooks live at the repository root, where
    ``tests/test_tutorials.py`` executes them. Copying (rather than a symlink) works on every OS and on Read the
    Docs; the folder ignores itself (its own ``.gitignore``). Unchanged files are not rewritten, so incremental
    builds stay incremental.
    """
    dst.mkdir(exist_ok=True)
    (dst / ".gitignore").write_text("# copies of ../../tutorials made by docs/conf.py\n*\n")
    wanted = {p.name: p for p in sorted(src.glob("*.md")) + sorted(src.glob("*.ipynb"))}
    for name, path in wanted.items():
        target = dst / name
        if not target.exists() or target.read_bytes() != path.read_bytes():
            shutil.copy2(path, target)
    for stale in dst.iterdir():
        if stale.suffix in (".md", ".ipynb") and stale.name not in wanted:
            stale.unlink()


_mirror_tutorials(HERE.parent / "tutorials", HERE / "tutorials")

project = "vcell"
author = "vcell developers"
copyright = f"{date.today().year}, {author}"
release = "0.1.0"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
]
templates_path = ["_templates"]
autosummary_generate = True
autodoc_member_order = "groupwise"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
# "Sets the following fields" holds a definition list (``adata.obs['key']`` then an indented description):
# a generic section keeps it as written, under its own heading
napoleon_custom_sections = ["Sets the following fields"]
# an "Attributes" section becomes fields of the class (:ivar:), not attribute descriptions: the class template
# (_templates/autosummary/class.rst) documents the attributes already, and two descriptions of one object warn
napoleon_use_ivar = True
# name annotations by their alias instead of expanding numpy's ArrayLike into a page-long Union
autodoc_type_aliases = {"ArrayLike": "numpy.typing.ArrayLike"}
typehints_defaults = "braces"
myst_enable_extensions = ["colon_fence", "dollarmath"]
# Execution of the tutorials (docs/tutorials.md, "Building these docs"): every build executes them (myst-nb, cached
# in docs/_build/.jupyter_cache, so an unchanged tutorial is not run again) and a cell that raises fails the build.
# VCELL_DOCS_EXECUTE=0 opts out (pages then show the code without outputs).
_execute_notebooks = os.environ.get("VCELL_DOCS_EXECUTE", "1").strip().lower() not in {"0", "false", "no", "off"}
nb_execution_mode = "cache" if _execute_notebooks else "off"
# seconds per cell; each tutorial takes under 5 minutes on 2 idle CPU cores, a machine shared with other jobs may
# need VCELL_DOCS_CELL_TIMEOUT=1800
nb_execution_timeout = int(os.environ.get("VCELL_DOCS_CELL_TIMEOUT", "600"))
nb_execution_raise_on_error = True
nb_execution_show_tb = True  # the traceback of a failing cell goes to the build log
nb_merge_streams = True
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "tutorials/.gitignore"]


def _tutorial_data_dir() -> None:
    """Point the tutorials' kernels at the real data (``VCELL_DATA``), unless the caller already set it.

    Tutorials that read real files beyond the data bundled with vcell (prior-knowledge tables, Papalexi 2021) read
    them from ``$VCELL_DATA``; the default is ``../shared/data`` next to the repository (where the project's data
    live). The kernels myst-nb starts inherit this process's environment. The package itself never reads it.
    """
    default = (HERE.parent.parent / "shared" / "data").resolve()
    if "VCELL_DATA" not in os.environ and default.is_dir():
        os.environ["VCELL_DATA"] = str(default)


_tutorial_data_dir()


def _without_data() -> list[str]:
    """Tutorials that read ``$VCELL_DATA`` when it names no folder: they are not executed (a warning says so at
    ``builder-inited``), so a build without the real files (Read the Docs) still executes all the others."""
    from _tutorial_links import reading_data

    folder = os.environ.get("VCELL_DATA", "")
    return [] if folder and Path(folder).is_dir() else reading_data(HERE.parent / "tutorials")


_TUTORIALS_WITHOUT_DATA = _without_data() if _execute_notebooks else []
nb_execution_excludepatterns = [f"tutorials/{name}.md" for name in _TUTORIALS_WITHOUT_DATA]


def _warn_without_data(app) -> None:
    if _TUTORIALS_WITHOUT_DATA:
        from sphinx.util import logging

        logging.getLogger("vcell.docs").warning(
            "not executed (shown without outputs): %s; they read real files from $VCELL_DATA, which names no "
            "folder (%r). Set VCELL_DATA to the folder holding prior_knowledge/ and the .h5ad files of "
            "shared/data (docs/tutorials.md, 'Data the tutorials read').",
            ", ".join(_TUTORIALS_WITHOUT_DATA),
            os.environ.get("VCELL_DATA", ""),
        )


def _intersphinx_reachable() -> bool:
    """Whether the intersphinx inventories can be fetched (a 3 s TCP probe of docs.python.org)."""
    import socket

    try:
        socket.create_connection(("docs.python.org", 443), timeout=3).close()
    except OSError:
        return False
    return True


# Links to the docs of Python, numpy, scanpy ... (intersphinx) need the network. VCELL_DOCS_INTERSPHINX=0 turns
# them off, =1 forces them on; by default they are on when docs.python.org is reachable. Offline, the build then
# has no warnings at all (-W passes): the references to those projects' objects render as plain text instead of
# links (nitpicky stays off, so an unresolved reference to an outside object is not a warning).
_intersphinx = os.environ.get("VCELL_DOCS_INTERSPHINX", "auto").strip().lower()
if _intersphinx == "auto":
    _intersphinx = "1" if _intersphinx_reachable() else "0"
intersphinx_mapping = (
    {
        "python": ("https://docs.python.org/3", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
    }
    if _intersphinx not in {"0", "false", "no", "off"}
    else {}
)
html_theme = "sphinx_book_theme"
html_title = "vcell"


# ---------------------------------------------------------------------------------------------------------------------
# docstring conventions of vcell
# ---------------------------------------------------------------------------------------------------------------------
#: public members that vcell models inherit from scvi-tools' BaseModelClass and that apply to them
_INHERITED_KEEP = {"save", "load", "view_anndata_setup", "is_trained", "adata", "history"}


def _defined_in(member: object) -> str:
    """Module that defines a class member (functions, class/static methods and properties)."""
    for attr in ("fget", "__func__"):
        member = getattr(member, attr, member)
    module = getattr(member, "__module__", None)
    return module if isinstance(module, str) else ""


def _skip_foreign_members(app, what, name, obj, skip, options):
    """Document only what vcell defines (plus a few scvi-tools model methods): no Lightning/scvi internals."""
    module = _defined_in(obj)
    if module and module.split(".")[0] != "vcell" and name not in _INHERITED_KEEP:
        return True
    return None


_SETS_FIELDS = "Sets the following fields"


def _strip_blank_ends(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def _returns_as_text(self, section: str) -> list[str]:
    """numpy "Returns" sections of vcell are prose (types are in signatures): render them as written.

    Napoleon would read the first line as a type and split it at the first colon. sphinx-autodoc-typehints puts a
    line ``:`` at the top of the section (its own marker of "no type here"), which is dropped. A "Sets the following
    fields" paragraph after the return value (written ``Sets the following fields:`` or with a qualifier that napoleon
    does not know as a section) becomes a heading of its own, like the plain ``Sets the following fields`` section.
    """
    lines = self._dedent(self._consume_to_next_section())
    if lines and lines[0].strip() == ":":
        del lines[0]
    cut = next((i for i, line in enumerate(lines) if line.lstrip().startswith(_SETS_FIELDS)), len(lines))
    returns, sets = _strip_blank_ends(lines[:cut]), lines[cut:]
    out = [*self._format_block(":returns: ", returns), ""] if returns else []
    if sets:
        body = sets[1:]
        if body and body[0].strip() and set(body[0].strip()) == {"-"}:  # an underline
            body = body[1:]
        out += [f".. rubric:: {sets[0].strip().rstrip(':')}", "", *_strip_blank_ends(body), ""]
    return out


def _reexported_data_comment(app, what, name, obj, options, lines):
    """Constants re-exported by a subpackage (``vcell.metrics.METRICS``) get the ``#:`` comment of their definition.

    autodoc looks for the comment in the module being documented (``vcell/metrics/__init__.py``) only, and would show
    the docstring of ``tuple`` instead.
    """
    if what != "data" or not name.startswith("vcell."):
        return
    from sphinx.pycode import ModuleAnalyzer, PycodeError

    modname, attr = name.rsplit(".", 1)
    candidates = [modname] + sorted(m for m in sys.modules if m.startswith(f"{modname}."))
    for mod_name in candidates:
        if getattr(sys.modules.get(mod_name), attr, None) is not obj:
            continue
        try:
            comment = ModuleAnalyzer.for_module(mod_name).find_attr_docs().get(("", attr))
        except PycodeError:
            continue
        if comment:
            lines[:] = [line.rstrip("\n") for line in comment]
            return


from _tutorial_links import rubric as _rubric  # noqa: E402
from _tutorial_links import uses as _uses  # noqa: E402

#: "pp.harmonize" -> tutorials that use it (docs/_tutorial_links.py)
import vcell  # noqa: E402

_TUTORIAL_USES = _uses(HERE.parent / "tutorials", by_name={"metrics": list(vcell.metrics.METRICS)})


def _link_tutorials(app, docname, source):
    """Append "Used in tutorials" (links to the tutorials that use it) to each API page of autosummary."""
    if docname.startswith("generated/vcell."):
        source[0] += _rubric(docname.removeprefix("generated/"), _TUTORIAL_USES)


def setup(app):
    """Local tweaks: member filter for autosummary/autodoc, prose "Returns" sections, comments of constants, links
    from the API reference to the tutorials."""
    from sphinx.ext.napoleon.docstring import NumpyDocstring

    NumpyDocstring._parse_returns_section = _returns_as_text
    app.connect("autodoc-skip-member", _skip_foreign_members)
    app.connect("autodoc-process-docstring", _reexported_data_comment)
    app.connect("source-read", _link_tutorials)
    app.connect("builder-inited", _warn_without_data)
