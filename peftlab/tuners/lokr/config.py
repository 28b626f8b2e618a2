"""``LoKrConfig``: peft 0.21.2's LoKr config, with the same fields, defaults and checks.

Explained in: book/loha_lokr.ipynb
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftlab.config import PeftType
from peftlab.tuners.lycoris import LycorisConfig


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr: h = W₀x + (α/r)·(W1 ⊗ W2) x, a Kronecker product of a small block W1 and a larger one W2.

    The weight's (out, in) is split as out = a·b, in = c·d (:func:`~peftlab.tuners.lokr.layer.factorization`);
    W1 is (a, c), W2 is (b, d). Fields beyond :class:`~peftlab.tuners.lycoris.LycorisConfig`'s:

    * ``decompose_factor`` (-1): split each dimension as ``factor × rest``; -1 picks the divisor pair nearest
      the square root. A factor must divide every adapted layer's in and out sizes;
    * ``decompose_both`` (False): also store W1 as a rank-r product ``lokr_w1_a @ lokr_w1_b`` (when r is below
      half its larger side); W2 is a rank-r product ``lokr_w2_a @ lokr_w2_b`` whenever r is below half of its
      larger side, else stored whole (``lokr_w2``);
    * ``rank_dropout_scale`` (False): rescale the kept rows after rank dropout by 1/mean of the mask;
    * ``init_weights``: True zeroes W1 (``lokr_w1`` or ``lokr_w1_a``); ``"lycoris"`` zeroes W2 instead
      (``lokr_w2`` or ``lokr_w2_b``), as the LyCORIS repository does; False leaves every factor random.

    Explained in: book/loha_lokr.ipynb
    """

    PEFT_TYPE = PeftType.LOKR.value
    INIT_CHOICES: ClassVar[tuple[str, ...]] = ("lycoris",)

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        f = self.decompose_factor
        if isinstance(f, bool) or not isinstance(f, int) or (f != -1 and f <= 0):
            raise ValueError(f"decompose_factor={f!r}: give -1 (split each size near its square root) or a positive "
                             "integer that divides the in and out sizes of every adapted layer, e.g. 4")
        for name in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be True or False")
