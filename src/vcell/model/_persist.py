"""Saving and loading models without unpickling (DESIGN.md, "Persistence never unpickles").

A saved model is a directory (scvi-tools' convention) holding

* ``{prefix}vcell_model.json``: the format and versions, the class, the genes (``var_names``), scvi-tools' registry
  and the model's attributes ending in ``_`` (``init_params_`` included), as tagged JSON (:class:`_Codec`);
* ``{prefix}vcell_tensors.pt``: a flat dict of tensors written by :func:`torch.save` and read back with
  ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers: the module's
  ``state_dict`` (``module.<name>``) and the numeric arrays among the attributes (``attr.<n>``). The JSON records its
  SHA-256, so a truncated or altered file is an error naming it;
* ``{prefix}adata.h5ad`` with ``save(save_anndata=True)``.

(safetensors would serve for the tensors too, but is not installed with vcell's stack; ``weights_only=True`` is the
other format DESIGN.md allows.) What an attribute may hold is listed in :data:`SUPPORTED`; anything else is a
TypeError at save time, naming the attribute. Nothing is ever pickled, so loading cannot run code.

A directory holding only scvi-tools' ``model.pt`` (a pickle: what vcell wrote before this format) is read only with
``allow_unsafe_legacy=True``, with a warning; without it, a ValueError names the file, the option and the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from anndata import AnnData

FORMAT = "vcell-model"
FORMAT_VERSION = 1
META_FNAME = "vcell_model.json"
TENSORS_FNAME = "vcell_tensors.pt"
LEGACY_FNAME = "model.pt"  # scvi-tools' SAVE_KEYS.MODEL_FNAME: a pickle
ADATA_FNAME = "adata.h5ad"
MDATA_FNAME = "mdata.h5mu"
TAG = "__vcell_type__"

#: what a model attribute (ending in ``_``, ``init_params_`` included) may hold, for the messages and the docs
SUPPORTED = (
    "None, bool, int, float, str; list, tuple, set and dict (any keys of these types) of supported values; "
    "numpy arrays (bool, integer, float, complex, str, or object arrays of supported values) and numpy scalars; "
    "torch tensors; pandas Index (not MultiIndex), Series and DataFrame with numpy (not datetime), string or "
    "categorical columns; vcell.data.PerturbationVocab"
)
_FACTORIES: dict[str, type] = {"dict": dict, "list": list, "set": set, "int": int, "float": float, "str": str}
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class UnsafeLegacyLoadWarning(UserWarning):
    """A model was loaded from scvi-tools' pickle format (``allow_unsafe_legacy=True``): unpickling can run code."""


def _paths(dir_path: str | Path, prefix: str | None) -> dict[str, Path]:
    d, p = Path(dir_path), prefix or ""
    return {
        "meta": d / f"{p}{META_FNAME}",
        "tensors": d / f"{p}{TENSORS_FNAME}",
        "legacy": d / f"{p}{LEGACY_FNAME}",
        "adata": d / f"{p}{ADATA_FNAME}",
        "mdata": d / f"{p}{MDATA_FNAME}",
    }


