"""Merging LoRA adapters: PEFT's ``add_weighted_adapter`` and its eleven combination types.

One adapter at one layer is a pair of factors, A (r × in) and B (out × r), with scaling s = α/r, so its
weight change is ΔWᵢ = sᵢ Bᵢ Aᵢ. Merging T adapters with weights wᵢ can mean two different things:

* **exact** — combine the ΔWᵢ and factor the result again:
  ``cat``  A' = [w₁s₁A₁; …; w_T s_T A_T], B' = [B₁ … B_T]  ⇒  B'A' = Σᵢ wᵢ ΔWᵢ exactly (rank Σ rᵢ);
  ``svd``, ``ties_svd``, ``dare_*_svd``, ``magnitude_prune_svd`` — merge the full ΔWᵢ with task arithmetic,
  TIES, DARE or magnitude pruning, then keep the top ``svd_rank`` singular directions: B' = U_k S_k, A' = V_kᵀ.
* **factor by factor** — ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` merge the
  A's and the B's separately. Each weight is split between the factors,
  A gets sgn(wᵢsᵢ)·√|wᵢsᵢ|, B gets √|wᵢsᵢ|, so (for ``linear``)

      B'A' = (Σᵢ √|wᵢsᵢ| Bᵢ)(Σⱼ sgn(wⱼsⱼ)√|wⱼsⱼ| Aⱼ) = Σᵢ wᵢ ΔWᵢ + Σ_{i≠j} (cross terms Bᵢ Aⱼ)

  — exact for one adapter, an approximation for several (see :func:`cross_term_error`).

The merged adapter has r = α = its new rank, i.e. scaling 1, so the weights and scalings live in its
tensors. These are peft 0.21's rules (``book/data/peft_weighting_history.json`` records how they changed
across peft versions).

Explained in: book/merging_adapters.ipynb
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from peftlab.merging.methods import merge_tensors
from peftlab.merging.prune import SIGN_METHODS, _check_density

if TYPE_CHECKING:
    from peftlab.tuners.lora.config import LoraConfig
    from peftlab.tuners.lora.model import LoraModel

#: combination type -> the merge method applied (to the factors, or to the full ΔW for the svd family)
BASE_METHOD: dict[str, str] = {
    "svd": "task_arithmetic",
    "linear": "task_arithmetic",
    "cat": "task_arithmetic",
    "ties": "ties",
    "ties_svd": "ties",
    "dare_ties": "dare_ties",
    "dare_linear": "dare_linear",
    "dare_ties_svd": "dare_ties",
    "dare_linear_svd": "dare_linear",
    "magnitude_prune": "magnitude_prune",
    "magnitude_prune_svd": "magnitude_prune",
}
COMBINATION_TYPES: tuple[str, ...] = tuple(BASE_METHOD)
#: merge A's and B's separately (all source ranks must be equal; new rank = that rank)
FACTOR_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
#: merge the full ΔW, then factor it with an SVD (new rank = svd_rank or the largest source rank)
SVD_TYPES = ("svd", "ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd")
#: types that trim, so they need ``density``
DENSITY_TYPES = tuple(t for t in COMBINATION_TYPES if BASE_METHOD[t] != "task_arithmetic")


@dataclass
class LoraFactors:
    """One adapter at one layer, in 2-D form: A (r × in·kernel), B (out × r), ΔW = scaling · B A.

    Embedding layers store A as r × num_embeddings and B as dim × r, so the same form holds.

    Explained in: book/merging_adapters.ipynb
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    bias: torch.Tensor | None = None  # lora_B's bias (lora_bias=True), shape (out,)
    #: the layer stores its weight as (in, out): GPT-2's Conv1D (fan_in_fan_out) and nn.Embedding
    transposed: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A in (out, in·kernel) form."""
        return (self.B @ self.A) * self.scaling  # ΔW = s · B A, shape (out, in·kernel)

    def layout_delta_weight(self) -> torch.Tensor:
        """ΔW laid out like the layer's weight ((in, out) when ``transposed``), computed as peft's
        ``get_delta_weight`` does, so DARE's random masks fall on the same entries."""
        delta = self.B @ self.A
        return (delta.T if self.transposed else delta) * self.scaling


