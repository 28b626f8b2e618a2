"""LoKr (LyCORIS, arXiv 2309.14859; KronA, arXiv 2212.10650): ΔW = (α/r)·W1 ⊗ W2, either factor whole or low rank."""

from peftlab.tuners.lokr.config import LoKrConfig
from peftlab.tuners.lokr.layer import LoKrLayer, factorization
from peftlab.tuners.lokr.model import LoKrModel

__all__ = ["LoKrConfig", "LoKrLayer", "LoKrModel", "factorization"]

from peftlab.config import PeftType  # noqa: E402
from peftlab.registry import MethodSpec, register_method  # noqa: E402

register_method(MethodSpec(peft_type=PeftType.LOKR.value, config_class=LoKrConfig, tuner_class=LoKrModel,
                           prefix="lokr_", supports_merge=True, supports_mixed_batch=True))
