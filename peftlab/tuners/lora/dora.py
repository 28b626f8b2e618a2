"""DoRA (Liu et al., 2024): weight-decomposed low-rank adaptation, a variant of the LoRA linear layer.

The adapted weight is split into a magnitude and a direction, per output feature i:

    W'_i = m_i · (W + s·B A)_i / ‖(W + s·B A)_i‖,     m = ``lora_magnitude_vector`` (out,), trained,

initialised to m = ‖W + s·B A‖ row by row, so W' = W at step 0. As in the paper (§4.3) the norm
n = ‖W + s·B A‖ is treated as a constant (detached): gradients reach m, A and B, never through n. The
forward is h = (m/n) ⊙ (W x + s·B A x) + b (the bias is not rescaled).

peft materialises B A every step (``lora_B(lora_A(eye(in)))``) to get n. Here n comes from a low-rank
identity, without forming B A or W + s·B A:

    n_i² = ‖W_i‖² + 2s·⟨W_i, (B A)_i⟩ + s²·‖(B A)_i‖²,
    ⟨W_i, (B A)_i⟩ = B_i · (A W_iᵀ)   (row i of (W Aᵀ) ⊙ B),   ‖(B A)_i‖² = B_i (A Aᵀ) B_iᵀ,

with ‖W_i‖² cached (the base is frozen): O(out·in·r) instead of O(in²·r + out·in·r) and no (out, in)
temporaries. The forward and backward of one layer are one autograd function that never forms the
elementwise products peft builds on the activations.

The variant plugs into :class:`~peftlab.tuners.lora.layer.Linear` through its ``lora_variant`` hook: the
layer asks it for the forward, the merged/unmerged weights and its own tensor container.

With several active adapters, the adapters act in order (as in peft): a DoRA adapter rescales what the
layer computed so far, z ↦ (m/n) ⊙ (z + s·B A x) with z the running output without the base bias, and n =
‖W + s·B A‖ always taken on the base W with nothing merged (its m was initialised against that W). Merging
folds the same maps into the weight in the same order, W ↦ (m/n) ⊙ (W + s·B A), so a merged layer computes
what the unmerged one does. Under dropout in training the rescaled term is W x' on the dropped input, peft's
form. Mixed batches work (peft refuses ``adapter_names`` with DoRA).

Explained in: book/lora_in_practice.ipynb
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.tuners.base import (divide_by_scale, func_transform_active, keep_output, kept_output, second_order_grads,
                                 watched_by_hooks)

MAGNITUDE = "lora_magnitude_vector"


class DoraMagnitude(nn.Module):
    """Holds one adapter's magnitude m as ``weight`` (peft's layout: ``lora_magnitude_vector.<adapter>.weight``
    in memory, ``lora_magnitude_vector`` in the file).

    Explained in: book/lora_in_practice.ipynb
    """

    def __init__(self, m: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(m)


def magnitude(layer: Any, adapter_name: str) -> torch.Tensor:
    """The magnitude vector m of ``adapter_name`` in ``layer``."""
    return layer.lora_magnitude_vector[adapter_name].weight


def _add_magnitude(layer: Any, adapter_name: str, m: torch.Tensor) -> None:
    if not hasattr(layer, MAGNITUDE):
        layer.lora_magnitude_vector = nn.ModuleDict()
    if MAGNITUDE not in layer.adapter_layer_names:
        layer.adapter_layer_names = (*layer.adapter_layer_names, MAGNITUDE)
    layer.lora_magnitude_vector[adapter_name] = DoraMagnitude(m)


# ---------------------------------------------------------------------------------------------------
# the norm ‖W + s·B A‖ per output feature
# ---------------------------------------------------------------------------------------------------
def _oriented(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight  # (out, in)


def norm_except(V: torch.Tensor, axis: int) -> torch.Tensor:
    """DoRA's n: ‖V‖ over every axis of V = W + ΔW but ``axis`` (kept, size 1, so n broadcasts against V), detached
    (the paper's §4.3: n is a constant, no gradient flows through it). Every direct norm in DoRA goes through here:
    the merge and unmerge scales of every layer type, the conv and embedding forwards, :func:`reference_weight_norm`;
    the linear forward uses the low-rank identity of :func:`weight_norm` instead.

    Explained in: book/lora_in_practice.ipynb
    """
    dims = tuple(d for d in range(V.dim()) if d != axis)
    return torch.linalg.vector_norm(V.detach(), dim=dims, keepdim=True)


def _row_sq_norms(layer: Any, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """‖W_i‖² per output feature, cached while the frozen base weight stays the same tensor."""
    if callable(getattr(layer.get_base_layer(), "dequantize_weight", None)):
        key = ("quantised", weight.device, dtype)  # a fresh tensor each time; _set_base_weight clears the cache
    else:
        key = (weight.data_ptr(), weight._version, weight.device, dtype)
    cached = layer._base_cache.get("dora_w2")
    if cached is None or cached[0] != key:
        w = _oriented(weight.detach(), layer.fan_in_fan_out).to(dtype)
        cached = (key, (w * w).sum(dim=1))
        layer._base_cache["dora_w2"] = cached
    return cached[1]


@torch.no_grad()
def weight_norm(layer: Any, adapter_name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """n = ‖W + s·B A‖ per output feature by the low-rank identity (no (out, in) temporary), detached.

    Explained in: book/lora_in_practice.ipynb
    """
    A = layer.lora_A[adapter_name].weight.detach()  # (r, in)
    B = layer.lora_B[adapter_name].weight.detach()  # (out, r)
    s = layer.scaling[adapter_name]
    W = norm_base(layer) if weight is None else weight
    w2 = _row_sq_norms(layer, W, A.dtype)  # ‖W_i‖²
    W = W.detach().to(A.dtype)
    WAt = (A @ W).T if layer.fan_in_fan_out else W @ A.T  # W Aᵀ, (out, r)
    cross = (WAt * B).sum(dim=1)  # ⟨W_i, (B A)_i⟩ = B_i · (A W_iᵀ)
    ba2 = ((B @ (A @ A.T)) * B).sum(dim=1)  # ‖(B A)_i‖² = B_i (A Aᵀ) B_iᵀ
    return (w2 + 2 * s * cross + s * s * ba2).clamp_min(0).sqrt()


@torch.no_grad()
def reference_weight_norm(layer: Any, adapter_name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """n = ‖W + s·B A‖ per output feature, the direct way (materialises the (out, in) matrix), in float32.

    Explained in: book/lora_in_practice.ipynb
    """
    A = layer.lora_A[adapter_name].weight.float()
    B = layer.lora_B[adapter_name].weight.float()
    W = _oriented((norm_base(layer) if weight is None else weight).float(), layer.fan_in_fan_out)
    return norm_except(W + layer.scaling[adapter_name] * (B @ A), 0).reshape(-1)


# ---------------------------------------------------------------------------------------------------
# the fused forward and backward
# ---------------------------------------------------------------------------------------------------
class DoraLinearFunction(torch.autograd.Function):
    """h = (m/n) ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b with n a constant; x (T, in), W (out, in), A (r, in), B (out, r).

    Backward, with c = m/n, z = x Wᵀ + s·x Aᵀ Bᵀ and g = ∂L/∂h:
    ∂m = Σ_t g ⊙ z / n,  ∂B = s·(gᵀ (x Aᵀ)) ⊙ c,  ∂A = s·((g ⊙ c) B)ᵀ x,  ∂x = g (c ⊙ W) + s·((g ⊙ c) B) A,
    where c is folded into the (out, ·) weights instead of the (T, out) activations. With more tokens than
    in·out/(in + out) (float32), h = x (c ⊙ (W + s·B A))ᵀ + b and ∂x = g (c ⊙ (W + s·B A)) from the merged weight,
    formed in the forward and again in the backward (see :class:`~peftlab.tuners.lora.layer.LoraLinearFunction`),
    and ∂m = Σ_t g ⊙ (h − b) / m is read off the output (:func:`~peftlab.tuners.base.keep_output`), so z is not
    kept.

    Explained in: book/lora_in_practice.ipynb
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, m: torch.Tensor, n: torch.Tensor, s: float) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # under autocast (bf16 on a GPU) the out-of-place products would drop to bf16 and the in-place addmm_
            # would mix dtypes: compute in the inputs' dtype (the adapter's, set by the caller)
            with torch.autocast(x.device.type, enabled=False):
                return DoraLinearFunction.forward(ctx, x, weight, bias, A, B, m, n, s)
        c = m / n  # m/‖W + s·B A‖, (out,)
        n_out, n_in = weight.shape
        # many tokens (training, float32): one product with W + s·B A, as in LoraLinearFunction
        merged = x.shape[0] * (n_in + n_out) > n_in * n_out and weight.dtype in (torch.float32, torch.float64)
        if merged:  # h = (c ⊙ (W + s·B A)) x + b: c scales the weight's rows, not the (T, out) output
            out = F.linear(x, torch.addmm(weight, B, A, alpha=s).mul_(c[:, None]), bias)
            if ctx.needs_input_grad[5] and not torch.is_inference(out):  # ∂m reads it (changed in place: recomputed)
                keep_output(ctx, out)
            xaT = z = None
        else:
            # rank-r products as (r, T) = A xᵀ: with r ≪ in, out the BLAS kernels run faster in this orientation
            xaT = torch.mm(A, x.t())  # (A x)ᵀ, (r, T)
            # The base output as the base layer computes it, plus (m/n − 1)·W x + (m/n)·s·B A x (peft's form):
            # a fresh adapter (B = 0, m = n, so m/n = 1 exactly) then returns the base output bit for bit.
            base = F.linear(x, weight, bias)  # W x + b, (T, out)
            wx = base - bias if bias is not None else base  # W x
            lora = torch.mm(xaT.t(), B.t())  # B A x, (T, out)
            out = torch.addcmul(base, wx, c - 1).addcmul_(lora, c * s)
            z = torch.add(wx, lora, alpha=s)  # z = W x + s·B A x, for ∂m
        ctx.save_for_backward(x, weight, A, B, m, n, xaT, z, bias)
        ctx.s = s
        ctx.has_bias = bias is not None
        ctx.merged = merged
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        if torch.is_autocast_enabled(g.device.type):
            with torch.autocast(g.device.type, enabled=False):
                return DoraLinearFunction.backward(ctx, g)
        x, weight, A, B, m, n, xaT, z, bias = ctx.saved_tensors
        g = g.to(x.dtype)
        s = ctx.s
        if torch.is_grad_enabled():  # create_graph=True: differentiable again (see second_order_grads); n constant
            need = ctx.needs_input_grad
            grads = second_order_grads(
                lambda x, b, A, B, m: (m / n) * (F.linear(x, weight) + s * F.linear(F.linear(x, A), B))
                + (0 if b is None else b), (x, bias, A, B, m), (need[0], need[2], need[3], need[4], need[5]), g)
            return grads[0], None, grads[1], grads[2], grads[3], grads[4], None, None
        c = m / n
        need_x, _, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
        grad_x = grad_b = grad_A = grad_B = grad_m = None
        if need_m and not ctx.merged:
            grad_m = torch.linalg.vecdot(g, z, dim=0) / n  # Σ_t g ⊙ z / n
        elif need_m:

            def direct(idx: Any) -> torch.Tensor:  # Σ_t g ⊙ z / n for outputs idx, z from x
                z_idx = F.linear(x, torch.addmm(weight[idx], B[idx], A, alpha=s))
                return torch.linalg.vecdot(g[:, idx], z_idx, dim=0) / n[idx]
            h = kept_output(ctx)
            if h is None:
                grad_m = direct(slice(None))
            else:  # Σ_t g ⊙ (h − b) / m = Σ_t g ⊙ z / n
                grad_m = divide_by_scale(torch.linalg.vecdot(g, h if bias is None else h - bias, dim=0), m, direct)
        if need_x and ctx.merged:
            grad_x = torch.mm(g, torch.addmm(weight, B, A, alpha=s).mul_(c[:, None]))  # g (c ⊙ (W + s·B A))
        if need_A or (need_x and not ctx.merged):
            g_xaT = torch.mm((B * (c * s)[:, None]).t(), g.t())  # (∂L/∂(A x))ᵀ = s·Bᵀ (g ⊙ c)ᵀ, (r, T)
            if need_A:
                grad_A = torch.mm(g_xaT, x)
            if need_x and not ctx.merged:
                grad_x = g @ (weight * c[:, None])  # g (c ⊙ W)
                grad_x.addmm_(g_xaT.t(), A)
        if need_B:
            if xaT is None:
                xaT = torch.mm(A, x.t())  # (A x)ᵀ, (r, T)
            grad_B = torch.mm(xaT, g).t() * (c[:, None] * s)
        if need_b and ctx.has_bias:
            grad_b = g.sum(dim=0)
        return grad_x, None, grad_b, grad_A, grad_B, grad_m, None, None


