"""Spectra and geometry of weight matrices and their updates: how low-rank a ΔW is, and how it moves W.

:func:`singular_values`, :func:`energy_fraction`, :func:`rank_for_energy` and :func:`numerical_rank`
measure how much of a matrix lives in few directions; :func:`subspace_similarity` is the LoRA paper's
φ between the top singular directions of two matrices; :func:`magnitude_direction` is the DoRA paper's
split of a weight change into a change of row norms and a change of row directions.

Explained in: book/lora.ipynb, book/lora_in_practice.ipynb
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "energy_fraction",
    "magnitude_direction",
    "numerical_rank",
    "rank_for_energy",
    "singular_values",
    "subspace_similarity",
]


def singular_values(M: Tensor) -> Tensor:
    """σ₁ ≥ σ₂ ≥ … of a matrix, in float64.

    Explained in: book/lora.ipynb
    """
    return torch.linalg.svdvals(M.detach().double().cpu())


def energy_fraction(M: Tensor, k: int) -> float:
    """Share of ‖M‖²_F in the top ``k`` singular values: Σ_{i≤k} σ_i² / Σ_i σ_i² (1.0 for M = 0).

    By Eckart–Young, 1 − energy_fraction is the squared relative error of the best rank-k approximation.

    Explained in: book/lora.ipynb
    """
    s2 = singular_values(M).square()
    total = float(s2.sum())
    return 1.0 if total == 0 else float(s2[:k].sum()) / total


def rank_for_energy(M: Tensor, fraction: float = 0.9) -> int:
    """Smallest k whose top-k singular values hold at least ``fraction`` of ‖M‖²_F.

    Explained in: book/lora.ipynb
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    s2 = singular_values(M).square()
    if float(s2.sum()) == 0:
        return 0
    cum = torch.cumsum(s2, 0) / s2.sum()
    return int((cum < fraction - 1e-12).sum()) + 1


def numerical_rank(M: Tensor, rel_tol: float = 1e-5) -> int:
    """Number of singular values above ``rel_tol`` · σ₁ (float32 products leave ~1e-7 noise in the rest).

    Explained in: book/lora.ipynb
    """
    s = singular_values(M)
    return 0 if float(s[0]) == 0 else int((s > rel_tol * s[0]).sum())


def subspace_similarity(M1: Tensor, M2: Tensor, i: int, j: int) -> float:
    """The LoRA paper's φ(M1, M2, i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖²_F / min(i, j), in [0, 1].

    U are left singular vectors (output directions): 1 when the top-i directions of M1 and the top-j
    of M2 span nested subspaces, about max(i, j)/d for random directions in d dimensions.

    Explained in: book/lora.ipynb
    """
    U1 = torch.linalg.svd(M1.detach().double().cpu(), full_matrices=False).U[:, :i]
    U2 = torch.linalg.svd(M2.detach().double().cpu(), full_matrices=False).U[:, :j]
    return float((U1.T @ U2).square().sum()) / min(i, j)


def magnitude_direction(W0: Tensor, W: Tensor) -> tuple[float, float]:
    """The DoRA paper's ΔM and ΔD between W0 and W, per output unit i (a row of a PyTorch weight), averaged:

    ΔM = mean_i |‖W_i‖ − ‖W0_i‖|,  ΔD = mean_i (1 − cos(W_i, W0_i)).

    Explained in: book/lora_in_practice.ipynb
    """
    W0, W = W0.double(), W.double()
    dm = (W.norm(dim=1) - W0.norm(dim=1)).abs().mean()
    dd = (1 - F.cosine_similarity(W, W0, dim=1)).mean()
    return float(dm), float(dd)
