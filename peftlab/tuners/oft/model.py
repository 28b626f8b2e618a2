"""``OFTModel``: OFT layers on every nn.Linear and nn.Conv2d target.

Explained in: book/oft_boft.ipynb
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.tuners.oft.config import OFTConfig
from peftlab.tuners.oft.layer import OFTLayer
from peftlab.tuners.orthogonal import SUPPORTED_LAYERS, OrthogonalTuner, divisors


class OFTModel(OrthogonalTuner):
    """Injects OFT layers into a model (see :class:`~peftlab.tuners.base.BaseTuner`).

    Explained in: book/oft_boft.ipynb
    """

    layer_dispatch = ((SUPPORTED_LAYERS, OFTLayer),)

    def check_layer(self, config: OFTConfig, target: nn.Module, key: str) -> None:
        super().check_layer(config, target, key)
        n = self.rotated_size(target)
        what = "in_channels·kh·kw" if isinstance(target, nn.Conv2d) else "in_features"
        field, value = ("oft_block_size", config.oft_block_size) if config.r == 0 else ("r", config.r)
        block = value if field == "oft_block_size" else (n // value if n % value == 0 else 0)
        if n % value == 0 and block >= 2:
            return
        # block size 1 is refused too: a 1×1 rotation is fixed at I, nothing would train
        valid = [d for d in divisors(n) if (d if field == "oft_block_size" else n // d) >= 2]
        why = (f"does not divide the size OFT rotates ({what} = {n}); r × oft_block_size must equal it"
               if n % value else f"gives blocks of size 1 ({what} = {n}), fixed at R = I: nothing would train")
        raise ValueError(f"{field}={value} {why}, in {key!r}. Valid {field} values for this layer: {valid}")

    def layer_kwargs(self, config: OFTConfig, key: str, target: nn.Module) -> dict[str, Any]:
        return {"r": config.r, "oft_block_size": config.oft_block_size if config.r == 0 else 0,
                "module_dropout": config.module_dropout, "init_weights": config.init_weights, "coft": config.coft,
                "eps": config.eps, "block_share": config.block_share,
                "use_cayley_neumann": config.use_cayley_neumann,
                "num_cayley_neumann_terms": config.num_cayley_neumann_terms}
