"""Pairing of each cell with control cells of the same context (cell type, batch), for :class:`vcell.data.CellBatches`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from vcell._settings import logger
from vcell._utils import resolve_seed

from ._loader import Pairs

if TYPE_CHECKING:
    import torch


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


class CoupledPairs:
    """One pass of FlowMatching's (control, perturbed) pairs, coupled by optimal transport: ``rng -> Pairs``.

    The ``items`` of FlowMatching's :class:`~vcell.data.CellBatches` (``vcell.model._flow_matching._pair_batches``):
    ``identity`` cells paired with themselves, then per ``(targets, controls)`` of ``groups`` each target with a drawn
    control, coupled within chunks of ``coupling_size`` cells on the coordinates ``z``
    (:func:`vcell.module.ot_pairs`: exact up to ``exact_max`` cells, Sinkhorn with ``epsilon`` above;
    ``coupling="random"``: not coupled); ``fixed=True`` also draws the flow times. A class of :mod:`vcell.data`, not
    a closure or a model's class: picklable, and a process started by ``strategy="ddp_spawn"`` imports no model
    module (nor scvi-tools) when it unpickles the loader.

    The pass's random draws (each group's order, the controls drawn, Sinkhorn's draws) are made up front, in the
    order of a pass coupled whole; each chunk's optimal-transport coupling is solved when the loader first needs it
    (:class:`vcell.data.Pairs` ``parts``/``complete``), so a pass costs its draws up front and each batch only the
    couplings it reaches.
    """

    def __init__(
        self,
        z: torch.Tensor | np.ndarray,
        groups: list[tuple[np.ndarray, np.ndarray]],
        identity: np.ndarray,
        coupling: str,
        coupling_size: int,
        exact_max: int,
        epsilon: float,
        fixed: bool,
    ) -> None:
        # the tensor, not a numpy view of it: "ddp_spawn" moves a pickled tensor's storage into shared memory, which
        # would leave a view taken before pointing at freed memory (the couplings then read garbage)
        self._z, self.groups, self.identity, self.fixed = z, groups, identity, fixed
        self.coupling, self.coupling_size, self.exact_max, self.epsilon = coupling, coupling_size, exact_max, epsilon

    @property
    def z(self) -> np.ndarray:
        """The cells' coordinates, as a numpy view of the tensor's current storage."""
        return self._z if isinstance(self._z, np.ndarray) else self._z.numpy()

    def __call__(self, rng: np.random.Generator) -> Pairs:
        """The pass's pairs, drawn from ``rng``; each chunk's coupling is solved by ``complete`` when first needed."""
        from vcell.module._flow_matching import FLOW_TIME_KEY

        src, tgt = [self.identity], [self.identity]
        # parts: the identity pairs in chunks (nothing to solve), then one part per coupling chunk
        starts = list(range(0, len(self.identity), self.coupling_size))
        todo: list[np.ndarray | bool | None] = [None] * len(starts)  # per part: Sinkhorn draws, True (exact), None
        offset = len(self.identity)
        for targets, controls in self.groups:
            targets = rng.permutation(targets)
            for chunk in np.array_split(targets, -(-len(targets) // self.coupling_size)):
                sources = rng.choice(controls, size=len(chunk), replace=True)
                solve: np.ndarray | bool | None = None
                if self.coupling == "ot" and len(chunk) > 1:
                    # ot_pairs(method="auto") draws len(chunk) uniforms from rng when it uses Sinkhorn: drawn here
                    solve = True if len(chunk) <= self.exact_max else rng.random(len(chunk))
                src.append(sources)
                tgt.append(chunk)
                starts.append(offset)
                todo.append(solve)
                offset += len(chunk)
        src, tgt = np.concatenate(src), np.concatenate(tgt)
        extras = {FLOW_TIME_KEY: rng.random(len(tgt)).astype(np.float32)} if self.fixed else {}
        if not len(tgt):
            return Pairs(tgt, src, extras)
        return Pairs(tgt, src, extras, parts=np.asarray(starts), complete=_Coupling(self, src, tgt, starts, todo))


class _Coupling:
    """``complete(i)`` of a pass of :class:`CoupledPairs`: part ``i``'s sources reordered by optimal transport."""

    def __init__(
        self,
        pairs: CoupledPairs,
        src: np.ndarray,
        tgt: np.ndarray,
        starts: list[int],
        todo: list[np.ndarray | bool | None],
    ) -> None:
        self.pairs, self.src, self.tgt, self.todo = pairs, src, tgt, todo
        self.bounds = [*starts, len(tgt)]

    def __call__(self, i: int) -> None:
        from vcell.module import ot_pairs

        solve = self.todo[i]
        if solve is None:
            return
        a, b = self.bounds[i], self.bounds[i + 1]
        p, sources = self.pairs, self.src[a:b]
        z = p.z
        perm = ot_pairs(
            z[sources],
            z[self.tgt[a:b]],
            method="exact" if solve is True else "sinkhorn",
            epsilon=p.epsilon,
            uniforms=None if solve is True else solve,
        )
        self.src[a:b] = sources[perm]
        self.todo[i] = None
