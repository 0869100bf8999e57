"""Which tutorials use which public name of vcell: the "Used in tutorials" rubric of the API reference.

``docs/conf.py`` appends the rubric to each autosummary page (``generated/vcell.<sub>.<name>``) at the
``source-read`` event; ``tests/test_tutorials.py`` checks that every entry of ``docs/api.md`` is used by a tutorial
or listed there as not shown in one. A use is any mention ``vcell.<sub>.<name>`` in a tutorial's text or code
(calls, ``{func}`` roles, ``ModelSpec(..., vcell.model.CausalVAE, ...)``); a method such as
``vcell.model.Baseline.setup_anndata`` counts for its class.
"""

from __future__ import annotations

import re
from pathlib import Path

SUBPACKAGES = ("pp", "tl", "pl", "metrics", "bench", "datasets", "model", "data", "priors")
_USE = re.compile(r"\bvcell\.(" + "|".join(SUBPACKAGES) + r")\.([A-Za-z_]\w*)")


def reading_data(tutorials_dir: Path, env_var: str = "VCELL_DATA") -> list[str]:
    """The tutorials (stems, sorted) that read real files from the folder named by ``env_var``.

    A tutorial reads them when its text names the variable (``os.environ.get("VCELL_DATA", ...)``). Where that
    folder is missing (e.g. on Read the Docs, which has no ``shared/data``), ``docs/conf.py`` leaves these tutorials
    unexecuted and warns, instead of failing the whole build on their first cell.
    """
    return sorted(path.stem for path in tutorials_dir.glob("*.md") if env_var in path.read_text(encoding="utf-8"))


def tutorial_title(path: Path) -> str:
    """The first Markdown heading of a tutorial (its title), else its file name."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


def uses(tutorials_dir: Path, by_name: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """``"pp.harmonize" -> [tutorial stems, sorted]`` over the MyST notebooks in ``tutorials_dir``.

    ``by_name`` (subpackage -> names) also counts a quoted name as a use, e.g. ``{"metrics": METRICS}`` for the
    metrics that ``bench.run(metrics=["energy_distance", ...])`` and ``pl.benchmark`` take by name.
    """
    found: dict[str, set[str]] = {}
    for path in sorted(tutorials_dir.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        for sub, name in _USE.findall(text):
            found.setdefault(f"{sub}.{name}", set()).add(path.stem)
        for sub, names in (by_name or {}).items():
            for name in names:
                if re.search(rf"[\"']{re.escape(name)}[\"']", text):
                    found.setdefault(f"{sub}.{name}", set()).add(path.stem)
    return {key: sorted(stems) for key, stems in sorted(found.items())}


def rubric(qualified: str, used: dict[str, list[str]], doc_prefix: str = "/tutorials/") -> str:
    """reStructuredText of the "Used in tutorials" rubric for ``vcell.<sub>.<name>`` (empty when no tutorial uses it)."""
    parts = qualified.split(".")
    if len(parts) != 3 or parts[0] != "vcell":
        return ""
    stems = used.get(f"{parts[1]}.{parts[2]}", [])
    if not stems:
        return ""
    items = "\n".join(f"- :doc:`{doc_prefix}{stem}`" for stem in stems)
    return f"\n\n.. rubric:: Used in tutorials\n\n{items}\n"
