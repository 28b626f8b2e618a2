"""X-LoRA in peftlab: the gate's scalings (shapes for every option, top-k, softmax), what the two passes compute
(one-hot gates give the single expert, a zero global weight gives the base), training only the gate,
generate, the scalings log, save → reload bit-exact, and the errors."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import base_model

import peftlab
from peftlab import LoraConfig, PeftModel, XLoraConfig, get_peft_model
from peftlab.tuners.xlora import layer_scalings, load_scalings_log

HIDDEN = 32  # tiny llama
N_LORA_LAYERS = 4  # 2 blocks × (q_proj, v_proj)


def make_experts(root, n=3, targets=("q_proj", "v_proj"), ranks=None, **kw):
    """``n`` LoRA experts with random, distinct weights, saved as folders; returns {name: folder}."""
    out = {}
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=(ranks or [2] * n)[i], lora_alpha=4, target_modules=list(targets),
                         init_lora_weights=False, **kw)
        m = get_peft_model(base_model("llama"), cfg)
        folder = os.path.join(root, f"expert{i}")
        m.save_pretrained(folder)
        out[f"e{i}"] = folder
    return out


def xlora(experts, **kw):
    torch.manual_seed(0)
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=HIDDEN, adapters=dict(experts), **kw)
    return get_peft_model(base_model("llama"), cfg).eval()


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return make_experts(str(tmp_path_factory.mktemp("experts")))


IDS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("softmax", [False, True])
def test_scalings_shapes_for_every_option(experts, layerwise, depth, softmax):
    m = xlora(experts, layerwise_scalings=layerwise, xlora_depth=depth, xlora_size=8, enable_softmax=softmax)
    assert m.get_latest_scalings() is None
    logits(m)
    s = m.get_latest_scalings()
    assert s.shape == (2, 6, N_LORA_LAYERS, 3)
    if softmax:
        torch.testing.assert_close(s.sum(-1), torch.ones(2, 6, N_LORA_LAYERS))
    else:
        assert not torch.allclose(s.sum(-1), torch.ones(2, 6, N_LORA_LAYERS))
    same_per_layer = all(torch.equal(s[:, :, 0], s[:, :, j]) for j in range(1, N_LORA_LAYERS))
    assert same_per_layer != layerwise
    n_linear = sum(isinstance(x, torch.nn.Linear) for x in m.base_model.internal_xlora_classifier.layers)
    assert n_linear == depth


def test_classifier_layout_matches_peft_names(experts):
    m = xlora(experts, xlora_depth=2, xlora_size=8, layerwise_scalings=True)
    names = {k: tuple(v.shape) for k, v in m.state_dict().items() if "xlora" in k}
    assert names == {"base_model.internal_xlora_classifier.layers.0.weight": (8, HIDDEN),
                     "base_model.internal_xlora_classifier.layers.0.bias": (8,),
                     "base_model.internal_xlora_classifier.layers.3.weight": (3 * N_LORA_LAYERS, 8),
                     "base_model.internal_xlora_classifier.layers.3.bias": (3 * N_LORA_LAYERS,)}
    assert any(k.startswith("base_model.lora_model.model.model.layers.0.self_attn.q_proj.lora_A.2.") for k in
               m.state_dict())


def test_top_k_and_softmax_topk():
    cfg = XLoraConfig(hidden_size=8, adapters={"a": "x"}, top_k_lora=2)
    s = torch.tensor([[[0.1, 0.5, 0.3, 0.1]]])
    kept = layer_scalings(s, cfg)
    torch.testing.assert_close(kept, torch.tensor([[[0.0, 0.5, 0.3, 0.0]]]))
    cfg.enable_softmax_topk = True
    soft = layer_scalings(s, cfg)
    assert (soft[..., [0, 3]] == 0).all()
    torch.testing.assert_close(soft.sum(-1), torch.ones(1, 1))
    torch.testing.assert_close(soft[..., 1] / soft[..., 2], torch.exp(torch.tensor([[0.2]])))
    cfg.top_k_lora = None
    cfg.enable_softmax_topk = False
    assert torch.equal(layer_scalings(s, cfg), s)


def _set_gate(model, bias):
    last = model.base_model.internal_xlora_classifier.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(bias, dtype=last.bias.dtype))


def _single_expert(experts, name):
    return PeftModel.from_pretrained(base_model("llama"), experts[name]).eval()


def test_a_one_hot_gate_gives_that_single_expert(experts):
    m = xlora(experts)
    _set_gate(m, [0.0, 200.0, 0.0])  # softmax ≈ (0, 1, 0)
    torch.testing.assert_close(logits(m), logits(_single_expert(experts, "e1")), atol=1e-5, rtol=0)
    m.set_topk_lora(1)  # top-1 keeps exactly expert 1 at weight ~1
    torch.testing.assert_close(logits(m), logits(_single_expert(experts, "e1")), atol=1e-5, rtol=0)


def test_top_k_equal_to_n_is_dense_and_top_1_with_softmax_topk_is_one_expert(experts):
    m = xlora(experts)
    dense = logits(m)
    m.set_topk_lora(3)
    assert torch.equal(logits(m), dense)
    m.set_topk_lora(1)
    m.base_model.xlora_config.enable_softmax_topk = True
    logits(m)
    for layer in range(N_LORA_LAYERS):
        lam = layer_scalings(m.get_latest_scalings()[:, :, layer], m.base_model.xlora_config)
        assert ((lam > 0).sum(-1) == 1).all() and torch.allclose(lam.sum(-1), torch.ones(2, 6))


def test_global_weight_zero_is_the_base_and_disable_adapter_too(experts):
    m = xlora(experts)
    base = logits(base_model("llama"))
    assert not torch.allclose(logits(m), base)
    m.set_global_scaling_weight(0.0)
    assert m.get_global_scaling_weight() == 0.0
    torch.testing.assert_close(logits(m), base)
    m.set_global_scaling_weight(1.0)
    with m.disable_adapter():
        assert torch.equal(logits(m), base)
    assert not torch.allclose(logits(m), base)


def test_the_gate_reads_the_base_model_s_last_hidden_state_without_gradients(experts):
    """The scaling pass is the plain base model (scaling_pass_value=0), the gate maps its last hidden state to the
    scalings, and the pass runs without gradients even when the experts train and take part in it."""
    m = xlora(experts)
    logits(m)
    with torch.no_grad():
        h = base_model("llama")(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(m.get_latest_scalings(), m.base_model.internal_xlora_classifier(h))
    m = xlora(experts, use_trainable_adapters=True, scaling_pass_value=0.5).train()
    seen = []
    hook = m.base_model.internal_xlora_classifier.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    m(input_ids=IDS).logits.sum().backward()
    hook.remove()
    assert len(seen) == 1 and not seen[0].requires_grad
    assert not torch.allclose(seen[0], h)  # the experts did take part in this scaling pass


def test_scaling_pass_value_changes_the_gate_input(experts):
    m = xlora(experts)
    logits(m)
    s0 = m.get_latest_scalings()
    m.set_scaling_pass_value(None)
    assert m.base_model.xlora_config.scaling_pass_value == pytest.approx(1 / 3)
    logits(m)
    assert not torch.allclose(m.get_latest_scalings(), s0)


def test_only_the_gate_trains_by_default_and_gets_gradients(experts):
    m = xlora(experts)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("internal_xlora_classifier" in n for n in trainable)
    m.train()
    out = m(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if p.requires_grad)
    m2 = xlora(experts, use_trainable_adapters=True)
    names = [n for n, p in m2.named_parameters() if p.requires_grad]
    assert any(".lora_A.0." in n for n in names) and any("classifier" in n for n in names)


def test_generate_equals_a_greedy_loop_over_full_forwards(experts):
    m = xlora(experts)
    prompt = IDS[:, :3]
    out = m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                     pad_token_id=0)
    ids = prompt
    for _ in range(4):
        nxt = logits(m, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)
    assert m.get_latest_scalings().shape[1] == 6  # the last step saw the whole sequence


def test_scalings_log_bucketed_and_flushed(experts, tmp_path):
    m = xlora(experts)
    m.enable_scalings_logging()
    logits(m)
    logits(m, IDS[:, :4])
    logits(m)
    m.disable_scalings_logging()
    logits(m)
    log = m.get_scalings_log()
    assert [s.shape[1] for s in log] == [6, 4, 6]
    buckets = m.get_bucketed_scalings_log()
    assert sorted(buckets) == [4, 6] and buckets[6][0] == [0, 2]
    path = tmp_path / "scalings.safetensors"
    m.flush_log_scalings(path)
    assert m.get_scalings_log() == []
    back = load_scalings_log(path)
    assert len(back) == 3 and all(torch.equal(a, b) for a, b in zip(back, log))
    with pytest.raises(ValueError, match="log is empty"):
        m.flush_log_scalings(path)


@pytest.mark.parametrize("kw", [{}, {"xlora_depth": 2, "xlora_size": 8, "layerwise_scalings": True}])
def test_save_and_reload_is_bit_exact(experts, tmp_path, kw):
    m = xlora(experts, **kw)
    for p in m.base_model.internal_xlora_classifier.parameters():
        with torch.no_grad():
            p.normal_()
    before = logits(m)
    m.save_pretrained(tmp_path / "x")
    assert sorted(os.listdir(tmp_path / "x")) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "e0",
                                                  "e1", "e2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing, nothing dropped
        again = PeftModel.from_pretrained(base_model("llama"), tmp_path / "x")
    assert torch.equal(logits(again), before)
    sd1 = {k: v for k, v in m.state_dict().items() if "lora_" in k or "xlora" in k}
    sd2 = again.state_dict()
    assert all(torch.equal(v, sd2[k]) for k, v in sd1.items())
    # the experts' subfolders are plain LoRA folders
    single = PeftModel.from_pretrained(base_model("llama"), tmp_path / "x" / "e2")
    assert torch.equal(logits(single), logits(_single_expert(experts, "e2")))
    # the folder moves: the config names the subfolders, not the original paths
    os.rename(tmp_path / "x", tmp_path / "moved")
    assert torch.equal(logits(PeftModel.from_pretrained(base_model("llama"), tmp_path / "moved")), before)


def test_experts_with_different_targets_and_ranks_mix(tmp_path):
    ex = make_experts(str(tmp_path / "a"), n=1, targets=("q_proj",), ranks=[2])
    ex.update({"f": make_experts(str(tmp_path / "b"), n=1, targets=("q_proj", "v_proj", "down_proj"),
                                 ranks=[4])["e0"]})
    m = xlora(ex)
    logits(m)
    assert m.get_latest_scalings().shape == (2, 6, 6, 2)  # q, v, down in 2 blocks
    _set_gate(m, [200.0, 0.0])
    torch.testing.assert_close(logits(m), logits(_single_expert(ex, "e0")), atol=1e-5, rtol=0)


def test_errors(experts, tmp_path):
    with pytest.raises(ValueError, match="hidden size is 32; pass hidden_size=32"):
        get_peft_model(base_model("llama"), XLoraConfig(hidden_size=64, adapters=experts))
    with pytest.raises(ValueError, match="top_k_lora=4 but there are 3 experts"):
        get_peft_model(base_model("llama"), XLoraConfig(hidden_size=HIDDEN, adapters=experts, top_k_lora=4))
    with pytest.raises(ValueError, match="top_k_lora=0"):
        XLoraConfig(hidden_size=HIDDEN, adapters=experts, top_k_lora=0)
    m = xlora(experts)
    with pytest.raises(ValueError, match="between 1 and the number of experts"):
        m.set_topk_lora(5)
    with pytest.raises(ValueError, match="no weight form"):
        m.merge_and_unload()
    with pytest.raises(ValueError, match="mixed batches"):
        m(input_ids=IDS, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="adapters is empty"):
        get_peft_model(base_model("llama"), XLoraConfig(hidden_size=HIDDEN, adapters={}))
    dora = make_experts(str(tmp_path / "d"), n=1, use_dora=True)
    untouched = base_model("llama")
    with pytest.raises(ValueError, match="use_dora=True"):
        get_peft_model(untouched, XLoraConfig(hidden_size=HIDDEN, adapters=dora))
    saving = make_experts(str(tmp_path / "m"), n=1, modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match=r"trains whole modules \(\['lm_head'\]\)"):
        get_peft_model(untouched, XLoraConfig(hidden_size=HIDDEN, adapters=saving))
    loha = get_peft_model(base_model("llama"), peftlab.LoHaConfig(target_modules=["q_proj"]))
    loha.save_pretrained(tmp_path / "loha")
    with pytest.raises(ValueError, match="LOHA adapter; X-LoRA's experts are LoRA"):
        get_peft_model(base_model("llama"), XLoraConfig(hidden_size=HIDDEN, adapters={"x": str(tmp_path / "loha")}))
    with pytest.raises(ValueError, match="cannot find its LoRA folder"):
        get_peft_model(base_model("llama"), XLoraConfig(hidden_size=HIDDEN, adapters={"x": str(tmp_path / "nope")}))
    # an expert for another model: refused, and the model is left as it was
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Conv1D: fan_in_fan_out set for us
        other = get_peft_model(base_model("gpt2"), LoraConfig(target_modules=["c_attn"]))
    other.save_pretrained(tmp_path / "gpt2")
    plain = base_model("llama")
    with pytest.raises(ValueError, match=r"expert 'g' \(.*gpt2\) does not fit this model: target_modules=\['c_attn'\] "
                                         "matched no module"):
        get_peft_model(plain, XLoraConfig(hidden_size=HIDDEN, adapters={**experts, "g": str(tmp_path / "gpt2")}))
    assert not any("lora" in n for n, _ in plain.named_modules())
    with pytest.raises(ValueError, match=r"expert 'g' .* does not fit this model"):  # as the first expert too
        get_peft_model(plain, XLoraConfig(hidden_size=HIDDEN, adapters={"g": str(tmp_path / "gpt2"), **experts}))
    assert not any("lora" in n for n, _ in plain.named_modules())


def test_unload_gives_back_the_base(experts):
    m = xlora(experts)
    base = logits(base_model("llama"))
    plain = m.unload()
    assert torch.equal(logits(plain), base)


def test_expert_order_survives_saving(experts, tmp_path):
    """Expert i is the gate's output i: the saved config keeps the experts' order even where their names do
    not sort that way (JSON configs are written with sorted keys)."""
    named = {"zeta": experts["e0"], "alpha": experts["e1"], "mid": experts["e2"]}
    m = xlora(named)
    _set_gate(m, [200.0, 0.0, 0.0])  # all weight on the first expert, "zeta"
    before = logits(m)
    m.save_pretrained(tmp_path / "x")
    again = PeftModel.from_pretrained(base_model("llama"), tmp_path / "x")
    assert list(again.peft_config["default"].adapters) == ["zeta", "alpha", "mid"]
    assert torch.equal(logits(again), before)


def test_embedding_experts_are_mixed_too(tmp_path):
    ex = make_experts(str(tmp_path), n=2, targets=("embed_tokens", "q_proj"))
    m = xlora(ex)
    logits(m)
    assert m.get_latest_scalings().shape == (2, 6, 3, 2)  # embed_tokens + 2 × q_proj
    _set_gate(m, [0.0, 200.0])
    torch.testing.assert_close(logits(m), logits(_single_expert(ex, "e1")), atol=1e-5, rtol=0)


def test_a_failing_forward_leaves_no_scalings_behind(experts):
    from peftlab.tuners.routing import _TOKEN_WEIGHTS

    m = xlora(experts)

    def fail_in_real_pass(module, args):
        if not m.base_model._in_scaling_pass:
            raise RuntimeError("boom")

    handle = m.base_model.model.lm_head.register_forward_pre_hook(fail_in_real_pass)
    with pytest.raises(RuntimeError, match="boom"):
        m(input_ids=IDS)
    handle.remove()
    assert _TOKEN_WEIGHTS.get() is None and m.base_model._contexts == []
    assert not m.base_model._in_scaling_pass
    torch.testing.assert_close(logits(m), logits(xlora(experts)))
