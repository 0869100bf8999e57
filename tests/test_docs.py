from __future__ import annotations

import inspect

import pytest

import vcell
from vcell._docs import doc_ax_show_save, doc_params, doc_show_save


def test_doc_params_fills_the_field_at_its_indentation():
    @doc_params(doc_show_save=doc_show_save)
    def f() -> None:
        """Plot.

        Parameters
        ----------
        x
            An input.
        {doc_show_save}
        """

    lines = f.__doc__.splitlines()
    assert "{doc_show_save}" not in f.__doc__
    i = next(k for k, line in enumerate(lines) if line.strip() == "save")
    assert lines[i] == lines[i - 2].replace("show", "save")  # same indentation as the parameter names around it
    assert lines[i + 1].strip().startswith("Path to save the figure")
    assert len(lines[i + 1]) - len(lines[i + 1].lstrip()) == len(lines[i]) - len(lines[i].lstrip()) + 4


def test_doc_params_without_the_field_raises():
    with pytest.raises(ValueError, match=r"\{doc_show_save\}"):

        @doc_params(doc_show_save=doc_show_save)
        def g() -> None:
            """No field here."""


@pytest.mark.parametrize("name", vcell.pl.__all__)
def test_public_plots_have_their_shared_parameters_filled(name: str):
    func = getattr(vcell.pl, name)
    assert inspect.isfunction(func)
    doc = inspect.cleandoc(func.__doc__)  # Python >= 3.13 strips the common indentation at compile time
    assert "{doc_" not in doc
    params = inspect.signature(func).parameters
    for line in (doc_ax_show_save if "ax" in params else doc_show_save).splitlines():
        if line and not line.startswith(" ") and line in params:  # a parameter name of the shared text
            assert f"\n{line}\n" in doc, (name, line)