# --------------------------------------------------------------------------------------------- JSON codec
class _Codec:
    """Tagged JSON for the supported types (:data:`SUPPORTED`), exact both ways.

    Plain JSON holds None, bool, int, str, finite floats, lists and dicts with string keys; every other type is an
    object with the key :data:`TAG`. Numeric arrays go to ``tensors`` (when given) and are referenced by key, or are
    written inline. Decoding builds only these types: nothing in a file names a class or a function to call.
    """

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, *, what: str = "the model") -> None:
        self.tensors = tensors
        self.what = what

    # ------------------------------------------------------------------ encoding
    def unsupported(self, x: Any, path: str, detail: str = "") -> TypeError:
        t = type(x)
        msg = (
            f"cannot save {self.what}: {path} is a {t.__module__}.{t.__qualname__}{detail}, which vcell's model "
            f"format does not store (it never pickles, so that loading a model cannot run code). A model may store "
            f"in its attributes: {SUPPORTED}. Convert it (e.g. to a list or an array) or keep it out of attributes "
            "ending in '_' and init_params_ (see docs/adding_a_model.md, 'Save and load')"
        )
        return TypeError(msg)

    def encode(self, x: Any, path: str) -> Any:
        t = type(x)
        if x is None or t in (bool, int, str):
            return x
        if t is float:
            return x if math.isfinite(x) else {TAG: "float", "value": repr(x)}
        if t is list:
            return [self.encode(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if t in (tuple, set, frozenset):
            items = list(x)
            return {TAG: t.__name__, "items": [self.encode(v, f"{path}[{i}]") for i, v in enumerate(items)]}
        if t in (dict, defaultdict):
            return self._encode_dict(x, path)
        if isinstance(x, np.generic):
            return self._encode_scalar(x, path)
        if t is np.ndarray:
            return self._encode_ndarray(x, path)
        if isinstance(x, torch.Tensor) and t in (torch.Tensor, torch.nn.Parameter):
            return self._encode_tensor(x, path)
        if t is pd.RangeIndex:
            return {
                TAG: "RangeIndex",
                "start": x.start,
                "stop": x.stop,
                "step": x.step,
                "name": self.encode(x.name, path),
            }
        if t in (pd.Index, pd.CategoricalIndex):
            return {TAG: "Index", "name": self.encode(x.name, f"{path}.name"), "values": self._encode_values(x, path)}
        if t is pd.Series:
            return {
                TAG: "Series",
                "name": self.encode(x.name, f"{path}.name"),
                "index": self.encode(x.index, f"{path}.index"),
                "values": self._encode_values(x, path),
                "attrs": self.encode(dict(x.attrs), f"{path}.attrs"),
            }
        if t is pd.DataFrame:
            return {
                TAG: "DataFrame",
                "index": self.encode(x.index, f"{path}.index"),
                "columns": self.encode(x.columns, f"{path}.columns"),
                "values": [self._encode_values(x.iloc[:, j], f"{path}[{c!r}]") for j, c in enumerate(x.columns)],
                "attrs": self.encode(dict(x.attrs), f"{path}.attrs"),
            }
        from vcell.data import PerturbationVocab

        if t is PerturbationVocab:
            return {TAG: "PerturbationVocab", "conditions": list(x.conditions)}
        raise self.unsupported(x, path)

    def _encode_dict(self, x: dict, path: str) -> Any:
        factory = None
        if type(x) is defaultdict:
            names = {v: k for k, v in _FACTORIES.items()}
            if x.default_factory is not None and x.default_factory not in names:
                raise self.unsupported(x, path, f" with default_factory {x.default_factory!r}")
            factory = names.get(x.default_factory)
        plain = type(x) is dict and TAG not in x and all(type(k) is str for k in x)
        if plain:
            return {k: self.encode(v, f"{path}[{k!r}]") for k, v in x.items()}
        items = [[self.encode(k, f"{path} (key {k!r})"), self.encode(v, f"{path}[{k!r}]")] for k, v in x.items()]
        out: dict[str, Any] = {TAG: "dict", "items": items}
        if type(x) is defaultdict:
            out["default_factory"] = factory
        return out

    def _encode_scalar(self, x: np.generic, path: str) -> dict:
        if x.dtype.kind not in "biufU":
            raise self.unsupported(x, path, f" of dtype {x.dtype}")
        return {TAG: "numpy_scalar", "dtype": x.dtype.str, "value": self.encode(x.item(), path)}

    def _encode_tensor(self, x: torch.Tensor, path: str) -> dict:
        if self.tensors is None:
            raise self.unsupported(x, path, " (tensors are not stored in this part of the model)")
        key = self._store(x)
        return {TAG: "tensor", "key": key, "parameter": type(x) is torch.nn.Parameter, "requires_grad": x.requires_grad}

    def _store(self, t: torch.Tensor) -> str:
        key = f"attr.{len(self.tensors)}"
        t = t.detach().cpu().contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view: save its own values, not its base's storage
        self.tensors[key] = t
        return key

    def _encode_ndarray(self, a: np.ndarray, path: str) -> dict:
        out: dict[str, Any] = {TAG: "ndarray", "dtype": a.dtype.str, "shape": list(a.shape)}
        kind = a.dtype.kind
        if kind in "biufc":
            if self.tensors is not None:
                native = np.array(a, dtype=a.dtype.newbyteorder("="), order="C", copy=True)
                with contextlib.suppress(TypeError):  # a dtype torch lacks: inline below
                    out["tensor"] = self._store(torch.from_numpy(native))
                    return out
            if kind == "c":
                raise self.unsupported(a, path, " of complex numbers (stored only among tensors)")
            out["values"] = [_json_number(v) for v in a.ravel().tolist()]
            return out
        if kind == "U":
            out["values"] = a.ravel().tolist()
            return out
        if kind == "O":
            out["values"] = [self.encode(v, f"{path}[{i}]") for i, v in enumerate(a.ravel())]
            return out
        raise self.unsupported(a, path, f" of dtype {a.dtype}")

    def _encode_values(self, x: pd.Index | pd.Series, path: str) -> dict:
        """The values of an Index or Series (a DataFrame column), with their dtype."""
        dtype = x.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            cat = x.array if isinstance(x, pd.Index) else x.cat
            return {
                "kind": "categorical",
                "codes": self._encode_ndarray(np.asarray(cat.codes), f"{path}.codes"),
                "categories": self.encode(dtype.categories, f"{path}.categories"),
                "ordered": bool(dtype.ordered),
            }
        if isinstance(dtype, pd.StringDtype):
            values = [None if v is pd.NA or (isinstance(v, float) and math.isnan(v)) else str(v) for v in x]
            na = "NA" if dtype.na_value is pd.NA else "nan"
            return {"kind": "string", "storage": dtype.storage, "na_value": na, "values": values}
        if isinstance(dtype, np.dtype):
            return {"kind": "numpy", "array": self._encode_ndarray(x.to_numpy(), path)}
        raise self.unsupported(x, path, f" of dtype {dtype}")

    # ------------------------------------------------------------------ decoding
    def decode(self, x: Any) -> Any:
        if isinstance(x, list):
            return [self.decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        if TAG not in x:
            return {k: self.decode(v) for k, v in x.items()}
        kind = x[TAG]
        if kind == "float":
            return _NONFINITE[x["value"]]
        if kind in ("tuple", "set", "frozenset"):
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[kind](self.decode(v) for v in x["items"])
        if kind == "dict":
            items = [(self.decode(k), self.decode(v)) for k, v in x["items"]]
            if "default_factory" in x:
                factory = x["default_factory"]
                return defaultdict(None if factory is None else _FACTORIES[factory], items)
            return dict(items)
        if kind == "numpy_scalar":
            return np.dtype(x["dtype"]).type(self.decode(x["value"]))
        if kind == "ndarray":
            return self._decode_ndarray(x)
        if kind == "tensor":
            t = self._tensor(x["key"])
            if x["parameter"]:
                return torch.nn.Parameter(t, requires_grad=x["requires_grad"])
            return t.requires_grad_(x["requires_grad"]) if t.is_floating_point() or t.is_complex() else t
        if kind == "RangeIndex":
            return pd.RangeIndex(x["start"], x["stop"], x["step"], name=self.decode(x["name"]))
        if kind == "Index":
            return self._decode_values(x["values"], index=True, name=self.decode(x["name"]))
        if kind == "Series":
            out = self._decode_values(x["values"], index=False, name=self.decode(x["name"]))
            out.index = self.decode(x["index"])
            out.attrs.update(self.decode(x["attrs"]))
            return out
        if kind == "DataFrame":
            index, columns = self.decode(x["index"]), self.decode(x["columns"])
            cols = {j: self._decode_values(v, index=False, name=j) for j, v in enumerate(x["values"])}
            df = pd.DataFrame(cols, copy=False) if cols else pd.DataFrame(index=pd.RangeIndex(len(index)))
            df.index, df.columns = index, columns
            df.attrs.update(self.decode(x["attrs"]))
            return df
        if kind == "PerturbationVocab":
            from vcell.data import PerturbationVocab

            return PerturbationVocab(x["conditions"])
        msg = f"unknown stored type {kind!r}"
        raise ValueError(msg)

    def _tensor(self, key: str) -> torch.Tensor:
        if self.tensors is None or key not in self.tensors:
            msg = f"tensor {key!r} is missing from the tensor file"
            raise ValueError(msg)
        return self.tensors[key]

    def _decode_ndarray(self, x: dict) -> np.ndarray:
        dtype, shape = np.dtype(x["dtype"]), tuple(int(n) for n in x["shape"])
        if "tensor" in x:
            a = self._tensor(x["tensor"]).numpy()
            if a.shape != shape:
                msg = f"array {x['tensor']!r} has shape {a.shape} in the tensor file, {shape} in the metadata"
                raise ValueError(msg)
            return a.astype(dtype, copy=False)
        values = x["values"]
        if dtype.kind == "O":
            out = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):
                out[i] = self.decode(v)
            return out.reshape(shape)
        if dtype.kind == "U":
            return np.array(values, dtype=dtype).reshape(shape)
        return np.array([_NONFINITE[v] if isinstance(v, str) else v for v in values], dtype=dtype).reshape(shape)

    def _decode_values(self, x: dict, *, index: bool, name: Any) -> pd.Index | pd.Series:
        kind = x["kind"]
        if kind == "categorical":
            codes = self._decode_ndarray(x["codes"])
            categories = self.decode(x["categories"])
            values = pd.Categorical.from_codes(codes, dtype=pd.CategoricalDtype(categories, ordered=x["ordered"]))
            dtype = values.dtype
        elif kind == "string":
            na = pd.NA if x["na_value"] == "NA" else np.nan
            dtype = _string_dtype(x["storage"], na)
            values = pd.array([na if v is None else v for v in x["values"]], dtype=dtype)
        elif kind == "numpy":
            values = self._decode_ndarray(x["array"])
            dtype = values.dtype
        else:
            msg = f"unknown stored column kind {kind!r}"
            raise ValueError(msg)
        if index:
            return pd.Index(values, dtype=dtype, name=name, copy=False)
        return pd.Series(values, dtype=dtype, name=name, copy=False)


def _json_number(v: Any) -> Any:
    """An inline array element: finite numbers as they are, NaN and infinities as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


# --------------------------------------------------------------------------------------------- save
def _attributes(model: Any) -> dict[str, Any]:
    """What scvi-tools saves of a model: its attributes ending in ``_`` (``registry_`` and ``init_params_`` too).

    scvi-tools leaves out routines (a function stored as an attribute would silently be lost): a TypeError here.
    """
    attrs = {name: value for name, value in model._get_user_attributes() if name[-1] == "_"}
    for name, value in vars(model).items():
        if name[-1] == "_" and not name.startswith("__") and name not in attrs:
            raise _Codec(what=type(model).__name__).unsupported(value, name)
    return attrs


def _var_names(model: Any) -> list[str]:
    if getattr(model, "var_names_", None) is not None:
        return [str(v) for v in model.var_names_]
    if model.adata is not None:
        return [str(v) for v in model.adata.var_names]
    from vcell._constants import REGISTRY_KEYS

    state = model.registry_["field_registries"][REGISTRY_KEYS.X_KEY]["state_registry"]
    return [str(v) for v in state["column_names"]]


def save_model(
    model: Any,
    dir_path: str | Path,
    *,
    prefix: str | None = None,
    overwrite: bool = False,
    save_anndata: bool = False,
    **anndata_write_kwargs: Any,
) -> None:
    """Write ``model`` into the directory ``dir_path`` (see the module docstring); everything is checked first."""
    import scvi

    import vcell

    name = type(model).__name__
    tensors: dict[str, torch.Tensor] = {}
    state = {}
    for key, value in model.module.state_dict().items():
        if not isinstance(value, torch.Tensor):
            msg = (
                f"cannot save {name}: its module's state_dict entry {key!r} is a {type(value).__name__}, not a tensor "
                "(vcell's model format stores tensors only there)"
            )
            raise TypeError(msg)
        t = value.detach().cpu().contiguous()
        tensors[f"module.{key}"] = t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
        state[key] = f"module.{key}"
    attrs = _attributes(model)
    registry = attrs.pop("registry_")
    codec = _Codec(tensors, what=name)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": name,
        "vcell_version": vcell.__version__,
        "scvi_tools_version": scvi.__version__,
        "torch_version": torch.__version__,
        "var_names": _var_names(model),
        "registry": _Codec(None, what=name).encode(registry, "registry_"),
        "attributes": {k: codec.encode(v, k) for k, v in attrs.items()},
        "module_state": state,
    }  # everything encoded before the disk is touched: an unsupported attribute leaves nothing behind

    dir_path = Path(dir_path)
    if dir_path.exists() and not overwrite:
        msg = f"{dir_path} already exists. Please provide another directory for saving (or overwrite=True)."
        raise ValueError(msg)
    dir_path.mkdir(parents=True, exist_ok=True)
    paths = _paths(dir_path, prefix)
    paths["legacy"].unlink(missing_ok=True)  # the pickle this save replaces (scvi-tools' save would overwrite it)
    if save_anndata:
        if model.adata is None:
            warnings.warn("the model has no AnnData: save_anndata=True saves none", UserWarning, stacklevel=3)
        else:
            model.adata.write_h5ad(paths["adata"], **anndata_write_kwargs)
    _atomic_write(paths["tensors"], lambda f: torch.save(tensors, f))
    meta["tensors_file"] = paths["tensors"].name
    meta["tensors_sha256"] = _sha256(paths["tensors"])
    json_text = json.dumps(meta, allow_nan=False)
    _atomic_write(paths["meta"], lambda f: f.write(json_text.encode()))


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            write(f)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- read
def legacy_error(path: Path, what: str) -> ValueError:
    msg = (
        f"{path} is a model saved in scvi-tools' pickle format (vcell before its safe format): loading it runs "
        "torch.load(weights_only=False), which can execute arbitrary code hidden in the file, so vcell does not "
        f"read it by default. If you trust where it comes from, pass allow_unsafe_legacy=True to {what}, then save "
        "the model again to convert it to vcell's format, which loads without unpickling"
    )
    return ValueError(msg)


def legacy_warning(path: Path) -> None:
    msg = (
        f"loading {path} with allow_unsafe_legacy=True: scvi-tools' pickle format is read with "
        "torch.load(weights_only=False), which can execute arbitrary code hidden in the file; do this only for files "
        "you trust, and save the model again to convert it to vcell's format"
    )
    warnings.warn(msg, UnsafeLegacyLoadWarning, stacklevel=4)


def find_saved(dir_path: str | Path, prefix: str | None, *, allow_unsafe_legacy: bool, what: str) -> str:
    """``"vcell"`` (the safe format is there) or ``"legacy"`` (only ``model.pt``, allowed); otherwise a ValueError."""
    paths = _paths(dir_path, prefix)
    if paths["meta"].is_file():
        return "vcell"
    if paths["legacy"].is_file():
        if not allow_unsafe_legacy:
            raise legacy_error(paths["legacy"], what)
        legacy_warning(paths["legacy"])
        return "legacy"
    if not Path(dir_path).is_dir():
        msg = f"no saved model at {dir_path}: not a directory"
        raise FileNotFoundError(msg)
    msg = f"no saved model in {dir_path}: it holds neither {paths['meta'].name} nor {paths['legacy'].name}"
    raise FileNotFoundError(msg)


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is truncated, corrupt or not a vcell model file ({why}); save the model again")


def read_meta(dir_path: str | Path, prefix: str | None) -> dict:
    """The JSON metadata of a saved model, its format checked."""
    path = _paths(dir_path, prefix)["meta"]
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _corrupt(path, f"no {FORMAT!r} format tag")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        msg = f"{path} has model format version {version!r}; this vcell reads up to {FORMAT_VERSION}: update vcell"
        raise ValueError(msg)
    missing = [k for k in ("model_class", "var_names", "registry", "attributes", "module_state") if k not in meta]
    if missing:
        raise _corrupt(path, f"missing {missing}")
    return meta


def read_registry(dir_path: str | Path, prefix: str | None) -> dict:
    """The registry saved with a model (JSON only)."""
    meta = read_meta(dir_path, prefix)
    try:
        return _Codec(None).decode(meta["registry"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise _corrupt(_paths(dir_path, prefix)["meta"], f"registry: {type(e).__name__}: {e}") from None


def read_saved(dir_path: str | Path, prefix: str | None) -> tuple[dict, dict, list[str], dict[str, torch.Tensor]]:
    """``(registry, attributes, var_names, module state_dict)`` of a model saved in vcell's format."""
    paths = _paths(dir_path, prefix)
    meta = read_meta(dir_path, prefix)
    tensor_path = paths["tensors"]  # always beside the JSON, under the same prefix ("tensors_file" is a record)
    if not tensor_path.is_file():
        msg = f"{tensor_path} is missing: the model's weights ({paths['meta'].name} names it)"
        raise FileNotFoundError(msg)
    if meta.get("tensors_sha256") != _sha256(tensor_path):
        raise _corrupt(tensor_path, f"its SHA-256 differs from the one recorded in {paths['meta'].name}")
    try:
        tensors = torch.load(tensor_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (UnpicklingError for a non-tensor object, RuntimeError for a bad archive)
        raise _corrupt(tensor_path, f"{type(e).__name__}: {e}") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise _corrupt(tensor_path, "not a dict of tensors")
    codec = _Codec(tensors)
    try:
        registry = codec.decode(meta["registry"])
        attrs = {str(k): codec.decode(v) for k, v in meta["attributes"].items()}
        state = {str(k): codec._tensor(v) for k, v in meta["module_state"].items()}
        var_names = [str(v) for v in meta["var_names"]]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise _corrupt(paths["meta"], f"{type(e).__name__}: {e}") from None
    if "init_params_" not in attrs:
        raise _corrupt(paths["meta"], "no init_params_")
    return registry, attrs, var_names, state


# --------------------------------------------------------------------------------------------- load
def load_model(
    cls: type,
    dir_path: str | Path,
    adata: AnnData | None,
    *,
    accelerator: str = "auto",
    device: int | str = "auto",
    prefix: str | None = None,
    allowed_classes_names_list: list[str] | None = None,
) -> Any:
    """A model of class ``cls`` from a directory in vcell's format, as scvi-tools' ``BaseModelClass.load`` builds it.

    With ``adata``: its genes are checked against the saved ones and its registration replayed from the saved
    registry (``setup_anndata(adata, source_registry=..., **setup_args)``). Without: the AnnData saved with the model
    (``save_anndata=True``), or none (a warning, as scvi-tools'); ``adata=False``: none, silently.
    """
    from scvi.data._constants import _MODEL_NAME_KEY, _SETUP_ARGS_KEY, _SETUP_METHOD_NAME
    from scvi.model._utils import parse_device_args

    from vcell._utils import check_var_names_match

    _, _, torch_device = parse_device_args(
        accelerator=accelerator, devices=device, return_device="torch", validate_single_device=True
    )
    registry, attrs, var_names, state = read_saved(dir_path, prefix)
    saved_class = registry.get(_MODEL_NAME_KEY)
    if (
        saved_class is not None
        and saved_class != cls.__name__
        and saved_class not in (allowed_classes_names_list or [])
    ):
        msg = f"{dir_path} holds a {saved_class} model, not a {cls.__name__}: load it with {saved_class}.load"
        raise ValueError(msg)
    method_name = registry.get(_SETUP_METHOD_NAME, "setup_anndata")
    if adata is False:  # scvi-tools' spelling of "without data, not even the saved AnnData"
        adata = None
    elif adata is None:
        paths = _paths(dir_path, prefix)
        saved = paths["mdata"] if method_name == "setup_mudata" else paths["adata"]
        if saved.is_file():
            adata = _read_data(saved)
        else:
            warnings.warn(
                "Save path contains no saved anndata and no adata was passed. Model will be loaded without anndata.",
                UserWarning,
                stacklevel=3,
            )
    if adata is not None:
        if _SETUP_ARGS_KEY not in registry:
            msg = f"the model saved in {dir_path} has no setup arguments in its registry: cannot register the data"
            raise ValueError(msg)
        check_var_names_match(var_names, adata, what=f"the {cls.__name__} saved in {dir_path}")
        getattr(cls, method_name)(adata, source_registry=registry, **registry[_SETUP_ARGS_KEY])

    init_params = attrs.pop("init_params_")
    non_kwargs = dict(init_params.get("non_kwargs", {}))
    kwargs = {k: v for group in init_params.get("kwargs", {}).values() for k, v in group.items()}
    if "registry" in inspect.signature(cls).parameters:
        model = cls(adata, registry=registry, **non_kwargs, **kwargs)
    else:
        model = cls(adata, **non_kwargs, **kwargs)
    for attr, value in attrs.items():
        setattr(model, attr, value)
    model.module.on_load(model)
    try:
        model.module.load_state_dict(state)
    except RuntimeError as e:
        tensor_path = _paths(dir_path, prefix)["tensors"]
        msg = f"the weights in {tensor_path} do not fit {cls.__name__}'s module: {e}"
        raise ValueError(msg) from None
    model.to_device(torch_device)
    model.module.eval()
    if adata is not None:
        model._validate_anndata(adata)
    return model


def _read_data(path: Path) -> Any:
    try:
        if path.suffix == ".h5mu":
            import mudata

            return mudata.read_h5mu(path)
        import anndata

        return anndata.read_h5ad(path)
    except (OSError, KeyError, ValueError) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None


def _string_dtype(storage: str, na: Any) -> Any:
    """``pd.StringDtype(storage, na_value=na)``, as far as this pandas and its optional pyarrow allow.

    Without pyarrow: python storage (the same strings). pandas < 2.3 has no ``na_value`` (its string dtype always
    uses ``pd.NA``).
    """
    import pandas as pd

    for st in (storage, "python"):
        try:
            try:
                return pd.StringDtype(storage=st, na_value=na)
            except TypeError:  # pandas < 2.3
                return pd.StringDtype(storage=st)
        except ImportError:  # saved with pyarrow's storage, read without pyarrow
            continue
    return pd.StringDtype()
