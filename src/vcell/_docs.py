"""Parameter text shared by several docstrings, filled in with :func:`doc_params` (scanpy's ``_docs`` pattern).

A docstring holds a field such as ``{doc_show_save}`` on a line of its own, indented like the parameter names
around it; ``@doc_params(doc_show_save=doc_show_save)`` replaces the field by the text, indented the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from textwrap import dedent, indent
from typing import TypeVar

_T = TypeVar("_T")

doc_show_save = """\
show
    Show the figure; ``None`` shows it only in an interactive backend when ``return_fig`` is false.
save
    Path to save the figure to (``dpi=150``, tight bounding box).
return_fig
    Return the :class:`~matplotlib.figure.Figure`."""

doc_ax_show_save = (
    """\
ax
    Axes to draw into; ``None`` creates a new figure.
"""
    + doc_show_save
)

doc_checkpoint_path = """\
checkpoint_path
    A folder for a training checkpoint after every epoch (``last.ckpt``); when it holds one, training resumes
    from it and reaches the weights of an uninterrupted run with the same seed (on CPU). Read with
    ``torch.load(weights_only=True)``: a checkpoint cannot run code. See :func:`vcell.train.fit`."""


def doc_params(**texts: str) -> Callable[[_T], _T]:
    """Fill the ``{name}`` fields of a docstring with ``texts[name]``, indented like the field.

    Raises
    ------
    ValueError
        When the docstring has no line holding just the field of one of ``texts`` (a typo in the decorator or in
        the docstring): raised at import, so the test suite catches it.
    """

    def decorate(obj: _T) -> _T:
        doc = obj.__doc__ or ""
        lines = doc.split("\n")
        for name, text in texts.items():
            field = "{" + name + "}"
            rows = [i for i, line in enumerate(lines) if line.strip() == field]
            if not rows:
                msg = f"{getattr(obj, '__qualname__', obj)!r} has no docstring line holding just {field}"
                raise ValueError(msg)
            for i in rows:
                prefix = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
                lines[i] = indent(dedent(text), prefix)
        obj.__doc__ = "\n".join(lines)
        return obj

    return decorate
