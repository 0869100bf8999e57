"""Model persistence never unpickles (DESIGN.md): exact round trips, refused pickles, clear errors on broken files.

Every exported model (``SIZES`` of the contract test), with proteins where it models them, and configurations whose
``init_params_`` hold DataFrames (a gene graph, networks, an embedding table) or whose mean model is learned
(ResidualDiffusion on a CausalVAE), is saved and loaded: predictions bit for bit, attributes of the same types and
values. A planted pickle payload is never run by ``load``, ``load_registry`` or ``view_setup_args``; a real legacy
save (scvi-tools' ``model.pt``, what vcell wrote before) loads only with ``allow_unsafe_legacy=True``.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scvi.model.base import BaseModelClass

import vcell
from vcell._constants import CONTROL
from vcell.data import PerturbationVocab
from vcell.model._base import model_classes


def _contract():
    """tests/model/test_contract.py (its SIZES, setup and screen), imported by path: tests are no package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_vcell_contract", Path(__file__).with_name("test_contract.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_C = _contract()
QUIET, SETUP, SIZES, _screen = _C.QUIET, _C.SETUP, _C.SIZES, _C._screen
NAMES = list(model_classes())
#: the files of vcell's format (vcell.model._persist; spelled out so that this file also runs against older vcell,
#: where the payload tests must fail)
META_FNAME, TENSORS_FNAME = "vcell_model.json", "vcell_tensors.pt"


def _targeted():
    """A screen with a ground-truth gene graph (``uns``) for the configurations that take one."""
    return vcell.datasets.simulate(
        n_cells=240, n_genes=40, n_perturbations=4, n_combos=1, n_programs=4, effects="target_programs", seed=0
    )


def _extra_configs(adata) -> dict[str, tuple[str, dict]]:
    genes = list(adata.var_names)
    graph = pd.DataFrame(adata.uns["vcell_simulation"]["gene_graph"])
    atoms = sorted({a for p in adata.obs["perturbation"].astype(str) if p != CONTROL for a in p.split("+")})
    table = pd.DataFrame(
        np.random.default_rng(0).normal(size=(len(atoms) + 1, 3)), index=[*atoms, "UNSEEN"], columns=["a", "b", "c"]
    )
    network = pd.DataFrame({"source": genes[0], "target": genes[1:6], "weight": [1.0, -1.0, 1.0, -1.0, 1.0]})
    programs = pd.DataFrame({"source": ["P0"] * 8 + ["P1"] * 8, "target": genes[:16], "weight": 1.0})
    return {
        "CausalVAE[graph,networks]": (
            "CausalVAE",
            {"gene_graph": graph, "pathways": programs, "regulatory_network": network, "interactions": True},
        ),
        "FlowMatching[table]": ("FlowMatching", {"perturbation_embedding": table}),
        "CellJEPA[graph,modules]": ("CellJEPA", {"gene_graph": graph, "modules": {"m1": genes[:10], "m2": genes[10:]}}),
        "Baseline[linear,table]": ("Baseline", {"method": "linear", "perturbation_embedding": table}),
        "Baseline[interaction]": ("Baseline", {"method": "interaction", "interaction_ridge": 0.1}),
        "ResidualDiffusion[CausalVAE,vae]": (
            "ResidualDiffusion",
            {"mean_model": "CausalVAE", "mean_model_kwargs": {"n_latent": 4, "n_hidden": 16}, "space": "vae"},
        ),
    }


CASES = [
    *NAMES,
    *[f"{n}+prot" for n in NAMES if model_classes()[n].capabilities.models_proteins],
    *_extra_configs(_targeted()),
]


#: cases that cannot be loaded without data (a Baseline sizes its module by the contexts of the data it is given,
#: one without data; with several contexts its saved weights do not fit): a clear ValueError, tested as such
BARE_LOAD_FAILS = {"Baseline", "Baseline+prot", "ResidualDiffusion", "ResidualDiffusion+prot"}


def fitted_case(fitted) -> str:
    return fitted[2]


