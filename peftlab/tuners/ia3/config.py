"""``IA3Config``: peft 0.21.2's (IA)³ config, with the same fields, defaults and checks.

Explained in: book/ia3.ipynb
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import PeftType, TargetingConfig, _sorted_list


@dataclass
class IA3Config(TargetingConfig):
    """(IA)³: learned vectors that rescale activations, h = l ⊙ (W x) or h = W (l ⊙ x).

    Fields beyond the targeting ones (``target_modules``, ``exclude_modules``, ``modules_to_save``,
    ``fan_in_fan_out``):

    * ``feedforward_modules`` (None): the targets whose *input* is scaled (the paper's l_ff on the input of
      the feed-forward block's down projection); every other target has its *output* scaled (l_k, l_v).
      A list must be a subset of a list ``target_modules``; a string is a regex matched against the whole
      module name. None: the default for the model type (peft's table), e.g. ``down_proj`` for Llama;
    * ``init_ia3_weights`` (True): the vectors start at one, so a fresh adapter changes nothing; False
      leaves them at the standard-normal draw (peft discourages it, and so do we).

    peft's IA3 config has no ``bias``, ``rank_pattern``, ``alpha_pattern``, ``layers_to_transform`` or
    ``layers_pattern``: they stay at their defaults and are not written to ``adapter_config.json``.

    Explained in: book/ia3.ipynb
    """

    PEFT_TYPE = PeftType.IA3.value
    INIT_FIELD = "init_ia3_weights"
    ABSENT_FIELDS = frozenset({"bias", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern"})

    feedforward_modules: list[str] | str | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.feedforward_modules = _sorted_list(self.feedforward_modules)
        ff = self.feedforward_modules
        if ff is not None and not (isinstance(ff, str) or (isinstance(ff, list) and all(isinstance(e, str) for e in ff))):
            raise TypeError(f"feedforward_modules={ff!r}: give a list of module names (a subset of target_modules) "
                            "or a regex string")
        if not isinstance(self.init_ia3_weights, bool):
            raise TypeError(f"init_ia3_weights={self.init_ia3_weights!r} must be True or False")
        if isinstance(ff, list) and isinstance(self.target_modules, list):
            outside = sorted(set(ff) - set(self.target_modules))
            if outside:
                raise ValueError(
                    f"feedforward_modules {outside} are not in target_modules={self.target_modules}: a feed-forward "
                    "module is a target whose input (not output) is scaled, so it must be a target too. Add "
                    f"{outside} to target_modules, or drop them from feedforward_modules"
                )
