"""Low-rank adapters (LoRA) and row-wise trainable parameters for fine-tuning a trained module (pure torch).

Fine-tuning on a new dataset with few cells keeps every trained weight frozen and learns

- a low-rank update ``W + (alpha / rank) B A`` of chosen linear layers (:class:`LoRALinear`; ``B`` starts at zero,
  so the adapted module starts exactly where the trained one is), and
- new rows of parameter tables (embeddings of new cell types, operators of new perturbations) while the trained
  rows stay fixed (:func:`train_rows`, a :mod:`torch.nn.utils.parametrize` parametrization).

After training, :func:`merge_lora` and :func:`merge_rows` fold both back into plain :class:`torch.nn.Linear` layers
and plain parameters, so the adapted module has the same structure (and state-dict keys) as one built from scratch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize


class LoRALinear(nn.Module):
    """A frozen :class:`torch.nn.Linear` plus a trainable low-rank update: ``y = base(x) + s x A^T B^T``.

    ``A`` (``rank x in_features``) is drawn like a linear layer's weight (Kaiming-uniform), ``B``
    (``out_features x rank``) starts at zero, and ``s = alpha / rank``; so a new adapter computes exactly
    what ``base`` computes. ``base``'s weight and bias are set to ``requires_grad=False``.

    Parameters
    ----------
    base
        The trained layer (wrapped, not copied).
    rank
        Rank of the update (>= 1).
    alpha
        Scale numerator; ``None`` uses ``rank`` (``s = 1``).
    generator
        Random generator for ``A`` (``None``: torch's global one).

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(5, 3)
    >>> lora = LoRALinear(lin, rank=2)
    >>> x = torch.randn(4, 5)
    >>> torch.equal(lora(x), lin(x))
    True
    >>> [name for name, p in lora.named_parameters() if p.requires_grad]
    ['lora_A', 'lora_B']
    """

    def __init__(
        self, base: nn.Linear, rank: int = 4, alpha: float | None = None, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            msg = f"LoRALinear wraps a torch.nn.Linear, got {type(base).__name__}"
            raise TypeError(msg)
        if int(rank) < 1:
            msg = f"rank must be a positive integer, got {rank!r}"
            raise ValueError(msg)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(self.rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        w = base.weight
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear draws its weight
        a = torch.empty(self.rank, base.in_features, dtype=w.dtype)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.rank, dtype=w.dtype, device=w.device))

    @property
    def in_features(self) -> int:
        """Input size of the wrapped layer."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """Output size of the wrapped layer."""
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update ``s B A`` of the weight (``out_features x in_features``)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank term ``s (x A^T) B^T`` alone (what the adapter adds to ``base(x)``)."""
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + s (x A^T) B^T``."""
        return self.base(x) + self.update(x)

    def merged(self) -> nn.Linear:
        """A plain :class:`torch.nn.Linear` with weight ``W + s B A`` and ``base``'s bias (trainable again)."""
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.base.bias is not None,
            device=self.base.weight.device,
            dtype=self.base.weight.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(self.base.weight + self.delta_weight())
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, child)


def inject_lora(
    module: nn.Module,
    rank: int = 4,
    *,
    target: Sequence[str] = ("encoder", "decoder"),
    alpha: float | None = None,
    seed: int | None = None,
) -> list[str]:
    """Replace every :class:`torch.nn.Linear` inside the ``target`` submodules of ``module`` by a :class:`LoRALinear`.

    Only the wrapped layers' weights are frozen here; freezing the rest of ``module`` is the caller's choice.

    Parameters
    ----------
    module
        The module to adapt (changed in place).
    rank
        Rank of each update.
    target
        Names of submodules (as in ``module.named_modules()``, e.g. ``"encoder"``); every linear layer inside them
        (at any depth) gets an adapter, and a target that is itself a linear layer is wrapped too.
    alpha
        Scale numerator (``None``: ``rank``).
    seed
        Seed of the adapters' ``A`` matrices (``None``: torch's global generator).

    Returns
    -------
    Names of the wrapped layers, in ``named_modules`` order.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.ModuleDict({"encoder": torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())})
    >>> inject_lora(net, rank=2, target=["encoder"])
    ['encoder.0']
    """
    names = dict(module.named_modules())
    missing = [t for t in target if t not in names or t == ""]
    if missing:
        known = [n for n, _ in module.named_children()]
        msg = f"LoRA target(s) {missing} are not submodules of {type(module).__name__}; its children: {known}"
        raise ValueError(msg)
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    wrapped: list[str] = []
    adapters = [n for n, m in module.named_modules() if isinstance(m, LoRALinear)]
    for name, sub in list(module.named_modules()):
        inside = any(name == t or name.startswith(f"{t}.") for t in target)
        in_adapter = any(name.startswith(f"{a}.") for a in adapters)  # an adapter's own base layer
        if inside and not in_adapter and type(sub) is nn.Linear:
            _set_child(module, name, LoRALinear(sub, rank, alpha, generator=generator))
            wrapped.append(name)
    if not wrapped:
        msg = f"no torch.nn.Linear layer inside the LoRA target(s) {list(target)}"
        raise ValueError(msg)
    return wrapped


