"""``PeftModel.add_weighted_adapter``: conformance with peft 0.21 (the oracle), exactness, cross terms, errors.

The same tiny model gets the same two or three adapters in both libraries, every LoRA tensor filled with
values seeded by its name (the names are the same in both), then both merge with each combination type:

* factor types (linear, ties, dare_*, magnitude_prune) and ``cat``: the merged A and B equal peft's;
* svd types: the merged ΔW equals peft's (an SVD's factors are only unique up to signs);
* DARE types: equal under the same global RNG state (``torch.manual_seed`` before both calls);
* the merged adapter's forward output and its r / lora_alpha equal peft's.

Where peftlab deliberately differs from peft (errors instead of silent no-ops, rsLoRA and lora_bias
sources, peft's svd shape bug) the difference has its own test.
"""

from __future__ import annotations


import pytest
import torch
from conftest import base_model, fill_method_tensors, output, quiet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peftlab
from peftlab.lab.models import example_inputs
from peftlab.merging import cross_term_error, cross_terms, factor_weights
from peftlab.merging.lora import COMBINATION_TYPES, SVD_TYPES, layer_factors

peft = pytest.importorskip("peft", reason="peft (the oracle) is not installed")

LIBS = {"peft": peft, "peftlab": peftlab}
WEIGHTS = [1.5, -0.7, 0.4]
DENSITY = 0.5

