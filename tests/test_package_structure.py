"""Package-wide API rules (DESIGN.md "Conventions"), checked for every public function, as scanpy's test does.

Rules checked for the functions in ``__all__`` of :mod:`vcell.pp`, :mod:`vcell.tl`, :mod:`vcell.pl`,
:mod:`vcell.metrics`, :mod:`vcell.bench` and :mod:`vcell.datasets`:

* ``f(adata, <at most 2 positional>, *, ...)``: at most 2 positional parameters without a default (3 for metrics,
  see :data:`MAX_REQUIRED_POSITIONAL`) and at most 3 positional parameters in all;
* ``copy`` only, no ``inplace``; a function taking ``adata`` and ``copy`` defaults to ``copy=False`` and returns
  ``AnnData | None`` by annotation, and ``copy=True`` really returns a new object and leaves the input unchanged;
* numpy docstrings with a "Parameters" section naming every parameter and an "Examples" section (doctested by
  ``tests/test_doctests.py``); a function that writes into AnnData documents "Sets the following fields";
* plots take ``ax=None, show=None, save=None, return_fig=False``; ``seed``/``random_state`` default to ``None``
  (resolved to ``vcell.settings.seed``), checked also for classes and for :mod:`vcell.data`.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from inspect import Parameter

import numpy as np
import pandas as pd
import pytest

SUBMODULES = ("pp", "tl", "pl", "metrics", "bench", "datasets")

# DESIGN: "Metrics are pure functions (x, y, ...) -> float | ndarray"; several take the reference as a third array
# (pearson_delta(pred, true, ref), direction_accuracy, mse_top_de_normalized(pred, true, ctrl)), so metrics may
# have 3 positional parameters without a default; every other public function at most 2 (adata plus one).
MAX_REQUIRED_POSITIONAL = {"metrics": 3}
DEFAULT_MAX_REQUIRED_POSITIONAL = 2
# DESIGN: f(adata, <at most 2 positional>, *, ...) -> never more than 3 positional parameters in all.
MAX_POSITIONAL = 3

# Functions that write into an AnnData and must list what they set (on top of every function with key_added).
WRITERS = ("pp.harmonize", "pp.log_normalize", "pp.set_expression_space", "tl.predict_perturbation", "bench.split")

PLOT_PARAMS = {"ax": None, "show": None, "save": None, "return_fig": False}

# Known violations in files this test's author could not edit, as (test name, function) -> reason. They are strict
# xfails: once the function is fixed the test XPASSes and fails, so remove the entry then.
KNOWN_VIOLATIONS = {}

_POSITIONAL = (Parameter.POSITIONAL_ONLY, Parameter.POSITIONAL_OR_KEYWORD)


def _public_functions() -> list[tuple[str, Callable]]:
    out = []
    for sub in SUBMODULES:
        mod = importlib.import_module(f"vcell.{sub}")
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isfunction(obj):
                out.append((f"{sub}.{name}", obj))
    return out


API = _public_functions()
IDS = [qualname for qualname, _ in API]


def _cases(test: str) -> list:
    """``API`` as pytest params, with the known violations of ``test`` marked as strict xfails."""
    out = []
    for qualname, f in API:
        reason = KNOWN_VIOLATIONS.get((test, qualname))
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        out.append(pytest.param(qualname, f, id=qualname, marks=marks))
    return out


def _section(doc: str, title: str) -> str | None:
    """Body of a numpy docstring section (``title`` underlined with dashes), or None if it is absent."""
    lines = inspect.cleandoc(doc).splitlines()
    for i in range(len(lines) - 1):
        if lines[i].strip() == title and re.fullmatch(r"-{3,}", lines[i + 1].strip()):
            body = []
            for j in range(i + 2, len(lines)):
                if j + 1 < len(lines) and lines[j].strip() and re.fullmatch(r"-{3,}", lines[j + 1].strip()):
                    break  # the next section's title
                body.append(lines[j])
            return "\n".join(body)
    return None


def _documented_params(doc: str) -> set[str]:
    """Parameter names in a numpy "Parameters" section (``name``, ``name : type``, ``a, b``, ``*args``)."""
    body = _section(doc, "Parameters") or ""
    names: set[str] = set()
    for line in body.splitlines():
        if line and not line[0].isspace():
            head = line.split(":")[0]
            names.update(n.strip().lstrip("*") for n in head.split(",") if n.strip())
    return names


def test_api_is_found():
    # guards against the parametrised tests below silently running on nothing
    assert len(API) >= 30
    assert {"pp.harmonize", "tl.predict_perturbation", "pl.benchmark", "metrics.pearson_delta", "bench.split"} <= {
        q for q, _ in API
    }


@pytest.mark.parametrize(("qualname", "f"), API, ids=IDS)
def test_positional_parameters(qualname: str, f: Callable):
    sub = qualname.split(".")[0]
    params = list(inspect.signature(f).parameters.values())
    positional = [p for p in params if p.kind in _POSITIONAL]
    required = [p.name for p in positional if p.default is Parameter.empty]
    limit = MAX_REQUIRED_POSITIONAL.get(sub, DEFAULT_MAX_REQUIRED_POSITIONAL)
    assert len(required) <= limit, (
        f"{qualname} has {len(required)} positional parameters without a default {required}; at most {limit} "
        "allowed, make the others keyword-only (after `*`)"
    )
    assert len(positional) <= MAX_POSITIONAL, (
        f"{qualname} has {len(positional)} positional parameters {[p.name for p in positional]}; "
        f"at most {MAX_POSITIONAL} allowed"
    )


@pytest.mark.parametrize(("qualname", "f"), API, ids=IDS)
def test_copy_not_inplace(qualname: str, f: Callable):
    sig = inspect.signature(f)
    assert "inplace" not in sig.parameters, f"{qualname} has `inplace`; vcell uses `copy` only"
    if "copy" in sig.parameters:
        copy = sig.parameters["copy"]
        assert copy.kind is Parameter.KEYWORD_ONLY, f"{qualname}: `copy` must be keyword-only"
        assert copy.default is False, f"{qualname}: `copy` must default to False, got {copy.default!r}"
        if "adata" in sig.parameters:
            # annotations are strings under `from __future__ import annotations`
            ret = str(sig.return_annotation).replace(" ", "")
            assert ret in {"AnnData|None", "None|AnnData"}, (
                f"{qualname} takes adata and copy but is annotated to return {sig.return_annotation!r}; "
                "expected `AnnData | None`"
            )


@pytest.mark.parametrize(("qualname", "f"), _cases("test_docstring_sections"))
def test_docstring_sections(qualname: str, f: Callable):
    doc = f.__doc__
    assert doc, f"{qualname} has no docstring"
    params = [
        p.name for p in inspect.signature(f).parameters.values() if p.kind not in (Parameter.VAR_KEYWORD,)
    ]  # **kwargs may be described in prose; named parameters and *args must be listed
    if params:
        assert _section(doc, "Parameters") is not None, f"{qualname}: docstring has no numpy 'Parameters' section"
        missing = [p for p in params if p not in _documented_params(doc)]
        assert not missing, f"{qualname}: parameters {missing} are not described in its 'Parameters' section"
    examples = _section(doc, "Examples")
    assert examples is not None, f"{qualname}: docstring has no 'Examples' section (DESIGN: a doctested Example)"
    assert ">>>" in examples, f"{qualname}: the 'Examples' section has no doctest (>>>)"


def _writes_adata(qualname: str, f: Callable) -> bool:
    return qualname in WRITERS or "key_added" in inspect.signature(f).parameters


@pytest.mark.parametrize(("qualname", "f"), [pytest.param(q, f, id=q) for q, f in API if _writes_adata(q, f)])
def test_writers_list_fields(qualname: str, f: Callable):
    assert "Sets the following fields" in (f.__doc__ or ""), (
        f"{qualname} writes into AnnData but its docstring has no 'Sets the following fields' list"
    )


def test_writers_exist():
    names = {q for q, _ in API}
    assert set(WRITERS) <= names, f"writers missing from the API: {set(WRITERS) - names}"


@pytest.mark.parametrize(("qualname", "f"), [pytest.param(q, f, id=q) for q, f in API if q.startswith("pl.")])
def test_plot_parameters(qualname: str, f: Callable):
    sig = inspect.signature(f)
    for name, default in PLOT_PARAMS.items():
        assert name in sig.parameters, f"{qualname} lacks the shared plot parameter `{name}`"
        p = sig.parameters[name]
        assert p.kind is Parameter.KEYWORD_ONLY, f"{qualname}: `{name}` must be keyword-only"
        assert p.default is default, f"{qualname}: `{name}` must default to {default!r}, got {p.default!r}"


def _seeded_callables() -> list:
    """Public functions, classes and public methods of the API modules and of vcell.data with a seed parameter."""
    out = []
    for sub in (*SUBMODULES, "data"):
        mod = importlib.import_module(f"vcell.{sub}")
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isfunction(obj):
                out.append((f"{sub}.{name}", obj))
            elif inspect.isclass(obj):
                out.append((f"{sub}.{name}", obj.__init__))
                out.extend(
                    (f"{sub}.{name}.{attr}", member)
                    for attr, member in vars(obj).items()
                    if not attr.startswith("_") and inspect.isfunction(member)
                )
    return [pytest.param(q, f, id=q) for q, f in out if {"seed", "random_state"} & set(inspect.signature(f).parameters)]


@pytest.mark.parametrize(("qualname", "f"), _seeded_callables())
def test_seed_defaults_to_settings(qualname: str, f: Callable):
    params = inspect.signature(f).parameters
    for name in ("seed", "random_state"):
        # a required seed (the runner's Predictor.fit_predict(..., *, seed)) hides no default; a fixed one does
        if name in params and params[name].default is not Parameter.empty:
            assert params[name].default is None, (
                f"{qualname}: `{name}` must default to None (resolved to vcell.settings.seed), "
                f"got {params[name].default!r}"
            )


# --- copy=True returns a new object and leaves the input unchanged ------------------------------------------------


def _tiny_adata():
    import anndata as ad

    rng = np.random.default_rng(0)
    labels = ["ctrl"] * 8 + ["A"] * 4 + ["B"] * 4 + ["A+B"] * 4 + ["C"] * 4 + ["A+C"] * 4
    adata = ad.AnnData(
        X=rng.poisson(5, size=(len(labels), 6)).astype(np.float32),
        obs=pd.DataFrame({"condition": labels}, index=[f"c{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(6)]),
    )
    return adata


def _harmonized():
    import vcell

    adata = _tiny_adata()
    vcell.pp.harmonize(adata, perturbation_key="condition", control="ctrl")
    return adata


def _snapshot(adata) -> dict:
    return {
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "X": np.array(adata.X, copy=True),
        "layers": {k: np.array(v, copy=True) for k, v in adata.layers.items()},
        "uns": sorted(adata.uns.keys()),
        "obsm": sorted(adata.obsm.keys()),
        "varm": sorted(adata.varm.keys()),
        "shape": adata.shape,
    }


def _assert_unchanged(before: dict, adata, qualname: str) -> None:
    after = _snapshot(adata)
    assert after["shape"] == before["shape"], f"{qualname}(copy=True) changed the input's shape"
    pd.testing.assert_frame_equal(after["obs"], before["obs"], obj=f"{qualname}(copy=True) input .obs")
    pd.testing.assert_frame_equal(after["var"], before["var"], obj=f"{qualname}(copy=True) input .var")
    np.testing.assert_array_equal(after["X"], before["X"], err_msg=f"{qualname}(copy=True) changed the input's X")
    assert after["layers"].keys() == before["layers"].keys(), f"{qualname}(copy=True) changed the input's layers"
    for key in ("uns", "obsm", "varm"):
        assert after[key] == before[key], f"{qualname}(copy=True) changed the input's .{key} keys"


COPY_CASES = {
    "pp.harmonize": (_tiny_adata, {"perturbation_key": "condition", "control": "ctrl"}),
    "pp.log_normalize": (_tiny_adata, {}),
    "bench.split": (_harmonized, {"kind": "combo_half", "seed": 0}),
}


@pytest.mark.parametrize("qualname", list(COPY_CASES))
def test_copy_true_returns_new_object(qualname: str):
    import vcell

    sub, name = qualname.split(".")
    f = getattr(getattr(vcell, sub), name)
    make, kwargs = COPY_CASES[qualname]

    adata = make()
    before = _snapshot(adata)
    out = f(adata, **kwargs, copy=True)
    assert out is not None, f"{qualname}(copy=True) returned None"
    assert out is not adata, f"{qualname}(copy=True) returned its input"
    assert not np.shares_memory(np.asarray(out.X), np.asarray(adata.X)), f"{qualname}(copy=True) shares X"
    _assert_unchanged(before, adata, qualname)
    # the copy carries the result: something was written that the input lacks
    changed = (
        set(out.obs.columns) - set(adata.obs.columns)
        or set(out.layers.keys()) - set(adata.layers.keys())
        or set(out.uns.keys()) - set(adata.uns.keys())
    )
    assert changed, f"{qualname}(copy=True) returned an object without any new obs column, layer or uns key"

    # copy=False: returns None and writes the same fields into the input
    adata2 = make()
    assert f(adata2, **kwargs, copy=False) is None, f"{qualname}(copy=False) must return None"
    assert set(adata2.obs.columns) == set(out.obs.columns)
    assert set(adata2.layers.keys()) == set(out.layers.keys())
    assert set(adata2.uns.keys()) == set(out.uns.keys())


def test_section_parser_detects_missing_sections():
    # the docstring checks above must be able to fail
    def documented(adata, x, *, key_added="k"):
        """Do something.

        Parameters
        ----------
        adata
            Data.
        x, key_added
            Values.

        Returns
        -------
        Nothing.

        Examples
        --------
        >>> 1 + 1
        2
        """

    def undocumented(adata, x):
        """Do something.

        Parameters
        ----------
        adata
            Data.
        """

    assert _documented_params(documented.__doc__) == {"adata", "x", "key_added"}
    assert ">>>" in _section(documented.__doc__, "Examples")
    assert "Nothing." in _section(documented.__doc__, "Returns")
    assert "Examples" not in _section(documented.__doc__, "Returns")
    assert _documented_params(undocumented.__doc__) == {"adata"}
    assert _section(undocumented.__doc__, "Examples") is None
