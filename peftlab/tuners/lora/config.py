"""``LoraConfig``: every field of peft 0.21's LoRA config, with the same names, defaults and checks.

Explained in: book/configs.ipynb
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from peftlab.config import PeftType, TargetingConfig
from peftlab.tuners.lora.init import INIT_CHOICES, check_init_lora_weights  # noqa: F401


@dataclass
class LoftQConfig:
    """LoftQ's settings: ``loftq_bits`` of the quantised base (4: NF4) and ``loftq_iter`` alternations of
    Q = quant(W − s·B A) and s·B A = SVD_r(W − Q).

    Explained in: book/lora_in_practice.ipynb
    """

    loftq_bits: int = 4
    loftq_iter: int = 1


@dataclass
class LoraConfig(TargetingConfig):
    """LoRA: h = W₀x + (α/r)·B A x, with A (r × in) and B (out × r) trained and W₀ frozen.

    Explained in: book/lora.ipynb
    """

    PEFT_TYPE = PeftType.LORA.value
    RANK_FIELD, ALPHA_FIELD, INIT_FIELD = "r", "lora_alpha", "init_lora_weights"
    BIAS_MODES = ("none", "all", "lora_only")
    UNSUPPORTED_KEYS = {
        "layer_replication": None, "megatron_config": None,
        "trainable_token_indices": None, "eva_config": None, "corda_config": None, "lora_ga_config": None,
        "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "monteclora_config": None,
        "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
        "ensure_weight_tying": False,
    }

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    lora_bias: bool = False
    use_dora: bool = False
    loftq_config: dict | LoftQConfig = field(default_factory=dict)
    # Accepted for file compatibility with peft 0.21; only their default values are allowed (see UNSUPPORTED_KEYS).
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
        super().__post_init__()  # the shared fields: targets, patterns, layers, bias, modules_to_save, r
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must lie in [0, 1); 0.0 turns dropout off")
        check_init_lora_weights(self.init_lora_weights)
        self._check_loftq_and_dora()

    def _check_loftq_and_dora(self) -> None:
        if self.init_lora_weights == "loftq":
            if not self.loftq_config:
                raise ValueError("init_lora_weights='loftq' needs loftq_config, e.g. "
                                 "loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)")
            if isinstance(self.loftq_config, LoftQConfig):
                self.loftq_config = dataclasses.asdict(self.loftq_config)
            if not isinstance(self.loftq_config, dict):
                raise TypeError(f"loftq_config must be a LoftQConfig or a dict, not {type(self.loftq_config).__name__}")
            bits, iters = self.loftq_config.get("loftq_bits", 4), self.loftq_config.get("loftq_iter", 1)
            if bits != 4:
                raise ValueError(f"loftq_config loftq_bits={bits!r}: peftlab's LoftQ quantises to NF4, so "
                                 "loftq_bits must be 4")
            if not isinstance(iters, int) or iters < 1:
                raise ValueError(f"loftq_config loftq_iter={iters!r}: the number of alternations must be an integer "
                                 ">= 1")
        elif self.loftq_config:
            warnings.warn("loftq_config is ignored because init_lora_weights is not 'loftq'", UserWarning, stacklevel=3)
            self.loftq_config = {}
        if self.lora_bias:
            if self.init_lora_weights not in (True, False):
                raise ValueError(f"lora_bias=True works with init_lora_weights=True or False only, not "
                                 f"init_lora_weights={self.init_lora_weights!r}")
            if self.use_dora:
                raise ValueError("lora_bias=True cannot be combined with use_dora=True (DoRA rescales the whole "
                                 "output); set one of them to False")
