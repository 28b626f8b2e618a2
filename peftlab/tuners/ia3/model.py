"""``IA3Model``: (IA)³ vectors on Linear, Conv1D, Conv2d and Conv3d targets; which targets scale their input.

Explained in: book/ia3.ipynb
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.tuners import matching
from peftlab.tuners.base import BaseTuner
from peftlab.tuners.ia3.config import IA3Config
from peftlab.tuners.ia3.layer import IA3Layer

# model_type -> default targets and feed-forward targets (peft 0.21.2's TRANSFORMERS_MODELS_TO_IA3_*_MAPPING):
# keys and values of attention, and the feed-forward block's down projection (whose input is scaled).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"], "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"], "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"], "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
}
DEFAULT_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"], "roberta": ["output.dense"],
    "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"], "gpt_neo": ["c_proj"], "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"], "llama4": ["down_proj"], "mistral": ["down_proj"],
    "mixtral": ["w2"], "bert": ["output.dense"], "deberta-v2": ["output.dense"], "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"], "RefinedWebModel": ["dense_4h_to_h"], "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"], "gemma": ["down_proj"], "gemma2": ["down_proj"], "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"], "qwen3": ["down_proj"],
}


def _matches(entry: str, key: str) -> bool:
    return key == entry or key.endswith("." + entry)


def is_feedforward(config: IA3Config, key: str) -> bool:
    """Whether module ``key`` is a feed-forward target (its input is scaled): a regex string must match the
    whole name; a list entry matches the name or its last dotted parts, as ``target_modules`` entries do
    (peft 0.21.2 tests ``key.endswith(entry)`` without the dot, so ``"proj"`` also catches ``q_proj`` there).

    Explained in: book/ia3.ipynb
    """
    ff = config.feedforward_modules
    if not ff:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(_matches(e, key) for e in ff)


class IA3Model(BaseTuner):
    """Injects (IA)³ layers into a model (see :class:`~peftlab.tuners.base.BaseTuner`).

    Explained in: book/ia3.ipynb
    """

    default_target_modules = DEFAULT_TARGET_MODULES
    layer_dispatch = (((nn.Linear, Conv1D, nn.Conv2d, nn.Conv3d), IA3Layer),)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._default_ff: set[int] = set()  # ids of configs whose feedforward_modules came from the table
        super().__init__(*args, **kwargs)

    def _prepare_config(self, config: IA3Config) -> IA3Config:
        config = super()._prepare_config(config)  # default targets, 'all-linear'
        if config.feedforward_modules is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            if model_type not in DEFAULT_FEEDFORWARD_MODULES:
                raise ValueError(
                    f"feedforward_modules=None, and IA3 has no default for model_type={model_type!r}; name the "
                    "targets whose input is scaled (the feed-forward down projection), e.g. "
                    "feedforward_modules=['down_proj'], or feedforward_modules=[] for none"
                )
            config.feedforward_modules = list(DEFAULT_FEEDFORWARD_MODULES[model_type])
            self._default_ff.add(id(config))
        return config

    def filter_targets(self, config: IA3Config, keys: list[str]) -> list[str]:
        """Check the feed-forward list against the matched targets (a regex ``target_modules`` cannot be
        checked when the config is made); a default list keeps only the entries that match a target, so the
        saved config is a subset of the targets and loads again (peft saves the whole default list, e.g.
        ``down_proj`` for ``target_modules=['q_proj']``, and then refuses to load its own file)."""
        ff = config.feedforward_modules
        if isinstance(ff, list) and ff:
            unmatched = [e for e in ff if not any(_matches(e, k) for k in keys)]
            if id(config) in self._default_ff:
                config.feedforward_modules = [e for e in ff if e not in unmatched]
            elif unmatched:
                raise ValueError(
                    f"feedforward_modules entries {unmatched} match none of the targeted modules "
                    f"({matching.near_misses(unmatched, keys)}); a feed-forward module must also be a target. "
                    "Fix the names, or add the modules to target_modules"
                )
        self._default_ff.discard(id(config))
        return keys

    def layer_kwargs(self, config: IA3Config, key: str, target: nn.Module) -> dict[str, Any]:
        return {"is_feedforward": is_feedforward(config, key), "init_ia3_weights": config.init_ia3_weights}

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add ``adapter_name`` with l = Σᵢ wᵢ lᵢ per layer (peft's linear combination of the vectors). The new
        adapter is frozen and not active: ``set_adapter(adapter_name)``.

        Explained in: book/ia3.ipynb
        """
        from peftlab.merging.ia3 import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name)
