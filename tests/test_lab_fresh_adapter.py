"""peftlab.lab.fresh_adapter: a LoRA adapter at step 0 (placement, initialisation, the first Adam step)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab import LoraConfig, get_peft_model
from peftlab.lab import digits
from peftlab.lab import fresh_adapter as fresh


def test_adapter_layout_counts_layers_kinds_and_the_formula():
    base = nn.Sequential()
    base.add_module("up", nn.Linear(12, 20))
    base.add_module("down", nn.Linear(20, 12))
    base.add_module("head", nn.Linear(12, 3))
    n_base = sum(p.numel() for p in base.parameters())
    row = fresh.adapter_layout(get_peft_model(base, LoraConfig(r=2, target_modules=["up", "down"])))
    assert row["adapted layers"] == 2 and row["kinds"] == "down, up"
    assert row["trainable"] == row["r(d_in + d_out)"] == 2 * (12 + 20) + 2 * (20 + 12)
    assert row["% of base"] == pytest.approx(100 * row["trainable"] / n_base)
    with pytest.raises(ValueError, match="no LoRA layer.*get_peft_model"):
        fresh.adapter_layout(nn.Linear(3, 3))


def test_init_comparison_shows_why_exactly_one_factor_is_zero():
    data = digits.load()
    x, y = data.even_train.x[:32], data.even_train.y[:32]
    base = digits.pretrained_mlp()
    table, models = fresh.init_comparison(base, x, y, data.odd_test)
    t = table.to_dict("index")
    assert list(table.index) == list(fresh.INITS) and set(models) == set(fresh.INITS)
    assert t["B = 0 (PEFT)"]["logit change"] == 0.0 and t["both zero"]["logit change"] == 0.0
    assert t["B = 0 (PEFT)"]["‖∂L/∂A‖"] == 0.0 < t["B = 0 (PEFT)"]["‖∂L/∂B‖"]      # B moves first
    assert t["both zero"]["‖∂L/∂A‖"] == t["both zero"]["‖∂L/∂B‖"] == 0.0           # nothing moves
    assert t["both random"]["logit change"] > 0 and t["both random"]["‖∂L/∂A‖"] > 0
    assert t["B = 0 (PEFT)"]["odd acc %"] == pytest.approx(100 * digits.accuracy(base, data.odd_test))
    for init, model in models.items():  # the accuracy read off the one evaluation is the model's own
        assert t[init]["odd acc %"] == pytest.approx(100 * digits.accuracy(model, data.odd_test))
    with pytest.raises(ValueError, match="init='zero' is not one of"):
        fresh.h1_lora_with_init("zero")


def test_factor_grad_norms_match_autograd():
    data = digits.load()
    x, y = data.even_train.x[:16], data.even_train.y[:16]
    model = fresh.h1_lora_with_init("both random")
    grad_a, grad_b = fresh.factor_grad_norms(model, x, y)
    expect_a = sum(float(p.grad.norm()) for n, p in model.named_parameters() if "lora_A" in n)
    assert grad_a == pytest.approx(expect_a) and grad_b > 0


def test_first_step_change_is_deterministic_and_follows_the_scaling():
    data = digits.load()
    x, y = data.even_train.x[:64], data.even_train.y[:64]
    a = fresh.first_step_change(4, 8, x, y, seed=1)
    assert a > 0 and a == fresh.first_step_change(4, 8, x, y, seed=1)
    # α = 2r keeps the scaling at 2, so 16 times the rank moves the first step much further than α fixed does
    grow = fresh.first_step_change(64, 128, x, y) / fresh.first_step_change(4, 8, x, y)
    fixed = fresh.first_step_change(64, 8, x, y) / fresh.first_step_change(4, 8, x, y)
    assert grow > 4 * fixed
