"""Merging whole fine-tuned models through their task vectors.

A task vector is what fine-tuning changed: δₜ = θₜ − θ_pre (Ilharco et al. 2022; DARE's "delta
parameters"). Merging combines the task vectors with one of the methods of
:mod:`peftlab.merging.methods` and adds the result back with a scaling λ:

    θ_merged = θ_pre + λ · merge(δ₁, …, δ_T; w)

By default each tensor (each weight matrix, each bias) is merged on its own, as peft merges LoRA layers;
``scope="model"`` treats all floating-point parameters of a task vector as one long vector, as the TIES
paper's reference code trims (top-k over the whole model).

Explained in: book/merging_adapters.ipynb
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from peftlab.merging.methods import DENSITY_METHODS, MERGE_METHODS, RANDOM_METHODS, merge_tensors

StateDict = Mapping[str, torch.Tensor]


def _check_same_keys(a: StateDict, b: StateDict, what_a: str, what_b: str) -> None:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise ValueError(
            f"{what_a} and {what_b} do not hold the same tensors: {len(only_a)} only in {what_a} "
            f"(e.g. {only_a[:3]}), {len(only_b)} only in {what_b} (e.g. {only_b[:3]}). Are they checkpoints of "
            "the same architecture? Leave differing keys (such as task heads) out with exclude=[...]"
        )
    bad = [(k, tuple(a[k].shape), tuple(b[k].shape)) for k in a if a[k].shape != b[k].shape]
    if bad:
        lines = "; ".join(f"{k}: {s} vs {t}" for k, s, t in bad[:4])
        raise ValueError(f"{len(bad)} tensors differ in shape between {what_a} and {what_b} ({lines})")


def _mergeable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def task_vector(finetuned_sd: StateDict, pretrained_sd: StateDict) -> dict[str, torch.Tensor]:
    """δ = θ_finetuned − θ_pretrained for every floating-point tensor (integer buffers are left out).

    Explained in: book/merging_adapters.ipynb
    """
    _check_same_keys(finetuned_sd, pretrained_sd, "the fine-tuned state dict", "the pretrained state dict")
    return {k: finetuned_sd[k] - pretrained_sd[k].to(finetuned_sd[k].dtype)
            for k in finetuned_sd if _mergeable(finetuned_sd[k])}


def apply_task_vector(pretrained_sd: StateDict, delta: StateDict, scaling: float = 1.0) -> dict[str, torch.Tensor]:
    """θ = θ_pre + λ · δ (keys absent from ``delta`` keep their pretrained value; negative λ negates a task).

    Explained in: book/merging_adapters.ipynb
    """
    unknown = sorted(set(delta) - set(pretrained_sd))
    if unknown:
        raise ValueError(f"the task vector has {len(unknown)} tensors the pretrained state dict lacks "
                         f"(e.g. {unknown[:3]})")
    out: dict[str, torch.Tensor] = {}
    for k, theta in pretrained_sd.items():
        if k in delta:
            # computed in float32 or wider, stored in the pretrained dtype
            wide = torch.promote_types(theta.dtype, torch.float32)
            out[k] = (theta.to(wide) + scaling * delta[k].to(wide)).to(theta.dtype)
        else:
            out[k] = theta.clone()
    return out


def _generator_for(seed: int | None, key: str, device: torch.device) -> torch.Generator | None:
    """A generator seeded by (seed, tensor name): DARE's masks do not depend on the order keys are visited."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    return g


