"""Adapter methods. ``base`` is the mechanism they share; each method lives in its own sub-package."""

from peftlab.tuners.adaption_prompt import AdaptionPromptConfig, AdaptionPromptModel
from peftlab.tuners.base import AdapterLayer, BaseTuner
from peftlab.tuners.loha import LoHaConfig, LoHaModel
from peftlab.tuners.lokr import LoKrConfig, LoKrModel
from peftlab.tuners.lora import LoraConfig, LoraModel

__all__ = ["AdaptionPromptConfig", "AdaptionPromptModel", "AdapterLayer", "BaseTuner", "LoHaConfig", "LoHaModel", "LoKrConfig", "LoKrModel", "LoraConfig", "LoraModel"]
