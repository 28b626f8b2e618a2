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
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.tuners.base import BASE_ADAPTER, AdapterLayer
from peftlab.tuners.routing import Routing

#: the layer types peft 0.21.2 scales with (IA)³
SUPPORTED_LAYERS = (nn.Linear, Conv1D, nn.Conv2d, nn.Conv3d)


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
        the others' (several active adapters multiply)."""
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
