"""State-dict names of adapters, in PEFT's on-disk layout.

In memory a LoRA tensor is ``base_model.model.<module path>.lora_A.<adapter>.weight``; on disk the adapter
name is dropped: ``base_model.model.<module path>.lora_A.weight``. ``nn.Parameter`` entries have no
``.weight`` suffix (``...lora_embedding_A``), ``modules_to_save`` copies are saved under the original
module's name, and ``bias="all"``/``"lora_only"`` add base biases under their own names.

The list of (in-memory name, on-disk name, tensor) is built from the adapter layers themselves, and the
same list is used to save and to load, so the two directions cannot drift apart.

Explained in: book/configs.ipynb
"""

from __future__ import annotations

import json
import os
import warnings
from collections import namedtuple
from typing import Any

import torch
from torch import nn

from peftlab.tuners.base import AdapterLayer
from peftlab.tuners.modules_to_save import ModulesToSaveWrapper

PEFT_PREFIX = "base_model.model."


def adapter_state_items(model: nn.Module, adapter_name: str, config: Any = None) -> list[tuple[str, str, torch.Tensor]]:
    """(in-memory key, on-disk key, tensor) for every tensor that belongs to ``adapter_name``.

    Explained in: book/configs.ipynb
    """
    items: list[tuple[str, str, torch.Tensor]] = []
    adapter_tensor_ids: set[int] = set()
    for path, module in model.named_modules():
        p = f"{path}." if path else ""
        if isinstance(module, AdapterLayer):
            for attr in module.adapter_layer_names:
                container = getattr(module, attr)
                for name, entry in container.items():
                    tensors = [("", entry)] if isinstance(entry, nn.Parameter) else \
                        list(entry.state_dict(keep_vars=True).items())
                    adapter_tensor_ids.update(id(t) for _, t in tensors)
                    if name != adapter_name:
                        continue
                    for sub, t in tensors:
                        tail = f".{sub}" if sub else ""
                        items.append((f"{p}{attr}.{adapter_name}{tail}", f"{p}{attr}{tail}", t))
        elif isinstance(module, ModulesToSaveWrapper):
            if adapter_name in module.modules_to_save:
                for sub, t in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                    items.append((f"{p}modules_to_save.{adapter_name}.{sub}", f"{p}{sub}", t))
    bias = getattr(config, "bias", "none")
    if bias == "all":
        # every bias outside the adapter tensors, as peft selects them: a modules_to_save copy's bias appears
        # a second time as <module>.modules_to_save.bias, the frozen original's as <module>.original_module.bias
        for n, t in model.named_parameters(remove_duplicate=False):
            if not (n == "bias" or n.endswith(".bias")) or id(t) in adapter_tensor_ids:  # peft's rule
                continue
            parts = n.split(".")
            if "modules_to_save" in parts:
                i = parts.index("modules_to_save")
                if parts[i + 1] != adapter_name:
                    continue
                items.append((n, ".".join(parts[:i + 1] + parts[i + 2:]), t))
            else:
                items.append((n, n, t))
    elif isinstance(bias, str) and bias.endswith("_only"):  # "lora_only", "oft_only", ...: adapted layers' biases
        for path, module in model.named_modules():
            if isinstance(module, AdapterLayer) and adapter_name in module.adapter_names:
                b = getattr(module.get_base_layer(), "bias", None)  # an Embedding has none
                if isinstance(b, torch.Tensor):
                    key = f"{path}.base_layer.bias" if path else "base_layer.bias"
                    items.append((key, key, b))
    return [(mem, _unfsdp(disk), t) for mem, disk, t in items]


