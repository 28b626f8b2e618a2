"""Entry points: ``get_peft_model`` and ``inject_adapter_in_model`` (methods are found in :mod:`peftlab.registry`).

Explained in: book/quickstart.ipynb
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.config import PeftConfig
import peftlab.tuners  # noqa: F401  (every method package registers itself)
from peftlab.peft_model import MODEL_TYPE_TO_PEFT_MODEL, PeftModel, tuner_for


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config``; only the adapter is trainable.

    The class returned follows ``peft_config.task_type`` (e.g. ``PeftModelForCausalLM``).

    Explained in: book/quickstart.ipynb
    """
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a PeftConfig such as LoraConfig(...), not {type(peft_config).__name__}")
    tuner_for(peft_config)  # an unknown method fails here, naming the known ones
    if mixed:
        raise ValueError("mixed=True (several adapter types in one model) is not implemented in peftlab")
    if revision is not None:
        peft_config.revision = revision
    cls = MODEL_TYPE_TO_PEFT_MODEL.get(str(peft_config.task_type), PeftModel)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None,
                            ) -> nn.Module:
    """Put adapter layers into ``model`` itself (no ``PeftModel`` around it) and return it.

    State-dict names then have no ``base_model.model.`` prefix, as in transformers' and diffusers'
    adapter integrations. ``low_cpu_mem_usage=True`` creates the adapter on the meta device (load a
    checkpoint next with ``set_peft_model_state_dict(..., low_cpu_mem_usage=True)``); ``state_dict`` adapts
    exactly the modules it has tensors for.

    Explained in: book/integrations.ipynb
    """
    tuner = tuner_for(peft_config)(model, {adapter_name: peft_config}, adapter_name,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
    model.peft_config = tuner.peft_config  # as in peft: get/set_peft_model_state_dict find the config here
    return model
