"""Numbers that drift: what merge → unmerge cycles do to the base weights, per method and dtype.

``merge_adapter()`` folds an adapter into the base weight and ``unmerge_adapter()`` takes it out again. In
exact arithmetic the base weight comes back; in floating point each step rounds to the weight's dtype, so it
comes back only to within a rounding of every entry. :data:`DRIFT_CASES` is one row per method (a later method
adds one row); :func:`merge_drift` measures, for one row and one dtype, how far the base weights are from
where they started after 1, 10 and 100 cycles.

Explained in: book/reliability.ipynb
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from peftlab import LoraConfig, get_peft_model

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
CYCLES: tuple[int, ...] = (1, 10, 100)
#: unit roundoff u of each dtype: rounding to it changes a number x by at most u·|x|
UNIT_ROUNDOFF: dict[torch.dtype, float] = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TARGETS = ["0", "2", "4"]


@dataclass(frozen=True)
class DriftCase:
    """One row of the drift table: a method's name and a factory for its config (adapter weights non-zero).

    Explained in: book/reliability.ipynb
    """

    name: str
    config: Callable[[], Any]


DRIFT_CASES: tuple[DriftCase, ...] = (
    DriftCase("LoRA", lambda: LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)),
    DriftCase("DoRA", lambda: LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False,
                                         use_dora=True)),
)


@dataclass(frozen=True)
class Drift:
    """Where the base weights are after ``cycles`` merge → unmerge cycles.

    ``relative``: max over the adapted layers of ‖W_k − W_0‖_F / ‖W_0‖_F; ``changed``: fraction of base-weight
    entries that are not bit-identical to the start; ``delta_ratio``: ρ = max ‖ΔW‖_F / ‖W_0‖_F of the adapter.

    Explained in: book/reliability.ipynb
    """

    case: str
    dtype: torch.dtype
    cycles: int
    relative: float
    changed: float
    delta_ratio: float


def drift_model(seed: int = 0) -> nn.Module:
    """The small MLP the drift is measured on: three ``nn.Linear`` layers (128 → 128 → 128 → 64) with biases.

    Explained in: book/reliability.ipynb
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 64))


def adapted(case: DriftCase, dtype: torch.dtype, seed: int = 0, b_std: float = 0.05) -> nn.Module:
    """``drift_model`` in ``dtype`` with ``case``'s adapter, its B drawn with standard deviation ``b_std``.

    Explained in: book/reliability.ipynb
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = get_peft_model(drift_model(seed).to(dtype), case.config())
        with torch.no_grad():  # a trained adapter: ΔW ≠ 0
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, b_std)
    return model


def _base_weights(model: nn.Module) -> list[torch.Tensor]:
    return [model.base_model.model[int(t)].get_base_layer().weight for t in TARGETS]


def merge_drift(case: DriftCase, dtype: torch.dtype, cycles: Sequence[int] = CYCLES, seed: int = 0,
                safe_merge: bool = False) -> list[Drift]:
    """Run ``max(cycles)`` merge → unmerge cycles on ``case`` in ``dtype``; a :class:`Drift` at each of ``cycles``.

    Explained in: book/reliability.ipynb
    """
    model = adapted(case, dtype, seed)
    layers = [model.base_model.model[int(t)] for t in TARGETS]
    start = [w.detach().clone() for w in _base_weights(model)]
    with torch.no_grad():
        rho = max(float(layer.get_delta_weight("default").float().norm() / w.float().norm())
                  for layer, w in zip(layers, start))
    out = []
    for k in range(1, max(cycles) + 1):
        model.merge_adapter(safe_merge=safe_merge)
        model.unmerge_adapter()
        if k in cycles:
            now = _base_weights(model)
            rel = max(float((w.float() - w0.float()).norm() / w0.float().norm()) for w, w0 in zip(now, start))
            changed = sum(int((w != w0).sum()) for w, w0 in zip(now, start)) / sum(w0.numel() for w0 in start)
            out.append(Drift(case.name, dtype, k, rel, changed, rho))
    return out


def drift_table(cases: Sequence[DriftCase] = DRIFT_CASES, dtypes: Sequence[torch.dtype] = DTYPES,
                cycles: Sequence[int] = CYCLES) -> Any:
    """A DataFrame: one row per (method, dtype), the relative drift and changed entries after each of ``cycles``.

    Explained in: book/reliability.ipynb
    """
    import pandas as pd

    rows = []
    for case in cases:
        for dtype in dtypes:
            drifts = merge_drift(case, dtype, cycles)
            row: dict[str, Any] = {"method": case.name, "dtype": str(dtype).removeprefix("torch."),
                                   "unit roundoff u": UNIT_ROUNDOFF[dtype]}
            for d in drifts:
                row[f"drift after {d.cycles}"] = d.relative
            for d in drifts:
                row[f"% changed after {d.cycles}"] = 100 * d.changed
            row["bound u·(2+ρ)"] = UNIT_ROUNDOFF[dtype] * (2 + drifts[0].delta_ratio)
            rows.append(row)
    return pd.DataFrame(rows)
