"""NF4: QLoRA's 4-bit NormalFloat block-wise quantisation, in pure PyTorch (CPU and GPU, no bitsandbytes).

A weight is read row-major and cut into blocks of ``block_size`` (64) consecutive values. Each block keeps
its absmax c (float32) and, per value, the index k of the NF4 level nearest to w / c, so that

    w ≈ c · q_k,   q = the 16 NF4 levels (−1 … 0 … 1, exact zero, 7 negative and 8 positive),

which are quantiles of N(0, 1) rescaled to [−1, 1]: equal-probability bins for normally distributed weights.
Two 4-bit indices share one byte (the first in the high nibble), so a weight costs 4 bits plus
32/``block_size`` bits for its block's absmax: 4.5 bits at block size 64 (QLoRA's double quantisation of
the absmax, which brings this to 4.127 bits, is not implemented). A last block shorter than
``block_size`` is padded with zeros, which leave its absmax unchanged.

Explained in: book/lora_in_practice.ipynb
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: The 16 NF4 levels, as bitsandbytes stores them (QLoRA, Dettmers et al. 2023, appendix E).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
#: Decision boundaries between neighbouring levels: a normalised value goes to the nearest level.
_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
ZERO_CODE = 7  # index of the level 0.0 (pads an odd-length tensor to whole bytes)


def nf4_levels(offset: float = 0.9677083) -> torch.Tensor:
    """The NF4 levels built from normal quantiles: q = Φ⁻¹(p)/max, p evenly spaced from ``offset`` to ½.

    8 positive levels Φ⁻¹(linspace(offset, ½, 9)[:-1]), 7 negative ones −Φ⁻¹(linspace(offset, ½, 8)[:-1]) and
    an exact 0, sorted and divided by the largest (so ±1 are levels). ``offset`` is QLoRA's
    ½(1/(2·15) + 1 − 1/(2·16)) choice, which keeps Φ⁻¹ finite. Reproduces :data:`NF4_CODE`.

    Explained in: book/lora_in_practice.ipynb
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (levels / levels.max()).float()


