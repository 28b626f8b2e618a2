"""peftlab's LoRA against peft (the oracle), in both directions.

The shared harness (``tests/interop.py``) runs every case: the same modules, trainable tensors, outputs and
count line; layer by layer the same ΔW, merged weights, merged/unmerged/disabled outputs and unloaded model;
peftlab saves -> peft loads (no warnings) and the reverse, with the same outputs; the same files (tensors,
``adapter_config.json``); loading for training trains the same tensors. This file adds LoRA's own checks:
the printed line of a fresh adapter, ``inject_adapter_in_model``, several adapters with mixed batches (in
``generate`` too), deleting adapters, whole embedding matrices in the file.

Known divergences (peftlab deliberately differs) have their own tests at the end.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch
from conftest import base_model, fill_trainable, output, quiet
from interop import DIRECTIONS, LIBS, Interop, peft, read_files, run_each, trainable_names, tuner_layers
from torch import nn

import peftlab

pytestmark = pytest.mark.peer

H = Interop("Lora", prefixes=("lora_",), atol=1e-6, weight_atol=1e-7, delta_tol=(1e-7, 0.0), merged_atol=1e-5,
            init_key="init_lora_weights", file_markers={"Lora": "lora_A"})
ATOL = H.atol

# (case name, tiny model, LoraConfig kwargs)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("mlp-regex", "mlp", dict(target_modules=r"lin\d")),
    ("mlp-all-linear", "mlp", dict(target_modules="all-linear")),
    ("mlp-exclude", "mlp", dict(target_modules=["lin0", "lin1"], exclude_modules=["lin1"])),
    ("mlp-rank-alpha-pattern", "mlp", dict(target_modules=["lin0", "lin1"], r=6, lora_alpha=12,
                                           rank_pattern={"lin1": 2}, alpha_pattern={"lin0": 3})),
    ("mlp-rslora", "mlp", dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, use_rslora=True)),
    ("mlp-lora-bias", "mlp", dict(target_modules=["lin0", "lin1"], lora_bias=True, lora_alpha=16)),
    ("mlp-modules-to-save", "mlp", dict(target_modules=["lin0"], modules_to_save=["lin1"])),
    ("mlp-bias-all", "mlp", dict(target_modules=["lin0"], bias="all")),
    ("mlp-bias-lora-only", "mlp", dict(target_modules=["lin0"], bias="lora_only")),
    ("mlp-bias-all-mts", "mlp", dict(target_modules=["lin0"], bias="all", modules_to_save=["lin1"])),
    ("emb-conv1d", "emb_conv1d", dict(target_modules=["emb", "conv1d"])),
    ("conv1d", "conv1d", dict(target_modules=["conv1d", "lin0"], r=2, lora_alpha=5)),
    ("conv2d", "conv2d", dict(target_modules=["conv2d"], r=4, lora_alpha=2, lora_bias=True)),
    ("llama-all-linear", "llama", dict(target_modules="all-linear", task_type="CAUSAL_LM", r=4)),
    ("llama-layers", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1],
                                   layers_pattern="layers", task_type="CAUSAL_LM")),
    ("llama-embed-patterns", "llama", dict(target_modules=["embed_tokens", "q_proj", "o_proj"],
                                           rank_pattern={"o_proj": 2},
                                           alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32},
                                           task_type="CAUSAL_LM")),
    ("gpt2-conv1d", "gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM",
                                 bias="lora_only")),
    ("gpt2-cls", "gpt2_cls", dict(target_modules=["c_attn"], fan_in_fan_out=True, task_type="SEQ_CLS")),
    ("opt-layer-int-bias-all", "opt", dict(target_modules=["q_proj", "v_proj", "fc2"], layers_to_transform=0,
                                           task_type="CAUSAL_LM", bias="all")),
    ("t5-seq2seq", "t5", dict(target_modules=["q", "v", "wo"], task_type="SEQ_2_SEQ_LM", use_rslora=True, r=4)),
    ("bert-cls", "bert_cls", dict(target_modules=["query", "value"], task_type="SEQ_CLS", lora_dropout=0.1)),
    ("bert-regex-feature", "bert", dict(target_modules=r".*attention\.self\.(query|key)",
                                        task_type="FEATURE_EXTRACTION")),
    # initialisations that read the base weight (the residual base must match too)
    ("mlp-gaussian", "mlp", dict(target_modules=["lin0", "lin1"], init_lora_weights="gaussian", r=4)),
    ("mlp-olora", "mlp", dict(target_modules=["lin0"], r=4, lora_alpha=16, init_lora_weights="olora")),
    ("llama-pissa-rslora", "llama", dict(target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8,
                                         use_rslora=True, init_lora_weights="pissa", task_type="CAUSAL_LM")),
    ("gpt2-pissa", "gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights="pissa",
                                task_type="CAUSAL_LM")),
]
IDS = [c[0] for c in CASES]


globals().update(H.case_tests(CASES, "test_same_config_same_model", "test_layer_numerics",
                              "test_peftlab_saves_peft_loads", "test_peft_saves_peftlab_loads", "test_same_files",
                              "test_loading_for_training_trains_the_same_tensors"))


def build(lib: str, model: str, kwargs: dict[str, Any]):
    return H.build(lib, ("-", model, kwargs))


def embedding_copies(keys) -> list[str]:
    """Keys of whole base embedding matrices, which peft adds when embed_tokens/lm_head are targets."""
    return [k for k in keys if re.search(r"(embed_tokens|lm_head)\.base_layer\.weight$", k)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_print_trainable_parameters_fresh(case, capsys):
    """The printed line for a freshly made adapter (no fills), captured from stdout."""
    name, model, kwargs = case
    lines = []
    for lib in LIBS.values():
        with quiet():
            lib.get_peft_model(base_model(model), lib.LoraConfig(**kwargs)).print_trainable_parameters()
        lines.append(capsys.readouterr().out)
    assert lines[0] == lines[1]
    assert lines[0].startswith("trainable params: ") and " || all params: " in lines[0]


@pytest.mark.parametrize("case", [c for c in CASES if c[1] in ("mlp", "llama", "gpt2")],
                         ids=[c[0] for c in CASES if c[1] in ("mlp", "llama", "gpt2")])
def test_inject_adapter_in_model(case):
    """Adapters put into the plain model (no PeftModel around it): the same module names and tensors, and
    the adapter state dict without the ``base_model.model.`` prefix."""
    name, model, kwargs = case
    kwargs = {k: v for k, v in kwargs.items() if k != "task_type"}
    injected = {}
    for lib_name, lib in LIBS.items():
        with quiet():
            injected[lib_name] = lib.inject_adapter_in_model(lib.LoraConfig(**kwargs), base_model(model))
    ref, ours = injected["peft"], injected["peftlab"]
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert tuner_layers(ours).keys() == tuner_layers(ref).keys()
    for m in (ref, ours):
        fill_trainable(m)
    with quiet():
        ref_sd = peft.get_peft_model_state_dict(ref)
    with quiet():
        our_sd = peftlab.get_peft_model_state_dict(ours)  # the injected model holds its configs, as in peft
    assert our_sd.keys() == ref_sd.keys()
    assert not any(k.startswith("base_model.model.") for k in our_sd)
    x = H.inputs(model)
    torch.testing.assert_close(output(ours.eval(), x), output(ref.eval(), x), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
# several adapters, a non-default one in a sub-folder
# ---------------------------------------------------------------------------------------------------
MULTI = ("llama", "llama", [
    dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    dict(target_modules=["v_proj", "o_proj", "up_proj"], r=4, lora_alpha=16, task_type="CAUSAL_LM"),
    dict(target_modules=r".*layers\.1\.mlp\.(gate|down)_proj", r=2, use_rslora=True, task_type="CAUSAL_LM")])
MULTI_MLP = ("mlp-modules-to-save", "mlp", [
    dict(target_modules=["lin0"], modules_to_save=["lin1"]),
    dict(target_modules=["lin0"], r=3, lora_alpha=6, modules_to_save=["lin1"]),
    dict(target_modules=["lin0"], modules_to_save=["lin1"], r=2)])


@pytest.mark.parametrize("spec", [MULTI, MULTI_MLP], ids=["llama", "mlp-modules-to-save"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_several_adapters_both_ways(spec, direction, tmp_path):
    """Mixed batches (``adapter_names``) too, in both libraries."""
    H.check_several_adapters_both_ways(spec, direction, tmp_path, mixed="both")


@pytest.mark.parametrize("spec", [MULTI, MULTI_MLP], ids=["llama", "mlp-modules-to-save"])
def test_several_adapters_same_folders(spec, tmp_path):
    H.check_several_adapters_same_folders(spec, tmp_path)


def test_adapter_names_in_generate_match_peft():
    """Mixed batches through ``generate``: greedy tokens per row equal peft's."""
    ref, ours = H.build_multi("peft", MULTI), H.build_multi("peftlab", MULTI)
    x = H.inputs("llama", batch=3)
    kwargs = dict(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=4,
                  do_sample=False, pad_token_id=0)
    names = ["second", "__base__", "default"]
    with quiet(), torch.no_grad():
        ref_tokens = ref.generate(**kwargs, adapter_names=names)
        our_tokens = ours.generate(**kwargs, adapter_names=names)
    assert torch.equal(our_tokens, ref_tokens)