# ---------------------------------------------------------------------------------------------------
# One layer: the factors of the merged adapter
# ---------------------------------------------------------------------------------------------------
def factor_weights(weight: float, scaling: float) -> tuple[float, float]:
    """How peft 0.21 splits weight·scaling between the factors: (for A, for B) = (sgn·√|w s|, √|w s|).

    The sign goes on A only, so a negative weight negates the adapter instead of cancelling out.

    Explained in: book/merging_adapters.ipynb
    """
    weight_with_scaling = weight * scaling
    sign = 1 if weight_with_scaling >= 0 else -1
    return math.sqrt(abs(weight_with_scaling)) * sign, math.sqrt(abs(weight_with_scaling))


def _pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A / columns of B up to ``rank`` (they add nothing to B A)."""
    k = A.shape[0]
    if k >= rank:
        return A, B
    A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
    B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    return A, B


def svd_factors(delta: torch.Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True,
                driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ΔW ≈ B A with the top-``rank`` singular directions: B = U_k diag(S_k), A = V_kᵀ.

    ``clamp`` (a quantile in (0, 1]) clips the entries of both factors to ±quantile(|·|) as peft does.
    A rank above min(out, in) is padded with zeros.

    Explained in: book/merging_adapters.ipynb
    """
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.shape[0])
    U = U[:, :k] @ torch.diag(S[:k])  # B = U_k S_k, (out, k)
    Vh = Vh[:k, :]  # A = V_kᵀ, (k, in)
    if clamp is not None:
        dist = torch.cat([U.flatten(), Vh.flatten()])
        hi_val = torch.quantile(dist, clamp)
        U = U.clamp(-hi_val, hi_val)
        Vh = Vh.clamp(-hi_val, hi_val)
    return _pad_rank(Vh, U, rank)