@pytest.fixture(scope="module")
def fitted(request):
    """``(adata_or_mdata, model, case)`` per case, trained one epoch."""
    case = request.param
    name, init, protein = case.removesuffix("+prot"), {}, case.endswith("+prot")
    if "[" in case:
        data = _targeted()
        name, init = _extra_configs(data)[case]
        setup = {"perturbation_key": "perturbation", "control": "control"}
    else:
        data = _screen(protein=protein)
        setup = {**SETUP, **({"protein_modality": "prot"} if protein else {})}
    cls = model_classes()[name]
    cls.setup_anndata(data, **setup)
    model = cls(data, **{**SIZES[name][0], **init})
    model.train(max_epochs=1, seed=0, accelerator="cpu", trainer_kwargs=QUIET, **SIZES[name][1])
    return data, model, case


def _rna(data):
    return data.mod["rna"] if hasattr(data, "mod") else data


def _perts(data) -> list[str]:
    seen = sorted(set(_rna(data).obs["vcell_perturbation"].astype(str)) - {CONTROL})
    return [seen[0], next(p for p in seen if "+" in p), CONTROL]


def _predictions(model, data) -> dict:
    out = {}
    for p in _perts(data):
        out[p] = model.predict(data, perturbation=p, seed=0)
        if model.protein_names_:
            out[p, "prot"] = model.predict(data, perturbation=p, seed=0, modality="prot")
    return out


def _attributes(model) -> dict:
    return {n: v for n, v in model._get_user_attributes() if n.endswith("_")}


