"""LoHa layers (FedPara, arXiv 2108.06098, as packaged by LyCORIS): ΔW = (α/r)·(W1a W1b) ⊙ (W2a W2b).

Shapes (peft's names): ``hada_w1_a``, ``hada_w2_a`` are (out, r); ``hada_w1_b``, ``hada_w2_b`` are (r, in),
with ``in`` = in_channels/groups × kernel elements on a convolution. Each product has rank ≤ r, so the
Hadamard product has rank ≤ r² from 2r(out + in) parameters (LoRA of the same size reaches 2r).
With ``use_effective_conv2d`` on a k×k convolution, each product is instead a CP kernel built from a core
``hada_t1``/``hada_t2`` (r, r, k, k) and factors ``hada_w*_a`` (r, out), ``hada_w*_b`` (r, in).

Explained in: book/loha_lokr.ipynb
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.tuners.base import fusable, linear_output, second_order_grads, watched_by_hooks
from peftlab.tuners.lycoris import LycorisLayer, cp_weight, kaiming_


class LoHaLinearFunction(torch.autograd.Function):
    """h = x (W + s·(W1a W1b) ⊙ (W2a W2b))ᵀ + b as one autograd node; x (..., in), W (out, in).

    Backward, with g = ∂L/∂h, P1 = W1a W1b, P2 = W2a W2b and G = s·gᵀx (out, in):
    ∂x = g W', ∂W1a = (G ⊙ P2) W1bᵀ, ∂W1b = W1aᵀ (G ⊙ P2), ∂W2a = (G ⊙ P1) W2bᵀ, ∂W2b = W2aᵀ (G ⊙ P1).
    One node and two (out, in) temporaries instead of the ~8 nodes and their buffers autograd records.

    Explained in: book/loha_lokr.ipynb
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w1a: torch.Tensor,
                w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, s: float) -> torch.Tensor:
        p1, p2 = w1a @ w1b, w2a @ w2b
        updated = torch.addcmul(weight, p1, p2, value=s)  # W' = W + s·P1 ⊙ P2
        out, _ = linear_output(x, updated, bias)
        ctx.save_for_backward(x, updated, w1a, w1b, w2a, w2b, p1, p2, weight, bias)
        ctx.s, ctx.has_bias = s, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, updated, w1a, w1b, w2a, w2b, p1, p2, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable again (see second_order_grads)
            s = ctx.s
            return (*second_order_grads(
                lambda x, w, b, w1a, w1b, w2a, w2b: F.linear(x, w + s * (w1a @ w1b) * (w2a @ w2b), b),
                (x, weight, bias, w1a, w1b, w2a, w2b), ctx.needs_input_grad[:7], g), None)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = torch.mm(g2, updated).view(x.shape) if need_x else None
        gw = torch.mm(g2.t(), x2)  # gᵀx = ∂L/∂W', (out, in)
        grad_w = gw.clone() if need_w else None
        grad_b = g2.sum(0) if need_b and ctx.has_bias else None
        gw.mul_(ctx.s)
        g1 = gw * p2  # ∂L/∂P1
        gw.mul_(p1)  # ∂L/∂P2, in place
        return (grad_x, grad_w, grad_b, g1 @ w1b.t(), w1a.t() @ g1, gw @ w2b.t(), w2a.t() @ gw, None)


class LoHaLayer(LycorisLayer):
    """LoHa on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

    Explained in: book/loha_lokr.ipynb
    """

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 8, alpha: float = 8,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, init_weights: bool = True,
                 use_effective_conv2d: bool = False, **_: Any) -> None:
        super().__init__(base_layer)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        self.update_layer(adapter_name, r, alpha, rank_dropout, module_dropout, init_weights, use_effective_conv2d)
        self.set_adapter([adapter_name])

    def update_layer(self, adapter_name: str, r: int, alpha: float, rank_dropout: float = 0.0,
                     module_dropout: float = 0.0, init_weights: bool = True, use_effective_conv2d: bool = False,
                     **_: Any) -> None:
        """Create the four factors (and the two cores on an effective conv) of ``adapter_name``.

        Explained in: book/loha_lokr.ipynb
        """
        self._set_hyperparameters(adapter_name, r, alpha, rank_dropout, module_dropout)
        for name in self.adapter_layer_names:  # a re-added adapter may change form (flat or effective)
            if adapter_name in getattr(self, name):
                del getattr(self, name)[adapter_name]
        out = self.weight_shape[0]
        t = self._init_tensor
        if self.uses_effective_conv(use_effective_conv2d):
            core = (r, r, *self.kernel_size) if len(self.kernel_size) == 2 else (r, r, self.kernel_size[0], 1)
            w1a, w1b, w2a, w2b = t(r, out), t(r, self.in_per_group), t(r, out), t(r, self.in_per_group)
            cores = (t(*core), t(*core))
        else:
            n_out, n_in = self.flat_shape  # (out, in/groups · kernel)
            w1a, w1b, w2a, w2b = t(n_out, r), t(r, n_in), t(n_out, r), t(r, n_in)
            cores = ()
        # peft's order of draws: w1a, w1b, w2a, (w2b), then the cores
        for w in (w1a, w1b, w2a):
            kaiming_(w)
        if init_weights:
            nn.init.zeros_(w2b)  # one zero factor in one branch: ΔW = 0 at step 0, and every factor gets gradient
        else:
            kaiming_(w2b)
        for c in cores:
            kaiming_(c)
        for name, w in zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), (w1a, w1b, w2a, w2b)):
            getattr(self, name)[adapter_name] = self._as_parameter(w)
        for name, c in zip(("hada_t1", "hada_t2"), cores):
            getattr(self, name)[adapter_name] = self._as_parameter(c)
        self._record_adapter(adapter_name)

    def fused_forward(self, x: torch.Tensor, adapter_name: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """Training one adapter on a plain nn.Linear: :class:`LoHaLinearFunction`."""
        base = self._modules["base_layer"]
        if type(base) is not nn.Linear or watched_by_hooks(base) or args or kwargs:
            return None
        w = base._parameters["weight"]
        factors = [getattr(self, n)[adapter_name] for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")]
        if not fusable(x, w, factors[0]):
            return None
        return LoHaLinearFunction.apply(x, w, base._parameters["bias"], *factors, self.scaling[adapter_name])

    def make_delta(self, adapter_name: str) -> torch.Tensor:
        """(W1a W1b) ⊙ (W2a W2b), or the Hadamard product of the two CP kernels on an effective conv.

        Explained in: book/loha_lokr.ipynb
        """
        w1a, w1b = self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name]
        w2a, w2b = self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name]
        if adapter_name in self.hada_t1:
            return cp_weight(self.hada_t1[adapter_name], w1a, w1b) * cp_weight(self.hada_t2[adapter_name], w2a, w2b)
        return (w1a @ w1b) * (w2a @ w2b)  # Hadamard product of two rank-r products, (out, in)
