"""AdaLoRA layers (Zhang et al., arXiv 2303.10512): ΔW = P Λ Q in SVD form, scaled by α / r₀.

Shapes (peft's names): ``lora_A`` is Q, r × in (right singular vectors, one per row); ``lora_E`` is Λ, r × 1
(the singular values); ``lora_B`` is P, out × r (left singular vectors, one per column). Triplet i is
{P[:, i], λᵢ, Q[i, :]}. Pruning a triplet zeroes its λᵢ (during training) or drops its row and column (when
the adapter is saved): ΔW = Σᵢ λᵢ Pᵢ Qᵢ changes the same way. The scaling stays α / r₀ with r₀ = ``init_r``
(``ranknum``), so pruning changes ΔW only by the triplets removed. Λ starts at zero: a fresh adapter is the
identity while P and Q are random, so every triplet gets a gradient from the first step on λ.

Explained in: book/adalora.ipynb
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.tuners.base import AdapterLayer, fusable, linear_output, second_order_grads, watched_by_hooks

SUPPORTED_LAYERS = (nn.Linear, Conv1D, nn.Conv2d)
EPS = 1e-5  # peft divides by ranknum + 1e-5


class SVDLinearFunction(torch.autograd.Function):
    """h = x (W + s·P (λ ⊙ Q))ᵀ + b as one autograd node; x (..., in), W (out, in), Q (r, in), λ (r, 1), P (out, r).

    The updated weight W' = W + s·P(λ⊙Q) costs out·r·in, less than the two thin products over all tokens it
    replaces in the forward (and the one in ∂x), and it is reused by the backward. With g = ∂L/∂h,
    E = λ ⊙ Q, X_Q = E xᵀ (r, T) and U = Pᵀ gᵀ (r, T):
    ∂x = g W',  ∂P = s·(X_Q g)ᵀ,  ∂E = s·U x,  ∂Q = ∂E ⊙ λ,  ∂λ = Σ_j ∂E ⊙ Q  (∂W = gᵀ x only when W trains).

    Explained in: book/adalora.ipynb
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, q: torch.Tensor,
                lam: torch.Tensor, p: torch.Tensor, s: float) -> torch.Tensor:
        e = q * lam  # Λ Q, (r, in)
        updated = torch.addmm(weight, p, e, alpha=s)  # W' = W + s·P Λ Q
        out, _ = linear_output(x, updated, bias)
        ctx.save_for_backward(x, weight, bias, q, lam, p, updated, e)
        ctx.s, ctx.x_shape, ctx.has_bias = s, x.shape, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, weight, bias, q, lam, p, updated, e = ctx.saved_tensors
        s = ctx.s
        if torch.is_grad_enabled():  # create_graph=True: differentiable again (see second_order_grads)
            return (*second_order_grads(lambda x, w, b, q, lam, p: F.linear(x, w + s * p @ (q * lam), b),
                                        (x, weight, bias, q, lam, p), ctx.needs_input_grad[:6], g), None)
        x2 = x.reshape(-1, x.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        need_x, need_w, need_b, need_q, need_lam, need_p = ctx.needs_input_grad[:6]
        grad_x = torch.mm(g2, updated).view(ctx.x_shape) if need_x else None
        grad_w = torch.mm(g2.t(), x2) if need_w else None
        grad_b = g2.sum(dim=0) if need_b and ctx.has_bias else None
        grad_q = grad_lam = grad_p = None
        if need_q or need_lam:
            grad_e = torch.mm(torch.mm(p.t(), g2.t()), x2).mul_(s)  # s·Pᵀgᵀx, (r, in)
            grad_q = grad_e * lam if need_q else None
            grad_lam = (grad_e * q).sum(dim=1, keepdim=True) if need_lam else None
        if need_p:
            grad_p = torch.mm(torch.mm(e, x2.t()), g2).t().mul_(s)  # s·gᵀ x Eᵀ, (out, r)
        return grad_x, grad_w, grad_b, grad_q, grad_lam, grad_p, None


class AdaLoraLayer(AdapterLayer):
    """AdaLoRA on ``nn.Linear``, GPT-2's ``Conv1D`` and ``nn.Conv2d`` (kernel flattened into Q's columns).

    Explained in: book/adalora.ipynb
    """

    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum")

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 12, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights: bool = True, **_: Any) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        if not isinstance(base, SUPPORTED_LAYERS):
            raise ValueError(f"AdaLoRA wraps nn.Linear, Conv1D or nn.Conv2d, not {type(base).__name__}")
        self.lora_A, self.lora_E, self.lora_B = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        #: r₀ (init_r), kept through pruning and resizing; peft's ``ranknum`` (a frozen tensor there)
        self.ranknum: dict[str, float] = {}
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights)
        self.set_adapter([adapter_name])

    @property
    def q_columns(self) -> int:
        """Columns of Q: in_features, times the kernel's elements on a convolution."""
        base = self.get_base_layer()
        k = base.kernel_size[0] * base.kernel_size[1] if isinstance(base, nn.Conv2d) else 1
        return self.in_features * k

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: bool = True, **_: Any) -> None:
        """Create P, Λ, Q of ``adapter_name`` with ``r`` triplets (r = 0 allowed: a module pruned to nothing).

        Explained in: book/adalora.ipynb
        """
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"r={r!r} for adapter {adapter_name!r}: the rank must be an integer >= 0")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)
        self.ranknum[adapter_name] = float(r)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # peft's order of draws (so one seed gives the same adapter): Q, Λ, P, ranknum's placeholder, then
        # the initialisation proper
        q, lam, p = torch.randn(r, self.q_columns), torch.randn(r, 1), torch.randn(self.out_features, r)
        torch.randn(1)
        if init_lora_weights:
            nn.init.zeros_(lam)
            nn.init.normal_(q, mean=0.0, std=0.02)
            nn.init.normal_(p, mean=0.0, std=0.02)
        self._set_triplets(adapter_name, q, lam, p)
        self._record_adapter(adapter_name)

    def _set_triplets(self, adapter_name: str, q: torch.Tensor, lam: torch.Tensor, p: torch.Tensor) -> None:
        kw = self._new_tensor_kwargs()
        trainable = adapter_name in self._active_adapters and (
            adapter_name not in self.lora_A or self.lora_A[adapter_name].requires_grad)
        for attr, t in (("lora_A", q), ("lora_E", lam), ("lora_B", p)):
            getattr(self, attr)[adapter_name] = nn.Parameter(t.to(**kw), requires_grad=trainable)
        self.r[adapter_name] = q.shape[0]

    def resize(self, adapter_name: str, keep: torch.Tensor) -> None:
        """Keep only the triplets where ``keep`` (bool, r) is True: P's columns, Λ's and Q's rows. The scaling
        α / r₀ is unchanged, so ΔW changes only by the triplets dropped (nothing if their λ was already 0).

        Explained in: book/adalora.ipynb
        """
        keep = torch.as_tensor(keep, dtype=torch.bool).view(-1).to(self.lora_E[adapter_name].device)
        if keep.numel() != self.r[adapter_name]:
            raise ValueError(f"a rank pattern of {keep.numel()} triplets for a module with r={self.r[adapter_name]}; "
                             "the adapter was saved from a model with another init_r")
        with torch.no_grad():
            q = self.lora_A[adapter_name][keep].clone()
            lam = self.lora_E[adapter_name][keep].clone()
            p = self.lora_B[adapter_name][:, keep].clone()
        self._set_triplets(adapter_name, q, lam, p)

    # ---- ΔW -------------------------------------------------------------------------------------
    def factor(self, adapter_name: str) -> float:
        """The scaling α / (r₀ + 1e-5) that multiplies P Λ Q (peft's ``scaling / (ranknum + 1e-5)``)."""
        denom = np.float32(self.ranknum[adapter_name]) + np.float32(EPS)  # peft's ranknum is a float32 tensor
        return self.scaling[adapter_name] / float(denom)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW = α/r₀ · P (Λ ⊙ Q), shaped like the base weight.

        Explained in: book/adalora.ipynb
        """
        p, lam, q = self.lora_B[adapter_name], self.lora_E[adapter_name], self.lora_A[adapter_name]
        delta = (p @ (q * lam)) * self.factor(adapter_name)
        if self.fan_in_fan_out:
            return delta.T
        return delta.reshape(self.get_base_layer().weight.shape)

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """scaling = scale · α: weight one adapter at run time."""
        if adapter_name in self.lora_alpha:
            self.scaling[adapter_name] = scale * self.lora_alpha[adapter_name]

    # ---- forward --------------------------------------------------------------------------------
    def _fused(self, x: torch.Tensor, name: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """Training one adapter on a plain nn.Linear without dropout: one autograd node
        (:class:`SVDLinearFunction`); else None."""
        base = self._modules["base_layer"]
        if type(base) is not nn.Linear or watched_by_hooks(base) or args or kwargs:
            return None
        if not isinstance(self.lora_dropout[name], nn.Identity):
            return None
        w, q = base._parameters["weight"], self.lora_A[name]
        if not fusable(x, w, q):
            return None
        return SVDLinearFunction.apply(x, w, base._parameters["bias"], q, self.lora_E[name], self.lora_B[name],
                                       self.factor(name))

    def adapter_forward(self, x: torch.Tensor, adapters: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """h = W₀x + α/r₀ · P (Λ ⊙ Q) dropout(x): two thin products, never the out × in matrix (Linear, Conv1D)."""
        if len(adapters) == 1 and torch.is_grad_enabled():
            fused = self._fused(x, adapters[0], args, kwargs)
            if fused is not None:
                return fused
        result = self.base_layer(x, *args, **kwargs)
        conv = isinstance(self.get_base_layer(), nn.Conv2d)
        for name in adapters:
            q, lam, p = self.lora_A[name], self.lora_E[name], self.lora_B[name]
            xd = self.lora_dropout[name](x.to(q.dtype))
            if conv:
                delta = self.get_base_layer()._conv_forward(xd, self.get_delta_weight(name), None)
                result = result + delta.to(result.dtype)
            else:
                delta = F.linear(F.linear(xd, q * lam), p)  # x Qᵀ Λ Pᵀ
                result = torch.add(result, delta.to(result.dtype), alpha=self.factor(name))
        return result

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"