def merge_task_vectors(deltas: Sequence[StateDict], weights: Sequence[float] | None = None,
                       method: str = "task_arithmetic", density: float | None = None,
                       majority_sign_method: Literal["total", "frequency"] = "total",
                       scope: Literal["tensor", "model"] = "tensor", seed: int | None = None,
                       generator: torch.Generator | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Merge task vectors key by key (``scope="tensor"``) or as one flat vector per task (``"model"``).

    ``seed`` draws DARE's masks per tensor from a generator seeded by (seed, key); ``generator`` uses one
    generator for everything in key order; neither uses the global torch RNG.

    Explained in: book/merging_adapters.ipynb
    """
    deltas = list(deltas)
    if not deltas:
        raise ValueError("no task vectors to merge")
    weights = [1.0] * len(deltas) if weights is None else [float(w) for w in weights]
    if len(weights) != len(deltas):
        raise ValueError(f"got {len(deltas)} task vectors and {len(weights)} weights; pass one weight per task")
    if method not in MERGE_METHODS:
        raise ValueError(f"method={method!r} is not a merge method; valid methods: {', '.join(MERGE_METHODS)}")
    if method in DENSITY_METHODS and density is None:
        raise ValueError(f"method={method!r} needs density in (0, 1]: the fraction of each task vector to keep")
    if scope not in ("tensor", "model"):
        raise ValueError(f"scope={scope!r}; valid: 'tensor' (each tensor on its own) or 'model' (all at once)")
    for i, d in enumerate(deltas[1:], start=1):
        _check_same_keys(deltas[0], d, "task vector 0", f"task vector {i}")
    keys = list(deltas[0])
    if scope == "model":
        flat = [torch.cat([d[k].reshape(-1).float() for k in keys]) for d in deltas]
        g = generator if generator is not None else _generator_for(seed, "<model>", flat[0].device)
        merged = merge_tensors(flat, weights, method, density, majority_sign_method, g)
        out, offset = {}, 0
        for k in keys:
            n = deltas[0][k].numel()
            out[k] = merged[offset:offset + n].view(deltas[0][k].shape).to(deltas[0][k].dtype)
            offset += n
        return out
    from tqdm.auto import tqdm

    out = {}
    for k in tqdm(keys, disable=not progress, desc=f"Merging ({method})", unit="tensor"):
        g = generator
        if g is None and method in RANDOM_METHODS:
            g = _generator_for(seed, k, deltas[0][k].device)
        out[k] = merge_tensors([d[k] for d in deltas], weights, method, density, majority_sign_method, g)
    return out


def _excluded(key: str, exclude: Sequence[str]) -> bool:
    return any(re.search(p, key) for p in exclude)


def merge_state_dicts(pretrained_sd: StateDict, finetuned_sds: Sequence[StateDict],
                      weights: Sequence[float] | None = None, method: str = "task_arithmetic",
                      density: float | None = None, majority_sign_method: Literal["total", "frequency"] = "total",
                      scaling: float = 1.0, scope: Literal["tensor", "model"] = "tensor", seed: int | None = None,
                      generator: torch.Generator | None = None, exclude: Sequence[str] = (),
                      progress: bool = False) -> dict[str, torch.Tensor]:
    """θ_merged = θ_pre + λ · merge(θ₁ − θ_pre, …, θ_T − θ_pre; w) for full-model state dicts.

    ``weights`` default to 1 each (plain task arithmetic; 1/T each is averaging). ``scaling`` is λ.
    Keys matching a regex in ``exclude`` (e.g. ``r"^classifier\\."``) and integer buffers keep the
    pretrained value.

    Explained in: book/merging_adapters.ipynb
    """
    finetuned_sds = list(finetuned_sds)
    if not finetuned_sds:
        raise ValueError("no fine-tuned state dicts to merge")
    keep = {k: v for k, v in pretrained_sd.items() if not _excluded(k, exclude)}
    deltas = []
    for i, sd in enumerate(finetuned_sds):
        sd_kept = {k: v for k, v in sd.items() if not _excluded(k, exclude)}
        _check_same_keys(sd_kept, keep, f"fine-tuned state dict {i}", "the pretrained state dict")
        deltas.append(task_vector(sd_kept, keep))
    merged = merge_task_vectors(deltas, weights, method, density, majority_sign_method, scope, seed, generator,
                                progress)
    return apply_task_vector(pretrained_sd, merged, scaling)