# (case name, tiny model, {adapter name: LoraConfig kwargs}); ranks stay ≤ min(out, in) of every layer,
# because peft's svd types write factors of inconsistent shapes above that (see the divergence test)
CASES = [
    ("mlp-3-adapters", "mlp", {
        "a": dict(target_modules=["lin0", "lin1"], r=2, lora_alpha=8),
        "b": dict(target_modules=["lin0", "lin1"], r=2, lora_alpha=2),
        "c": dict(target_modules=["lin0"], r=2, lora_alpha=4)}),
    ("emb-conv1d", "emb_conv1d", {
        "a": dict(target_modules=["emb", "conv1d"], r=1, lora_alpha=8),
        "b": dict(target_modules=["emb", "conv1d"], r=1, lora_alpha=3)}),
    ("conv2d", "conv2d", {
        "a": dict(target_modules=["conv2d"], r=4, lora_alpha=8),
        "b": dict(target_modules=["conv2d"], r=4, lora_alpha=3)}),
    ("gpt2-fan-in-fan-out", "gpt2", {
        "a": dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8, fan_in_fan_out=True),
        "b": dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=16, fan_in_fan_out=True)}),
    ("llama-regex", "llama", {
        "a": dict(target_modules=r".*\.(q_proj|v_proj)", r=4, lora_alpha=8),
        "b": dict(target_modules=r".*\.v_proj", r=4, lora_alpha=2)}),
]
IDS = [c[0] for c in CASES]


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def build(lib_name: str, model: str, adapters: dict[str, dict]):
    lib = LIBS[lib_name]
    names = list(adapters)
    with quiet():
        pm = lib.get_peft_model(base_model(model), lib.LoraConfig(**adapters[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            pm.add_adapter(n, lib.LoraConfig(**adapters[n]))
    fill_method_tensors(pm)
    return pm.eval()


def lora_layers(pm, name: str) -> dict:
    """LoRA layers holding adapter ``name``, by module name inside the base model."""
    return {k: m for k, m in pm.get_base_model().named_modules()
            if name in getattr(m, "lora_A", {}) or name in getattr(m, "lora_embedding_A", {})}


def factors(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name in getattr(layer, "lora_A", {}):
        return layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
    return layer.lora_embedding_A[name].detach(), layer.lora_embedding_B[name].detach()



def merge(pm, names, weights, combination_type, **kw):
    kw.setdefault("density", None if combination_type in ("svd", "linear", "cat") else DENSITY)
    torch.manual_seed(1234)  # the same global RNG state in both libraries (DARE's masks, new tensors' init)
    with quiet():
        pm.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kw)


def exact_delta(layer, names, weights) -> torch.Tensor:
    """Σᵢ wᵢ ΔWᵢ at a peftlab layer (ΔWᵢ = sᵢ Bᵢ Aᵢ, shaped like the weight)."""
    return sum(w * layer.get_delta_weight(n) for n, w in zip(names, weights) if n in layer.adapter_names)


# ---------------------------------------------------------------------------------------------------
# conformance with peft
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged_pairs():
    return {}


@pytest.mark.peer
@pytest.mark.parametrize("combination_type", COMBINATION_TYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_equal_to_peft(case, combination_type):
    name, model, adapters = case
    names = list(adapters)
    weights = WEIGHTS[: len(names)]
    pms = {lib: build(lib, model, adapters) for lib in LIBS}
    for pm in pms.values():
        merge(pm, names, weights, combination_type)
    ref, ours = lora_layers(pms["peft"], "merged"), lora_layers(pms["peftlab"], "merged")
    assert set(ours) == set(ref)
    for key in ref:
        assert ours[key].r["merged"] == ref[key].r["merged"]
        assert ours[key].scaling["merged"] == ref[key].scaling["merged"] == 1.0
        if combination_type in SVD_TYPES:
            torch.testing.assert_close(ours[key].get_delta_weight("merged"), ref[key].get_delta_weight("merged"),
                                       atol=2e-6, rtol=1e-5)
        else:
            for t_ours, t_ref in zip(factors(ours[key], "merged"), factors(ref[key], "merged")):
                torch.testing.assert_close(t_ours, t_ref, atol=1e-7, rtol=1e-6)
    cfg_ours, cfg_ref = pms["peftlab"].peft_config["merged"], pms["peft"].peft_config["merged"]
    assert (cfg_ours.r, cfg_ours.lora_alpha) == (cfg_ref.r, cfg_ref.lora_alpha)
    assert (sorted(cfg_ours.target_modules) if isinstance(cfg_ours.target_modules, list) else cfg_ours.target_modules) \
        == (sorted(cfg_ref.target_modules) if isinstance(cfg_ref.target_modules, set) else cfg_ref.target_modules)
    x = example_inputs(model)
    outs = {}
    for lib, pm in pms.items():
        assert pm.active_adapters == [names[0]]  # the merged adapter is not activated
        pm.set_adapter("merged")
        outs[lib] = output(pm, x)
    torch.testing.assert_close(outs["peftlab"], outs["peft"], atol=1e-5, rtol=1e-5)


@pytest.mark.peer
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("combination_type", ["ties", "ties_svd", "dare_ties", "dare_ties_svd"])
def test_majority_sign_method_equal_to_peft(combination_type, sign_method):
    _, model, adapters = CASES[0]
    names = list(adapters)
    pms = {lib: build(lib, model, adapters) for lib in LIBS}
    for pm in pms.values():
        merge(pm, names, WEIGHTS, combination_type, density=0.7, majority_sign_method=sign_method)
    for key, layer in lora_layers(pms["peft"], "merged").items():
        ours = lora_layers(pms["peftlab"], "merged")[key]
        torch.testing.assert_close(ours.get_delta_weight("merged"), layer.get_delta_weight("merged"),
                                   atol=2e-6, rtol=1e-5)


@pytest.mark.peer
def test_saved_merged_adapter_loads_in_peft(tmp_path):
    _, model, adapters = CASES[3]
    ours = build("peftlab", model, adapters)
    merge(ours, list(adapters), [0.8, 0.6], "ties_svd", density=0.6)
    ours.save_pretrained(tmp_path, selected_adapters=["merged"])
    with quiet():
        ref = peft.PeftModel.from_pretrained(base_model(model), tmp_path / "merged")
    ours.set_adapter("merged")
    x = example_inputs(model)
    torch.testing.assert_close(output(ref, x), output(ours, x), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# exactness (peftlab only; hypothesis over the weights)
# ---------------------------------------------------------------------------------------------------
EXACT_ADAPTERS = {"a": dict(target_modules=["lin0"], r=2, lora_alpha=8),
                  "b": dict(target_modules=["lin0"], r=3, lora_alpha=2, use_rslora=True)}
weights2 = st.lists(st.floats(-3, 3, allow_nan=False).map(lambda x: round(x, 3)), min_size=2, max_size=2)


@pytest.fixture(scope="module")
def exact_model():
    return build("peftlab", "mlp", EXACT_ADAPTERS)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weights2, st.sampled_from(["cat", "svd"]))
def test_cat_and_full_rank_svd_are_exact(exact_model, weights, combination_type):
    pm = exact_model
    # svd at full rank: the rank of Σ wᵢ ΔWᵢ is at most 2 + 3
    kw = {"svd_rank": 5} if combination_type == "svd" else {}
    pm.add_weighted_adapter(["a", "b"], weights, "merged", combination_type=combination_type, **kw)
    try:
        layer = pm.base_model.model.lin0
        assert layer.r["merged"] == 5
        torch.testing.assert_close(layer.get_delta_weight("merged"), exact_delta(layer, ["a", "b"], weights),
                                   atol=1e-6, rtol=1e-5)
    finally:
        pm.delete_adapter("merged")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.floats(-3, 3, allow_nan=False).map(lambda x: round(x, 3)),
       st.sampled_from(["linear", "ties", "svd", "dare_linear", "magnitude_prune"]))
def test_one_adapter_is_scaled_exactly(exact_model, weight, combination_type):
    pm = exact_model
    with quiet():  # any type with one adapter becomes 'linear' (as in peft), with a warning
        pm.add_weighted_adapter(["b"], [weight], "merged", combination_type=combination_type, density=0.3)
    try:
        layer = pm.base_model.model.lin0
        torch.testing.assert_close(layer.get_delta_weight("merged"), weight * layer.get_delta_weight("b"),
                                   atol=1e-6, rtol=1e-5)
    finally:
        pm.delete_adapter("merged")


def test_negative_weights_subtract(exact_model):
    pm = exact_model
    pm.add_weighted_adapter(["a", "a"], [1.0, -1.0], "merged", combination_type="cat")
    try:
        assert pm.base_model.model.lin0.get_delta_weight("merged").abs().max() < 1e-7
    finally:
        pm.delete_adapter("merged")


# ---------------------------------------------------------------------------------------------------
# cross terms
# ---------------------------------------------------------------------------------------------------
def test_linear_error_is_exactly_the_cross_terms():
    pm = build("peftlab", "mlp", dict(list(CASES[0][2].items())[:2]))
    weights = [1.5, -0.7]
    errors = cross_term_error(pm, ["a", "b"], weights, "linear")
    assert set(errors) == {"lin0", "lin1"}
    pm.add_weighted_adapter(["a", "b"], weights, "merged", combination_type="linear")
    for key, layer in lora_layers(pm, "merged").items():
        fa, fb = layer_factors(layer, "a"), layer_factors(layer, "b")
        split = [factor_weights(w, f.scaling) for f, w in zip((fa, fb), weights)]
        extra = cross_terms([fa.A, fb.A], [fa.B, fb.B], [s[0] for s in split], [s[1] for s in split])
        exact = exact_delta(layer, ["a", "b"], weights)
        # B'A' = Σ wᵢ ΔWᵢ + Σ_{i≠j} B_i A_j (weighted)
        torch.testing.assert_close(layer.get_delta_weight("merged") - exact, extra, atol=1e-7, rtol=1e-5)
        assert errors[key] == pytest.approx((extra.norm() / exact.norm()).item(), rel=1e-4)
        assert errors[key] > 0.1  # not a small effect for unrelated adapters
    assert max(cross_term_error(pm, ["a", "b"], weights, "cat").values()) < 1e-6
    assert max(cross_term_error(pm, ["a", "b"], weights, "svd", svd_rank=4).values()) < 1e-5  # 2 + 2: full rank
    assert cross_term_error(pm, ["a", "b"], weights, "svd")["lin0"] > 0  # rank 2 < 4: truncated
    assert max(cross_term_error(pm, ["a"], [0.3], "linear").values()) < 1e-6  # one adapter: exact
    assert min(cross_term_error(pm, ["a", "b"], weights, "ties", density=0.5).values()) > 0


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def two_adapters():
    return build("peftlab", "mlp", {"a": dict(target_modules=["lin0"], r=2), "b": dict(target_modules=["lin0"], r=4)})


@pytest.mark.parametrize("kwargs, match", [
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="linear"), "same rank"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties_svd"), "needs density"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties_svd", density=0), r"outside \(0, 1\]"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="dare_ties_svd", density=1.2), r"outside \(0, 1\]"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="mean"), "valid types: svd, linear, cat, ties"),
    (dict(adapters=["a", "zz"], weights=[1, 1], combination_type="cat"), r"\['zz'\] do not exist"),
    (dict(adapters=["a", "b"], weights=[1], combination_type="cat"), "2 adapters and 1 weights"),
    (dict(adapters=["a", "b"], weights=[1, float("nan")], combination_type="cat"), "finite number"),
    (dict(adapters="a", weights=[1], combination_type="cat"), "non-empty list"),
    (dict(adapters=[], weights=[], combination_type="cat"), "non-empty list"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="svd", svd_rank=0), "positive integer"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties_svd", density=0.5,
          majority_sign_method="mass"), "'total', 'frequency'"),
])
def test_errors(two_adapters, kwargs, match):
    with pytest.raises(ValueError, match=match):
        two_adapters.add_weighted_adapter(adapter_name="merged", **kwargs)
    assert "merged" not in two_adapters.peft_config
    assert not lora_layers(two_adapters, "merged")


