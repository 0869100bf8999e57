"""Pairing of each cell with control cells of the same context (cell type, batch), for :class:`vcell.data.CellBatches`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vcell._settings import logger
from vcell._utils import resolve_seed

from ._loader import Pairs


def pair_controls(
    contexts: Sequence[str] | np.ndarray,
    is_control: np.ndarray,
    *,
    n_pairs: int = 1,
    seed: int | None = None,
) -> np.ndarray:
    """For every cell, indices of ``n_pairs`` random control cells from the same context.

    Parameters
    ----------
    contexts
        Context label per cell (e.g. from :func:`vcell.data.context_labels`).
    is_control
        Boolean mask of control cells.
    n_pairs
        Controls drawn per cell (with replacement).
    seed
        Random seed; ``None`` uses ``vcell.settings.seed``.

    Returns
    -------
    Integer array of shape ``(n_cells, n_pairs)``. A context without control cells draws from all
    controls (logged once with the contexts concerned).

    Examples
    --------
    >>> import numpy as np
    >>> idx = pair_controls(np.array(["a", "a", "b", "b"]), np.array([True, False, True, False]), seed=0)
    >>> idx.ravel().tolist()
    [0, 0, 2, 2]
    """
    contexts = np.asarray(contexts).astype(str)
    is_control = np.asarray(is_control, dtype=bool)
    if not is_control.any():
        msg = "no control cells to pair with: the registered data hold no cell labelled 'control'"
        raise ValueError(msg)
    rng = np.random.default_rng(resolve_seed(seed))
    out = np.empty((len(contexts), n_pairs), dtype=np.int64)
    all_controls = np.flatnonzero(is_control)
    missing = []
    for ctx in np.unique(contexts):
        cells = np.flatnonzero(contexts == ctx)
        pool = np.flatnonzero(is_control & (contexts == ctx))
        if pool.size == 0:
            missing.append(ctx)
            pool = all_controls
        out[cells] = rng.choice(pool, size=(cells.size, n_pairs), replace=True)
    if missing:
        logger.info("contexts without control cells paired with controls of any context: %s", missing)
    return out


class PooledPairs:
    """One pass of (target, source) pairs: ``rng -> Pairs``, each target with a random cell of its pool.

    The ``items`` of a :class:`~vcell.data.CellBatches` (CellJEPA's transition): ``identity`` cells paired with
    themselves, then for every ``(targets, pool)`` of ``pairs`` each target with a cell of ``pool`` drawn with
    replacement from ``rng``. A class of :mod:`vcell.data`, not a closure or a model's class: picklable, and a process
    started by ``strategy="ddp_spawn"`` imports only :mod:`vcell.data` when it unpickles the loader.

    Examples
    --------
    >>> import numpy as np
    >>> p = PooledPairs(np.array([0]), [(np.array([5, 6]), np.array([1]))])(np.random.default_rng(0))
    >>> p.targets.tolist(), p.sources.tolist()
    ([0, 5, 6], [0, 1, 1])
    """

    def __init__(self, identity: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.identity, self.pairs = identity, pairs

    def __call__(self, rng: np.random.Generator) -> Pairs:
        """The pass's pairs, drawn from ``rng``."""
        src, tgt = [self.identity], [self.identity]
        for targets, pool in self.pairs:
            src.append(rng.choice(pool, size=len(targets), replace=True))
            tgt.append(targets)
        return Pairs(np.concatenate(tgt), np.concatenate(src))
