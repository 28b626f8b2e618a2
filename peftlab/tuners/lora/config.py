"""``LoraConfig``: every field of peft 0.21's LoRA config, with the same names, defaults and checks.

Explained in: book/configs.ipynb
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from peftlab.config import PeftConfig, PeftType, register_config

# init_lora_weights values peftlab implements (more arrive with the LoRA-in-practice chapter)
INIT_CHOICES = (True, False, "gaussian")


@register_config
@dataclass
class LoraConfig(PeftConfig):
    """LoRA: h = W₀x + (α/r)·B A x, with A (r × in) and B (out × r) trained and W₀ frozen.

    Explained in: book/lora.ipynb
    """

    PEFT_TYPE = PeftType.LORA.value
    UNSUPPORTED_KEYS = {
        "use_dora": False, "loftq_config": {}, "layer_replication": None, "megatron_config": None,
        "trainable_token_indices": None, "eva_config": None, "corda_config": None, "lora_ga_config": None,
        "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "monteclora_config": None,
        "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
        "ensure_weight_tying": False,
    }

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_bias: bool = False
    # Accepted for file compatibility with peft 0.21; only their default values are allowed (see UNSUPPORTED_KEYS).
    use_dora: bool = False
    loftq_config: dict = field(default_factory=dict)
    layer_replication: Any = None
    megatron_config: Any = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: Any = None
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    velora_config: Any = None
    alora_invocation_tokens: Any = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    target_parameters: Any = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_unsupported()
        if isinstance(self.target_modules, (list, tuple, set, frozenset)):
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.exclude_modules, (list, tuple, set, frozenset)):
            self.exclude_modules = sorted(set(self.exclude_modules))
        if isinstance(self.modules_to_save, (tuple, set, frozenset)):
            self.modules_to_save = sorted(self.modules_to_save)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r={self.r!r}: the rank must be a positive integer (e.g. r=8)")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{key!r}]={rank!r}: ranks must be positive integers")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must lie in [0, 1); 0.0 turns dropout off")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias={self.bias!r}; valid values: 'none', 'all', 'lora_only'")
        if self.init_lora_weights not in INIT_CHOICES:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not implemented; valid values: "
                f"{', '.join(map(repr, INIT_CHOICES))}"
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be combined with a regex target_modules string; use a list")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("layers_pattern cannot be combined with a regex target_modules string; use a list")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform (the block indices to adapt)")

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """r and α for the module named ``key``, after ``rank_pattern`` and ``alpha_pattern``."""
        from peftlab.tuners.matching import get_pattern_key

        r = self.rank_pattern.get(get_pattern_key(self.rank_pattern, key), self.r) if self.rank_pattern else self.r
        alpha = (self.alpha_pattern.get(get_pattern_key(self.alpha_pattern, key), self.lora_alpha)
                 if self.alpha_pattern else self.lora_alpha)
        return r, alpha
