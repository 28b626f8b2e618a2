"""LoHa and LoKr on their own: the algebra of their ΔW, the fused training node, dropouts, and bad input.

Bad input gets a clear error and leaves the model (and the files) as they were.
"""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from conftest import base_model, every_row_dropped, fill_method_tensors, output
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import peftlab
from peftlab import LoHaConfig, LoKrConfig, get_peft_model
from peftlab.lab.models import example_inputs
from peftlab.tuners.base import AdapterLayer
from peftlab.tuners.loha.layer import LoHaLayer, LoHaLinearFunction
from peftlab.tuners.lokr import factorization
from peftlab.tuners.lokr.layer import LoKrLayer

PREFIXES = ("hada_", "lokr_")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


# ---------------------------------------------------------------------------------------------------
# configs: peft's defaults and checks
# ---------------------------------------------------------------------------------------------------
def test_defaults_match_peft():
    peft = pytest.importorskip("peft")
    for ours, theirs in ((LoHaConfig(), peft.LoHaConfig()), (LoKrConfig(), peft.LoKrConfig())):
        a, b = ours.to_dict(), theirs.to_dict()
        b = {k: (v.value if hasattr(v, "value") else v) for k, v in b.items() if k != "runtime_config"}
        a.pop("peft_version"), b.pop("peft_version")  # peft fills in its own version
        assert a == b


@pytest.mark.parametrize("cls", [LoHaConfig, LoKrConfig])
@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "rank must be a positive integer"),
    (dict(r=-2), "rank must be a positive integer"),
    (dict(r=2.5), r"r=2.5\): expected an integer"),  # the type check names the field first
    (dict(rank_pattern={"lin0": 0}), r"rank_pattern\['lin0'\]=0"),
    (dict(alpha="8"), r"alpha='8'\): expected"),
    (dict(alpha_pattern={"lin0": float("nan")}), r"alpha_pattern\['lin0'\]"),
    (dict(rank_dropout=1.0), r"rank_dropout=1.0 must be a probability in \[0, 1\)"),
    (dict(module_dropout=-0.1), "module_dropout=-0.1 must be a probability"),
    (dict(init_weights="gaussian"), "init_weights='gaussian'; valid values"),
    (dict(bias="all"), "has no 'bias' option"),
    (dict(fan_in_fan_out=True), "has no 'fan_in_fan_out' option"),
    (dict(layers_pattern="layers"), "layers_pattern needs layers_to_transform"),
])
def test_config_errors(cls, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls(target_modules=["lin0"], **kwargs)


def test_lycoris_init_is_lokr_only():
    assert LoKrConfig(init_weights="lycoris").init_weights == "lycoris"
    with pytest.raises(ValueError, match="init_weights='lycoris'; valid values: True, False$"):
        LoHaConfig(init_weights="lycoris")


@pytest.mark.parametrize("factor, match", [(0, "decompose_factor=0: give -1"), (-2, "decompose_factor=-2: give -1"),
                                           (2.5, r"decompose_factor=2.5\): expected an integer"),
                                           (True, r"decompose_factor=True\): expected an integer")])
def test_decompose_factor_values(factor, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LoKrConfig(decompose_factor=factor)


def test_config_file_round_trip(tmp_path):
    config = LoKrConfig(target_modules=["q_proj"], r=4, alpha=2, decompose_both=True, decompose_factor=4,
                        rank_dropout=0.1, rank_dropout_scale=True, init_weights="lycoris")
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "bias" not in data and "fan_in_fan_out" not in data
    assert data["peft_type"] == "LOKR" and data["init_weights"] == "lycoris"
    again = peftlab.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(again, LoKrConfig)
    assert {**again.to_dict(), "peft_version": None} == config.to_dict()


# ---------------------------------------------------------------------------------------------------
# bad targets and checkpoints: a clear error, nothing changed
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LoHaConfig, LoKrConfig])
@pytest.mark.parametrize("model, targets, kind", [
    ("emb_conv1d", ["emb"], "Embedding"),
    ("emb_conv1d", ["conv1d"], "Conv1D"),
    ("gpt2", ["c_attn"], "Conv1D"),
])
def test_unsupported_layer(cls, model, targets, kind):
    m = base_model(model)
    before = snapshot(m)
    with pytest.raises(ValueError, match=rf"is a {kind}; {cls.PEFT_TYPE} supports Linear, Conv1d, Conv2d"):
        get_peft_model(m, cls(target_modules=targets))
    assert not any(isinstance(x, AdapterLayer) for x in m.modules())
    assert_unchanged(m, before)


