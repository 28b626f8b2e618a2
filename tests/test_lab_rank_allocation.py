"""peftlab.lab.rank_allocation: AdaLoRA's ranks after each re-allocation, the (block × type) grid, orthogonality."""

from __future__ import annotations

import pytest
import torch

from peftlab import AdaLoraConfig, LoraConfig, get_peft_model
from peftlab.lab.models import example_inputs, tiny_llama
from peftlab.lab.rank_allocation import orthogonality, rank_grid, rank_recorder, ranks
from peftlab.lab.train import train
from peftlab.tuners.adalora import AdaLoraLayer, budget_schedule

TARGETS = ["q_proj", "v_proj", "down_proj"]
N_MATRICES = 2 * len(TARGETS)  # tiny_llama has two blocks


def _adalora(total_step: int = 12):
    torch.manual_seed(0)
    return get_peft_model(tiny_llama(), AdaLoraConfig(target_modules=TARGETS, init_r=6, target_r=3, tinit=2, tfinal=2,
                                                      deltaT=2, total_step=total_step, task_type="CAUSAL_LM"))


def _batch():
    x = dict(example_inputs("llama", batch=2))
    x["labels"] = x["input_ids"].clone()
    return x


def test_recorder_logs_the_ranks_at_every_reallocation_and_the_grid_places_them() -> None:
    model, log = _adalora(), []
    assert ranks(model) == {}  # no allocation yet
    train(model, [_batch()], steps=12, lr=1e-2, on_step=rank_recorder(log), progress=False)
    schedule = [budget_schedule(t, 6 * N_MATRICES, 3 * N_MATRICES, 2, 2, 12, 2) for t in range(12)]
    assert [t for t, _ in log] == [t for t, (_, mask) in enumerate(schedule) if mask]
    assert all(sum(r.values()) == schedule[t][0] for t, r in log)  # the budget of each re-allocation
    assert len(log[-1][1]) == N_MATRICES and log[-1][1] == ranks(model)
    assert all(".lora_E" in k for k in log[-1][1])
    by_path = ranks(model, paths=True)  # the same counts keyed by the adapted module, as adapted_layers keys them
    from peftlab.lab.finetune import adapted_layers
    assert set(by_path) == set(adapted_layers(model)) and sum(by_path.values()) == sum(ranks(model).values())
    assert all(by_path[k.split(".lora_E")[0]] == r for k, r in ranks(model).items())

    grid = rank_grid(ranks(model), TARGETS)
    assert list(grid.index) == ["block 0", "block 1"] and list(grid.columns) == ["q", "v", "down"]
    assert int(grid.values.sum()) == 3 * N_MATRICES
    key = next(k for k in ranks(model) if "layers.1." in k and ".v_proj." in k)
    assert grid.loc["block 1", "v"] == ranks(model)[key]


def test_rank_grid_refuses_keys_it_cannot_place() -> None:
    with pytest.raises(ValueError, match="cannot place 'model.embed.lora_E'"):
        rank_grid({"model.embed.lora_E": 2}, TARGETS)
    with pytest.raises(ValueError, match="cannot place"):
        rank_grid({"model.layers.0.mlp.up_proj.lora_E": 2}, TARGETS)  # not a target


def test_orthogonality_is_zero_for_orthonormal_factors_and_matches_the_formula() -> None:
    model = _adalora()
    layers = [m for m in model.modules() if isinstance(m, AdaLoraLayer)]
    with torch.no_grad():
        for m in layers:
            P, Q = m.lora_B["default"], m.lora_A["default"]  # (out, r), (r, in)
            P.copy_(torch.linalg.qr(torch.randn_like(P)).Q)
            Q.copy_(torch.linalg.qr(torch.randn_like(Q).T).Q.T)
    assert orthogonality(model).abs().max() < 1e-5
    with torch.no_grad():
        layers[0].lora_B["default"].mul_(2.0)  # PᵀP = 4I in one layer: ‖3I‖_F = 3·√r
    got = orthogonality(model)
    assert got["‖PᵀP − I‖"] == pytest.approx(3 * 6 ** 0.5 / len(layers), rel=1e-4)
    assert got["‖QQᵀ − I‖"] < 1e-5


def test_a_model_without_adalora_is_refused() -> None:
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="no AdaLoRA layer"):
        orthogonality(lora)
    with pytest.raises(TypeError, match="expected an AdaLoRA model"):
        rank_recorder([])(0, lora, None, None)
