"""X-LoRA (arXiv 2402.07148): frozen LoRA experts mixed per token and per layer by a learned gate."""

from peftlab.tuners.xlora.config import XLoraConfig
from peftlab.tuners.xlora.model import XLoraClassifier, XLoraModel, layer_scalings, load_scalings_log

__all__ = ["XLoraClassifier", "XLoraConfig", "XLoraModel", "layer_scalings", "load_scalings_log"]

from peftlab.config import PeftType  # noqa: E402
from peftlab.registry import MethodSpec, register_method  # noqa: E402

# no weight form (the mix changes per token) and no mixed batches (the gate picks the experts)
register_method(MethodSpec(peft_type=PeftType.XLORA.value, config_class=XLoraConfig, tuner_class=XLoraModel,
                           prefix="lora_", supports_merge=False, supports_mixed_batch=False))
