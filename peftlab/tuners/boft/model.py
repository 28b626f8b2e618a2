"""``BOFTModel``: BOFT layers on every nn.Linear and nn.Conv2d target.

Explained in: book/oft_boft.ipynb
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.tuners.boft.config import BOFTConfig
from peftlab.tuners.boft.layer import BOFTLayer
from peftlab.tuners.orthogonal import SUPPORTED_LAYERS, OrthogonalTuner, divisors


def boft_sizes_error(n: int, block_size: int, block_num: int, m: int) -> str | None:
    """Why (block size, block count, m factors) cannot build a butterfly on n inputs, or None when it can.

    Explained in: book/oft_boft.ipynb
    """
    field, value = ("boft_block_size", block_size) if block_size else ("boft_block_num", block_num)
    if n % value:
        return f"{field}={value} does not divide the layer's input size {n}"
    b, nb = (block_size, n // block_size) if block_size else (n // block_num, block_num)
    if m == 1:
        return None
    if m - 1 > n.bit_length():  # 2^(m−1) alone exceeds n (and m = 2**40 would make 2**(m−1) a huge number)
        return f"boft_n_butterfly_factor={m} spans b·2^(m−1) inputs, far more than the layer's input size {n}"
    if b % 2 or nb % 2:
        return (f"a butterfly (boft_n_butterfly_factor={m}) needs an even block size and an even number of blocks; "
                f"{field}={value} gives {nb} blocks of size {b}")
    if n % (b * 2 ** (m - 1)):
        return (f"boft_n_butterfly_factor={m} with blocks of size {b} spans b·2^(m−1) = {b * 2 ** (m - 1)} inputs, "
                f"which must divide the layer's input size {n}")
    return None


class BOFTModel(OrthogonalTuner):
    """Injects BOFT layers into a model (see :class:`~peftlab.tuners.base.BaseTuner`).

    Explained in: book/oft_boft.ipynb
    """

    layer_dispatch = ((SUPPORTED_LAYERS, BOFTLayer),)

    def check_layer(self, config: BOFTConfig, target: nn.Module, key: str) -> None:
        super().check_layer(config, target, key)
        n = self.rotated_size(target)
        m = config.boft_n_butterfly_factor
        why = boft_sizes_error(n, config.boft_block_size, config.boft_block_num, m)
        if why is None:
            return
        by_size = config.boft_block_num == 0
        sizes = [d for d in divisors(n) if boft_sizes_error(n, d if by_size else 0, 0 if by_size else d, m) is None]
        what = "in_channels·kh·kw" if isinstance(target, nn.Conv2d) else "in_features"
        field = "boft_block_size" if by_size else "boft_block_num"
        if sizes:
            hint = f"Valid {field} values for this layer with boft_n_butterfly_factor={m}: {sizes}"
        else:
            fits = [k for k in range(1, min(m, n.bit_length() + 2)) if boft_sizes_error(n, config.boft_block_size, config.boft_block_num,
                                                               k) is None]
            hint = (f"No {field} allows {m} factors here; with {field}={config.boft_block_size or config.boft_block_num}"
                    f" use boft_n_butterfly_factor={max(fits)} or fewer" if fits else "use fewer factors")
        raise ValueError(f"BOFT cannot adapt {key!r} ({what} = {n}): {why}. {hint}")

    def layer_kwargs(self, config: BOFTConfig, key: str, target: nn.Module) -> dict[str, Any]:
        return {"boft_block_size": config.boft_block_size, "boft_block_num": config.boft_block_num,
                "boft_n_butterfly_factor": config.boft_n_butterfly_factor, "boft_dropout": config.boft_dropout,
                "init_weights": config.init_weights}
