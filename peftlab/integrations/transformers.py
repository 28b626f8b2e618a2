"""transformers-style adapter methods on a plain model: ``model.add_adapter(config)``, ``set_adapter``, ...

transformers gives every ``PreTrainedModel`` the methods ``add_adapter``, ``set_adapter``,
``disable_adapters``, ``enable_adapters``, ``active_adapters``, ``delete_adapter``, ``load_adapter``,
``get_adapter_state_dict`` and an adapter-only ``save_pretrained``, but they call the ``peft`` package.
:class:`PeftAdapterMixin` gives the same methods, built on peftlab's tuner, to a transformers model or to
any ``nn.Module``: mix it into a class, or call :func:`enable_adapters_api` on a model you already have.

The adapters go into the model itself (as ``inject_adapter_in_model`` does), so the model keeps its own
class, forward and ``generate``, and state-dict names have no ``base_model.model.`` prefix. The tuner that
manages them is kept in ``model.__dict__`` without being registered as a submodule, so it adds nothing to
``state_dict()``, ``parameters()`` or ``named_modules()``.

Explained in: book/integrations.ipynb
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftlab.config import PeftConfig
from peftlab.mapping import tuner_for
from peftlab.peft_model import _model_name
from peftlab.tuners.base import BaseTuner
from peftlab.utils.io import (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, atomic_folder, atomic_save_tensors,
                              load_adapter_weights, resolve_adapter_dir)
from peftlab.utils.save_and_load import PEFT_PREFIX, load_adapter_state_dict
from peftlab.utils.save_and_load import adapter_state_dict as _adapter_state_dict

TUNER_ATTR = "_peftlab_tuner"
NO_ADAPTER = "No adapter loaded. Please load an adapter first with add_adapter(config) or load_adapter(path)."


def get_tuner(model: nn.Module) -> BaseTuner | None:
    """The tuner managing ``model``'s adapters (``None`` when it has none).

    Explained in: book/integrations.ipynb
    """
    return model.__dict__.get(TUNER_ATTR)


def _require_tuner(model: nn.Module) -> BaseTuner:
    tuner = get_tuner(model)
    if tuner is None:
        raise ValueError(NO_ADAPTER)
    return tuner


def _attach(model: nn.Module, tuner: BaseTuner | None) -> None:
    # object.__setattr__ bypasses nn.Module.__setattr__, so the tuner (which holds the model as a
    # submodule) is not registered as a submodule of the model: no cycle in named_modules().
    if tuner is None:
        model.__dict__.pop(TUNER_ATTR, None)
        object.__setattr__(model, "_hf_peft_config_loaded", False)
    else:
        object.__setattr__(model, TUNER_ATTR, tuner)
        object.__setattr__(model, "_hf_peft_config_loaded", True)  # what transformers sets


def _names(adapter_names: str | Sequence[str]) -> list[str]:
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


def _check_known(tuner: BaseTuner, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in tuner.peft_config]
    if missing:
        raise ValueError(f"no adapter named {', '.join(map(repr, missing))}; adapters: {list(tuner.peft_config)}")


# ---------------------------------------------------------------------------------------------------
# The functions (work on any nn.Module); the mixin's methods call them.
# ---------------------------------------------------------------------------------------------------
def add_adapter(model: nn.Module, adapter_config: PeftConfig, adapter_name: str | None = None) -> None:
    """Inject a new adapter into ``model`` and make it the active (trainable) one, as transformers does.

    The first adapter creates the tuner (``inject_adapter_in_model``'s one step, keeping the tuner);
    later ones are injected by the same tuner, so all adapters share one ``peft_config`` dict.

    Explained in: book/integrations.ipynb
    """
    if not isinstance(adapter_config, PeftConfig):
        raise TypeError(
            f"adapter_config must be a PeftConfig such as LoraConfig(...), not {type(adapter_config).__name__}"
        )
    adapter_name = adapter_name or "default"
    tuner = get_tuner(model)
    if tuner is not None and adapter_name in tuner.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} already exists; choose another adapter_name")
    if adapter_config.base_model_name_or_path is None:
        adapter_config.base_model_name_or_path = _model_name(model)
    if tuner is None:
        _attach(model, tuner_for(adapter_config)(model, {adapter_name: adapter_config}, adapter_name))
    else:
        first = next(iter(tuner.peft_config.values()))
        if str(first.peft_type) != str(adapter_config.peft_type):
            raise ValueError(f"this model's adapters are {first.peft_type}; a {adapter_config.peft_type} adapter "
                             "cannot be added next to them")
        tuner.inject_adapter(adapter_name, adapter_config)
    set_adapter(model, adapter_name)


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> None:
    """Make one adapter (or several: their effects add up) active; the others are switched off and frozen.

    Explained in: book/integrations.ipynb
    """
    tuner = _require_tuner(model)
    _check_known(tuner, _names(adapter_name))
    tuner.set_adapter(adapter_name)


def disable_adapters(model: nn.Module) -> None:
    """Switch every adapter off: the model computes exactly what the base model computes.

    Explained in: book/integrations.ipynb
    """
    _require_tuner(model).disable_adapter_layers()


def enable_adapters(model: nn.Module) -> None:
    """Switch the active adapters back on after :func:`disable_adapters`.

    Explained in: book/integrations.ipynb
    """
    _require_tuner(model).enable_adapter_layers()


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters (a list, also when only one is active).

    Explained in: book/integrations.ipynb
    """
    return list(_require_tuner(model).active_adapters)


def delete_adapter(model: nn.Module, adapter_names: str | Sequence[str]) -> None:
    """Remove adapters (active ones too, as in transformers); after the last one the model is plain again.

    Explained in: book/integrations.ipynb
    """
    tuner = _require_tuner(model)
    names = _names(adapter_names)
    _check_known(tuner, names)
    for name in names:
        tuner.delete_adapter(name)
    if not tuner.peft_config:  # after the last one the model is plain again (the tuner keeps empty layers)
        tuner.unload()
        _attach(model, None)


def get_adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's on-disk names, without ``base_model.model.``.

    Keys look like ``model.layers.0.self_attn.q_proj.lora_A.weight``: the module path in ``model`` plus the
    adapter tensor's name, with the adapter name removed. ``None`` means the first active adapter.

    Explained in: book/integrations.ipynb
    """
    tuner = _require_tuner(model)
    if adapter_name is None:
        active = tuner.active_adapters
        if not active:
            raise ValueError(f"no adapter is active; name one of {list(tuner.peft_config)}")
        adapter_name = active[0]
    _check_known(tuner, [adapter_name])
    return _adapter_state_dict(model, adapter_name, tuner.peft_config[adapter_name])


def load_adapter(model: nn.Module, peft_model_id: str | os.PathLike | None = None, adapter_name: str | None = None,
                 is_trainable: bool = False, adapter_state_dict: dict[str, torch.Tensor] | None = None,
                 peft_config: PeftConfig | None = None, allow_pickle: bool | None = None, **kwargs: Any) -> None:
    """Add the adapter saved in ``peft_model_id`` (a folder written by peft, peftlab or transformers) and
    activate it; or build one from ``peft_config`` + ``adapter_state_dict``.

    The checkpoint is read and checked before it counts: a missing file, or tensors that do not fit the
    model (other modules, other shapes), raise and leave the model as it was. Frozen unless
    ``is_trainable=True``.

    Explained in: book/integrations.ipynb
    """
    adapter_name = adapter_name or "default"
    tuner = get_tuner(model)
    if tuner is not None and adapter_name in tuner.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} already exists; choose another adapter_name")
    if peft_model_id is None and (peft_config is None or adapter_state_dict is None):
        raise ValueError("pass peft_model_id (an adapter folder), or both peft_config and adapter_state_dict")
    folder = None
    if peft_model_id is not None:
        folder = resolve_adapter_dir(peft_model_id, subfolder=kwargs.get("subfolder"))
    if peft_config is None:
        peft_config = PeftConfig.from_pretrained(folder)
    else:
        peft_config = copy.copy(peft_config)
    if adapter_state_dict is None:
        adapter_state_dict = load_adapter_weights(folder, allow_pickle=allow_pickle)  # before touching the model
    peft_config.inference_mode = not is_trainable
    previous_active = None if tuner is None else copy.copy(tuner.active_adapter)
    add_adapter(model, peft_config, adapter_name)
    try:
        load_adapter_state_dict(model, adapter_state_dict, adapter_name, peft_config)
    except ValueError:
        _undo_add(model, adapter_name, previous_active)
        raise
    if not is_trainable:
        model.eval()


def _undo_add(model: nn.Module, adapter_name: str, previous_active: str | list[str] | None) -> None:
    tuner = _require_tuner(model)
    tuner.remove_adapter_entirely(adapter_name)
    if not tuner.peft_config:
        tuner.unload()
        _attach(model, None)
    elif previous_active is not None:
        tuner.set_adapter(previous_active)


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, adapter_name: str | None = None,
                 save_peft_format: bool = True, safe_serialization: bool = True) -> None:
    """Write one adapter (default: the active one) as ``adapter_model.safetensors`` + ``adapter_config.json``.

    With ``save_peft_format=True`` (transformers' default) keys get the ``base_model.model.`` prefix that
    ``PeftModel`` writes, so ``PeftModel.from_pretrained`` in peft or peftlab reads the folder unchanged.

    Explained in: book/integrations.ipynb
    """
    tuner = _require_tuner(model)
    if adapter_name is None:
        active = tuner.active_adapters
        if len(active) != 1:
            raise ValueError(
                f"{len(active)} adapters are active ({active}); save them one at a time with "
                "set_adapter(name) then save_pretrained(...), or pass adapter_name"
            )
        adapter_name = active[0]
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!s} is a file; pass a folder path")
    state = get_adapter_state_dict(model, adapter_name)
    if save_peft_format:
        state = {PEFT_PREFIX + k: v for k, v in state.items()}
    config = copy.copy(tuner.peft_config[adapter_name])
    config.inference_mode = True
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = _model_name(model)
    weights = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    with atomic_folder(save_directory, keep_existing=True) as stage:  # config and weights appear together
        atomic_save_tensors(state, os.path.join(stage, weights), safe_serialization)
        config.save_pretrained(stage)


# ---------------------------------------------------------------------------------------------------
# The mixin
# ---------------------------------------------------------------------------------------------------
class PeftAdapterMixin:
    """transformers' adapter methods (``add_adapter``, ``set_adapter``, ...) for any ``nn.Module``, built on peftlab.

    Use ``class MyModel(PeftAdapterMixin, nn.Module)``, or :func:`enable_adapters_api` on an existing model.

    Explained in: book/integrations.ipynb
    """

    def add_adapter(self, adapter_config: PeftConfig, adapter_name: str | None = None) -> None:
        """Add a fresh adapter (for training) and activate it.

        Explained in: book/integrations.ipynb
        """
        add_adapter(self, adapter_config, adapter_name)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter, or several (a list) whose effects add up.

        Explained in: book/integrations.ipynb
        """
        set_adapter(self, adapter_name)

    def disable_adapters(self) -> None:
        """Run the base model only, until :meth:`enable_adapters`.

        Explained in: book/integrations.ipynb
        """
        disable_adapters(self)

    def enable_adapters(self) -> None:
        """Switch the active adapters back on.

        Explained in: book/integrations.ipynb
        """
        enable_adapters(self)

    def active_adapters(self) -> list[str]:
        """The active adapters' names.

        Explained in: book/integrations.ipynb
        """
        return active_adapters(self)

    def delete_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Remove one or several adapters.

        Explained in: book/integrations.ipynb
        """
        delete_adapter(self, adapter_names)

    def load_adapter(self, peft_model_id: str | os.PathLike | None = None, adapter_name: str | None = None,
                     is_trainable: bool = False, adapter_state_dict: dict[str, torch.Tensor] | None = None,
                     peft_config: PeftConfig | None = None, **kwargs: Any) -> None:
        """Load a saved adapter (peft's folder layout) under ``adapter_name`` and activate it.

        Explained in: book/integrations.ipynb
        """
        load_adapter(self, peft_model_id, adapter_name, is_trainable, adapter_state_dict, peft_config, **kwargs)

    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors, keys without ``base_model.model.``.

        Explained in: book/integrations.ipynb
        """
        return get_adapter_state_dict(self, adapter_name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        """Adapter name -> config, for every adapter in the model.

        Explained in: book/integrations.ipynb
        """
        tuner = get_tuner(self)
        if tuner is not None:
            return tuner.peft_config
        if "_peft_config" in self.__dict__:  # set by another library (peft's tuners write model.peft_config)
            return self.__dict__["_peft_config"]
        raise AttributeError(f"{type(self).__name__} has no adapters, so no peft_config")

    @peft_config.setter
    def peft_config(self, value: dict[str, PeftConfig]) -> None:
        self.__dict__["_peft_config"] = value

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, save_peft_format: bool = True,
                        adapter_name: str | None = None, **kwargs: Any) -> None:
        """With adapters: write only the active adapter, in peft's format. Without: the class's own save.

        Explained in: book/integrations.ipynb
        """
        if get_tuner(self) is not None:
            save_adapter(self, save_directory, adapter_name, save_peft_format,
                         kwargs.get("safe_serialization", True))
            return
        parent = getattr(super(), "save_pretrained", None)
        if parent is None:
            raise ValueError(f"{type(self).__name__} has no adapters to save (add_adapter first)")
        parent(save_directory, *args, **kwargs)


_WITH_ADAPTERS: dict[type, type] = {}


def enable_adapters_api(model: nn.Module) -> nn.Module:
    """Give an existing model :class:`PeftAdapterMixin`'s methods (in place) and return it.

    The model's class becomes a subclass of its own class with the mixin first, under the same name, so
    ``isinstance`` checks, ``forward``, ``generate`` and the repr are unchanged, and the mixin's methods
    take precedence over transformers' own peft-backed ones.

    Explained in: book/integrations.ipynb
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"enable_adapters_api needs an nn.Module, got {type(model).__name__}")
    cls = type(model)
    if isinstance(model, PeftAdapterMixin):
        return model
    if cls not in _WITH_ADAPTERS:
        _WITH_ADAPTERS[cls] = type(cls.__name__, (PeftAdapterMixin, cls),
                                   {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    model.__class__ = _WITH_ADAPTERS[cls]
    return model
