"""``LoKrModel``: LoKr layers on every nn.Linear, nn.Conv1d and nn.Conv2d target.

Explained in: book/loha_lokr.ipynb
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.tuners.lokr.config import LoKrConfig
from peftlab.tuners.lokr.layer import LoKrLayer
from peftlab.tuners.lycoris import SUPPORTED_LAYERS, LycorisTuner


class LoKrModel(LycorisTuner):
    """Injects LoKr layers into a model (see :class:`~peftlab.tuners.base.BaseTuner`).

    Explained in: book/loha_lokr.ipynb
    """

    layer_dispatch = ((SUPPORTED_LAYERS, LoKrLayer),)

    def check_layer(self, config: LoKrConfig, target: nn.Module, key: str) -> None:
        f = config.decompose_factor
        if f == -1:
            return
        out = target.out_features if isinstance(target, nn.Linear) else target.out_channels
        n_in = target.in_features if isinstance(target, nn.Linear) else target.in_channels // target.groups
        bad = [f"{what} size {size}" for what, size in (("in", n_in), ("out", out)) if size % f]
        if bad:
            raise ValueError(
                f"decompose_factor={f} does not divide the {' and '.join(bad)} of target module {key!r}; use "
                "decompose_factor=-1 (split each size near its square root) or a common divisor of every adapted "
                "layer's sizes, or leave the module out of target_modules"
            )

    def layer_kwargs(self, config: LoKrConfig, key: str, target: nn.Module) -> dict[str, Any]:
        return {**super().layer_kwargs(config, key, target), "decompose_both": config.decompose_both,
                "decompose_factor": config.decompose_factor, "rank_dropout_scale": config.rank_dropout_scale}
