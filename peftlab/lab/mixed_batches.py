"""The reference a mixed batch is checked against: every adapter run on its own rows, one at a time.

``model(**batch, adapter_names=[...])`` sends each row through its own adapter in one pass;
:func:`each_on_its_own_rows` computes the same thing the slow way, switching adapters between sub-batches.

Explained in: book/integrations.ipynb
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from torch import Tensor

from peftlab.tuners.routing import BASE_ADAPTER

__all__ = ["each_on_its_own_rows"]

T = TypeVar("T")


def each_on_its_own_rows(model: Any, batch: Mapping[str, Tensor], adapter_names: Sequence[str],
                         run: Callable[[dict[str, Tensor]], Sequence[T]]) -> list[T]:
    """``run(sub_batch)`` once per adapter on the rows ``adapter_names`` gives it, reassembled in the batch's order.

    ``model`` is a PEFT model with the named adapters; row i of every tensor in ``batch`` goes to
    ``adapter_names[i]``, and ``"__base__"`` rows run inside ``model.disable_adapter()``. ``run`` returns one
    result per row of its sub-batch (logits, decoded texts, ...). The active adapter is restored afterwards.

    Explained in: book/integrations.ipynb
    """
    names = list(adapter_names)
    sizes = {k: v.shape[0] for k, v in batch.items()}
    if any(n != len(names) for n in sizes.values()):
        raise ValueError(f"each_on_its_own_rows needs one adapter name per row: got {len(names)} names for a batch "
                         f"with rows {sizes}")
    unknown = sorted({n for n in names if n != BASE_ADAPTER} - set(model.peft_config))
    if unknown:
        raise ValueError(f"adapter_names {unknown} are not adapters of the model; it has {sorted(model.peft_config)} "
                         f"(and {BASE_ADAPTER!r} for the base model)")
    previous = model.active_adapter
    out: list[Any] = [None] * len(names)
    try:
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            sub = {k: v[rows] for k, v in batch.items()}
            if name == BASE_ADAPTER:
                with model.disable_adapter():
                    result = run(sub)
            else:
                model.set_adapter(name)
                result = run(sub)
            if len(result) != len(rows):
                raise ValueError(f"run returned {len(result)} results for the {len(rows)} rows of adapter {name!r}; "
                                 "it must return one per row")
            for j, i in enumerate(rows):
                out[i] = result[j]
    finally:
        model.set_adapter(previous)
    return out
