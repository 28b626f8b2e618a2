"""LoRA initialisations that read the base weight: PiSSA, OLoRA and LoftQ, and saving PiSSA/OLoRA as plain LoRA.

Default LoRA starts from B = 0, so ΔW = 0 and the base W is untouched. These start from a non-zero adapter
taken out of W, so the base must change to keep the output: the layer computes (W − s·B₀A₀) + s·B A, equal
to W x at step 0 (s = α/r, or α/√r with rsLoRA).

* **PiSSA** (Meng et al., 2024): W = U S Vᵀ; A₀ = diag(√(S_r/s))·V_rᵀ, B₀ = U_r·diag(√(S_r/s)), so that
  s·B₀A₀ = U_r S_r V_rᵀ, the best rank-r part of W; the base keeps the residual W − s·B₀A₀.
  ``"pissa_niter_N"`` uses the randomised SVD ``torch.svd_lowrank(W, r, niter=N)`` (fast, not exact).
* **OLoRA** (Büyükakyüz, 2024): W = Q R; B₀ = Q[:, :r], A₀ = R[:r]; base W − s·B₀A₀. As in peft, S is not
  divided by s, so the adapter starts at s times the QR piece.
* **LoftQ** (Li et al., 2023): alternately Q = quant(W − s·B A) and s·B A = SVD_r(W − deq(Q)); the base
  becomes deq(Q) and ‖W − (deq(Q) + s·B A)‖ is what falls with each iteration. Unlike peft (issue #1982),
  the factors carry 1/√s each, so the scaling does not inflate the low-rank part.

These match peft 0.21.2's ``pissa_init``/``olora_init`` operation for operation (outputs agree bit for bit),
except that peftlab orients a GPT-2 ``Conv1D`` weight as (out, in) for OLoRA and LoftQ too.

Explained in: book/lora_in_practice.ipynb
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from peftlab.quantization.nf4 import NF4Tensor, quantize_nf4

#: the init_lora_weights values peftlab implements (``pissa_niter_[N]`` stands for e.g. ``"pissa_niter_4"``)
INIT_CHOICES = (True, False, "gaussian", "pissa", "pissa_niter_[N]", "olora", "loftq")
PISSA_NITER = "pissa_niter_"
LOFTQ_BLOCK_SIZE = 64


def check_init_lora_weights(value: Any) -> None:
    """Raise ``ValueError`` naming the valid choices unless ``value`` is an implemented ``init_lora_weights``.

    Explained in: book/lora_in_practice.ipynb
    """
    if value in (True, False) or value in ("gaussian", "pissa", "olora", "loftq"):
        return
    if isinstance(value, str) and value.startswith(PISSA_NITER):
        if not value[len(PISSA_NITER):].isdigit():
            raise ValueError(
                f"init_lora_weights={value!r}: 'pissa_niter_' must end with the number of subspace iterations of "
                "the randomised SVD, e.g. 'pissa_niter_4' (or use 'pissa' for the exact SVD)"
            )
        return
    raise ValueError(
        f"init_lora_weights={value!r} is not implemented; valid values: {', '.join(map(repr, INIT_CHOICES))}"
    )


def reads_base_weight(init_lora_weights: Any) -> bool:
    """True for the initialisations that take the adapter out of the base weight (PiSSA, OLoRA, LoftQ).

    Explained in: book/lora_in_practice.ipynb
    """
    return isinstance(init_lora_weights, str) and (
        init_lora_weights.startswith("pissa") or init_lora_weights in ("olora", "loftq"))


def initialize(layer: Any, adapter_name: str, init_lora_weights: str, loftq_config: dict | None = None) -> None:
    """Run the initialisation ``init_lora_weights`` that reads W for one adapter of a LoRA linear layer.

    Explained in: book/lora_in_practice.ipynb
    """
    if init_lora_weights.startswith("pissa"):
        niter = None if init_lora_weights == "pissa" else int(init_lora_weights[len(PISSA_NITER):])
        pissa_init(layer, adapter_name, niter)
    elif init_lora_weights == "olora":
        olora_init(layer, adapter_name)
    elif init_lora_weights == "loftq":
        if not loftq_config:
            raise ValueError("init_lora_weights='loftq' needs loftq_config, e.g. LoftQConfig(loftq_bits=4, loftq_iter=1)")
        loftq_init(layer, adapter_name, loftq_config)
    else:
        raise ValueError(f"init_lora_weights={init_lora_weights!r} does not read the base weight")


def _oriented(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


def _float_base_weight(layer: Any, method: str) -> tuple[torch.Tensor, torch.dtype]:
    """The base weight as float32, laid out (out, in), and the dtype to store the new base in."""
    weight = layer._base_weight()
    if not weight.is_floating_point():
        raise TypeError(f"{method} needs a floating-point base weight, got {weight.dtype}")
    if callable(getattr(layer.get_base_layer(), "dequantize_weight", None)):
        warnings.warn(
            f"{method} on a quantised base: the residual base weight is quantised again, so the output at step 0 "
            "differs from the base model by that quantisation error. Initialise on the full-precision model, "
            "then quantize_model() it (QPiSSA quantises the residual)", UserWarning, stacklevel=4,
        )
    return _oriented(weight.detach().to(torch.float32), layer.fan_in_fan_out), weight.dtype


def _set_adapter(layer: Any, adapter_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    A.data = lora_A.to(A.dtype).contiguous()
    B.data = lora_B.to(B.dtype).contiguous()


def _check_rank(layer: Any, adapter_name: str, weight: torch.Tensor, method: str) -> int:
    r = layer.r[adapter_name]
    if r > min(weight.shape):
        raise ValueError(f"{method} with r={r} needs r <= min(out, in) = {min(weight.shape)} for a weight of shape "
                         f"{tuple(weight.shape)}; lower r (or rank_pattern for this module)")
    return r


@torch.no_grad()
def pissa_init(layer: Any, adapter_name: str, niter: int | None = None) -> None:
    """PiSSA: A₀ = diag(√(S_r/s))·V_rᵀ, B₀ = U_r·diag(√(S_r/s)) from the SVD W = U S Vᵀ; base ← W − s·B₀A₀.

    ``niter`` switches to the randomised ``torch.svd_lowrank(W, r, niter)``, which draws from the global RNG.

    Explained in: book/lora_in_practice.ipynb
    """
    weight, dtype = _float_base_weight(layer, "PiSSA")
    r = _check_rank(layer, adapter_name, weight, "PiSSA")
    s = layer.scaling[adapter_name]
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)  # W = U diag(S) Vh
        Ur, Sr, Vhr = U[:, :r], S[:r] / s, Vh[:r]
    else:
        Ur, Sr, V = torch.svd_lowrank(weight, r, niter=niter)
        Sr, Vhr = Sr / s, V.t()
    lora_A = torch.diag(torch.sqrt(Sr)) @ Vhr  # (r, in)
    lora_B = Ur @ torch.diag(torch.sqrt(Sr))  # (out, r)
    _set_adapter(layer, adapter_name, lora_A, lora_B)
    residual = weight - s * lora_B @ lora_A  # W_res = W − s·B₀A₀ = the part beyond the top r directions
    layer._set_base_weight(_oriented(residual.to(dtype), layer.fan_in_fan_out))


@torch.no_grad()
def olora_init(layer: Any, adapter_name: str) -> None:
    """OLoRA: B₀ = Q[:, :r] (orthonormal), A₀ = R[:r] from W = Q R; base ← W − s·B₀A₀ (S not divided by s, as peft).

    Explained in: book/lora_in_practice.ipynb
    """
    weight, dtype = _float_base_weight(layer, "OLoRA")
    r = _check_rank(layer, adapter_name, weight, "OLoRA")
    s = layer.scaling[adapter_name]
    Q, R = torch.linalg.qr(weight)
    lora_A, lora_B = R[:r].contiguous(), Q[:, :r].contiguous()
    _set_adapter(layer, adapter_name, lora_A, lora_B)
    residual = weight - s * lora_B @ lora_A
    layer._set_base_weight(_oriented(residual.to(dtype), layer.fan_in_fan_out))


# ---------------------------------------------------------------------------------------------------
# LoftQ
# ---------------------------------------------------------------------------------------------------
@dataclass
class LoftQResult:
    """What :func:`loftq_decompose` returns: W ≈ deq(``qweight``) + s·``lora_B``·``lora_A``.

    ``errors[t]`` is ‖W − (deq(Q_t) + s·B_t A_t)‖_F after iteration t+1; ``qlora_error`` is QLoRA's
    ‖W − deq(quant(W))‖_F (B = 0).

    Explained in: book/lora_in_practice.ipynb
    """

    qweight: NF4Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    errors: list[float] = field(default_factory=list)
    qlora_error: float = 0.0


@torch.no_grad()
def loftq_decompose(weight: torch.Tensor, r: int, scaling: float = 1.0, num_iter: int = 1,
                    block_size: int = LOFTQ_BLOCK_SIZE) -> LoftQResult:
    """LoftQ's alternating minimisation of ‖W − (Q + s·B A)‖_F, W of shape (out, in), Q in NF4.

    t = 1 … num_iter: Q_t = quant(W − s·B_{t−1}A_{t−1}) (B₀A₀ = 0), then U S Vᵀ = SVD(W − deq(Q_t)) and
    B_t = U_r·diag(√(S_r/s)), A_t = diag(√(S_r/s))·V_rᵀ, so that s·B_t A_t is the best rank-r fit of the
    quantisation residual whatever the scaling s.

    Explained in: book/lora_in_practice.ipynb
    """
    if num_iter < 1:
        raise ValueError(f"num_iter={num_iter}: LoftQ needs at least one iteration")
    if scaling <= 0:
        raise ValueError(f"scaling={scaling}: the LoRA scaling must be positive")
    W = weight.detach().to(torch.float32)
    if r > min(W.shape):
        raise ValueError(f"LoftQ with r={r} needs r <= min(out, in) = {min(W.shape)}")
    qlora = quantize_nf4(W, block_size)
    result = LoftQResult(qlora, W.new_zeros(r, W.shape[1]), W.new_zeros(W.shape[0], r),
                         qlora_error=float(torch.linalg.norm(W - qlora.dequantize(torch.float32))))
    low_rank = torch.zeros_like(W)  # s·B A
    for _ in range(num_iter):
        q = quantize_nf4(W - low_rank, block_size)  # Q_t = quant(W − s·B A)
        residual = W - q.dequantize(torch.float32)
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        root = torch.sqrt(S[:r] / scaling)  # √(S_r/s) on each factor: s·B A = U_r S_r V_rᵀ
        lora_B, lora_A = U[:, :r] * root, root[:, None] * Vh[:r]
        low_rank = scaling * lora_B @ lora_A
        result.qweight, result.lora_A, result.lora_B = q, lora_A, lora_B
        result.errors.append(float(torch.linalg.norm(residual - low_rank)))
    return result


@torch.no_grad()
def loftq_init(layer: Any, adapter_name: str, loftq_config: dict) -> None:
    """LoftQ: A, B from :func:`loftq_decompose`; the base weight becomes deq(Q) (in the base's dtype, as peft).

    ``quantize_model`` later stores exactly that Q (deq(Q) quantises back to itself).

    Explained in: book/lora_in_practice.ipynb
    """
    if callable(getattr(layer.get_base_layer(), "dequantize_weight", None)):
        raise ValueError("LoftQ needs the full-precision base weight, but this base layer is already quantised; "
                         "apply init_lora_weights='loftq' to the unquantised model, then quantize_model() it")
    weight = layer._base_weight()
    dtype = weight.dtype
    W = _oriented(weight.detach().to(torch.float32), layer.fan_in_fan_out)
    r = _check_rank(layer, adapter_name, W, "LoftQ")
    out = loftq_decompose(W, r, layer.scaling[adapter_name], int(loftq_config.get("loftq_iter", 1)))
    _set_adapter(layer, adapter_name, out.lora_A, out.lora_B)
    layer._set_base_weight(_oriented(out.qweight.dequantize(torch.float32).to(dtype), layer.fan_in_fan_out))


# ---------------------------------------------------------------------------------------------------
# PiSSA / OLoRA -> plain LoRA on the unmodified base
# ---------------------------------------------------------------------------------------------------
def subtract_mutated_init(state: dict[str, torch.Tensor],
                          initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained PiSSA/OLoRA tensors -> a plain LoRA on the original W: A' = [A; A₀], B' = [B, −B₀].

    W_res + s·B A = W + ΔW with W = W_res + s·B₀A₀ gives ΔW = s(B A − B₀A₀) = s·[B, −B₀]·[A; A₀]: an adapter
    of rank 2r with the same scaling (r and α both doubled, see :func:`converted_config`). Other tensors
    (``modules_to_save``, trained biases) are kept as they are.

    Explained in: book/lora_in_practice.ipynb
    """
    missing = sorted(k for k in state if k.endswith(("lora_A.weight", "lora_B.weight")) and k not in initial)
    if missing:
        raise ValueError(f"the initial adapter lacks {len(missing)} tensors of this adapter (e.g. {missing[:2]}); "
                         "pass the folder saved right after get_peft_model(...), before training")
    out = {}
    for k, t in state.items():
        if k.endswith("lora_A.weight"):
            out[k] = torch.cat([t, initial[k].to(t)], dim=0)  # (2r, in)
        elif k.endswith("lora_B.weight"):
            out[k] = torch.cat([t, -initial[k].to(t)], dim=1)  # (out, 2r)
        else:
            out[k] = t
    return out


def converted_config(config: Any) -> Any:
    """The config of the converted adapter: r and α doubled (α·√2 with rsLoRA, so that α/√r stays), rank and
    alpha patterns doubled, ``init_lora_weights=True``. Changes ``config`` in place and returns it.

    Explained in: book/lora_in_practice.ipynb
    """
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha = config.lora_alpha * math.sqrt(2) if config.use_rslora else config.lora_alpha * 2
    if config.rank_pattern:
        config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    if config.alpha_pattern:
        config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return config


def check_conversion(config: Any) -> None:
    """Refuse a conversion that would be wrong, before anything is written.

    Explained in: book/lora_in_practice.ipynb
    """
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("path_initial_model_for_weight_conversion cannot be combined with use_rslora=True and "
                         "rank_pattern/alpha_pattern: doubling r changes α/√r per module differently")
    if getattr(config, "use_dora", False):
        raise ValueError("path_initial_model_for_weight_conversion does not convert DoRA adapters: the magnitude "
                         "m/‖W + ΔW‖ is not a difference of two low-rank terms")
    if not (isinstance(config.init_lora_weights, str) and config.init_lora_weights.startswith(("pissa", "olora"))):
        warnings.warn(
            f"path_initial_model_for_weight_conversion converts PiSSA/OLoRA adapters; this one has "
            f"init_lora_weights={config.init_lora_weights!r}", UserWarning, stacklevel=3,
        )
