"""LLaMA-Adapter (adaption prompts): the gated attention against the paper's equation, zero-init identity
(outputs and greedy generations), KV-cache generation, refusals, several adapters, training, half precision.

Invariants shared with every method (trainable set, count formula, save/load, disable, delete, no merge, no
mixed batches) are rows of tests/test_invariants.py; peft interop is in tests/test_adaption_prompt_interop.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import base_model, fill_, output, tiny_llama
from torch import nn

from peftlab import AdaptionPromptConfig, LoraConfig, get_peft_model
from peftlab.lab.models import example_inputs
from peftlab.tuners.adaption_prompt import AdaptedAttention


def config(**kw) -> AdaptionPromptConfig:
    kw.setdefault("adapter_len", 3)
    kw.setdefault("adapter_layers", 2)
    kw.setdefault("task_type", "CAUSAL_LM")
    return AdaptionPromptConfig(**kw)


def fill(model, adapter: str = "default", gate: float | None = None) -> None:
    """Non-trivial prompts and gates for ``adapter`` (seeded by name); ``gate`` sets every gate to one value."""
    for n, p in model.named_parameters():
        parts = n.split(".")
        if adapter in parts and any(x.startswith("adaption_") for x in parts):
            fill_(p, f"{adapter}:{n}")
            if gate is not None and "adaption_gate" in parts:
                with torch.no_grad():
                    p.fill_(gate)
            elif "adaption_prompt" in parts:
                with torch.no_grad():
                    p.mul_(10)  # prompts are N(0, 1)-sized


def llama(kv_heads: int = 2, attention_bias: bool = False, layers: int = 2, seed: int = 0):
    return tiny_llama(kv_heads=kv_heads, layers=layers, seed=seed, attention_bias=attention_bias)


def adapted_layers(model) -> dict[str, AdaptedAttention]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedAttention)}


# ---------------------------------------------------------------------------------------------------
# the equation
# ---------------------------------------------------------------------------------------------------
def paper_attention(attn: AdaptedAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, name: str):
    """Eq. 6–8 of arXiv 2303.16199 written out: keys and values of [P; tokens], one softmax over the prompt
    columns (times the gate) and a separate causal one over the tokens, then o_proj."""
    base = attn.get_base_layer()
    b, s, _ = x.shape
    d, g = base.head_dim, base.num_key_value_groups

    def heads(t):  # (b, n, h·d) -> (b, h, n, d), key/value heads repeated for their query groups
        t = t.view(t.shape[0], t.shape[1], -1, d).transpose(1, 2)
        return t.repeat_interleave(g, dim=1) if t.shape[1] * g == base.config.num_attention_heads else t

    def rope(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos[:, None] + torch.cat((-t2, t1), dim=-1) * sin[:, None]

    q = rope(heads(base.q_proj(x)))
    k, v = rope(heads(base.k_proj(x))), heads(base.v_proj(x))
    p = attn.adaption_prompt[name]
    kp, vp = heads(base.k_proj(p)).expand(b, -1, -1, -1), heads(base.v_proj(p)).expand(b, -1, -1, -1)
    keys, values = torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2)  # [P; T]
    scores = q @ keys.transpose(-1, -2) / math.sqrt(d)  # S = Q Kᵀ/√d, (b, h, s, K + s)
    n = p.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    s_tok = scores[..., n:].masked_fill(~causal, float("-inf")).softmax(-1)
    s_gated = torch.cat([attn.adaption_gate[name] * scores[..., :n].softmax(-1), s_tok], dim=-1)  # S_g
    out = (s_gated @ values).transpose(1, 2).reshape(b, s, -1)
    return base.o_proj(out)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("attention_bias", [False, True], ids=["no-bias", "bias"])
def test_adapted_attention_is_the_papers_equation(kv_heads, attention_bias):
    model = get_peft_model(llama(kv_heads, attention_bias), config(adapter_layers=1))
    fill(model, gate=0.8)  # a gate of the size training reaches: the prompt's read is large, so is any error in it
    (_, attn), = adapted_layers(model).items()
    # inputs ×10: with the tiny model's 0.02-sized projections the scores over the prompt are then far from
    # uniform, so a wrong rotation, head grouping or scale changes the read
    x = 10 * torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(5)[None].expand(2, -1)
    cos, sin = model.base_model.model.model.rotary_emb(x, pos)
    with torch.no_grad():
        ours, _ = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)
        expected = paper_attention(attn, x, cos, sin, "default")
        plain = attn.base_layer(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
    # sdpa's causal masking of the base attention with attention_mask=None: is_causal inside the module
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    # the gated read alone (the block's own attention subtracted) to 0.1 % of its size: a read without the
    # rotation, or with the scores scaled by 0.9, misses by 0.3–6 %
    read = expected - plain
    assert read.abs().max() > 5e-3
    torch.testing.assert_close(ours - plain, read, atol=1e-3 * float(read.abs().max()), rtol=0)


# ---------------------------------------------------------------------------------------------------
# zero-init: the base model, exactly
# ---------------------------------------------------------------------------------------------------
def test_fresh_adapter_changes_no_output_and_no_generation():
    base = llama()
    x = example_inputs("llama", batch=3)
    prompt = x["input_ids"][:, :4]
    with torch.no_grad():
        ref_logits = base(**x).logits
        ref_gen = base.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model = get_peft_model(copy.deepcopy(base), config(adapter_len=5, adapter_layers=2)).eval()
    assert all(g.item() == 0.0 for n, g in model.named_parameters() if "adaption_gate" in n)
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "adaption_prompt" in n)  # not zero
    torch.testing.assert_close(output(model, x), ref_logits, atol=0, rtol=0)
    with torch.no_grad():
        gen = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, ref_gen)


def test_at_zero_gate_only_the_gate_gets_a_gradient():
    """g = 0: ∂L/∂P = 0 (the prompt enters only through g·...), ∂L/∂g ≠ 0: the first step opens the gate."""
    model = get_peft_model(llama(), config())
    x = example_inputs("llama")
    model(**x).loss.backward()
    for n, p in model.named_parameters():
        if "adaption_prompt" in n:
            assert torch.count_nonzero(p.grad) == 0, n
        elif "adaption_gate" in n:
            assert p.grad.abs().item() > 0, n
        else:
            assert p.grad is None, n


# ---------------------------------------------------------------------------------------------------
# generation with a KV cache
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_kv_cache_generation_equals_generation_without_cache(kv_heads):
    model = get_peft_model(llama(kv_heads), config(adapter_len=4, adapter_layers=2)).eval()
    fill(model, gate=0.5)
    x = example_inputs("llama", batch=2)
    prompt = x["input_ids"][:, :5]
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, use_cache=True, **kw)
        plain = model.generate(input_ids=prompt, use_cache=False, **kw)
        with model.disable_adapter():
            base_gen = model.generate(input_ids=prompt, use_cache=True, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.scores, plain.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.equal(cached.sequences, base_gen.sequences)  # the adapter does change what is generated
    # the last step's logits from the cache equal a full forward over the whole sequence
    seq = cached.sequences[:, :-1]
    with torch.no_grad():
        full = model(input_ids=seq).logits[:, -1]
    torch.testing.assert_close(cached.scores[-1], full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "opt", "bert", "mlp"])
def test_unsupported_model_family_is_refused(name):
    model = base_model(name)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"Llama-family models \(llama, mistral\).*use LoRA"):
        get_peft_model(model, config(adapter_layers=1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not adapted_layers(model)


def test_adapter_layers_larger_than_the_model_is_refused():
    model = llama(layers=2)
    with pytest.raises(ValueError, match=r"adapter_layers=3, but the model has 2 'self_attn' modules.*between 1 and 2"):
        get_peft_model(model, config(adapter_layers=3))
    assert not adapted_layers(model)


@pytest.mark.parametrize("kwargs, words", [
    (dict(adapter_len=0), "adapter_len=0: give a positive integer"),
    (dict(adapter_len=None), "adapter_len=None"),
    (dict(adapter_layers=-1), "adapter_layers=-1"),
    (dict(target_modules=["self_attn"]), r"target_modules=\['self_attn'\]\): expected a string or None"),
    (dict(modules_to_save=["lm_head"]), "has no 'modules_to_save' option"),
    (dict(bias="all"), "has no 'bias' option"),
])
def test_config_refusals(kwargs, words):
    with pytest.raises((ValueError, TypeError), match=words):
        config(**kwargs)


def test_a_prompt_larger_than_memory_is_refused_before_allocating():
    model = llama()
    with pytest.raises(ValueError, match=r"adapter_len=1099511627776: .* GiB, more than the"):
        get_peft_model(model, config(adapter_len=2**40, adapter_layers=1))
    assert not adapted_layers(model)


def test_calling_the_module_without_rotary_tables_says_what_to_pass():
    model = get_peft_model(llama(), config(adapter_layers=1))
    (_, attn), = adapted_layers(model).items()
    with pytest.raises(ValueError, match=r"without position_embeddings.*pass position_embeddings=\(cos, sin\)"):
        attn(hidden_states=torch.randn(1, 3, 32))


def test_target_modules_that_match_nothing_name_the_close_modules():
    with pytest.raises(ValueError, match="matched no module.*self_attn"):
        get_peft_model(llama(), config(target_modules="self_attention"))


def test_merge_is_refused_with_the_reason_and_what_to_do():
    model = get_peft_model(llama(), config())
    for call in (model.merge_adapter, model.merge_and_unload, model.base_model.merge_and_unload):
        with pytest.raises(ValueError, match="no weight form to merge.*unmerged"):
            call()
    layer = next(iter(adapted_layers(model).values()))
    with pytest.raises(ValueError, match="depends on every query"):
        layer.merge()


def test_a_lora_model_cannot_take_adaption_prompts_on_its_wrapped_layers():
    model = get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(ValueError):
        model.add_adapter("ap", config())


# ---------------------------------------------------------------------------------------------------
# several adapters
# ---------------------------------------------------------------------------------------------------
def test_several_adapters_switch_add_up_and_delete():
    model = get_peft_model(llama(), config(adapter_len=3, adapter_layers=1)).eval()
    model.add_adapter("two", config(adapter_len=5, adapter_layers=2))
    fill(model, "default")
    fill(model, "two")
    layers = adapted_layers(model)
    assert len(layers) == 2  # "two" reaches one block further down
    top = layers["base_model.model.model.layers.1.self_attn"]
    assert top.adapter_names == ["default", "two"] and top.adapter_len == {"default": 3, "two": 5}
    assert layers["base_model.model.model.layers.0.self_attn"].adapter_names == ["two"]
    x = example_inputs("llama")
    out = {}
    with model.disable_adapter():
        out["base"] = output(model, x)
    out["default"] = output(model, x)  # the first adapter stays active
    model.set_adapter("two")
    out["two"] = output(model, x)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if n.endswith(".two")}
    assert not torch.allclose(out["default"], out["two"]) and not torch.allclose(out["two"], out["base"])
    # both active: their gated prompt attentions add up inside the module
    h = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    cos, sin = model.base_model.model.model.rotary_emb(h, torch.arange(6)[None])
    kw = dict(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)
    with torch.no_grad():
        plain = top.base_layer(**kw)[0]
        single = {}
        for name in ("default", "two"):
            top.set_adapter([name])
            single[name] = top(**kw)[0] - plain
        top.set_adapter(["default", "two"])
        both = top(**kw)[0] - plain
    torch.testing.assert_close(both, single["default"] + single["two"], atol=1e-6, rtol=0)
    model.set_adapter(["default", "two"])
    assert not torch.allclose(output(model, x), out["two"])
    # delete: the layer that only "two" used is plain attention again
    model.set_adapter("default")
    model.delete_adapter("two")
    assert list(adapted_layers(model)) == ["base_model.model.model.layers.1.self_attn"]
    torch.testing.assert_close(output(model, x), out["default"], atol=0, rtol=0)


def test_training_moves_gates_then_prompts_and_lowers_the_loss():
    model = get_peft_model(llama(), config(adapter_len=4, adapter_layers=2))
    x = example_inputs("llama", batch=4)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    prompts = {n: p.detach().clone() for n, p in model.named_parameters() if "adaption_prompt" in n}
    losses = []
    for _ in range(30):
        loss = model(**x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.abs().item() > 0 for n, p in model.named_parameters() if "adaption_gate" in n)
    assert all(not torch.equal(p, prompts[n]) for n, p in model.named_parameters() if n in prompts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_float32_adapters(dtype):
    base = llama().to(dtype)
    model = get_peft_model(base, config())
    fill(model, gate=0.3)
    assert {p.dtype for n, p in model.named_parameters() if "adaption_" in n} == {torch.float32}
    x = example_inputs("llama")
    logits = output(model, x)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    model(**x).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for n, p in model.named_parameters() if "adaption_" in n)


def test_works_with_eager_and_sdpa_attention():
    x = example_inputs("llama")
    outs = []
    for impl in ("eager", "sdpa"):
        base = llama()
        base.config._attn_implementation = impl
        model = get_peft_model(base, config())
        fill(model, gate=0.4)
        outs.append(output(model, x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_no_module_named_like_the_target_but_elsewhere_is_wrapped():
    """peft's suffix rule matches ".self_attn" only: a module named "my_self_attn" is not a target."""
    model = llama()
    model.model.layers[0].my_self_attn = nn.Identity()
    wrapped = adapted_layers(get_peft_model(model, config(adapter_layers=2)))
    assert sorted(wrapped) == [f"base_model.model.model.layers.{i}.self_attn" for i in (0, 1)]


def test_the_forward_leaves_no_hooks_on_the_projections():
    """The read is added through hooks on q_proj and o_proj that live for one call only, also when it fails."""
    model = get_peft_model(llama(attention_bias=True), config(adapter_layers=2))
    fill(model, gate=0.5)
    projections = [m for layer in adapted_layers(model).values() for m in (layer.base_layer.q_proj,
                                                                           layer.base_layer.o_proj)]
    output(model, example_inputs("llama"))
    assert all(not p._forward_hooks and not p._forward_pre_hooks for p in projections)
    (_, top), = list(adapted_layers(model).items())[-1:]
    with pytest.raises(RuntimeError):  # hidden states of the wrong width fail inside the module
        top(hidden_states=torch.randn(1, 3, 31), position_embeddings=(torch.ones(1, 3, 8), torch.zeros(1, 3, 8)))
    assert all(not p._forward_hooks and not p._forward_pre_hooks for p in projections)
    with model.disable_adapter():  # the plain module again: the base model's output, bias included once
        plain = output(model, example_inputs("llama"))
    for layer in adapted_layers(model).values():
        layer.adaption_gate["default"].data.zero_()
    torch.testing.assert_close(output(model, example_inputs("llama")), plain, atol=0, rtol=0)
