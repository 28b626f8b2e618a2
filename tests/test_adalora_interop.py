"""AdaLoRA against peft (the oracle), in both directions.

For each configuration the same tiny model is built twice, once per library, under one seed:

* the fresh adapters are tensor for tensor the same (both libraries draw Q, Λ, P in the same order);
* trained for ``total_step`` steps on the same batch with the allocation after every step, both end with the
  same rank pattern (including the final budget) and the same tensors;
* each library's files load in the other with the same outputs; the files hold the same tensors (cut to the
  kept triplets) and the same config keys and ``rank_pattern``;
* hand-made patterns with modules pruned to rank 0 travel both ways.

Differences pinned here: peft counts one frozen ``ranknum`` tensor per layer in "all params" (peftlab keeps
r₀ as a plain number); peft crashes on a loss from a loaded (inference-mode) AdaLoRA model, peftlab computes it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import base_model, output, quiet
from interop import DIRECTIONS, LIBS, Interop, assert_same_tensors, count_line, peft, read_files
from safetensors.torch import load_file

import peftlab
from peftlab.lab.models import example_inputs

pytestmark = pytest.mark.peer

H = Interop("AdaLora", prefixes=("lora_",), atol=1e-5)
ATOL = H.atol

# (case name, tiny model, config kwargs); every case runs its full schedule in a few steps
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("llama-qv-down", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], init_r=6, target_r=3,
                                    tinit=2, tfinal=2, total_step=10, task_type="CAUSAL_LM")),
    ("mlp-alpha-deltaT", "mlp", dict(target_modules=["lin0", "lin1"], init_r=4, target_r=2, lora_alpha=16, tinit=1,
                                     tfinal=1, deltaT=2, total_step=9)),
    ("gpt2-conv1d", "gpt2", dict(target_modules=["c_attn", "c_proj"], init_r=4, target_r=2, tinit=1, tfinal=2,
                                 total_step=8, fan_in_fan_out=True, orth_reg_weight=0.1, task_type="CAUSAL_LM")),
    ("conv2d-lin", "conv2d", dict(target_modules=["conv2d", "lin0"], init_r=3, target_r=1, tinit=1, tfinal=1,
                                  total_step=8)),
    ("t5-seq2seq-beta", "t5", dict(target_modules=["q", "v"], init_r=4, target_r=2, tinit=2, tfinal=2, total_step=9,
                                   beta1=0.7, beta2=0.9, task_type="SEQ_2_SEQ_LM")),
    ("bert-cls-mts", "bert_cls", dict(target_modules=["query", "value"], init_r=5, target_r=2, tinit=1, tfinal=1,
                                      total_step=8, task_type="SEQ_CLS")),
]
IDS = [c[0] for c in CASES]


def build(lib: str, model: str, kwargs: dict[str, Any]):
    """A fresh adapter (no fills: AdaLoRA's own initialisation, drawn under one seed)."""
    return H.build(lib, ("-", model, kwargs), fill=False)


def loss_of(pm, model: str) -> torch.Tensor:
    x = example_inputs(model, batch=4)
    if isinstance(x, torch.Tensor):  # a toy: no loss of its own, so no penalty in either library
        return pm(x).pow(2).mean()
    return pm(**x).loss


def run_training(pm, model: str, steps: int) -> None:
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    pm.train()
    for step in range(steps):
        torch.manual_seed(step)  # the models' own dropout draws the same masks in both libraries
        loss_of(pm, model).backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.eval()


def inference_inputs(model: str):
    x = example_inputs(model, batch=2)
    if isinstance(x, dict):
        x = {k: v for k, v in x.items() if k != "labels"}
        if model == "t5":
            x["decoder_input_ids"] = x["input_ids"][:, :4]
    return x


def trained_pair(cache, case):
    name, model, kwargs = case
    if name not in cache:
        ref, ours = build("peft", model, kwargs), build("peftlab", model, kwargs)
        for pm in (ref, ours):
            with quiet():
                run_training(pm, model, kwargs["total_step"])
        cache[name] = (ref, ours)
    return cache[name]


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fresh_adapter_is_the_same(case):
    name, model, kwargs = case
    ref, ours = build("peft", model, kwargs), build("peftlab", model, kwargs)
    ref_p, our_p = H.adapter_params(ref), H.adapter_params(ours)
    assert_same_tensors(our_p, ref_p)
    # the same trainable count; peft's "all params" also counts a frozen ranknum tensor per layer
    (t_ref, all_ref), (t_ours, all_ours) = ref.get_nb_trainable_parameters(), ours.get_nb_trainable_parameters()
    n_layers = sum(1 for n in ref_p if n.split(".")[-2] == "lora_E")
    assert t_ours == t_ref and all_ref - all_ours == n_layers
    assert count_line(ours).startswith(f"trainable params: {t_ref:,d} ")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_training_gives_the_same_rank_pattern(case, pair_cache):
    """Same start, same batches, allocation after every step: the same pattern (final budget included) and
    the same tensors."""
    name, model, kwargs = case
    ref, ours = trained_pair(pair_cache, case)
    pattern_ref, pattern_ours = ref.peft_config["default"].rank_pattern, ours.peft_config["default"].rank_pattern
    assert pattern_ours == pattern_ref
    n_layers = len(pattern_ours)
    assert sum(map(sum, pattern_ours.values())) == kwargs["target_r"] * n_layers
    if n_layers > 2:
        assert len({sum(v) for v in pattern_ours.values()}) > 1  # the budget moved between modules
    ref_p, our_p = H.adapter_params(ref), H.adapter_params(ours)
    for k in ref_p:
        torch.testing.assert_close(our_p[k], ref_p[k], atol=1e-4, rtol=1e-3, msg=k)
    torch.testing.assert_close(output(ours, inference_inputs(model)), output(ref, inference_inputs(model)),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_files_load_in_the_other_library(case, direction, pair_cache, tmp_path):
    name, model, kwargs = case
    ref, ours = trained_pair(pair_cache, case)
    src, dst_lib = (ours, "peft") if direction == "peftlab->peft" else (ref, "peftlab")
    src.save_pretrained(tmp_path / "src")
    with quiet():
        loaded = LIBS[dst_lib].PeftModel.from_pretrained(base_model(model), tmp_path / "src")
    x = inference_inputs(model)
    torch.testing.assert_close(output(loaded, x), output(src, x), atol=ATOL, rtol=0)
    # the same files, whoever writes them
    other = ref if src is ours else ours
    other.save_pretrained(tmp_path / "other")
    (t_src, c_src), (t_other, c_other) = read_files(tmp_path / "src"), read_files(tmp_path / "other")
    assert {k: tuple(v.shape) for k, v in t_src.items()} == {k: tuple(v.shape) for k, v in t_other.items()}
    assert set(c_src) == set(c_other)
    assert c_src["rank_pattern"] == c_other["rank_pattern"]
    assert all(not k.endswith(".default") for k in c_src["rank_pattern"])


@pytest.mark.parametrize("writer", ["peft", "peftlab"])
def test_rank_zero_modules_travel_both_ways(writer, tmp_path):
    """A pattern that prunes whole modules to rank 0 (and keeps one whole): the file has (0, in)/(out, 0)
    tensors, and the other library loads it to the same outputs."""
    kwargs = dict(target_modules=["q_proj", "v_proj", "down_proj"], init_r=4, target_r=2, total_step=10,
                  task_type="CAUSAL_LM")
    pm = build(writer, "llama", kwargs)
    for n, p in pm.named_parameters():
        if ".lora_E." in n:
            torch.nn.init.normal_(p, std=0.5)
    keys = sorted(n.removesuffix(".lora_E.default").removeprefix("base_model.model.")
                  for n, _ in pm.named_parameters() if ".lora_E." in n)
    masks = [[False] * 4, [True] * 4, [True, False, False, True]]
    pattern = {f"{k}.lora_E.default": masks[i % 3] for i, k in enumerate(keys)}
    pm.peft_config["default"].rank_pattern = pattern
    with torch.no_grad():
        for n, p in pm.named_parameters():
            key = n.removeprefix("base_model.model.")
            if key in pattern:
                p.masked_fill_(~torch.tensor(pattern[key]).view(-1, 1), 0.0)
    pm.eval()
    pm.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors[f"base_model.model.{keys[0]}.lora_A"].shape == (0, 64)  # layers.0.mlp.down_proj
    assert tensors[f"base_model.model.{keys[0]}.lora_B"].shape == (32, 0)
    reader = "peftlab" if writer == "peft" else "peft"
    with quiet():
        loaded = LIBS[reader].PeftModel.from_pretrained(base_model("llama"), tmp_path)
    x = inference_inputs("llama")
    torch.testing.assert_close(output(loaded, x), output(pm, x), atol=ATOL, rtol=0)


def test_loss_of_a_loaded_adapter(tmp_path):
    """A loaded adapter (inference mode) computes a loss in peftlab (no penalty: nothing trains); peft 0.21.2
    fails with an AttributeError (its forward looks up a trainable adapter that does not exist)."""
    kwargs = dict(target_modules=["q_proj"], init_r=2, target_r=1, total_step=10, task_type="CAUSAL_LM")
    build("peftlab", "llama", kwargs).save_pretrained(tmp_path)
    x = example_inputs("llama", batch=2)
    with quiet():
        ours = peftlab.PeftModel.from_pretrained(base_model("llama"), tmp_path)
        ref = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    torch.testing.assert_close(ours(**x).loss, base_model("llama")(**x).loss)
    with pytest.raises(AttributeError, match="trainable_adapter_name"):
        ref(**x)
