"""Mixed batches: which adapter each row of a batch uses, visible to every adapter layer during one forward;
and per-token weights: how much of each adapter every token gets (X-LoRA's scalings), the same way.

Explained in: book/integrations.ipynb
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch

BASE_ADAPTER = "__base__"  # name for "no adapter" in a mixed batch


# ---------------------------------------------------------------------------------------------------
class Routing:
    """Row -> adapter assignment for one forward pass; groups rows once, shared by all layers."""

    def __init__(self, adapter_names: Sequence[str]):
        self.adapter_names = list(adapter_names)
        self._groups: dict[tuple[int, torch.device], dict[str, torch.Tensor]] = {}
        self._index: dict[tuple, torch.Tensor] = {}
        self._segments: dict[tuple, int | None] = {}
        self._stacked_names: tuple[str, ...] | None = None

    def groups(self, n_rows: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Adapter name -> row indices. Rows beyond the names (beam search, several samples per prompt)
        repeat each name ``n_rows // len(names)`` times, in order."""
        key = (n_rows, device)
        if key not in self._groups:
            names = self.adapter_names
            if n_rows != len(names):
                if n_rows % len(names):
                    raise ValueError(
                        f"a batch of {n_rows} rows cannot be split over {len(names)} adapter_names; pass one name "
                        "per row of the input"
                    )
                names = [n for n in names for _ in range(n_rows // len(names))]
            groups: dict[str, list[int]] = {}
            for row, name in enumerate(names):
                groups.setdefault(name, []).append(row)
            self._groups[key] = {n: torch.tensor(rows, device=device) for n, rows in groups.items()}
        return self._groups[key]

    def stacked_names(self) -> tuple[str, ...]:
        """The distinct adapters of the batch (no ``__base__``), in order of first appearance."""
        if self._stacked_names is None:
            self._stacked_names = tuple(n for n in dict.fromkeys(self.adapter_names) if n != BASE_ADAPTER)
        return self._stacked_names

    def row_index(self, n_rows: int, device: torch.device, names: tuple[str, ...]) -> torch.Tensor:
        """Row -> position of its adapter in ``names``; ``len(names)`` for a row whose adapter is not there
        (``__base__``, or an adapter this layer lacks). Shared by all layers of one forward."""
        key = (n_rows, device, names)
        if key not in self._index:
            pos = {n: i for i, n in enumerate(names)}
            index = torch.full((n_rows,), len(names), dtype=torch.long)
            for name, rows in self.groups(n_rows, torch.device("cpu")).items():
                index[rows] = pos.get(name, len(names))
            self._index[key] = index.to(device)
        return self._index[key]

    def segment_rows(self, n_rows: int, names: tuple[str, ...]) -> int | None:
        """m when the rows come in ``len(names)`` runs of m rows, run j all through ``names[j]`` (one request per
        adapter, or each repeated for beam search): a batched product then reads the stacked adapters in place,
        without a per-row gather. None otherwise (``__base__`` rows, repeated or missing adapters)."""
        key = (n_rows, names)
        if key not in self._segments:
            k, per_row = len(names), self.adapter_names
            m = n_rows // k if k and n_rows % k == 0 else 0
            if m and n_rows != len(per_row) and n_rows % len(per_row) == 0:  # each name repeated, as in groups()
                per_row = [n for n in per_row for _ in range(n_rows // len(per_row))]
            self._segments[key] = m if m and list(per_row) == [n for n in names for _ in range(m)] else None
        return self._segments[key]


_ROUTING: contextvars.ContextVar[Routing | None] = contextvars.ContextVar("peftlab_routing", default=None)


@contextlib.contextmanager
def mixed_batch(adapter_names: Sequence[str] | None) -> Iterator[None]:
    """Within this context every adapter layer routes row ``i`` through ``adapter_names[i]``."""
    if adapter_names is None:
        yield
        return
    token = _ROUTING.set(Routing(adapter_names))
    try:
        yield
    finally:
        _ROUTING.reset(token)




# ---------------------------------------------------------------------------------------------------
class TokenWeights:
    """Per-token, per-adapter weights for one forward pass, shared by all adapter layers.

    ``weights_for(layer)`` returns ``{adapter name: weight}`` for that layer, each weight broadcastable
    against the layer's output (e.g. ``(batch, seq, 1)``), or None to leave the layer as it is. The layer
    then computes ``base(x) + Σ_a weight_a · Δ_a(x)`` (:meth:`~peftlab.tuners.base.AdapterLayer.weighted_forward`).
    A method that routes tokens (X-LoRA's gate) subclasses this.

    Explained in: book/xlora.ipynb
    """

    def weights_for(self, layer: object) -> dict[str, torch.Tensor] | None:
        raise NotImplementedError


_TOKEN_WEIGHTS: contextvars.ContextVar[TokenWeights | None] = contextvars.ContextVar("peftlab_token_weights",
                                                                                     default=None)


@contextlib.contextmanager
def token_weights(weights: TokenWeights | None) -> Iterator[None]:
    """Within this context every adapter layer weights its adapters per token as ``weights`` says."""
    if weights is None:
        yield
        return
    token = _TOKEN_WEIGHTS.set(weights)
    try:
        yield
    finally:
        _TOKEN_WEIGHTS.reset(token)
