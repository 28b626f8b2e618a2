"""peftlab in other libraries' shapes: transformers' ``model.add_adapter`` API and diffusers' LoRA calls.

Explained in: book/integrations.ipynb
"""

from peftlab.integrations.diffusers import LoraLoaderMixin, infer_lora_config, lora_state_dict
from peftlab.integrations.transformers import PeftAdapterMixin, enable_adapters_api, get_tuner

__all__ = ["PeftAdapterMixin", "enable_adapters_api", "get_tuner", "LoraLoaderMixin", "lora_state_dict",
           "infer_lora_config"]
