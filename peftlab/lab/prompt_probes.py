"""Looking inside a LLaMA-Adapter model: each adapted block's gate, and how much its prompt read moves the block.

:func:`gate_values` reads the gate g of every adapted block (the attention mass each query puts on that block's
prompt, since the prompt part of a row of S_g sums to g); :func:`prompt_read_share` runs the model once on a
batch with a forward hook on every adapted attention module and measures, per block, the size of the gated
prompt read against the frozen attention output, ‖adapted − frozen‖ / ‖frozen‖.

Explained in: book/llama_adapter.ipynb
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from peftlab.tuners.adaption_prompt import AdaptedAttention

__all__ = ["adapted_blocks", "gate_values", "prompt_read_share"]


def adapted_blocks(model: nn.Module) -> dict[str, AdaptedAttention]:
    """``{"block i": module}`` for every adapted attention module of ``model``, in model order (``i``: the
    block's index, the last number in the module's name).

    Explained in: book/llama_adapter.ipynb
    """
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, AdaptedAttention):
            index = next((part for part in reversed(name.split(".")) if part.isdigit()), name)
            found[f"block {index}"] = module
    if not found:
        raise ValueError(f"{type(model).__name__} has no adapted attention module: wrap the model with "
                         "get_peft_model(model, AdaptionPromptConfig(adapter_len=..., adapter_layers=...)) first")
    return found


def gate_values(model: nn.Module, adapter: str = "default") -> list[float]:
    """The gate g of ``adapter`` in every block it adapts, from the lowest block to the top.

    Explained in: book/llama_adapter.ipynb
    """
    values = [float(m.adaption_gate[adapter].detach()) for m in adapted_blocks(model).values()
              if adapter in m.adaption_gate]
    if not values:
        raise ValueError(f"no adapted block holds an adapter named {adapter!r}")
    return values


def prompt_read_share(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, float]:
    """Per adapted block, ‖adapted attention output − frozen attention output‖ / ‖frozen output‖ on ``batch``:
    how large the active adapters' gated prompt read is against what the block's attention computes anyway.

    One forward pass without KV cache, under ``torch.no_grad()``; a forward hook on each adapted attention
    module runs its frozen ``base_layer`` on the same inputs. Norms over the whole batch (every position).
    Blocks the active adapters do not reach read nothing (0.0). The hooks are removed afterwards.

    Explained in: book/llama_adapter.ipynb
    """
    blocks = adapted_blocks(model)
    share: dict[str, list[float]] = {label: [] for label in blocks}

    def measure(label: str):
        def hook(module: AdaptedAttention, args: tuple, kwargs: dict, out: Any) -> None:
            own = module.base_layer(*args, **kwargs)
            own, out = (own[0], out[0]) if isinstance(own, tuple) else (own, out)
            share[label].append(float((out - own).norm() / own.norm()))
        return hook

    handles = [m.register_forward_hook(measure(label), with_kwargs=True) for label, m in blocks.items()]
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {label: sum(v) / len(v) for label, v in share.items()}
