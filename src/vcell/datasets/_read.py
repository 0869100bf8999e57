"""Readers: local ``.h5ad`` / ``.h5mu`` files, GEARS data folders, and pertpy's dataset loaders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad

from vcell._utils import mudata_no_pull

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

#: file that marks a GEARS data folder (``PertData.load`` / ``PertData.new_data_process`` output)
GEARS_FILE = "perturb_processed.h5ad"
_EXPECTED = f"an .h5ad file, an .h5mu file, or a GEARS data folder holding {GEARS_FILE}"


def read_h5ad(path: str | Path, **kwargs: Any) -> AnnData:
    """``anndata.read_h5ad(path)``, an unreadable file (truncated, not HDF5) an :class:`OSError` naming its path.

    h5py's own message (``truncated file: eof = 5000 ...``) does not say which file; this one does, and what to do.
    """
    try:
        return ad.read_h5ad(path, **kwargs)
    except OSError as err:
        raise OSError(_unreadable(path, "h5ad", err)) from err


def _unreadable(path: str | Path, kind: str, err: BaseException) -> str:
    size = Path(path).stat().st_size if Path(path).is_file() else None
    return (
        f"cannot read {str(path)!r} as an .{kind} file ({size} bytes): {err}. The file is truncated or damaged (an "
        "interrupted download or copy?) or is not an HDF5 file: fetch or write it again"
    )


def _copy_perturbation(adata: AnnData | MuData, key: str, *, where: str) -> None:
    """Add ``obs['perturbation']`` as a copy of ``obs[key]``, or raise a KeyError naming ``key``."""
    if key not in adata.obs.columns:
        cols = ", ".join(map(repr, list(adata.obs.columns)[:20]))
        msg = f"perturbation_key {key!r} is not a column of {where}.obs; available columns: {cols}"
        raise KeyError(msg)
    if key != "perturbation":
        adata.obs["perturbation"] = adata.obs[key].copy()


def _read_gears(folder: Path, file: Path, perturbation_key: str | None) -> AnnData:
    adata = read_h5ad(file)
    key = "condition" if perturbation_key is None else perturbation_key
    _copy_perturbation(adata, key, where=f"the GEARS file {file}")
    if "gene_name" in adata.var.columns:
        names = adata.var["gene_name"].astype(str).to_numpy()
        if "gene_id" not in adata.var.columns:
            adata.var["gene_id"] = adata.var_names.to_numpy()
        adata.var_names = names
        if not adata.var_names.is_unique:
            adata.var_names_make_unique()
    adata.uns["vcell_source"] = {"format": "gears", "path": str(folder)}
    return adata


def _gears_hint(folder: Path) -> str:
    inner = sorted(p.parent.name for p in folder.glob(f"*/{GEARS_FILE}"))
    return f"; these subfolders hold one: {inner}" if inner else ""


def rename_modalities(mdata: MuData, modalities: dict[str, str]) -> MuData:
    """A MuData whose modalities are renamed: ``modalities`` maps vcell's name to the name in ``mdata``.

    E.g. ``{"rna": "rna", "prot": "adt"}`` for pertpy's papalexi_2021 (CITE-seq antibody counts in ``adt``).
    The other modalities are kept under their names; the modality AnnData objects, ``mdata.obs`` columns and
    ``mdata.uns`` are shared with ``mdata``, not copied.

    Parameters
    ----------
    mdata
        MuData to rename.
    modalities
        ``{new_name: name_in_mdata}``.

    Returns
    -------
    A new MuData (``pull_on_update=False``).

    Raises
    ------
    KeyError
        If a name of ``modalities``' values is not a modality of ``mdata`` (the message lists the modalities).
    ValueError
        If two modalities would get one name, or ``modalities`` is not a dict of strings.

    Examples
    --------
    >>> import anndata as ad, mudata, numpy as np, pandas as pd
    >>> rna = ad.AnnData(np.ones((3, 2)), var=pd.DataFrame(index=["CD4", "CD8A"]))
    >>> adt = ad.AnnData(np.ones((3, 4)), var=pd.DataFrame(index=["a1", "a2", "a3", "a4"]))
    >>> mdata = mudata.MuData({"rna": rna, "adt": adt})
    >>> sorted(rename_modalities(mdata, {"prot": "adt"}).mod)
    ['prot', 'rna']
    """
    import mudata

    if not isinstance(modalities, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in modalities.items()
    ):
        msg = f"modalities must be a dict {{new_name: name_in_file}} of strings, got {modalities!r}"
        raise ValueError(msg)
    missing = {new: old for new, old in modalities.items() if old not in mdata.mod}
    if missing:
        msg = f"modalities {missing} name modalities the MuData lacks; its modalities: {list(mdata.mod)}"
        raise KeyError(msg)
    if len(set(modalities.values())) != len(modalities):
        msg = f"modalities maps several names to one modality: {modalities}"
        raise ValueError(msg)
    rest = {name: mod for name, mod in mdata.mod.items() if name not in set(modalities.values())}
    clash = sorted(set(rest) & set(modalities))
    if clash:
        msg = f"renaming would give two modalities the name(s) {clash}: rename those too (modalities={modalities})"
        raise ValueError(msg)
    mods = {new: mdata.mod[old] for new, old in modalities.items()} | rest
    with mudata_no_pull():
        out = mudata.MuData(mods)
    if out.obs_names.equals(mdata.obs_names):
        for col in mdata.obs.columns:  # global columns (modality-prefixed ones keep their old prefix)
            out.obs[col] = mdata.obs[col].to_numpy()
    out.uns.update(mdata.uns)
    return out


def read(
    path: str | Path, *, perturbation_key: str | None = None, modalities: dict[str, str] | None = None
) -> AnnData | MuData:
    """Read a perturbation dataset from disk: ``.h5ad``, ``.h5mu`` or a GEARS data folder.

    Parameters
    ----------
    path
        An ``.h5ad`` file (read as AnnData), an ``.h5mu`` file (read as MuData with
        ``mudata.set_options(pull_on_update=False)`` on mudata < 0.4, i.e. ``mdata.obs`` as stored; call ``mdata.pull_obs()``
        to pull modality columns), or a GEARS data folder (one dataset's folder, holding
        ``perturb_processed.h5ad``; that file itself is read the same way). GEARS conventions:
        ``obs['condition']`` like ``'A+ctrl'``, ``'A+B'``, ``'ctrl'`` and gene symbols in ``var['gene_name']``.
    perturbation_key
        ``obs`` column holding the perturbation labels; when given (and not ``'perturbation'``), it is copied
        to ``obs['perturbation']`` (for MuData: in ``mdata.obs`` and in every modality that has the column).
        For GEARS folders it defaults to ``'condition'``. Labels are copied as they are; canonicalise them
        (``'ctrl'`` -> ``'control'``, ``'A+ctrl'`` -> ``'A'``) with ``vcell.pp.harmonize``.
    modalities
        ``.h5mu`` only: rename modalities to vcell's names, ``{new_name: name_in_file}``, e.g.
        ``{"rna": "rna", "prot": "adt"}`` for pertpy's papalexi_2021 (see :func:`rename_modalities`; the
        other modalities are kept). ``None``: names as stored.

    Returns
    -------
    AnnData, or MuData for ``.h5mu`` files.

    Sets the following fields (on the object read, never on the file):

    ``.obs['perturbation']``
        Copy of ``obs[perturbation_key]`` (GEARS: of ``obs['condition']``).
    ``.var_names``
        GEARS only: the symbols of ``var['gene_name']`` (made unique), the former names kept in
        ``var['gene_id']`` unless that column exists.
    ``.uns['vcell_source']``
        GEARS only: ``{'format': 'gears', 'path': <folder>}``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    OSError
        If the file cannot be read (truncated or damaged, or not HDF5); the message names the path.
    ValueError
        If ``path`` is neither an ``.h5ad``/``.h5mu`` file nor a folder holding ``perturb_processed.h5ad``.
    KeyError
        If ``perturbation_key`` (or GEARS' ``condition``) is not an ``obs`` column, or a modality named in
        ``modalities`` is not in the file.

    Examples
    --------
    >>> import tempfile, pathlib, vcell
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "sim.h5ad"
    >>> vcell.datasets.simulate(n_cells=200, n_genes=20, n_perturbations=2, n_combos=1, seed=0).write_h5ad(path)
    >>> vcell.datasets.read(path).shape
    (200, 20)
    """
    path = Path(path).expanduser()
    if modalities is not None and path.suffix.lower() != ".h5mu":
        msg = f"modalities= renames the modalities of an .h5mu file; {str(path)!r} is not one"
        raise ValueError(msg)
    if not path.exists():
        msg = f"no file or folder at {str(path)!r}; expected {_EXPECTED}"
        raise FileNotFoundError(msg)
    if path.is_dir():
        file = path / GEARS_FILE
        if not file.is_file():
            msg = f"folder {str(path)!r} is not a GEARS data folder: it has no {GEARS_FILE}{_gears_hint(path)}"
            raise ValueError(msg)
        return _read_gears(path, file, perturbation_key)
    if path.name == GEARS_FILE:
        return _read_gears(path.parent, path, perturbation_key)
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        adata = read_h5ad(path)
        if perturbation_key is not None:
            _copy_perturbation(adata, perturbation_key, where=f"the file {path}")
        return adata
    if suffix == ".h5mu":
        import mudata

        try:
            with mudata_no_pull():
                mdata = mudata.read_h5mu(path)
        except OSError as err:
            raise OSError(_unreadable(path, "h5mu", err)) from err
        if modalities is not None:
            mdata = rename_modalities(mdata, modalities)
        if perturbation_key is not None:
            holders = [mdata] if perturbation_key in mdata.obs.columns else []
            holders += [m for m in mdata.mod.values() if perturbation_key in m.obs.columns]
            if not holders:
                mods = {name: list(m.obs.columns)[:10] for name, m in mdata.mod.items()}
                msg = (
                    f"perturbation_key {perturbation_key!r} is in neither mdata.obs ({list(mdata.obs.columns)[:10]}) "
                    f"nor any modality's obs ({mods}) of {path}"
                )
                raise KeyError(msg)
            for holder in holders:
                _copy_perturbation(holder, perturbation_key, where=str(path))
        return mdata
    msg = f"unknown data format {path.suffix or '(no suffix)'!r} of {str(path)!r}; expected {_EXPECTED}"
    raise ValueError(msg)


def from_pertpy(name: str, *, path: str | Path | None = None) -> AnnData | MuData:
    """Load one of pertpy's datasets (``pertpy.data.<name>``), or a local copy of it.

    pertpy downloads a dataset on first use (to ``pertpy``'s dataset folder) and reads it from there
    afterwards. Without network access, pass ``path`` to a local copy of the file (e.g. ``norman_2019.h5ad``,
    ``papalexi_2021.h5mu``).

    Parameters
    ----------
    name
        Name of a function in :mod:`pertpy.data`, e.g. ``'norman_2019'``, ``'papalexi_2021'``,
        ``'srivatsan_2020_sciplex3'``, ``'replogle_2022_k562_essential'``, ``'frangieh_2021'``.
    path
        Local copy of the dataset, read with :func:`vcell.datasets.read` (pertpy is then not imported).

    Returns
    -------
    AnnData or MuData, as pertpy returns it.

    Raises
    ------
    ValueError
        If pertpy has no dataset called ``name``.
    ConnectionError
        If pertpy cannot download (or read) the dataset; the message says to pass ``path=``.
    ImportError
        If pertpy is not installed and no ``path`` was given.

    Examples
    --------
    >>> import vcell
    >>> adata = vcell.datasets.from_pertpy("norman_2019", path="norman_2019.h5ad")  # doctest: +SKIP
    """
    if path is not None:
        return read(path)
    try:
        import pertpy
    except ImportError as err:
        msg = (
            f'from_pertpy({name!r}) needs pertpy: pip install "vcell[pertpy]"; '
            "or pass path= to a local copy of the dataset"
        )
        raise ImportError(msg) from err
    loader = None if name.startswith("_") else getattr(pertpy.data, name, None)
    if not callable(loader):
        names = sorted(n for n in dir(pertpy.data) if not n.startswith("_") and callable(getattr(pertpy.data, n)))
        msg = f"pertpy has no dataset {name!r}; pertpy.data offers: {', '.join(names)}"
        raise ValueError(msg)
    try:
        return loader()
    except OSError as err:  # includes requests' RequestException, urllib's URLError, TimeoutError
        msg = (
            f"could not download or read pertpy dataset {name!r} ({type(err).__name__}: {err}). Without network "
            f"access, pass path= to a local copy: vcell.datasets.from_pertpy({name!r}, path='/path/to/{name}.h5ad')"
        )
        raise ConnectionError(msg) from err
