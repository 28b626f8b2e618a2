"""``LoraModel``: which LoRA layer wraps which module type, and how a config becomes layer arguments.

Explained in: book/lora.ipynb
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.quantization.nf4 import Linear4bit
from peftlab.tuners.base import AdapterLayer, BaseTuner
from peftlab.tuners.lora import init as lora_init
from peftlab.tuners.lora.config import LoraConfig
from peftlab.tuners.lora.layer import Conv, Embedding, Linear, LoraLayer

SUPPORTED = (nn.Linear, Conv1D, Linear4bit, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: layers that take DoRA and the initialisations that read the base weight (PiSSA, OLoRA, LoftQ)
LINEAR = (nn.Linear, Conv1D, Linear4bit)


class LoraModel(BaseTuner):
    """Injects LoRA layers into a model (see :class:`~peftlab.tuners.base.BaseTuner`).

    Explained in: book/lora.ipynb
    """

    def check_target(self, config: LoraConfig, target: nn.Module, key: str) -> None:
        if not isinstance(target, SUPPORTED):
            raise ValueError(
                f"target module {key!r} is a {type(target).__name__}; LoRA supports "
                f"{', '.join(t.__name__ for t in SUPPORTED)}. Narrow target_modules (or add it to exclude_modules)"
            )
        if isinstance(target, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and target.groups != 1:
            raise ValueError(
                f"target module {key!r} is a grouped convolution (groups={target.groups}); peftlab's LoRA supports "
                "groups=1 only. Exclude it with exclude_modules"
            )
        init = config.init_lora_weights
        if not isinstance(target, LINEAR):
            if config.use_dora:
                raise ValueError(
                    f"use_dora=True: target module {key!r} is a {type(target).__name__}, but peftlab's DoRA supports "
                    "nn.Linear, Conv1D and Linear4bit layers. Leave it out of target_modules (or add it to "
                    "exclude_modules)"
                )
            if lora_init.reads_base_weight(init):
                raise ValueError(
                    f"init_lora_weights={init!r}: target module {key!r} is a {type(target).__name__}, but this "
                    "initialisation supports nn.Linear, Conv1D and Linear4bit layers. Leave it out of "
                    "target_modules (or add it to exclude_modules)"
                )
            return
        if lora_init.reads_base_weight(init):
            r, _ = config.rank_and_alpha(key)
            shape = tuple(target.weight.shape) if hasattr(target, "weight") else (target.out_features,
                                                                                  target.in_features)
            if r > min(shape):
                raise ValueError(f"init_lora_weights={init!r} with r={r} needs r <= min(in, out) = {min(shape)}, but "
                                 f"target module {key!r} has a weight of shape {shape}; lower r for it (rank_pattern)")
            if init == "loftq" and isinstance(target, Linear4bit):
                raise ValueError(f"init_lora_weights='loftq': target module {key!r} is already 4-bit, but LoftQ needs "
                                 "the full-precision weight; apply it to the unquantised model, then quantize_model()")

    def _layer_kwargs(self, config: LoraConfig, key: str) -> dict[str, Any]:
        r, alpha = config.rank_and_alpha(key)
        return {"r": r, "lora_alpha": alpha, "lora_dropout": config.lora_dropout,
                "init_lora_weights": config.init_lora_weights, "use_rslora": config.use_rslora,
                "lora_bias": config.lora_bias, "use_dora": config.use_dora,
                "loftq_config": config.loftq_config or None}

    def create_new_module(self, config: LoraConfig, adapter_name: str, target: nn.Module, key: str) -> AdapterLayer:
        kwargs = self._layer_kwargs(config, key)
        if isinstance(target, nn.Embedding):
            return Embedding(target, adapter_name, **kwargs)
        if isinstance(target, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return Conv(target, adapter_name, **kwargs)
        if isinstance(target, Conv1D):
            if not config.fan_in_fan_out:
                warnings.warn(f"{key} is a Conv1D (weight stored in × out): setting fan_in_fan_out=True",
                              UserWarning, stacklevel=4)
                config.fan_in_fan_out = True
            return Linear(target, adapter_name, fan_in_fan_out=True, **kwargs)
        if config.fan_in_fan_out:
            warnings.warn(f"{key} is an nn.Linear (weight stored out × in): setting fan_in_fan_out=False",
                          UserWarning, stacklevel=4)
            config.fan_in_fan_out = False
        return Linear(target, adapter_name, fan_in_fan_out=False, **kwargs)

    def update_existing(self, config: LoraConfig, adapter_name: str, target: AdapterLayer, key: str) -> None:
        if not isinstance(target, LoraLayer):
            raise ValueError(f"{key} already carries a {type(target).__name__} adapter; LoRA cannot be added to it")
        target.update_layer(adapter_name, **self._layer_kwargs(config, key))

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total", *, seed: int | None = None) -> None:
        """Add ``adapter_name``, a weighted merge of ``adapters`` (``combination_type``: svd, linear, cat,
        ties, ties_svd, dare_ties, dare_linear, dare_ties_svd, dare_linear_svd, magnitude_prune,
        magnitude_prune_svd). The new adapter is frozen and not active: ``set_adapter(adapter_name)``.

        Explained in: book/merging_adapters.ipynb
        """
        from peftlab.merging.lora import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                             svd_full_matrices, svd_driver, density, majority_sign_method, seed=seed)