def combine_lora_factors(factors: Sequence[LoraFactors], weights: Sequence[float], combination_type: str,
                         rank: int, density: float | None = None,
                         majority_sign_method: Literal["total", "frequency"] = "total",
                         svd_clamp: float | None = None, svd_full_matrices: bool = True,
                         svd_driver: str | None = None, generator: torch.Generator | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The merged adapter's (A', B', bias') at one layer, for a scaling of 1 (r = α = ``rank``).

    ``factors`` and ``weights`` are the source adapters present at this layer. DARE draws its masks from
    ``generator`` (the global torch RNG when it is None, in peft's order: the A's, then the B's).

    Explained in: book/merging_adapters.ipynb
    """
    if combination_type not in BASE_METHOD:
        raise ValueError(f"combination_type={combination_type!r}; valid types: {', '.join(COMBINATION_TYPES)}")
    method = BASE_METHOD[combination_type]
    if combination_type == "cat":
        # A' = [w₁s₁A₁; w₂s₂A₂; …], B' = [B₁ B₂ …]  ⇒  B'A' = Σ wᵢ sᵢ Bᵢ Aᵢ
        A = torch.cat([f.A * w * f.scaling for f, w in zip(factors, weights)], dim=0)
        B = torch.cat([f.B for f in factors], dim=1)
        A, B = _pad_rank(A, B, rank)
    elif combination_type in SVD_TYPES:
        deltas = [f.layout_delta_weight() for f in factors]  # ΔWᵢ = sᵢ Bᵢ Aᵢ (the scaling is inside)
        w = torch.tensor([float(x) for x in weights]).to(deltas[0].device)
        delta = merge_tensors(deltas, w, method, density, majority_sign_method, generator)
        if factors[0].transposed:
            delta = delta.T  # back to (out, in)
        A, B = svd_factors(delta, rank, svd_clamp, svd_full_matrices, svd_driver)
    else:
        ranks = sorted({f.rank for f in factors})
        if len(ranks) > 1:
            raise ValueError(f"combination_type={combination_type!r} merges A's and B's entry by entry, so the "
                             f"adapters need equal ranks at every layer; got ranks {ranks}. Use 'cat' or an svd type")
        split = [factor_weights(w, f.scaling) for f, w in zip(factors, weights)]
        w_A = torch.tensor([a for a, _ in split]).to(factors[0].A.device)  # sgn(w s) √|w s|
        w_B = torch.tensor([b for _, b in split]).to(factors[0].B.device)  # √|w s|
        dtype = factors[0].A.dtype
        A = merge_tensors([f.A for f in factors], w_A, method, density, majority_sign_method, generator).to(dtype)
        B = merge_tensors([f.B for f in factors], w_B, method, density, majority_sign_method, generator).to(dtype)
    bias = None
    if any(f.bias is not None for f in factors):
        # the biases add up exactly: b' = merge(sᵢ bᵢ; wᵢ) (peft 0.21 leaves the merged bias at zero)
        out = factors[0].B.shape[0]
        biases = [f.bias * f.scaling if f.bias is not None else factors[0].B.new_zeros(out) for f in factors]
        bias = merge_tensors(biases, [float(w) for w in weights], method, density, majority_sign_method, generator)
    return A, B, bias


def cross_terms(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights_A: Sequence[float],
                weights_B: Sequence[float]) -> torch.Tensor:
    """Σ_{i≠j} w_Bᵢ w_Aⱼ Bᵢ Aⱼ: what merging the factors separately adds to Σᵢ w_Bᵢ w_Aᵢ Bᵢ Aᵢ.

    (Σᵢ w_Bᵢ Bᵢ)(Σⱼ w_Aⱼ Aⱼ) = Σᵢ w_Bᵢ w_Aᵢ Bᵢ Aᵢ + cross_terms.

    Explained in: book/merging_adapters.ipynb
    """
    out = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=As[0].dtype, device=As[0].device)
    for i, (B, wb) in enumerate(zip(Bs, weights_B)):
        for j, (A, wa) in enumerate(zip(As, weights_A)):
            if i != j:
                out += (wb * wa) * (B @ A)
    return out


# ---------------------------------------------------------------------------------------------------
# Checks and the merged adapter's config (shared by add_weighted_adapter and the command line)
# ---------------------------------------------------------------------------------------------------
def check_merge_arguments(adapters: Sequence[str], weights: Sequence[float], combination_type: str,
                          density: float | None, majority_sign_method: str, svd_rank: int | None,
                          svd_clamp: float | None) -> str:
    """Validate the arguments of a merge; return the combination type peft uses (``linear`` for one adapter).

    Explained in: book/merging_adapters.ipynb
    """
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError(f"adapters={adapters!r}: pass a non-empty list of adapter names, e.g. ['a', 'b']")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ValueError(f"weights={weights!r}: pass a list with one number per adapter")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(adapters)} adapters and {len(weights)} weights; pass one weight per adapter "
                         "(peft would silently drop the extra ones)")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weights={list(weights)!r}: every weight must be a finite number (negative ones "
                             "subtract an adapter)")
    if combination_type not in BASE_METHOD:
        raise ValueError(f"combination_type={combination_type!r} is unknown; valid types: "
                         f"{', '.join(COMBINATION_TYPES)}")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method={majority_sign_method!r}; valid: "
                         f"{', '.join(map(repr, SIGN_METHODS))}")
    if len(adapters) == 1 and combination_type != "linear":
        warnings.warn(f"one adapter: combination_type={combination_type!r} becomes 'linear' (as in peft); the "
                      "result is that adapter times its weight", UserWarning, stacklevel=3)
        combination_type = "linear"
    if combination_type in DENSITY_TYPES:
        if density is None:
            raise ValueError(f"combination_type={combination_type!r} trims, so it needs density in (0, 1] (the "
                             "fraction of entries each adapter keeps), e.g. density=0.5")
        _check_density(density, low_inclusive=False)
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank={svd_rank!r} must be a positive integer (or None for the largest source rank)")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0 < svd_clamp <= 1):
        raise ValueError(f"svd_clamp={svd_clamp!r} must be a quantile in (0, 1] (or None for no clamping)")
    return combination_type


def max_rank(config: LoraConfig) -> int:
    """The largest rank an adapter uses anywhere: max(r, *rank_pattern.values()) (peft's rule).

    Explained in: book/merging_adapters.ipynb
    """
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def new_adapter_rank(configs: Sequence[LoraConfig], names: Sequence[str], combination_type: str,
                     svd_rank: int | None) -> int:
    """The merged adapter's r: the common rank (factor types), Σ ranks (``cat``), ``svd_rank`` or the max.

    Explained in: book/merging_adapters.ipynb
    """
    ranks = [max_rank(c) for c in configs]
    if combination_type in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            pairs = ", ".join(f"{n!r}: r={r}" for n, r in zip(names, ranks))
            raise ValueError(f"combination_type={combination_type!r} merges A's and B's entry by entry, so all "
                             f"adapters need the same rank; got {pairs}. Use 'cat' or an svd type (e.g. 'svd', "
                             "'ties_svd') to merge adapters of different ranks")
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def _same_filters(configs: Sequence[LoraConfig]) -> bool:
    def key(c):
        exclude = c.exclude_modules
        exclude = sorted(exclude) if isinstance(exclude, (list, set, tuple)) else exclude
        return repr((exclude, c.layers_to_transform, c.layers_pattern))
    return len({key(c) for c in configs}) == 1


def merged_config(configs: Sequence[LoraConfig], new_rank: int, module_ranks: dict[str, int]) -> LoraConfig:
    """The merged adapter's config: the first adapter's, with r = α = ``new_rank`` (scaling 1) and the union
    of the target modules (peft's rule; an explicit list of the adapted modules when the adapters select
    modules with different exclude/layer filters or mix list and regex targets).

    ``module_ranks`` maps each adapted module to its rank; where one differs from ``new_rank`` it goes
    into ``rank_pattern`` and ``alpha_pattern`` so the config matches the tensors. ``use_rslora`` is
    switched off so the scaling really is 1 (peft 0.21 keeps it and scales the merge by √r).

    Explained in: book/merging_adapters.ipynb
    """
    base = copy.deepcopy(configs[0])
    targets = [c.target_modules for c in configs]
    kinds = {isinstance(t, str) for t in targets}
    fields: dict = {}
    if any(t is None for t in targets) or len(kinds) > 1 or not _same_filters(configs):
        fields.update(target_modules=sorted(module_ranks), exclude_modules=None, layers_to_transform=None,
                      layers_pattern=None)
    elif kinds == {True}:
        fields["target_modules"] = "|".join(f"({t})" for t in targets)
    else:
        fields["target_modules"] = sorted(set().union(*[set(t) for t in targets]))
    pattern = {re.escape(k): r for k, r in sorted(module_ranks.items()) if r != new_rank}
    if base.init_lora_weights not in (True, False, "gaussian"):
        # PiSSA/OLoRA/LoftQ initialisations rewrite the base weight: the merged adapter is a plain LoRA
        fields.update(init_lora_weights=True, loftq_config={})
    return dataclasses.replace(base, r=new_rank, lora_alpha=new_rank, rank_pattern=pattern,
                               alpha_pattern=dict(pattern), use_rslora=False,
                               lora_bias=any(c.lora_bias for c in configs), **fields)


def reject_dora(names: Sequence[str], configs: Sequence[LoraConfig]) -> None:
    """DoRA adapters are not merged: their magnitude vectors m do not add up like ΔW (peft 0.21 keeps
    ``use_dora`` and gives the merged adapter the base weight's norms, dropping the sources' m).

    Explained in: book/merging_adapters.ipynb
    """
    dora = [n for n, c in zip(names, configs) if getattr(c, "use_dora", False)]
    if dora:
        raise ValueError(f"{dora} are DoRA adapters (use_dora=True); merging them is not supported: a DoRA "
                         "adapter's magnitude vector m rescales W + ΔW as a whole, so magnitudes and directions "
                         "cannot be combined like LoRA deltas (peft 0.21 silently replaces m by the base "
                         "weight's norms). Merge plain LoRA adapters")


def explicit_targets(config: LoraConfig, module_keys: Sequence[str]) -> LoraConfig:
    """``config`` targeting exactly ``module_keys`` (full names), with no other filter.

    Explained in: book/merging_adapters.ipynb
    """
    return dataclasses.replace(config, target_modules=sorted(module_keys), exclude_modules=None,
                               layers_to_transform=None, layers_pattern=None)


def module_generator(seed: int | None, key: str) -> torch.Generator | None:
    """DARE's generator for one module: seeded by (seed, module name), so it does not depend on the order
    modules are visited (the model and the command line then draw the same masks).

    Explained in: book/merging_adapters.ipynb
    """
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    return g


# ---------------------------------------------------------------------------------------------------
# On a model: add_weighted_adapter
# ---------------------------------------------------------------------------------------------------
def layer_factors(layer, adapter_name: str) -> LoraFactors | None:
    """The factors of ``adapter_name`` at a LoRA layer (None when the layer does not hold it).

    Explained in: book/merging_adapters.ipynb
    """
    if adapter_name in getattr(layer, "lora_A", {}):
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name]
        bias = B.bias
        B = B.weight
        transposed = bool(getattr(layer, "fan_in_fan_out", False))
    elif adapter_name in getattr(layer, "lora_embedding_A", {}):
        A, B, bias = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name], None
        transposed = True  # an embedding's weight is (num_embeddings, dim) = (in, out)
    else:
        return None
    return LoraFactors(A.detach().flatten(1), B.detach().flatten(1), layer.scaling[adapter_name],
                       None if bias is None else bias.detach(), transposed)


def _write_factors(layer, adapter_name: str, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> None:
    if adapter_name in getattr(layer, "lora_A", {}):
        pA, mB = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name]
        pB, pb = mB.weight, mB.bias
    else:
        pA, pB, pb = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name], None
    with torch.no_grad():
        pA.copy_(A.reshape(pA.shape).to(pA.dtype))  # conv: (r, in·k) -> (r, in, *kernel)
        pB.copy_(B.reshape(pB.shape).to(pB.dtype))  # conv: (out, r) -> (out, r, 1, …)
        if pb is not None:
            pb.copy_(bias.to(pb.dtype) if bias is not None else torch.zeros_like(pb))


def _source_layers(model: LoraModel, adapters: Sequence[str]) -> list[tuple[str, object]]:
    from peftlab.tuners.lora.layer import LoraLayer

    return [(key, layer) for key, layer in model.adapter_layers()
            if isinstance(layer, LoraLayer) and any(a in layer.adapter_names for a in adapters)]


def _check_modules_to_save(model: LoraModel, adapters: Sequence[str], adapter_name: str) -> None:
    from peftlab.tuners.modules_to_save import ModulesToSaveWrapper

    shared, single = [], []
    for key, module in model.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            holders = [a for a in dict.fromkeys(adapters) if a in module.modules_to_save]
            if len(holders) > 1:
                shared.append(key)
            elif holders:
                single.append((key, holders[0]))
    if shared:
        raise ValueError(f"adapters {list(adapters)} each train their own copy of {shared} (modules_to_save); "
                         "whole modules cannot be merged. Merge adapters without modules_to_save, or delete the "
                         "copies first")
    if single:
        where = ", ".join(f"{k} (from {a!r})" for k, a in single)
        warnings.warn(f"the merged adapter {adapter_name!r} gets fresh copies of the base model's modules_to_save "
                      f"modules where its config lists them, not the trained copies of {where} (peft does the same)",
                      UserWarning, stacklevel=4)


def add_weighted_adapter(model: LoraModel, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: Literal["total", "frequency"] = "total", *,
                         seed: int | None = None) -> None:
    """Add ``adapter_name``, a weighted merge of ``adapters``, to a LoRA model (see the module docstring).

    Differences from peft 0.21: an existing ``adapter_name`` raises (peft returns silently); the numbers
    of weights and adapters must match; unequal ranks of factor types are reported per layer; the merged
    adapter is placed exactly in the layers where a source adapter is, with ``rank_pattern`` entries
    where the sources' rank there differs; rsLoRA sources give a merged adapter with scaling 1 (peft's
    keeps rsLoRA and is √r too large); ``lora_bias`` biases are merged (peft leaves them at zero); DoRA
    sources raise (peft drops their magnitudes); a layer smaller than the new rank gets zero-padded
    factors (peft writes factors of mismatched shapes there); svd types work on Conv1d/Conv3d too.
    ``seed`` (an extension) draws DARE's masks per layer from a generator seeded by (seed, layer name);
    without it the global torch RNG is used as in peft.

    Explained in: book/merging_adapters.ipynb
    """
    from peftlab.tuners.lora.config import LoraConfig

    if adapter_name in model.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} already exists (peft would silently do nothing); "
                         f"choose a new name or delete_adapter({adapter_name!r}) first")
    combination_type = check_merge_arguments(adapters, weights, combination_type, density, majority_sign_method,
                                             svd_rank, svd_clamp)
    missing = [a for a in adapters if a not in model.peft_config]
    if missing:
        raise ValueError(f"adapters {missing} do not exist; adapters of this model: {sorted(model.peft_config)}")
    configs = [model.peft_config[a] for a in adapters]
    not_lora = [a for a, c in zip(adapters, configs) if not isinstance(c, LoraConfig)]
    if not_lora:
        raise ValueError(f"add_weighted_adapter merges LoRA adapters; {not_lora} are not LoRA")
    reject_dora(adapters, configs)
    new_rank = new_adapter_rank(configs, adapters, combination_type, svd_rank)
    _check_modules_to_save(model, adapters, adapter_name)

    layers = _source_layers(model, adapters)
    if not layers:
        raise ValueError(f"adapters {list(adapters)} are in no LoRA layer of this model")
    module_ranks: dict[str, int] = {}
    for key, layer in layers:
        if combination_type in FACTOR_TYPES:
            ranks = {a: layer.r[a] for a in adapters if a in layer.r}
            if len(set(ranks.values())) > 1:
                raise ValueError(f"at layer {key!r} the adapters have ranks {ranks}; combination_type="
                                 f"{combination_type!r} needs equal ranks at every layer (use 'cat' or an svd type)")
            module_ranks[key] = next(iter(ranks.values()))
        else:
            module_ranks[key] = new_rank
    config = merged_config(configs, new_rank, module_ranks)
    from peftlab.tuners import matching

    prepared = model._prepare_config(copy.deepcopy(config))
    if {k for k in model._candidate_names() if matching.check_target_module_exists(prepared, k)} != set(module_ranks):
        config = explicit_targets(config, list(module_ranks))

    model.inject_adapter(adapter_name, config)  # creates zero-B adapters of the right shapes (frozen, inactive)
    try:
        for key, layer in layers:
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names]
            factors = [layer_factors(layer, a) for a, _ in present]
            A, B, bias = combine_lora_factors(
                factors, [w for _, w in present], combination_type, module_ranks[key], density,
                majority_sign_method, svd_clamp, svd_full_matrices, svd_driver, module_generator(seed, key))
            _write_factors(layer, adapter_name, A, B, bias)
    except BaseException:
        model.delete_adapter(adapter_name)  # no half-merged adapter is left behind
        raise


# ---------------------------------------------------------------------------------------------------
# How far the factor-by-factor types are from the exact merge
# ---------------------------------------------------------------------------------------------------
def cross_term_error(model: LoraModel, adapters: Sequence[str], weights: Sequence[float],
                     combination_type: str = "linear", density: float | None = None,
                     majority_sign_method: Literal["total", "frequency"] = "total", svd_rank: int | None = None,
                     seed: int | None = None) -> dict[str, float]:
    """Per layer, ‖ΔW_merged − Σᵢ wᵢ ΔWᵢ‖_F / ‖Σᵢ wᵢ ΔWᵢ‖_F for ``combination_type`` (the model is unchanged).

    For ``linear`` the difference is exactly the cross terms Σ_{i≠j} Bᵢ Aⱼ (times their weights); ``cat``
    gives 0, and the svd types give only their truncation (and trimming) error.

    Explained in: book/merging_adapters.ipynb
    """
    combination_type = check_merge_arguments(adapters, weights, combination_type, density, majority_sign_method,
                                             svd_rank, None)
    missing = [a for a in adapters if a not in model.peft_config]
    if missing:
        raise ValueError(f"adapters {missing} do not exist; adapters of this model: {sorted(model.peft_config)}")
    new_rank = new_adapter_rank([model.peft_config[a] for a in adapters], adapters, combination_type, svd_rank)
    errors: dict[str, float] = {}
    with torch.no_grad():
        for key, layer in _source_layers(model, adapters):
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names]
            factors = [layer_factors(layer, a) for a, _ in present]
            ws = [w for _, w in present]
            exact = sum(w * f.delta_weight() for f, w in zip(factors, ws))  # Σ wᵢ sᵢ Bᵢ Aᵢ
            rank = factors[0].rank if combination_type in FACTOR_TYPES else new_rank
            A, B, _ = combine_lora_factors(factors, ws, combination_type, rank, density, majority_sign_method,
                                           generator=module_generator(seed, key))
            merged = B @ A  # scaling 1
            norm = torch.linalg.matrix_norm(exact).item()
            diff = torch.linalg.matrix_norm(merged - exact).item()
            errors[key] = diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
    return errors
