"""LLaMA-Adapter against peft (the oracle), in both directions.

For each configuration (multi-head and grouped-query attention, Llama and Mistral, adapter_len 1 and more,
adapter_layers 1 and more) the same tiny model is wrapped by both libraries: a fresh adapter under one seed
has the same tensors and count line; with every prompt and gate filled with values seeded by its on-disk
name both give the same logits and the same greedy generations; peftlab's files load in peft and peft's in
peftlab with the same outputs; the files hold the same tensors and config; training steps move the same
tensors; several adapters travel both ways. Where peft is wrong (a second o_proj bias, which breaks its
zero-init; head_dim other than hidden/heads; GPT-2's read without c_proj, a family peftlab refuses) a test pins
the difference.
"""

from __future__ import annotations

import copy
import zlib
from typing import Any

import pytest
import torch
from conftest import tiny_llama
from interop import DIRECTIONS, LIBS, assert_same_tensors, count_line, peft, read_files

import peftlab

pytestmark = pytest.mark.peer

ATOL = 1e-5  # peftlab: sdpa over the prompt; peft: matmul + softmax; float32 rounding differs


def base(family: str = "llama", kv_heads: int = 2, layers: int = 3, **extra: Any):
    return tiny_llama(family, kv_heads, layers, **extra)


# (case name, model kwargs, config kwargs)
CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("llama-mha-len1-top1", dict(kv_heads=4), dict(adapter_len=1, adapter_layers=1)),
    ("llama-gqa-len4-top2", dict(kv_heads=2), dict(adapter_len=4, adapter_layers=2)),
    ("llama-mqa-len3-all3", dict(kv_heads=1), dict(adapter_len=3, adapter_layers=3, target_modules="self_attn")),
    ("mistral-gqa-len2-top2", dict(family="mistral", kv_heads=2), dict(adapter_len=2, adapter_layers=2)),
]
IDS = [c[0] for c in CASES]
_BASES: dict[str, torch.nn.Module] = {}


def make_base(case) -> torch.nn.Module:
    name, model_kw, _ = case
    if name not in _BASES:
        _BASES[name] = base(**model_kw)
    return copy.deepcopy(_BASES[name])


def disk_name(name: str, adapter: str = "default") -> str:
    """peft's in-memory names have no adapter name; peftlab's end with it."""
    return name.removesuffix(f".{adapter}")


def fill(model, adapter: str = "default") -> None:
    """Every prompt and gate of ``adapter`` gets values seeded by its on-disk name (equal in both libraries)."""
    for n, p in model.named_parameters():
        parts = n.split(".")
        # peft holds only the active adapter's tensors (named without adapter); peftlab names each adapter
        if parts[-1].startswith("adaption_") or (parts[-2].startswith("adaption_") and parts[-1] == adapter):
            g = torch.Generator().manual_seed(zlib.crc32(f"{adapter}:{disk_name(n, adapter)}".encode()))
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "gate" in n else 1.0))


