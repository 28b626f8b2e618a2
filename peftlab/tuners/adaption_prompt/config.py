"""``AdaptionPromptConfig``: peft 0.21.2's LLaMA-Adapter config, with the same fields and the same file.

Explained in: book/llama_adapter.ipynb
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import PeftType, TargetingConfig


@dataclass
class AdaptionPromptConfig(TargetingConfig):
    """LLaMA-Adapter (arXiv 2303.16199): ``adapter_len`` learnable prompt vectors in each of the top
    ``adapter_layers`` attention modules, read through a gate that starts at zero.

    * ``target_modules`` (None → ``"self_attn"``): the name of the attention module inside each decoder block
      (peft's rule: a module whose name ends with ``"." + target_modules``); one name (a string), not a list;
    * ``adapter_len``: prompt vectors per adapted layer (the paper's K = 10);
    * ``adapter_layers``: how many blocks, counted from the top, get prompts (the paper's L = 30 of 32).

    Each adapted layer trains ``adapter_len · hidden_size + 1`` numbers (the prompt and one gate).
    peft's config has none of the other targeting fields (exclude_modules, layers_to_transform, patterns,
    modules_to_save, bias, fan_in_fan_out): they stay unset.

    Explained in: book/llama_adapter.ipynb
    """

    PEFT_TYPE = PeftType.ADAPTION_PROMPT.value
    ABSENT_FIELDS = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
                               "alpha_pattern", "modules_to_save", "bias", "fan_in_fan_out"})

    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, example in (("adapter_len", 10), ("adapter_layers", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r}: give a positive integer, e.g. {name}={example}")

    @property
    def is_adaption_prompt(self) -> bool:
        return True
