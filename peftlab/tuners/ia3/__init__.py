"""(IA)³ (Liu et al., arXiv 2205.05638): learned vectors that inhibit or amplify activations, h = l ⊙ (W x)."""

from peftlab.tuners.ia3.config import IA3Config
from peftlab.tuners.ia3.layer import IA3Layer
from peftlab.tuners.ia3.model import IA3Model

__all__ = ["IA3Config", "IA3Layer", "IA3Model"]

from peftlab.config import PeftType  # noqa: E402
from peftlab.registry import MethodSpec, register_method  # noqa: E402

register_method(MethodSpec(peft_type=PeftType.IA3.value, config_class=IA3Config, tuner_class=IA3Model,
                           prefix="ia3_", supports_merge=True, supports_mixed_batch=True))
