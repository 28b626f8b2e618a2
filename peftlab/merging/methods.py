"""Merging task tensors: task arithmetic, magnitude pruning, TIES, DARE (linear and TIES).

Every method takes one tensor per task (all the same shape) and one weight per task, and returns one
tensor. The results equal peft's ``merge_utils`` for the same inputs (and, for DARE, the same RNG state).

* task arithmetic  τ = Σₜ wₜ δₜ                                         (Ilharco et al. 2022)
* magnitude_prune  τ = Σₜ wₜ trim_k(δₜ)
* TIES             τ = disjoint_mean_{agree with γ}(wₜ · trim_k(δₜ)),  γ = elected sign (Yadav et al. 2023)
* DARE linear      τ = Σₜ wₜ · mₜ ⊙ δₜ / density,  mₜ ~ Bernoulli(density)    (Yu et al. 2023)
* DARE TIES        DARE's drop-and-rescale, then TIES' election and disjoint mean

Explained in: book/merging_adapters.ipynb (task arithmetic), book/ties.ipynb, book/dare.ipynb
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from peftlab.merging.prune import (_check_density, calculate_majority_sign_mask, disjoint_merge, prune,
                                   reshape_weight_task_tensors, stack_task_tensors)

Weights = torch.Tensor | Sequence[float]


def _weights(weights: Weights, stacked: torch.Tensor) -> torch.Tensor:
    """Weights as a tensor (n,) on the tasks' device. A list of floats takes the tasks' dtype (a tensor is
    used as given, as peft does)."""
    if isinstance(weights, torch.Tensor):
        w = weights.to(stacked.device)
    else:
        dtype = stacked.dtype if stacked.is_floating_point() else torch.float32
        w = torch.tensor([float(x) for x in weights], dtype=dtype, device=stacked.device)
    if w.dim() != 1 or w.shape[0] != stacked.shape[0]:
        raise ValueError(f"got {stacked.shape[0]} task tensors and {tuple(w.shape)} weights; pass one weight per task")
    return w


def _weighted(stacked: torch.Tensor, weights: Weights) -> torch.Tensor:
    return stacked * reshape_weight_task_tensors(stacked, _weights(weights, stacked))  # wₜ · Tₜ


def _check_density_positive(density: float) -> float:
    if density is None:
        raise ValueError("this merge method needs density in (0, 1]: the fraction of each task's entries to keep")
    return _check_density(density, low_inclusive=False)


def task_arithmetic(task_tensors: Sequence[torch.Tensor], weights: Weights) -> torch.Tensor:
    """Task arithmetic: τ = Σₜ wₜ δₜ (negative weights subtract a task).

    Explained in: book/merging_adapters.ipynb
    """
    stacked = stack_task_tensors(task_tensors)
    return _weighted(stacked, weights).sum(dim=0)


def magnitude_prune(task_tensors: Sequence[torch.Tensor], weights: Weights, density: float) -> torch.Tensor:
    """Trim each task tensor to its top-k magnitudes (k = int(density · n)), then τ = Σₜ wₜ trim(δₜ).

    Explained in: book/ties.ipynb
    """
    density = _check_density_positive(density)
    stack_task_tensors(task_tensors)  # validate shapes first
    trimmed = stack_task_tensors([prune(t, density, method="magnitude") for t in task_tensors])
    return _weighted(trimmed, weights).sum(dim=0)


def ties(task_tensors: Sequence[torch.Tensor], weights: Weights, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES-merging: trim each task to its top-k magnitudes, elect a sign per entry from the *unweighted*
    trimmed tensors, weight them, and average only the entries that agree with the elected sign.

    Explained in: book/ties.ipynb
    """
    density = _check_density_positive(density)
    stack_task_tensors(task_tensors)
    trimmed = stack_task_tensors([prune(t, density, method="magnitude") for t in task_tensors])  # 1. trim
    mask = calculate_majority_sign_mask(trimmed, method=majority_sign_method)  # 2. elect (unweighted)
    return disjoint_merge(_weighted(trimmed, weights), mask)  # 3. disjoint mean of wₜ · T̂ₜ


def _dare_drop(task_tensors: Sequence[torch.Tensor], density: float, rescale: bool,
               generator: torch.Generator | None) -> torch.Tensor:
    stack_task_tensors(task_tensors)
    # one Bernoulli mask per task, drawn in task order (the same RNG stream as peft)
    return stack_task_tensors([prune(t, density, method="random", rescale=rescale, generator=generator)
                               for t in task_tensors])


def dare_linear(task_tensors: Sequence[torch.Tensor], weights: Weights, density: float, *, rescale: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE then task arithmetic: drop each entry with probability p = 1 − density, rescale the survivors
    by 1/density, and sum with weights: τ = Σₜ wₜ · mₜ ⊙ δₜ / density.

    ``rescale=False`` is the paper's "DropOnly" ablation. ``generator`` seeds the masks; without it the
    global torch RNG is used, so ``torch.manual_seed(s)`` before the call reproduces peft's result.

    Explained in: book/dare.ipynb
    """
    density = _check_density_positive(density)
    dropped = _dare_drop(task_tensors, density, rescale, generator)
    return _weighted(dropped, weights).sum(dim=0)


def dare_ties(task_tensors: Sequence[torch.Tensor], weights: Weights, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total", *, rescale: bool = True,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE then TIES: random drop with rescale instead of TIES' magnitude trim, then sign election on the
    unweighted dropped tensors and the disjoint mean of the weighted ones.

    Explained in: book/dare.ipynb
    """
    density = _check_density_positive(density)
    dropped = _dare_drop(task_tensors, density, rescale, generator)
    mask = calculate_majority_sign_mask(dropped, method=majority_sign_method)
    return disjoint_merge(_weighted(dropped, weights), mask)


MERGE_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "task_arithmetic": task_arithmetic,
    "magnitude_prune": magnitude_prune,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
}
#: methods that take ``density`` / ``majority_sign_method`` / a random ``generator``
DENSITY_METHODS = ("magnitude_prune", "ties", "dare_linear", "dare_ties")
SIGN_METHODS_USING = ("ties", "dare_ties")
RANDOM_METHODS = ("dare_linear", "dare_ties")


def merge_tensors(task_tensors: Sequence[torch.Tensor], weights: Weights, method: str = "task_arithmetic",
                  density: float | None = None, majority_sign_method: Literal["total", "frequency"] = "total",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge task tensors with the method named ``method`` (one of :data:`MERGE_METHODS`).

    Explained in: book/merging_adapters.ipynb
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"method={method!r} is not a merge method; valid methods: {', '.join(MERGE_METHODS)}")
    kwargs: dict = {}
    if method in DENSITY_METHODS:
        kwargs["density"] = density
    if method in SIGN_METHODS_USING:
        kwargs["majority_sign_method"] = majority_sign_method
    if method in RANDOM_METHODS:
        kwargs["generator"] = generator
    return MERGE_METHODS[method](task_tensors, weights, **kwargs)
