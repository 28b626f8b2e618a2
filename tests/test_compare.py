"""peftlab.lab.compare: configs at defaults and at a matched budget, the comparison table, its flags, the guide."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from peftlab import AdaptionPromptConfig, LoraConfig, OFTConfig, TaskType, get_peft_model
from peftlab.lab import compare as C
from peftlab.lab import digits
from peftlab.lab import finetune as ft
from peftlab.registry import get_method


@pytest.fixture(scope="module")
def mlp():
    return digits.pretrained_mlp()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(cfg).eval()


def test_defaults_are_the_config_classes_own(mlp):
    lora = C.method_config("lora", "h1")
    assert (lora.r, lora.lora_alpha) == (LoraConfig().r, LoraConfig().lora_alpha) and not lora.use_dora
    assert C.method_config("dora", "h1").use_dora
    assert C.method_config("oft", "h1", base=mlp).oft_block_size == OFTConfig().oft_block_size  # 32 divides 64, 256
    llama = tiny_llama()  # hidden 16: the default block 32 cannot fit, the largest divisor below it is used
    assert C.method_config("oft", "swap", base=llama).oft_block_size == 16
    assert C.method_config("adaption_prompt", "swap", base=llama).adapter_layers == 2
    assert C.method_config("adalora", "h1", steps=50).total_step == 50
    assert C.method_config("full", "h1") == "full"
    with pytest.raises(ValueError, match="lab LM task"):
        C.method_config("adaption_prompt", "h1")
    with pytest.raises(ValueError, match="valid methods"):
        C.method_config("vera", "h1")


@pytest.mark.parametrize("method", [m for m in C.METHODS if m not in C.LM_ONLY])
def test_match_budget_lands_near_the_budget_and_reports_the_true_count(mlp, method):
    budget = C.count_trainable(C.method_config("lora", "h1", {"r": 4}), mlp, "h1")
    assert budget == 4 * (64 + 256) + 4 * (256 + 256) + 4 * (256 + 10)  # LoRA r=4 on l1, l2, l3
    config, knob, n = C.match_budget(method, budget, mlp, "h1")
    assert n == C.count_trainable(config, mlp, "h1")  # the count reported is the model's own
    if C.knobs(method, mlp, "h1"):
        assert knob and abs(math.log(n / budget)) < math.log(1.25), (knob, n, budget)
        # no other knob lands nearer
        for k in C.knobs(method, mlp, "h1"):
            try:
                other = C.count_trainable(C.method_config(method, "h1", k), mlp, "h1")
            except ValueError:
                continue
            assert abs(math.log(n / budget)) <= abs(math.log(other / budget)) + 1e-12
    else:
        assert knob == {} and method in ("full", "ia3")
    with pytest.raises(ValueError, match="positive"):
        C.match_budget(method, 0, mlp, "h1")


def test_match_budget_on_a_language_model_sizes_llama_adapter():
    llama = tiny_llama()
    budget = C.count_trainable(C.method_config("lora", "swap", {"r": 2}), llama, "swap")
    config, knob, n = C.match_budget("adaption_prompt", budget, llama, "swap")
    assert isinstance(config, AdaptionPromptConfig) and n == knob["adapter_len"] * 16 * knob["adapter_layers"] \
        + knob["adapter_layers"]  # K·d prompts and one gate per block
    assert abs(math.log(n / budget)) < math.log(1.5)


@pytest.fixture(scope="module")
def small_table():
    configs = {("full", "default"): "full", ("lora", "matched"): C.method_config("lora", "h1", {"r": 2}),
               ("ia3", "default"): C.method_config("ia3", "h1")}
    entries = C.compare(configs, "h1", steps=6, eval_every=3, seeds=(0, 1),
                        knobs_used={("lora", "matched"): {"r": 2}},
                        keep_model=lambda m, s, seed: seed == 0)
    return entries, C.table(entries)


def test_size_column_names_the_knobs():
    assert C._knob_text("lokr", {"r": 8, "decompose_factor": -1}, None) == "r=8, f=auto"  # LoKr's default: auto
    assert C._knob_text("lokr", {"r": 8, "decompose_factor": 2}, None) == "r=8, f=2"
    assert C._knob_text("lokr", {}, C.method_config("lokr", "h1")) == "r=8, f=auto"  # read off a default config
    assert C._knob_text("boft", {"boft_block_size": 4, "boft_n_butterfly_factor": 1}, None) == "b=4, m=1"
    assert C._knob_text("ia3", {}, C.method_config("ia3", "h1")) == "no size knob"


def test_table_columns_and_flags_come_from_the_registry(small_table):
    entries, df = small_table
    assert list(df.columns) == ["method", "setting", "size", "score % (mean)", "score % (spread)", "seeds",
                                "trainable", "trainable %", "step ms", "state KiB", "peak KiB",
                                "time to target s", "reached", "merges", "mixed batches", "key"]
    assert list(df.key) == ["full", "lora", "ia3"] and (df.seeds == 2).all()
    assert df.set_index("key").loc["lora", "size"] == "r=2"
    for e in entries:
        row = df[(df.key == e.method) & (df.setting == e.setting)].iloc[0]
        assert row.trainable == e.run.trainable
        if e.method == "full":
            assert pd.isna(row.merges) and pd.isna(row["mixed batches"])
        else:
            spec = get_method(e.run.config)
            assert row.merges == spec.supports_merge and row["mixed batches"] == spec.supports_mixed_batch
    assert df.attrs["target %"] == pytest.approx(90 * sum(e.run.score for e in entries if e.method == "full") / 2)
    assert (df["step ms"] > 0).all() and (df["state KiB"] > 0).all()


def test_flags_match_behaviour_on_trained_and_fresh_models(small_table):
    entries, _ = small_table
    x = digits.load().even_test.x[:6]
    for e in entries:
        if e.run.model is None or e.method == "full":
            continue
        spec = get_method(e.run.config)
        assert C.check_merge(e.run.model, x) == spec.supports_merge
        assert C.check_mixed_batch(e.run.model, x) == spec.supports_mixed_batch
        assert C.check_interchange(e.run.model, digits.pretrained_mlp, x, None) is None  # no loader: unknown
    llama = get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=2, adapter_layers=1,
                                                              task_type=TaskType.CAUSAL_LM))
    ids = torch.randint(0, 32, (4, 5))
    spec = get_method(llama.peft_config["default"])
    assert spec.supports_merge is False and C.check_merge(llama, ids) is False
    assert spec.supports_mixed_batch is False and C.check_mixed_batch(llama, ids) is False


def test_check_interchange_round_trips_with_peftlabs_own_loader(small_table):
    from peftlab import PeftModel

    entries, _ = small_table
    x = digits.load().even_test.x[:6]
    lora = next(e for e in entries if e.method == "lora" and e.run.model is not None)
    assert C.check_interchange(lora.run.model, digits.pretrained_mlp, x, PeftModel.from_pretrained) is True

    def broken(base, folder):
        raise OSError("cannot read")

    assert C.check_interchange(lora.run.model, digits.pretrained_mlp, x, broken) is False


def test_time_to_target_uses_the_eval_curve():
    run = ft.Run("lora", 2, 0, 0.9, 10, 100, 1.0, evals=[(0, 0.1), (5, 0.5), (10, 0.9)])
    e = C.Entry("lora", "matched", run, step_seconds=0.5)
    assert C._time_to(e.run, 0.5, e.step_seconds) == 2.5
    assert math.isnan(C._time_to(e.run, 0.95, e.step_seconds))


def test_spearman_and_rank_agreement():
    assert C.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert C.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert C.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    with pytest.raises(ValueError):
        C.spearman([1], [1])
    # ties on both sides, by hand: x = [3, 1, 3, 2] ranks [3.5, 1, 3.5, 2]; y = [5, 5, 9, 1] ranks [2.5, 2.5, 4, 1];
    # around the mean rank 2.5: dx = [1, -1.5, 1, -0.5], dy = [0, 0, 1.5, -1.5];
    # Σdx·dy = 2.25, Σdx² = 4.5, Σdy² = 4.5, so ρ = 2.25 / 4.5 = 0.5
    assert C._ranks([3, 1, 3, 2]) == [3.5, 1.0, 3.5, 2.0] and C._ranks([5, 5, 9, 1]) == [2.5, 2.5, 4.0, 1.0]
    assert C.spearman([3, 1, 3, 2], [5, 5, 9, 1]) == pytest.approx(0.5)
    assert C.spearman(pd.Series([3, 1, 3, 2], index=list("abcd")), [5, 5, 9, 1]) == pytest.approx(0.5)
    assert math.isnan(C.spearman([1, 1, 1], [1, 2, 3]))  # a constant side has no ranking
    df = pd.DataFrame({"key": ["full", "lora", "ia3", "oft"], "method": ["full FT", "LoRA", "IA3", "OFT"],
                       "setting": "default", "score % (mean)": [90.0, 80.0, 10.0, 85.0]})
    agree, rho = C.rank_agreement(df)
    # PEFT: OFT 49.1 > LoRA 47.8 > full 47.2 > IA3 31.1; the lab: full > OFT > LoRA > IA3
    assert list(agree.method) == ["OFT", "LoRA", "full FT", "IA3"]
    assert list(agree["lab rank"]) == [2, 3, 1, 4] and rho == pytest.approx(0.4)
    assert list(agree.agrees) == [True, True, True, True]  # full FT moves two places, all within 3 points


def test_decision_guide_follows_the_table():
    df = pd.DataFrame({
        "key": ["full", "lora", "ia3", "adaption_prompt"], "method": ["full FT", "LoRA", "IA3", "LLaMA-Adapter"],
        "setting": "default", "size": ["every weight", "r=8", "no size knob", "K=10, L=2"],
        "score % (mean)": [90.0, 88.0, 87.5, 60.0], "score % (spread)": [0.5, 0.5, 0.5, 0.5],
        "trainable": [1000, 100, 10, 50], "step ms": [3.0, 2.0, 2.5, 1.0], "reached": [1, 1, 1, 0],
        "merges": pd.array([pd.NA, True, True, False], dtype="boolean"),
        "mixed batches": pd.array([pd.NA, True, True, False], dtype="boolean")})
    df.attrs["target %"] = 81.0
    guide = C.decision_guide(df).set_index("need")
    assert guide.loc["the best score with an adapter", "pick"].startswith("LoRA")
    assert guide.loc["the fewest parameters at the best score", "pick"].startswith("IA3")  # within 1 point
    assert guide.loc["the fastest training step at the best score", "pick"].startswith("LoRA")
    assert "LLaMA-Adapter" in guide.loc["serving many adapters in one batch", "why"]
    assert guide.loc["the smallest adapter reaching 81 %", "pick"].startswith("IA3")


def test_count_trainable_of_full_fine_tuning_copies_nothing(monkeypatch):
    mlp = digits.pretrained_mlp()
    monkeypatch.setattr(C.copy, "deepcopy", lambda *a, **k: pytest.fail("count_trainable('full') copied the model"))
    assert C.count_trainable("full", mlp, "h1") == sum(p.numel() for p in mlp.parameters())
