"""``BOFTConfig``: peft 0.21.2's BOFT config, with the same fields, defaults and checks.

Explained in: book/oft_boft.ipynb
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import PeftType, TargetingConfig
from peftlab.tuners.oft.config import check_probability, check_size


@dataclass
class BOFTConfig(TargetingConfig):
    """BOFT: h = s ⊙ (W Rᵀ) x with R = M_{m−1} ⋯ M_0 a product of m butterfly factors M_i = P_i B_i P_iᵀ.

    * ``boft_block_size`` (4) or ``boft_block_num`` (0): the size b of each factor's orthogonal blocks or their
      number; b·blocks = in_features (in_channels·kh·kw on a convolution); set exactly one;
    * ``boft_n_butterfly_factor`` (1): m, the number of factors. m = 1 is block-diagonal OFT (exact Cayley,
      full b×b storage); each further factor pairs blocks at twice the previous stride, so 2^(m−1)·b ≥ in gives
      a dense R. Needs even b and blocks, and b·2^(m−1) dividing the input size. peft 0.21.2 builds factors
      beyond the first only with its CUDA extension (else it warns and trains one); peftlab trains all m on
      every device;
    * ``boft_dropout`` (0.0): in training, int(p·blocks) random blocks of one random factor become I;
    * ``bias``: ``"none"``, ``"all"`` or ``"boft_only"``; ``init_weights`` (True): R = I and s = 1; False:
      blocks ~ N(0, 0.1²), s ~ N(1, 0.1²).

    Explained in: book/oft_boft.ipynb
    """

    PEFT_TYPE = PeftType.BOFT.value
    INIT_FIELD = "init_weights"
    BIAS_MODES = ("none", "all", "boft_only")
    ABSENT_FIELDS = frozenset({"rank_pattern", "alpha_pattern"})

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("boft_block_size", self.boft_block_size)
        check_size("boft_block_num", self.boft_block_num)
        if self.boft_block_size == 0 and self.boft_block_num == 0:
            raise ValueError("boft_block_size=0 and boft_block_num=0: set one of them, e.g. boft_block_size=4")
        if self.boft_block_size != 0 and self.boft_block_num != 0:
            raise ValueError(
                f"boft_block_size={self.boft_block_size} and boft_block_num={self.boft_block_num} are both set, but "
                "their product must equal each layer's input size: set one and leave the other 0, e.g. "
                f"BOFTConfig(boft_block_size={self.boft_block_size}, boft_block_num=0)"
            )
        m = self.boft_n_butterfly_factor
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"boft_n_butterfly_factor={m!r}: the number of butterfly factors is a positive integer; "
                             "1 is block-diagonal OFT, 2 doubles the reach of each block")
        check_probability("boft_dropout", self.boft_dropout)
