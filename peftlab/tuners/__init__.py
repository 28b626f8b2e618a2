"""Adapter methods. ``base`` is the mechanism they share; each method lives in its own sub-package."""

from peftlab.tuners.base import AdapterLayer, BaseTuner
from peftlab.tuners.lora import LoraConfig, LoraModel

__all__ = ["AdapterLayer", "BaseTuner", "LoraConfig", "LoraModel"]
