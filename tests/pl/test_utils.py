from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import pytest

import vcell
from vcell.pl._utils import Plotter, is_interactive_backend


@pytest.fixture
def deltas():
    return pd.DataFrame({"g0": [1.0, 0.5], "g1": [-1.0, 0.0]}, index=["true", "pred"])


def test_agg_is_not_interactive():
    assert not is_interactive_backend()


def test_show_only_when_asked_under_agg(deltas, monkeypatch):
    calls = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: calls.append(1))
    assert vcell.pl.delta_heatmap(deltas) is None
    assert calls == []
    vcell.pl.delta_heatmap(deltas, show=True)
    assert calls == [1]


def test_show_none_in_interactive_backend(deltas, monkeypatch):
    calls = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: calls.append(1))
    monkeypatch.setattr("vcell.pl._utils.is_interactive_backend", lambda: True)
    vcell.pl.delta_heatmap(deltas)
    assert calls == [1]
    # return_fig=True returns the figure instead of showing it
    assert vcell.pl.delta_heatmap(deltas, return_fig=True) is not None
    assert calls == [1]


def test_bad_ax_and_save(deltas):
    with pytest.raises(TypeError, match="Axes"):
        Plotter(ax="not an axes")
    with pytest.raises(TypeError, match="file path"):
        vcell.pl.delta_heatmap(deltas, save=True)


def test_plotter_in_subfigure(tmp_path):
    fig = plt.figure()
    sub = fig.subfigures(1, 2)[1]
    ax = sub.subplots()
    p = Plotter(ax=ax)
    assert p.fig is fig
    out = tmp_path / "sub.png"
    assert p.finish(show=False, save=out, return_fig=True) is fig
    assert out.stat().st_size > 0