def _merged_scales(layer: Any) -> dict[str, torch.Tensor]:
    """c = m/‖W + ΔW‖ of each merged DoRA adapter (shaped to broadcast against the stored weight), recorded at
    merge for the exact unmerge (kept apart from ``_base_cache``, which the merge itself clears)."""
    if "_dora_merged_scales" not in layer.__dict__:
        layer.__dict__["_dora_merged_scales"] = {}
    return layer.__dict__["_dora_merged_scales"]


def unmerged_base(layer: Any, weight: torch.Tensor) -> torch.Tensor:
    """W: the stored base weight with every merged adapter taken out again, last merged first (float32).

    Merges compose in order (W ↦ W + ΔW for LoRA, W ↦ c ⊙ (W + ΔW) for DoRA), so they are undone in reverse.
    """
    W = weight.float()
    for name in reversed(layer.merged_adapters):
        delta = layer.get_delta_weight(name).float()
        if name in layer.lora_variant:
            W = W / _merged_scales(layer)[name] - delta
        else:
            W = W - delta
    return W


def norm_base(layer: Any, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The base W that DoRA's n = ‖W + ΔW‖ is taken on, in every forward, init and merge: the stored weight
    (``weight``, if already read) with every merged adapter taken out again, in its layout and dtype. A merged
    adapter is part of the stored weight, but an unmerged one's m was set against the base without it.

    Explained in: book/lora_in_practice.ipynb
    """
    weight = layer._base_weight() if weight is None else weight
    return unmerged_base(layer, weight).to(weight.dtype) if layer.merged_adapters else weight


def _merge_rescaled(layer: Any, adapter_name: str, weight: torch.Tensor, axis: int) -> torch.Tensor:
    """W' = c ⊙ (W_cur + ΔW), c = m/‖W + ΔW‖ on the unmerged base W, m and n along ``axis`` of the stored weight
    (n over every other axis), recorded for unmerge."""
    delta = layer.get_delta_weight(adapter_name).float()  # s·B A, stored layout
    n = norm_except(unmerged_base(layer, weight) + delta, axis)
    c = magnitude(layer, adapter_name).detach().float().reshape(n.shape) / n
    _merged_scales(layer)[adapter_name] = c
    return (c * (weight.float() + delta)).to(weight.dtype)


def _unmerge_rescaled(layer: Any, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
    """W_cur = W'/c − ΔW with the c recorded at merge (merges are undone last first, so W' is this merge's)."""
    c = _merged_scales(layer).pop(adapter_name, None)
    if c is None:
        raise ValueError(f"DoRA adapter {adapter_name!r} has no scale recorded from its merge (was the base weight "
                         "replaced since?), so it cannot be unmerged exactly")
    return (weight.float() / c - layer.get_delta_weight(adapter_name).float()).to(weight.dtype)


# ---------------------------------------------------------------------------------------------------
# the variant
# ---------------------------------------------------------------------------------------------------
class DoraLinearVariant:
    """DoRA for a LoRA linear layer (``nn.Linear``, GPT-2 ``Conv1D``, ``Linear4bit``): init, forward, merge.

    Explained in: book/lora_in_practice.ipynb
    """

    container = MAGNITUDE

    @staticmethod
    def init(layer: Any, adapter_name: str) -> None:
        """Add ``lora_magnitude_vector[adapter_name]`` = ‖W + s·B A‖ per output feature (so W' = W at init)."""
        dtype = layer.lora_A[adapter_name].weight.dtype
        if layer.lora_A[adapter_name].weight.is_meta:  # low_cpu_mem_usage: the checkpoint brings m
            m = torch.empty(layer.out_features, device="meta")
        else:
            m = weight_norm(layer, adapter_name)
        _add_magnitude(layer, adapter_name, m.to(dtype))

    @staticmethod
    def forward(layer: Any, adapter_name: str, x: torch.Tensor, result: torch.Tensor | None, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        """The layer's output with this adapter applied; ``result`` holds what earlier adapters produced
        (``None``: nothing computed yet, then the base is computed here, fused with the adapter)."""
        A = layer.lora_A[adapter_name].weight
        B = layer.lora_B[adapter_name].weight
        m = magnitude(layer, adapter_name)
        s = layer.scaling[adapter_name]
        dropout = layer.lora_dropout[adapter_name]
        weight = layer._base_weight()  # stored layout; dequantised for a 4-bit base
        n = weight_norm(layer, adapter_name, norm_base(layer, weight))  # detached: no gradient through the norm
        bias = layer.bias
        uses_dropout = layer.training and not isinstance(dropout, nn.Identity)
        if (result is None and not uses_dropout and not args and not kwargs and not func_transform_active()
                and not watched_by_hooks(layer._modules["base_layer"])):
            # h = (m/n) ⊙ (W x + s·B A x) + b in one fused function
            shape = x.shape
            xc = x.to(A.dtype).reshape(-1, shape[-1])
            W = _oriented(weight, layer.fan_in_fan_out).to(A.dtype)
            b = bias.to(A.dtype) if bias is not None else None
            out = DoraLinearFunction.apply(xc, W, b, A, B, m, n, s)
            out_dtype = x.dtype if x.is_floating_point() else A.dtype
            return out.view(*shape[:-1], out.shape[-1]).to(out_dtype)
        # peft's form: h = result + (m/n − 1)·z + (m/n)·s·B A x', with z the running result without the base bias
        # (the adapters before this one included), or W x' on the dropped input x' = dropout(x) under dropout
        if result is None:
            result = layer.base_layer(x, *args, **kwargs)
        xd = dropout(x).to(A.dtype)
        if uses_dropout:
            base = F.linear(xd, _oriented(weight, layer.fan_in_fan_out).to(A.dtype))  # W x'
        else:
            base = (result - bias if bias is not None else result).to(A.dtype)  # z
        c = m / n
        lora = F.linear(F.linear(xd, A), B)  # B A x'
        return result + ((c - 1) * base + (c * s) * lora).to(result.dtype)

    # ---- merging ----------------------------------------------------------------------------------
    @staticmethod
    def merged_weights(layer: Any, adapter_name: str, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W' = (m/n) ⊙ (W_cur + ΔW), n = ‖W + ΔW‖ per output feature of the unmerged base W: the adapters merged
        before it are rescaled with the base, as the forward rescales their outputs."""
        out_axis = 1 if layer.fan_in_fan_out else 0  # the stored weight is (in, out) when fan_in_fan_out
        return _merge_rescaled(layer, adapter_name, weight, out_axis), bias

    @staticmethod
    def unmerged_weights(layer: Any, adapter_name: str, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_cur = W'/(m/n) − ΔW with the m/n recorded at merge."""
        return _unmerge_rescaled(layer, adapter_name, weight), bias


# ---------------------------------------------------------------------------------------------------
# DoRA on convolutions and embeddings (peft's forms, no fused kernel)
# ---------------------------------------------------------------------------------------------------
class _DoraWeightVariant:
    """DoRA where m and n = ‖W + ΔW‖ live along one axis of the base weight (``axis``: the output channels of a
    conv, the feature columns of an embedding); the norm runs over every other axis and is detached.

    Explained in: book/peft_differences.md
    """

    axis = 0

    @classmethod
    def _shape(cls, weight: torch.Tensor) -> list[int]:
        shape = [1] * weight.dim()
        shape[cls.axis] = -1
        return shape

    @classmethod
    def weights(cls, layer: Any, adapter_name: str, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, ΔW) whose sum the norm is taken of, in ``dtype``."""
        return norm_base(layer).to(dtype), layer.get_delta_weight(adapter_name).to(dtype)

    @classmethod
    def norm(cls, layer: Any, adapter_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """‖W + ΔW‖ along every axis but ``axis``, shaped to broadcast against W, detached, W + ΔW formed in
        ``dtype`` (float32 unless given; see :meth:`weights`)."""
        with torch.no_grad():
            W, delta = cls.weights(layer, adapter_name, dtype)
            return norm_except(W + delta, cls.axis)

    @classmethod
    def init(cls, layer: Any, adapter_name: str) -> None:
        A = layer.adapter_tensors(adapter_name)[0][1]
        dtype = (A.weight if isinstance(A, nn.Module) else A).dtype
        if (A.weight if isinstance(A, nn.Module) else A).is_meta:
            m = torch.empty(cls.m_shape(layer), device="meta", dtype=dtype)
        else:
            m = cls.m_from_norm(cls.norm(layer, adapter_name)).to(dtype)
        _add_magnitude(layer, adapter_name, m)

    @classmethod
    def merged_weights(cls, layer: Any, adapter_name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """W' = (m/n) ⊙ (W_cur + ΔW), n = ‖W + ΔW‖ of the unmerged base W, kept for the exact unmerge."""
        return _merge_rescaled(layer, adapter_name, weight, cls.axis), bias

    @classmethod
    def unmerged_weights(cls, layer: Any, adapter_name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        return _unmerge_rescaled(layer, adapter_name, weight), bias


def dense_conv_weights(layer: Any, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, ΔW) of a LoRA conv as dense (out, in, *kernel) kernels, float32.

    On a grouped conv (g groups) W holds only each group's own input channels, while ΔW = s·B∘A connects every
    input channel (A is dense, B keeps the groups apart): output channel o of group j sums B[o, q]·A[j·r/g + q].
    W goes into the dense layout with zeros outside its group, so ‖W + ΔW‖ is the norm of the kernel the layer
    applies.
    """
    base = layer.get_base_layer()
    W = norm_base(layer).float()  # (out, in/g, *k)
    g = base.groups
    if g == 1:
        return W, layer.get_delta_weight(adapter_name).float()
    A = layer.lora_A[adapter_name].weight.float()  # (r, in, *k)
    B = layer.lora_B[adapter_name].weight.float()  # (out, r/g, 1, …)
    out, per_group, r = W.shape[0], W.shape[1], A.shape[0]
    delta = torch.bmm(B.reshape(g, out // g, r // g), A.reshape(g, r // g, -1))  # per group (out/g, in·k)
    delta = delta.reshape(out, *A.shape[1:]) * layer.scaling[adapter_name]
    dense = W.new_zeros(delta.shape)
    for j in range(g):
        rows = slice(j * out // g, (j + 1) * out // g)
        dense[rows, j * per_group:(j + 1) * per_group] = W[rows]
    return dense, delta


class DoraConvVariant(_DoraWeightVariant):
    """DoRA on ``nn.Conv1d/2d/3d``: m per output channel, stored (1, out, 1, …) as in peft;
    h = base(x) + (m/n − 1)·(W ⋆ x) + (m/n)·s·B(A(x)). On a grouped conv n is the norm of the dense kernel
    W + ΔW (:func:`dense_conv_weights`; peft reshapes B·A out of its layout there), and merging is refused as for
    any LoRA on a grouped conv (no grouped weight holds W + ΔW).

    Explained in: book/peft_differences.md
    """

    axis = 0

    @classmethod
    def weights(cls, layer: Any, adapter_name: str, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, ΔW) in ``dtype``; on a grouped conv the dense kernels of :func:`dense_conv_weights`, always float32."""
        if layer.get_base_layer().groups == 1:
            return super().weights(layer, adapter_name, dtype)
        return dense_conv_weights(layer, adapter_name)

    @staticmethod
    def m_shape(layer: Any) -> tuple[int, ...]:
        w = layer._base_weight()
        return (1, w.shape[0]) + (1,) * (w.dim() - 2)

    @staticmethod
    def m_from_norm(n: torch.Tensor) -> torch.Tensor:
        return n.transpose(0, 1)  # (out, 1, 1, …) -> peft's (1, out, 1, …)

    @classmethod
    def forward(cls, layer: Any, adapter_name: str, x: torch.Tensor, result: torch.Tensor | None, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        base = layer.get_base_layer()
        if result is None:
            result = layer.base_layer(x, *args, **kwargs)
        W = base.weight
        n = cls.norm(layer, adapter_name, W.dtype).transpose(0, 1).to(W.dtype)  # (1, out, 1, …)
        c = magnitude(layer, adapter_name) / n
        dropout = layer.lora_dropout[adapter_name]
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if isinstance(dropout, nn.Identity) or not layer.training:
            xd = x
            wx = result - base.bias.view(1, -1, *([1] * (result.dim() - 2))) if base.bias is not None else result
        else:
            xd = dropout(x)
            conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[W.dim()]
            wx = conv(xd, W, None, base.stride, base.padding, base.dilation, base.groups)
        xd = xd.to(A.weight.dtype)
        return result + ((c - 1) * wx + c * B(A(xd)) * layer.scaling[adapter_name]).to(result.dtype)


class DoraEmbeddingVariant(_DoraWeightVariant):
    """DoRA on ``nn.Embedding``: m per embedding feature (dim,), as in peft; h = (m/n)·(E[x] + s·(A[:, x])ᵀ Bᵀ).

    Explained in: book/peft_differences.md
    """

    axis = 1

    @staticmethod
    def m_shape(layer: Any) -> tuple[int, ...]:
        return (layer._base_weight().shape[1],)

    @staticmethod
    def m_from_norm(n: torch.Tensor) -> torch.Tensor:
        return n.reshape(-1)

    @classmethod
    def forward(cls, layer: Any, adapter_name: str, x: torch.Tensor, result: torch.Tensor | None, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        if result is None:
            result = layer.base_layer(x, *args, **kwargs)
        n = cls.norm(layer, adapter_name).reshape(-1)
        c = magnitude(layer, adapter_name) / n.to(magnitude(layer, adapter_name).dtype)
        lora = layer._delta(x, adapter_name) * layer.scaling[adapter_name]
        return (c * result + c * lora).to(result.dtype)
