"""``LoraModel``: which LoRA layer wraps which module type, and how a config becomes layer arguments.

Explained in: book/lora.ipynb
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.quantization.nf4 import Linear4bit
from peftlab.tuners.base import BaseTuner, device_memory_bytes, layer_features
from peftlab.tuners.lora import init as lora_init
from peftlab.tuners.lora.config import LoraConfig
from peftlab.tuners.lora.layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, MultiheadAttention
from peftlab.utils.io import load_adapter_weights

#: layers that take DoRA and the initialisations that read the base weight (PiSSA, OLoRA, LoftQ)
LINEAR = (nn.Linear, Conv1D, Linear4bit)

# model_type -> default targets when a config leaves target_modules=None (the LoRA paper's W_q, W_v).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "xlm-roberta": ["query", "value"], "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"], "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"], "falcon": ["query_key_value"], "stablelm": ["q_proj", "v_proj"],
}


class LoraModel(BaseTuner):
    """Injects LoRA layers into a model (see :class:`~peftlab.tuners.base.BaseTuner`).

    Explained in: book/lora.ipynb
    """

    default_target_modules = DEFAULT_TARGET_MODULES
    layer_dispatch = (((nn.Embedding,), Embedding), ((nn.Conv1d,), Conv1d), ((nn.Conv2d,), Conv2d),
                      ((nn.Conv3d,), Conv3d), ((nn.MultiheadAttention,), MultiheadAttention), (LINEAR, Linear))

    def check_layer(self, config: LoraConfig, target: nn.Module, key: str) -> None:
        weight = getattr(target, "weight", None)
        r = config.rank_and_alpha(key)[0]
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:  # e.g. r=2**40: refuse before allocating A and B
            need = r * (weight.shape[0] + weight[0].numel()) * weight.element_size()  # A and B, bytes
            have = device_memory_bytes(weight.device)
            if have and need > have:
                raise ValueError(f"r={r} for {key!r}: A and B would need {need / 2**30:,.0f} GiB, more than the "
                                 f"{have / 2**30:,.0f} GiB of {weight.device.type} memory; the rank of ΔW is at most "
                                 f"{min(weight.shape[0], weight[0].numel())} here, so use r <= that")
        if isinstance(target, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and r % target.groups:  # peft's rule
            raise ValueError(
                f"Targeting a {type(target).__name__} with groups={target.groups} and rank {r}. Currently, support is "
                "limited to conv layers where the rank is divisible by groups. Either choose a different rank or do "
                f"not target this specific layer ({key!r})."
            )
        if isinstance(target, nn.MultiheadAttention):
            if not target._qkv_same_embed_dim:
                raise ValueError("Only same embed for query/key/value is supported as of now for MultiheadAttention.")
            if config.use_dora:
                raise ValueError("MultiheadAttention does not support DoRA (yet), please set use_dora to False")
        init = config.init_lora_weights
        if not isinstance(target, LINEAR):
            if lora_init.reads_base_weight(init):
                raise ValueError(
                    f"init_lora_weights={init!r}: target module {key!r} is a {type(target).__name__}, but this "
                    "initialisation supports nn.Linear, Conv1D and Linear4bit layers. Leave it out of "
                    "target_modules (or add it to exclude_modules)"
                )
            return
        if lora_init.reads_base_weight(init):
            r, _ = config.rank_and_alpha(key)
            n_in, n_out = layer_features(target)
            shape = tuple(target.weight.shape) if hasattr(target, "weight") else (n_out, n_in)
            if r > min(n_in, n_out):
                raise ValueError(f"init_lora_weights={init!r} with r={r} needs r <= min(in, out) = {min(n_in, n_out)}, "
                                 f"but target module {key!r} has a weight of shape {shape}; lower r for it "
                                 "(rank_pattern)")
            if init == "loftq" and isinstance(target, Linear4bit):
                raise ValueError(f"init_lora_weights='loftq': target module {key!r} is already 4-bit, but LoftQ needs "
                                 "the full-precision weight; apply it to the unquantised model, then quantize_model()")

    def layer_kwargs(self, config: LoraConfig, key: str, target: nn.Module) -> dict[str, Any]:
        r, alpha = config.rank_and_alpha(key)
        return {"r": r, "lora_alpha": alpha, "lora_dropout": config.lora_dropout,
                "init_lora_weights": config.init_lora_weights, "use_rslora": config.use_rslora,
                "lora_bias": config.lora_bias, "use_dora": config.use_dora,
                "loftq_config": config.loftq_config or None}

    @classmethod
    def state_dict_for_save(cls, model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str,
                            config: LoraConfig) -> dict[str, torch.Tensor]:
        """DoRA's magnitude is ``...lora_magnitude_vector.<adapter>.weight`` in memory and
        ``...lora_magnitude_vector`` in the file (peft's format)."""
        suffix = ".lora_magnitude_vector.weight"
        return {(k[:-len(".weight")] if k.endswith(suffix) else k): v for k, v in state.items()}

    @classmethod
    def state_dict_for_load(cls, model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str,
                            config: LoraConfig) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`state_dict_for_save`."""
        return {(k + ".weight" if k.endswith(".lora_magnitude_vector") else k): v for k, v in state.items()}

    @classmethod
    def convert_for_save(cls, state: dict[str, torch.Tensor], config: LoraConfig, initial_dir: str | os.PathLike,
                         ) -> tuple[dict[str, torch.Tensor], LoraConfig]:
        """A PiSSA/OLoRA adapter as a plain LoRA on the original base (see ``PeftModel.save_pretrained``).

        Explained in: book/lora_in_practice.ipynb
        """
        lora_init.check_conversion(config)
        if not os.path.isdir(initial_dir):
            raise ValueError(f"path_initial_model_for_weight_conversion={os.fspath(initial_dir)!r} is not a folder; "
                             "save the adapter right after get_peft_model(...) and pass that folder")
        initial = load_adapter_weights(initial_dir)
        converted = lora_init.subtract_mutated_init(state, initial)
        initial_config = copy.deepcopy(config)
        initial_config.init_lora_weights = True  # the initial folder now loads as a plain LoRA (peft does this)
        initial_config.inference_mode = True
        initial_config.save_pretrained(initial_dir)
        return converted, lora_init.converted_config(copy.deepcopy(config))

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