def test_conv3d_is_refused():
    m = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match="is a Conv3d; LOHA supports"):
        get_peft_model(m, LoHaConfig(target_modules=["0"]))


def test_decompose_factor_must_divide_every_target():
    m = base_model("llama")
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"decompose_factor=3 does not divide the in size 32 and out size 32 of "
                                         r"target module 'model.layers.0.self_attn.q_proj'"):
        get_peft_model(m, LoKrConfig(target_modules=["q_proj"], decompose_factor=3, task_type="CAUSAL_LM"))
    assert_unchanged(m, before)
    assert not any(isinstance(x, AdapterLayer) for x in m.modules())


def test_second_adapter_checked_before_anything_changes():
    """A second LoKr adapter whose factor does not fit: refused before any layer gets it."""
    pm = get_peft_model(base_model("mlp"), LoKrConfig(target_modules=["lin0", "lin1"]))
    fill_method_tensors(pm, PREFIXES)
    x = example_inputs("mlp")
    before, out = snapshot(pm), output(pm.eval(), x)
    with pytest.raises(ValueError, match=r"decompose_factor=4 does not divide the in size 10 .*'lin0'"):
        pm.add_adapter("other", LoKrConfig(target_modules=["lin0", "lin1"], decompose_factor=4))
    assert "other" not in pm.peft_config
    assert all(layer.adapter_names == ["default"] for _, layer in pm.base_model.adapter_layers())
    assert_unchanged(pm, before)
    torch.testing.assert_close(output(pm, x), out, atol=0, rtol=0)


def test_other_method_on_a_wrapped_layer_is_refused_before_changes():
    pm = get_peft_model(base_model("mlp"), peftlab.LoraConfig(target_modules=["lin1"]))
    before = snapshot(pm)
    with pytest.raises(ValueError, match="peft_type|carries a|LOHA"):
        pm.add_adapter("h", LoHaConfig(target_modules=["lin0", "lin1"]))
    assert_unchanged(pm, before)


@pytest.mark.parametrize("cls", [LoHaConfig, LoKrConfig])
def test_checkpoint_with_wrong_shapes(cls, tmp_path):
    """An adapter saved with r=4 loaded under a config that says r=2: the shapes do not fit, the error names
    them, and the caller's model is left as it was."""
    pm = get_peft_model(base_model("llama"), cls(target_modules=["q_proj", "v_proj"], r=4, task_type="CAUSAL_LM",
                                                  decompose_both=True) if cls is LoKrConfig else
                        cls(target_modules=["q_proj", "v_proj"], r=4, task_type="CAUSAL_LM"))
    fill_method_tensors(pm, PREFIXES)
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = base_model("llama")
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="does not fit this model"):
        peftlab.PeftModel.from_pretrained(fresh, tmp_path)
    assert not any(isinstance(x, AdapterLayer) for x in fresh.modules())
    assert_unchanged(fresh, before)
    # load_adapter into a model that already has one: the failed adapter is not kept
    host = get_peft_model(base_model("llama"), cls(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    host_before = snapshot(host)
    with pytest.raises(ValueError, match="does not fit this model"):
        host.load_adapter(tmp_path, adapter_name="bad")
    assert set(host.peft_config) == {"default"}
    assert_unchanged(host, host_before)


def test_update_layer_with_bad_rank_changes_nothing():
    pm = get_peft_model(base_model("mlp"), LoHaConfig(target_modules=["lin0"]))
    layer = pm.base_model.model.lin0
    for bad in (0, -1):
        with pytest.raises(ValueError, match="the rank must be a positive integer"):
            layer.update_layer("x", r=bad, alpha=8)
        assert layer.adapter_names == ["default"] and "x" not in layer.r and "x" not in layer.hada_w1_a


# ---------------------------------------------------------------------------------------------------
# the algebra
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, f, expected", [(256, -1, (16, 16)), (128, -1, (8, 16)), (127, -1, (1, 127)),
                                            (128, 4, (4, 32)), (12, -1, (3, 4)), (1, -1, (1, 1))])
def test_factorization(n, f, expected):
    assert factorization(n, f) == expected


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 400), st.sampled_from([-1, 1, 2, 3, 4, 8]))
def test_factorization_matches_peft(n, f):
    peft_layer = pytest.importorskip("peft.tuners.lokr.layer")
    if f == -1 or n % f == 0:
        m, k = factorization(n, f)
        assert m * k == n and (f == -1 and m <= k or f != -1 and m == f)
        assert (m, k) == peft_layer.factorization(n, f)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(0, 2**16))
