"""LoHa (FedPara, arXiv 2108.06098; LyCORIS): ΔW = (α/r)·(W1a W1b) ⊙ (W2a W2b), rank up to r²."""

from peftlab.tuners.loha.config import LoHaConfig
from peftlab.tuners.loha.layer import LoHaLayer
from peftlab.tuners.loha.model import LoHaModel

__all__ = ["LoHaConfig", "LoHaLayer", "LoHaModel"]

from peftlab.config import PeftType  # noqa: E402
from peftlab.registry import MethodSpec, register_method  # noqa: E402

register_method(MethodSpec(peft_type=PeftType.LOHA.value, config_class=LoHaConfig, tuner_class=LoHaModel,
                           prefix="hada_", supports_merge=True, supports_mixed_batch=True))
