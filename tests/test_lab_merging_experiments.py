"""peftlab.lab.merging_experiments: TIES steps, the testbed comparison, DARE curves, lab-LM task adapters."""

from __future__ import annotations

import math

import pytest
import torch

from peftlab import merging
from peftlab.lab import digits, tasks
from peftlab.lab import merging_experiments as mx

TAU = torch.tensor([
    [0.70, 1.00, 0.80, -0.20, 0.05],
    [0.60, 0.10, -1.40, 0.50, -0.05],
    [0.90, -0.15, 0.40, 0.30, 0.02],
])


# ------------------------------------------------------------------------------------------ TIES steps


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.6, 1.0])
def test_ties_steps_merge_equals_the_library(method, density):
    steps = mx.ties_steps(TAU, density, method, weights=[1.0, 0.5, 2.0])
    assert torch.allclose(steps.merged, merging.ties(list(TAU), [1.0, 0.5, 2.0], density, method))
    assert torch.equal(steps.trimmed, torch.stack([merging.prune(t, density, "magnitude") for t in TAU]))
    assert torch.equal(steps.agree, merging.calculate_majority_sign_mask(steps.trimmed, method))


def test_ties_steps_elected_sign_on_the_toy():
    total, freq = mx.ties_steps(TAU, 0.6, "total"), mx.ties_steps(TAU, 0.6, "frequency")
    assert total.elected.tolist() == [1, 1, -1, 1, 1]   # parameter 3: mass 0.8 + 0.4 − 1.4 < 0
    assert freq.elected.tolist() == [1, 1, 1, 1, 1]     # ... but two models of three are positive
    assert int((~total.agree).sum()) == 8                # 6 trimmed + 2 outvoted
    # every agreeing entry carries the elected sign
    assert torch.all((total.trimmed.sign() == total.elected) | ~total.agree)


def test_elected_sign_is_plus_where_nothing_agrees():
    steps = mx.ties_steps(torch.zeros(2, 3), 0.5)
    assert steps.elected.tolist() == [1, 1, 1] and steps.merged.tolist() == [0, 0, 0]


def test_sign_conflict_fraction():
    assert mx.sign_conflict_fraction(TAU) == pytest.approx(4 / 5)   # every parameter but the first has both signs
    assert mx.sign_conflict_fraction([torch.tensor([1.0, 0.0]), torch.tensor([0.0, -1.0])]) == 0.0  # zeros never conflict
    assert mx.sign_conflict_fraction([torch.tensor([1.0, -2.0]), torch.tensor([-1.0, -1.0])]) == 0.5


# ------------------------------------------------------------------------------------------ the testbed


@pytest.fixture(scope="module")
def small_testbed():
    return digits.merging_testbed(tasks=("rot90", "flipLR"), hidden=32, steps=20, pretrain_steps=50)


def test_pick_lambda_chooses_on_validation_and_reports_test(small_testbed):
    tb = small_testbed
    delta = merging.merge_task_vectors([tb.task_vectors[t] for t in tb.tasks])
    lambdas = (0.1, 0.5, 1.0)
    r = mx.pick_lambda(tb, delta, lambdas, "task arithmetic")
    vals = {lam: tb.normalised(tb.apply(delta, lam), "val") for lam in lambdas}
    assert r.lam in lambdas and r.val == max(vals.values())
    assert r.lam == min(lam for lam, v in vals.items() if v == r.val)   # ties go to the smaller λ
    assert r.test == tb.normalised(tb.apply(delta, r.lam), "test")
    assert set(r.per_task) == set(tb.tasks)
    with pytest.raises(ValueError, match="lambdas is empty"):
        mx.pick_lambda(tb, delta, [])


