"""BOFT (Liu et al. 2023, arXiv 2311.06243): OFT with R a product of butterfly-permuted block-diagonal factors."""

from peftlab.tuners.boft.config import BOFTConfig
from peftlab.tuners.boft.layer import BOFTLayer
from peftlab.tuners.boft.model import BOFTModel

__all__ = ["BOFTConfig", "BOFTLayer", "BOFTModel"]

from peftlab.config import PeftType  # noqa: E402
from peftlab.registry import MethodSpec, register_method  # noqa: E402

register_method(MethodSpec(peft_type=PeftType.BOFT.value, config_class=BOFTConfig, tuner_class=BOFTModel,
                           prefix="boft_", supports_merge=True, supports_mixed_batch=True))
