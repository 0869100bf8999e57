"""File checks shared by the prior-knowledge loaders: clear errors for missing files and missing columns."""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike
from pathlib import Path

import pandas as pd

_TAB_SUFFIXES = (".tsv", ".tsv.gz", ".tab", ".tab.gz", ".txt", ".txt.gz")


def check_file(path: str | PathLike, *, expected: str) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path`, or raise ``FileNotFoundError`` naming it and what was expected."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "no file"
        msg = f"{what} at {str(path)!r}; expected {expected}"
        raise FileNotFoundError(msg)
    return path


def read_table(path: str | PathLike, *, expected: str) -> pd.DataFrame:
    """Read a csv or tsv table (optionally gzipped; the separator follows the suffix) after :func:`check_file`."""
    path = check_file(path, expected=expected)
    sep = "\t" if path.name.lower().endswith(_TAB_SUFFIXES) else ","
    return pd.read_csv(path, sep=sep)


def require_columns(df: pd.DataFrame, columns: Iterable[str], *, where: str, expected: str) -> None:
    """Raise ``ValueError`` naming the ``columns`` missing from ``df`` (read from ``where``)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        have = ", ".join(map(repr, list(df.columns)[:20]))
        msg = f"{where} lacks the column(s) {missing}; expected {expected}; it has: {have}"
        raise ValueError(msg)
