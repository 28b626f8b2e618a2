"""peftlab.lab.prompt_probes: the gates of a LLaMA-Adapter model and the size of each block's prompt read."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab import AdaptionPromptConfig, get_peft_model
from peftlab.lab import prompt_probes as probes


def llama(layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32, pad_token_id=0)).eval()


def adapted(adapter_layers: int = 2, layers: int = 3):
    torch.manual_seed(1)
    return get_peft_model(llama(layers), AdaptionPromptConfig(adapter_len=3, adapter_layers=adapter_layers,
                                                              task_type="CAUSAL_LM")).eval()


def set_gates(model, values: dict[str, float], adapter: str = "default") -> None:
    for label, module in probes.adapted_blocks(model).items():
        with torch.no_grad():
            module.adaption_gate[adapter].fill_(values[label])


BATCH = {"input_ids": torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))}


def test_blocks_and_gates_in_model_order():
    model = adapted(adapter_layers=2, layers=3)
    assert list(probes.adapted_blocks(model)) == ["block 1", "block 2"]  # the top two of three
    assert probes.gate_values(model) == [0.0, 0.0]  # zero-init
    set_gates(model, {"block 1": 0.25, "block 2": -0.5})
    assert probes.gate_values(model) == [0.25, -0.5]
    with pytest.raises(ValueError, match="no adapted block holds an adapter named 'other'"):
        probes.gate_values(model, "other")
    with pytest.raises(ValueError, match="no adapted attention module.*get_peft_model"):
        probes.adapted_blocks(nn.Linear(2, 2))


def test_prompt_read_share_is_zero_when_fresh_and_scales_with_the_gate():
    model = adapted()
    assert probes.prompt_read_share(model, BATCH) == {"block 1": 0.0, "block 2": 0.0}  # g = 0: no read at all
    set_gates(model, {"block 1": 0.2, "block 2": 0.0})
    small = probes.prompt_read_share(model, BATCH)
    set_gates(model, {"block 1": 0.4, "block 2": 0.0})
    large = probes.prompt_read_share(model, BATCH)
    # block 1's read is g times a fixed tensor; block 2 sees other inputs but its own gate is zero
    assert small["block 1"] > 0 and large["block 1"] == pytest.approx(2 * small["block 1"], rel=1e-4)
    assert small["block 2"] == large["block 2"] == 0.0
    with model.disable_adapter():
        assert probes.prompt_read_share(model, BATCH) == {"block 1": 0.0, "block 2": 0.0}
    assert all(not m._forward_hooks for m in probes.adapted_blocks(model).values())  # hooks removed


def test_prompt_read_share_is_the_norm_ratio_of_the_top_block():
    model = adapted(adapter_layers=1, layers=2)
    set_gates(model, {"block 1": 0.7})
    captured = {}
    top = model.base_model.model.model.layers[1]
    handle = top.register_forward_hook(lambda mod, args, kwargs, out: captured.update(kwargs, x=args),
                                       with_kwargs=True)
    try:
        share = probes.prompt_read_share(model, BATCH)
    finally:
        handle.remove()
    # recompute by hand from the top block's input: its attention with and without the adapter
    attn = top.self_attn
    h = top.input_layernorm(captured["x"][0] if captured["x"] else captured["hidden_states"])
    kw = dict(position_embeddings=captured["position_embeddings"], attention_mask=captured.get("attention_mask"))
    with torch.no_grad():
        adapted_out, frozen = attn(hidden_states=h, **kw)[0], attn.base_layer(hidden_states=h, **kw)[0]
    assert share["block 1"] == pytest.approx(float((adapted_out - frozen).norm() / frozen.norm()), rel=1e-5)
    assert share["block 1"] > 0.01


def test_hooks_are_removed_when_the_forward_fails():
    model = adapted()
    with pytest.raises(Exception):
        probes.prompt_read_share(model, {"input_ids": torch.full((1, 4), 10_000)})  # index out of the vocabulary
    assert all(not m._forward_hooks for m in probes.adapted_blocks(model).values())