def assert_same(a, b, path: str = "value") -> None:
    """``a`` and ``b`` are of the same types and values, all the way down (NaN equal to NaN, -0.0 not to 0.0)."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        if isinstance(a, defaultdict):
            assert a.default_factory is b.default_factory, path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, set | frozenset):
        assert a == b, path
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        if a.dtype.kind == "O":
            for i, (x, y) in enumerate(zip(a.ravel(), b.ravel(), strict=True)):
                assert_same(x, y, f"{path}[{i}]")
        else:
            np.testing.assert_array_equal(a, b, err_msg=path, strict=True)
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype, path
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True, check_index_type=True, check_column_type=True, obj=path)
        assert_same(a.attrs, b.attrs, f"{path}.attrs")
    elif isinstance(a, pd.Series):
        pd.testing.assert_series_equal(a, b, check_exact=True, check_index_type=True, obj=path)
    elif isinstance(a, pd.Index):
        pd.testing.assert_index_equal(a, b, exact=True, check_exact=True, obj=path)
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad), path
        assert torch.equal(a.detach().cpu(), b.detach().cpu()), path
    elif isinstance(a, float):
        assert a == b or (math.isnan(a) and math.isnan(b)), f"{path}: {a!r} != {b!r}"
        assert math.copysign(1.0, a) == math.copysign(1.0, b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, PerturbationVocab):
        assert_same(vars(a), vars(b), path)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _scvi_uuids(registry: dict) -> dict:
    """The registry without the ids scvi-tools draws anew whenever data are registered."""
    return {k: v for k, v in registry.items() if k not in ("_scvi_uuid",)}


def _assert_same_model(loaded, model, *, same_registry: bool) -> None:
    mine, theirs = _attributes(loaded), _attributes(model)
    if not same_registry:  # data registered again on load: a new scvi-tools uuid, all else the same
        mine["registry_"], theirs["registry_"] = _scvi_uuids(mine["registry_"]), _scvi_uuids(theirs["registry_"])
    assert_same(mine, theirs, type(model).__name__)
    assert_same(loaded.module.state_dict(), model.module.state_dict(), "state_dict")
    if getattr(model, "mean_model", None) is not None:
        _assert_same_model(loaded.mean_model, model.mean_model, same_registry=same_registry)


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("fitted", CASES, indirect=True)
def test_round_trip_predictions_and_attributes_identical(fitted, tmp_path):
    data, model, _ = fitted
    cls = type(model)
    before = _predictions(model, data)
    model.save(tmp_path / "m")
    loaded = cls.load(tmp_path / "m", adata=data, accelerator="cpu")
    assert type(loaded) is cls
    assert_same(_predictions(loaded, data), before, "predictions")
    _assert_same_model(loaded, model, same_registry=False)
    # without data: the saved registry itself, then predictions for data passed in
    if fitted_case(fitted) in BARE_LOAD_FAILS:
        with pytest.warns(UserWarning, match="no saved anndata"), pytest.raises(ValueError, match="do not fit"):
            cls.load(tmp_path / "m", accelerator="cpu")
        return
    with pytest.warns(UserWarning, match="no saved anndata"):
        bare = cls.load(tmp_path / "m", accelerator="cpu")
    _assert_same_model(bare, model, same_registry=True)
    assert_same(_predictions(bare, data), before, "predictions (loaded without data)")
    assert_same(cls.load_registry(tmp_path / "m"), model.registry_, "registry")


@pytest.mark.parametrize("fitted", ["Baseline", "CausalVAE+prot"], indirect=True)
def test_save_anndata_and_prefix(fitted, tmp_path):
    data, model, _ = fitted
    model.save(tmp_path / "m", prefix="run1_", save_anndata=True)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "run1_adata.h5ad",
        f"run1_{META_FNAME}",
        f"run1_{TENSORS_FNAME}",
    ]
    loaded = type(model).load(tmp_path / "m", prefix="run1_", accelerator="cpu")  # the saved AnnData, no warning
    assert loaded.adata is not None
    if fitted_case(fitted) not in BARE_LOAD_FAILS:  # adata=False: without data, not even the saved AnnData
        assert type(model).load(tmp_path / "m", adata=False, prefix="run1_", accelerator="cpu").adata is None
    assert_same(_predictions(loaded, data), _predictions(model, data), "predictions")
    with pytest.raises(ValueError, match="already exists"):
        model.save(tmp_path / "m", prefix="run1_")
    model.save(tmp_path / "m", prefix="run1_", overwrite=True)


@pytest.mark.parametrize("fitted", ["Baseline"], indirect=True)
def test_every_supported_type_round_trips_exactly(fitted, tmp_path):
    """What docs/adding_a_model.md lists as storable, with its corner cases, comes back identical."""
    data, model, _ = fitted
    big = np.arange(12, dtype=">f4").reshape(3, 4)  # big-endian
    frame = pd.DataFrame(
        {
            "f32": np.array([0.5, np.nan, -0.0], dtype=np.float32),
            "i8": np.array([1, -2, 3], dtype=np.int8),
            "b": [True, False, True],
            "cat": pd.Categorical(["x", "y", "x"], categories=["y", "x", "z"], ordered=True),
            "s": pd.array(["a", None, "c"], dtype="string"),
            "o": np.array(["a", 1, None], dtype=object),
        },
        index=pd.Index(["r1", "r2", "r3"], name="row", dtype=object),
    )
    frame.attrs["note"] = "kept"
    dup = pd.DataFrame(np.eye(2), columns=["a", "a"])
    extra = {
        "floats": [math.nan, math.inf, -math.inf, -0.0, 1e-310, 0.1],
        "ints": [0, -(2**70), True, None],
        "tuple": (1, "a", (2.5,)),
        "set": {1, 2},
        "frozenset": frozenset({"a"}),
        "keys": {1: "int key", (1, 2): "tuple key", None: "none key", "__vcell_type__": "a tag-like key"},
        "default": defaultdict(list, {"a": [1]}),
        "np_scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), np.str_("s"), np.float64(np.nan)],
        "arrays": [
            np.array(3.0),
            np.zeros((0, 3), dtype=np.float16),
            np.arange(5, dtype=np.uint16),
            np.array([np.nan, np.inf], dtype=np.float64),
            big,
            big[:, ::2],
            np.array([1 + 2j], dtype=np.complex64),
            np.array([["ab", "c"]], dtype="<U2"),
            np.array([{"k": 1}, [1, 2], None, "s"], dtype=object),
        ],
        "tensors": [
            torch.arange(6).reshape(2, 3)[:, 1],
            torch.nn.Parameter(torch.ones(2)),
            torch.zeros(2, dtype=torch.bool),
        ],
        "frame": frame,
        "dup_columns": dup,
        "empty": pd.DataFrame(index=pd.RangeIndex(2, 8, 3, name="n")),
        "series": pd.Series([1.0, 2.0], index=pd.Index([10, 20]), name=("a", 1)),
        "index": pd.Index([1.5, 2.5], dtype=np.float32, name="x"),
        "cat_index": pd.CategoricalIndex(["a", "b", "a"]),
        "vocab": PerturbationVocab(["control", "A", "B", "A+B"]),
    }
    model.extra_ = extra
    try:
        model.save(tmp_path / "m")
        loaded = type(model).load(tmp_path / "m", adata=data, accelerator="cpu")
    finally:
        del model.extra_
    assert_same(loaded.extra_, extra, "extra_")


class _Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "what"),
    [
        (_Opaque(), "_Opaque"),
        (lambda x: x, "function"),
        (Path("a"), "Path"),
        ({"nested": [pd.Timestamp("2024-01-01")]}, r"extra_\['nested'\]\[0\] is a pandas.*Timestamp"),
        (pd.MultiIndex.from_tuples([("a", 1)]), "MultiIndex"),
        (np.array(["2024-01-01"], dtype="datetime64[D]"), "datetime64"),
        (pd.DataFrame({"t": pd.to_datetime(["2024-01-01"])}), "datetime64"),
        (defaultdict(lambda: 0), "default_factory"),
        (np.array([_Opaque()], dtype=object), r"extra_\[0\] is a .*_Opaque"),
    ],
)
@pytest.mark.parametrize("fitted", ["Baseline"], indirect=True)
def test_unsupported_attribute_raises_at_save_and_writes_nothing(fitted, tmp_path, value, what):
    _, model, _ = fitted
    model.extra_ = value
    try:
        with pytest.raises(TypeError, match=rf"cannot save Baseline: .*{what}.*never pickles"):
            model.save(tmp_path / "m")
    finally:
        del model.extra_
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------ no pickle, no code
class _Payload:
    """Unpickled, runs code: writes ``marker`` (what an attacker's file could do instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('pwned')",))


def _plant_legacy(path: Path, marker: Path) -> None:
    """A directory with scvi-tools' ``model.pt`` whose unpickling runs code."""
    path.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model_state_dict": {}, "var_names": _Payload(marker), "attr_dict": {"registry_": _Payload(marker)}},
        path / "model.pt",
    )


