"""peftlab against peft (the oracle), in both directions.

For each configuration the same tiny model is built twice under the same seed, once per library; every
trainable tensor is filled with deterministic values seeded by its name (the names are the same in both
libraries), so both adapters are identical and non-trivial. Then:

* same model, same config: the same adapted modules, trainable names, outputs and printed count line;
* layer by layer: the same ΔW, merged weights, merged/unmerged/disabled outputs;
* peftlab saves -> peft loads (no warnings) -> same outputs; peft saves -> peftlab loads -> same outputs;
* the files: the same safetensors keys and tensors, the same ``adapter_config.json`` keys and values;
* several adapters (a non-default one in a sub-folder) move both ways, with mixed batches.

Known divergences (peftlab deliberately differs) have their own tests at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from typing import Any

import pytest
import torch
from conftest import base_model, fill_trainable, output, quiet
from safetensors.torch import load_file
from torch import nn

import peftlab
from peftlab.lab.models import example_inputs

peft = pytest.importorskip("peft", reason="peft (the oracle) is not installed")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

from peftlab.tuners.base import AdapterLayer  # noqa: E402

pytestmark = pytest.mark.peer

LIBS = {"peft": peft, "peftlab": peftlab}
ATOL = 1e-6

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


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_warnings():
    """Fail on any warning other than the known FutureWarning/DeprecationWarning noise."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    real = [w for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not real, [f"{w.category.__name__}: {w.message}" for w in real]






