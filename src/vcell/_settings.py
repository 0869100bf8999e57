"""Global settings: ``vcell.settings``."""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

logger = logging.getLogger("vcell")


class _StderrHandler(logging.StreamHandler):
    """vcell's one console handler: writes to the *current* ``sys.stderr`` (as swapped by Jupyter or pytest)."""

    _vcell_handler = True  # marks it, so that re-importing vcell never adds a second one

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ sets it; the current stderr is always used
        pass


def _configure_logger() -> None:
    """Give the ``vcell`` logger exactly one handler of its own and no propagation, so each record prints once.

    Not propagating keeps records away from the root logger, whose handlers scanpy, scvi-tools, Lightning or the
    user may configure.
    """
    ours = [h for h in logger.handlers if getattr(h, "_vcell_handler", False)]
    for extra in ours[1:]:
        logger.removeHandler(extra)
    if not ours:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("vcell: %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


_configure_logger()
logger.setLevel(logging.INFO)


class VCellSettings:
    """Package-wide defaults.

    Attributes
    ----------
    seed
        Default random seed for every stochastic function that gets ``seed=None``/``random_state=None``.
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
    n_jobs
        Number of CPU workers for data loading.
    progress_bar
        Show progress bars on long work.
    verbosity
        Logging level of the ``vcell`` logger (``"warning"``, ``"info"``, ``"debug"``).
    chunk_elements
        Most values (cells x genes) read at once by statistics over all cells (:func:`vcell.data.iter_row_blocks`):
        the default, 2**20, bounds a dense float64 block to 8 MiB, whatever the number of cells.
    """

    def __init__(self) -> None:
        self.seed: int = 0
        self.device: Literal["auto", "cpu", "cuda"] = "auto"
        self.n_jobs: int = 1
        self.progress_bar: bool = True
        self.chunk_elements: int = 1 << 20
        self._verbosity = "info"

    @property
    def verbosity(self) -> str:
        """Logging level of the ``vcell`` logger."""
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: str) -> None:
        levels = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
        if value not in levels:
            msg = f"verbosity must be one of {sorted(levels)}, got {value!r}"
            raise ValueError(msg)
        self._verbosity = value
        logger.setLevel(levels[value])

    def __repr__(self) -> str:
        return (
            f"VCellSettings(seed={self.seed}, device={self.device!r}, n_jobs={self.n_jobs}, "
            f"progress_bar={self.progress_bar}, verbosity={self.verbosity!r}, chunk_elements={self.chunk_elements})"
        )


settings = VCellSettings()
