"""peftlab.lab.finetune: the H1, H2 and lab-LM fine-tuning runs, the ΔW of adapted layers, run tables."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_lm_config
from torch import nn

from peftlab import LoraConfig, get_peft_model
from peftlab.lab import digits
from peftlab.lab import finetune as ft
from peftlab.lab import spectra as spec

# LoRA on H1's three layers costs r·(64+256) + r·(256+256) + r·(256+10) = 1,098·r parameters.
H1_PER_RANK = 1098
H1_SHAPES = {"l1": (256, 64), "l2": (256, 256), "l3": (10, 256)}


# ------------------------------------------------------------------------------------------ H1 runs


def test_h1_lora_run_counts_parameters_and_keeps_low_rank_deltas():
    run = ft.h1_run("lora", r=2, seed=0, steps=5)
    assert run.method == "lora" and run.r == 2 and run.label == "LoRA r=2"
    assert run.trainable == 2 * H1_PER_RANK and run.base_params == 85_002
    assert math.isclose(run.fraction, 2 * H1_PER_RANK / 85_002)
    assert 0.0 <= run.score <= 1.0 and len(run.loss) == 5
    assert {k: tuple(v.shape) for k, v in run.delta.items()} == H1_SHAPES
    assert all(spec.numerical_rank(d) <= 2 for d in run.delta.values())
    assert run.model is None  # not kept unless asked


def test_h1_zero_steps_is_the_base_model():
    run = ft.h1_run("lora", r=4, seed=3, steps=0, keep_model=True)
    assert run.score == digits.accuracy(digits.pretrained_mlp(), digits.load().even_test) == 0.0
    assert all(float(d.abs().max()) == 0.0 for d in run.delta.values())  # B = 0 ⇒ ΔW = 0
    base = digits.pretrained_mlp()
    x = digits.load().even_test.x
    with torch.no_grad():
        assert torch.equal(run.model(x), base(x))


def test_h1_full_run_delta_is_the_weight_change():
    run = ft.h1_run("full", r=None, seed=0, steps=3, keep_model=True)
    assert run.label == "full FT" and run.r is None and run.trainable == run.base_params == 85_002
    base = digits.pretrained_mlp()
    for name in ft.H1_LAYERS:
        expected = run.model.get_submodule(name).weight.detach() - base.get_submodule(name).weight.detach()
        assert torch.allclose(run.delta[name], expected)
        assert float(run.delta[name].abs().max()) > 0


def test_h1_run_is_deterministic_and_the_seed_only_changes_the_adapter():
    a = ft.h1_run("lora", r=2, seed=0, steps=4, keep_model=True)
    b = ft.h1_run("lora", r=2, seed=0, steps=4, keep_model=True)
    c = ft.h1_run("lora", r=2, seed=1, steps=0, keep_model=True)
    assert a.loss == b.loss and a.score == b.score
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)
    d = ft.h1_run("lora", r=2, seed=0, steps=0, keep_model=True)
    A_c = c.model.base_model.model.l2.lora_A["default"].weight
    A_d = d.model.base_model.model.l2.lora_A["default"].weight
    assert not torch.equal(A_c, A_d)  # another seed, another random A
    W_c = c.model.base_model.model.l2.base_layer.weight
    W_d = d.model.base_model.model.l2.base_layer.weight
    assert torch.equal(W_c, W_d)  # ... on the same pretrained base


def test_h1_lora_config_keeps_the_scaling_at_two():
    for r in (1, 8, 64):
        config = ft.h1_lora_config(r)
        assert config.lora_alpha / config.r == 2 and config.target_modules == sorted(ft.H1_LAYERS)
    assert ft.h1_lora_config(4, lora_alpha=16).lora_alpha == 16


def test_h1_sweep_runs_every_rank_and_seed_and_keeps_what_it_is_told():
    runs = ft.h1_sweep(ranks=(1, 2), seeds=(0, 1), steps=2,
                       keep_delta=lambda method, r, seed: seed == 0,
                       keep_model=lambda method, r, seed: (method, r) == ("lora", 2))
    assert [(x.method, x.r, x.seed) for x in runs] == [
        ("full", None, 0), ("full", None, 1), ("lora", 1, 0), ("lora", 1, 1), ("lora", 2, 0), ("lora", 2, 1)]
    assert all(bool(x.delta) == (x.seed == 0) for x in runs)
    assert all((x.model is not None) == (x.r == 2) for x in runs)
    no_full = ft.h1_sweep(ranks=(1,), seeds=(0,), steps=1, full=False, keep_delta=False)
    assert [x.method for x in no_full] == ["lora"] and not no_full[0].delta


def test_bad_method_or_rank_is_refused():
    with pytest.raises(ValueError, match="valid methods"):
        ft.h1_run("dora", r=4, steps=1)
    with pytest.raises(ValueError, match="positive integer rank"):
        ft.h1_run("lora", r=0, steps=1)
    with pytest.raises(ValueError, match="positive integer rank"):
        ft.h1_run("lora", r=None, steps=1)


def test_adapter_deltas_are_the_layers_delta_weights():
    with ft.seeded(0):
        model = get_peft_model(digits.pretrained_mlp(), LoraConfig(r=3, lora_alpha=5, target_modules=["l1", "l3"],
                                                                   init_lora_weights=False))
    deltas = ft.adapter_deltas(model)
    assert set(deltas) == {"l1", "l3"}
    layer = model.base_model.model.l1
    expected = (5 / 3) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(deltas["l1"], expected)
    assert ft.adapter_deltas(model, "other") == {}


def test_adapted_layers_are_the_librarys_walk_filtered_by_adapter():
    with ft.seeded(0):
        model = get_peft_model(digits.pretrained_mlp(), LoraConfig(r=2, target_modules=["l1", "l2"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["l3"]))
    layers = ft.adapted_layers(model)
    assert list(layers) == ["l1", "l2"] and all(layers[n] is model.base_model.model.get_submodule(n) for n in layers)
    assert dict(model.base_model.adapter_layers()) == {**layers, **ft.adapted_layers(model, "other")}
    assert list(ft.adapted_layers(model, "other")) == ["l3"] and ft.adapted_layers(model, "nope") == {}
    with pytest.raises(TypeError, match="needs a PEFT model"):
        ft.adapted_layers(digits.pretrained_mlp())


def test_one_table_of_display_names():
    from peftlab.lab import compare as C

    assert C.LABELS is ft.METHOD_NAMES and ft.METHOD_NAMES["adaption_prompt"] == "LLaMA-Adapter"
    assert set(C.METHODS) <= set(ft.METHOD_NAMES)
    assert ft.Run("adaption_prompt", None, 0, 0.5, 1, 10, 1.0).label == "LLaMA-Adapter"


# ------------------------------------------------------------------------------------------ tables


def _run(method, r, seed, score, trainable=10, base=100):
    return ft.Run(method, r, seed, score, trainable, base, 1.0)


def test_table_summary_and_mean_score():
    runs = [_run("full", None, 0, 0.9, 100), _run("full", None, 1, 0.8, 100),
            _run("lora", 4, 0, 0.7), _run("lora", 4, 1, 0.5), _run("lora", 1, 0, 0.2)]
    table = ft.table(runs)
    assert list(table.run) == ["full FT", "full FT", "LoRA r=4", "LoRA r=4", "LoRA r=1"]
    assert table["score %"].tolist() == pytest.approx([90, 80, 70, 50, 20])
    summ = ft.summary(runs)
    assert list(summ.index) == ["full FT", "LoRA r=4", "LoRA r=1"]
    assert summ.loc["LoRA r=4", "score % (mean)"] == pytest.approx(60)
    assert summ.loc["LoRA r=4", "seeds"] == 2 and summ.loc["LoRA r=4", "trainable %"] == pytest.approx(10)
    assert ft.mean_score(runs, "full") == pytest.approx(0.85)
    assert ft.mean_score(runs, "lora", 4) == pytest.approx(0.6)
    with pytest.raises(KeyError, match="no run"):
        ft.mean_score(runs, "lora", 8)


# ------------------------------------------------------------------------------------------ H1 with any config, H2


def test_effective_weight_reads_linear_and_adapted_layers() -> None:
    lin = nn.Linear(5, 3)
    assert torch.allclose(ft.effective_weight(lin), lin.weight, atol=1e-6)
    model = get_peft_model(nn.Sequential(nn.Linear(5, 3)), LoraConfig(r=2, target_modules=["0"], use_dora=True))
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight)
    model.merge_adapter()
    merged = layer.get_base_layer().weight.detach().clone()
    model.unmerge_adapter()
    assert torch.allclose(ft.effective_weight(layer), merged, atol=1e-5)


def test_h1_finetune_snapshots_and_h2() -> None:
    run = ft.h1_finetune(LoraConfig(r=2, lora_alpha=4, target_modules=["l1", "l2", "l3"]), steps=20,
                         snapshot_every=10)
    assert [s for s, _ in run.snapshots] == [0, 10, 20] and len(run.loss) == 20
    assert run.snapshots[0][1]["l2"].shape == (256, 256)
    none, n0, _ = ft.h2_run(None)
    mse, n, loss = ft.h2_run(LoraConfig(r=1, lora_alpha=2, target_modules=["l1"], use_dora=True), steps=30)
    assert n0 == 0 and n == 1 * (64 + 256) + 256 and mse < none and len(loss) == 30


def test_run_final_loss_and_steps_to():
    run = ft.Run("lora", 4, 0, 0.0, 1, 1, 0.0, loss=[1.0] * 10 + [0.1] * 20, model=nn.Linear(1, 1))
    assert run.steps_to(0.5) == 16 and run.steps_to(0.01) is None  # the first full window with mean < 0.5
    assert run.final_loss(5) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------ the lab LM





def test_lm_run_lora_and_full(load_tiny):
    kw = dict(task="swap", steps=2, batch_size=4, n_train=8, n_test=4)
    lora = ft.lm_run(load_tiny, "lora", r=2, target_modules=("q_proj", "v_proj"), keep_delta=True, **kw)
    model, _ = load_tiny()
    n = sum(p.numel() for p in model.parameters())
    per_layer = 2 * 2 * (16 + 16)  # q and v, r·(d_in + d_out) each
    assert lora.trainable == tiny_lm_config().num_hidden_layers * per_layer and lora.base_params == n
    assert 0.0 <= lora.score <= 1.0 and len(lora.loss) == 2
    assert len(lora.delta) == 2 * tiny_lm_config().num_hidden_layers
    assert all(spec.numerical_rank(d) <= 2 for d in lora.delta.values())
    full = ft.lm_run(load_tiny, "full", r=None, keep_model=True, **kw)
    assert full.trainable == full.base_params == n and full.r is None and full.model is not None
    everywhere = ft.lm_run(load_tiny, "lora", r=1, target_modules="all-linear", **kw)
    # r = 1 on q, k, v, o (16 → 16), gate, up (16 → 32) and down (32 → 16) of every layer; lm_head left alone
    assert everywhere.trainable == tiny_lm_config().num_hidden_layers * (4 * (16 + 16) + 3 * (16 + 32))
    with pytest.raises(ValueError, match="unknown task"):
        ft.lm_run(load_tiny, "lora", task="nope", r=2, steps=1)


# ------------------------------------------------------------------------------------------ the entry point


def _merged_minus_base(model, name):
    """W_merged − W of the base layer ``name``, read by merging the adapter and unmerging it again."""
    layer = model.base_model.model.get_submodule(name)
    W = layer.get_base_layer().weight.detach().clone()
    model.merge_adapter()
    merged = layer.get_base_layer().weight.detach().clone()
    model.unmerge_adapter()
    return merged - W


def test_finetune_lora_on_h1_records_the_run():
    steps = 60
    seen = []
    run = ft.finetune(LoraConfig(r=2, lora_alpha=4), "h1", seed=3, steps=steps, eval_every=20, keep_model=True,
                      on_backward=lambda step, m, loss, opt: seen.append(step))
    assert (run.method, run.r, run.label, run.task, run.seed) == ("lora", 2, "LoRA r=2", "h1", 3)
    assert sorted(run.config.target_modules) == sorted(ft.H1_LAYERS)  # the harness's layers, filled in
    assert (run.trainable, run.total) == run.model.get_nb_trainable_parameters()
    assert run.trainable == 2 * H1_PER_RANK and run.base_params == 85_002 and run.total == 85_002 + run.trainable
    assert run.metric == "even-test accuracy" and 0 <= run.score <= 1
    assert [s for s, _ in run.evals] == [0, 20, 40, 60] and run.evals[-1][1] == run.score
    assert run.evals[0][1] == 0.0  # LoRA starts as the base model, which never predicts an even digit
    assert seen == list(range(steps)) and len(run.loss) == steps
    assert sum(run.loss[-5:]) < 0.5 * sum(run.loss[:5])  # the loss falls
    assert run.score == digits.accuracy(run.model, digits.load().even_test)
    for name in ft.H1_LAYERS:  # ΔW is what merging adds to the base weight
        assert torch.allclose(run.delta[name], _merged_minus_base(run.model, name), atol=1e-6)
    # memory: every parameter, a gradient and Adam's two moments (+ its step counter) per trainable tensor
    n_tensors = sum(1 for p in run.model.parameters() if p.requires_grad)
    assert run.memory_bytes == 4 * (run.total + 3 * run.trainable) + 4 * n_tensors
    assert run.peak_memory_bytes is None or run.peak_memory_bytes >= 0
    assert run.seconds > 0 and (run.steps, run.lr, run.batch_size) == (steps, 3e-3, 64)


def test_finetune_full_on_h1_is_h1_run():
    run = ft.finetune("full", "h1", seed=1, steps=20, eval_every=0)
    old = ft.h1_run("full", None, seed=1, steps=20)
    assert run.loss == old.loss and run.score == old.score and run.label == "full FT" and run.r is None
    assert run.trainable == run.total == run.base_params == 85_002 and run.config is None
    assert run.evals == [(20, run.score)]
    assert set(run.delta) == set(ft.H1_LAYERS) and all(torch.equal(run.delta[k], old.delta[k]) for k in run.delta)
    lora = ft.finetune(ft.h1_lora_config(4), "h1", seed=1, steps=20, eval_every=0)
    assert lora.loss == ft.h1_run("lora", 4, seed=1, steps=20).loss
    assert lora.memory_bytes < run.memory_bytes / 2  # no gradients or moments for the frozen base


def test_finetune_on_h4_trains_the_head_and_adapts_the_trunk():
    run = ft.finetune(LoraConfig(r=2), "h4:rot90", steps=12, eval_every=6, keep_model=True)
    assert run.config.modules_to_save == ["head"] and sorted(run.config.target_modules) == sorted(ft.H4_LAYERS)
    assert set(run.delta) == set(ft.H4_LAYERS) and run.metric == "test accuracy"
    assert (run.trainable, run.total) == run.model.get_nb_trainable_parameters()
    head = 10 * ft.H4_HIDDEN + 10
    assert run.trainable == 2 * (64 + ft.H4_HIDDEN) + 2 * (2 * ft.H4_HIDDEN) + head
    assert [s for s, _ in run.evals] == [0, 6, 12]
    for name in ft.H4_LAYERS:
        assert torch.allclose(run.delta[name], _merged_minus_base(run.model, name), atol=1e-6)
    full = ft.finetune("full", "h4:rot90", steps=4)
    assert set(full.delta) == {"trunk.l1", "trunk.l2", "head"} and full.trainable == full.total
    custom = ft.finetune(LoraConfig(r=1, target_modules=["trunk.l2"], modules_to_save=[]), "h4:invert", steps=2)
    assert set(custom.delta) == {"trunk.l2"} and custom.trainable == ft.H4_HIDDEN * 2  # the user's choice stands


def test_finetune_snapshots_and_h1_finetune():
    run = ft.finetune(LoraConfig(r=2), "h1", steps=20, eval_every=8, snapshot_every=5)
    assert [s for s, _ in run.snapshots] == [0, 5, 10, 15, 20] and [s for s, _ in run.evals] == [0, 8, 16, 20]
    assert run.snapshots[-1][1]["l3"].shape == (10, 256)
    again = ft.h1_finetune(LoraConfig(r=2, lora_alpha=8, target_modules=["l1", "l2", "l3"]), steps=20,
                           snapshot_every=5)
    assert again.loss == run.loss and again.score == run.score and again.model is not None
    assert all(torch.equal(a[1]["l2"], b[1]["l2"]) for a, b in zip(again.snapshots, run.snapshots))


def test_finetune_refuses_bad_input():
    with pytest.raises(ValueError, match="valid tasks.*h1"):
        ft.finetune("full", "nope", steps=1)
    with pytest.raises(ValueError, match="h4:<transform>"):
        ft.finetune("full", "h4", steps=1)
    with pytest.raises(ValueError, match="'full' for full fine-tuning"):
        ft.finetune("lora", "h1", steps=1)
    with pytest.raises(TypeError, match="peftlab config"):
        ft.finetune({"r": 4}, "h1", steps=1)
    with pytest.raises(ValueError, match=">= 0"):
        ft.finetune("full", "h1", steps=-1)


def test_adapter_deltas_skip_methods_without_a_delta(monkeypatch):
    model = get_peft_model(digits.pretrained_mlp(), LoraConfig(r=2, target_modules=["l1", "l2"]))

    def no_delta(adapter_name):
        raise NotImplementedError("this method has no weight update")

    monkeypatch.setattr(model.base_model.model.l1, "get_delta_weight", no_delta)
    assert set(ft.adapter_deltas(model)) == {"l2"}


def test_finetune_on_a_lab_lm_task(load_tiny):
    kw = dict(steps=30, batch_size=4, n_train=8, n_test=4, base=load_tiny)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    run = ft.finetune(config, "swap", eval_every=15, keep_model=True, **kw)
    assert run.metric == "exact match" and [s for s, _ in run.evals] == [0, 15, 30]
    assert (run.trainable, run.total) == run.model.get_nb_trainable_parameters()
    assert run.trainable == tiny_lm_config().num_hidden_layers * 2 * 2 * (16 + 16) and run.tokenizer is not None
    assert sum(run.loss[-5:]) < sum(run.loss[:5])
    for name, dW in run.delta.items():
        assert torch.allclose(dW, _merged_minus_base(run.model, name), atol=1e-6)
    assert len(run.delta) == 2 * tiny_lm_config().num_hidden_layers
    full = ft.finetune("full", "swap", **kw)
    assert full.trainable == full.total == full.base_params and sum(full.loss[-5:]) < sum(full.loss[:5])
    assert all(name.endswith(("proj", "lm_head")) for name in full.delta)
    with pytest.raises(TypeError, match="loader"):
        ft.finetune("full", "swap", base=torch.nn.Linear(2, 2), steps=1)
