"""The ΔW gallery: the update every method learns for the same layer on the same task, read off the library.

:func:`train_gallery` fine-tunes the lab's H4 classifier (the digits rotated by 90°, :func:`finetune` on
``"h4:rot90"``) once per method of :func:`gallery_configs` (LoRA, LoHa, LoKr, OFT, BOFT, IA3, DoRA,
AdaLoRA, and full fine-tuning for reference) and returns one :class:`Exhibit` per method. An exhibit's
``delta[layer]`` is the update the library itself applies: the weight after ``merge_and_unload()`` minus the
base weight, W' − W₀; ``own[layer]`` is the same update from the layer's own rule (:func:`own_delta`:
``get_delta_weight`` for additive methods, ``merged_weights`` for the multiplicative ones), so the two can be
checked against each other; ``structure[layer]`` holds what each method's update is built from (OFT's and
BOFT's rotation R, IA3's vector l, DoRA's magnitude m, AdaLoRA's Λ and allocated rank, LoKr's block size),
read from the trained adapter. :func:`structure_picture` turns that into something
:func:`peftlab.viz.delta_panel` can draw.

Explained in: book/delta_w_gallery.ipynb
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from peftlab import AdaLoraConfig, BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig
from peftlab.config import PeftConfig
from peftlab.lab.finetune import H4_LAYERS, Run, adapted_layers, finetune
from peftlab.lab.rank_allocation import ranks
from peftlab.tuners.base import AdapterLayer

__all__ = [
    "GALLERY_LAYERS",
    "GALLERY_TASK",
    "Exhibit",
    "adapted_layers",
    "gallery_configs",
    "merged_minus_base",
    "own_delta",
    "structure",
    "structure_picture",
    "train_gallery",
]

#: the lab task every method learns: H4's pretrained digit classifier on digits rotated by 90°
GALLERY_TASK = "h4:rot90"
#: its adapted layers (the trunk; the new head trains in full): trunk.l1 is 256 × 64, trunk.l2 256 × 256
GALLERY_LAYERS: tuple[str, ...] = H4_LAYERS


@dataclass
class Exhibit:
    """One method's learned update on every adapted layer.

    ``delta[layer]``: W' − W₀ after ``merge_and_unload()`` (float32, (out, in), CPU); ``own[layer]``: the layer's
    own rule for the same update (:func:`own_delta`); ``structure[layer]``: the method's parts
    (:func:`structure`); ``base[layer]``: the frozen W₀ the adapter wraps (adapters only). ``run``: the
    fine-tuning :class:`~peftlab.lab.finetune.Run` (its model dropped).

    Explained in: book/delta_w_gallery.ipynb
    """

    label: str
    method: str
    run: Run
    delta: dict[str, Tensor] = field(default_factory=dict, repr=False)
    own: dict[str, Tensor] = field(default_factory=dict, repr=False)
    structure: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    base: dict[str, Tensor] = field(default_factory=dict, repr=False)


def gallery_configs(steps: int, r: int = 4, target_modules: Optional[Sequence[str]] = None,
                    task_type: Optional[str] = None) -> dict[str, Union[PeftConfig, str]]:
    """One config per method at its usual settings around rank ``r``, keyed by the label the gallery shows.

    LoRA, LoHa, LoKr and DoRA at rank ``r`` (α = 2r); OFT with blocks of 16 (exact Cayley map); BOFT with
    blocks of 8 and two butterfly factors; IA3 scaling each layer's outputs; AdaLoRA from rank 2r down to an
    average of r (its schedule needs ``steps``); ``"full FT"`` for reference. ``target_modules`` defaults to
    the harness's layers (None).

    Explained in: book/delta_w_gallery.ipynb
    """
    if not isinstance(steps, int) or steps < 10:
        raise ValueError(f"steps={steps!r}: AdaLoRA's schedule needs an integer of at least 10 training steps")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"r={r!r}: the gallery's rank must be a positive integer (e.g. 4)")
    T = None if target_modules is None else list(target_modules)
    kw: dict[str, Any] = {"target_modules": T}
    if task_type is not None:
        kw["task_type"] = task_type
    ia3_targets = T if T is not None else list(GALLERY_LAYERS)  # IA3 needs its targets named on a plain model
    return {
        f"LoRA r={r}": LoraConfig(r=r, lora_alpha=2 * r, **kw),
        f"LoHa r={r}": LoHaConfig(r=r, alpha=2 * r, **kw),
        f"LoKr r={r}": LoKrConfig(r=r, alpha=2 * r, **kw),
        "OFT b=16": OFTConfig(oft_block_size=16, use_cayley_neumann=False, **kw),
        "BOFT b=8, m=2": BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, **kw),
        "IA3": IA3Config(**{**kw, "target_modules": ia3_targets}, feedforward_modules=[]),
        f"DoRA r={r}": LoraConfig(r=r, lora_alpha=2 * r, use_dora=True, **kw),
        f"AdaLoRA {2 * r}→{r}": AdaLoraConfig(init_r=2 * r, target_r=r, lora_alpha=2 * r, tinit=steps // 10,
                                               tfinal=steps // 5, total_step=steps, **kw),
        "full FT": "full",
    }


def _out_in(layer: AdapterLayer, w: Tensor) -> Tensor:
    return (w.T if layer.fan_in_fan_out else w).detach().float().cpu()


@torch.no_grad()
def own_delta(layer: AdapterLayer, adapter_name: str = "default") -> Tensor:
    """ΔW of one layer from its own rule, (out, in), float32: ``get_delta_weight`` for an additive method
    (W' = W + ΔW), else ``merged_weights(W) − W`` (OFT, BOFT: W' = s ⊙ (W Rᵀ); IA3: W' = W ⊙ l; DoRA:
    W' = m ⊙ (W + sBA) / ‖W + sBA‖).

    Explained in: book/delta_w_gallery.ipynb
    """
    W = layer._base_weight().detach()
    if adapter_name not in getattr(layer, "lora_variant", {}):  # a LoRA variant (DoRA) is not additive
        try:
            return _out_in(layer, layer.get_delta_weight(adapter_name))
        except NotImplementedError:
            pass
    base = layer.get_base_layer()
    bias = base.bias.detach() if getattr(base, "bias", None) is not None else None
    new, _ = layer.merged_weights(adapter_name, W, bias)
    return _out_in(layer, new.float() - W.float())


@torch.no_grad()
def merged_minus_base(model: nn.Module, layers: Optional[Sequence[str]] = None,
                      adapter_name: str = "default") -> dict[str, Tensor]:
    """W' − W₀ of each adapted layer: a copy of ``model`` merged with ``merge_and_unload()``, minus the base
    weights of ``model`` (left unmerged), (out, in), float32, CPU.

    Explained in: book/delta_w_gallery.ipynb
    """
    found = adapted_layers(model, adapter_name)
    names = list(found) if layers is None else list(layers)
    missing = [n for n in names if n not in found]
    if missing:
        raise KeyError(f"layers {missing} hold no adapter {adapter_name!r}; adapted layers: {sorted(found)}")
    merged = copy.deepcopy(model).merge_and_unload()
    out = {}
    for n in names:
        layer = found[n]
        after = merged.get_submodule(n).weight
        out[n] = _out_in(layer, after.float() - layer._base_weight().float())
    return out


@torch.no_grad()
def structure(layer: AdapterLayer, method: str, adapter_name: str = "default") -> dict[str, Any]:
    """What one method's update on ``layer`` is built from, read off the trained adapter (CPU tensors).

    lora/loha: ``r``; lokr: ``block`` (p, q), the size of W2, so ΔW is W1 ⊗ W2 with p × q blocks; oft: ``R``
    (in × in) and ``block_size``; boft: ``R``, ``s`` (per output) and ``factors``; ia3: ``l`` and
    ``feedforward`` (True: l scales the inputs, the columns of W); dora: ``m``, ``r`` and ``lora_delta``
    (s·BA) and ``w0_norm`` (‖W₀‖ per output unit); adalora: ``lambda`` (Λ, one per
    triplet, pruned ones 0) and ``r0`` (init_r); :func:`train_gallery` adds ``allocated``, the rank the
    schedule left the layer (its ``rank_pattern``).

    Explained in: book/delta_w_gallery.ipynb
    """
    name = adapter_name
    if method in ("lora", "loha", "dora"):
        out: dict[str, Any] = {"r": int(layer.r[name])}
        if method == "dora":
            from peftlab.tuners.lora.dora import magnitude

            out["m"] = magnitude(layer, name).detach().float().reshape(-1).cpu()
            out["lora_delta"] = _out_in(layer, layer.get_delta_weight(name))
            out["w0_norm"] = _out_in(layer, layer._base_weight()).norm(dim=1)  # ‖W₀‖ per output unit
        return out
    if method == "lokr":
        if name in layer.lokr_w1:
            a, c = layer.lokr_w1[name].shape
        else:
            a, c = layer.lokr_w1_a[name].shape[0], layer.lokr_w1_b[name].shape[1]
        return {"r": int(layer.r[name]), "block": (layer.out_features // a, layer.in_features // c),
                "grid": (a, c)}
    if method in ("oft", "boft"):
        out = {"R": layer.rotation(name).detach().float().cpu()}
        if method == "oft":
            out["block_size"] = int(layer.oft_block_size[name])
        else:
            out["block_size"] = int(layer.boft_block_size[name])
            out["factors"] = int(layer.boft_R[name].shape[0])
            out["s"] = layer.out_scale(name).detach().float().cpu()
        return out
    if method == "ia3":
        return {"l": layer.ia3_l[name].detach().float().reshape(-1).cpu(),
                "feedforward": bool(layer.is_feedforward[name])}
    if method == "adalora":
        return {"lambda": layer.lora_E[name].detach().float().reshape(-1).cpu(), "r0": int(layer.ranknum[name])}
    raise ValueError(f"method={method!r}; the gallery knows lora, loha, lokr, oft, boft, ia3, dora and adalora")


def _method_of(config: Union[PeftConfig, str]) -> str:
    if isinstance(config, str):
        return "full"
    method = str(config.peft_type).lower()
    return "dora" if method == "lora" and getattr(config, "use_dora", False) else method


def train_gallery(
    steps: int,
    *,
    configs: Optional[Mapping[str, Union[PeftConfig, str]]] = None,
    task: str = GALLERY_TASK,
    layers: Optional[Sequence[str]] = None,
    seed: int = 0,
    progress: bool = False,
    **finetune_kwargs: Any,
) -> dict[str, Exhibit]:
    """Fine-tune once per config (default :func:`gallery_configs`) on ``task`` and read each method's ΔW.

    Each run is :func:`peftlab.lab.finetune.finetune` with the same seed, steps and data order; its update is
    read from the library (:func:`merged_minus_base`, :func:`own_delta`, :func:`structure`) on ``layers``
    (default: every adapted layer), then the model is dropped. Full fine-tuning's update is W − W₀ of the
    same layers. ``finetune_kwargs`` pass through (``base``, ``device``, ``lr``, ``n_test``, ...).

    Explained in: book/delta_w_gallery.ipynb
    """
    configs = gallery_configs(steps) if configs is None else configs
    from tqdm.auto import tqdm

    out: dict[str, Exhibit] = {}
    for label, config in tqdm(list(configs.items()), desc="gallery", disable=not progress, leave=False):
        method = _method_of(config)
        run = finetune(config, task, seed=seed, steps=steps, eval_every=0, keep_delta=method == "full",
                       keep_model=method != "full", **finetune_kwargs)
        ex = Exhibit(label, method, run)
        if method == "full":
            names = list(layers) if layers is not None else [n for n in run.delta if n in GALLERY_LAYERS]
            ex.delta = {n: run.delta[n] for n in names}
            ex.own = dict(ex.delta)
        else:
            model = run.model
            found = adapted_layers(model)
            names = list(found) if layers is None else list(layers)
            ex.delta = merged_minus_base(model, names)
            ex.own = {n: own_delta(found[n]) for n in names}
            ex.base = {n: _out_in(found[n], found[n]._base_weight()) for n in names}
            ex.structure = {n: structure(found[n], method) for n in names}
            if method == "adalora":
                for n, kept in ranks(model, paths=True).items():
                    if n in ex.structure:
                        ex.structure[n]["allocated"] = kept
            run.model = None
            run.delta = {}
        out[label] = ex
    return out


def structure_picture(ex: Exhibit, layer: str, zoom: int = 64) -> tuple[str, Any, str]:
    """(kind, data, title) of the part that makes ``ex``'s update what it is, for :func:`peftlab.viz.delta_panel`.

    kind ``"matrix"``: a heatmap (OFT's and BOFT's R, its top-left ``zoom`` × ``zoom``; LoKr's ΔW rearranged,
    one row per block, as singular values); ``"vectors"``: named 1-D series (IA3's l, DoRA's m against the
    base row norms, AdaLoRA's |Λ|); ``"spectrum"``: singular values; ``"none"`` where the update is the whole
    story (LoRA, LoHa, full fine-tuning).

    Explained in: book/delta_w_gallery.ipynb
    """
    s = ex.structure.get(layer, {})
    if ex.method in ("oft", "boft"):
        z = min(zoom, s["R"].shape[0])
        what = "block-diagonal" if ex.method == "oft" else f"{s['factors']} butterfly factors"
        return "matrix", s["R"][:z, :z] - torch.eye(z), f"R − I ({what}), top-left {z}×{z}"
    if ex.method == "lokr":
        from peftlab.linalg import kron_rearrange

        return ("spectrum", kron_rearrange(ex.delta[layer], s["block"]),
                f"ΔW rearranged ({s['block'][0]}×{s['block'][1]} blocks): σ")
    if ex.method == "ia3":
        return "vectors", {"l − 1": s["l"] - 1}, "IA3: l − 1 per output unit"
    if ex.method == "dora":
        return "vectors", {"m − ‖W₀ row‖": s["m"] - s["w0_norm"]}, "DoRA: magnitude m − ‖W₀ row‖"
    if ex.method == "adalora":
        lam = s["lambda"].abs()
        return "vectors", {"|λ_i|": lam}, f"AdaLoRA: {int((lam > 0).sum())} of {s['r0']} triplets kept"
    return "none", None, ""
