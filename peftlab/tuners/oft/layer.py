"""OFT layers (Qiu et al. 2023, arXiv 2306.07280): h = (W Rᵀ) x with R = diag(R_1, …, R_r) orthogonal.

Storage (peft's names): ``oft_R.<adapter>.weight`` of shape (r, b(b−1)/2), the strict upper triangle of each
block's skew-symmetric Q (one row when ``block_share``). R_i = Cayley(Q_i) (exact, or peft's Neumann series).
The rotation acts on the input side, x ↦ x R, so the rows of W (the neurons) keep their norms and the angles
between them: W Rᵀ has the singular values of W.

Explained in: book/oft_boft.ipynb
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peftlab.tuners.orthogonal import (OrthogonalLayer, block_diagonal, multiplicative_dropout, rotate_blocks,
                                       skew_from_packed)


class OFTRotation(nn.Module):
    """One adapter's free parameters: ``weight`` (blocks stored, b(b−1)/2), the upper triangle of each Q_i."""

    def __init__(self, n_blocks: int, block_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_blocks, block_size * (block_size - 1) // 2))

    def extra_repr(self) -> str:
        return f"blocks={self.weight.shape[0]}, packed={self.weight.shape[1]}"


class OFTLayer(OrthogonalLayer):
    """OFT on ``nn.Linear`` and ``nn.Conv2d``.

    Explained in: book/oft_boft.ipynb
    """

    adapter_layer_names = ("oft_R",)
    other_param_names = ("r", "oft_block_size", "oft_settings")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer)
        self.oft_R = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}
        self.oft_settings: dict[str, dict[str, Any]] = {}
        self.update_layer(adapter_name, **kwargs)
        self.set_adapter([adapter_name])

    def update_layer(self, adapter_name: str, r: int, oft_block_size: int, module_dropout: float = 0.0,
                     init_weights: bool = True, coft: bool = False, eps: float = 6e-5, block_share: bool = False,
                     use_cayley_neumann: bool = True, num_cayley_neumann_terms: int = 5, **_: Any) -> None:
        """Create ``adapter_name``'s packed skew parameters: r blocks of size b (r·b = in_dim; the tuner checked).

        Explained in: book/oft_boft.ipynb
        """
        if r == 0:
            r = self.in_dim // oft_block_size
        else:
            oft_block_size = self.in_dim // r
        rotation = OFTRotation(1 if block_share else r, oft_block_size)  # on the CPU: the same draws as peft
        if init_weights is False:
            nn.init.normal_(rotation.weight, mean=0.0, std=0.1)
        else:
            nn.init.zeros_(rotation.weight)  # Q = 0: R = I, the layer is unchanged
        self.oft_R[adapter_name] = rotation.to(**self._new_tensor_kwargs())
        self.r[adapter_name] = r
        self.oft_block_size[adapter_name] = oft_block_size
        self.oft_settings[adapter_name] = {"coft": coft, "eps": eps, "block_share": block_share,
                                           "neumann": use_cayley_neumann, "terms": num_cayley_neumann_terms,
                                           "dropout": module_dropout}
        self._record_adapter(adapter_name)

    # ---- the rotation -------------------------------------------------------------------------------
    def blocks(self, adapter_name: str, training: bool = False) -> torch.Tensor:
        """The orthogonal blocks R_i = Cayley(Q_i), (r, b, b) (one (1, b, b) block when shared).

        Explained in: book/oft_boft.ipynb
        """
        opts = self.oft_settings[adapter_name]
        if opts["coft"]:  # such a layer builds its own blocks (see joins_step_rotations)
            self._project(self.oft_R[adapter_name].weight, self.oft_block_size[adapter_name], opts["eps"])
        rot = self.source_blocks(adapter_name)  # in a training forward: from the node all layers share
        if training and opts["dropout"] > 0:
            rot = multiplicative_dropout(rot, opts["dropout"])
        return rot

    def rotation_source(self, adapter_name: str) -> tuple[torch.Tensor, int, bool, int | None]:
        """The packed Q's, b, and the series (None: the exact Cayley map)."""
        opts = self.oft_settings[adapter_name]
        return (self.oft_R[adapter_name].weight, self.oft_block_size[adapter_name], True,
                opts["terms"] if opts["neumann"] else None)

    def joins_step_rotations(self, adapter_name: str) -> bool:
        """Not with COFT, which projects the Q's in place just before each build."""
        return not self.oft_settings[adapter_name]["coft"]

    @staticmethod
    @torch.no_grad()
    def _project(weight: torch.Tensor, b: int, eps: float) -> None:
        """COFT: rescale each Q_i into the ball ‖Q_i‖_F ≤ eps/√(blocks), in place (as peft does)."""
        radius = eps / math.sqrt(weight.shape[0])
        norm = torch.linalg.matrix_norm(skew_from_packed(weight, b)).unsqueeze(1)  # (blocks, 1)
        # (a margin of a few ulps: a block already on the sphere is left alone, so projecting twice changes nothing)
        factor = torch.where(norm <= radius * (1 + 1e-5), torch.ones_like(norm), radius / norm.clamp_min(1e-30))
        weight.mul_(factor)

    def rotate(self, x: torch.Tensor, adapter_name: str, training: bool = False) -> torch.Tensor:
        """x R, block by block (r blocks of b inputs each).

        Explained in: book/oft_boft.ipynb
        """
        return rotate_blocks(x, self.blocks(adapter_name, training))

    def rotation(self, adapter_name: str, training: bool = False) -> torch.Tensor:
        """R = diag(R_1, …, R_r), (in_dim, in_dim).

        Explained in: book/oft_boft.ipynb
        """
        return block_diagonal(self.blocks(adapter_name, training), self.r[adapter_name])

    def exactly_orthogonal(self, adapter_name: str) -> bool:
        return not self.oft_settings[adapter_name]["neumann"]

    def block_diagonal_blocks(self, adapter_name: str) -> torch.Tensor:
        """OFT's R is always block-diagonal: its (r, b, b) blocks (a shared block repeated r times)."""
        blocks = self.blocks(adapter_name, self.training)
        return blocks.expand(self.r[adapter_name], -1, -1) if blocks.shape[0] == 1 else blocks

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, oft_block_size={self.oft_block_size}"
