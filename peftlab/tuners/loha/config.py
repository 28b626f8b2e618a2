"""``LoHaConfig``: peft 0.21.2's LoHa config, with the same fields, defaults and checks.

Explained in: book/loha_lokr.ipynb
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import PeftType
from peftlab.tuners.lycoris import LycorisConfig


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa: h = W₀x + (α/r)·[(W1a W1b) ⊙ (W2a W2b)] x, two rank-r products multiplied entry by entry.

    * ``r`` (8), ``alpha`` (8): the rank of each product and the scaling α/r; ``rank_pattern`` /
      ``alpha_pattern`` override them per module;
    * ``rank_dropout`` (0.0): in training, drop output rows of ΔW (kept rows rescaled by 1/mean of the mask);
    * ``module_dropout`` (0.0): in training, skip the adapter for a step with this probability;
    * ``use_effective_conv2d`` (False): on a k×k convolution (k > 1) build each product from a core
      ``hada_t`` (r, r, k, k) and factors (r, out), (r, in) instead of flattening the kernel;
    * ``init_weights`` (True): ``hada_w2_b`` starts at zero so ΔW = 0; False: every factor random.

    Explained in: book/loha_lokr.ipynb
    """

    PEFT_TYPE = PeftType.LOHA.value
