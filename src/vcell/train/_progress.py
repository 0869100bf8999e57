"""Lightning progress bars that show short metric names; the logged keys stay as they are."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

#: longest metric name a vcell progress bar shows: ``"name: value"`` pieces stay whole in a narrow
#: (80-column) terminal or notebook cell, where Lightning's bars cut longer names (``val_counterfactu…``)
MAX_SHOWN_NAME = 12

#: word abbreviations of the names shown (``val_counterfactual_mse`` -> ``val_cf_mse``)
_WORDS = {
    "counterfactual": "cf",
    "reconstruction": "rec",
    "adversarial": "adv",
    "adversary": "adv",
    "perturbation": "pert",
    "prediction": "pred",
    "accuracy": "acc",
    "effective": "eff",
    "protein": "prot",
    "transition": "trans",
    "kl_divergence": "kl",
}


def shown_name(key: str, max_len: int = MAX_SHOWN_NAME) -> str:
    """Short name of a logged metric for a progress bar (at most ``max_len`` characters).

    Known words are abbreviated (:data:`_WORDS`); a name still too long keeps its first word (``train``/``val``) and
    last word and the initials of the words between; then it is cut.

    Parameters
    ----------
    key
        The logged metric key, e.g. ``"val_counterfactual_mse"``.
    max_len
        Longest name returned.
    """
    name = key
    for word, short in _WORDS.items():
        name = name.replace(word, short)
    if len(name) > max_len:
        parts = name.split("_")
        if len(parts) > 2:
            name = "_".join([parts[0], *(p[:1] for p in parts[1:-1] if p), parts[-1]])
    return name[:max_len]


def shown_metrics(metrics: dict[str, Any], max_len: int = MAX_SHOWN_NAME) -> dict[str, Any]:
    """``metrics`` keyed by :func:`shown_name`; a name shared by two keys gets a numeric suffix."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = shown_name(str(key), max_len)
        k = 2
        while name in out:
            suffix = str(k)
            name = shown_name(str(key), max_len - len(suffix)) + suffix
            k += 1
        out[name] = value
    return out


class ShortNamesRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar, showing :func:`shown_name` of each metric."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """Lightning's progress-bar metrics under short names (``trainer.callback_metrics`` keeps the full keys)."""
        return shown_metrics(super().get_metrics(trainer, pl_module))


class ShortNamesTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, showing :func:`shown_name` of each metric."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """Lightning's progress-bar metrics under short names (``trainer.callback_metrics`` keeps the full keys)."""
        return shown_metrics(super().get_metrics(trainer, pl_module))


def progress_bar() -> RichProgressBar | TQDMProgressBar:
    """The progress bar Lightning would pick (rich when installed, else tqdm), with short metric names."""
    try:
        from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
    except ImportError:  # lightning < 2.5 has no rich default: its bar is tqdm
        _RICH_AVAILABLE = False
    return ShortNamesRichProgressBar() if _RICH_AVAILABLE else ShortNamesTQDMProgressBar()