def get_peft_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """The adapter's tensors under their on-disk names (what ``adapter_model.safetensors`` holds); peft's
    signature. ``state_dict`` (the model's, e.g. gathered from a distributed run) supplies the values instead
    of the model's own tensors; ``save_embedding_layers`` adds whole embedding matrices (see
    :func:`embedding_layers_to_save`).

    Explained in: book/configs.ipynb
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    config = _find_config(model, adapter_name)
    if config is None:
        known = sorted(getattr(model, "peft_config", None) or {})
        raise ValueError(f"no adapter named {adapter_name!r} in this model; adapters: {known}")
    return adapter_state_dict(model, adapter_name, config, state_dict=state_dict,
                              save_embedding_layers=save_embedding_layers)


def adapter_state_dict(model: nn.Module, adapter_name: str, config: Any, state_dict: dict[str, torch.Tensor] | None = None,
                       save_embedding_layers: bool | str = False) -> dict[str, torch.Tensor]:
    """:func:`get_peft_model_state_dict` for an explicit ``config`` (a model that does not hold its configs).

    Explained in: book/configs.ipynb
    """
    items = adapter_state_items(model, adapter_name, config)
    if state_dict is not None:
        values = {_unfsdp(k): v for k, v in state_dict.items()}
        state = {disk: values.get(_unfsdp(mem), t).detach() for mem, disk, t in items}
    else:
        state = {disk: t.detach() for _, disk, t in items}
    state.update(embedding_layers_to_save(model, config, save_embedding_layers, state_dict))
    tuner = _tuner_class(config)
    return tuner.state_dict_for_save(model, state, adapter_name, config) if tuner is not None else state


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _embedding_targeted(model: nn.Module, config: Any) -> bool:
    targets = getattr(config, "target_modules", None)
    if not targets:
        return False
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return False
        import re

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return any(re.fullmatch(targets, k) for k, _ in base.named_modules()
                   if any(re.match(rf"(.*\.)?{e}$", k) for e in EMBEDDING_LAYER_NAMES))
    return any(e in targets for e in EMBEDDING_LAYER_NAMES)


def _vocab_resized(model: nn.Module, config: Any) -> bool:
    """Whether the model's vocabulary differs from its base model's (read from a local ``config.json``)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    name = getattr(config, "base_model_name_or_path", None)
    if not vocab or not name or not os.path.isfile(os.path.join(name, "config.json")):
        return False  # peft asks the Hub here; peftlab never goes online to save a file
    with open(os.path.join(name, "config.json")) as f:
        base_vocab = json.load(f).get("vocab_size")
    return base_vocab is not None and base_vocab != vocab


