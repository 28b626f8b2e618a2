"""LoRA (Hu et al., 2021): a frozen W₀ plus a trained low-rank update (α/r)·B A."""

from peftlab.tuners.lora.config import LoftQConfig, LoraConfig
from peftlab.tuners.lora.layer import Conv, Embedding, Linear, LoraLayer
from peftlab.tuners.lora.model import LoraModel

__all__ = ["LoraConfig", "LoftQConfig", "LoraLayer", "Linear", "Embedding", "Conv", "LoraModel"]
