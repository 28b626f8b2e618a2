"""Adapter methods. ``base`` is the mechanism they share; each method lives in its own sub-package."""

from peftlab.tuners.adalora import AdaLoraConfig, AdaLoraModel
from peftlab.tuners.adaption_prompt import AdaptionPromptConfig, AdaptionPromptModel
from peftlab.tuners.base import AdapterLayer, BaseTuner
from peftlab.tuners.boft import BOFTConfig, BOFTModel
from peftlab.tuners.ia3 import IA3Config, IA3Model
from peftlab.tuners.loha import LoHaConfig, LoHaModel
from peftlab.tuners.lokr import LoKrConfig, LoKrModel
from peftlab.tuners.lora import LoraConfig, LoraModel
from peftlab.tuners.oft import OFTConfig, OFTModel
from peftlab.tuners.xlora import XLoraConfig, XLoraModel

__all__ = ["AdaLoraConfig", "AdaLoraModel", "AdaptionPromptConfig", "AdaptionPromptModel", "AdapterLayer", "BaseTuner",
           "BOFTConfig", "BOFTModel", "IA3Config", "IA3Model", "LoHaConfig", "LoHaModel", "LoKrConfig", "LoKrModel",
           "LoraConfig", "LoraModel", "OFTConfig", "OFTModel", "XLoraConfig", "XLoraModel"]