def test_existing_name_raises_where_peft_does_nothing(two_adapters):
    with pytest.raises(ValueError, match="already exists"):
        two_adapters.add_weighted_adapter(["a", "b"], [1, 1], "b", combination_type="cat")


def test_failure_leaves_no_half_merged_adapter(two_adapters):
    with pytest.raises(RuntimeError):  # svd drivers are CUDA-only: the SVD fails after the adapter was injected
        two_adapters.add_weighted_adapter(["a", "b"], [1, 1], "merged", combination_type="svd", svd_driver="gesvdj")
    assert "merged" not in two_adapters.peft_config
    assert not lora_layers(two_adapters, "merged")


def test_modules_to_save_shared_raises_single_warns():
    cfg = dict(target_modules=["lin0"], modules_to_save=["lin1"], r=2)
    pm = build("peftlab", "mlp", {"a": cfg, "b": cfg, "c": dict(target_modules=["lin0"], r=2)})
    with pytest.raises(ValueError, match="modules_to_save"):
        pm.add_weighted_adapter(["a", "b"], [1, 1], "merged", combination_type="cat")
    with pytest.warns(UserWarning, match="fresh copies"):
        pm.add_weighted_adapter(["a", "c"], [1, 1], "merged", combination_type="cat")


# ---------------------------------------------------------------------------------------------------
# extensions and deliberate divergences from peft
# ---------------------------------------------------------------------------------------------------
def test_seed_makes_dare_reproducible():
    deltas = []
    for global_seed in (0, 1):
        pm = build("peftlab", "mlp", dict(list(CASES[0][2].items())[:2]))
        torch.manual_seed(global_seed)  # the global RNG does not matter once seed is given
        pm.add_weighted_adapter(["a", "b"], [1, 1], "merged", combination_type="dare_ties", density=0.5, seed=7)
        deltas.append(pm.base_model.model.lin0.get_delta_weight("merged"))
    assert torch.equal(deltas[0], deltas[1])