def test_loha_rank_at_most_r_squared(r, seed):
    """rank((W1a W1b) ⊙ (W2a W2b)) ≤ r², and generic factors reach it (here 24 × 20 > r²)."""
    g = torch.Generator().manual_seed(seed)
    layer = LoHaLayer(nn.Linear(20, 24), "a", r=r, init_weights=False)
    with torch.no_grad():
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            getattr(layer, name)["a"].copy_(torch.randn(getattr(layer, name)["a"].shape, generator=g,
                                                        dtype=torch.float64).float())
        rank = torch.linalg.matrix_rank(layer.get_delta_weight("a").double(), rtol=1e-5).item()  # float32 noise
    assert rank == r * r


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16))
def test_lokr_delta_is_a_kronecker_product(seed):
    """ΔW = s · W1 ⊗ W2 (checked against the definition in peftlab.linalg), rank = rank(W1)·rank(W2)."""
    from peftlab.linalg import kron

    g = torch.Generator().manual_seed(seed)
    layer = LoKrLayer(nn.Linear(12, 20), "a", r=1, alpha=3, init_weights=False)
    (a, b), (c, d) = layer.kron_shape()
    assert (a, b, c, d) == (4, 5, 3, 4)
    assert "a" in layer.lokr_w1 and "a" in layer.lokr_w2_a  # W1 whole (no decompose_both), W2 of rank 1 < 5/2
    with torch.no_grad():
        for name in layer.adapter_layer_names:
            if "a" in getattr(layer, name):
                getattr(layer, name)["a"].copy_(torch.randn(getattr(layer, name)["a"].shape, generator=g))
        w1 = layer.lokr_w1["a"]
        w2 = layer.lokr_w2_a["a"] @ layer.lokr_w2_b["a"]
        delta = layer.get_delta_weight("a")
    torch.testing.assert_close(delta, 3.0 * kron(w1, w2))
    rank = torch.linalg.matrix_rank
    assert rank(delta.double(), rtol=1e-5) == rank(w1.double(), rtol=1e-5) * rank(w2.double(), rtol=1e-5) == 3


def test_loha_linear_function_gradients():
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    x, w, b = t(2, 3, 6), t(4, 6), t(4)
    factors = [t(4, 2), t(2, 6), t(4, 2), t(2, 6)]
    assert torch.autograd.gradcheck(lambda *a: LoHaLinearFunction.apply(*a, 0.7), (x, w, b, *factors))
    assert torch.autograd.gradcheck(lambda *a: LoHaLinearFunction.apply(a[0], a[1], None, *a[2:], 0.7),
                                    (x, w, *factors))


