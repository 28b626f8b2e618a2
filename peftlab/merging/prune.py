"""The building blocks of TIES and DARE: trim (by magnitude or at random), elect a sign, merge disjointly.

Each function does one step on plain tensors, with the semantics of peft's ``utils/merge_utils.py``, so
a merge built from them gives peft's numbers. A list of task tensors is stacked on dimension 0:
``T[t]`` is task ``t``'s tensor (a task vector δₜ, or one LoRA factor of adapter ``t``).

Explained in: book/ties.ipynb
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

SIGN_METHODS = ("total", "frequency")
PRUNE_METHODS = ("magnitude", "random")


def _check_density(density: float, low_inclusive: bool = True) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not math.isfinite(density):
        raise ValueError(f"density={density!r} must be a number in (0, 1]: the fraction of entries to keep")
    if density < 0 or density > 1 or (density == 0 and not low_inclusive):
        interval = "[0, 1]" if low_inclusive else "(0, 1]"
        raise ValueError(f"density={density!r} is outside {interval}: it is the fraction of entries kept "
                         "(1 keeps everything, 0.2 keeps a fifth)")
    return float(density)


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """View ``weights`` (n,) as (n, 1, 1, …) so it broadcasts over the stacked task tensors (n, …).

    Explained in: book/ties.ipynb
    """
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density · numel) entries of largest |value|, zero the rest (TIES' *trim*).

    Explained in: book/ties.ipynb
    """
    density = _check_density(density)
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())  # k = ⌊density · n⌋, as peft (int() truncates)
    top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry with probability ``density`` (m ~ Bernoulli(density)); with ``rescale``, divide the
    survivors by ``density`` so the expectation is unchanged: E[m ⊙ δ / density] = δ (DARE).

    Without ``generator`` the global torch RNG is used, exactly as peft does.

    Explained in: book/dare.ipynb
    """
    density = _check_density(density)
    if rescale and density == 0:
        raise ValueError("density=0 with rescale=True divides by zero; keep some entries (density > 0)")
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=generator)
    pruned = tensor * mask  # m ⊙ δ
    if rescale:
        pruned = pruned / density  # δ̂ = m ⊙ δ / (1 − p), with density = 1 − p
    return pruned


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Trim ``tensor`` to a fraction ``density`` of its entries by ``method`` ("magnitude" or "random").

    ``density = 1`` returns the tensor unchanged (peft warns there; here 1 is simply "keep everything").
    A density outside [0, 1] raises (peft raises below 0 and ignores values above 1).

    Explained in: book/ties.ipynb
    """
    density = _check_density(density)
    if method not in PRUNE_METHODS:
        raise ValueError(f"method={method!r}; valid methods: {', '.join(map(repr, PRUNE_METHODS))}")
    if density >= 1:
        return tensor
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    return random_pruning(tensor, density, rescale=rescale, generator=generator)


def calculate_majority_sign_mask(tensor: torch.Tensor,
                                 method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES' *elect*: the sign per entry, and which tasks agree with it. ``tensor`` is stacked (n, …).

    "total":     γ = sgn(Σₜ Tₜ)        (the sign of the total mass, the TIES paper's rule)
    "frequency": γ = sgn(Σₜ sgn(Tₜ))   (the sign most tasks have)

    A tie (sum 0) elects +1. Returns ``sgn(Tₜ) == γ`` per task; a zero entry never agrees.

    Explained in: book/ties.ipynb
    """
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method={method!r}; valid methods: {', '.join(map(repr, SIGN_METHODS))}")
    sign = tensor.sign()
    sign_magnitude = tensor.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority_sign = torch.where(sign_magnitude >= 0, 1, -1)  # γ, ties → +1
    return sign == majority_sign


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """TIES' *disjoint merge*: per entry, the mean over the tasks that agree with the elected sign,
    τ = Σ_{t∈A} Tₜ / max(|A|, 1). Entries where no task agrees become 0.

    Explained in: book/ties.ipynb
    """
    mixed = (task_tensors * majority_sign_mask).sum(dim=0)  # Σ_{t∈A} Tₜ
    count = majority_sign_mask.sum(dim=0)  # |A|
    return mixed / torch.clamp(count, min=1.0)


def stack_task_tensors(task_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack task tensors on a new dimension 0, with a clear error when there are none or shapes differ.

    Explained in: book/ties.ipynb
    """
    if isinstance(task_tensors, torch.Tensor):
        return task_tensors
    tensors = list(task_tensors)
    if not tensors:
        raise ValueError("no task tensors to merge; pass one tensor per task")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"task tensors must share one shape to be merged entry by entry; got shapes "
                         f"{[tuple(t.shape) for t in tensors]}")
    return torch.stack(tensors, dim=0)