@dataclass
class NF4Tensor:
    """A tensor in NF4: packed 4-bit level indices plus one float32 absmax per block.

    ``codes`` is uint8 of length ⌈n/2⌉ (two indices per byte, the first in the high nibble), ``absmax`` is
    float32 of length ⌈n/block_size⌉; ``shape`` and ``dtype`` are the original tensor's.

    Explained in: book/lora_in_practice.ipynb
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    block_size: int
    dtype: torch.dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: n/2 for the codes and 4 per block for the absmax."""
        return self.codes.numel() * self.codes.element_size() + self.absmax.numel() * self.absmax.element_size()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """w = c_block · q_k for every value, in ``dtype`` (default: the original dtype)."""
        return dequantize_nf4(self, dtype)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64) -> NF4Tensor:
    """Quantise ``weight`` to NF4 in blocks of ``block_size`` values: c = max|w| per block, k = nearest level to w/c.

    Explained in: book/lora_in_practice.ipynb
    """
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size={block_size!r}: it must be a positive even integer (QLoRA uses 64)")
    if not weight.is_floating_point():
        raise TypeError(f"quantize_nf4 takes a floating-point tensor, got dtype {weight.dtype}")
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    n_blocks = max(1, -(-n // block_size))
    blocks = F.pad(flat, (0, n_blocks * block_size - n)).view(n_blocks, block_size)  # zeros leave absmax as is
    absmax = blocks.abs().amax(dim=1)  # c, one per block
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)  # w/c ∈ [−1, 1]
    index = torch.bucketize(normed, _MIDPOINTS.to(normed.device)).to(torch.uint8).view(-1)[:n]
    if n % 2:
        index = torch.cat([index, index.new_full((1,), ZERO_CODE)])
    codes = (index[0::2] << 4) | index[1::2]  # two 4-bit indices per byte
    return NF4Tensor(codes.contiguous(), absmax, weight.shape, block_size, weight.dtype)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor an :class:`NF4Tensor` stands for: w = c_block · q_k, in ``dtype`` (default: the original).

    Explained in: book/lora_in_practice.ipynb
    """
    n = q.numel()
    index = torch.stack([q.codes >> 4, q.codes & 0xF], dim=1).view(-1)[:n].long()
    values = NF4_CODE.to(q.absmax.device)[index]
    n_blocks = q.absmax.numel()
    values = F.pad(values, (0, n_blocks * q.block_size - n)).view(n_blocks, q.block_size) * q.absmax.unsqueeze(1)
    return values.view(-1)[:n].view(q.shape).to(dtype or q.dtype)


# ---------------------------------------------------------------------------------------------------
# a frozen 4-bit linear layer
# ---------------------------------------------------------------------------------------------------
class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in NF4: y = x · deq(Q)ᵀ + b, computed in ``compute_dtype``.

    Holds the buffers ``weight_codes`` (uint8, two 4-bit codes per byte) and ``weight_absmax`` (float32, one
    per block) and a frozen ``bias``. Each forward dequantises the weight, then runs ``F.linear``: memory is
    saved, time is not. LoRA wraps it like an ``nn.Linear`` (QLoRA); it counts as linear for ``"all-linear"``.

    Explained in: book/lora_in_practice.ipynb
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block_size: int = 64,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.compute_dtype = compute_dtype
        n = in_features * out_features
        self.register_buffer("weight_codes", torch.full((-(-n // 2),), ZERO_CODE * 17, dtype=torch.uint8,
                                                         device=device))
        self.register_buffer("weight_absmax", torch.zeros(max(1, -(-n // block_size)), dtype=torch.float32,
                                                          device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64,
                    compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """Quantise an ``nn.Linear``; ``compute_dtype`` defaults to the linear layer's dtype."""
        w = linear.weight
        dtype = compute_dtype or w.dtype
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size=block_size,
                    compute_dtype=dtype, device=w.device)
        layer.set_weight_(w.detach())
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().to(dtype).clone()
        return layer

    @property
    def quantized_weight(self) -> NF4Tensor:
        """The stored weight as an :class:`NF4Tensor` (shares the buffers)."""
        return NF4Tensor(self.weight_codes, self.weight_absmax, torch.Size((self.out_features, self.in_features)),
                         self.block_size, self.compute_dtype)

    def dequantize_weight(self) -> torch.Tensor:
        """deq(Q), shape (out, in), in the compute dtype."""
        return dequantize_nf4(self.quantized_weight, self.compute_dtype)

    def set_weight_(self, weight: torch.Tensor) -> None:
        """Store a new weight (out, in), quantising it to NF4 (lossy: the stored weight is deq(quant(weight)))."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a Linear4bit "
                             f"({self.out_features}, {self.in_features})")
        q = quantize_nf4(weight, self.block_size)
        self.weight_codes = q.codes.to(self.weight_codes.device)
        self.weight_absmax = q.absmax.to(self.weight_absmax.device)

    def dequantize_module(self) -> nn.Linear:
        """A frozen ``nn.Linear`` holding deq(Q) and the bias, in the compute dtype."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight_codes.device, dtype=self.compute_dtype)
        linear.weight.data = self.dequantize_weight()
        if self.bias is not None:
            linear.bias.data = self.bias.detach().clone()
        linear.requires_grad_(False)
        return linear

    def requantize(self, linear: nn.Linear) -> Linear4bit:
        """A new ``Linear4bit`` with this layer's block size and compute dtype holding ``linear`` quantised."""
        return Linear4bit.from_linear(linear, self.block_size, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.to(self.compute_dtype), self.dequantize_weight(), self.bias)  # y = x · deq(Q)ᵀ + b
        return out.to(x.dtype) if x.is_floating_point() else out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, compute_dtype={self.compute_dtype}")


# ---------------------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------------------
def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(model: nn.Module, block_size: int = 64, skip: Sequence[str] = ("lm_head",),
                   compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a frozen :class:`Linear4bit`; returns ``model``.

    ``skip`` names modules to keep (a full name or its last dotted parts, as in ``target_modules``); the
    output head is kept by default. Inside an adapter layer only the frozen base layer is quantised, never
    the adapter's own tensors or ``modules_to_save`` copies. Linear layers of ``nn.MultiheadAttention``
    (read directly by its functional forward) are left alone.

    Explained in: book/lora_in_practice.ipynb
    """
    if isinstance(skip, str):
        skip = (skip,)

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, nn.MultiheadAttention):
            return
        if hasattr(module, "adapter_layer_names"):  # an adapter layer: only its frozen base is a candidate
            children = [("base_layer", module.base_layer)]
        elif hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
            children = [("original_module", module.original_module)]
        else:
            children = list(module.named_children())
        for name, child in children:
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.Linear) and not _skipped(full, skip):
                setattr(module, name, Linear4bit.from_linear(child, block_size, compute_dtype))
            else:
                visit(child, full)

    visit(model, "")
    return model


def memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (each storage counted once).

    Explained in: book/lora_in_practice.ipynb
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total