def test_fused_training_forward_equals_generic_path():
    """Training LoHa on an nn.Linear runs one autograd node; its output and gradients equal the generic
    op(x; W₀ + ΔW) path (taken e.g. in eval mode, or with a hook on the base)."""
    torch.manual_seed(0)
    layer = LoHaLayer(nn.Linear(6, 5), "a", r=2, alpha=4, init_weights=False)
    x = torch.randn(3, 6, requires_grad=True)
    fused = layer(x)
    assert type(fused.grad_fn).__name__ == "LoHaLinearFunctionBackward"
    grads = torch.autograd.grad(fused.sum(), [x, *layer.parameters()], allow_unused=True)
    layer.base_layer.register_forward_hook(lambda m, i, o: None)  # the generic path from now on
    plain = layer(x)
    assert type(plain.grad_fn).__name__ != "LoHaLinearFunctionBackward"
    torch.testing.assert_close(plain, fused)
    for a, b in zip(grads, torch.autograd.grad(plain.sum(), [x, *layer.parameters()], allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------
# dropouts
# ---------------------------------------------------------------------------------------------------
def test_rank_dropout_drops_output_rows_and_loha_rescales():
    torch.manual_seed(0)
    layer = LoHaLayer(nn.Linear(6, 40), "a", r=2, rank_dropout=0.5, init_weights=False)
    x = torch.randn(3, 6)
    full = layer.get_delta_weight("a")
    torch.manual_seed(1)
    dropped = layer._delta_weight("a", rank_dropout=True)
    zero_rows = (dropped == 0).all(dim=1)
    assert 0 < zero_rows.sum() < 40
    kept = ~zero_rows
    scale = 40 / kept.sum()  # 1 / mean(mask)
    torch.testing.assert_close(dropped[kept], full[kept] * scale)
    # in eval mode nothing is dropped
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ full.T)


def test_lokr_rank_dropout_scale_flag():
    torch.manual_seed(0)
    for scale_flag in (False, True):
        layer = LoKrLayer(nn.Linear(8, 16), "a", r=8, rank_dropout=0.5, rank_dropout_scale=scale_flag,
                          init_weights=False)
        full = layer.get_delta_weight("a")
        torch.manual_seed(3)
        dropped = layer._delta_weight("a", rank_dropout=True)
        kept = ~(dropped == 0).all(dim=1)
        factor = 16 / kept.sum() if scale_flag else 1.0
        torch.testing.assert_close(dropped[kept], full[kept] * factor)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_rank_dropout_that_drops_every_row_leaves_the_base(method: str):
    """When the mask drops every output row (likely for a high rank_dropout on a narrow layer), the rescaled ΔW is
    zero and the layer gives its base output; peft divides by the mask's mean, 0, and returns NaN (a fuzzed
    LoHaConfig(rank_dropout=0.9375) found it)."""
    kwargs = dict(rank_dropout=0.99, init_weights=False)
    if method == "lokr":
        kwargs["rank_dropout_scale"] = True
    cls = LoHaLayer if method == "loha" else LoKrLayer
    layer = cls(nn.Linear(8, 4), "a", r=2, **kwargs)
    x = torch.randn(3, 8)
    with mock.patch.object(torch, "rand", every_row_dropped):
        dropped = layer._delta_weight("a", rank_dropout=True)
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    assert torch.equal(dropped, torch.zeros_like(dropped))


def test_module_dropout_skips_the_adapter_in_training_only():
    torch.manual_seed(0)
    layer = LoKrLayer(nn.Linear(4, 4), "a", r=4, module_dropout=0.5, init_weights=False)
    x = torch.randn(2, 4)
    base, adapted = layer.base_layer(x), layer.eval()(x)
    assert not torch.allclose(base, adapted)
    layer.train()
    outs = [layer(x) for _ in range(40)]
    skipped = sum(torch.equal(o, base) for o in outs)
    assert 5 < skipped < 35  # about half the steps run the base alone
    assert all(torch.equal(o, base) or torch.allclose(o, adapted, atol=1e-6) for o in outs)


# ---------------------------------------------------------------------------------------------------
# several adapters and merging
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LoHaConfig, LoKrConfig])
def test_two_active_adapters_add_and_merge(cls):
    pm = get_peft_model(base_model("mlp"), cls(target_modules=["lin0", "lin1"], init_weights=False))
    pm.add_adapter("b", cls(target_modules=["lin0"], r=2, init_weights=False))
    pm.eval()
    x = example_inputs("mlp")
    pm.base_model.set_adapter(["default", "b"])
    both = output(pm, x)
    lin0 = pm.base_model.model.lin0
    w0 = lin0.get_base_layer().weight.detach().clone()
    expected_w = w0 + lin0.get_delta_weight("default") + lin0.get_delta_weight("b")
    pm.merge_adapter()
    torch.testing.assert_close(lin0.get_base_layer().weight, expected_w)
    torch.testing.assert_close(output(pm, x), both, atol=1e-6, rtol=0)
    pm.unmerge_adapter()
    torch.testing.assert_close(lin0.get_base_layer().weight, w0, atol=1e-6, rtol=0)


def test_safe_merge_refuses_non_finite():
    pm = get_peft_model(base_model("mlp"), LoHaConfig(target_modules=["lin0"]))
    with torch.no_grad():
        pm.base_model.model.lin0.hada_w2_b["default"][0, 0] = float("inf")
    before = snapshot(pm)
    with pytest.raises(ValueError, match="NaN or inf"):
        pm.merge_adapter(safe_merge=True)
    assert_unchanged(pm, before)


def test_half_precision_base_keeps_float32_adapters():
    base = base_model("mlp").to(torch.bfloat16)
    pm = get_peft_model(base, LoKrConfig(target_modules=["lin0"], init_weights=False))
    layer = pm.base_model.model.lin0
    assert layer.lokr_w1["default"].dtype == torch.float32
    x = torch.randn(2, 10).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = layer.base_layer(x).float() + x.float() @ layer.get_delta_weight("default").T
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)
