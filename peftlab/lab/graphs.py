"""Autograd graphs: which nodes a backward runs, to show what a fused or batched training path records.

Explained in: book/oft_boft.ipynb
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

__all__ = ["node_counts", "step_graph"]


def node_counts(output: torch.Tensor) -> Counter[str]:
    """How many autograd nodes of each kind (``RotatedLinearBackward``, ``AccumulateGrad``, …) the backward of
    ``output`` runs, each node counted once however many paths reach it.

    Explained in: book/oft_boft.ipynb
    """
    seen: set[object] = set()
    todo, counts = [output.grad_fn], Counter()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        counts[type(fn).__name__] += 1
        todo += [nxt for nxt, _ in fn.next_functions]
    return counts


def step_graph(model: nn.Module, x: torch.Tensor) -> tuple[Counter[str], list[torch.Tensor | None]]:
    """One backward of ``model(x).logsumexp(-1).mean()``: the graph's nodes by kind (:func:`node_counts`) and the
    gradient of every trainable tensor, in ``model.parameters()`` order.

    Explained in: book/oft_boft.ipynb
    """
    loss = model(x).logsumexp(-1).mean()
    counts = node_counts(loss)
    loss.backward()
    return counts, [p.grad for p in model.parameters() if p.requires_grad]
