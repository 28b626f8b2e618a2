"""``AdaLoraModel``: AdaLoRA layers, the orthogonality penalty on the loss, the rank allocation, and the files.

* ``forward`` adds ``orth_reg_weight`` × mean over P and Q of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F to the model
  output's ``loss`` (when there is one and the adapter is trainable), as peft does;
* ``update_and_allocate(global_step)`` runs the :class:`~peftlab.tuners.adalora.allocator.RankAllocator`
  (after the backward, before the gradients are cleared). peftlab calls it for you: the lab's training loop
  and :class:`peftlab.integrations.trainer.PeftlabCallback` (a ``transformers.TrainerCallback``) call
  :meth:`on_optimizer_step`; a model that trains past ``tinit`` without any call gets one warning naming
  the fix;
* saving cuts P, Λ, Q to the kept triplets and writes ``rank_pattern`` (``'<module>.lora_E': [bool, ...]``);
  loading resizes the layers to it first: peft's format, both ways.

Explained in: book/adalora.ipynb
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from peftlab.tuners.adalora.allocator import RankAllocator
from peftlab.tuners.adalora.config import AdaLoraConfig
from peftlab.tuners.adalora.layer import SUPPORTED_LAYERS, AdaLoraLayer
from peftlab.tuners.base import BaseTuner

# model_type -> default targets (peft 0.21.2's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING)
DEFAULT_TARGET_MODULES: dict[str, Any] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"], "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"], "deberta": ["in_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"], "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

#: training forward passes past ``tinit`` without an allocation call before the warning (room for gradient
#: accumulation: several forwards per optimizer step)
GRACE_FORWARDS = 16
PEFT_PREFIX = "base_model.model."


def orthogonality_penalty(layers: list[AdaLoraLayer], adapter_name: str) -> torch.Tensor | float:
    """R(P, Q) = mean over the 2·(layers) matrices of ‖QQᵀ − I‖_F (Q: r × in) and ‖PᵀP − I‖_F (P: out × r).

    Explained in: book/adalora.ipynb
    """
    groups: dict[tuple, list[torch.Tensor]] = {}  # Gram matrices of one shape are computed in one batch
    n = 0
    for layer in layers:
        if adapter_name not in layer.lora_A:
            continue
        q, p = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        n += 2
        if q.shape[0] == 0:
            continue  # an empty module: 0 × 0 Gram matrices, counted as peft counts them
        groups.setdefault(("Q", *q.shape, q.dtype, q.device), []).append(q)  # Q Qᵀ
        groups.setdefault(("P", *p.T.shape, p.dtype, p.device), []).append(p.T)  # Pᵀ P
    total: torch.Tensor | float = 0.0
    for mats in groups.values():
        m = mats[0].unsqueeze(0) if len(mats) == 1 else torch.stack(mats)  # (k, r, d)
        r, d = m.shape[1], m.shape[2]
        if r <= d:
            eye = torch.eye(r, device=m.device, dtype=m.dtype)
            total = total + torch.linalg.matrix_norm(torch.bmm(m, m.transpose(1, 2)) - eye).sum()
        else:  # r > d: the same norm from the d × d Gram matrix, never the r × r one (r = 2**20 would need 4 TiB):
            # ‖MMᵀ − I‖² = tr((MMᵀ)²) − 2 tr(MMᵀ) + r = ‖MᵀM‖² − 2‖M‖² + r, and it is ≥ r − d > 0 (rank ≤ d)
            sq = (torch.linalg.matrix_norm(torch.bmm(m.transpose(1, 2), m)) ** 2
                  - 2 * torch.linalg.matrix_norm(m) ** 2 + r)
            total = total + sq.clamp_min(0).sqrt().sum()
    return total / n if n else 0.0


class AdaLoraModel(BaseTuner):
    """Injects AdaLoRA layers and allocates their rank budget (see :class:`~peftlab.tuners.base.BaseTuner`).

    Explained in: book/adalora.ipynb
    """

    default_target_modules = DEFAULT_TARGET_MODULES
    layer_dispatch = ((SUPPORTED_LAYERS, AdaLoraLayer),)

    def __init__(self, model: nn.Module, peft_config: dict[str, Any], adapter_name: str = "default") -> None:
        self._allocators: dict[str, RankAllocator] = {}
        self._train_forwards = 0
        self._allocation_calls = 0
        self._warned = False
        super().__init__(model, peft_config, adapter_name)

    # ---- injection ------------------------------------------------------------------------------
    def check_layer(self, config: AdaLoraConfig, target: nn.Module, key: str) -> None:
        weight = getattr(target, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:  # e.g. init_r=2**40: refuse before allocating
            need = config.init_r * (weight.shape[0] + weight[0].numel() + 1) * 4  # P, Q, Λ in float32, bytes
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
            if have and need > have:
                raise ValueError(f"init_r={config.init_r} for {key!r}: P, Λ and Q would need {need / 2**30:,.0f} GiB, "
                                 f"more than the machine's {have / 2**30:,.0f} GiB; ΔW has rank at most "
                                 f"{min(weight.shape[0], weight[0].numel())} here, so use init_r <= that")
        if isinstance(target, nn.Conv2d) and target.groups != 1:
            raise ValueError(f"target module {key!r} is a grouped convolution (groups={target.groups}); AdaLoRA "
                             "supports groups=1 only. Leave it out of target_modules (or add it to exclude_modules)")

    def layer_kwargs(self, config: AdaLoraConfig, key: str, target: nn.Module) -> dict[str, Any]:
        return {"r": config.init_r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                "init_lora_weights": config.init_lora_weights}

    def _layers(self, adapter_name: str) -> list[tuple[str, AdaLoraLayer]]:
        """(path, layer) of every layer holding ``adapter_name`` (cached: the forward asks at every step)."""
        cache = self.__dict__.setdefault("_layer_cache", {})
        if adapter_name not in cache:
            cache[adapter_name] = [(k, m) for k, m in self.adapter_layers()
                                   if isinstance(m, AdaLoraLayer) and adapter_name in m.lora_A]
        return cache[adapter_name]

    def inject_adapter(self, adapter_name: str, config: Any, low_cpu_mem_usage: bool = False,
                       state_dict: dict[str, torch.Tensor] | None = None) -> None:
        self.__dict__.pop("_layer_cache", None)
        super().inject_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _training_adapters(self) -> list[str]:
        """Active adapters whose config is not in inference mode (peft's one ``trainable_adapter_name``)."""
        return [a for a in self.active_adapters if a in self.peft_config and not self.peft_config[a].inference_mode]

    def delete_adapter(self, adapter_name: str) -> None:
        self.__dict__.pop("_layer_cache", None)
        super().delete_adapter(adapter_name)
        self._allocators.pop(adapter_name, None)

    # ---- the loss -------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapters = self._training_adapters()
        if adapters and self.training and torch.is_grad_enabled():
            self._count_training_forward(adapters)
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if adapters and isinstance(loss, torch.Tensor):
            name = adapters[0]
            weight = self.peft_config[name].orth_reg_weight
            if weight > 0:
                layers = [m for _, m in self._layers(name)]
                outputs.loss = loss + weight * orthogonality_penalty(layers, name)
        return outputs

    def _count_training_forward(self, adapters: list[str]) -> None:
        self._train_forwards += 1
        if self._warned or self._allocation_calls:
            return
        tinit = min(self.peft_config[a].tinit for a in adapters)
        if self._train_forwards > tinit + GRACE_FORWARDS:
            self._warned = True
            warnings.warn(
                f"AdaLoRA adapter {adapters[0]!r} has trained {self._train_forwards} forward passes, past tinit={tinit}, "
                "without any rank allocation: it is training a plain LoRA of rank init_r. Call "
                "model.base_model.update_and_allocate(global_step) after every optimizer.step(), before "
                "zero_grad(); with transformers.Trainer pass callbacks=[peftlab.AdaLoraCallback()]; peftlab.Trainer "
                "and peftlab's lab.train(...) do it for you", UserWarning, stacklevel=3)

    # ---- the allocation -------------------------------------------------------------------------
    def allocator(self, adapter_name: str) -> RankAllocator:
        """The adapter's :class:`RankAllocator` (created at the first call, over the layers it has then)."""
        if adapter_name not in self._allocators:
            self._allocators[adapter_name] = RankAllocator(self.peft_config[adapter_name],
                                                           self._layers(adapter_name), adapter_name)
        return self._allocators[adapter_name]

    def update_and_allocate(self, global_step: int) -> None:
        """Update the importance scores and apply the budget of ``global_step``; call it after every backward
        (after ``optimizer.step()``), before the gradients are cleared. ``tinit``, ``tfinal`` and ``deltaT`` are
        handled here: scores from the first step, masks from ``tinit`` on every ``deltaT`` steps, the final
        mask at ``total_step - tfinal``, re-applied after every later step.

        Explained in: book/adalora.ipynb
        """
        self._allocation_calls += 1
        for name in self._training_adapters():
            config = self.peft_config[name]
            alloc = self.allocator(name)
            end = config.total_step - config.tfinal
            if global_step < end:
                alloc.update_ipt()
                budget, mask_now = alloc.budget_schedule(global_step)
                if mask_now:
                    config.rank_pattern = alloc.mask_to_budget(budget)
            elif global_step == end:
                config.rank_pattern = alloc.finalize()
            elif config.rank_pattern:
                alloc.mask_using_rank_pattern(config.rank_pattern)

    def on_optimizer_step(self, global_step: int) -> None:
        """Called by the training loop / Trainer callback after each optimizer step: the rank allocation."""
        self.update_and_allocate(global_step)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("AdaLoraModel has no add_weighted_adapter (peft has none either); combine LoRA adapters "
                        "with LoraModel.add_weighted_adapter")

    # ---- files ----------------------------------------------------------------------------------
    @staticmethod
    def _pattern_masks(rank_pattern: dict[str, Any], adapter_name: str) -> dict[str, torch.Tensor]:
        """'<module path>' -> kept triplets, from keys '<path>.lora_E' or '<path>.lora_E.<adapter>'."""
        out = {}
        for key, mask in rank_pattern.items():
            if key.endswith(f".{adapter_name}"):
                key = key[: -len(adapter_name) - 1]
            if not key.endswith(".lora_E"):
                raise ValueError(f"rank_pattern key {key!r}: AdaLoRA's keys end with '.lora_E'")
            out[key[: -len(".lora_E")]] = torch.as_tensor(mask, dtype=torch.bool).view(-1)
        return out

    @classmethod
    def state_dict_for_save(cls, model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str,
                            config: Any) -> dict[str, torch.Tensor]:
        """Cut P, Λ, Q to the kept triplets of ``config.rank_pattern`` and write the pattern without the
        adapter name (peft's format)."""
        if not config.rank_pattern:
            return state
        masks = cls._pattern_masks(config.rank_pattern, adapter_name)
        state = dict(state)
        by_path: dict[str, list[str]] = {}
        for k in state:
            module, _, attr = k.rpartition(".")
            if attr in ("lora_A", "lora_B", "lora_E"):
                by_path.setdefault(module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module,
                                   []).append(k)
        for path, mask in masks.items():
            for k in by_path.get(path, []):
                t = state[k]
                rows = t.shape[1] if k.endswith("lora_B") else t.shape[0]
                if int(mask.sum()) == rows:
                    continue  # already cut (a layer loaded from a cut file)
                if mask.numel() != rows:
                    raise ValueError(f"rank_pattern for {path} has {mask.numel()} entries but {k} has {rows} triplets")
                state[k] = t[:, mask.to(t.device)] if k.endswith("lora_B") else t[mask.to(t.device)]
        config.rank_pattern = {f"{p}.lora_E": m.tolist() for p, m in masks.items()}
        return state

    @classmethod
    def state_dict_for_load(cls, model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str,
                            config: Any) -> dict[str, torch.Tensor]:
        """Resize the layers to the saved ``rank_pattern`` (the file holds only the kept triplets)."""
        if not getattr(config, "rank_pattern", None):
            return state
        masks = cls._pattern_masks(config.rank_pattern, adapter_name)
        for path, module in model.named_modules():
            if not isinstance(module, AdaLoraLayer) or adapter_name not in module.lora_A:
                continue
            key = path[len(PEFT_PREFIX):] if path.startswith(PEFT_PREFIX) else path
            mask = masks.get(key)
            if mask is not None and int(mask.sum()) != module.r[adapter_name]:
                module.resize(adapter_name, mask)
        live = (getattr(model, "peft_config", None) or {}).get(adapter_name)
        if live is not None and live is not config:  # the layers now follow the file's pattern: so does the model
            live.rank_pattern = dict(config.rank_pattern)
        return state
