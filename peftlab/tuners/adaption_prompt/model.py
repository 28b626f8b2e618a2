"""``AdaptionPromptModel``: LLaMA-Adapter's gated prompts in the top ``adapter_layers`` attention modules.

Explained in: book/llama_adapter.ipynb
"""

from __future__ import annotations

from typing import Any

from peftlab.tuners.adaption_prompt.layer import AdaptedAttention
from peftlab.tuners.base import BaseTuner, device_memory_bytes

#: model_type → the attention module in each decoder block: peft 0.21.2's Llama-family types. peft also takes
#: "gpt2", but adds the prompt's read without GPT-2's output projection c_proj (not the paper's Linear_o);
#: peftlab refuses GPT-2 (tests/test_adaption_prompt_interop.py pins the difference)
SUPPORTED_MODEL_TYPES: dict[str, str] = {"llama": "self_attn", "mistral": "self_attn"}


class AdaptionPromptModel(BaseTuner):
    """Wraps the attention module of each of the top ``adapter_layers`` decoder blocks with
    :class:`~peftlab.tuners.adaption_prompt.AdaptedAttention` (see :class:`~peftlab.tuners.base.BaseTuner`).

    Explained in: book/llama_adapter.ipynb
    """

    unwrap_emptied_layers = True  # as peft: an attention module no adapter uses any more is plain again

    @property
    def layer_dispatch(self) -> tuple:  # imported when a model is adapted: `import peftlab` stays light
        from transformers.models.llama.modeling_llama import LlamaAttention
        from transformers.models.mistral.modeling_mistral import MistralAttention

        return (((LlamaAttention, MistralAttention), AdaptedAttention),)

    def _prepare_config(self, config: Any) -> Any:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"LLaMA-Adapter (ADAPTION_PROMPT) supports Llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)}), "
                f"not model_type={model_type!r}: it needs attention with q/k/v/o projections and rotary positions. "
                "For this model use LoRA (LoraConfig) or another per-layer method"
            )
        if config.target_modules is None:
            config.target_modules = SUPPORTED_MODEL_TYPES[model_type]
        return config

    def is_target(self, config: Any, key: str) -> bool:
        """peft's rule for this method: the module's name ends with ``"." + target_modules``.

        Explained in: book/llama_adapter.ipynb
        """
        return key.endswith("." + config.target_modules)

    def filter_targets(self, config: Any, keys: list[str]) -> list[str]:
        """The top ``adapter_layers`` attention modules (the blocks come in model order).

        Explained in: book/llama_adapter.ipynb
        """
        if keys and config.adapter_layers > len(keys):
            raise ValueError(
                f"adapter_layers={config.adapter_layers}, but the model has {len(keys)} {config.target_modules!r} "
                f"modules (one per decoder block); give adapter_layers between 1 and {len(keys)}"
            )
        return keys[-config.adapter_layers:]

    def check_layer(self, config: Any, target: Any, key: str) -> None:
        weight = target.q_proj.weight  # e.g. adapter_len=2**40: refuse before allocating the prompt
        need = config.adapter_len * target.q_proj.in_features * 4  # float32 prompt, bytes
        have = device_memory_bytes(weight.device)
        if have and need > have:
            raise ValueError(f"adapter_len={config.adapter_len}: the prompt of {key!r} would need "
                             f"{need / 2**30:,.0f} GiB, more than the {have / 2**30:,.0f} GiB of {weight.device.type} "
                             "memory; the paper uses adapter_len=10")

    def layer_kwargs(self, config: Any, key: str, target: Any) -> dict[str, Any]:
        return {"adapter_len": config.adapter_len}
