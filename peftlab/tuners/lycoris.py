"""What LoHa and LoKr share (the LyCORIS family, arXiv 2309.14859): a config, a layer base and a tuner base.

Both methods build a whole weight update ΔW (shaped like the frozen weight W₀) from a few small factors and
add it: h = op(x; W₀ + ΔW), with ``op`` the wrapped layer's own product (``F.linear`` or the convolution).
They differ only in how ΔW is built (a Hadamard product of two low-rank matrices, or a Kronecker product),
so each method's layer implements :meth:`LycorisLayer.make_delta` and nothing else of the forward.

Shared here, as in peft 0.21.2:

* ``scaling = α / r`` (no rsLoRA variant);
* ``module_dropout``: in training each adapter is skipped for a whole step with probability p;
* ``rank_dropout``: in training each output row of ΔW is dropped with probability p (LoHa rescales the kept
  rows by 1/mean(mask); LoKr only when ``rank_dropout_scale=True``);
* Linear, Conv1d and Conv2d bases (grouped convolutions too); the convolution's kernel is either flattened
  into the input dimension (ΔW of shape (out, in·k)) or, with ``use_effective_conv2d=True`` and a kernel
  larger than 1, kept as a small core tensor (CP/Tucker form, :func:`cp_weight`).

Explained in: book/loha_lokr.ipynb
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.config import TargetingConfig
from peftlab.tuners.base import AdapterLayer, BaseTuner, watched_by_hooks

# model_type -> default targets (peft 0.21.2's TRANSFORMERS_MODELS_TO_LOHA/LOKR_TARGET_MODULES_MAPPING, which
# copy LoRA's): used when a config leaves target_modules=None.
DEFAULT_TARGET_MODULES: dict[str, Any] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"], "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

#: the layer types peft 0.21.2 wraps with LoHa and LoKr (not GPT-2's Conv1D, not embeddings, not Conv3d)
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


# ---------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------
def _check_probability(name: str, p: Any) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name}={p!r} must be a probability in [0, 1); 0.0 turns it off")


@dataclass
class LycorisConfig(TargetingConfig):
    """The fields LoHa and LoKr share (peft's ``LycorisConfig`` plus r, α, dropouts, effective conv, init).

    peft's configs for these methods have no ``bias`` and no ``fan_in_fan_out``: they stay at their
    defaults and are not written to ``adapter_config.json``.

    Explained in: book/loha_lokr.ipynb
    """

    RANK_FIELD, ALPHA_FIELD, INIT_FIELD = "r", "alpha", "init_weights"
    BIAS_MODES = ("none",)
    ABSENT_FIELDS = frozenset({"bias", "fan_in_fan_out"})
    #: accepted values of ``init_weights`` besides True and False
    INIT_CHOICES: ClassVar[tuple[str, ...]] = ()

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool | str = True

    def __post_init__(self) -> None:
        super().__post_init__()  # targets, patterns, layers, modules_to_save, r > 0 and rank_pattern values
        alphas = [("alpha", self.alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]
        for name, value in alphas:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r}: α must be a finite number (scaling = α / r), e.g. 8")
        _check_probability("rank_dropout", self.rank_dropout)
        _check_probability("module_dropout", self.module_dropout)
        if not isinstance(self.use_effective_conv2d, bool):
            raise TypeError(f"use_effective_conv2d={self.use_effective_conv2d!r} must be True or False")
        if not (isinstance(self.init_weights, bool) or self.init_weights in self.INIT_CHOICES):
            valid = ", ".join(repr(v) for v in (True, False, *self.INIT_CHOICES))
            raise ValueError(f"init_weights={self.init_weights!r}; valid values: {valid}")


# ---------------------------------------------------------------------------------------------------
# the effective (CP / Tucker-2) form of a convolution kernel
# ---------------------------------------------------------------------------------------------------
def cp_weight(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A kernel rebuilt from a core and two factor matrices: K[p, q, k, l] = Σ_ij t[i, j, k, l]·wa[i, p]·wb[j, q].

    ``t`` (r, r, kh, kw), ``wa`` (r, out), ``wb`` (r, in) → (out, in, kh, kw): rank ≤ r in both channel modes,
    the spatial kernel kept whole (FedPara's Proposition 3, "effective" conv).

    Explained in: book/loha_lokr.ipynb
    """
    return torch.einsum("i j k l, i p, j q -> p q k l", t, wa, wb)


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default initialisation (Kaiming-uniform with a = √5), the one peft uses for these factors."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


# ---------------------------------------------------------------------------------------------------
# layer
# ---------------------------------------------------------------------------------------------------
class LycorisLayer(AdapterLayer):
    """A frozen Linear/Conv1d/Conv2d plus named adapters that each contribute a weight update ΔW.

    h = op(x; W₀ + Σ_a ΔW_a) with ``op`` the base layer's product; a method implements ``update_layer`` and
    :meth:`make_delta` (ΔW of one adapter, before scaling, laid out as ``delta_shape``).

    Explained in: book/loha_lokr.ipynb
    """

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "module_dropout")
    #: True: LoHa rescales the kept rows after rank dropout by 1/mean(mask); LoKr asks its config
    rescale_rank_dropout: bool = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        if not isinstance(base, SUPPORTED_LAYERS):
            raise ValueError(f"{type(self).__name__} wraps nn.Linear, nn.Conv1d or nn.Conv2d, not "
                             f"{type(base).__name__}")
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        if isinstance(base, nn.Linear):
            self.kernel_size: tuple[int, ...] = ()
            self.in_per_group = self.in_features
            self.weight_shape = (self.out_features, self.in_features)
        else:  # conv: weight (out, in / groups, *kernel)
            self.kernel_size = tuple(base.kernel_size)
            self.in_per_group = base.in_channels // base.groups
            self.weight_shape = (base.out_channels, self.in_per_group, *self.kernel_size)

    # ---- settings -------------------------------------------------------------------------------
    def _set_hyperparameters(self, adapter_name: str, r: int, alpha: float, rank_dropout: float,
                             module_dropout: float) -> None:
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r={r!r} for adapter {adapter_name!r}: the rank must be a positive integer (e.g. 8)")
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r  # ΔW is scaled by α / r
        self.rank_dropout[adapter_name] = rank_dropout
        self.module_dropout[adapter_name] = module_dropout

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """scaling = scale · α/r: weight one adapter at run time."""
        if adapter_name in self.r:
            self.scaling[adapter_name] = scale * self.alpha[adapter_name] / self.r[adapter_name]

    def uses_effective_conv(self, use_effective_conv2d: bool) -> bool:
        """The CP form applies to convolutions whose kernel is larger than 1 (a 1×1 conv is a matrix product)."""
        return bool(use_effective_conv2d) and bool(self.kernel_size) and math.prod(self.kernel_size) > 1

    @property
    def flat_shape(self) -> tuple[int, int]:
        """ΔW as a matrix: (out, in/groups · kernel elements)."""
        return self.weight_shape[0], math.prod(self.weight_shape[1:])

    def _init_tensor(self, *shape: int) -> torch.Tensor:
        """An empty float32 CPU tensor; initialised on the CPU (as peft does, so seeds give the same values),
        then moved next to the base weight by :meth:`_as_parameter`."""
        return torch.empty(*shape)

    def _as_parameter(self, t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.to(**self._new_tensor_kwargs()))

    # ---- ΔW -------------------------------------------------------------------------------------
    def make_delta(self, adapter_name: str) -> torch.Tensor:
        """ΔW of one adapter before scaling (any shape with the weight's number of entries)."""
        raise NotImplementedError

    def _delta_weight(self, adapter_name: str, rank_dropout: bool = False) -> torch.Tensor:
        """ΔW · α/r in the base weight's layout, with rank dropout when asked."""
        delta = (self.make_delta(adapter_name) * self.scaling[adapter_name]).reshape(self.weight_shape)
        if rank_dropout:  # drop whole output rows of ΔW (the mask is drawn on the CPU, as in peft)
            keep = (torch.rand(delta.shape[0]) > self.rank_dropout[adapter_name]).to(delta.dtype)
            if self._rescale_rank_dropout(adapter_name):  # 1/mean(mask); every row dropped: ΔW = 0 (peft: 0/0 = NaN)
                keep = keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny)
            delta = delta * keep.view(-1, *[1] * (delta.dim() - 1)).to(delta.device)
        return delta

    def _rescale_rank_dropout(self, adapter_name: str) -> bool:
        return self.rescale_rank_dropout

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW = α/r · (method's product), shaped like the base weight.

        Explained in: book/loha_lokr.ipynb
        """
        return self._delta_weight(adapter_name)

    # ---- forward --------------------------------------------------------------------------------
    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's product with another weight: x Wᵀ + b, or the same convolution."""
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, bias)
        return base._conv_forward(x, weight, bias)  # stride, padding (mode), dilation and groups of the base

    def _plain_base(self, x: torch.Tensor, deltas: list[torch.Tensor], args: tuple, kwargs: dict) -> bool:
        """Whether W₀ + ΔW can go through one product: a plain torch layer (no hooks, no extra arguments)
        whose weight, input and ΔW share a dtype."""
        base = self._modules["base_layer"]
        if type(base) not in SUPPORTED_LAYERS or watched_by_hooks(base) or args or kwargs:
            return False
        w = base._parameters["weight"]
        return x.dtype == w.dtype and all(d.dtype == w.dtype for d in deltas)

    def adapter_forward(self, x: torch.Tensor, adapters: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """h = op(x; W₀ + Σ ΔW): one product with the updated weight instead of op(x; W₀) + op(x; ΔW), which
        saves a product over all tokens in the forward and another in the backward."""
        training = self.training
        kept: list[tuple[str, torch.Tensor | None]] = []
        for name in adapters:
            # module dropout: skip this adapter for the whole step (peft draws even when p = 0; so do we, so a
            # seeded training run consumes the same random numbers in both libraries)
            if training and not torch.rand(1) > self.module_dropout[name]:
                continue
            rank_dropout = training and bool(self.rank_dropout[name])  # its mask is drawn now, in peft's order
            kept.append((name, self._delta_weight(name, rank_dropout=True) if rank_dropout else None))
        if not kept:
            return self.base_layer(x, *args, **kwargs)
        if len(kept) == 1 and kept[0][1] is None and torch.is_grad_enabled():
            fused = self.fused_forward(x, kept[0][0], args, kwargs)
            if fused is not None:
                return fused
        deltas = [self._delta_weight(name) if d is None else d for name, d in kept]
        if self._plain_base(x, deltas, args, kwargs):
            base = self._modules["base_layer"]
            weight = base._parameters["weight"]
            for d in deltas:
                weight = weight + d  # W₀ + ΔW
            return self._op(x, weight, base._parameters["bias"])
        # a base with hooks, extra arguments or another dtype (e.g. bf16 with float32 adapters): add op(x; ΔW)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for d in deltas:
            result = result + self._op(x.to(d.dtype), d, None)
        return result.to(out_dtype)

    def fused_forward(self, x: torch.Tensor, adapter_name: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """Training with one adapter: the method's single autograd node for base + adapter, or None (default)."""
        return None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling}"


# ---------------------------------------------------------------------------------------------------
# tuner
# ---------------------------------------------------------------------------------------------------
class LycorisTuner(BaseTuner):
    """Injects LoHa or LoKr layers (see :class:`~peftlab.tuners.base.BaseTuner`).

    Explained in: book/loha_lokr.ipynb
    """

    default_target_modules = DEFAULT_TARGET_MODULES

    def layer_kwargs(self, config: LycorisConfig, key: str, target: nn.Module) -> dict[str, Any]:
        r, alpha = config.rank_and_alpha(key)
        return {"r": r, "alpha": alpha, "rank_dropout": config.rank_dropout, "module_dropout": config.module_dropout,
                "init_weights": config.init_weights, "use_effective_conv2d": config.use_effective_conv2d}
