"""(IA)³ layers (Liu et al., arXiv 2205.05638): one learned vector per adapter that rescales an activation.

* an output-scaling target (the paper's l_k, l_v): h = l ⊙ (W x + b), ``ia3_l`` of shape (out, 1);
* a feed-forward target (l_ff, on the input of the down projection): h = W (l ⊙ x) + b, ``ia3_l`` (1, in);
* on a convolution the vector is (1, channels, 1, 1) and scales output or input channels.

Both fold into the weight: l ⊙ (W x + b) = (diag(l) W) x + l ⊙ b scales the rows of W and the bias, and
W (l ⊙ x) = (W diag(l)) x scales the columns. Unmerging divides by l again; where that cannot give W back
(l = 0 wipes a row, a tiny l pushes W·l into the subnormal range, where precision is lost), the layer
keeps the original entries when it merges and puts them back when it unmerges, so unmerge is exact (peft
divides by l + 1e-8 instead, which is off by a relative 1e-8/l everywhere and loses a zeroed row).

Explained in: book/ia3.ipynb
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.tuners.base import (BASE_ADAPTER, AdapterLayer, divide_by_scale, fusable, keep_output, kept_output,
                                 linear_output, second_order_grads, watched_by_hooks)
from peftlab.tuners.routing import Routing

#: the layer types peft 0.21.2 scales with (IA)³
SUPPORTED_LAYERS = (nn.Linear, Conv1D, nn.Conv2d, nn.Conv3d)


class IA3InputScaleFunction(torch.autograd.Function):
    """h = W (l ⊙ x) + b computed as x (W diag(l))ᵀ + b, one autograd node.

    Forward scales the (out, in) weight instead of the (tokens, in) activation. Backward, with g = ∂L/∂h:
    ∂x = g (W diag(l)), and ∂l = Σ_tokens (g W) ⊙ x. On the CPU the latter is read off ∂x as
    Σ_tokens ∂x ⊙ x / l, which saves a pass over the activation (entries of l too small to divide by are
    computed directly); elsewhere u = g W is formed once and scaled in place, ∂x = u ⊙ l, so the backward
    never waits for the device to look at l.

    Explained in: book/ia3.ipynb
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                l: torch.Tensor) -> torch.Tensor:
        scaled = weight * l  # W diag(l): columns scaled
        ctx.save_for_backward(x, weight, l, scaled, bias)
        ctx.has_bias = bias is not None
        return linear_output(x, scaled, bias)[0]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, weight, l, scaled, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable again (see second_order_grads)
            return tuple(second_order_grads(lambda x, w, b, l: F.linear(x * l, w, b), (x, weight, bias, l),
                                            ctx.needs_input_grad, g))
        need_x, need_w, need_b, need_l = ctx.needs_input_grad
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = grad_l = None
        if need_l and x.device.type == "cpu":
            gx = g2 @ scaled  # ∂L/∂x, (tokens, in)
            grad_l = divide_by_scale((gx * x2).sum(0), l,  # Σ_t (g W) ⊙ x
                                     lambda idx: ((g2 @ weight[:, idx]) * x2[:, idx]).sum(0))
            grad_x = gx.view(x.shape) if need_x else None
        elif need_l:
            u = g2 @ weight  # ∂L/∂(l ⊙ x), (tokens, in)
            grad_l = (u * x2).sum(0)
            grad_x = u.mul_(l).view(x.shape) if need_x else None
        elif need_x:
            grad_x = (g2 @ scaled).view(x.shape)
        grad_w = g2.t() @ (x2 * l) if need_w else None
        grad_b = g2.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b, grad_l


