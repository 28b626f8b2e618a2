"""LoRA layers: h = W₀x + (α/r)·B(A(dropout(x))), for Linear, GPT-2 Conv1D, Embedding and Conv1d/2d/3d.

Shapes (PEFT's and the paper's): ``lora_A`` is r × in, ``lora_B`` is out × r, so ΔW = (α/r)·B A is
out × in like W₀. B starts at zero, so a fresh adapter changes nothing.

Explained in: book/lora.ipynb
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.tuners.base import (AdapterLayer, fusable, hookless_linear, linear_output, second_order_grads,
                                 watched_by_hooks)
from peftlab.tuners.lora import init as lora_init
from peftlab.tuners.lora.dora import DoraConvVariant, DoraEmbeddingVariant, DoraLinearVariant
from peftlab.utils.warning import PeftWarning
from peftlab.tuners.routing import _ROUTING, BASE_ADAPTER, Routing

class LoraLayer(AdapterLayer):
    """What every LoRA layer shares: rank, α, scaling, dropout and initialisation of A and B.

    Explained in: book/lora.ipynb
    """

    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_rslora", "lora_variant")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)  # in_features, out_features, fan_in_fan_out come from the base layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        # adapter name -> its variant (e.g. DoRA), which supplies the forward and the merge rule
        self.lora_variant: dict[str, Any] = {}

    def _set_hyperparameters(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                             use_rslora: bool) -> None:
        if r <= 0:
            raise ValueError(f"r={r} for adapter {adapter_name!r}: the rank must be a positive integer")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        # scaling = α/r (LoRA), or α/√r (rsLoRA)
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def _init_factors(self, adapter_name: str, init_lora_weights: bool | str, r: int, lora_bias: bool) -> None:
        """A: Kaiming-uniform (nn.Linear's own init) or N(0, 1/r²) for ``"gaussian"``; B = 0, so ΔW = 0 at
        step 0. ``False`` keeps both random; PiSSA/OLoRA/LoftQ set A and B from the base afterwards."""
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / r)
        if init_lora_weights is not False and not lora_init.reads_base_weight(init_lora_weights):
            nn.init.zeros_(self.lora_B[adapter_name].weight)  # B = 0  ⇒  ΔW = 0 at step 0
            if lora_bias:
                nn.init.zeros_(self.lora_B[adapter_name].bias)

    def _check_lora_bias(self, lora_bias: bool) -> None:
        """peft's warning when ``lora_bias=True`` meets a layer without a bias (merging is then refused)."""
        if lora_bias and not isinstance(self.bias, torch.Tensor):
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type {type(self.get_base_layer()).__name__} "
                          "has no bias. This means that merging LoRA weights won't be possible.", PeftWarning,
                          stacklevel=4)

    def check_mergeable(self, adapter_names: Sequence[str] | None = None) -> None:
        """A ``lora_bias`` adapter merges s·b_B into the base bias, so it needs a base layer with a bias (as in peft):
        a bias added at merge time is one the model's config does not declare, and transformers drops it when the
        merged model is saved and loaded again."""
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            if name not in self.merged_adapters and self._lora_bias(name) is not None and self.bias is None:
                raise RuntimeError(
                    f"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias "
                    f"({type(self.get_base_layer()).__name__}, adapter {name!r}). Keep the adapter unmerged, or give "
                    "those base layers a zero bias before merging."
                )

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """scaling = scale · α/r: weight one adapter at run time (diffusers' ``set_adapters``)."""
        if adapter_name not in self.r:
            return
        r, alpha = self.r[adapter_name], self.lora_alpha[adapter_name]
        self.scaling[adapter_name] = scale * alpha / (math.sqrt(r) if self.use_rslora[adapter_name] else r)

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """B(A(dropout(x))) of one adapter, before scaling."""
        raise NotImplementedError

    def adapter_delta(self, x: torch.Tensor, adapter_name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        """s · B(A(dropout(x))): what the adapter adds to the base output (a variant such as DoRA: the generic
        difference)."""
        if adapter_name in self.lora_variant:
            return super().adapter_delta(x, adapter_name, *args, **kwargs)
        return self._delta(x, adapter_name) * self.scaling[adapter_name]

    def adapter_forward(self, x: torch.Tensor, adapters: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        result = None
        for name in adapters:
            if name in self.lora_variant:  # e.g. DoRA, which may compute the base itself
                result = self.lora_variant[name].forward(self, name, x, result, *args, **kwargs)
                continue
            if result is None:
                result = self.base_layer(x, *args, **kwargs)
            # h = W₀x + s · B A x, in peft's order of operations (mixed batches repeat exactly these on their rows)
            result = result + self._delta(x, name).to(result.dtype) * self.scaling[name]
        return result if result is not None else self.base_layer(x, *args, **kwargs)

    def mixed_batch_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row i through adapter ``names[i]``, bit for bit what that adapter computes alone: the base output is
        computed once, and each adapter's low-rank term with the operations and on the batch shape of
        :meth:`adapter_forward` (a matrix product's rounding can depend on how many rows it has), then its rows are
        taken. The low-rank terms cost k times one adapter's; ``batched_mixed_batches`` (lora.Linear) trades the
        exactness for one batched product."""
        result = self.base_layer(x, *args, **kwargs)
        own = self._adapters
        for name, rows in routing.groups(x.shape[0], x.device).items():
            if name == BASE_ADAPTER or name not in own:
                continue
            if name in self.lora_variant:  # e.g. DoRA rescales the base output too: replace those rows
                full = self.lora_variant[name].forward(self, name, x, None, *args, **kwargs)
                result = result.index_copy(0, rows, full.index_select(0, rows).to(result.dtype))
                continue
            delta = self._delta(x, name).to(result.dtype) * self.scaling[name]
            result = result.index_add(0, rows, delta.index_select(0, rows))
        return result

    def merged_weights(self, adapter_name, weight, bias):
        if adapter_name in self.lora_variant:
            return self.lora_variant[adapter_name].merged_weights(self, adapter_name, weight, bias)
        weight, bias = super().merged_weights(adapter_name, weight, bias)
        b = self._lora_bias(adapter_name)
        if b is not None:  # lora_bias: the base bias absorbs s · b_B; a missing one counts as 0 here, the math only
            # (merge refuses to add a bias the model does not declare: check_mergeable, run before this)
            base_bias = bias if bias is not None else torch.zeros_like(b)
            bias = (base_bias.float() + b.float() * self.scaling[adapter_name]).to(base_bias.dtype)
        return weight, bias

    def unmerged_weights(self, adapter_name, weight, bias):
        if adapter_name in self.lora_variant:
            return self.lora_variant[adapter_name].unmerged_weights(self, adapter_name, weight, bias)
        weight, bias = super().unmerged_weights(adapter_name, weight, bias)
        b = self._lora_bias(adapter_name)
        if b is not None and bias is not None:
            bias = (bias.float() - b.float() * self.scaling[adapter_name]).to(bias.dtype)
        return weight, bias

    def _lora_bias(self, adapter_name: str) -> torch.Tensor | None:
        lora_B = getattr(self, "lora_B", None)
        return lora_B[adapter_name].bias if lora_B is not None and adapter_name in lora_B else None


def _linear_only(layer: LoraLayer, init_lora_weights: bool | str, **_: Any) -> None:
    """The initialisations that read the base weight exist for linear layers only."""
    kind = type(layer.get_base_layer()).__name__
    if lora_init.reads_base_weight(init_lora_weights):
        raise ValueError(f"init_lora_weights={init_lora_weights!r} supports nn.Linear, Conv1D and Linear4bit layers, "
                         f"not {kind}; leave this module out of target_modules (or add it to exclude_modules)")


class LoraLinearFunction(torch.autograd.Function):
    """h = x Wᵀ + b + s·(x Aᵀ) Bᵀ as one autograd node; x (..., in), W (out, in), A (r, in), B (out, r).

    Backward, with g = ∂L/∂h and u = s·g B (T, r):
    ∂x = g W + u A = g (W + s·B A),  ∂A = uᵀ x,  ∂B = s·gᵀ (x Aᵀ),  (∂W = gᵀ x, ∂b = Σ_t g only when the base trains).
    One node instead of the several that linear/linear/mul/add record. What that buys is not autograd's
    bookkeeping (on two tokens, where a product costs only its call, the node is no faster than PyTorch's own
    operators: the Benchmarks page times both) but the freedom to arrange the work, as follows.

    When the batch has more tokens T than in·out/(in + out) (training, in float32), the forward computes
    h = x (W + s·B A)ᵀ + b and the backward ∂x = g (W + s·B A): forming W + s·B A costs r·in·out
    multiply-adds, while adding s·B A x to the (T, out) output and u A to the (T, in) gradient costs
    r·T·(in + out) and a read and write of both full-size results (memory-bound, the larger part at the
    lab's scale). The merged weight is formed again in the backward rather than kept (no extra memory).
    In half precision the low-rank form is kept: W + s·B A rounded to 8 mantissa bits would lose the update.

    Explained in: book/lora.ipynb
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, s: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        n_out, n_in = weight.shape
        merged = x2.shape[0] * (n_in + n_out) > n_in * n_out and weight.dtype in (torch.float32, torch.float64)
        if merged:
            out, _ = linear_output(x, torch.addmm(weight, B, A, alpha=s), bias)  # x (W + s·B A)ᵀ + b
            xaT = None
        else:
            # The rank-r products are computed as (r, T) = A xᵀ, never (T, r) = x Aᵀ: with r ≪ in, out the
            # BLAS kernels are 2-4x faster in this orientation (CPU, one thread; measured in benchmarks/).
            xaT = torch.mm(A, x2.t())  # (A x)ᵀ, (r, T)
            out, flat = linear_output(x, weight, bias)  # W x + b
            flat.addmm_(xaT.t(), B.t(), alpha=s)  # + s·B A x
        ctx.save_for_backward(x, weight, A, B, xaT, bias)
        ctx.s, ctx.x_shape, ctx.has_bias, ctx.merged = s, x.shape, bias is not None, merged
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, weight, A, B, xaT, bias = ctx.saved_tensors
        s = ctx.s
        if torch.is_grad_enabled():  # create_graph=True: differentiable again (see second_order_grads)
            return (*second_order_grads(lambda x, w, b, A, B: F.linear(x, w, b) + s * F.linear(F.linear(x, A), B),
                                        (x, weight, bias, A, B), ctx.needs_input_grad[:5], g), None)
        x2 = x.reshape(-1, x.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_b = grad_A = grad_B = None
        if need_x and ctx.merged:
            grad_x = torch.mm(g2, torch.addmm(weight, B, A, alpha=s)).view(ctx.x_shape)  # g (W + s·B A)
        if need_A or (need_x and not ctx.merged):
            uT = torch.mm(B.t(), g2.t()).mul_(s)  # uᵀ = s·Bᵀ gᵀ, (r, T)
            if need_A:
                grad_A = torch.mm(uT, x2)  # (r, in)
            if need_x and not ctx.merged:
                grad_x = torch.mm(g2, weight).addmm_(uT.t(), A).view(ctx.x_shape)
        if need_B:
            if xaT is None:
                xaT = torch.mm(A, x2.t())  # (A x)ᵀ, (r, T)
            grad_B = torch.mm(xaT, g2).t().mul_(s)  # s·gᵀ (x Aᵀ), (out, r)
        if need_w:
            grad_w = torch.mm(g2.t(), x2)
        if need_b and ctx.has_bias:
            grad_b = g2.sum(dim=0)
        return grad_x, grad_w, grad_b, grad_A, grad_B, None


class Linear(LoraLayer):
    """LoRA on ``nn.Linear``, on GPT-2's ``Conv1D`` (weight stored in × out: ``fan_in_fan_out=True``) and on a
    4-bit ``Linear4bit`` (QLoRA). ``use_dora=True`` adds DoRA's magnitude (see :mod:`peftlab.tuners.lora.dora`);
    ``init_lora_weights`` may also be ``"pissa"``, ``"pissa_niter_N"``, ``"olora"`` or ``"loftq"``
    (see :mod:`peftlab.tuners.lora.init`).

    Explained in: book/lora.ipynb
    """

    adapter_layer_names = ("lora_A", "lora_B")
    #: mixed batches through stacked A and B (faster, equal up to rounding); off: bit-exact per-adapter forward
    batched_mixed_batches: bool = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights: bool | str = True, use_rslora: bool = False,
                 lora_bias: bool = False, use_dora: bool = False, loftq_config: dict | None = None) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias,
                          use_dora=use_dora, loftq_config=loftq_config)
        self.set_adapter([adapter_name])

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False, lora_bias: bool = False,
                     use_dora: bool = False, loftq_config: dict | None = None, **_: Any) -> None:
        if use_dora and lora_bias:
            raise ValueError("lora_bias=True cannot be combined with use_dora=True; set one of them to False")
        self._check_lora_bias(lora_bias)
        self.__dict__.pop("_lora_stacks", None)  # the batched mixed-batch stacks (see _stacked)
        self._set_hyperparameters(adapter_name, r, lora_alpha, lora_dropout, use_rslora)
        kw = self._new_tensor_kwargs()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **kw)  # A: r × in
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias, **kw)  # B: out × r
        self._init_factors(adapter_name, init_lora_weights, r, lora_bias)
        if lora_init.reads_base_weight(init_lora_weights):  # PiSSA, OLoRA, LoftQ: A, B and the base from W
            lora_init.initialize(self, adapter_name, init_lora_weights, loftq_config)
        self.lora_variant.pop(adapter_name, None)
        if use_dora:  # after the initialisation, which may change the base (as in peft)
            self.lora_variant[adapter_name] = DoraLinearVariant
            DoraLinearVariant.init(self, adapter_name)
        self._record_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.__dict__.pop("_lora_stacks", None)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        if A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()  # half-precision matmul on CPU is slow and loses bits
        delta = (B @ A) * self.scaling[adapter_name]  # ΔW = (α/r)·B A, shape (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A = self.lora_A[name].weight
        B = self.lora_B[name]
        x = self.lora_dropout[name](x)
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        return F.linear(F.linear(x, A), B.weight, B.bias)  # B(A(x)), shape (..., out)

    def _fusable(self, name: str, x: torch.Tensor) -> bool:
        """Whether one plain LoRA adapter can run as :class:`LoraLinearFunction` (training a plain
        ``nn.Linear`` base in the adapter's dtype, no dropout, no lora_bias, no autocast, no hooks)."""
        return self._fused_args(name, x) is not None

    def _fused_args(self, name: str, x: torch.Tensor) -> tuple | None:
        """(W, b, A, B) for :class:`LoraLinearFunction`, or None where it does not apply. Reads the module
        dicts directly: this runs for every adapted layer in every training step."""
        mods = self._modules
        base = mods["base_layer"]
        if type(base) is not nn.Linear or watched_by_hooks(base) or name in self.lora_variant:
            return None
        if type(mods["lora_dropout"]._modules[name]) is not nn.Identity:
            return None
        B = mods["lora_B"]._modules[name]._parameters
        A = mods["lora_A"]._modules[name]._parameters["weight"]
        W = base._parameters["weight"]
        if B["bias"] is not None or not fusable(x, A, W):
            return None
        return W, base._parameters["bias"], A, B["weight"]

    def adapter_forward(self, x: torch.Tensor, adapters: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(adapters) == 1 and not args and not kwargs and torch.is_grad_enabled():
            fused = self._fused_args(adapters[0], x)
            if fused is not None:  # training: one autograd node for base + adapter
                return LoraLinearFunction.apply(x, *fused, self.scaling[adapters[0]])
        result = None  # a variant (DoRA) first in line computes the base itself, fused with its adapter
        for name in adapters:
            if name in self.lora_variant:
                result = self.lora_variant[name].forward(self, name, x, result, *args, **kwargs)
                continue
            if result is None:
                result = self.base_layer(x, *args, **kwargs)
            # h = W₀x + s · B (A x), in peft's order of operations (a mixed batch repeats exactly these per row group)
            result = result + self._delta(x, name).to(result.dtype) * self.scaling[name]
        return result

    def weighted_forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor], *args: Any,
                         **kwargs: Any) -> torch.Tensor:
        """W₀x + Σ_a w_a·s_a·B_a A_a x with per-token weights, as two products for all adapters together: the
        A's stacked ((Σr, in): x Aᵀ at once), each adapter's r columns times w_a·s_a, then the B's side by side.
        Falls back to one product per adapter for DoRA, lora_bias, active dropout or mixed dtypes."""
        names = [n for n in weights if n in self._adapters]
        plain = names and not args and not kwargs and all(
            n not in self.lora_variant and self.lora_B[n].bias is None
            and (not self.training or isinstance(self.lora_dropout[n], nn.Identity))
            and self.lora_A[n].weight.dtype == x.dtype for n in names)
        if not plain:
            return super().weighted_forward(x, weights, *args, **kwargs)
        result = self.base_layer(x)
        A = torch.cat([self.lora_A[n].weight for n in names])  # (Σr, in)
        B = torch.cat([self.lora_B[n].weight for n in names], dim=1)  # (out, Σr)
        xa = F.linear(x, A)  # (..., Σr)
        scale = torch.cat([(weights[n].to(xa.dtype) * self.scaling[n]).expand(*xa.shape[:-1], self.r[n])
                           for n in names], dim=-1)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), (xa * scale).reshape(-1, xa.shape[-1]), B.t())
        return out.view(result.shape)

    def mixed_batch_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row i through adapter ``names[i]``. By default each adapter's rows run through exactly the forward
        that adapter runs alone (so a mixed batch equals the per-adapter runs bit for bit, as in peft). With
        ``batched_mixed_batches = True`` (opt-in, on the class or a layer) the adapters' A and B are stacked
        instead: two batched products for the whole batch (S-LoRA/Punica), faster with many adapters and equal to
        the per-adapter runs up to float rounding. Rows that come in runs of one adapter each (one request per
        adapter, or each repeated for beam search) read the stacks in place; other batches gather each row's A
        and B first. Without gradients to record, the stacks *are* the adapters' storage (see :meth:`_stacked`).
        That path falls back to the per-adapter loop for unequal ranks, mixed dtypes or devices, active dropout,
        DoRA, lora_bias or inputs with a leading dimension other than the batch."""
        if not self.batched_mixed_batches:
            return LoraLayer.mixed_batch_forward(self, x, routing, *args, **kwargs)
        stacks = self._stacked(routing.stacked_names(), x) if not args and not kwargs and x.dim() >= 2 else None
        if stacks is None:
            return super().mixed_batch_forward(x, routing, *args, **kwargs)
        names, A, B, A_kT, B_kT, scale = stacks  # (k+1, r, in), (k+1, out, r); slot k is zero (base rows)
        plain = hookless_linear(self._modules["base_layer"])
        result = F.linear(x, *plain) if plain is not None else self.base_layer(x)
        n = x.shape[0]
        if routing.segment_rows(n, names) is not None:
            # rows in runs of one adapter each: the stacks are read in place (Punica's SGMV), run j = adapter j
            rows, A_T, B_T = len(names), A_kT, B_kT
            if not isinstance(scale, float):
                scale = scale[:-1]
        else:  # each row's A and B gathered (BGMV)
            index = routing.row_index(n, x.device, names)
            rows, A_T, B_T = n, A.index_select(0, index).mT, B.index_select(0, index).mT
            if not isinstance(scale, float):
                scale = scale.index_select(0, index)
        as_is = x.dim() == 3 and n == rows  # (requests, tokens, features): no reshapes
        x3 = x if as_is else x.reshape(rows, -1, x.shape[-1])
        xa = torch.bmm(x3 if x3.dtype == A_T.dtype else x3.to(A_T.dtype), A_T)  # A x, (rows, ·, r)
        alpha = 1.0
        if isinstance(scale, float):
            alpha = scale  # one scaling for all adapters: folded into the product
        else:
            xa = xa * scale  # each row's own s
        out3 = result if as_is else result.reshape(rows, -1, result.shape[-1])
        if out3.dtype != B_T.dtype:
            return (out3 + (torch.bmm(xa, B_T) * alpha).to(out3.dtype)).view(result.shape)
        if not torch.is_grad_enabled():  # serving: add into the fresh base output in place
            out3 = out3.baddbmm_(xa, B_T, alpha=alpha)  # + s·B A x
        else:
            out3 = torch.baddbmm(out3, xa, B_T, alpha=alpha)
        return out3 if as_is else out3.view(result.shape)

    def _stacked(self, names: tuple[str, ...], x: torch.Tensor) -> tuple | None:
        """(names, A, B, Aᵀ and Bᵀ without their last slot, s) for the adapters of ``names`` this layer has: A
        (k+1, r, in) and B (k+1, out, r) stacked with a zero slot k (rows on the base model, or on an adapter this
        layer lacks), and the scaling, a float when all k share it, else a (k+1, 1, 1) tensor; None where the
        batched form does not apply.

        While gradients are recorded for a trainable adapter the stacks are built on every call from the
        parameters (so gradients reach them). Otherwise they are *resident*: built once, and each adapter's
        ``weight`` then lives in its slot (``weight.data`` is a view of the stack, one copy in memory instead of
        two). An in-place change of an adapter (an optimizer step, ``load_state_dict``, ``copy_``) then changes
        the stack itself, so a decode step checks nothing per tensor (reading 2k version counters per layer per
        step cost more than the products: scattered objects, cold caches). What would leave a weight outside its
        slot drops the stacks: a parameter replaced or removed in its module (``load_state_dict(assign=True)``,
        ``torch.func.functional_call``, offloading hooks; seen by the module's parameter dict, see
        :class:`_WatchedParameters`), ``.to``/``.half``/``.cuda`` on the layer or on an adapter's own module
        (``_apply``), a load in ``torch.__future__``'s swap mode, adapters added or deleted
        (``update_layer``/``delete_adapter``); so does a change of ``scaling``. Not seen: assigning
        ``weight.data`` (or ``set_``) by hand. State dicts then hold views that share one storage:
        ``save_pretrained`` writes each tensor on its own; for a raw ``safetensors.save_file`` clone them."""
        cache = self.__dict__.get("_lora_stacks")
        if (cache is not None and cache[0] == names and cache[1] == x.device and cache[2] == self.scaling
                and not (self.training and cache[3])):  # active dropout: the per-adapter loop (checked below)
            if not torch.is_grad_enabled() or not any(t.requires_grad for t in cache[4]):
                return cache[5]
        own = self._adapters
        used = tuple(n for n in names if n in own)
        if not used:
            return None
        # module-dict lookups without nn.Module.__getattr__
        A_mods, B_mods = self.lora_A._modules, self.lora_B._modules
        As = [A_mods[n]._parameters["weight"] for n in used]
        Bs = [B_mods[n]._parameters["weight"] for n in used]
        if (len({self.r[n] for n in used}) != 1 or any(n in self.lora_variant or B_mods[n].bias is not None
                                                       for n in used)
                or len({(t.dtype, t.device) for t in (*As, *Bs)}) != 1):
            return None
        dropout = any(not isinstance(self.lora_dropout[n], nn.Identity) for n in used)
        if self.training and dropout:
            return None
        scalings = [float(self.scaling[n]) for n in used]
        k, proto = len(used), As[0]
        scale: float | torch.Tensor = scalings[0]
        if any(s != scalings[0] for s in scalings):
            scale = torch.tensor([*scalings, 0.0], dtype=proto.dtype, device=proto.device).view(k + 1, 1, 1)
        resident = not (torch.is_grad_enabled() and any(t.requires_grad for t in (*As, *Bs)))
        if not resident:  # gradients reach A and B: stacked from them on every call
            A = torch.stack([*As, As[0].new_zeros(As[0].shape)])
            B = torch.stack([*Bs, Bs[0].new_zeros(Bs[0].shape)])
        else:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, even when asked under inference_mode
                A = torch.empty((k + 1, *proto.shape), dtype=proto.dtype, device=proto.device)
                B = torch.empty((k + 1, *Bs[0].shape), dtype=proto.dtype, device=proto.device)
                for i, (a, b) in enumerate(zip(As, Bs)):
                    A[i].copy_(a)
                    B[i].copy_(b)
                A[k].zero_()
                B[k].zero_()
                for i, n in enumerate(used):  # the weights move into their slots
                    As[i].data, Bs[i].data = A[i], B[i]
                    _WatchedParameters.watch(A_mods[n], self)
                    _WatchedParameters.watch(B_mods[n], self)
        value = (used, A, B, A[:-1].mT, B[:-1].mT, scale)
        if resident:
            self.__dict__["_lora_stacks"] = (names, x.device, dict(self.scaling), dropout, (*As, *Bs), value)
        return value

    def __getstate__(self) -> dict:
        # copies and pickles build their own stacks: a deepcopy clones each weight on its own
        state = super().__getstate__()
        state.pop("_lora_stacks", None)
        return state

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # .to/.half/.cuda give the weights new storage, outside the resident stacks (see _stacked)
        self.__dict__.pop("_lora_stacks", None)
        return super()._apply(fn, *args, **kwargs)


class _WatchedParameters(dict):
    """An adapter module's parameter dict that drops its LoRA layer's resident mixed-batch stacks whenever an entry
    is set or removed (a weight replaced is no longer the tensor that lives in the stack). nn.Module reads and writes
    ``_parameters`` as a plain dict, so everything that registers, replaces or deletes a parameter passes here.
    What changes a parameter's storage without a dict write (``.to``/``.double()`` called on the adapter's own
    module, which sets ``param.data``; a load under ``torch.__future__``'s swap mode, which swaps tensors) passes
    through the module's ``_apply`` or ``_load_from_state_dict``: :meth:`watch` puts a dropping step in front of
    both, on the watched module only."""

    def _drop(self) -> None:
        owner = self.__dict__.get("owner")  # absent while pickle or deepcopy refill the dict
        if owner is not None:
            owner.__dict__.pop("_lora_stacks", None)

    @classmethod
    def watch(cls, module: nn.Module, owner: nn.Module) -> None:
        params = module._parameters
        if type(params) is not cls:
            params = cls(params)
            module.__dict__["_parameters"] = params
        params.__dict__["owner"] = owner
        for method in ("_apply", "_load_from_state_dict"):  # instance attributes: found before the class's
            module.__dict__.setdefault(method, functools.partial(_dropping_stacks, method, module))

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._drop()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._drop()

    def pop(self, *args: Any) -> Any:
        self._drop()
        return super().pop(*args)

    def popitem(self) -> Any:
        self._drop()
        return super().popitem()

    def clear(self) -> None:
        self._drop()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._drop()

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._drop()
        return super().setdefault(key, default)


def _dropping_stacks(method: str, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``module``'s own ``method`` (``_apply``, ``_load_from_state_dict``) after dropping the resident stacks its
    weights live in (see :class:`_WatchedParameters`)."""
    params = module._parameters
    if type(params) is _WatchedParameters:
        params._drop()
    return getattr(type(module), method)(module, *args, **kwargs)


