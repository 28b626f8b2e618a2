"""LLaMA-Adapter (arXiv 2303.16199): adaption prompts read through zero-initialised gated attention."""

from peftlab.tuners.adaption_prompt.config import AdaptionPromptConfig
from peftlab.tuners.adaption_prompt.layer import AdaptedAttention
from peftlab.tuners.adaption_prompt.model import AdaptionPromptModel

__all__ = ["AdaptedAttention", "AdaptionPromptConfig", "AdaptionPromptModel"]

from peftlab.config import PeftType  # noqa: E402
from peftlab.registry import MethodSpec, register_method  # noqa: E402

# no merge: the prompt's attention depends on each query, so it is no fixed change of any weight;
# no mixed batches: the attention module's other inputs (rotary tables, masks) are per batch, not per row
register_method(MethodSpec(peft_type=PeftType.ADAPTION_PROMPT.value, config_class=AdaptionPromptConfig,
                           tuner_class=AdaptionPromptModel, prefix="adaption_", supports_merge=False,
                           supports_mixed_batch=False))