def _assert_refused(call, marker: Path, what: str, match: str) -> None:
    """``call()`` runs no payload (checked first: the failure that matters) and raises a ValueError matching."""
    try:
        call()
    except Exception as e:  # noqa: BLE001
        error = e
    else:
        error = None
    assert not marker.exists(), f"{what} ran the code planted in the file"
    assert isinstance(error, ValueError), f"{what}: expected a ValueError, got {error!r}"
    assert re.search(match, str(error)), f"{what}: {error}"


def _load_calls(cls, path: Path, adata) -> dict:
    return {
        "load": lambda: cls.load(path, adata=adata, accelerator="cpu"),
        "load without data": lambda: cls.load(path, accelerator="cpu"),
        "load_registry": lambda: cls.load_registry(path),
        "view_setup_args": lambda: cls.view_setup_args(path),
    }


@pytest.mark.parametrize("name", NAMES)
def test_planted_payload_in_legacy_file_is_never_run(name, tmp_path):
    cls = model_classes()[name]
    adata = _screen()
    marker = tmp_path / "marker"
    _plant_legacy(tmp_path / "m", marker)
    for what, call in _load_calls(cls, tmp_path / "m", adata).items():
        _assert_refused(call, marker, what, r"model\.pt.*execute arbitrary code.*allow_unsafe_legacy=True")


