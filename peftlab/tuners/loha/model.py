"""``LoHaModel``: LoHa layers on every nn.Linear, nn.Conv1d and nn.Conv2d target.

Explained in: book/loha_lokr.ipynb
"""

from __future__ import annotations

from peftlab.tuners.loha.layer import LoHaLayer
from peftlab.tuners.lycoris import SUPPORTED_LAYERS, LycorisTuner


class LoHaModel(LycorisTuner):
    """Injects LoHa layers into a model (see :class:`~peftlab.tuners.base.BaseTuner`).

    Explained in: book/loha_lokr.ipynb
    """

    layer_dispatch = ((SUPPORTED_LAYERS, LoHaLayer),)