def merge_lora(module: nn.Module) -> list[str]:
    """Replace every :class:`LoRALinear` in ``module`` by its merged :class:`torch.nn.Linear` (in place).

    Parameters
    ----------
    module
        A module with adapters from :func:`inject_lora`.

    Returns
    -------
    Names of the merged layers.
    """
    merged = []
    for name, sub in list(module.named_modules()):
        if isinstance(sub, LoRALinear):
            _set_child(module, name, sub.merged())
            merged.append(name)
    return merged


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapters' ``A`` and ``B`` matrices of every :class:`LoRALinear` in ``module``.

    Parameters
    ----------
    module
        A module with adapters from :func:`inject_lora`.
    """
    return [p for sub in module.modules() if isinstance(sub, LoRALinear) for p in (sub.lora_A, sub.lora_B)]


class TrainableRows(nn.Module):
    """Parametrization replacing rows ``rows`` (along the first axis) of a frozen tensor by trainable values.

    Parameters
    ----------
    original
        The tensor being parametrized (its current values of ``rows`` are the starting values).
    rows
        Indices of the trainable rows.
    """

    def __init__(self, original: torch.Tensor, rows: torch.Tensor) -> None:
        super().__init__()
        rows = torch.as_tensor(rows, dtype=torch.long, device=original.device).reshape(-1)
        self.register_buffer("rows", rows)
        self.values = nn.Parameter(original.detach()[rows].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with its ``rows`` replaced by the trainable values."""
        return x.index_put((self.rows,), self.values)


def train_rows(owner: nn.Module, name: str, rows: Sequence[int] | torch.Tensor) -> nn.Parameter:
    """Make only ``rows`` of the parameter ``owner.<name>`` trainable; the other rows stay bitwise fixed.

    The parameter is frozen (``requires_grad=False``) and parametrized by :class:`TrainableRows`; the returned
    parameter (the trainable rows) is what an optimizer updates. :func:`merge_rows` writes them back.

    Parameters
    ----------
    owner
        Module holding the parameter (e.g. an :class:`torch.nn.Embedding` and ``"weight"``).
    name
        Attribute name of the parameter.
    rows
        Indices along the first axis.

    Returns
    -------
    The trainable rows, shape ``(len(rows), *param.shape[1:])``.

    Examples
    --------
    >>> import torch
    >>> emb = torch.nn.Embedding(3, 2)
    >>> new = train_rows(emb, "weight", [2])
    >>> tuple(new.shape)
    (1, 2)
    """
    param = getattr(owner, name)
    if not isinstance(param, nn.Parameter):
        msg = f"{type(owner).__name__}.{name} is not a parameter"
        raise ValueError(msg)
    param.requires_grad_(False)
    rows_t = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if rows_t.numel() and (int(rows_t.min()) < 0 or int(rows_t.max()) >= param.shape[0]):
        msg = f"rows out of range for {name} with {param.shape[0]} rows"
        raise ValueError(msg)
    par = TrainableRows(param, rows_t)
    parametrize.register_parametrization(owner, name, par, unsafe=True)
    return par.values


def merge_rows(module: nn.Module) -> list[str]:
    """Write the trainable rows of every :func:`train_rows` parametrization in ``module`` back into plain parameters.

    Parameters
    ----------
    module
        A module (searched recursively).

    Returns
    -------
    Qualified names of the merged parameters.
    """
    merged = []
    for mod_name, sub in list(module.named_modules()):
        if not parametrize.is_parametrized(sub):
            continue
        for name in list(sub.parametrizations.keys()):
            if all(isinstance(p, TrainableRows) for p in sub.parametrizations[name]):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
                merged.append(f"{mod_name}.{name}" if mod_name else name)
    return merged