def adapter_params(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {disk_name(n, adapter): p for n, p in model.named_parameters() if "adaption_" in n}


def build(lib: str, case, fill_it: bool = True, seed: int = 7):
    _, _, cfg_kw = case
    model = make_base(case)
    torch.manual_seed(seed)
    pm = LIBS[lib].get_peft_model(model, LIBS[lib].AdaptionPromptConfig(task_type="CAUSAL_LM", **cfg_kw))
    if fill_it:
        fill(pm)
    return pm.eval()


def logits(pm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pm(input_ids=ids).logits


IDS_IN = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fresh_adapter_is_the_same(case):
    ref, ours = build("peft", case, fill_it=False), build("peftlab", case, fill_it=False)
    assert_same_tensors(adapter_params(ours), adapter_params(ref))  # same draws of N(0, 1) prompts, same zero gates
    assert count_line(ours) == count_line(ref)
    torch.testing.assert_close(logits(ours, IDS_IN), logits(ref, IDS_IN), atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_outputs_and_generations(case):
    ref, ours = build("peft", case), build("peftlab", case)
    out = logits(ours, IDS_IN)
    assert not torch.allclose(out, logits(make_base(case), IDS_IN), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(out, logits(ref, IDS_IN), atol=ATOL, rtol=0)
    kw = dict(input_ids=IDS_IN[:, :4], max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(**kw), ref.generate(**kw))
    with ours.disable_adapter(), ref.disable_adapter():
        torch.testing.assert_close(logits(ours, IDS_IN), logits(ref, IDS_IN), atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_files_load_in_the_other_library(case, direction, tmp_path):
    writer, reader = direction.split("->")
    src = build(writer, case)
    expected = logits(src, IDS_IN)
    src.save_pretrained(tmp_path)
    loaded = LIBS[reader].PeftModel.from_pretrained(make_base(case), tmp_path)
    torch.testing.assert_close(logits(loaded, IDS_IN), expected, atol=ATOL, rtol=0)
    for k, v in adapter_params(src).items():
        assert torch.equal(adapter_params(loaded)[k], v), k


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_files(case, tmp_path):
    ref, ours = build("peft", case), build("peftlab", case)
    ref.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "peftlab")
    (t_ref, c_ref), (t_ours, c_ours) = read_files(tmp_path / "peft"), read_files(tmp_path / "peftlab")
    assert c_ours == c_ref
    assert sorted(t_ours) == sorted(t_ref)
    n_layers = case[2]["adapter_layers"]
    assert len(t_ours) == 2 * n_layers and all(k.startswith("base_model.model.model.layers.") for k in t_ours)
    assert_same_tensors(t_ours, t_ref, dtype=True)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_steps_match(case):
    batch = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(1))
    moved = {}
    for lib in LIBS:
        pm = build(lib, case, fill_it=False).train()
        opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):  # step 1 opens the gates, later steps move the prompts too
            loss = pm(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        moved[lib] = {k: v.detach().clone() for k, v in adapter_params(pm).items()}
    assert moved["peft"].keys() == moved["peftlab"].keys()
    for k in moved["peft"]:
        torch.testing.assert_close(moved["peftlab"][k], moved["peft"][k], atol=1e-5, rtol=1e-4, msg=k)
    assert any("gate" in k and v.abs().item() > 0 for k, v in moved["peftlab"].items())


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_several_adapters_both_ways(direction, tmp_path):
    writer, reader = direction.split("->")
    case = CASES[1]
    src = build(writer, case)
    torch.manual_seed(3)
    src.add_adapter("other", LIBS[writer].AdaptionPromptConfig(adapter_len=2, adapter_layers=3, task_type="CAUSAL_LM"))
    if writer == "peft":
        src.set_adapter("other")
    fill(src, "other")
    if writer == "peft":
        src.set_adapter("default")
    expected = {"default": logits(src, IDS_IN)}
    src.set_adapter("other")
    expected["other"] = logits(src, IDS_IN)
    src.set_adapter("default")
    src.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    loaded = LIBS[reader].PeftModel.from_pretrained(make_base(case), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(logits(loaded, IDS_IN), expected["default"], atol=ATOL, rtol=0)
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded, IDS_IN), expected["other"], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
# where peft 0.21.2 is wrong
# ---------------------------------------------------------------------------------------------------
def test_divergence_o_proj_bias_added_twice_by_peft():
    """peft adds o_proj(S V_P) to the module's output, which already holds o_proj's bias: with
    attention_bias=True its *fresh* adapter (gate 0) shifts every position by the bias. The paper's
    t = Linear_o(S_g V) holds the bias once; peftlab's fresh adapter is the base model exactly."""
    model = base(kv_heads=2, attention_bias=True)
    ref_out = logits(model, IDS_IN)
    outs = {}
    for lib in LIBS:
        torch.manual_seed(7)
        pm = LIBS[lib].get_peft_model(copy.deepcopy(model), LIBS[lib].AdaptionPromptConfig(
            adapter_len=2, adapter_layers=1, task_type="CAUSAL_LM")).eval()
        outs[lib] = logits(pm, IDS_IN)
    torch.testing.assert_close(outs["peftlab"], ref_out, atol=0, rtol=0)
    assert not torch.allclose(outs["peft"], ref_out, atol=1e-3)
    # the difference is exactly the extra bias: added to the top block's attention output, it changes logits
    top = model.model.layers[-1].self_attn
    handle = top.o_proj.register_forward_hook(lambda mod, inp, out: out + mod.bias)
    try:
        torch.testing.assert_close(logits(model, IDS_IN), outs["peft"], atol=1e-5, rtol=0)
    finally:
        handle.remove()


def test_divergence_head_dim_other_than_hidden_over_heads():
    """A model whose head_dim is not hidden/heads (here 16 with hidden 32 and 4 heads): peft infers the number
    of key/value heads from k_proj's in/out ratio and fails; peftlab reads head_dim from the module."""
    model = base(kv_heads=2, head_dim=16)
    with pytest.raises(RuntimeError, match="shape"):
        pm = peft.get_peft_model(copy.deepcopy(model), peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=1,
                                                                                task_type="CAUSAL_LM"))
        logits(pm, IDS_IN)
    pm = peftlab.get_peft_model(copy.deepcopy(model), peftlab.AdaptionPromptConfig(adapter_len=3, adapter_layers=1,
                                                                                  task_type="CAUSAL_LM"))
    torch.testing.assert_close(logits(pm, IDS_IN), logits(model, IDS_IN), atol=0, rtol=0)
    fill(pm)
    assert not torch.allclose(logits(pm, IDS_IN), logits(model, IDS_IN), atol=1e-3)


def test_unsupported_family_is_refused_by_both():
    from peftlab.lab.models import tiny_model

    for lib in LIBS:
        with pytest.raises(ValueError, match="(?i)unsupported model type|Llama-family"):
            LIBS[lib].get_peft_model(tiny_model("opt"), LIBS[lib].AdaptionPromptConfig(
                adapter_len=2, adapter_layers=1, task_type="CAUSAL_LM"))


def test_divergence_gpt2_accepted_by_peft_refused_by_peftlab():
    """peft 0.21.2 also wraps GPT-2's attention, but adds the prompt's read to the attention output without the
    output projection c_proj (the paper's t = Linear_o(S_g V) passes it through W_o): with c_proj's weight set
    to zero, peft's output still moves with the gate. peftlab adapts Llama-family attention only and refuses
    GPT-2, naming the families it takes and LoRA as the alternative."""
    from peftlab.lab.models import tiny_model

    model = tiny_model("gpt2").eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()  # W_o = 0 and no bias: a read that goes through c_proj adds nothing
            block.attn.c_proj.bias.zero_()
    ref_out = logits(model, IDS_IN % model.config.vocab_size)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1,
                                                                            task_type="CAUSAL_LM")).eval()
    fill(pm)
    assert not torch.allclose(logits(pm, IDS_IN % model.config.vocab_size), ref_out, atol=1e-3)
    with pytest.raises(ValueError, match=r"Llama-family models \(llama, mistral\), not model_type='gpt2'.*LoRA"):
        peftlab.get_peft_model(copy.deepcopy(model), peftlab.AdaptionPromptConfig(adapter_len=2, adapter_layers=1,
                                                                                 task_type="CAUSAL_LM"))
