"""``add_weighted_adapter`` for (IA)³ adapters: a weighted sum of their vectors, l = Σᵢ wᵢ lᵢ.

peft 0.21.2 offers exactly this one combination for (IA)³ (no svd, ties or dare: the vectors are not
matrices). With weights that sum to one it is a weighted average of the scalings; merged into the weights
it gives W ⊙ Σᵢ wᵢ lᵢ, which is *not* the product of the adapters applied one after the other.

Differences from peft, on purpose: where a source adapter is absent from a layer it counts as its identity
(a vector of ones; peft counts it as zero, so merging an adapter on k with one on v scales both by their
weight alone, e.g. halves them at weights 0.5/0.5); an existing ``adapter_name`` raises (peft returns
silently); the numbers of adapters and weights must match; sources that scale one layer on different sides
(input for one, output for the other) raise, as their vectors cannot be added.

Explained in: book/ia3.ipynb
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from peftlab.merging.lora import _check_modules_to_save, check_merge_arguments

if TYPE_CHECKING:  # pragma: no cover
    from peftlab.tuners.ia3.config import IA3Config
    from peftlab.tuners.ia3.model import IA3Model


def _union(values: list) -> list[str] | str | None:
    """peft's rule for the merged config: the union of lists, or the regexes joined by ``|``."""
    if all(isinstance(v, str) for v in values):
        return "|".join(f"({v})" for v in values)
    return sorted(set().union(*[set(v or ()) for v in values]))


def merged_config(configs: Sequence[IA3Config], layer_keys: Sequence[str], ff_keys: Sequence[str]) -> IA3Config:
    """The first adapter's config with the union of targets and feed-forward modules (peft's rule); when the
    sources mix list and regex forms, or exclude modules differently, the explicit module names instead.

    Explained in: book/ia3.ipynb
    """
    targets = [c.target_modules for c in configs]
    ffs = [c.feedforward_modules for c in configs]
    excludes = {repr(c.exclude_modules) for c in configs}
    same_kind = len({isinstance(t, str) for t in targets}) == 1 and len({isinstance(f, str) for f in ffs}) == 1
    if same_kind and len(excludes) == 1:
        return dataclasses.replace(copy.deepcopy(configs[0]), target_modules=_union(targets),
                                   feedforward_modules=_union(ffs))
    return dataclasses.replace(copy.deepcopy(configs[0]), target_modules=sorted(layer_keys),
                               feedforward_modules=sorted(ff_keys), exclude_modules=None)


def add_weighted_adapter(model: IA3Model, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
    """Add ``adapter_name`` to an (IA)³ model: l = Σᵢ wᵢ lᵢ in every layer that holds a source adapter (a
    source absent from a layer counts as ones there). The new adapter is frozen and not active.

    Explained in: book/ia3.ipynb
    """
    from peftlab.tuners.ia3.config import IA3Config
    from peftlab.tuners.ia3.layer import IA3Layer

    if adapter_name in model.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} already exists (peft would silently do nothing); "
                         f"choose a new name or delete_adapter({adapter_name!r}) first")
    check_merge_arguments(adapters, weights, "linear", None, "total", None, None)
    missing = [a for a in adapters if a not in model.peft_config]
    if missing:
        raise ValueError(f"adapters {missing} do not exist; adapters of this model: {sorted(model.peft_config)}")
    configs = [model.peft_config[a] for a in adapters]
    not_ia3 = [a for a, c in zip(adapters, configs) if not isinstance(c, IA3Config)]
    if not_ia3:
        raise ValueError(f"this add_weighted_adapter combines (IA)³ adapters; {not_ia3} are not (IA)³")
    _check_modules_to_save(model, adapters, adapter_name)
    layers = [(k, layer) for k, layer in model.adapter_layers()
              if isinstance(layer, IA3Layer) and any(a in layer.adapter_names for a in adapters)]
    if not layers:
        raise ValueError(f"adapters {list(adapters)} are in no (IA)³ layer of this model")
    ff_keys = []
    for key, layer in layers:
        sides = {layer.is_feedforward[a] for a in adapters if a in layer.adapter_names}
        if len(sides) > 1:
            raise ValueError(f"at {key!r} some of {list(adapters)} scale the input (feed-forward) and others the "
                             "output; their vectors cannot be added. Merge adapters that agree on feedforward_modules")
        if sides.pop():
            ff_keys.append(key)
    config = merged_config(configs, [k for k, _ in layers], ff_keys)
    model.inject_adapter(adapter_name, config)  # ones of the right shapes (frozen, inactive)
    try:
        ff_set = set(ff_keys)
        wrong = [k for k, layer in layers if adapter_name not in layer.adapter_names
                 or layer.is_feedforward[adapter_name] != (k in ff_set)]
        if wrong or len([1 for _, m in model.adapter_layers() if adapter_name in m.adapter_names]) != len(layers):
            raise ValueError(f"the merged config does not select exactly the source layers (or scales another side) at {wrong}")
        with torch.no_grad():
            for _, layer in layers:
                new = layer.ia3_l[adapter_name]
                total = torch.zeros_like(new, dtype=torch.float32)
                for a, w in zip(adapters, weights):
                    l = layer.ia3_l[a].float() if a in layer.adapter_names else torch.ones_like(total)
                    total += w * l  # Σ wᵢ lᵢ, an absent adapter being its identity
                new.copy_(total.to(new.dtype))
    except BaseException:
        model.delete_adapter(adapter_name)  # no half-merged adapter is left behind
        raise
