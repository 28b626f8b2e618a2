"""OFT (Qiu et al. 2023, arXiv 2306.07280): h = (W Rᵀ) x, R block-diagonal orthogonal from skew Q by Cayley."""

from peftlab.tuners.oft.config import OFTConfig
from peftlab.tuners.oft.layer import OFTLayer
from peftlab.tuners.oft.model import OFTModel

__all__ = ["OFTConfig", "OFTLayer", "OFTModel"]

from peftlab.config import PeftType  # noqa: E402
from peftlab.registry import MethodSpec, register_method  # noqa: E402

register_method(MethodSpec(peft_type=PeftType.OFT.value, config_class=OFTConfig, tuner_class=OFTModel,
                           prefix="oft_", supports_merge=True, supports_mixed_batch=True))
