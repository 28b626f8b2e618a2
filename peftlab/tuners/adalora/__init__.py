"""AdaLoRA (Zhang et al., arXiv 2303.10512): ΔW = P Λ Q in SVD form, with a rank budget allocated by importance."""

from peftlab.tuners.adalora.allocator import RankAllocator, budget_schedule
from peftlab.tuners.adalora.config import AdaLoraConfig
from peftlab.tuners.adalora.layer import AdaLoraLayer
from peftlab.tuners.adalora.model import AdaLoraModel

__all__ = ["AdaLoraConfig", "AdaLoraLayer", "AdaLoraModel", "RankAllocator", "budget_schedule"]

from peftlab.config import PeftType  # noqa: E402
from peftlab.registry import MethodSpec, register_method  # noqa: E402

register_method(MethodSpec(peft_type=PeftType.ADALORA.value, config_class=AdaLoraConfig, tuner_class=AdaLoraModel,
                           prefix="lora_", supports_merge=True, supports_mixed_batch=True))