def embedding_layers_to_save(model: nn.Module, config: Any, save_embedding_layers: bool | str = "auto",
                             state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The whole input/output embedding matrices peft adds to an adapter file: with ``"auto"``, when an
    embedding (``embed_tokens``, ``lm_head``) is a target or the vocabulary was resized (each with a
    warning, as in peft); always with ``True``; never with ``False``.

    Explained in: book/peft_differences.md
    """
    targeted = _embedding_targeted(model, config)
    if save_embedding_layers == "auto":
        if targeted:
            warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                          UserWarning, stacklevel=3)
            save_embedding_layers = True
        elif _vocab_resized(model, config):
            warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                          "finetuning.", UserWarning, stacklevel=3)
            save_embedding_layers = True
        else:
            save_embedding_layers = False
    if not save_embedding_layers:
        return {}
    if not hasattr(model, "get_input_embeddings"):
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
                      UserWarning, stacklevel=3)
        return {}
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    wanted = []
    for layer in layers:
        if layer is None:
            continue
        if not targeted:
            wanted.append(layer)
        elif isinstance(layer, AdapterLayer) and isinstance(layer.base_layer, (nn.Linear, nn.Embedding)):
            wanted.append(layer.base_layer)
    out = {}
    values = state_dict if state_dict is not None else None
    for name, module in model.named_modules():
        if any(module is w for w in wanted):
            for pname, t in module.named_parameters(recurse=False):
                key = f"{name}.{pname}" if name else pname
                out[_unfsdp(key)] = (values.get(key, t) if values is not None else t).detach()
    return out


def _unfsdp(key: str) -> str:
    """A state-dict name without FSDP's wrapper segments (``_fsdp_wrapped_module.``), as peft saves it."""
    return key.replace("_fsdp_wrapped_module.", "") if "_fsdp_wrapped_module" in key else key


def _tuner_class(config: Any) -> Any:
    """The method's tuner class (for its state-dict hooks), or None for a config without a known method."""
    from peftlab.registry import get_method

    try:
        return get_method(config).tuner_class if config is not None else None
    except ValueError:
        return None


def _find_config(model: nn.Module, adapter_name: str) -> Any:
    configs = getattr(model, "peft_config", None) or {}
    return configs.get(adapter_name)


IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> IncompatibleKeys:
    """Copy checkpoint tensors (on-disk names) into the adapter ``adapter_name`` of ``model``; peft's signature.

    Returns ``(missing_keys, unexpected_keys)`` as ``torch``'s ``load_state_dict`` does: the model's state-dict
    names the checkpoint did not fill (its base weights among them) and checkpoint names that fit nothing.
    Everything is checked before anything is copied: a missing adapter tensor, a tensor for a module this model
    lacks, or a shape that does not fit raises ``ValueError`` naming the module and both shapes
    (``ignore_mismatched_sizes=True``: such tensors are skipped with a warning instead). With
    ``low_cpu_mem_usage=True`` adapter tensors created on the meta device are replaced by the loaded ones.

    Explained in: book/configs.ipynb
    """
    config = _find_config(model, adapter_name)
    if config is None:
        known = sorted(getattr(model, "peft_config", None) or {})
        raise ValueError(f"no adapter named {adapter_name!r} in this model (add it first); adapters: {known}")
    return load_adapter_state_dict(model, peft_model_state_dict, adapter_name, config,
                                   ignore_mismatched_sizes=ignore_mismatched_sizes)


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, config: Any,
                            ignore_mismatched_sizes: bool = False) -> IncompatibleKeys:
    """:func:`set_peft_model_state_dict` for an explicit ``config``.

    Explained in: book/configs.ipynb
    """
    state_dict = {_unfsdp(k): v for k, v in state_dict.items()}
    tuner = _tuner_class(config)
    if tuner is not None:  # renames, layers resized to a saved rank, ...: before the names are listed
        state_dict = tuner.state_dict_for_load(model, state_dict, adapter_name, config)
    items = adapter_state_items(model, adapter_name, config)
    by_disk = {disk: t for _, disk, t in items}
    sd = _align_prefix(state_dict, set(by_disk))
    # peft also writes whole embedding matrices (when embed_tokens/lm_head are targets, or the vocabulary was
    # resized); they are base weights, optional in a checkpoint, and loaded like peft loads them
    by_disk.update({k: t for k, t in _embedding_params(model).items() if k in sd and k not in by_disk})
    mismatched = [(k, tuple(sd[k].shape), tuple(t.shape)) for k, t in by_disk.items()
                  if k in sd and sd[k].shape != t.shape]
    if mismatched and ignore_mismatched_sizes:
        lines = "\n".join(f"- {k}: found shape {a} in the checkpoint and {b} in the model instantiated"
                           for k, a, b in mismatched)
        warnings.warn(f"Some weights of {type(model).__name__} were not initialized from the model checkpoint and are "
                      f"being ignored because you passed `ignore_mismatched_sizes=True`: {lines}.", UserWarning,
                      stacklevel=3)
        sd = {k: v for k, v in sd.items() if k not in {m[0] for m in mismatched}}
        by_disk = {k: t for k, t in by_disk.items() if k not in {m[0] for m in mismatched}}
        mismatched = []
    missing = sorted(k for k in by_disk if k not in sd)
    unexpected = sorted(k for k in sd if k not in by_disk)
    wrong_dtype = [(k, sd[k].dtype) for k, t in by_disk.items()
                   if k in sd and t.is_floating_point() and not sd[k].is_floating_point()]
    problems = []
    if wrong_dtype:
        lines = "; ".join(f"{k}: {d}" for k, d in wrong_dtype[:5])
        problems.append(f"{len(wrong_dtype)} checkpoint tensors have a non-float dtype where the model has floating-point "
                        f"weights ({lines}); an adapter holds float32, float16 or bfloat16 tensors")
    if mismatched:
        lines = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched[:5])
        problems.append(f"{len(mismatched)} tensors have other shapes than this model expects ({lines})")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensors belong to no module of this model "
                        f"(e.g. {unexpected[:3]})")
    if missing:
        problems.append(f"{len(missing)} adapter tensors are missing from the checkpoint (e.g. {missing[:3]})")
    if problems:
        named, this = getattr(config, "base_model_name_or_path", None), _name_or_path(model)
        other = f" Its config names base model {named!r}, this model is {this!r}." if named and named != this else ""
        raise ValueError(
            "the adapter does not fit this model: " + "; ".join(problems) + "." + other
            + " Was it trained on another base model, or with other target_modules / r? The model was left unchanged"
        )
    mem_of = {disk: mem for mem, disk, _ in items}
    with torch.no_grad():
        for k, t in by_disk.items():
            if t.is_meta:  # created with low_cpu_mem_usage=True: put the loaded tensor in its place
                _assign(model, mem_of.get(k, k), sd[k], t)
            else:
                _copy_into(t, sd[k])
    loaded = {mem_of.get(k, k) for k in by_disk}
    missing_keys = [k for k in model.state_dict() if _unfsdp(k) not in loaded and k not in loaded]
    return IncompatibleKeys(missing_keys=missing_keys, unexpected_keys=[])