class IA3OutputScaleFunction(torch.autograd.Function):
    """h = l ⊙ (W x + b) computed as x (diag(l) W)ᵀ + l ⊙ b, one autograd node.

    Forward scales the (out, in) weight instead of the (tokens, out) output. Backward: ∂x = g (diag(l) W),
    ∂l = Σ_tokens g ⊙ (W x + b) = Σ_tokens g ⊙ h / l, with W x + b recomputed for the entries whose |l| is
    too small to divide by, and for all of them if something after the layer changed h in place
    (see :func:`~peftlab.tuners.base.keep_output`).

    Explained in: book/ia3.ipynb
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                l: torch.Tensor) -> torch.Tensor:
        scaled = weight * l.unsqueeze(1)  # diag(l) W: rows scaled
        out, _ = linear_output(x, scaled, None if bias is None else bias * l)
        ctx.save_for_backward(x, weight, bias, l, scaled)
        keep_output(ctx, out)  # ∂l reads it; an in-place change after the layer makes the backward recompute
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, weight, bias, l, scaled = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable again (see second_order_grads)
            return tuple(second_order_grads(lambda x, w, b, l: l * F.linear(x, w, b), (x, weight, bias, l),
                                            ctx.needs_input_grad, g))
        need_x, need_w, need_b, need_l = ctx.needs_input_grad
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_l = None
        if need_l:  # Σ_t g ⊙ (W x + b)

            def direct(idx: torch.Tensor | slice) -> torch.Tensor:
                return (g2[:, idx] * (x2 @ weight[idx].t() + (0 if bias is None else bias[idx]))).sum(0)
            out = kept_output(ctx)
            grad_l = direct(slice(None)) if out is None else divide_by_scale(
                (g2 * out.reshape(-1, out.shape[-1])).sum(0), l, direct)
        grad_w = (g2 * l).t() @ x2 if need_w else None
        grad_b = (g2 * l).sum(0) if need_b and bias is not None else None
        grad_x = (g2 @ scaled).view(x.shape) if need_x else None
        return grad_x, grad_w, grad_b, grad_l


class IA3Layer(AdapterLayer):
    """A frozen Linear, GPT-2 Conv1D, Conv2d or Conv3d plus named (IA)³ vectors ``ia3_l``.

    Whether an adapter scales the layer's input (a feed-forward target) or its output is kept per adapter
    (peft keeps it per layer, so a second adapter that disagrees gets the first one's shape there).
    Several active adapters multiply: h = l_out,1 ⊙ l_out,2 ⊙ W (l_in,1 ⊙ l_in,2 ⊙ x).

    Explained in: book/ia3.ipynb
    """

    adapter_layer_names = ("ia3_l",)
    other_param_names = ("is_feedforward",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, is_feedforward: bool = False,
                 init_ia3_weights: bool = True, **_: Any) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        if not isinstance(base, SUPPORTED_LAYERS):
            raise ValueError(f"IA3Layer wraps nn.Linear, Conv1D, nn.Conv2d or nn.Conv3d, not {type(base).__name__}")
        self.is_conv = isinstance(base, (nn.Conv2d, nn.Conv3d))
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        # merged adapter -> (flat indices, original weight values, bias indices, original bias values) of the
        # entries that dividing by l cannot give back (see the module docstring)
        self._merge_saved: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
        self.update_layer(adapter_name, is_feedforward, init_ia3_weights)
        self.set_adapter([adapter_name])

    def update_layer(self, adapter_name: str, is_feedforward: bool = False, init_ia3_weights: bool = True,
                     **_: Any) -> None:
        """Create the vector of ``adapter_name``: ones (the identity) unless ``init_ia3_weights=False``.

        Explained in: book/ia3.ipynb
        """
        n = self.in_features if is_feedforward else self.out_features
        if self.is_conv:  # broadcasts over (batch, channels, *spatial)
            shape = (1, n, *[1] * (self.get_base_layer().weight.dim() - 2))
        else:
            shape = (1, n) if is_feedforward else (n, 1)
        l = torch.randn(shape)  # drawn even when set to ones below, as peft does: seeded runs stay in step
        if init_ia3_weights:
            nn.init.ones_(l)
        self.ia3_l[adapter_name] = nn.Parameter(l.to(**self._new_tensor_kwargs()))
        self.is_feedforward[adapter_name] = bool(is_feedforward)
        self._record_adapter(adapter_name)

    # ---- the vector, shaped for what it scales ---------------------------------------------------
    def vector(self, adapter_name: str) -> torch.Tensor:
        """l of ``adapter_name``, shaped to broadcast over the activation it scales: (features,) on a linear
        layer (whose features are the last dimension), (1, channels, 1, 1) on a convolution."""
        l = self.ia3_l[adapter_name]
        return l if self.is_conv else l.reshape(-1)

    def weight_scale(self, adapter_name: str) -> torch.Tensor:
        """l laid out against the stored weight, so that W' = W · weight_scale (float32).

        Output scaling multiplies rows (output units) of W, input scaling its columns; a Conv1D stores W as
        (in, out), and a grouped convolution's input scale repeats per group.

        Explained in: book/ia3.ipynb
        """
        l = self.ia3_l[adapter_name].detach().float().reshape(-1)
        w = self.get_base_layer().weight
        ff = self.is_feedforward[adapter_name]
        if not self.is_conv:
            # (out, in) storage: rows are outputs; Conv1D's (in, out): columns are outputs
            along_rows = ff == self.fan_in_fan_out
            return l.view(-1, 1) if along_rows else l.view(1, -1)
        ones = [1] * (w.dim() - 2)
        if not ff:
            return l.view(-1, 1, *ones)  # (out, 1, 1, 1): whole output filters
        groups = self.get_base_layer().groups
        n_out, per_group = w.shape[0], w.shape[1]
        # input channel g·per_group + j feeds the output channels of group g only
        return l.view(groups, 1, per_group).expand(groups, n_out // groups, per_group).reshape(n_out, per_group, *ones)

    # ---- merge: W' = W ⊙ scale (and b' = l ⊙ b for output scaling); unmerge divides back -----------
    def merged_weights(self, adapter_name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """(W ⊙ l, l ⊙ b) for output scaling, (W ⊙ l, b) for input scaling, computed in float32.

        Explained in: book/ia3.ipynb
        """
        new_w = (weight.float() * self.weight_scale(adapter_name)).to(weight.dtype)
        if bias is None or self.is_feedforward[adapter_name]:
            return new_w, bias
        l = self.ia3_l[adapter_name].detach().float().reshape(-1)
        return new_w, (bias.float() * l).to(bias.dtype)

    def unmerged_weights(self, adapter_name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """W = W' / l (and b = b' / l), with the entries saved at merge time put back where dividing fails.

        Explained in: book/ia3.ipynb
        """
        new_w = weight.float() / self.weight_scale(adapter_name)
        new_b = bias
        if bias is not None and not self.is_feedforward[adapter_name]:
            new_b = bias.float() / self.ia3_l[adapter_name].detach().float().reshape(-1)
        saved = self._merge_saved.pop(adapter_name, None)
        if saved is not None:
            w_idx, w_val, b_idx, b_val = saved
            new_w.view(-1)[w_idx] = w_val.float()
            if b_idx is not None and new_b is not None:
                new_b.view(-1)[b_idx] = b_val.float()
        new_w = new_w.to(weight.dtype)
        return new_w, (new_b.to(bias.dtype) if new_b is not None else None)

    @staticmethod
    def _lost(original: torch.Tensor, merged: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """Flat indices of the entries that merged / l does not bring back to within a few rounding steps."""
        eps = torch.finfo(original.dtype).eps
        ok = torch.isclose(back.float(), original.float(), rtol=4 * eps, atol=0.0)
        return (~ok).reshape(-1).nonzero().squeeze(1)

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Fold the vectors into the weights (see :meth:`AdapterLayer.merge`), first saving the entries that
        dividing by l could not restore (l = 0, or W·l below the dtype's normal range).

        Explained in: book/ia3.ipynb
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        base = self.get_base_layer()
        for name in names:
            if name in self.merged_adapters or name not in self._adapters:
                continue
            weight = self._base_weight().data
            bias = base.bias.data if getattr(base, "bias", None) is not None else None
            with torch.no_grad():
                new_w, new_b = self.merged_weights(name, weight, bias)
                back_w = (new_w.float() / self.weight_scale(name)).to(weight.dtype)
                w_idx = self._lost(weight, new_w, back_w)
                b_idx = None
                if bias is not None and new_b is not bias:
                    back_b = (new_b.float() / self.ia3_l[name].detach().float().reshape(-1)).to(bias.dtype)
                    b_idx = self._lost(bias, new_b, back_b)
                saved = (w_idx, weight.reshape(-1)[w_idx].clone(),
                         b_idx, bias.reshape(-1)[b_idx].clone() if b_idx is not None else None)
            super().merge(safe_merge=safe_merge, adapter_names=[name])
            if w_idx.numel() or (b_idx is not None and b_idx.numel()):
                self._merge_saved[name] = saved

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._merge_saved.pop(adapter_name, None)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """(IA)³ multiplies the weight (W' = W ⊙ l), it adds nothing: there is no ΔW of its own."""
        raise NotImplementedError("(IA)³ scales the weight, W' = W ⊙ l; see IA3Layer.merged_weights")

    # ---- forward --------------------------------------------------------------------------------
    def adapter_forward(self, x: torch.Tensor, adapters: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """h = l_out ⊙ base(l_in ⊙ x): the input scaled by the feed-forward adapters' vectors, the output by
        the others' (several active adapters multiply).

        Training one adapter on a plain ``nn.Linear`` takes a fused path that scales the weight instead of the
        activation (:class:`IA3InputScaleFunction`; :class:`IA3OutputScaleFunction` on the CPU, whose backward
        would otherwise wait for the device to check for tiny entries of l)."""
        if len(adapters) == 1 and torch.is_grad_enabled() and not args and not kwargs:
            fused = self._fused(x, adapters[0])
            if fused is not None:
                return fused
        l_in = l_out = None
        for name in adapters:
            v = self.vector(name)
            if self.is_feedforward[name]:
                l_in = v if l_in is None else l_in * v
            else:
                l_out = v if l_out is None else l_out * v
        if l_in is not None:
            x = (x.to(l_in.dtype) * l_in).to(x.dtype)  # l_ff ⊙ x, in the adapter's dtype
        result = self.base_layer(x, *args, **kwargs)
        if l_out is not None:
            result = (result * l_out).to(result.dtype)  # l ⊙ (W x + b)
        return result

    def _fused(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        base = self._modules["base_layer"]
        if type(base) is not nn.Linear or watched_by_hooks(base):
            return None
        w, l = base._parameters["weight"], self.ia3_l[name]
        if not fusable(x, w, l):
            return None
        if self.is_feedforward[name]:
            return IA3InputScaleFunction.apply(x, w, base._parameters["bias"], l.view(-1))
        if x.device.type != "cpu":
            return None
        return IA3OutputScaleFunction.apply(x, w, base._parameters["bias"], l.view(-1))

    def _per_row(self, scales: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(rows, features) scales shaped to broadcast over an activation of shape ``like``."""
        if self.is_conv:  # (rows, channels, *spatial)
            return scales.view(scales.shape[0], scales.shape[1], *[1] * (like.dim() - 2))
        return scales.view(scales.shape[0], *[1] * (like.dim() - 2), scales.shape[1])  # (rows, ..., features)

    def mixed_batch_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row i scaled by the vector of the adapter named for it: one pass of the base layer for the whole
        batch, with a (rows, features) table of scales (ones for ``"__base__"`` rows)."""
        rows_in = rows_out = None
        for name, rows in routing.groups(x.shape[0], x.device).items():
            if name == BASE_ADAPTER or name not in self._adapters:
                continue
            v = self.ia3_l[name].reshape(-1)
            if self.is_feedforward[name]:
                if rows_in is None:
                    rows_in = torch.ones(x.shape[0], v.numel(), dtype=v.dtype, device=v.device)
                rows_in = rows_in.index_copy(0, rows, v.expand(rows.numel(), -1))
            else:
                if rows_out is None:
                    rows_out = torch.ones(x.shape[0], v.numel(), dtype=v.dtype, device=v.device)
                rows_out = rows_out.index_copy(0, rows, v.expand(rows.numel(), -1))
        if rows_in is not None:
            x = (x.to(rows_in.dtype) * self._per_row(rows_in, x)).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if rows_out is not None:
            result = (result * self._per_row(rows_out, result)).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, is_feedforward={self.is_feedforward}"