def test_compare_on_testbed_rows(small_testbed):
    tb = small_testbed
    results = mx.compare_on_testbed(tb, ties_densities=(0.2,), dare_densities=(0.5,), lambdas=(0.5, 1.0))
    assert [r.method for r in results] == ["zero-shot", "averaging", "task arithmetic", "TIES", "TIES per tensor",
                                           "TIES, frequency", "DARE + TIES"]
    zero, avg = results[0], results[1]
    assert zero.test == tb.normalised(tb.theta_pre, "test") and avg.lam == 1.0
    T = len(tb.tasks)
    mean_delta = merging.merge_task_vectors([tb.task_vectors[t] for t in tb.tasks], [1 / T] * T)
    assert avg.test == tb.normalised(tb.apply(mean_delta), "test")
    assert {r.density for r in results[3:6]} == {0.2} and results[6].density == 0.5
    table = mx.results_table(results, seed=3)
    assert list(table.columns[:6]) == ["seed", "method", "density", "λ", "val %", "test %"]
    assert table["seed"].eq(3).all() and len(table) == 7 and f"{tb.tasks[0]} %" in table.columns


# ------------------------------------------------------------------------------------------ DARE


def test_drop_rate_curve_rescale_and_drop_only():
    delta = {"w": torch.ones(200, 50)}
    total = lambda d: float(d["w"].sum())  # noqa: E731
    curve = mx.drop_rate_curve(delta, total, [0.0, 0.5, 0.9], n_masks=4, rescale=True)
    assert curve[0.0] == [10_000.0] and len(curve[0.5]) == 4
    assert all(abs(v - 10_000) < 1_500 for v in curve[0.9])        # E[m ⊙ δ / (1 − p)] = δ (std 300)
    drop_only = mx.drop_rate_curve(delta, total, [0.9], n_masks=2, rescale=False)
    assert all(abs(v - 1_000) < 200 for v in drop_only[0.9])        # without rescale the sum shrinks to (1 − p)
    assert mx.drop_rate_curve(delta, total, [0.5], 2) == mx.drop_rate_curve(delta, total, [0.5], 2)  # seeded
    with pytest.raises(ValueError, match="drop rate"):
        mx.drop_rate_curve(delta, total, [1.0])


def test_h4_full_and_lora_deltas():
    full = mx.h4_full_delta("rot90", hidden=32, steps=10)
    pre = digits.pretrained_classifier(32)
    ft = digits.finetune_task("rot90", 32, steps=10, lr=1e-4, optimizer="adam")
    assert set(full.delta) == {"l1.weight", "l1.bias", "l2.weight", "l2.bias"}
    assert torch.allclose(full.delta["l2.weight"], ft.trunk.l2.weight - pre.trunk.l2.weight)
    assert full.accuracy() == digits.accuracy(ft, digits.task_split(digits.load().test, "rot90"))
    zero = {k: torch.zeros_like(v) for k, v in full.delta.items()}
    assert 0.0 <= full.accuracy(zero) <= 1.0
    lora = mx.h4_lora_delta("rot90", hidden=32, r=2, steps=5)
    assert torch.linalg.matrix_rank(lora.delta["l2.weight"]) <= 2 and float(lora.delta["l2.bias"].abs().max()) == 0
    assert lora.label == "LoRA r=2" and set(lora.head) == {"weight", "bias"}
    assert 0.0 <= lora.accuracy() <= 1.0


