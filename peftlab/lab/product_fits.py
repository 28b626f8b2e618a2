"""Fitting a target update ΔW* with one adapter's parametrisation (LoRA's BA, LoHa's Hadamard product of two
low-rank pairs, LoKr's Kronecker product), by gradient descent: what a budget of parameters can express.

:func:`fit` fits the bare products (torch operators, random factors); :func:`fit_layer` fits the ΔW of a library
adapter layer (``get_delta_weight``); :func:`best_rank_error` is the Eckart–Young floor of any rank-k fit.

Explained in: book/products.ipynb, book/loha_lokr.ipynb
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from peftlab.lab import spectra

__all__ = ["METHODS", "Fit", "best_rank_error", "fit", "fit_layer", "n_parameters"]

#: The parametrisations :func:`fit` knows, with what ``r`` means for each.
METHODS: dict[str, str] = {"lora": "ΔW = B A, rank r", "loha": "ΔW = (B₁A₁) ⊙ (B₂A₂), each pair rank r",
                           "lokr": "ΔW = C ⊗ D, C of shape r × r (r must divide both sides)"}


class Fit(NamedTuple):
    """One fit: the final relative error, the numerical rank of ΔW (σ > 1e-3 σ₁), the error at every step."""

    error: float
    rank: int
    curve: list[float]


def _factors(method: str, m: int, n: int, r: int, param: Callable[..., torch.nn.Parameter]
             ) -> tuple[list[torch.nn.Parameter], Callable[[], Tensor]]:
    if method == "lora":
        B, A = param(m, r), param(r, n)
        return [B, A], lambda: B @ A                                    # r(m + n)
    if method == "loha":
        B1, A1, B2, A2 = param(m, r), param(r, n), param(m, r), param(r, n)
        return [B1, A1, B2, A2], lambda: (B1 @ A1) * (B2 @ A2)        # 2r(m + n)
    C, D = param(r, r), param(m // r, n // r)
    return [C, D], lambda: torch.kron(C, D)                             # r² + (m/r)(n/r)


def _check(method: str, shape: tuple[int, int], r: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {sorted(METHODS)}")
    if r < 1:
        raise ValueError(f"r must be at least 1, got {r}")
    if method == "lokr" and (shape[0] % r or shape[1] % r):
        raise ValueError(f"LoKr's factor C is r × r: r={r} must divide both sides of the {shape[0]} × {shape[1]} "
                         f"target (try a divisor such as {next(d for d in (8, 4, 2, 1) if not shape[0] % d and not shape[1] % d)})")


def n_parameters(method: str, shape: tuple[int, int], r: int) -> int:
    """Trainable parameters of ``method`` at ``r`` for an m × n ΔW: r(m+n), 2r(m+n) or r² + (m/r)(n/r).

    Explained in: book/products.ipynb
    """
    _check(method, shape, r)
    m, n = shape
    return {"lora": r * (m + n), "loha": 2 * r * (m + n), "lokr": r * r + (m // r) * (n // r)}[method]


def fit(target: Tensor, method: str, r: int, steps: int, seed: int = 0, lr: float = 1e-2,
        init_std: float = 0.5) -> Fit:
    """Fit ``target`` (m × n) with ``method``'s ΔW at ``r``: Adam on ‖ΔW − ΔW*‖_F / ‖ΔW*‖_F, lr cosine-annealed to 0.

    Every factor starts Gaussian (std ``init_std``, seeded): this is about what the parametrisation can reach, not
    about an adapter's no-op start.

    Explained in: book/products.ipynb
    """
    _check(method, tuple(target.shape), r)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    g = torch.Generator().manual_seed(seed)

    def param(*shape: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(init_std * torch.randn(*shape, generator=g))

    def rel_err(W: Tensor) -> Tensor:
        return torch.linalg.matrix_norm(W - target) / torch.linalg.matrix_norm(target)

    params, delta = _factors(method, *target.shape, r, param)
    opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)  # lr → 0: settles at the end
    curve = []
    for _ in range(steps):
        loss = rel_err(delta())
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        curve.append(loss.item())
    with torch.no_grad():
        W = delta()
        return Fit(float(rel_err(W)), spectra.numerical_rank(W, rel_tol=1e-3), curve)


def fit_layer(layer: nn.Module, target: Tensor, steps: int, lr: float = 1e-2,
              adapter_name: str = "a") -> dict[str, float]:
    """Fit an adapter layer's ΔW (``get_delta_weight``) to ``target``: Adam on ‖ΔW − ΔW*‖_F / ‖ΔW*‖_F.

    Trains every parameter outside ``base_layer``; returns the final ``error``, the numerical ``rank`` of ΔW
    (σ > 1e-3 σ₁) and the number of ``parameters`` trained.

    Explained in: book/loha_lokr.ipynb
    """
    if not hasattr(layer, "get_delta_weight"):
        raise TypeError(f"fit_layer needs an adapter layer with get_delta_weight (LoraLinear, LoHaLayer, "
                        f"LoKrLayer, ...); got {type(layer).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    params = [p for n, p in layer.named_parameters() if "base_layer" not in n]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = (layer.get_delta_weight(adapter_name) - target).norm() / target.norm()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        delta = layer.get_delta_weight(adapter_name)
        return {"error": float((delta - target).norm() / target.norm()),
                "rank": spectra.numerical_rank(delta, rel_tol=1e-3),
                "parameters": len(torch.cat([p.flatten() for p in params]))}


def best_rank_error(target: Tensor, k: int) -> float:
    """The smallest ‖W − ΔW*‖_F / ‖ΔW*‖_F of any rank-k W (Eckart–Young: drop all but the k largest σ).

    Explained in: book/loha_lokr.ipynb
    """
    return math.sqrt(max(0.0, 1.0 - spectra.energy_fraction(target, k)))
