"""Perturbation labels: canonical form (``"control"``, ``"A"``, ``"A+B"``) and parsing of raw labels."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vcell._constants import COMBO_SEP, CONTROL

#: GEARS' token for "no perturbation" inside a combination label (``"A+ctrl"``) and for controls (``"ctrl"``)
GEARS_CTRL = "ctrl"


def split_perturbation(label: str) -> tuple[str, ...]:
    """Components of a canonical perturbation label.

    Parameters
    ----------
    label
        A canonical label as written by :func:`vcell.pp.harmonize`: ``"control"``, ``"A"`` or ``"A+B"``.

    Returns
    -------
    The single perturbations of ``label`` in their (sorted) order; ``()`` for ``"control"``.

    Examples
    --------
    >>> split_perturbation("A+B")
    ('A', 'B')
    >>> split_perturbation("control")
    ()
    """
    label = str(label)
    if label == CONTROL:
        return ()
    return tuple(label.split(COMBO_SEP))


def canonical_label(components: Iterable[str]) -> str:
    """Canonical label of a set of single perturbations: sorted and joined by ``"+"``.

    Parameters
    ----------
    components
        Names of single perturbations. Surrounding whitespace is stripped and ``"control"`` components are
        dropped (control composed with ``A`` is ``A``).

    Returns
    -------
    ``"control"`` when no component is left, else the components sorted (plain string order) and joined by
    ``"+"``.

    Raises
    ------
    ValueError
        If a component is empty, contains ``"+"`` or appears twice.

    Examples
    --------
    >>> canonical_label(["B", "A"])
    'A+B'
    >>> canonical_label([])
    'control'
    """
    given = [str(c).strip() for c in components]
    parts = [p for p in given if p != CONTROL]
    for p in parts:
        if not p:
            msg = f"empty component in {given!r}; expected non-empty perturbation names"
            raise ValueError(msg)
        if COMBO_SEP in p:
            msg = f"component {p!r} contains {COMBO_SEP!r}, the separator of canonical combination labels"
            raise ValueError(msg)
    if len(set(parts)) != len(parts):
        msg = f"components {parts!r} repeat a perturbation; expected each perturbation once"
        raise ValueError(msg)
    if not parts:
        return CONTROL
    return COMBO_SEP.join(sorted(parts))


def is_combo(label: str) -> bool:
    """Whether a canonical label is a combination of two or more perturbations.

    Parameters
    ----------
    label
        A canonical label as written by :func:`vcell.pp.harmonize`: ``"control"``, ``"A"`` or ``"A+B"``.

    Returns
    -------
    ``True`` if ``label`` has two or more components, else ``False`` (also for ``"control"``).

    Examples
    --------
    >>> is_combo("A+B"), is_combo("A"), is_combo("control")
    (True, False, False)
    """
    return len(split_perturbation(label)) > 1


def n_perturbations(label: str) -> int:
    """Number of single perturbations in a canonical label (0 for ``"control"``).

    Parameters
    ----------
    label
        A canonical label as written by :func:`vcell.pp.harmonize`: ``"control"``, ``"A"`` or ``"A+B"``.

    Returns
    -------
    The number of components of ``label``.

    Examples
    --------
    >>> n_perturbations("A+B"), n_perturbations("A"), n_perturbations("control")
    (2, 1, 0)
    """
    return len(split_perturbation(label))


def _as_list(value: str | Sequence[str], *, name: str) -> list[str]:
    """A string or a sequence of strings as a list of non-empty strings."""
    values = [value] if isinstance(value, str) else list(value)
    if not values:
        msg = f"{name} is empty; expected a string or a non-empty list of strings"
        raise ValueError(msg)
    out = []
    for v in values:
        if not isinstance(v, str) or not v.strip():
            msg = f"{name} must hold non-empty strings, got {v!r}"
            raise ValueError(msg)
        out.append(v)
    return out


@dataclass
class ParsedLabel:
    """A raw label parsed by :class:`LabelParser`."""

    raw: str
    canonical: str | None  # None when the label is ambiguous (see ``error``)
    parts: tuple[str, ...] = ()  # raw components (stripped), control tokens included
    is_control_part: tuple[bool, ...] = ()
    error: str | None = None

    @property
    def n(self) -> int:
        return len(split_perturbation(self.canonical)) if self.canonical is not None else 0


@dataclass
class LabelParser:
    """Parse raw perturbation labels into canonical ones (rules in :func:`vcell.pp.harmonize`).

    Parameters
    ----------
    control
        Raw label(s) of control cells.
    sep
        Separator(s) of combination components in raw labels.
    """

    control: list[str]
    sep: list[str]
    gears: bool = False
    _split: re.Pattern = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.control = [c.strip() for c in self.control]
        seps = sorted(set(self.sep), key=len, reverse=True)
        self._split = re.compile("|".join(re.escape(s) for s in seps))

    @property
    def drop_tokens(self) -> set[str]:
        """Components that stand for 'no perturbation' and are dropped from combinations."""
        return set(self.control) | ({GEARS_CTRL} if self.gears else set())

    def split_raw(self, raw: str) -> list[str]:
        """Raw components (stripped) of a raw label."""
        return [p.strip() for p in self._split.split(raw.strip())]

    def detect_gears(self, raws: Iterable[str]) -> bool:
        """Whether labels are GEARS style: some label combines ``ctrl`` with a real perturbation (``A+ctrl``)."""
        for raw in raws:
            parts = self.split_raw(raw)
            if len(parts) > 1 and GEARS_CTRL in parts and any(p and p != GEARS_CTRL for p in parts):
                return True
        return False

    def parse(self, raw: str) -> ParsedLabel:
        """Canonical form of one raw label (``canonical=None`` and a reason in ``error`` if it is ambiguous)."""
        raw = str(raw)
        label = raw.strip()
        if not label:
            return ParsedLabel(raw, None, error="empty label")
        if label in self.control:
            return ParsedLabel(raw, CONTROL, (label,), (True,))
        parts = self.split_raw(label)
        drop = self.drop_tokens
        is_ctrl = tuple(p in drop for p in parts)
        parsed = ParsedLabel(raw, None, tuple(parts), is_ctrl)
        if any(not p for p in parts):
            parsed.error = f"empty component (separators {self.sep!r})"
            return parsed
        kept = [p for p, c in zip(parts, is_ctrl, strict=True) if not c]
        if not kept:
            parsed.canonical = CONTROL
            return parsed
        seen: set[str] = set()
        for p in kept:
            if p in seen:
                parsed.error = f"component {p!r} appears twice"
                return parsed
            seen.add(p)
            if COMBO_SEP in p:
                parsed.error = (
                    f"component {p!r} contains {COMBO_SEP!r}, the separator of canonical combination labels, "
                    f"but {COMBO_SEP!r} is not among the separators {self.sep!r} (pass it in sep= to split on it)"
                )
                return parsed
            if p == CONTROL:
                parsed.error = (
                    f"component {p!r} is the canonical control name but not one of the control labels "
                    f"{self.control!r} (add it to control= if these are control cells)"
                )
                return parsed
        parsed.canonical = COMBO_SEP.join(sorted(kept))
        return parsed
