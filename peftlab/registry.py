"""The method registry: one table from a method's name (``peft_type``) to everything the core needs to know.

Each method package registers itself once, in its ``__init__``::

    register_method(MethodSpec(peft_type="LORA", config_class=LoraConfig, tuner_class=LoraModel,
                               prefix="lora_", supports_merge=True, supports_mixed_batch=True))

``PeftConfig.from_pretrained``/``from_dict``, ``get_peft_model``, ``inject_adapter_in_model``,
``PeftModel.from_pretrained``/``load_adapter``, the Auto classes and the transformers/diffusers
integrations all read this table, so a new method is found everywhere by that one call.

Explained in: book/configs.ipynb
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from peftlab.config import PeftConfig
    from peftlab.tuners.base import BaseTuner


@dataclass(frozen=True)
class MethodSpec:
    """What the core knows about one method.

    ``prefix`` starts the names of the method's adapter tensors (``lora_A`` → ``"lora_"``, ``hada_w1_a`` →
    ``"hada_"``); ``supports_merge`` says whether ``W' = f(W, adapter)`` exists (LLaMA-Adapter's gated
    prompts have no weight form); ``supports_mixed_batch`` whether rows of one batch may use different
    adapters (``adapter_names=[...]``).
    """

    peft_type: str
    config_class: type[PeftConfig]
    tuner_class: type[BaseTuner]
    prefix: str
    supports_merge: bool = True
    supports_mixed_batch: bool = True


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (a method registers once; registering the same name again replaces it)."""
    if spec.config_class.PEFT_TYPE != spec.peft_type:
        raise ValueError(f"{spec.config_class.__name__}.PEFT_TYPE={spec.config_class.PEFT_TYPE!r} differs from the "
                         f"registered peft_type={spec.peft_type!r}")
    _METHODS[spec.peft_type] = spec
    spec.tuner_class.method = spec  # the tuner reads its own flags (supports_merge, prefix) from here
    spec.tuner_class.prefix = spec.prefix  # peft's name for it
    return spec


def unregister_method(peft_type: str) -> None:
    """Remove a method (tests register throw-away methods and take them out again)."""
    _METHODS.pop(peft_type, None)


def known_methods() -> list[str]:
    """The registered ``peft_type`` names, sorted."""
    return sorted(_METHODS)


def _name(peft_type: Any) -> str:
    if isinstance(peft_type, enum.Enum):
        return str(peft_type.value)
    return str(peft_type)


def get_method(peft_type: Any) -> MethodSpec:
    """The spec of ``peft_type`` (a string, a :class:`~peftlab.PeftType` or a config); a clear error when unknown."""
    if hasattr(peft_type, "peft_type") and not isinstance(peft_type, (str, enum.Enum)):
        peft_type = peft_type.peft_type
    if peft_type is None:
        raise ValueError(f"the adapter config has no peft_type, so its method is unknown; known: {known_methods()}")
    name = _name(peft_type)
    if name not in _METHODS:
        raise ValueError(f"peft_type={name!r} is not a method peftlab implements; known methods: {known_methods()}")
    return _METHODS[name]


def methods() -> list[MethodSpec]:
    """Every registered spec, sorted by name."""
    return [_METHODS[k] for k in known_methods()]
