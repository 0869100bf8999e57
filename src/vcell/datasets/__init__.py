"""Datasets: bundled demo data, readers for local files, GEARS folders and pertpy, and a ground-truth simulator.

* :func:`kang2018` - bundled Kang et al. 2018 IFN-beta PBMC subset (no download).
* :func:`available` / :func:`load` - bundled names, or a name-or-path resolver (the CLI's ``--data``).
* :func:`read` - ``.h5ad``, ``.h5mu`` or a GEARS data folder; :func:`rename_modalities` - MuData modality names
  (e.g. pertpy's ``adt`` as ``prot``).
* :func:`from_pertpy` - pertpy's datasets, or a local copy of one (offline).
* :func:`simulate` - negative-binomial counts from a latent gene-program model with known ground truth
  (additive and epistatic combinations, dose-response, cell types, optional protein modality).
"""

from __future__ import annotations

from ._bundled import available, kang2018, load
from ._read import from_pertpy, read, rename_modalities
from ._simulate import simulate

__all__ = ["available", "from_pertpy", "kang2018", "load", "read", "rename_modalities", "simulate"]
