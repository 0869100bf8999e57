"""``vcell.module`` is pure torch/numpy: no AnnData, scanpy, MuData or scvi-tools (DESIGN.md, module/model split).

Files under ``src/vcell/module/`` take dicts of tensors keyed by ``REGISTRY_KEYS``; all AnnData logic lives in
``vcell.model``. The check parses every file (so imports inside functions and ``TYPE_CHECKING`` blocks count too) and
also imports ``vcell.module`` in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import vcell

MODULE_DIR = Path(vcell.__file__).parent / "module"

# third-party packages that module/ must never import (AnnData-level or model-level libraries)
FORBIDDEN = ("anndata", "scanpy", "mudata", "scvi", "pandas", "pertpy", "decoupler")
# vcell-internal imports allowed in module/: constants and module/ itself (vcell.data, vcell.model, vcell.pp ... load
# AnnData-aware code)
ALLOWED_VCELL = ("vcell._constants", "vcell.module")


def _imported_names(source: str, *, package: str = "vcell.module") -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in ``source``, including ``importlib.import_module("x")``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            # `from pkg import name` may import the submodule pkg.name (`from .. import data`): record each
            out.extend((node.lineno, f"{name}.{alias.name}" if name else alias.name) for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in {"import_module", "__import__"})
            )
        ):
            out.append((node.lineno, node.args[0].value))
    return out


def _package_of(path: Path) -> str:
    """Dotted package containing ``path`` (``vcell.module`` or one of its subpackages)."""
    rel = path.parent.relative_to(MODULE_DIR.parent.parent)
    return ".".join(rel.parts)


def _violations(source: str, *, package: str = "vcell.module") -> list[str]:
    bad = []
    for line, name in _imported_names(source, package=package):
        top = name.split(".")[0]
        if top in FORBIDDEN:
            bad.append(f"line {line}: imports {name!r}")
        elif top == "vcell" and not any(name == a or name.startswith(a + ".") for a in ALLOWED_VCELL):
            bad.append(f"line {line}: imports {name!r} (only {', '.join(ALLOWED_VCELL)} are allowed)")
    return bad


MODULE_FILES = sorted(MODULE_DIR.rglob("*.py"))


def test_module_files_found():
    assert MODULE_DIR.is_dir()
    assert {"__init__.py", "_base.py"} <= {p.name for p in MODULE_FILES}


@pytest.mark.parametrize("path", MODULE_FILES, ids=[p.name for p in MODULE_FILES])
def test_module_file_is_pure(path: Path):
    bad = _violations(path.read_text(), package=_package_of(path))
    assert not bad, f"{path.relative_to(MODULE_DIR.parent)} must import only torch/numpy: " + "; ".join(bad)


def test_checker_catches_violations():
    src = """
from __future__ import annotations
import numpy as np
import torch
from torch import nn
from vcell._constants import REGISTRY_KEYS
from ._base import VCellModule
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from anndata import AnnData
def f():
    import scanpy as sc
    from scvi.module.base import BaseModuleClass
    import importlib
    importlib.import_module("mudata")
from .. import data
import anndata.io
"""
    bad = _violations(src)
    assert len(bad) == 6, bad
    for name in ("'anndata.AnnData'", "'scanpy'", "'scvi.module.base", "'mudata'", "'vcell.data'", "'anndata.io'"):
        assert any(name in b for b in bad), (name, bad)
    assert _violations("import torch\nimport numpy as np\nfrom .._constants import REGISTRY_KEYS\n") == []
    assert _violations("from vcell import _constants\nfrom . import _base\n") == []
    # relative imports resolve against the file's own package
    assert _package_of(MODULE_DIR / "_base.py") == "vcell.module"
    assert _package_of(MODULE_DIR / "encoders" / "_x.py") == "vcell.module.encoders"
    assert _violations("from .. import _base\n", package="vcell.module.encoders") == []
    assert _violations("from ... import model\n", package="vcell.module.encoders") != []


def test_import_vcell_module_loads_no_anndata():
    code = "import json, sys; import vcell.module; print(json.dumps(sorted(m for m in sys.modules if '.' not in m)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    modules = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    loaded = sorted(modules & set(FORBIDDEN))
    assert not loaded, f"`import vcell.module` loads {loaded}"
