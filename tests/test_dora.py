"""DoRA: the magnitude vector, the fast detached norm, the fused forward/backward, merging, and peft as oracle.

* m starts at ‖W + s·B A‖ per output feature; the low-rank identity gives the same norm as materialising
  W + s·B A (Linear, GPT-2 Conv1D, 4-bit base);
* the forward equals (m/‖W + s·B A‖)·(W x + s·B A x) + b and peft's forward; with dropout, peft's form;
* gradients reach m, A and B; the norm is detached (its gradient path is absent); the fused backward
  passes ``gradcheck`` and equals autograd through the reference formula;
* merge / unmerge are exact within float32 round-off, also under plain LoRA adapters merged first;
* the file holds ``...lora_magnitude_vector`` (no ``.weight``), like peft's, and adapters move both ways;
* several active DoRA adapters act in order and merge to the same model, as in peft;
* mixed batches work.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import base_model, fill_params, output
from safetensors.torch import load_file
from torch import nn

import peftlab
from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.lab.models import example_inputs
from peftlab.quantization import quantize_model
from peftlab.tuners.lora import dora

peft = pytest.importorskip("peft", reason="peft (the oracle) is not installed")

LIBS = {"peft": peft, "peftlab": peftlab}
# (case, tiny model, LoraConfig kwargs)
CASES = [
    ("mlp", "mlp", dict(target_modules=["lin0", "lin1"], use_dora=True)),
    ("mlp-rslora-r2", "mlp", dict(target_modules=["lin0"], use_dora=True, r=2, lora_alpha=6, use_rslora=True)),
    ("llama", "llama", dict(target_modules=["q_proj", "v_proj", "o_proj"], use_dora=True, task_type="CAUSAL_LM")),
    ("gpt2-conv1d", "gpt2", dict(target_modules=["c_attn", "c_proj"], use_dora=True, fan_in_fan_out=True,
                                 task_type="CAUSAL_LM")),
    ("bert-bias-all", "bert", dict(target_modules=["query", "value"], use_dora=True, bias="all")),
    ("mlp-pissa", "mlp", dict(target_modules=["lin0"], use_dora=True, r=4, init_lora_weights="pissa")),
]
IDS = [c[0] for c in CASES]



def canonical(name: str) -> str:
    """peft and peftlab hold m under the same name (``...lora_magnitude_vector.<adapter>.weight``)."""
    return name



def build(lib_name: str, model: str, kwargs: dict, filled: bool = True):
    lib = LIBS[lib_name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = lib.get_peft_model(base_model(model), lib.LoraConfig(**kwargs))
    if filled:
        fill_params(pm, lambda n, p: p.requires_grad, canonical)
    return pm.eval()


def dora_layers(pm) -> dict[str, nn.Module]:
    return {n: m for n, m in pm.get_base_model().named_modules()
            if isinstance(m, peftlab.tuners.lora.Linear) and m.lora_variant}


def reference_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """(m/‖W + s·B A‖)·(W x + s·B A x) + b, everything materialised, the norm detached."""
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    W = layer._base_weight()
    W = W.T if layer.fan_in_fan_out else W
    V = W + s * B @ A
    n = torch.linalg.norm(V, dim=1).detach()
    return (layer.lora_magnitude_vector["default"].weight / n) * F.linear(x, V) + (0 if layer.bias is None else layer.bias)


# ---------------------------------------------------------------------------------------------------
# the magnitude, the norm, the forward
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_magnitude_initialised_to_row_norms(case):
    _, model, kwargs = case
    pm = build("peftlab", model, kwargs, filled=False)
    for key, layer in dora_layers(pm).items():
        m = layer.lora_magnitude_vector["default"].weight
        assert m.shape == (layer.out_features,) and m.requires_grad, key
        torch.testing.assert_close(m, dora.reference_weight_norm(layer, "default"), atol=1e-5, rtol=1e-6, msg=key)
    # W' = W at init: the output is the original model's (PiSSA + DoRA included: W_res + s·B₀A₀ = W)
    x = example_inputs(model)
    torch.testing.assert_close(output(pm, x), output(base_model(model), x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fast_norm_equals_reference_and_forward_equals_formula(case):
    _, model, kwargs = case
    pm = build("peftlab", model, kwargs)
    layers = dora_layers(pm)
    assert layers
    for key, layer in layers.items():
        n = dora.weight_norm(layer, "default")
        assert not n.requires_grad
        torch.testing.assert_close(n, dora.reference_weight_norm(layer, "default"), atol=1e-5, rtol=1e-5, msg=key)
        x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=1e-5, rtol=1e-5, msg=key)


def test_norm_identity_on_a_4bit_base():
    model = quantize_model(base_model("llama"))
    pm = get_peft_model(model, LoraConfig(target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM"))
    fill_params(pm, lambda n, p: p.requires_grad, canonical)
    for key, layer in dora_layers(pm).items():
        torch.testing.assert_close(dora.weight_norm(layer, "default"), dora.reference_weight_norm(layer, "default"),
                                   atol=1e-5, rtol=1e-5)
        x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=1e-5, rtol=1e-5, msg=key)


def test_cached_base_norms_follow_base_changes():
    pm = build("peftlab", "mlp", dict(target_modules=["lin0"], use_dora=True))
    layer = pm.base_model.model.lin0
    before = dora.weight_norm(layer, "default")
    with torch.no_grad():
        layer.get_base_layer().weight.mul_(2.0)  # in place: a new tensor version
    after = dora.weight_norm(layer, "default")
    torch.testing.assert_close(after, dora.reference_weight_norm(layer, "default"), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


# ---------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------
def test_fused_function_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    T, d_in, d_out, r = 6, 5, 4, 2
    x = torch.randn(T, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(d_out, d_in, dtype=torch.float64, generator=g)
    b = torch.randn(d_out, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(r, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(d_out, r, dtype=torch.float64, generator=g, requires_grad=True)
    m = torch.rand(d_out, dtype=torch.float64, generator=g).add(1).requires_grad_()
    n = torch.rand(d_out, dtype=torch.float64, generator=g).add(1)
    assert torch.autograd.gradcheck(lambda *t: dora.DoraLinearFunction.apply(t[0], W, t[1], t[2], t[3], t[4], n, 0.7),
                                    (x, b, A, B, m))


@pytest.mark.parametrize("case", [c for c in CASES if c[1] in ("mlp", "gpt2")], ids=lambda c: c[0])
def test_gradients_reach_m_and_the_norm_is_detached(case):
    _, model, kwargs = case
    pm = build("peftlab", model, kwargs).train()
    for key, layer in dora_layers(pm).items():
        x = torch.randn(7, layer.in_features, generator=torch.Generator().manual_seed(3), requires_grad=True)
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                  layer.lora_magnitude_vector["default"].weight, x]
        y = layer(x)
        grads = torch.autograd.grad(y.pow(2).sum(), params)
        assert grads[2].abs().sum() > 0  # the magnitude learns
        ref = torch.autograd.grad(reference_forward(layer, x).pow(2).sum(), params)
        for got, want, name in zip(grads, ref, ("A", "B", "m", "x")):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"{key} d{name}")
        # with the norm left in the graph, A and B get other gradients: the detached one is what runs
        A, B = params[0], params[1]
        W = layer._base_weight()
        W = W.T if layer.fan_in_fan_out else W
        V = W + layer.scaling["default"] * B @ A
        attached = (params[2] / torch.linalg.norm(V, dim=1)) * F.linear(x, V)
        if layer.bias is not None:
            attached = attached + layer.bias
        other = torch.autograd.grad(attached.pow(2).sum(), params[:2])
        assert not torch.allclose(other[0], grads[0], atol=1e-6)


def test_training_step_matches_peft():
    """One AdamW step in each library from identical adapters gives the same adapter."""
    kwargs = dict(target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM")
    x = example_inputs("llama")
    batch = {**x, "labels": x["input_ids"]}
    after = {}
    for lib_name in LIBS:
        pm = build(lib_name, "llama", kwargs).train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm(**batch).loss.backward()
        opt.step()
        after[lib_name] = {canonical(n): p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    assert after["peft"].keys() == after["peftlab"].keys()
    for n in after["peft"]:
        torch.testing.assert_close(after["peftlab"][n], after["peft"][n], atol=1e-5, rtol=1e-4, msg=n)


def test_dropout_in_training_follows_peft():
    """With dropout active, h = W x + (m/n − 1)·W drop(x) + (m/n)·s·B A drop(x), as in peft (same dropout mask)."""
    kwargs = dict(target_modules=["lin0"], use_dora=True, lora_dropout=0.5)
    x = example_inputs("mlp", batch=6)
    outs = {}
    for lib_name in LIBS:
        pm = build(lib_name, "mlp", kwargs).train()
        pm.base_model.model.drop.p = 0.0  # the model's own dropout off: only the adapter's
        torch.manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs[lib_name] = pm(x).detach()
    torch.testing.assert_close(outs["peftlab"], outs["peft"], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_unmerge_exact(case):
    _, model, kwargs = case
    pm = build("peftlab", model, kwargs)
    x = example_inputs(model)
    unmerged = output(pm, x)
    weights = {k: m.get_base_layer().weight.detach().clone() for k, m in dora_layers(pm).items()}
    pm.merge_adapter()
    for key, layer in dora_layers(pm).items():
        W, delta = weights[key], layer.get_delta_weight("default")
        V = (W + delta).T if layer.fan_in_fan_out else W + delta
        c = layer.lora_magnitude_vector["default"].weight.detach() / torch.linalg.norm(V, dim=1)
        expected = c[:, None] * V  # W' = m/‖W + ΔW‖ · (W + ΔW)
        got = layer.get_base_layer().weight.detach()
        torch.testing.assert_close(got.T if layer.fan_in_fan_out else got, expected, atol=1e-6, rtol=1e-6, msg=key)
    torch.testing.assert_close(output(pm, x), unmerged, atol=1e-5, rtol=0)
    pm.unmerge_adapter()
    for key, layer in dora_layers(pm).items():
        torch.testing.assert_close(layer.get_base_layer().weight, weights[key], atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(output(pm, x), unmerged, atol=1e-5, rtol=0)
    plain = pm.merge_and_unload()
    torch.testing.assert_close(output(plain, x), unmerged, atol=1e-5, rtol=0)


def test_merge_dora_after_a_merged_lora_adapter():
    """A plain LoRA adapter merged first, then a DoRA adapter: the DoRA norm uses the unmerged base, as the
    forward does; unmerging restores the base."""
    pm = build("peftlab", "mlp", dict(target_modules=["lin0"], r=2))
    pm.add_adapter("dora", LoraConfig(target_modules=["lin0"], use_dora=True))
    fill_params(pm, lambda n, p: p.requires_grad, canonical)
    pm.eval()
    layer = pm.base_model.model.lin0
    x = example_inputs("mlp")
    W = layer.get_base_layer().weight.detach().clone()
    pm.base_model.set_adapter(["default", "dora"])
    both = output(pm, x)
    layer.merge(adapter_names=["default", "dora"])
    torch.testing.assert_close(output(pm, x), both, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, W, atol=1e-6, rtol=0)


def _two_dora(lib_name: str, model: str, targets: list[str]):
    """A model with two filled DoRA adapters, both active ("default" first)."""
    lib = LIBS[lib_name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = lib.get_peft_model(base_model(model), lib.LoraConfig(target_modules=targets, use_dora=True))
        pm.add_adapter("other", lib.LoraConfig(target_modules=targets, use_dora=True, r=4))
    fill_params(pm, lambda n, p: "lora_" in n, canonical)
    pm.base_model.set_adapter(["default", "other"])
    return pm.eval()


@pytest.mark.parametrize("model,targets", [("mlp", ["lin0", "lin1"]), ("gpt2", ["c_attn"]),
                                           ("emb_conv1d", ["emb", "conv1d"]), ("conv2d", ["conv2d"])])
def test_two_active_dora_adapters_act_in_order_and_merge_to_the_same_model(model, targets):
    """Several active DoRA adapters act in order as in peft (each rescales the running output, its norm taken on
    the unmerged base): the unmerged forward equals peft's, merging both gives that same model (as peft's merge
    does), and unmerging restores the base."""
    ours, ref = _two_dora("peftlab", model, targets), _two_dora("peft", model, targets)
    x = example_inputs(model)
    both = output(ours, x)
    torch.testing.assert_close(both, output(ref, x), atol=1e-5, rtol=0)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    ours.merge_adapter()
    torch.testing.assert_close(output(ours, x), both, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    for n, p in ours.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-5, rtol=0, msg=n)
    torch.testing.assert_close(output(ours.merge_and_unload(), x), both, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.merge_adapter()
    torch.testing.assert_close(output(ref, x), both, atol=1e-5, rtol=0)


def test_layer_numerics_match_peft():
    ref, ours = build("peft", "llama", CASES[2][2]), build("peftlab", "llama", CASES[2][2])
    x = example_inputs("llama")
    torch.testing.assert_close(output(ours, x), output(ref, x), atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.merge_adapter()
    ours.merge_adapter()
    ref_w = {n: p for n, p in ref.named_parameters() if n.endswith("base_layer.weight")}
    for n, p in ours.named_parameters():
        if n.endswith("base_layer.weight"):
            torch.testing.assert_close(p, ref_w[n], atol=1e-6, rtol=0, msg=n)
    torch.testing.assert_close(output(ours, x), output(ref, x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# files and peft
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_outputs_and_same_files_as_peft(case, tmp_path):
    _, model, kwargs = case
    ref, ours = build("peft", model, kwargs), build("peftlab", model, kwargs)
    x = example_inputs(model)
    torch.testing.assert_close(output(ours, x), output(ref, x), atol=1e-5, rtol=0)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "peftlab")
    ref_t = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    our_t = load_file(str(tmp_path / "peftlab" / "adapter_model.safetensors"))
    assert our_t.keys() == ref_t.keys()
    magnitudes = [k for k in our_t if "lora_magnitude_vector" in k]
    assert magnitudes and all(k.endswith(".lora_magnitude_vector") for k in magnitudes)  # no ".weight" on disk
    for k in ref_t:
        assert our_t[k].dtype == ref_t[k].dtype, k
        atol = 1e-6 if "magnitude" in k else 0  # m: fill of peft's and ours' init values (≈ 1 ulp apart)
        torch.testing.assert_close(our_t[k], ref_t[k], atol=atol, rtol=1e-6, msg=k)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("direction", ["peftlab->peft", "peft->peftlab"])
def test_adapters_move_both_ways(case, direction, tmp_path):
    _, model, kwargs = case
    src, dst = direction.split("->")
    saver = build(src, model, kwargs)
    x = example_inputs(model)
    expected = output(saver, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saver.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = LIBS[dst].PeftModel.from_pretrained(base_model(model), tmp_path)
    real = [w for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not real, [str(w.message) for w in real]
    torch.testing.assert_close(output(loaded, x), expected, atol=1e-5, rtol=0)
    saved = {canonical(n): p for n, p in saver.named_parameters() if p.requires_grad}
    for n, p in loaded.named_parameters():
        if canonical(n) in saved:
            assert torch.equal(p, saved[canonical(n)]), n


def test_in_memory_names_equal_peft():
    """m lives in ``lora_magnitude_vector.<adapter>.weight`` in both libraries; the files hold
    ``...lora_magnitude_vector`` (no ``.weight``) in both."""
    ref, ours = build("peft", "mlp", CASES[0][2]), build("peftlab", "mlp", CASES[0][2])
    ref_names = {n for n, _ in ref.named_parameters()}
    our_names = {n for n, _ in ours.named_parameters()}
    assert "base_model.model.lin0.lora_magnitude_vector.default.weight" in our_names
    assert ref_names == our_names


# ---------------------------------------------------------------------------------------------------
# mixed batches, errors
# ---------------------------------------------------------------------------------------------------
def test_mixed_batch_with_dora_equals_separate_runs():
    """peft refuses ``adapter_names`` with DoRA; peftlab routes each row through its adapter."""
    pm = build("peftlab", "llama", CASES[2][2])
    pm.add_adapter("lora", LoraConfig(target_modules=["q_proj", "v_proj"], r=4, task_type="CAUSAL_LM"))
    fill_params(pm, lambda n, p: p.requires_grad, canonical)
    pm.eval()
    x = example_inputs("llama", batch=4)
    names = ["lora", "default", "__base__", "default"]
    mixed = output(pm, x, adapter_names=names)
    alone = {"default": output(pm, x)}
    pm.set_adapter("lora")
    alone["lora"] = output(pm, x)
    with pm.disable_adapter():
        alone["__base__"] = output(pm, x)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=0, msg=name)
    ref = build("peft", "llama", CASES[2][2])
    with pytest.raises(ValueError, match="DoRA"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        output(ref, x, adapter_names=["default", "__base__", "default", "default"])


@pytest.mark.parametrize("model,targets", [("emb_conv1d", ["emb", "conv1d"]), ("conv2d", ["conv2d"]),
                                           ("conv1d", ["conv1d"])])
def test_dora_on_conv_and_embedding_matches_peft(model, targets):
    """DoRA on nn.Embedding and nn.Conv1d/2d: a fresh adapter is exactly the base model, the magnitude has peft's
    shape and name, a filled adapter gives peft's outputs, and merging gives the unmerged outputs."""
    x = example_inputs(model, batch=3)
    base_out = output(base_model(model), x)
    kwargs = dict(target_modules=targets, use_dora=True)
    fresh = get_peft_model(base_model(model), LoraConfig(**kwargs)).eval()
    assert torch.equal(output(fresh, x), base_out)
    ref, ours = build("peft", model, kwargs), build("peftlab", model, kwargs)
    ref_shapes = {n: p.shape for n, p in ref.named_parameters()}
    assert ref_shapes == {n: p.shape for n, p in ours.named_parameters()}
    expected = output(ref, x)
    torch.testing.assert_close(output(ours, x), expected, atol=1e-5, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(output(ours, x), expected, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(output(ours, x), expected, atol=1e-5, rtol=0)


def test_dora_on_a_grouped_conv_uses_the_norm_of_the_dense_kernel():
    """DoRA on a grouped conv: ΔW = s·B∘A connects every input channel, so the layer applies the dense kernel
    W + ΔW (W zero outside its groups); n is that kernel's norm per output channel and the output is
    (m/n)·((W + ΔW) ⋆ x) + b (peft reshapes B·A out of its layout instead). Fresh, it is exactly the base; merging
    is refused as for any LoRA on a grouped conv, leaving the weights as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    x = torch.randn(2, 4, 5, 5)
    want = model(x)
    with pytest.warns(UserWarning, match="groups > 1"):
        pm = get_peft_model(model, LoraConfig(target_modules=["0"], r=4, use_dora=True))
    assert torch.equal(pm(x), want)
    fill_params(pm, lambda n, p: "lora_" in n, canonical)
    layer = pm.base_model.model[0]
    W, delta = dora.dense_conv_weights(layer, "default")
    base = layer.get_base_layer()
    torch.testing.assert_close(F.conv2d(x, W, base.bias), want, atol=1e-6, rtol=0)  # the dense W is the base
    V = W + delta
    torch.testing.assert_close(F.conv2d(x, V), F.conv2d(x, W) + layer.scaling["default"] * layer.lora_B["default"](
        layer.lora_A["default"](x)), atol=1e-6, rtol=0)  # the dense ΔW is B∘A
    c = layer.lora_magnitude_vector["default"].weight.reshape(-1) / torch.linalg.vector_norm(V, dim=(1, 2, 3))
    expected = c.view(1, -1, 1, 1) * F.conv2d(x, V) + base.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(pm(x), expected, atol=1e-5, rtol=0)
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(NotImplementedError, match="groups > 1"):
        pm.merge_adapter()
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in before.items())


def test_dora_can_be_added_to_an_existing_embedding_adapter():
    pm = get_peft_model(base_model("emb_conv1d"), LoraConfig(target_modules=["emb"]))
    pm.add_adapter("dora", LoraConfig(target_modules=["emb"], use_dora=True))
    assert pm.base_model.model.emb.lora_magnitude_vector["dora"].weight.shape == (5,)


def test_dora_with_lora_bias_refused():
    with pytest.raises(ValueError, match="lora_bias=True cannot be combined with use_dora=True"):
        LoraConfig(target_modules=["lin0"], use_dora=True, lora_bias=True)


def test_save_load_round_trip_and_trainable_reload(tmp_path):
    pm = build("peftlab", "gpt2", CASES[3][2])
    x = example_inputs("gpt2")
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_model("gpt2"), tmp_path, is_trainable=True)
    torch.testing.assert_close(output(loaded, x), output(pm, x), atol=0, rtol=0)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_magnitude_vector.default.weight") for n in trainable)


# ---------------------------------------------------------------------------------------------------
# mixed precision: the gpu profile trains under bf16 autocast
# ---------------------------------------------------------------------------------------------------
def test_dora_trains_under_bf16_autocast():
    """The fused DoRA function under autocast (found by the simulated GPU run): same output and gradients as
    float32 within bf16 rounding, float32 gradients for the float32 adapter."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    pm = get_peft_model(net, LoraConfig(r=4, target_modules=["0", "2"], use_dora=True, init_lora_weights=False))
    x = torch.randn(8, 16)
    ref = pm(x)
    ref.square().sum().backward()
    want = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pm(x)
    out.float().square().sum().backward()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32
            torch.testing.assert_close(p.grad, want[n], rtol=5e-2, atol=5e-2 * float(want[n].abs().max()))


# ---------------------------------------------------------------------------------------------------
# speed (run with -m slow; the full-model ratio is measured by tools/bench_dora.py)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dora_layer_step_faster_than_peft():
    """One DoRA layer (256 → 256, 1024 tokens, r = 16), forward + backward, interleaved with peft's."""
    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(256, 256, bias=False)

        def forward(self, x):
            return self.q(x)

    torch.manual_seed(0)
    models = {}
    for name, lib in LIBS.items():
        pm = lib.get_peft_model(copy.deepcopy(One()), lib.LoraConfig(r=16, target_modules=["q"], use_dora=True))
        fill_params(pm, lambda n, p: p.requires_grad, canonical)
        models[name] = pm.train()
    x = torch.randn(1024, 256, requires_grad=True)
    times = {name: [] for name in models}
    for _ in range(25):
        for name, pm in models.items():
            t = time.perf_counter()
            pm(x).sum().backward()
            times[name].append(time.perf_counter() - t)
    ratio = statistics.median(a / b for a, b in zip(times["peftlab"][5:], times["peft"][5:]))
    assert ratio < 0.95, ratio


@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_partial_merge_takes_the_norm_on_the_unmerged_base(kind):
    """One DoRA adapter merged, another active and unmerged: the active one's n = ‖W + ΔW‖ is taken on the base
    without the merged one (its m was set against that base), so the output equals merging both, on every layer
    type DoRA supports."""
    from peftlab.tuners.lora.layer import LoraLayer

    torch.manual_seed(0)
    net, x = {"linear": (nn.Sequential(nn.Linear(6, 5)), torch.randn(3, 6)),
              "conv": (nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(2, 3, 5, 5)),
              "embedding": (nn.Sequential(nn.Embedding(12, 6)), torch.randint(0, 12, (2, 5)))}[kind]
    config = LoraConfig(target_modules=["0"], use_dora=True, init_lora_weights=False)
    pm = get_peft_model(net, config)
    pm.add_adapter("other", config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "magnitude" in n:
                p.mul_(1.3)  # trained magnitudes: m ≠ ‖W + ΔW‖
    pm.eval()
    layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]

    def activate(names):  # the layers' own switch (the model's set_adapter would unmerge first)
        for layer in layers:
            layer.set_adapter(names, trainable=False)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "additionally merging"
        pm.merge_adapter(["other"])
        partial = pm(x)
        activate([])
        merged_alone = pm(x)
        activate(["default"])
        pm.merge_adapter(["default"])
        both = pm(x)
    torch.testing.assert_close(partial, both, atol=1e-5, rtol=0)
    assert not torch.allclose(partial, merged_alone, atol=1e-3)  # the active adapter acts


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_fused_dora_magnitude_gradient_where_m_vanishes(with_bias):
    """With many tokens the fused node scales the merged weight's rows by m/n and reads ∂m off its output
    (Σ_t g ⊙ (h − b) / m); where m is zero, tiny or negative-tiny that division is skipped and those entries come
    from x directly. ∂x, ∂A, ∂B, ∂m equal autograd's on the plain formula (n held constant, float64)."""
    g = torch.Generator().manual_seed(5)
    T, n_in, n_out, r, s = 12, 6, 5, 2, 2.0  # T (in + out) > in·out: the merged-weight path
    x = torch.randn(T, n_in, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    bias = torch.randn(n_out, generator=g, dtype=torch.float64) if with_bias else None
    A = torch.randn(r, n_in, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(n_out, r, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([1.2, 0.0, 1e-30, 0.7, -1e-20], dtype=torch.float64, requires_grad=True)
    n = torch.linalg.vector_norm(W + s * B.detach() @ A.detach(), dim=1)
    grads = {}
    for fused in (True, False):
        if fused:
            h = dora.DoraLinearFunction.apply(x, W, bias, A, B, m, n, s)
        else:
            h = (m / n) * (F.linear(x, W) + s * F.linear(F.linear(x, A), B)) + (0 if bias is None else bias)
        (h.pow(2).sum() + h.sum()).backward()
        grads[fused] = (h.detach(), x.grad, A.grad, B.grad, m.grad)
        x.grad = A.grad = B.grad = m.grad = None
    assert torch.isfinite(grads[True][4]).all()
    for got, want in zip(grads[True], grads[False]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_fused_dora_runs_under_inference_mode():
    """Under torch.inference_mode() (serving) the node keeps nothing for a backward (inference tensors carry no
    version counter to keep), and gives the output of a no_grad forward, many tokens or few."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)),
                           LoraConfig(r=4, target_modules=["0", "2"], use_dora=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape))
    for tokens in (64, 2):  # T (in + out) above and below in·out: the merged-weight path and the other
        x = torch.randn(tokens, 16)
        with torch.no_grad():
            want = model(x)
        with torch.inference_mode():
            got = model(x)
        torch.testing.assert_close(got, want)
