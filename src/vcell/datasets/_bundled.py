"""Small real datasets shipped inside the package, and name-or-path resolution for the CLI."""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from anndata import AnnData
    from mudata import MuData

#: bundled dataset name -> file under ``vcell/datasets/_data``
_BUNDLED: dict[str, str] = {"kang2018": "kang2018_pbmc_ifnb_small.h5ad"}


def available() -> list[str]:
    """Names of the datasets bundled with vcell (usable with :func:`load`).

    Returns
    -------
    Sorted list of dataset names.

    Examples
    --------
    >>> import vcell
    >>> vcell.datasets.available()
    ['kang2018']
    """
    return sorted(_BUNDLED)


def _bundled_file(name: str) -> Traversable:
    if name not in _BUNDLED:
        msg = f"{name!r} is not a bundled dataset; available: {available()}"
        raise ValueError(msg)
    return files("vcell.datasets").joinpath("_data").joinpath(_BUNDLED[name])


def _read_bundled(name: str) -> AnnData:
    from ._read import read_h5ad

    with as_file(_bundled_file(name)) as path:
        return read_h5ad(path)


def kang2018() -> AnnData:
    """Kang et al. 2018 PBMCs, control vs IFN-beta stimulated: the bundled cell-type-transfer demo data.

    1975 cells x 6998 genes of raw UMI counts (float32 CSR in ``X``), scGen's validation split of
    GSE96583, shipped with vcell (no download, nothing outside the package is read).

    Returns
    -------
    AnnData with ``obs['perturbation']`` (``'control'`` for 936 cells, ``'IFNb'`` for 1039), ``obs['cell_type']``
    (7 types: ``'B'``, ``'CD14+Mono'``, ``'CD4T'``, ``'CD8T'``, ``'Dendritic'``, ``'FCGR3A+Mono'``, ``'NK'``),
    ``obs['dose']`` (0 / 1), ``obs['condition']`` (the original ``'control'`` / ``'stimulated'``),
    ``obsm['X_umap']`` and ``uns['source']`` (repository, commit, paper and processing).

    Examples
    --------
    >>> import vcell
    >>> adata = vcell.datasets.kang2018()
    >>> adata.shape
    (1975, 6998)
    >>> sorted(adata.obs["perturbation"].unique())
    ['IFNb', 'control']
    """
    return _read_bundled("kang2018")


def load(name_or_path: str | Path) -> AnnData | MuData:
    """Load a bundled dataset by name, or read a file or folder (what the CLI's ``--data`` accepts).

    Parameters
    ----------
    name_or_path
        A name from :func:`available` (e.g. ``'kang2018'``), or a path that :func:`vcell.datasets.read`
        understands (``.h5ad``, ``.h5mu`` or a GEARS data folder). A string that is a bundled name is
        taken as the name.

    Returns
    -------
    The dataset as AnnData (or MuData for ``.h5mu`` files).

    Examples
    --------
    >>> import vcell
    >>> vcell.datasets.load("kang2018").n_obs
    1975
    """
    from ._read import read

    if isinstance(name_or_path, str) and name_or_path in _BUNDLED:
        return _read_bundled(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        msg = (
            f"{str(name_or_path)!r} is neither a bundled dataset (available: {available()}) nor an existing path "
            "(expected an .h5ad or .h5mu file, or a GEARS data folder holding perturb_processed.h5ad)"
        )
        raise FileNotFoundError(msg)
    return read(path)
