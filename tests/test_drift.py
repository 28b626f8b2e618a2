"""merge → unmerge cycles: the base weights drift by at most one rounding, in every dtype, for every method.

One row per method in ``peftlab.lab.reliability.DRIFT_CASES`` (a new method adds a row there); each row runs
in float32, bfloat16 and float16. Bound, for one cycle: merging rounds W + ΔW to the dtype and unmerging
rounds again, so ‖W₁ − W₀‖ ≤ u·(‖W₀ + ΔW‖ + ‖W₀‖) ≤ u·(2 + ρ)·‖W₀‖ with u the unit roundoff and
ρ = ‖ΔW‖/‖W₀‖. Further cycles do not accumulate: the weights settle after the first (checked up to 100).
"""

from __future__ import annotations

import pytest
import torch

from peftlab.lab import reliability as rel

ROWS = [(case, dtype) for case in rel.DRIFT_CASES for dtype in rel.DTYPES]


@pytest.mark.parametrize("case, dtype", ROWS, ids=[f"{c.name}-{str(d)[6:]}" for c, d in ROWS])
def test_merge_unmerge_drift_is_one_rounding(case: rel.DriftCase, dtype: torch.dtype) -> None:
    drifts = {d.cycles: d for d in rel.merge_drift(case, dtype)}
    u, rho = rel.UNIT_ROUNDOFF[dtype], drifts[1].delta_ratio
    assert rho > 0.05  # a real adapter, not a no-op
    assert 0 < drifts[1].relative <= u * (2 + rho)          # one cycle: one rounding each way
    assert drifts[100].relative <= 2 * drifts[1].relative + u  # no accumulation over 100 cycles
    assert drifts[100].changed < 0.5                          # most entries come back bit for bit
    if dtype == torch.float32:
        assert drifts[100].relative < 1e-6


@pytest.mark.parametrize("case", rel.DRIFT_CASES, ids=lambda c: c.name)
def test_safe_merge_changes_nothing_about_rounding(case: rel.DriftCase) -> None:
    plain = rel.adapted(case, torch.bfloat16)
    safe = rel.adapted(case, torch.bfloat16)
    for _ in range(3):
        plain.merge_adapter()
        plain.unmerge_adapter()
        safe.merge_adapter(safe_merge=True)
        safe.unmerge_adapter()
    for a, b in zip(rel._base_weights(plain), rel._base_weights(safe)):
        assert torch.equal(a, b)


def _merged_flags(model) -> list[bool]:
    return [model.base_model.model[int(t)].merged for t in rel.TARGETS]


@pytest.mark.parametrize("case", rel.DRIFT_CASES, ids=lambda c: c.name)
def test_safe_merge_refuses_a_broken_adapter_and_leaves_the_weights(case: rel.DriftCase) -> None:
    model = rel.adapted(case, torch.bfloat16)
    with torch.no_grad():  # a diverged training run: one NaN in the last layer's B
        model.base_model.model[int(rel.TARGETS[-1])].lora_B["default"].weight[0, 0] = float("nan")
    before = [w.detach().clone() for w in rel._base_weights(model)]
    with pytest.raises(ValueError, match="NaN|inf"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(a, b) for a, b in zip(rel._base_weights(model), before))  # not even the first layers
    assert not any(_merged_flags(model))
    model.merge_adapter()  # without safe_merge the NaN lands in the base weight ...
    model.unmerge_adapter()
    assert torch.isnan(rel._base_weights(model)[-1]).any()  # ... and unmerge cannot take it out


def test_safe_merge_refuses_a_float16_overflow() -> None:
    lora = next(c for c in rel.DRIFT_CASES if c.name == "LoRA")
    model = rel.adapted(lora, torch.float16, b_std=1e6)  # finite ΔW in float32, beyond float16's 65504
    before = [w.detach().clone() for w in rel._base_weights(model)]
    with pytest.raises(ValueError, match="NaN|inf"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(a, b) for a, b in zip(rel._base_weights(model), before))
    model.merge_adapter()
    model.unmerge_adapter()
    assert not torch.isfinite(rel._base_weights(model)[0]).all()


def test_drift_table_has_a_row_per_method_and_dtype() -> None:
    table = rel.drift_table(cycles=(1, 10))
    assert len(table) == len(rel.DRIFT_CASES) * len(rel.DTYPES)
    assert (table["drift after 1"] <= table["bound u·(2+ρ)"]).all()
