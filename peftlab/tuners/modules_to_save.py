"""``modules_to_save``: whole modules trained and saved next to the adapter (e.g. a new classifier head).

The original module stays frozen as ``original_module``; each adapter gets its own trainable copy in
``modules_to_save[<adapter>]``. On disk the copy is saved under the original module's name, as peft does.

Explained in: book/configs.ipynb
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftlab.tuners.routing import _ROUTING


class ModulesToSaveWrapper(nn.Module):
    """A frozen module plus one trainable copy per adapter; the active adapter's copy runs."""

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active: list[str] = []
        self._disabled = False
        self.add(adapter_name)

    def add(self, adapter_name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(False)
        self.modules_to_save[adapter_name] = copy_

    def delete(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self._active = [a for a in self._active if a != adapter_name]

    def set_adapter(self, adapter_names: Sequence[str], trainable: bool = True) -> None:
        if len(adapter_names) > 1:
            raise ValueError(
                f"adapters {list(adapter_names)} each have their own copy of a modules_to_save module; only one of "
                "them can be active at a time"
            )
        self.original_module.requires_grad_(False)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and name in adapter_names)
        self._active = list(adapter_names)

    def enable_adapters(self, enabled: bool) -> None:
        self._disabled = not enabled

    def active_module(self) -> nn.Module:
        if self._disabled or not self._active:
            return self.original_module
        return self.modules_to_save[self._active[0]]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        routing = _ROUTING.get()
        if routing is None or self._disabled:
            return self.active_module()(x, *args, **kwargs)
        # mixed batch: each group of rows through its adapter's copy (the original for other names)
        result = self.original_module(x, *args, **kwargs)
        for name, rows in routing.groups(x.shape[0], x.device).items():
            if name in self.modules_to_save:
                part = self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs)
                result = result.index_copy(0, rows, part.to(result.dtype))
        return result

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.original_module, name)