def test_rank_pattern_sources_give_a_consistent_config(tmp_path):
    adapters = {n: dict(target_modules=["lin0", "lin1"], r=2, lora_alpha=4, rank_pattern={"lin1": 1},
                        alpha_pattern={"lin1": 3}) for n in ("a", "b")}
    pm = build("peftlab", "mlp", adapters)
    pm.add_weighted_adapter(["a", "b"], [1.0, 0.5], "merged", combination_type="linear")
    assert pm.base_model.model.lin1.r["merged"] == 1 and pm.base_model.model.lin1.scaling["merged"] == 1.0
    pm.save_pretrained(tmp_path, selected_adapters=["merged"])
    pm.set_adapter("merged")
    x = example_inputs("mlp")
    for lib in (peft, peftlab):  # peft 0.21 itself writes r=2 for lin1 here, with rank-1 tensors
        with quiet():
            loaded = lib.PeftModel.from_pretrained(base_model("mlp"), tmp_path / "merged")
        torch.testing.assert_close(output(loaded, x), output(pm, x), atol=1e-6, rtol=1e-6)


@pytest.mark.peer
def test_rslora_sources_merge_with_scaling_one():
    adapters = {"a": dict(target_modules=["lin0"], r=4, lora_alpha=8, use_rslora=True),
                "b": dict(target_modules=["lin0"], r=4, lora_alpha=2, use_rslora=True)}
    pms = {lib: build(lib, "mlp", adapters) for lib in LIBS}
    for pm in pms.values():
        merge(pm, ["a", "b"], [1.0, 2.0], "cat")
    ours, ref = pms["peftlab"].base_model.model.lin0, pms["peft"].base_model.model.lin0
    for t_ours, t_ref in zip(factors(ours, "merged"), factors(ref, "merged")):
        torch.testing.assert_close(t_ours, t_ref)  # the same tensors ...
    assert ours.scaling["merged"] == 1.0 and not pms["peftlab"].peft_config["merged"].use_rslora
    assert ref.scaling["merged"] == pytest.approx(8 ** 0.5)  # ... but peft keeps rsLoRA: α/√r = 8/√8
    exact = exact_delta(ours, ["a", "b"], [1.0, 2.0])
    torch.testing.assert_close(ours.get_delta_weight("merged"), exact)
    torch.testing.assert_close(ref.get_delta_weight("merged"), 8 ** 0.5 * exact)


