"""How AdaLoRA spends its rank budget, read off a trained model: the rank of every matrix, recorded after each
re-allocation, laid out as a (block × matrix type) grid, and how orthonormal its P and Q stayed.

Explained in: book/adalora.ipynb
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Callable

import torch

from peftlab.lab.finetune import adapted_layers
from peftlab.tuners.adalora import AdaLoraLayer, AdaLoraModel

__all__ = ["orthogonality", "rank_grid", "rank_recorder", "ranks"]

_BLOCK = re.compile(r"layers\.(\d+)\.")


def _tuner(model: Any) -> Any:
    tuner = getattr(model, "base_model", model)
    if not hasattr(tuner, "allocator"):
        raise TypeError(f"expected an AdaLoRA model (get_peft_model(base, AdaLoraConfig(...))); got "
                        f"{type(model).__name__}")
    return tuner


def ranks(model: Any, adapter_name: str = "default", *, paths: bool = False) -> dict[str, int]:
    """The rank each matrix keeps now, {``'<module>.lora_E…'``: number of kept triplets}, from the adapter's
    ``rank_pattern`` (written by every re-allocation; empty before the first). ``paths=True`` keys it by the
    adapted module's path instead (as :func:`peftlab.lab.finetune.adapted_layers` does), the pattern's keys read
    the way the library reads them when it saves.

    Explained in: book/adalora.ipynb
    """
    pattern = _tuner(model).peft_config[adapter_name].rank_pattern or {}
    if paths:
        return {path: int(kept.sum()) for path, kept in AdaLoraModel._pattern_masks(pattern, adapter_name).items()}
    return {k: int(sum(v)) for k, v in pattern.items()}


def rank_recorder(log: list[tuple[int, dict[str, int]]], adapter_name: str = "default"
                  ) -> Callable[[int, Any, Any, Any], None]:
    """An ``on_step`` hook for :func:`peftlab.lab.train.train` that appends ``(step, ranks(model))`` to ``log`` at
    every step where the allocator's budget schedule masks (every ``deltaT`` steps after ``tinit``, then every step
    of the final phase). It runs after the allocation of its step.

    Explained in: book/adalora.ipynb
    """
    def record(step: int, model: Any, loss: Any, opt: Any) -> None:
        if _tuner(model).allocator(adapter_name).budget_schedule(step)[1]:
            log.append((step, ranks(model, adapter_name)))

    return record


def rank_grid(matrix_ranks: dict[str, int], targets: Sequence[str]) -> Any:
    """A DataFrame of ranks, one row per block (``'block 0'`` …, from ``layers.<i>.`` in the keys) and one column
    per target module name in ``targets`` (without ``_proj``); matrices absent from ``matrix_ranks`` count 0.

    Explained in: book/adalora.ipynb
    """
    import pandas as pd

    columns = [t.removesuffix("_proj") for t in targets]
    cells: dict[tuple[int, str], int] = {}
    for key, r in matrix_ranks.items():
        block = _BLOCK.search(key)
        kind = key.split(".lora_E")[0].split(".")[-1].removesuffix("_proj")
        if block is None or kind not in columns:
            raise ValueError(f"rank_grid: cannot place {key!r} in a (block, matrix type) cell; keys look like "
                             f"'...layers.<i>.<...>.<target>.lora_E...' with a target among {list(targets)}")
        cells[int(block.group(1)), kind] = r
    blocks = sorted({b for b, _ in cells})
    grid = pd.DataFrame(0, index=[f"block {b}" for b in blocks], columns=columns)
    for (b, kind), r in cells.items():
        grid.loc[f"block {b}", kind] = r
    return grid


def orthogonality(model: Any, adapter_name: str = "default") -> Any:
    """‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (over all r₀ triplets), averaged over the AdaLoRA layers: how far P and Q are
    from orthonormal (the regulariser weighted by ``orth_reg_weight`` pulls them towards 0). A pandas Series.

    Explained in: book/adalora.ipynb
    """
    import pandas as pd

    out = []
    for m in adapted_layers(model, adapter_name).values():
        if isinstance(m, AdaLoraLayer):
            P, Q = m.lora_B[adapter_name].detach(), m.lora_A[adapter_name].detach()  # P (out, r), Q (r, in)
            eye = torch.eye(P.shape[1], device=P.device, dtype=P.dtype)
            out.append({"‖PᵀP − I‖": float(torch.linalg.norm(P.T @ P - eye)),
                        "‖QQᵀ − I‖": float(torch.linalg.norm(Q @ Q.T - eye))})
    if not out:
        raise ValueError(f"orthogonality found no AdaLoRA layer with adapter {adapter_name!r} in "
                         f"{type(model).__name__}")
    return pd.DataFrame(out).mean()
