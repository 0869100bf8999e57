"""Perturbation vocabulary: canonical condition labels -> dose-scaled multi-hot codes over single perturbations."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from vcell._constants import COMBO_SEP, CONTROL


def _components(label: str) -> tuple[str, ...]:
    """Components of a canonical label (``()`` for control)."""
    return () if label == CONTROL else tuple(label.split(COMBO_SEP))


class PerturbationVocab:
    """Vocabulary of single perturbations ("atoms") from which every condition is composed.

    A condition is a canonical label from :func:`vcell.pp.harmonize`: ``"control"``, a single ``"A"`` or a
    combination ``"A+B"``. Its encoding is a multi-hot vector over the atoms, scaled by the dose, so that
    combinations are the sum of their singles (the shared combination rule of every vcell model).

    Parameters
    ----------
    conditions
        Canonical condition labels seen in training (controls included or not).

    Examples
    --------
    >>> vocab = PerturbationVocab(["control", "A", "B", "A+B"])
    >>> vocab.atoms
    ['A', 'B']
    >>> vocab.encode(["A+B", "control"]).tolist()
    [[1.0, 1.0], [0.0, 0.0]]
    """

    def __init__(self, conditions: Iterable[str]) -> None:
        conditions = [str(c) for c in conditions]
        self.conditions: list[str] = sorted(set(conditions) - {CONTROL})
        self.atoms: list[str] = sorted({a for c in self.conditions for a in _components(c)})
        self._index = {a: i for i, a in enumerate(self.atoms)}
        self.singles: list[str] = [c for c in self.conditions if len(_components(c)) == 1]

    @property
    def n_atoms(self) -> int:
        """Number of single perturbations."""
        return len(self.atoms)

    def __contains__(self, label: str) -> bool:
        return all(a in self._index for a in _components(label))

    def __repr__(self) -> str:
        return f"PerturbationVocab({self.n_atoms} single perturbations, {len(self.conditions)} conditions)"

    def unknown(self, labels: Iterable[str]) -> list[str]:
        """Single perturbations in ``labels`` that are not in the vocabulary.

        Parameters
        ----------
        labels
            Canonical condition labels.
        """
        return sorted({a for lab in labels for a in _components(lab) if a not in self._index})

    def check(self, labels: Iterable[str], *, what: str = "the model") -> None:
        """Raise a :class:`KeyError` naming perturbations that ``what`` never saw.

        Parameters
        ----------
        labels
            Canonical condition labels.
        what
            Name of the model in the message.
        """
        bad = self.unknown(labels)
        if bad:
            shown = ", ".join(map(repr, self.atoms[:10]))
            msg = (
                f"perturbation(s) {bad} were never seen by {what}; known single perturbations "
                f"({self.n_atoms}): {shown}{', ...' if self.n_atoms > 10 else ''}"
            )
            raise KeyError(msg)

    def encode(self, labels: Sequence[str], doses: Sequence[float] | float | None = None) -> np.ndarray:
        """Dose-scaled multi-hot encoding, shape ``(len(labels), n_atoms)``, float32.

        Parameters
        ----------
        labels
            Canonical condition labels (every component must be in the vocabulary).
        doses
            One dose per label, or one for all; ``None`` = 1.
        """
        labels = [str(x) for x in labels]
        self.check(labels)
        out = np.zeros((len(labels), self.n_atoms), dtype=np.float32)
        for i, lab in enumerate(labels):
            for a in _components(lab):
                out[i, self._index[a]] = 1.0
        if doses is not None:
            out *= np.broadcast_to(np.asarray(doses, dtype=np.float32), (len(labels),))[:, None]
        return out