def build(lib_name: str, model: str, kwargs: dict[str, Any], adapter_name: str = "default"):
    lib = LIBS[lib_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out corrections warn in both libraries
        pm = lib.get_peft_model(base_model(model), lib.LoraConfig(**kwargs), adapter_name=adapter_name)
    fill_trainable(pm, adapter_name)
    return pm.eval()


def inputs(model: str, batch: int = 2):
    return example_inputs(model, batch=batch)


def adapted_names(pm) -> set[str]:
    return {n for n, m in pm.get_base_model().named_modules() if isinstance(m, (BaseTunerLayer, AdapterLayer))}


def trainable_names(pm) -> set[str]:
    return {n for n, p in pm.named_parameters() if p.requires_grad}


def count_line(pm) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pm.print_trainable_parameters()
    return buf.getvalue()


def read_files(folder) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    return tensors, config


def embedding_copies(keys) -> list[str]:
    """Keys of whole base embedding matrices, which peft adds when embed_tokens/lm_head are targets."""
    return [k for k in keys if re.search(r"(embed_tokens|lm_head)\.base_layer\.weight$", k)]


def as_comparable(config: dict[str, Any]) -> dict[str, Any]:
    """peft writes sets (target_modules, modules_to_save, ...) in arbitrary order: compare lists as sets."""
    return {k: (sorted(map(str, v)) if isinstance(v, list) and k != "layers_to_transform" else v)
            for k, v in config.items()}


@pytest.fixture(scope="module")
def pair_cache():
    return {}


def pair(cache, case):
    """(peft model, peftlab model) for a case, built once per module (tests must not change them)."""
    name, model, kwargs = case
    if name not in cache:
        cache[name] = (build("peft", model, kwargs), build("peftlab", model, kwargs))
    return cache[name]


# ---------------------------------------------------------------------------------------------------
# same model, same config
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_config_same_model(case, pair_cache):
    name, model, kwargs = case
    ref, ours = pair(pair_cache, case)
    assert type(ours).__name__ == type(ref).__name__
    assert adapted_names(ours) == adapted_names(ref)
    assert trainable_names(ours) == trainable_names(ref)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert count_line(ours) == count_line(ref)
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = inputs(model)
    torch.testing.assert_close(output(ours, x), output(ref, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_print_trainable_parameters_fresh(case, capsys):
    """The printed line for a freshly made adapter (no fills), captured from stdout."""
    name, model, kwargs = case
    lines = []
    for lib in LIBS.values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lib.get_peft_model(base_model(model), lib.LoraConfig(**kwargs)).print_trainable_parameters()
        lines.append(capsys.readouterr().out)
    assert lines[0] == lines[1]
    assert lines[0].startswith("trainable params: ") and " || all params: " in lines[0]


# ---------------------------------------------------------------------------------------------------
# layer-level numerics
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_layer_numerics(case):
    name, model, kwargs = case
    ref, ours = build("peft", model, kwargs), build("peftlab", model, kwargs)
    x = inputs(model)
    unmerged = output(ref, x)
    ref_layers = {n: m for n, m in ref.get_base_model().named_modules() if isinstance(m, BaseTunerLayer)}
    our_layers = {n: m for n, m in ours.get_base_model().named_modules() if isinstance(m, AdapterLayer)}
    assert ref_layers.keys() == our_layers.keys()
    for key, layer in our_layers.items():
        ref_layer = ref_layers[key]
        assert layer.scaling["default"] == pytest.approx(ref_layer.scaling["default"], rel=1e-12), key
        assert layer.r["default"] == ref_layer.r["default"], key
        with torch.no_grad():
            torch.testing.assert_close(layer.get_delta_weight("default"), ref_layer.get_delta_weight("default"),
                                       atol=1e-7, rtol=0, msg=key)
    # merged weights and outputs
    with quiet():
        ref.merge_adapter()
    ours.merge_adapter()
    for key, layer in our_layers.items():
        ref_base = ref_layers[key].get_base_layer()
        torch.testing.assert_close(layer.get_base_layer().weight, ref_base.weight, atol=1e-7, rtol=0, msg=key)
        if getattr(ref_base, "bias", None) is not None:
            torch.testing.assert_close(layer.get_base_layer().bias, ref_base.bias, atol=1e-7, rtol=0, msg=key)
    torch.testing.assert_close(output(ours, x), output(ref, x), atol=ATOL, rtol=0)
    torch.testing.assert_close(output(ours, x), unmerged, atol=1e-5, rtol=0)
    with quiet():
        ref.unmerge_adapter()
    ours.unmerge_adapter()
    for key, layer in our_layers.items():
        torch.testing.assert_close(layer.get_base_layer().weight, ref_layers[key].get_base_layer().weight,
                                   atol=1e-7, rtol=0, msg=key)
    with quiet():
        with ref.disable_adapter():
            ref_disabled = output(ref, x)
        with ours.disable_adapter():
            our_disabled = output(ours, x)
    torch.testing.assert_close(our_disabled, ref_disabled, atol=0, rtol=0)
    # merge_and_unload: same plain model
    with quiet():
        ref_plain, our_plain = ref.merge_and_unload(), ours.merge_and_unload()
    assert {n: type(m) for n, m in our_plain.named_modules()} == {n: type(m) for n, m in ref_plain.named_modules()}
    ref_sd, our_sd = ref_plain.state_dict(), our_plain.state_dict()
    assert our_sd.keys() == ref_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(our_sd[k], ref_sd[k], atol=1e-7, rtol=0, msg=k)


# ---------------------------------------------------------------------------------------------------
# checkpoints in both directions
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peftlab_saves_peft_loads(case, pair_cache, tmp_path):
    name, model, kwargs = case
    ref, ours = pair(pair_cache, case)
    ours.save_pretrained(tmp_path)
    with no_warnings():  # no unknown config keys, no missing or unexpected adapter keys
        loaded = peft.PeftModel.from_pretrained(base_model(model), tmp_path)
    assert type(loaded).__name__ == type(ours).__name__
    x = inputs(model)
    torch.testing.assert_close(output(loaded, x), output(ours, x), atol=ATOL, rtol=0)
    ref_params = dict(loaded.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:  # every trained tensor arrived
            torch.testing.assert_close(ref_params[n], p, atol=0, rtol=0, msg=n)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_saves_peftlab_loads(case, pair_cache, tmp_path):
    name, model, kwargs = case
    ref, ours = pair(pair_cache, case)
    with quiet():
        ref.save_pretrained(tmp_path)
    with no_warnings():
        loaded = peftlab.PeftModel.from_pretrained(base_model(model), tmp_path)
    assert type(loaded).__name__ == type(ref).__name__
    x = inputs(model)
    torch.testing.assert_close(output(loaded, x), output(ref, x), atol=ATOL, rtol=0)
    our_params = dict(loaded.named_parameters())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(our_params[n], p, atol=0, rtol=0, msg=n)
    # and peftlab's reload of peft's file saves the same file again
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    first, second = read_files(tmp_path)[0], read_files(again)[0]
    assert first.keys() == second.keys()  # whole embedding matrices included, as peft writes them
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_files(case, pair_cache, tmp_path):
    name, model, kwargs = case
    ref, ours = pair(pair_cache, case)
    with quiet():
        ref.save_pretrained(tmp_path / "peft")
    with quiet():  # save_embedding_layers="auto" warns when an embedding is a target, as in peft
        ours.save_pretrained(tmp_path / "peftlab")
    ref_files = sorted(p.name for p in (tmp_path / "peft").iterdir())
    our_files = sorted(p.name for p in (tmp_path / "peftlab").iterdir())
    assert our_files == ref_files  # the model card README.md included
    ref_tensors, ref_config = read_files(tmp_path / "peft")
    our_tensors, our_config = read_files(tmp_path / "peftlab")
    assert our_tensors.keys() == ref_tensors.keys()
    for k in ref_tensors:
        assert our_tensors[k].dtype == ref_tensors[k].dtype, k
        assert torch.equal(our_tensors[k], ref_tensors[k]), k
    assert our_config.keys() == ref_config.keys()
    assert as_comparable(our_config) == as_comparable(ref_config)
    # each library reads the other's config without complaint, to the same values
    with no_warnings():
        ref_read = peft.PeftConfig.from_pretrained(str(tmp_path / "peftlab"))
        our_read = peftlab.PeftConfig.from_pretrained(tmp_path / "peft")
    assert type(ref_read).__name__ == type(our_read).__name__ == "LoraConfig"
    assert as_comparable(json.loads(json.dumps(our_read.to_dict()))) == as_comparable(
        {k: v for k, v in our_config.items()})


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loading_for_training_trains_the_same_tensors(case, pair_cache, tmp_path):
    """``is_trainable=True``: the same tensors train in both libraries, and the count lines agree."""
    name, model, kwargs = case
    ref, ours = pair(pair_cache, case)
    ours.save_pretrained(tmp_path)
    with quiet():
        ref_loaded = peft.PeftModel.from_pretrained(base_model(model), tmp_path, is_trainable=True)
    our_loaded = peftlab.PeftModel.from_pretrained(base_model(model), tmp_path, is_trainable=True)
    assert trainable_names(our_loaded) == trainable_names(ref_loaded) == trainable_names(ours)
    assert count_line(our_loaded) == count_line(ref_loaded)
    frozen = peftlab.PeftModel.from_pretrained(base_model(model), tmp_path)  # for inference: nothing trains
    assert not trainable_names(frozen)
    if kwargs.get("bias", "none") == "none":  # see test_divergence_inference_load_freezes_biases
        with quiet():
            assert not trainable_names(peft.PeftModel.from_pretrained(base_model(model), tmp_path))


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
    assert adapted_names_plain(ours) == adapted_names_plain(ref)
    for m in (ref, ours):
        fill_trainable(m)
    with quiet():
        ref_sd = peft.get_peft_model_state_dict(ref)
    with quiet():
        our_sd = peftlab.get_peft_model_state_dict(ours)  # the injected model holds its configs, as in peft
    assert our_sd.keys() == ref_sd.keys()
    assert not any(k.startswith("base_model.model.") for k in our_sd)
    x = inputs(model)
    torch.testing.assert_close(output(ours.eval(), x), output(ref.eval(), x), atol=ATOL, rtol=0)


def adapted_names_plain(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AdapterLayer))}


# ---------------------------------------------------------------------------------------------------
# several adapters, a non-default one in a sub-folder
# ---------------------------------------------------------------------------------------------------
MULTI = ("llama", dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
         dict(target_modules=["v_proj", "o_proj", "up_proj"], r=4, lora_alpha=16, task_type="CAUSAL_LM"),
         dict(target_modules=r".*layers\.1\.mlp\.(gate|down)_proj", r=2, use_rslora=True, task_type="CAUSAL_LM"))
MULTI_MLP = ("mlp", dict(target_modules=["lin0"], modules_to_save=["lin1"]),
             dict(target_modules=["lin0"], r=3, lora_alpha=6, modules_to_save=["lin1"]), dict(target_modules=["lin0"], modules_to_save=["lin1"], r=2))


def build_multi(lib_name: str, spec):
    model, first, second, third = spec
    pm = build(lib_name, model, first)
    lib = LIBS[lib_name]
    for adapter, kwargs in (("second", second), ("third", third)):
        pm.add_adapter(adapter, lib.LoraConfig(**kwargs))
        fill_trainable(pm, adapter)
    return pm.eval()


def run_each(pm, x) -> dict[str, torch.Tensor]:
    outs = {}
    for adapter in ("default", "second", "third"):
        pm.set_adapter(adapter)
        outs[adapter] = output(pm, x)
    pm.set_adapter("default")
    return outs


@pytest.mark.parametrize("spec", [MULTI, MULTI_MLP], ids=["llama", "mlp-modules-to-save"])
@pytest.mark.parametrize("direction", ["peftlab->peft", "peft->peftlab"])
def test_several_adapters_both_ways(spec, direction, tmp_path):
    src, dst = direction.split("->")
    saver = build_multi(src, spec)
    model = spec[0]
    x = inputs(model, batch=4)
    expected = run_each(saver, x)
    with quiet():
        saver.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    for sub in ("second", "third"):
        assert (tmp_path / sub / "adapter_model.safetensors").is_file()
    lib = LIBS[dst]
    with no_warnings():
        loaded = lib.PeftModel.from_pretrained(base_model(model), tmp_path)
        loaded.load_adapter(tmp_path / "second", adapter_name="second")
        loaded.load_adapter(str(tmp_path), adapter_name="third", subfolder="third")
    got = run_each(loaded, x)
    for adapter in expected:
        torch.testing.assert_close(got[adapter], expected[adapter], atol=ATOL, rtol=0, msg=adapter)
    names = ["third", "__base__", "default", "second"]
    with quiet():
        mixed_src = output(saver, x, adapter_names=names)
    mixed_dst = output(loaded, x, adapter_names=names)
    torch.testing.assert_close(mixed_dst, mixed_src, atol=ATOL, rtol=0)
    for row, adapter in enumerate(names):
        if adapter != "__base__":
            torch.testing.assert_close(mixed_dst[row], expected[adapter][row], atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec", [MULTI, MULTI_MLP], ids=["llama", "mlp-modules-to-save"])
def test_several_adapters_same_folders(spec, tmp_path):
    ref, ours = build_multi("peft", spec), build_multi("peftlab", spec)
    with quiet():
        ref.save_pretrained(tmp_path / "peft")
        ref.save_pretrained(tmp_path / "peft-sel", selected_adapters=["second"])
    ours.save_pretrained(tmp_path / "peftlab")
    ours.save_pretrained(tmp_path / "peftlab-sel", selected_adapters=["second"])

    def tree(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != "README.md")

    assert tree(tmp_path / "peftlab") == tree(tmp_path / "peft")
    assert tree(tmp_path / "peftlab-sel") == tree(tmp_path / "peft-sel")
    for sub in ("", "second", "third"):
        ref_t, ref_c = read_files(tmp_path / "peft" / sub)
        our_t, our_c = read_files(tmp_path / "peftlab" / sub)
        assert our_t.keys() == ref_t.keys()
        assert all(torch.equal(our_t[k], ref_t[k]) for k in ref_t)
        assert as_comparable(our_c) == as_comparable(ref_c)


def test_adapter_names_in_generate_match_peft():
    """Mixed batches through ``generate``: greedy tokens per row equal peft's."""
    ref, ours = build_multi("peft", MULTI), build_multi("peftlab", MULTI)
    x = inputs("llama", batch=3)
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
    models = {lib: build_multi(lib, MULTI_MLP) for lib in LIBS}
    x = inputs("mlp")
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
    x = inputs("llama")
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
    x = inputs("mlp", batch=3)
    names = ["default", "second", "__base__"]
    ref_alone = run_each_of(models["peft"], x, ["default", "second"])
    models["peft"].set_adapter("default")
    with pytest.raises(KeyError, match="second"), quiet():
        output(models["peft"], x, adapter_names=names)
    ours = models["peftlab"]
    mixed = output(ours, x, adapter_names=names)
    alone = run_each_of(ours, x, ["default", "second"])
    torch.testing.assert_close(mixed[0], alone["default"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], alone["second"][1], atol=ATOL, rtol=0)
    for adapter in alone:  # run one adapter at a time, the two libraries agree
        torch.testing.assert_close(alone[adapter], ref_alone[adapter], atol=ATOL, rtol=0)


def run_each_of(pm, x, adapters) -> dict[str, torch.Tensor]:
    outs = {}
    with quiet():
        for adapter in adapters:
            pm.set_adapter(adapter)
            outs[adapter] = output(pm, x)
    return outs


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
