"""peftlab.lab.merge_checks: the output gaps of merge_adapter, unmerge_adapter and merge_and_unload."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peftlab import LoraConfig, get_peft_model
from peftlab.quantization import quantize_model


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def _trained_looking(model: nn.Module) -> nn.Module:
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.1)  # B ≠ 0, as after training
    return model


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_gaps_are_rounding_on_a_float_base(use_dora: bool) -> None:
    from peftlab.lab.merge_checks import merge_gaps

    model = _trained_looking(get_peft_model(_mlp(), LoraConfig(r=4, target_modules=["0", "2"], use_dora=use_dora)))
    x = torch.randn(32, 64)
    with torch.no_grad():
        expected = model(x)
    gaps = merge_gaps(model, x)
    assert set(gaps) == {"merge_adapter", "after unmerge", "merge_and_unload"}
    assert all(0 <= v < 1e-4 for v in gaps.values()), gaps
    with torch.no_grad():  # left unmerged: the same function as before
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    assert not model.training


def test_merge_gaps_on_a_4bit_base_round_in_place_but_unload_exactly() -> None:
    from peftlab.lab.merge_checks import merge_gaps

    model = _trained_looking(get_peft_model(quantize_model(_mlp()), LoraConfig(r=4, target_modules=["0"])))
    x = torch.randn(32, 64)
    gaps = merge_gaps(copy.deepcopy(model), x)
    assert gaps["merge_and_unload"] < 1e-4           # dequantised, then merged: exact
    assert gaps["merge_adapter"] > 100 * gaps["merge_and_unload"]  # in place: W + ΔW rounded back to NF4


def test_merge_gaps_refuses_a_plain_module() -> None:
    from peftlab.lab.merge_checks import merge_gaps

    with pytest.raises(TypeError, match="needs a PEFT model.*get_peft_model"):
        merge_gaps(nn.Linear(3, 3), torch.randn(2, 3))


def test_unload_outputs_is_the_one_merge_and_unload_check() -> None:
    from peftlab.lab import compare
    from peftlab.lab.merge_checks import unload_outputs

    model = _trained_looking(get_peft_model(_mlp(), LoraConfig(r=4, target_modules=["0", "2"])))
    x = torch.randn(8, 64)
    before, unloaded = unload_outputs(model, x)
    with torch.no_grad():
        torch.testing.assert_close(before, model(x), rtol=0, atol=0)  # the model itself is left as it was
    torch.testing.assert_close(unloaded, before, rtol=0, atol=1e-5)
    assert compare.check_merge(model, x) is True

    def refuse(*args, **kwargs):
        raise NotImplementedError("no weight form")

    model.merge_and_unload = refuse  # a method the library cannot merge: unload_outputs raises, check_merge says no
    with pytest.raises(NotImplementedError):
        unload_outputs(model, x)
    assert compare.check_merge(model, x) is False