def _copy_into(t: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole saved tensor into a parameter; a parameter sharded by FSDP2 (a ``DTensor``) takes its own
    shards of it (every process holds the same whole tensor, so each cuts its part locally, no communication)."""
    value = value.to(device=t.device, dtype=t.dtype)
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(t, DTensor):
            value = distribute_tensor(value, t.device_mesh, t.placements, src_data_rank=None)
    t.copy_(value)


def _assign(model: nn.Module, key: str, value: torch.Tensor, old: torch.Tensor) -> None:
    """Replace the meta-device parameter ``key`` of ``model`` by ``value`` (on the device of its layer's base)."""
    owner_name, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    device = old.device
    layer = model
    for part in owner_name.split(".") if owner_name else ():
        layer = getattr(layer, part, layer)
        if isinstance(layer, AdapterLayer):
            device = layer._base_weight().device
    if device.type == "meta":
        device = torch.device("cpu")
    owner._parameters[name] = nn.Parameter(value.to(device=device, dtype=old.dtype), requires_grad=old.requires_grad)


def _name_or_path(model: nn.Module) -> str | None:
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return getattr(getattr(base, "config", None), "_name_or_path", None) or None


def _embedding_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters of the model's embedding layers and output embedding, under their state-dict names."""
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        out = get_out() if callable(get_out) else None
    except (AttributeError, NotImplementedError):
        out = None
    heads = {id(out), id(out.get_base_layer())} if isinstance(out, AdapterLayer) else {id(out)}
    params = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Embedding) or (out is not None and id(module) in heads):
            for n, t in module.named_parameters(recurse=False):
                params[f"{path}.{n}" if path else n] = t
    return params


def _align_prefix(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Add or strip ``base_model.model.`` so a checkpoint from a PeftModel loads into an injected plain
    model and the reverse."""
    if not sd or not expected:
        return sd
    want_prefix = all(k.startswith(PEFT_PREFIX) for k in expected)
    has_prefix = all(k.startswith(PEFT_PREFIX) for k in sd)
    if want_prefix and not has_prefix:
        return {PEFT_PREFIX + k: v for k, v in sd.items()}
    if has_prefix and not want_prefix:
        return {k[len(PEFT_PREFIX):]: v for k, v in sd.items()}
    return sd
