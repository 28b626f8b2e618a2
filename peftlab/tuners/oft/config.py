"""``OFTConfig``: peft 0.21.2's OFT config, with the same fields, defaults and checks.

Explained in: book/oft_boft.ipynb
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from peftlab.config import PeftType, TargetingConfig


def check_probability(name: str, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name}={p!r} must be a probability in [0, 1); 0.0 turns it off")


def check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer (0 means: derive it from the other size)")


# the longest Neumann truncation accepted: 0.75^64 ≈ 1e-8, below float32's resolution next to I
MAX_NEUMANN_TERMS = 64


@dataclass
class OFTConfig(TargetingConfig):
    """OFT: h = (W Rᵀ) x with R block-diagonal and orthogonal, R_i = Cayley(Q_i), Q_i skew (Qᵀ = −Q).

    * ``oft_block_size`` (32) or ``r`` (0): the block size b or the number of blocks r, with r·b = in_features
      (in_channels·kh·kw on a convolution); set exactly one, the other stays 0. A block size must divide every
      adapted layer's size (peft silently picks a nearby divisor; peftlab refuses and names valid ones);
    * ``use_cayley_neumann`` (True) and ``num_cayley_neumann_terms`` (5): peft's truncated series instead of
      the exact Cayley map (faster, orthogonal only approximately);
    * ``coft`` (False) and ``eps`` (6e-5): constrained OFT, keeps each ‖Q_i‖ ≤ eps/√(blocks) by projection;
    * ``block_share`` (False): one block shared by all r blocks;
    * ``module_dropout`` (0.0): in training, int(p·r) random blocks are replaced by I (peft 0.21.2 stores
      this setting but never applies it; peftlab does);
    * ``bias``: ``"none"``, ``"all"`` or ``"oft_only"``; ``init_weights`` (True): Q = 0, so R = I; False: Q ~
      N(0, 0.1²).

    Explained in: book/oft_boft.ipynb
    """

    PEFT_TYPE = PeftType.OFT.value
    INIT_FIELD = "init_weights"
    BIAS_MODES = ("none", "all", "oft_only")
    ABSENT_FIELDS = frozenset({"rank_pattern", "alpha_pattern"})

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        check_size("oft_block_size", self.oft_block_size)
        if self.r == 0 and self.oft_block_size == 0:
            raise ValueError("r=0 and oft_block_size=0: set one of them, e.g. oft_block_size=32 (the block size) or "
                             "r=8 (the number of blocks)")
        if self.r != 0 and self.oft_block_size != 0:
            raise ValueError(
                f"r={self.r} and oft_block_size={self.oft_block_size} are both set, but r × oft_block_size must equal "
                f"each layer's input size: set one and leave the other 0, e.g. OFTConfig(r=0, "
                f"oft_block_size={self.oft_block_size}) or OFTConfig(r={self.r}, oft_block_size=0)"
            )
        check_probability("module_dropout", self.module_dropout)
        if not math.isfinite(self.eps) or self.eps <= 0:
            raise ValueError(f"eps={self.eps!r}: COFT's radius must be a positive number, e.g. 6e-5")
        n = self.num_cayley_neumann_terms
        if isinstance(n, bool) or not isinstance(n, int) or (self.use_cayley_neumann and n < 2):
            raise ValueError(f"num_cayley_neumann_terms={n!r}: with fewer than 2 terms the series is I whatever the "
                             "parameters (nothing would train); use 2 or more (peft's default 5), or "
                             "use_cayley_neumann=False for the exact map")
        if self.use_cayley_neumann and n > MAX_NEUMANN_TERMS:
            raise ValueError(f"num_cayley_neumann_terms={n}: at most {MAX_NEUMANN_TERMS} terms. Each term costs one "
                             "matrix product per block at every forward; for ‖Q‖ ≤ 0.75 the 64th power is already "
                             "below float32's resolution, and as ‖Q‖ nears 1 the series converges too slowly to be "
                             f"worth it. Use at most {MAX_NEUMANN_TERMS} (peft's default is 5), or "
                             "use_cayley_neumann=False: the exact inverse, for less")
