"""LoRA (Hu et al., 2021): a frozen W₀ plus a trained low-rank update (α/r)·B A."""

from peftlab.tuners.lora.config import LoftQConfig, LoraConfig
from peftlab.tuners.lora.layer import (Conv, Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer,
                                       MultiheadAttention)
from peftlab.tuners.lora.model import LoraModel

__all__ = ["LoraConfig", "LoftQConfig", "LoraLayer", "Linear", "Embedding", "Conv", "Conv1d", "Conv2d", "Conv3d",
           "MultiheadAttention", "LoraModel"]

from peftlab.config import PeftType  # noqa: E402
from peftlab.registry import MethodSpec, register_method  # noqa: E402

register_method(MethodSpec(peft_type=PeftType.LORA.value, config_class=LoraConfig, tuner_class=LoraModel,
                           prefix="lora_", supports_merge=True, supports_mixed_batch=True))
