"""Base class of vcell's pure-torch modules."""

from __future__ import annotations

from typing import Any

from torch import nn


class VCellModule(nn.Module):
    """A torch module that scvi-tools' ``BaseModelClass.save``/``load`` can restore.

    Subclasses take a dict of tensors keyed by ``REGISTRY_KEYS`` in ``forward`` (and, for learned models,
    provide ``loss``). No AnnData here.
    """

    def on_load(self, model: Any, **kwargs: Any) -> None:
        """Hook called by scvi-tools after loading a saved model (nothing to do by default)."""
