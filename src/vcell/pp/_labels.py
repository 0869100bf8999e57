"""Perturbation labels: canonical form (``"control"``, ``"A"``, ``"A+B"``) and parsing of raw labels."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    """A string or a sequence of strings as a list of non-empty strings (a ValueError naming ``name`` otherwise).

    A number (``control=0``) is refused with a hint: labels are matched as text, so an integer label column is
    matched by the string ``"0"`` (or is converted to strings first).
    """
    if isinstance(value, str):
        values = [value]
    elif isinstance(value, Iterable) and not isinstance(value, bytes):
        values = list(value)
    else:
        msg = (
            f"{name} must be a string or a list of strings, got {value!r} ({type(value).__name__}); labels are "
            f"matched as text: pass {name}={str(value)!r}, or convert the label column with .astype(str)"
        )
        raise ValueError(msg)
    if not values:
        msg = f"{name} is empty; expected a string or a non-empty list of strings"
        raise ValueError(msg)
    out = []
    for v in values:
        if not isinstance(v, str) or not v.strip():
            hint = f" (labels are matched as text: pass {str(v)!r})" if not isinstance(v, str) else ""
            msg = f"{name} must hold non-empty strings, got {v!r}{hint}"
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


def label_parser(control: str | Sequence[str], sep: str | Sequence[str], raws: Iterable[str] = ()) -> LabelParser:
    """The :class:`LabelParser` of :func:`vcell.pp.harmonize` for control label(s) ``control`` and separator(s) ``sep``.

    GEARS' ``"ctrl"`` token is dropped from combinations when ``control`` includes ``"ctrl"`` or some label of
    ``raws`` (the labels to be parsed) combines ``ctrl`` with a perturbation (``"A+ctrl"``). Every reader of raw
    labels (:func:`vcell.pp.harmonize`, :func:`vcell.bench.split`, a model's ``predict``) builds its parser here.
    """
    parser = LabelParser(_as_list(control, name="control"), _as_list(sep, name="sep"))
    parser.gears = GEARS_CTRL in parser.control or parser.detect_gears(raws)
    return parser


def ambiguous_labels_message(parsed: Iterable[ParsedLabel], *, where: str, sep: str | Sequence[str]) -> str | None:
    """The ValueError message listing the ambiguous labels among ``parsed`` (``None`` when there is none).

    ``where`` names the labels' origin (``"obs['perturbation']"``); empty labels are left out (callers count them as
    missing).
    """
    bad = [f"{p.raw!r} ({p.error})" for p in parsed if p.error is not None and p.error != "empty label"]
    if not bad:
        return None
    seps = _as_list(sep, name="sep")
    more = f", ... ({len(bad)} in all)" if len(bad) > 10 else ""
    return (
        f"ambiguous perturbation label(s) in {where}: {', '.join(bad[:10])}{more}. Expected labels like "
        f"'A' or 'A{seps[0]}B' with sep={sep!r}; rename these labels or adjust sep/control"
    )


def canonical_labels(labels: Iterable[Any], *, control: str | Sequence[str] = CONTROL, where: str) -> list[str]:
    """Canonical form of each of ``labels``, read as :func:`vcell.pp.harmonize` reads them (separator ``"+"``).

    What a model's ``predict``/``sample``, :func:`vcell.tl.predict_perturbation` and :func:`vcell.bench.split` use to
    read a condition asked for: ``"B+A"`` is ``"A+B"`` (the same prediction), ``"A+control"`` is ``"A"``, and a label
    ``harmonize`` would reject (``"A+B+"``, ``"A+A"``, ``""``) is a ValueError naming it.

    Parameters
    ----------
    labels
        Labels to read.
    control
        Control label(s); they become ``"control"``.
    where
        What the labels are, for the error message (``"perturbations"``).

    Returns
    -------
    The canonical labels, in the order of ``labels``.

    Examples
    --------
    >>> canonical_labels(["B+A", "control", " A "], where="perturbations")
    ['A+B', 'control', 'A']
    """
    raws = [str(x) for x in labels]
    parser = label_parser(control, COMBO_SEP, raws)
    parsed = [parser.parse(r) for r in raws]
    empty = [p.raw for p in parsed if p.error == "empty label"]
    if empty:
        msg = f"{where} holds an empty label ({empty[0]!r}); expected a condition such as 'A' or 'A+B'"
        raise ValueError(msg)
    msg = ambiguous_labels_message(parsed, where=where, sep=COMBO_SEP)
    if msg is not None:
        raise ValueError(msg)
    return [str(p.canonical) for p in parsed]