@pytest.mark.peer
def test_lora_bias_sources_merge_their_biases():
    adapters = {"a": dict(target_modules=["lin0"], r=2, lora_alpha=8, lora_bias=True),
                "b": dict(target_modules=["lin0"], r=2, lora_alpha=2, lora_bias=True)}
    pms = {lib: build(lib, "mlp", adapters) for lib in LIBS}
    for pm in pms.values():
        merge(pm, ["a", "b"], [1.0, -0.5], "cat")
    ours, ref = pms["peftlab"].base_model.model.lin0, pms["peft"].base_model.model.lin0
    expected = sum(w * ours.scaling[n] * ours.lora_B[n].bias for n, w in (("a", 1.0), ("b", -0.5)))
    torch.testing.assert_close(ours.lora_B["merged"].bias, expected)
    assert ref.lora_B["merged"].bias.abs().max() == 0  # peft 0.21 leaves the merged bias at zero
    # with the biases, the merged adapter computes exactly what the weighted sources compute
    x = torch.randn(3, 10)
    with torch.no_grad():
        want = sum(w * ours.scaling[n] * ours.lora_B[n](ours.lora_A[n](x)) for n, w in (("a", 1.0), ("b", -0.5)))
        got = ours.lora_B["merged"](ours.lora_A["merged"](x))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.peer
def test_svd_rank_above_layer_size_peft_breaks_peftlab_pads():
    adapters = {"a": dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=8),
                "b": dict(target_modules=["lin0", "lin1"], r=4, lora_alpha=2)}
    pms = {lib: build(lib, "mlp", adapters) for lib in LIBS}
    for pm in pms.values():
        merge(pm, ["a", "b"], [1.0, 1.0], "svd")  # new rank 4 > lin1's min(out, in) = 2
    ref = pms["peft"].base_model.model.lin1
    assert ref.lora_A["merged"].weight.shape[0] != ref.lora_B["merged"].weight.shape[1]
    with pytest.raises(RuntimeError):
        ref.get_delta_weight("merged")
    ours = pms["peftlab"].base_model.model.lin1
    torch.testing.assert_close(ours.get_delta_weight("merged"), exact_delta(ours, ["a", "b"], [1.0, 1.0]),
                               atol=1e-6, rtol=1e-5)  # rank 2 holds all of a 2-row ΔW: exact


def test_different_targets_merge_over_the_union():
    adapters = {"a": dict(target_modules=["lin0"], r=2), "b": dict(target_modules=["lin1"], r=2)}
    pm = build("peftlab", "mlp", adapters)
    pm.add_weighted_adapter(["a", "b"], [2.0, 3.0], "merged", combination_type="linear")
    assert pm.peft_config["merged"].target_modules == ["lin0", "lin1"]
    for key, layer in lora_layers(pm, "merged").items():
        torch.testing.assert_close(layer.get_delta_weight("merged"), exact_delta(layer, ["a", "b"], [2.0, 3.0]))


def test_dora_sources_are_rejected(two_adapters):
    two_adapters.peft_config["b"].use_dora = True  # as a DoRA adapter's config says
    with pytest.raises(ValueError, match=r"\['b'\] are DoRA adapters"):
        two_adapters.add_weighted_adapter(["a", "b"], [1, 1], "merged", combination_type="cat")
    assert "merged" not in two_adapters.peft_config


@pytest.mark.peer
@pytest.mark.parametrize("combination_type", ["svd", "magnitude_prune_svd"])  # density 1: both exact
def test_svd_types_on_conv1d(combination_type):
    adapters = {"a": dict(target_modules=["conv1d"], r=1, lora_alpha=2),
                "b": dict(target_modules=["conv1d"], r=1, lora_alpha=3)}
    ref = build("peft", "conv1d", adapters)
    merge(ref, ["a", "b"], [1.0, -2.0], combination_type, density=1.0)
    with pytest.raises(RuntimeError):  # peft 0.21's svd path flattens Conv2d only: broken factors (issue #3769)
        ref.base_model.model.conv1d.get_delta_weight("merged")
    ours = build("peftlab", "conv1d", adapters)
    merge(ours, ["a", "b"], [1.0, -2.0], combination_type, density=1.0, svd_rank=2)
    layer = ours.base_model.model.conv1d
    assert layer.lora_A["merged"].weight.shape == (2, 1, 2)  # (r, in, kernel)
    torch.testing.assert_close(layer.get_delta_weight("merged"), exact_delta(layer, ["a", "b"], [1.0, -2.0]),
                               atol=1e-6, rtol=1e-5)
