"""BOFT layers (Liu et al. 2023, arXiv 2311.06243): h = s ⊙ (W Rᵀ) x, R = M_{m−1} ⋯ M_0, M_i = P_i B_i P_iᵀ.

Storage (peft's names): ``boft_R`` (m, blocks, b, b), each b×b matrix A giving the skew Q = ½(A − Aᵀ) and the
block Cayley(Q) (exact); ``boft_s``, a per-output scale, (out, 1) on a Linear and (1, out) on a Conv2d. B_i is
block-diagonal; the butterfly permutations P_i (:func:`~peftlab.tuners.orthogonal.butterfly_perm`) make factor i
pair inputs b·2^(i−1) apart. Factor i permutes only inside groups of b·2^i inputs, so R is block-diagonal with
blocks of g = b·2^(m−1): while g ≤ :data:`MAX_GROUP_WIDTH` the layer forms those blocks from the factors (a few
small products on g rows) and rotates like OFT, otherwise it applies the factors to the activations as gathers
and block products. Plain PyTorch on every device (peft 0.21.2 needs its CUDA extension for m > 1 and otherwise
trains one factor).

Explained in: book/oft_boft.ipynb
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftlab.tuners.orthogonal import OrthogonalLayer, butterfly_rotate, multiplicative_dropout, rotate_blocks

#: the widest diagonal blocks of R (b·2^(m−1)) that a layer forms and applies as block products; wider butterflies
#: run factor by factor on the activations. Blocks cost tokens·in·g per product, the factors m·tokens·in·b plus
#: their gathers: on the benchmark model (256 inputs, 1024 tokens, b = 8, one thread) the blocks trained faster
#: at every g up to 256 (a dense R); the cap keeps a wide butterfly on a large layer off the g-sized products
MAX_GROUP_WIDTH = 128


class BOFTLayer(OrthogonalLayer):
    """BOFT on ``nn.Linear`` and ``nn.Conv2d``.

    Explained in: book/oft_boft.ipynb
    """

    adapter_layer_names = ("boft_R", "boft_s")
    other_param_names = ("boft_block_size", "boft_block_num", "boft_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer)
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_dropout: dict[str, float] = {}
        self.update_layer(adapter_name, **kwargs)
        self.set_adapter([adapter_name])

    def update_layer(self, adapter_name: str, boft_block_size: int, boft_block_num: int,
                     boft_n_butterfly_factor: int = 1, boft_dropout: float = 0.0, init_weights: bool = True,
                     **_: Any) -> None:
        """Create m factors of (blocks, b, b) and the scale s for ``adapter_name`` (the tuner checked the sizes).

        Explained in: book/oft_boft.ipynb
        """
        if boft_block_size == 0:
            boft_block_size = self.in_dim // boft_block_num
        else:
            boft_block_num = self.in_dim // boft_block_size
        factors = torch.zeros(boft_n_butterfly_factor, boft_block_num, boft_block_size, boft_block_size)
        scale = torch.ones(1, self.out_features) if self.is_conv else torch.ones(self.out_features, 1)
        if init_weights is False:  # peft's draws, in its order
            nn.init.normal_(factors, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        kw = self._new_tensor_kwargs()
        self.boft_R[adapter_name] = nn.Parameter(factors.to(**kw))
        self.boft_s[adapter_name] = nn.Parameter(scale.to(**kw))
        self.boft_block_size[adapter_name] = boft_block_size
        self.boft_block_num[adapter_name] = boft_block_num
        self.boft_dropout[adapter_name] = boft_dropout
        self._record_adapter(adapter_name)

    # ---- the rotation -------------------------------------------------------------------------------
    def factors(self, adapter_name: str, training: bool = False) -> torch.Tensor:
        """Each factor's orthogonal blocks Cayley(½(A − Aᵀ)), (m, blocks, b, b).

        Explained in: book/oft_boft.ipynb
        """
        m, nb, b, _ = self.boft_R[adapter_name].shape
        blocks = self.source_blocks(adapter_name).view(m, nb, b, b)  # in a training forward: the shared node's
        if self._drops(adapter_name, training):  # one random factor loses int(p·blocks) blocks to I
            i = int(torch.randint(0, m, (1,)))
            p = self.boft_dropout[adapter_name]
            blocks = torch.cat([blocks[:i], multiplicative_dropout(blocks[i], p)[None], blocks[i + 1:]])
        return blocks

    def _drops(self, adapter_name: str, training: bool) -> bool:
        """Whether this forward applies BOFT's dropout to the factors."""
        return training and self.boft_dropout[adapter_name] > 0

    def rotation_source(self, adapter_name: str) -> tuple[torch.Tensor, int, bool, None]:
        """Every factor's blocks as (m·blocks, b, b) square matrices, Q = ½(A − Aᵀ), exact Cayley."""
        a = self.boft_R[adapter_name]
        m, nb, b, _ = a.shape
        return a.reshape(m * nb, b, b), b, False, None

    def rotate(self, x: torch.Tensor, adapter_name: str, training: bool = False) -> torch.Tensor:
        """x R = x M_{m−1} ⋯ M_0: through R's diagonal blocks (:meth:`group_blocks`), or factor by factor with
        gathers and block products when they are too wide (never the dense R).

        Explained in: book/oft_boft.ipynb
        """
        factors = self.factors(adapter_name, training)
        blocks = group_blocks(factors)
        return butterfly_rotate(x, factors) if blocks is None else rotate_blocks(x, blocks)

    def block_diagonal_blocks(self, adapter_name: str) -> torch.Tensor | None:
        """R's diagonal blocks (:func:`group_blocks`; the fused OFT path applies), or None when too wide."""
        if self.boft_R[adapter_name].shape[0] == 1 and not self._drops(adapter_name, self.training):
            return self.source_blocks(adapter_name)  # one factor: its blocks, (blocks, b, b) as built
        return group_blocks(self.factors(adapter_name, self.training))

    def out_scale(self, adapter_name: str) -> torch.Tensor:
        return self.boft_s[adapter_name].reshape(-1)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, boft_block_size={self.boft_block_size}, "
                f"boft_block_num={self.boft_block_num}")


def group_blocks(factors: torch.Tensor) -> torch.Tensor | None:
    """R's diagonal blocks, (n/g, g, g) with g = b·2^(m−1), from the factors (m, n/b, b, b); None when g exceeds
    :data:`MAX_GROUP_WIDTH`. Every factor keeps its permutation inside groups of g inputs, so R is block-diagonal
    with blocks of g; the g rows X with X[j, G·g + j] = 1 for every group G give X R, whose columns of group G are
    row by row that group's block: one butterfly pass over g rows, differentiable in the factors.

    Explained in: book/oft_boft.ipynb
    """
    m, nb, b, _ = factors.shape
    if m == 1:
        return factors[0]
    g, n = b << (m - 1), nb * b
    if g > MAX_GROUP_WIDTH or n % g:
        return None
    rows = torch.eye(g, dtype=factors.dtype, device=factors.device).repeat(1, n // g)  # (g, n)
    return butterfly_rotate(rows, factors).view(g, n // g, g).transpose(0, 1).contiguous()

