"""``AdaLoraConfig``: peft 0.21.2's AdaLoRA config, with the same fields, defaults and checks (and three more).

Explained in: book/adalora.ipynb
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from peftlab.config import PeftType, TargetingConfig

# peft's AdaLoraConfig is a LoraConfig: its files carry every LoRA key. The ones AdaLoRA has no use for are
# accepted at their default (and written at it), so a peft file loads here without a warning.
_LORA_KEYS_UNUSED: dict[str, Any] = {
    "use_rslora": False, "lora_bias": False, "layer_replication": None, "megatron_config": None,
    "megatron_core": "megatron.core", "trainable_token_indices": None, "eva_config": None, "corda_config": None,
    "lora_ga_config": None, "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False,
    "qalora_group_size": 16, "monteclora_config": None, "target_parameters": None, "use_bdlora": None,
    "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False,
}


def _nonneg_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r} must be an integer >= 0 (a number of training steps)")


@dataclass
class AdaLoraConfig(TargetingConfig):
    """AdaLoRA: ΔW = P Λ Q per module, with a rank budget the training moves to where it matters.

    * ``init_r`` (12): the rank every module starts with; ``target_r`` (8): the average rank left at the end
      (the total budget is ``target_r`` × number of adapted modules);
    * ``tinit`` (0), ``tfinal`` (0), ``total_step`` (required): ``tinit`` warm-up steps at the full budget,
      then a cubic decrease to the target until ``total_step - tfinal``, then ``tfinal`` steps with the
      final ranks fixed; ``deltaT`` (1): steps between two re-allocations;
    * ``beta1`` (0.85), ``beta2`` (0.85): the smoothing of the sensitivity |w·∂L/∂w| and of its uncertainty;
    * ``orth_reg_weight`` (0.5): the weight of the orthogonality penalty ‖PᵀP − I‖ + ‖QQᵀ − I‖ added to the loss;
    * ``rank_pattern`` (None): which triplets each module keeps, written by the allocation;
    * the LoRA fields ``lora_alpha`` (8), ``lora_dropout``, ``init_lora_weights`` (True: Λ = 0, P and Q small
      Gaussians), ``bias``, ``fan_in_fan_out`` and the targeting fields. ``r`` is not used (``init_r`` is).

    Refused with a clear error: ``target_r > init_r``, ``tinit + tfinal >= total_step``, a missing
    ``total_step`` (peft refuses the last two only).

    Explained in: book/adalora.ipynb
    """

    PEFT_TYPE = PeftType.ADALORA.value
    RANK_FIELD, ALPHA_FIELD, INIT_FIELD = "init_r", "lora_alpha", "init_lora_weights"
    BIAS_MODES = ("none", "all", "lora_only")
    FILE_DEFAULTS = _LORA_KEYS_UNUSED
    UNSUPPORTED_KEYS = {"loftq_config": None}

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_lora_weights: bool = True
    use_dora: bool = False
    loftq_config: dict = field(default_factory=dict)
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (peft's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, Any] | None = None  # type: ignore[assignment]  (module -> kept triplets)

    def __post_init__(self) -> None:
        pattern, self.rank_pattern = self.rank_pattern, {}  # the shared checks expect LoRA's {name: rank}
        try:
            if self.alpha_pattern:
                raise ValueError(f"alpha_pattern={self.alpha_pattern!r}: AdaLoRA scales every module by the same "
                                 "lora_alpha (peft ignores alpha_pattern here); leave it empty")
            super().__post_init__()  # types, targets, layers, bias, modules_to_save, init_r > 0
        finally:
            self.rank_pattern = pattern
        if self.use_dora:
            raise ValueError("AdaLoraConfig(use_dora=True): AdaLoRA does not support DoRA; use LoraConfig for DoRA")
        if self.r != 8:
            warnings.warn(f"AdaLoraConfig(r={self.r}): r is not used by AdaLoRA; the starting rank is init_r="
                          f"{self.init_r}", UserWarning, stacklevel=3)
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must lie in [0, 1); 0.0 turns dropout off")
        if self.total_step is None or self.total_step <= 0:
            raise ValueError(f"total_step={self.total_step!r}: AdaLoRA's budget schedule needs the number of "
                             "training steps in advance; give total_step > 0, e.g. total_step=len(dataloader) * epochs")
        if not isinstance(self.target_r, int) or isinstance(self.target_r, bool) or self.target_r <= 0:
            raise ValueError(f"target_r={self.target_r!r}: the target average rank must be a positive integer")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} > init_r={self.init_r}: AdaLoRA only prunes ranks, so the "
                             f"target must not exceed the start; use init_r >= {self.target_r} or target_r <= "
                             f"{self.init_r}")
        for name in ("tinit", "tfinal"):
            _nonneg_int(name, getattr(self, name))
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(f"tinit={self.tinit} + tfinal={self.tfinal} >= total_step={self.total_step}: no step is "
                             "left for the budget to decrease; lower tinit/tfinal or raise total_step (e.g. "
                             f"total_step={self.tinit + self.tfinal + 100})")
        if not isinstance(self.deltaT, int) or isinstance(self.deltaT, bool) or self.deltaT < 1:
            raise ValueError(f"deltaT={self.deltaT!r}: the steps between two allocations must be an integer >= 1")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} must lie strictly between 0 and 1 (an EMA "
                                 "coefficient, e.g. 0.85)")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight={self.orth_reg_weight!r} must be >= 0 (0 turns the regulariser off)")
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r}; AdaLoRA accepts True (Λ = 0, P and Q "
                             "Gaussian with std 0.02) or False (all three Gaussian)")
        if self.rank_pattern is not None:
            self._check_rank_pattern(self.rank_pattern)

    @staticmethod
    def _check_rank_pattern(pattern: Any) -> None:
        if not isinstance(pattern, dict):
            raise TypeError(f"rank_pattern={pattern!r}: AdaLoRA's rank_pattern maps '<module>.lora_E' to a list of "
                            "booleans (which triplets the module keeps); it is written by the allocation")
        for key, mask in pattern.items():
            if not isinstance(mask, list) or not all(isinstance(b, bool) or b in (0, 1) for b in mask):
                raise ValueError(f"rank_pattern[{key!r}]={mask!r}: give a list of booleans, one per triplet "
                                 "(True: kept)")