@pytest.mark.parametrize("fitted", ["ResidualDiffusion"], indirect=True)
def test_planted_payloads_in_new_format_are_never_run(fitted, tmp_path):
    """A payload in the tensor file (even with a matching checksum), or a legacy mean model of a ResidualDiffusion."""
    data, model, _ = fitted
    marker = tmp_path / "marker"
    model.save(tmp_path / "m")
    # the nested mean model replaced by a planted legacy directory
    mean = tmp_path / "m" / "mean_model"
    for p in mean.iterdir():
        p.unlink()
    _plant_legacy(mean, marker)
    load = lambda: type(model).load(tmp_path / "m", adata=data, accelerator="cpu")
    _assert_refused(load, marker, "load (legacy mean model)", r"mean_model/model\.pt.*allow_unsafe_legacy")
    # the tensor file replaced by a pickle that runs code, its checksum updated in the JSON
    import hashlib

    torch.save({"module.x": _Payload(marker)}, tmp_path / "m" / TENSORS_FNAME)
    meta_path = tmp_path / "m" / META_FNAME
    meta = json.loads(meta_path.read_text())
    meta["tensors_sha256"] = hashlib.sha256((tmp_path / "m" / TENSORS_FNAME).read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    _assert_refused(load, marker, "load (tensor file)", rf"{TENSORS_FNAME} is truncated, corrupt or not a vcell model")


@pytest.mark.parametrize("fitted", CASES[: len(NAMES)], indirect=True)
def test_saved_files_hold_no_pickle(fitted, tmp_path):
    """Every file is JSON or a tensor archive that loads with ``weights_only=True``, holding tensors only."""
    _, model, _ = fitted
    model.save(tmp_path / "m", save_anndata=True)
    files = sorted(p for p in (tmp_path / "m").rglob("*") if p.is_file())
    assert not [p for p in files if p.name == "model.pt"]
    for p in files:
        if p.suffix == ".json":
            meta = json.loads(p.read_text())
            assert meta["format"] == "vcell-model"
        elif p.suffix == ".pt":
            tensors = torch.load(p, weights_only=True)
            assert isinstance(tensors, dict)
            assert all(isinstance(t, torch.Tensor) for t in tensors.values())
            with zipfile.ZipFile(p) as z:  # the archive's pickle names no global but torch's tensor rebuilders
                pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
                globals_ = _pickle_globals(z.read(pkl))
            assert globals_ <= {
                "torch._utils._rebuild_tensor_v2",
                "collections.OrderedDict",
                "torch.FloatStorage",
                "torch.LongStorage",
                "torch.BoolStorage",
                "torch.DoubleStorage",
                "torch.IntStorage",
                "torch.HalfStorage",
                "torch.ShortStorage",
                "torch.CharStorage",
                "torch.ByteStorage",
                "torch.ComplexFloatStorage",
                "torch.ComplexDoubleStorage",
                "torch.BFloat16Storage",
                "torch._utils._rebuild_parameter",
            }, globals_
        else:
            assert p.suffix == ".h5ad", p


def _pickle_globals(data: bytes) -> set[str]:
    import pickletools

    out, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            out.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            out.add(f"{strings[-2]}.{strings[-1]}")
    return out


# ------------------------------------------------------------------------------------------ legacy opt-in
@pytest.mark.parametrize("fitted", NAMES, indirect=True)
def test_legacy_save_loads_only_with_opt_in(fitted, tmp_path):
    """A save by scvi-tools' own ``save`` (vcell's format before this one; ResidualDiffusion's mean model beside)."""
    from vcell.model._persist import UnsafeLegacyLoadWarning

    data, model, _ = fitted
    cls = type(model)
    BaseModelClass.save(model, str(tmp_path / "old"))
    if getattr(model, "mean_model", None) is not None:
        BaseModelClass.save(model.mean_model, str(tmp_path / "old" / "mean_model"))
    for call in _load_calls(cls, tmp_path / "old", data).values():
        with pytest.raises(ValueError, match=rf"{tmp_path / 'old'}/model\.pt.*allow_unsafe_legacy=True"):
            call()
    with pytest.warns(UnsafeLegacyLoadWarning, match="can execute arbitrary code"):
        loaded = cls.load(tmp_path / "old", adata=data, accelerator="cpu", allow_unsafe_legacy=True)
    before = _predictions(model, data)
    assert_same(_predictions(loaded, data), before, "predictions")
    with pytest.warns(UnsafeLegacyLoadWarning):
        registry = cls.load_registry(tmp_path / "old", allow_unsafe_legacy=True)
    assert registry["setup_args"] == model.registry_["setup_args"]
    # saved again: the safe format, the same model
    loaded.save(tmp_path / "new")
    again = cls.load(tmp_path / "new", adata=data, accelerator="cpu")
    assert_same(_predictions(again, data), before, "predictions")


# ------------------------------------------------------------------------------------------ broken files, wrong data
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    adata = _screen()
    vcell.model.Baseline.setup_anndata(adata, **SETUP)
    model = vcell.model.Baseline(adata, method="additive")
    model.train()
    path = tmp_path_factory.mktemp("saved") / "m"
    model.save(path, save_anndata=True)
    return adata, model, path


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_or_corrupt_files_name_the_path(saved, tmp_path):
    adata, _, src = saved
    load = vcell.model.Baseline.load
    for fname, cut in [(TENSORS_FNAME, 0.5), (META_FNAME, 0.5), (META_FNAME, 0.0), ("adata.h5ad", 0.3)]:
        path = _copy(src, tmp_path / f"{fname}-{cut}")
        data = (path / fname).read_bytes()
        (path / fname).write_bytes(data[: int(len(data) * cut)])
        if fname == TENSORS_FNAME:  # checksum updated too: the archive itself is found broken
            import hashlib

            meta = json.loads((path / META_FNAME).read_text())
            meta["tensors_sha256"] = hashlib.sha256((path / fname).read_bytes()).hexdigest()
            (path / META_FNAME).write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=rf"{path / fname} is truncated, corrupt or not a vcell model file"):
            load(path, adata=None if fname == "adata.h5ad" else adata, accelerator="cpu")
    # altered weights: the checksum
    path = _copy(src, tmp_path / "altered")
    data = bytearray((path / TENSORS_FNAME).read_bytes())
    data[-100] ^= 0xFF
    (path / TENSORS_FNAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path / TENSORS_FNAME} .*SHA-256 differs"):
        load(path, adata=adata, accelerator="cpu")
    # missing files and directories
    path = _copy(src, tmp_path / "no-weights")
    (path / TENSORS_FNAME).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{path / TENSORS_FNAME} is missing"):
        load(path, adata=adata)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no saved model in {tmp_path / 'empty'}"):
        vcell.model.Baseline.load_registry(tmp_path / "empty")
    # a newer format
    path = _copy(src, tmp_path / "future")
    meta = json.loads((path / META_FNAME).read_text())
    meta["format_version"] = 99
    (path / META_FNAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 99.*update vcell"):
        load(path, adata=adata)


def test_wrong_class_and_wrong_genes_are_refused(saved):
    adata, _, path = saved
    with pytest.raises(ValueError, match=r"holds a Baseline model, not a CausalVAE: load it with Baseline\.load"):
        vcell.model.CausalVAE.load(path, adata=adata)
    with pytest.raises(ValueError, match="var_names hold the genes the Baseline saved in .* different order"):
        vcell.model.Baseline.load(path, adata=adata[:, ::-1].copy())
    with pytest.raises(ValueError, match="var_names differ"):
        vcell.model.Baseline.load(path, adata=adata[:, 1:].copy())


def test_view_setup_args_prints_the_saved_arguments(saved, capsys):
    _, model, path = saved
    vcell.model.Baseline.view_setup_args(path)
    out = capsys.readouterr().out
    assert "Setup via `Baseline.setup_anndata`" in out
    assert "'perturbation_key': 'perturbation'" in out
    assert vcell.model.Baseline.load_registry(path)["setup_args"] == model.registry_["setup_args"]