# ---------------------------------------------------------------------------------------------------
# known divergences: peftlab deliberately differs from peft 0.21.2
# ---------------------------------------------------------------------------------------------------
class DilatedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, dilation=2, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_divergence_conv_lora_keeps_dilation():
    """peft builds lora_A without the base conv's dilation (issue #3697), so a dilated conv's LoRA branch has
    another output size and the forward fails; peftlab copies dilation, and its forward equals the conv with
    W + ΔW (the merged model)."""
    x = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    models = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(0)
        pm = lib.get_peft_model(DilatedConv(), lib.LoraConfig(target_modules=["conv"], init_lora_weights=False))
        models[lib_name] = pm.eval()
    ref_A = models["peft"].base_model.model.conv.lora_A["default"]
    our_A = models["peftlab"].base_model.model.conv.lora_A["default"]
    assert ref_A.dilation == (1, 1) and our_A.dilation == (2, 2)
    with pytest.raises(RuntimeError):
        models["peft"](x)
    ours = models["peftlab"]
    unmerged = output(ours, x)
    layer = ours.base_model.model.conv
    conv = layer.get_base_layer()
    expected = torch.nn.functional.conv2d(x, conv.weight + layer.get_delta_weight("default"), conv.bias,
                                          padding=2, dilation=2)
    torch.testing.assert_close(unmerged, expected, atol=1e-5, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(output(ours, x), unmerged, atol=1e-5, rtol=0)


def test_deleting_the_active_adapter_as_peft():
    """Deleting the active adapter activates the first remaining one by name, with peft's warning; deleting the
    last one leaves no active adapter and the base model's outputs."""
    models = {lib: H.build_multi(lib, MULTI_MLP) for lib in LIBS}
    x = H.inputs("mlp")
    for lib, pm in models.items():
        with pytest.warns(UserWarning, match="was active which is now deleted"):
            pm.delete_adapter("default")
        assert "default" not in pm.peft_config and pm.active_adapter == "second", lib
    torch.testing.assert_close(output(models["peftlab"], x), output(models["peft"], x), atol=ATOL, rtol=0)
    for pm in models.values():
        with quiet():
            for name in sorted(pm.peft_config):
                pm.delete_adapter(name)
        assert pm.peft_config == {} and pm.active_adapters == []
    torch.testing.assert_close(output(models["peftlab"], x), output(base_model("mlp"), x), atol=0, rtol=0)


def test_embedding_matrices_saved_as_peft(tmp_path):
    """With embed_tokens (or lm_head) in target_modules, save_embedding_layers="auto" writes the whole base
    embedding matrix into the adapter file with a warning, as peft does; False leaves it out; a changed matrix
    in the file is loaded into the base."""
    kwargs = dict(target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM")
    ref, ours = build("peft", "llama", kwargs), build("peftlab", "llama", kwargs)
    with quiet():
        ref.save_pretrained(tmp_path / "peft")
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        ours.save_pretrained(tmp_path / "peftlab")
    ref_keys = set(read_files(tmp_path / "peft")[0])
    our_keys = set(read_files(tmp_path / "peftlab")[0])
    assert embedding_copies(ref_keys) == ["base_model.model.model.embed_tokens.base_layer.weight"]
    assert our_keys == ref_keys
    ours.save_pretrained(tmp_path / "without", save_embedding_layers=False)
    assert set(read_files(tmp_path / "without")[0]) == ref_keys - set(embedding_copies(ref_keys))
    changed = tmp_path / "changed"
    changed.mkdir()
    tensors = read_files(tmp_path / "peft")[0]
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] += 1.0
    from safetensors.torch import save_file
    save_file(tensors, str(changed / "adapter_model.safetensors"), metadata={"format": "pt"})
    (changed / "adapter_config.json").write_text((tmp_path / "peft" / "adapter_config.json").read_text())
    x = H.inputs("llama")
    with quiet():
        ref_loaded = peft.PeftModel.from_pretrained(base_model("llama"), changed)
    our_loaded = peftlab.PeftModel.from_pretrained(base_model("llama"), changed)
    torch.testing.assert_close(output(our_loaded, x), output(ref_loaded, x), atol=ATOL, rtol=0)
    assert not torch.allclose(output(our_loaded, x), output(ours, x), atol=1e-3)


def test_divergence_mixed_batch_with_modules_to_save_of_one_adapter():
    """Rows routed to an adapter that has no copy of a modules_to_save module: peft 0.21.2 raises KeyError
    in the wrapper's mixed-batch forward; peftlab runs those rows through the original module, which is
    what the same adapter computes when it is active on its own."""
    first = dict(target_modules=["lin0"], modules_to_save=["lin1"])
    second = dict(target_modules=["lin0"], r=2)
    models = {}
    for lib_name in LIBS:
        pm = build(lib_name, "mlp", first)
        pm.add_adapter("second", LIBS[lib_name].LoraConfig(**second))
        fill_trainable(pm, "second")
        models[lib_name] = pm.eval()
    x = H.inputs("mlp", batch=3)
    names = ["default", "second", "__base__"]
    ref_alone = run_each(models["peft"], x, ["default", "second"])
    models["peft"].set_adapter("default")
    with pytest.raises(KeyError, match="second"), quiet():
        output(models["peft"], x, adapter_names=names)
    ours = models["peftlab"]
    mixed = output(ours, x, adapter_names=names)
    alone = run_each(ours, x, ["default", "second"])
    torch.testing.assert_close(mixed[0], alone["default"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], alone["second"][1], atol=ATOL, rtol=0)
    for adapter in alone:  # run one adapter at a time, the two libraries agree
        torch.testing.assert_close(alone[adapter], ref_alone[adapter], atol=ATOL, rtol=0)


def test_divergence_inference_load_freezes_biases(tmp_path):
    """Loaded for inference (``is_trainable=False``), an adapter with bias="all"/"lora_only" leaves the base
    biases trainable in peft 0.21.2 (an optimizer built on the model would change them); in peftlab
    nothing of a model loaded for inference trains."""
    for bias, expected in (("all", {"base_model.model.lin0.base_layer.bias", "base_model.model.lin1.bias"}),
                           ("lora_only", {"base_model.model.lin0.base_layer.bias"})):
        folder = tmp_path / bias
        build("peftlab", "mlp", dict(target_modules=["lin0"], bias=bias)).save_pretrained(folder)
        with quiet():
            ref = peft.PeftModel.from_pretrained(base_model("mlp"), folder)
        ours = peftlab.PeftModel.from_pretrained(base_model("mlp"), folder)
        assert ref.peft_config["default"].inference_mode and ours.peft_config["default"].inference_mode
        assert trainable_names(ref) == expected
        assert trainable_names(ours) == set()


def test_divergence_config_lists_are_sorted(tmp_path):
    """peft writes set-valued config entries in set iteration order (unstable across processes); peftlab
    writes them sorted. The two files hold the same sets."""
    kwargs = dict(target_modules=["v_proj", "q_proj", "o_proj", "k_proj"], task_type="CAUSAL_LM")
    ours = build("peftlab", "llama", kwargs)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(kwargs["target_modules"])
    ref = build("peft", "llama", kwargs)
    assert set(ref.peft_config["default"].target_modules) == set(config["target_modules"])