class Embedding(LoraLayer):
    """LoRA on ``nn.Embedding``: the lookup of token t gains (α/r)·B·A[:, t] (no dropout, as in peft).

    ``lora_embedding_A`` is r × num_embeddings, ``lora_embedding_B`` is dim × r.

    Explained in: book/lora.ipynb
    """

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding, adapter_name: str, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights: bool | str = True, use_rslora: bool = False,
                 **_: Any) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, **_)
        self.set_adapter([adapter_name])

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False, lora_bias: bool = False,
                     **_: Any) -> None:
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for nn.Embedding; exclude embeddings or set it False")
        _linear_only(self, init_lora_weights, **_)
        self._set_hyperparameters(adapter_name, r, lora_alpha, 0.0, use_rslora)
        kw = self._new_tensor_kwargs()
        A = torch.randn(r, self.in_features, **kw)  # r × num_embeddings
        B = torch.randn(self.out_features, r, **kw)  # dim × r
        if init_lora_weights is not False:  # True and "gaussian" alike, as in peft: A = 0, B ~ N(0, 1)
            nn.init.zeros_(A)  # (the LoRA paper's embedding init)
            nn.init.normal_(B)
        self.lora_embedding_A[adapter_name] = nn.Parameter(A)
        self.lora_embedding_B[adapter_name] = nn.Parameter(B)
        self.lora_variant.pop(adapter_name, None)
        if _.get("use_dora"):
            self.lora_variant[adapter_name] = DoraEmbeddingVariant
            DoraEmbeddingVariant.init(self, adapter_name)
        self._record_adapter(adapter_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        if A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        return (B @ A).T * self.scaling[adapter_name]  # ΔW, shape (num_embeddings, dim)

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.get_base_layer()
        after_A = F.embedding(x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
        out = after_A @ self.lora_embedding_B[name].T
        scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma-style) scale the adapter too
        return out * scale.to(out.dtype) if isinstance(scale, torch.Tensor) else out


class Conv(LoraLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: A is a conv with the base's kernel, stride, padding and dilation
    (r output channels), B a 1×1 conv to the base's output channels. ΔW[o,i,…] = s · Σ_k B[o,k] A[k,i,…].

    Explained in: book/lora.ipynb
    """

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights: bool | str = True, use_rslora: bool = False,
                 lora_bias: bool = False, **_: Any) -> None:
        super().__init__(base_layer)
        if base_layer.groups > 1:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.",
                          UserWarning, stacklevel=2)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias, **_)
        self.set_adapter([adapter_name])

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False, lora_bias: bool = False,
                     **_: Any) -> None:
        _linear_only(self, init_lora_weights, **_)
        self._check_lora_bias(lora_bias)
        self._set_hyperparameters(adapter_name, r, lora_alpha, lora_dropout, use_rslora)
        base = self.get_base_layer()
        if r % base.groups:
            raise ValueError(
                f"Targeting a {type(base).__name__} with groups={base.groups} and rank {r}. Currently, support is "
                "limited to conv layers where the rank is divisible by groups. Either choose a different rank or do "
                "not target this specific layer."
            )
        conv = type(base)
        kw = self._new_tensor_kwargs()
        ones = (1,) * len(base.kernel_size)
        self.lora_A[adapter_name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                         dilation=base.dilation, bias=False, padding_mode=base.padding_mode, **kw)
        # a grouped conv keeps its groups apart in B (peft's layout), so A mixes all input channels
        self.lora_B[adapter_name] = conv(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias, **kw)
        self._init_factors(adapter_name, init_lora_weights, r, lora_bias)
        self.lora_variant.pop(adapter_name, None)
        if _.get("use_dora"):
            self.lora_variant[adapter_name] = DoraConvVariant
            DoraConvVariant.init(self, adapter_name)
        self._record_adapter(adapter_name)

    def check_mergeable(self, adapter_names: Sequence[str] | None = None) -> None:
        self._refuse_grouped_merge()
        super().check_mergeable(adapter_names)

    def _refuse_grouped_merge(self) -> None:
        if self.get_base_layer().groups > 1:  # ΔW connects every input channel: no grouped weight holds it
            raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        self._refuse_grouped_merge()
        A = self.lora_A[adapter_name].weight  # (r, in, *kernel)
        B = self.lora_B[adapter_name].weight  # (out, r, 1, …)
        if A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        delta = B.flatten(1) @ A.flatten(1)  # (out, in·k)
        return delta.view(self.out_features, *A.shape[1:]) * self.scaling[adapter_name]

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A = self.lora_A[name]
        x = self.lora_dropout[name](x)
        if x.dtype != A.weight.dtype:
            x = x.to(A.weight.dtype)
        return self.lora_B[name](A(x))


class Conv1d(Conv):
    """LoRA on ``nn.Conv1d`` (see :class:`Conv`).

    Explained in: book/lora.ipynb
    """


class Conv2d(Conv):
    """LoRA on ``nn.Conv2d`` (see :class:`Conv`).

    Explained in: book/lora.ipynb
    """


class Conv3d(Conv):
    """LoRA on ``nn.Conv3d`` (see :class:`Conv`).

    Explained in: book/lora.ipynb
    """


class MultiheadAttention(LoraLayer):
    """LoRA on ``nn.MultiheadAttention``: one adapter on the packed q/k/v projection ``in_proj_weight``
    (A: r × embed, B: 3·embed × r) and one on ``out_proj`` (a LoRA :class:`Linear` inside the base module),
    as in peft. ``nn.MultiheadAttention`` reads its weights directly (no ``nn.Linear`` forward to hook), so
    the forward runs the base module with W + ΔW put in place for the call (differentiable in A and B) and
    the frozen weights restored afterwards. Query, key and value must share the embedding size.

    Explained in: book/peft_differences.md
    """

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.MultiheadAttention, adapter_name: str, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights: bool | str = True, use_rslora: bool = False,
                 lora_bias: bool = False, use_dora: bool = False, **kwargs: Any) -> None:
        if not getattr(base_layer, "_qkv_same_embed_dim", True):
            raise ValueError("Only same embed for query/key/value is supported as of now for MultiheadAttention.")
        if use_dora:
            raise ValueError("MultiheadAttention does not support DoRA (yet), please set use_dora to False")
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError("out_proj must be an instance of nn.Linear for MultiheadAttention.")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.embed_dim, 3 * base_layer.embed_dim
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        base_layer.out_proj = Linear(base_layer.out_proj, adapter_name, r, lora_alpha, lora_dropout,
                                     init_lora_weights, use_rslora, lora_bias)
        self._update_in_proj(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias)
        self.set_adapter([adapter_name])

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().in_proj_weight

    def _base_weight(self) -> torch.Tensor:
        return self.get_base_layer().in_proj_weight

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        self.get_base_layer().in_proj_weight.data = weight
        self._base_cache.clear()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.get_base_layer().in_proj_bias  # what a lora_bias adapter on in_proj merges into

    def _set_base_bias(self, bias: torch.Tensor) -> None:
        self.get_base_layer().in_proj_bias.data = bias  # (a layer without one refuses lora_bias merges)

    def _update_in_proj(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                        init_lora_weights: bool | str = True, use_rslora: bool = False, lora_bias: bool = False) -> None:
        if lora_init.reads_base_weight(init_lora_weights):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} supports nn.Linear, Conv1D and Linear4bit "
                             "layers, not MultiheadAttention; leave it out of target_modules")
        self._check_lora_bias(lora_bias)
        self._set_hyperparameters(adapter_name, r, lora_alpha, lora_dropout, use_rslora)
        kw = self._new_tensor_kwargs()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias, **kw)
        self._init_factors(adapter_name, init_lora_weights, r, lora_bias)
        self._record_adapter(adapter_name)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, use_rslora: bool = False, lora_bias: bool = False,
                     use_dora: bool = False, **_: Any) -> None:
        if use_dora:
            raise ValueError("MultiheadAttention does not support DoRA (yet), please set use_dora to False")
        self.get_base_layer().out_proj.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights,
                                                    use_rslora, lora_bias)
        self._update_in_proj(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, lora_bias)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        if A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        return (B @ A) * self.scaling[adapter_name]  # ΔW of in_proj_weight, (3·embed, embed)

    def adapter_forward(self, query: torch.Tensor, adapters: Sequence[str], *args: Any, **kwargs: Any):
        base = self.get_base_layer()
        out_layer = base.out_proj  # the LoRA Linear around out_proj
        out_lin = out_layer.get_base_layer()
        out_adapters = [] if out_layer.disable_adapters else \
            [a for a in out_layer.active_adapters if a in out_layer.adapter_names and a not in out_layer.merged_adapters]
        # W + ΔW (and b + s·b_B for lora_bias adapters) for the duration of the call, as plain tensors
        # (differentiable in A, B and b_B); the frozen parameters are put back afterwards
        swaps = [(base, "in_proj_weight", [self.get_delta_weight(a) for a in adapters]),
                 (base, "in_proj_bias", [self._lora_bias(a) * self.scaling[a] for a in adapters
                                         if self._lora_bias(a) is not None]),
                 (out_lin, "weight", [out_layer.get_delta_weight(a) for a in out_adapters]),
                 (out_lin, "bias", [out_layer._lora_bias(a) * out_layer.scaling[a] for a in out_adapters
                                    if out_layer._lora_bias(a) is not None])]
        kept = []
        try:
            for module, name, deltas in swaps:
                if not deltas:
                    continue
                frozen = getattr(module, name)
                kept.append((module, name, frozen))
                total = sum(deltas)
                delattr(module, name)
                setattr(module, name, total.to(frozen.dtype) + frozen if frozen is not None else total)
            return base(query, *args, **kwargs)
        finally:
            for module, name, frozen in kept:
                delattr(module, name)
                module.register_parameter(name, frozen)

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any):
        if _ROUTING.get() is not None:
            raise TypeError("lora.MultiheadAttention does not support mixed adapter batches.")
        return super().forward(query, *args, **kwargs)
