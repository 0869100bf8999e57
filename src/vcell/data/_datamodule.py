"""Data module pairing each perturbed cell with control cells of the same context (cell type, batch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from vcell._constants import REGISTRY_KEYS
from vcell._settings import logger
from vcell._utils import resolve_seed

if TYPE_CHECKING:
    from scvi.data import AnnDataManager

    from ._vocab import PerturbationVocab


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


class PairedDataModule:
    """Batches of (perturbed cell, paired control cell, perturbation encoding, dose, covariates).

    A thin Lightning-compatible data module over scvi-tools' :class:`~scvi.data.AnnTorchDataset`: the
    registered fields are read by scvi-tools, and this class adds the paired control cell
    (``REGISTRY_KEYS.CONTROL_X_KEY``) and the dose-scaled multi-hot perturbation encoding
    (``REGISTRY_KEYS.PERT_ENCODING_KEY``). Controls are re-drawn every epoch (seeded).

    Parameters
    ----------
    adata_manager
        The registered data.
    vocab
        Perturbation vocabulary of the model.
    contexts
        Context label per cell (pairing groups).
    train_indices, val_indices
        Cells used for training and validation.
    batch_size
        Cells per batch.
    seed
        Random seed of shuffling and pairing; ``None`` uses ``vcell.settings.seed``.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        vocab: PerturbationVocab,
        contexts: np.ndarray,
        *,
        train_indices: np.ndarray,
        val_indices: np.ndarray | None = None,
        batch_size: int = 128,
        seed: int | None = None,
    ) -> None:
        from vcell import data as _data

        self.manager = adata_manager
        self.vocab = vocab
        self.batch_size = int(batch_size)
        self.seed = resolve_seed(seed)
        self.train_indices = np.asarray(train_indices, dtype=np.int64)
        self.val_indices = np.asarray(val_indices if val_indices is not None else [], dtype=np.int64)
        self.contexts = np.asarray(contexts).astype(str)
        self.dataset = adata_manager.create_torch_dataset()
        adata = adata_manager.adata
        self.is_control = _data.control_mask(adata)
        conds = adata.obs[_data.PERT_COL].astype(str).to_numpy()
        doses = adata.obs[_data.DOSE_COL].to_numpy(dtype=np.float32)
        self.encoding = vocab.encode(conds, doses)

    def _batches(self, indices: np.ndarray, *, shuffle: bool, epoch: int):
        import torch

        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(indices) if shuffle else indices
        pairs = pair_controls(self.contexts, self.is_control, seed=int(rng.integers(2**31)))[:, 0]
        for start in range(0, len(order), self.batch_size):
            idx = np.sort(order[start : start + self.batch_size])
            batch = {k: torch.as_tensor(np.asarray(v)) for k, v in self.dataset[idx].items()}
            ctrl = self.dataset[pairs[idx]]
            batch[REGISTRY_KEYS.CONTROL_X_KEY] = torch.as_tensor(np.asarray(ctrl[REGISTRY_KEYS.X_KEY]))
            batch[REGISTRY_KEYS.PERT_ENCODING_KEY] = torch.as_tensor(self.encoding[idx])
            yield batch

    def train_dataloader(self) -> _Batches:
        """Iterable of training batches (a new shuffle and pairing per epoch)."""
        return _Batches(self, self.train_indices, shuffle=True)

    def val_dataloader(self) -> _Batches:
        """Iterable of validation batches (fixed order and pairing)."""
        return _Batches(self, self.val_indices, shuffle=False)


class _Batches:
    """Lazy, sized iterable of batches; each pass over a shuffled iterable is a new epoch."""

    def __init__(self, dm: PairedDataModule, indices: np.ndarray, *, shuffle: bool) -> None:
        self.dm, self.indices, self.shuffle, self.epoch = dm, indices, shuffle, 0

    def __len__(self) -> int:
        return -(-len(self.indices) // self.dm.batch_size)

    def __iter__(self):
        epoch = self.epoch if self.shuffle else 0
        self.epoch += 1
        return self.dm._batches(self.indices, shuffle=self.shuffle, epoch=epoch)