def test_dare_measures_on_a_known_delta():
    torch.manual_seed(0)
    u, v = torch.randn(300, 1), torch.randn(1, 200)
    W = 3 * torch.eye(300, 200)                        # ‖W‖₂ = 3, ‖W‖_F = 3·√200
    delta = {"l.weight": 0.01 * u @ v, "l.bias": torch.ones(300)}
    td = mx.TaskDelta("rot90", 300, {"l.weight": W, "l.bias": torch.zeros(300)}, delta, {})
    m = mx.dare_measures(td, p=0.9)
    assert list(m) == ["l.weight"]                    # matrices only
    row, d = m["l.weight"], delta["l.weight"]
    assert row["stable rank"] == pytest.approx(1.0, rel=1e-4)                 # rank one
    assert row["σ₁(δ) / σ₁(W)"] == pytest.approx(float(d.norm()) / 3, rel=1e-4)
    assert row["‖δ‖_F / ‖W‖_F"] == pytest.approx(float(d.norm()) / (3 * 200 ** 0.5), rel=1e-5)
    assert row["mean |δ_ij|"] == pytest.approx(float(d.abs().mean()))
    assert row["‖noise‖²_F / ‖δ‖²_F"] == pytest.approx(9.0, rel=0.15)           # p / (1 − p) in expectation
    assert 0 < row["‖noise‖₂ / ‖W‖₂ at p=0.9"] < 3.5 * row["σ₁(δ) / σ₁(W)"]    # ‖n‖₂ ≤ ‖n‖_F ≈ 3‖δ‖_F = 3σ₁(δ)
    assert mx.dare_measures(td, p=0.5)["l.weight"]["‖noise‖²_F / ‖δ‖²_F"] == pytest.approx(1.0, rel=0.15)
    assert mx.dare_measures(td) == m                  # seeded
    with pytest.raises(ValueError, match="drop rate p=1"):
        mx.dare_measures(td, p=1.0)


# ------------------------------------------------------------------------------------------ lab-LM adapters





def test_token_accuracy_counts_answer_tokens(load_tiny):
    model, tok = load_tiny()
    ds = tasks.make_task("swap", 6, seed=1)
    acc = tasks.token_accuracy(model, tok, ds, batch_size=4)
    # the same count by hand, one example at a time
    right = total = 0
    for p, a in zip(ds["prompt"], ds["answer"]):
        enc = tasks.encode_example(tok, p, a)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            pred = model(input_ids=ids).logits[0, :-1].argmax(-1)
        labels = torch.tensor(enc["labels"][1:])
        mask = labels != -100
        right += int((pred[mask] == labels[mask]).sum())
        total += int(mask.sum())
    assert math.isclose(acc, right / total)


def test_adapters_train_save_load_and_merge(load_tiny, tmp_path):
    runs = mx.train_task_adapters(load_tiny, ["sort", "swap"], tmp_path / "adapters", r=2, steps=2, seeds=[0, 1],
                                  batch_size=4, n_train=8, n_test=4)
    assert list(runs) == ["sort", "swap"] and all(r.model is None for r in runs.values())
    folders = {name: tmp_path / "adapters" / name for name in runs}
    assert all((f / "adapter_config.json").is_file() for f in folders.values())
    model, tok = mx.load_adapters(load_tiny, folders)
    assert set(model.peft_config) == {"sort", "swap"}
    tests = {t: tasks.make_task(t, 4, seed=1) for t in ("sort", "swap")}
    base_scores = mx.task_scores(model, tok, tests)
    assert set(base_scores) == {"sort", "swap"} and set(base_scores["sort"]) == {"exact match", "token accuracy"}
    table = mx.merge_grid(model, tok, ["sort", "swap"], [1.0, 1.0], tests, types=("cat", "linear", "ties"),
                          densities=(0.5,))
    assert list(table.type.unique()) == ["cat", "linear", "ties"] and len(table) == 3 * 2
    assert list(table["merge"].unique()) == ["cat", "linear", "ties_d50"]
    assert table[table.type == "cat"]["distance from Σ wΔW"].max() < 1e-5   # cat is exact
    assert set(model.peft_config) == {"sort", "swap"}                          # merged adapters deleted
    assert mx.merged_name("ties", 0.2) == "ties_d20" and mx.merged_name("cat", None) == "cat"
    # the two adapters got different seeds, so different random A
    A = {n: model.base_model.model.model.layers[0].self_attn.q_proj.lora_A[n].weight for n in ("sort", "swap")}
    assert not torch.equal(A["sort"], A["swap"])
    with pytest.raises(ValueError, match="2 tasks and 1 adapter names"):
        mx.train_task_adapters(load_tiny, ["sort", "swap"], tmp_path, adapter_names=["a"])
    with pytest.raises(ValueError, match="2 tasks and 3 seeds"):
        mx.train_task_adapters(load_tiny, ["sort", "swap"], tmp_path, seeds=[0, 1, 2])
