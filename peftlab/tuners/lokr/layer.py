"""LoKr layers (LyCORIS, arXiv 2309.14859; KronA, arXiv 2212.10650): ΔW = (α/r)·W1 ⊗ W2.

The weight's (out, in) is split as out = a·b and in = c·d (:func:`factorization`); W1 is (a, c) and W2 is
(b, d), so W1 ⊗ W2 is (out, in) and rank(W1 ⊗ W2) = rank(W1)·rank(W2). peft's tensors:

* W1: ``lokr_w1`` (a, c), or ``lokr_w1_a`` (a, r) @ ``lokr_w1_b`` (r, c) when ``decompose_both`` and
  r < max(a, c)/2;
* W2: ``lokr_w2`` (b, d), or ``lokr_w2_a`` (b, r) @ ``lokr_w2_b`` (r, d) when r < max(b, d)/2. On a
  convolution W2 carries the kernel: ``lokr_w2`` (b, d, *kernel), the flat ``lokr_w2_b`` (r, d·kernel), or
  with ``use_effective_conv2d`` a CP kernel from ``lokr_t2`` (r, r, kh, kw), ``lokr_w2_a`` (r, b),
  ``lokr_w2_b`` (r, d).

So which tensors one adapter owns depends on its r and the layer's sizes: two adapters in one layer may have
different containers (the layer's adapter record, not its containers, says which adapters it holds).

Explained in: book/loha_lokr.ipynb
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftlab.tuners.lycoris import LycorisLayer, cp_weight, kaiming_


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` = m·n as peft does: (factor, dimension/factor) when ``factor`` divides it, else the
    divisor pair (m ≤ n) nearest the square root, with m ≤ ``factor`` when a factor is given.

    ``factorization(256) == (16, 16)``, ``factorization(128) == (8, 16)``, ``factorization(127) == (1, 127)``,
    ``factorization(128, 4) == (4, 32)``. peftlab's config only passes -1 or a factor that divides.

    Explained in: book/loha_lokr.ipynb
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:  # walk up the divisors while m + n shrinks (it does until m passes √dimension)
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrLayer(LycorisLayer):
    """LoKr on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

    Explained in: book/loha_lokr.ipynb
    """

    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    other_param_names = (*LycorisLayer.other_param_names, "rank_dropout_scale")

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 8, alpha: float = 8,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, init_weights: bool | str = True,
                 use_effective_conv2d: bool = False, decompose_both: bool = False, decompose_factor: int = -1,
                 rank_dropout_scale: bool = False, **_: Any) -> None:
        super().__init__(base_layer)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        self.rank_dropout_scale: dict[str, bool] = {}
        self.update_layer(adapter_name, r, alpha, rank_dropout, module_dropout, init_weights, use_effective_conv2d,
                          decompose_both, decompose_factor, rank_dropout_scale)
        self.set_adapter([adapter_name])

    def kron_shape(self, decompose_factor: int = -1) -> tuple[tuple[int, int], tuple[int, int]]:
        """((a, b), (c, d)) with out = a·b and in/groups = c·d: W1 is (a, c), W2 is (b, d)."""
        out = self.weight_shape[0]
        for size, what in ((self.in_per_group, "in"), (out, "out")):
            if decompose_factor != -1 and size % decompose_factor:
                raise ValueError(
                    f"decompose_factor={decompose_factor} does not divide this layer's {what} size {size} "
                    f"(weight {tuple(self.weight_shape)}); use decompose_factor=-1 or a common divisor of its in and "
                    "out sizes, or leave the layer out of target_modules"
                )
        return factorization(out, decompose_factor), factorization(self.in_per_group, decompose_factor)

    def update_layer(self, adapter_name: str, r: int, alpha: float, rank_dropout: float = 0.0,
                     module_dropout: float = 0.0, init_weights: bool | str = True, use_effective_conv2d: bool = False,
                     decompose_both: bool = False, decompose_factor: int = -1, rank_dropout_scale: bool = False,
                     **_: Any) -> None:
        """Create W1 (whole or factored) and W2 (whole, factored, or CP) of ``adapter_name``, as peft lays them out.

        Explained in: book/loha_lokr.ipynb
        """
        (a, b), (c, d) = self.kron_shape(decompose_factor)  # check before anything changes
        self._set_hyperparameters(adapter_name, r, alpha, rank_dropout, module_dropout)
        self.rank_dropout_scale[adapter_name] = bool(rank_dropout_scale)
        for name in self.adapter_layer_names:  # a re-added adapter may take another layout
            if adapter_name in getattr(self, name):
                del getattr(self, name)[adapter_name]
        full_w1 = not (decompose_both and r < max(a, c) / 2)
        full_w2 = not r < max(b, d) / 2
        effective = self.uses_effective_conv(use_effective_conv2d)
        kernel = self.kernel_size
        t = self._init_tensor
        w: dict[str, torch.Tensor] = {}
        if full_w1:
            w["lokr_w1"] = t(a, c)
        else:
            w["lokr_w1_a"], w["lokr_w1_b"] = t(a, r), t(r, c)
        if full_w2:
            w["lokr_w2"] = t(b, d, *kernel)
        elif effective:
            core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"] = t(*core), t(r, b), t(r, d)
        else:
            n = d
            for k in kernel:
                n *= k
            w["lokr_w2_a"], w["lokr_w2_b"] = t(b, r), t(r, n)  # the kernel is flattened into W2's columns
        # peft's order of draws: W1's tensors, W2's, then the core
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[
            init_weights if isinstance(init_weights, str) else bool(init_weights)]
        for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"):
            if name in w:
                nn.init.zeros_(w[name]) if name in zero else kaiming_(w[name])
        for name, tensor in w.items():
            getattr(self, name)[adapter_name] = self._as_parameter(tensor)
        self._record_adapter(adapter_name)

    def _rescale_rank_dropout(self, adapter_name: str) -> bool:
        return self.rank_dropout_scale[adapter_name]

    def make_delta(self, adapter_name: str) -> torch.Tensor:
        """W1 ⊗ W2 (torch.kron); on a convolution W2 carries the kernel and W1 is broadcast over it.

        Explained in: book/loha_lokr.ipynb
        """
        if adapter_name in self.lokr_w1:
            w1 = self.lokr_w1[adapter_name]
        else:
            w1 = self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]  # (a, c), rank ≤ r
        if adapter_name in self.lokr_w2:
            w2 = self.lokr_w2[adapter_name]
        elif adapter_name in self.lokr_t2:
            w2 = cp_weight(self.lokr_t2[adapter_name], self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name])
            # einsum may hand back odd strides on a size-1 dim (Conv1d's (b, d, k, 1)), which torch.kron's
            # internal view rejects (peft 0.21.2 fails there); give it the plain row-major layout
            w2 = w2.reshape(-1).view(w2.shape)
        else:
            w2 = self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]  # (b, d·kernel), rank ≤ r
        if w2.dim() == 4:  # (b, d, kh, kw): W1 as (a, c, 1, 1), so kron keeps the kernel in W2's trailing dims
            w1 = w1[:, :, None, None]
        # A whole Conv1d W2 (b, d, k) meets a 2-D W1: torch.kron pads W1 to (1, a, c), and peft reshapes the
        # (b, a·d, c·k) result to (a·b, c·d, k). Not a Kronecker layout of the kernel, but it is what the files
        # mean, so peftlab computes the same.
        return torch.kron(w1, w2)  # W1 ⊗ W2
