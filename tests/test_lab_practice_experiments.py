"""peftlab.lab.practice_experiments: the helpers of book/lora_in_practice.ipynb."""

from __future__ import annotations

import torch
from torch import nn

from peftlab import LoraConfig, get_peft_model
from peftlab.lab import practice_experiments as px


def test_effective_weight_reads_linear_and_adapted_layers() -> None:
    lin = nn.Linear(5, 3)
    assert torch.allclose(px.effective_weight(lin), lin.weight, atol=1e-6)
    model = get_peft_model(nn.Sequential(nn.Linear(5, 3)), LoraConfig(r=2, target_modules=["0"], use_dora=True))
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight)
    model.merge_adapter()
    merged = layer.get_base_layer().weight.detach().clone()
    model.unmerge_adapter()
    assert torch.allclose(px.effective_weight(layer), merged, atol=1e-5)


def test_magnitude_direction() -> None:
    W0 = torch.randn(4, 6)
    assert px.magnitude_direction(W0, W0) == (0.0, 0.0) or max(px.magnitude_direction(W0, W0)) < 1e-12
    dm, dd = px.magnitude_direction(W0, 2 * W0)  # pure rescale: no direction change
    assert abs(dm - float(W0.norm(dim=1).mean())) < 1e-6 and dd < 1e-12


def test_h1_finetune_snapshots_and_h2() -> None:
    run = px.h1_finetune(LoraConfig(r=2, lora_alpha=4, target_modules=["l1", "l2", "l3"]), steps=20,
                         snapshot_every=10)
    assert [s for s, _ in run.snapshots] == [0, 10, 20] and len(run.loss) == 20
    assert run.snapshots[0][1]["l2"].shape == (256, 256)
    none, n0, _ = px.h2_run(None)
    mse, n, loss = px.h2_run(LoraConfig(r=1, lora_alpha=2, target_modules=["l1"], use_dora=True), steps=30)
    assert n0 == 0 and n == 1 * (64 + 256) + 256 and mse < none and len(loss) == 30


def test_median_latency_and_steps_to() -> None:
    lat = px.median_latency({"a": lambda: None}, repeats=3, inner=2, warmup=1)
    assert set(lat) == {"a"} and lat["a"] >= 0
    run = px.PracticeRun(loss=[1.0] * 10 + [0.1] * 20, score=0.0, model=nn.Linear(1, 1))
    assert run.steps_to(0.5) is not None and run.steps_to(0.01) is None
