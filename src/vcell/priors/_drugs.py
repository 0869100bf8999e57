"""Drug featurisation: the sci-Plex 3 compound table and Morgan fingerprints from SMILES (RDKit, optional)."""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from typing import Literal

import numpy as np
import pandas as pd

from ._io import read_table, require_columns

_COMPOUNDS_EXPECTED = (
    "the sci-Plex 3 compound table (sciplex3_compounds_smiles_targets.csv) with columns product_name and SMILES"
)
_INSTALL_HINT = 'pip install "vcell[drugs]"  (or: pip install rdkit)'


def read_compounds(path: str | PathLike) -> pd.DataFrame:
    r"""Read the sci-Plex 3 compound table (188 compounds and the vehicle, with SMILES, targets and pathways).

    Parameters
    ----------
    path
        Local csv with at least the columns ``product_name`` (the compound names used in sci-Plex 3's
        ``obs['product_name']``) and ``SMILES``; its other columns (``catalog_number``, ``name``, ``target``,
        ``pathway`` ...) are kept.

    Returns
    -------
    DataFrame indexed by compound (``product_name``, index name ``'compound'``). The vehicle row (``'Vehicle'``)
    is kept; its ``SMILES`` is missing (see ``missing`` in :func:`drug_fingerprints`).

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    ValueError
        If a required column is missing or a compound name is repeated.

    Examples
    --------
    >>> import tempfile, pathlib, vcell
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "compounds.csv"
    >>> _ = path.write_text("product_name,SMILES,target\nVehicle,,Vehicle\nAspirin,CC(=O)OC1=CC=CC=C1C(=O)O,COX\n")
    >>> vcell.priors.read_compounds(path)["target"].to_dict()
    {'Vehicle': 'Vehicle', 'Aspirin': 'COX'}
    """
    df = read_table(path, expected=_COMPOUNDS_EXPECTED)
    require_columns(df, ["product_name", "SMILES"], where=f"compound table {str(path)!r}", expected=_COMPOUNDS_EXPECTED)
    df = df.dropna(subset=["product_name"])
    df = df.assign(product_name=df["product_name"].astype(str).str.strip())
    dup = df["product_name"][df["product_name"].duplicated()].unique()
    if len(dup):
        msg = f"compound table {str(path)!r} repeats the compound name(s) {list(dup)[:10]}"
        raise ValueError(msg)
    return df.set_index("product_name").rename_axis("compound")


def _is_missing(smiles: object) -> bool:
    return smiles is None or (isinstance(smiles, float) and np.isnan(smiles)) or str(smiles).strip() == ""


def drug_fingerprints(
    smiles: pd.Series | Mapping[str, str | None],
    *,
    radius: int = 2,
    n_bits: int = 1024,
    use_chirality: bool = False,
    missing: Literal["raise", "zero"] = "raise",
) -> pd.DataFrame:
    """Morgan (ECFP-like) bit fingerprints of compounds from their SMILES, via RDKit.

    RDKit is an optional dependency: ``pip install "vcell[drugs]"``.

    Parameters
    ----------
    smiles
        Compound name -> SMILES, as a Series (e.g. ``read_compounds(path)["SMILES"]``) or a dict.
    radius
        Morgan radius (2 ~ ECFP4).
    n_bits
        Fingerprint length.
    use_chirality
        Include stereochemistry in the atom environments (without it, enantiomers such as sci-Plex 3's Ruxolitinib
        and S-Ruxolitinib get identical fingerprints).
    missing
        Compounds without a SMILES (NaN, None or empty; e.g. the vehicle/DMSO control): ``'raise'`` a
        ``ValueError`` naming them, or give them an all-zero row (``'zero'``).

    Returns
    -------
    DataFrame of float32 0/1 values, index = compound names (in input order), columns ``0 .. n_bits-1``.

    Raises
    ------
    ImportError
        If RDKit is not installed.
    ValueError
        If a SMILES cannot be parsed (the message names the compound), or one is missing and ``missing='raise'``.

    Examples
    --------
    >>> import vcell
    >>> fp = vcell.priors.drug_fingerprints({"ethanol": "CCO", "aspirin": "CC(=O)OC1=CC=CC=C1C(=O)O"}, n_bits=256)
    >>> fp.shape
    (2, 256)
    >>> bool(fp.loc["aspirin"].sum() > fp.loc["ethanol"].sum())
    True
    """
    try:
        from rdkit import Chem, rdBase
        from rdkit.Chem import rdFingerprintGenerator
    except ImportError as err:
        msg = f"drug_fingerprints needs RDKit; install it with {_INSTALL_HINT}"
        raise ImportError(msg) from err
    if missing not in ("raise", "zero"):
        msg = f"missing must be 'raise' or 'zero', got {missing!r}"
        raise ValueError(msg)
    series = smiles if isinstance(smiles, pd.Series) else pd.Series(dict(smiles), dtype=object)
    if not series.index.is_unique:
        msg = f"compound names are repeated: {list(series.index[series.index.duplicated()].unique())[:10]}"
        raise ValueError(msg)
    absent = [str(name) for name, s in series.items() if _is_missing(s)]
    if absent and missing == "raise":
        msg = f"no SMILES for compound(s) {absent[:10]}; drop them or pass missing='zero' for all-zero rows"
        raise ValueError(msg)
    generator = rdFingerprintGenerator.GetMorganGenerator(
        radius=int(radius), fpSize=int(n_bits), includeChirality=bool(use_chirality)
    )
    out = np.zeros((len(series), int(n_bits)), dtype=np.float32)
    with rdBase.BlockLogs():  # keep RDKit's parse errors off stderr; we raise our own
        for row, (name, s) in enumerate(series.items()):
            if _is_missing(s):
                continue
            mol = Chem.MolFromSmiles(str(s).strip())
            if mol is None:
                msg = f"invalid SMILES for compound {name!r}: {s!r}"
                raise ValueError(msg)
            out[row] = generator.GetFingerprintAsNumPy(mol)
    return pd.DataFrame(out, index=series.index.copy())
