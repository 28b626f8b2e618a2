"""``LoHaModel``: LoHa layers on every nn.Linear, nn.Conv1d and nn.Conv2d target.

Explained in: book/loha_lokr.ipynb
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.tuners.base import device_memory_bytes
from peftlab.tuners.loha.config import LoHaConfig
from peftlab.tuners.loha.layer import LoHaLayer
from peftlab.tuners.lycoris import SUPPORTED_LAYERS, LycorisTuner


class LoHaModel(LycorisTuner):
    """Injects LoHa layers into a model (see :class:`~peftlab.tuners.base.BaseTuner`).

    Explained in: book/loha_lokr.ipynb
    """

    layer_dispatch = ((SUPPORTED_LAYERS, LoHaLayer),)

    def check_layer(self, config: LoHaConfig, target: nn.Module, key: str) -> None:
        weight = getattr(target, "weight", None)
        r = config.rank_and_alpha(key)[0]
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:  # e.g. r=2**40: refuse before allocating
            need = 2 * r * (weight.shape[0] + weight[0].numel()) * 4  # two pairs of float32 factors, bytes
            have = device_memory_bytes(weight.device)
            if have and need > have:
                raise ValueError(f"r={r} for {key!r}: LoHa's four factors would need {need / 2**30:,.0f} GiB, more "
                                 f"than the {have / 2**30:,.0f} GiB of {weight.device.type} memory; LoHa's ΔW reaches "
                                 f"full rank with r² ≥ {min(weight.shape[0], weight[0].numel())}, so a small r "
                                 "(4 to 16) is enough")
