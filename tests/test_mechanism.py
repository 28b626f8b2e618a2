"""The shared adapter mechanism, tested with methods that exist only here.

* a method whose adapters use different containers (LoKr's case: a full ``lokr_w1`` or the factors
  ``lokr_w1_a``/``lokr_w1_b``) is found by forward, merge, delete, mixed batches and save/load;
* the registry: config dispatch, unknown methods named with the known ones, the merge and mixed-batch flags,
  the state-dict hooks;
* ``TargetingConfig``: one validation of the shared fields, fields a method lacks in peft.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import base_model, fill_method_tensors, output
from torch import nn

from peftlab import AutoPeftModel, AutoPeftModelForCausalLM, LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftlab.config import TargetingConfig
from peftlab.registry import MethodSpec, get_method, known_methods, register_method, unregister_method
from peftlab.tuners.base import AdapterLayer, BaseTuner
from peftlab.utils.save_and_load import get_peft_model_state_dict


# ---------------------------------------------------------------------------------------------------
# a throw-away method with two tensor layouts per adapter
# ---------------------------------------------------------------------------------------------------
@dataclass
class TwoLayoutConfig(TargetingConfig):
    """ΔW = W_full (when r >= min(in, out)) or W_a W_b (rank r): two layouts, chosen per adapter."""

    PEFT_TYPE = "TWOLAYOUT"
    RANK_FIELD, ALPHA_FIELD, INIT_FIELD = "r", None, None
    ABSENT_FIELDS = frozenset({"alpha_pattern", "bias"})

    r: int = 2


class TwoLayoutLayer(AdapterLayer):
    # the full form comes first: a low-rank adapter has no entry in the first container
    adapter_layer_names = ("toy_w", "toy_w_a", "toy_w_b")
    other_param_names = ("r",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int) -> None:
        super().__init__(base_layer)
        self.toy_w = nn.ParameterDict()
        self.toy_w_a = nn.ParameterDict()
        self.toy_w_b = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.update_layer(adapter_name, r)
        self.set_adapter([adapter_name])

    def update_layer(self, adapter_name: str, r: int) -> None:
        kw = self._new_tensor_kwargs()
        self.r[adapter_name] = r
        if r >= min(self.in_features, self.out_features):
            self.toy_w[adapter_name] = nn.Parameter(torch.zeros(self.out_features, self.in_features, **kw))
        else:
            self.toy_w_a[adapter_name] = nn.Parameter(torch.zeros(self.out_features, r, **kw))
            self.toy_w_b[adapter_name] = nn.Parameter(torch.zeros(r, self.in_features, **kw))
        self._record_adapter(adapter_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.toy_w:
            return self.toy_w[adapter_name]
        return self.toy_w_a[adapter_name] @ self.toy_w_b[adapter_name]

    def adapter_forward(self, x: torch.Tensor, adapters, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in adapters:
            result = result + x @ self.get_delta_weight(name).T
        return result


class TwoLayoutModel(BaseTuner):
    layer_dispatch = (((nn.Linear,), TwoLayoutLayer),)
    renamed_on_disk: dict[str, str] = {}  # filled by a test of the state-dict hooks

    def layer_kwargs(self, config: TwoLayoutConfig, key: str, target: nn.Module) -> dict[str, Any]:
        r, _ = config.rank_and_alpha(key)
        return {"r": r}

    @classmethod
    def state_dict_for_save(cls, model, state, adapter_name, config):
        return {k.replace(old, new): v for k, v in state.items() for old, new in [cls._rename()]}

    @classmethod
    def state_dict_for_load(cls, model, state, adapter_name, config):
        return {k.replace(new, old): v for k, v in state.items() for old, new in [cls._rename()]}

    @classmethod
    def _rename(cls) -> tuple[str, str]:
        return next(iter(cls.renamed_on_disk.items()), ("", ""))


@pytest.fixture
def two_layout():
    spec = register_method(MethodSpec(peft_type="TWOLAYOUT", config_class=TwoLayoutConfig,
                                      tuner_class=TwoLayoutModel, prefix="toy_"))
    yield spec
    unregister_method("TWOLAYOUT")
    TwoLayoutModel.renamed_on_disk = {}


def two_adapters() -> PeftModel:
    """lin0 (10 -> 20) with a low-rank adapter "low" (r=2) and a full one "full" (r=10), both non-zero."""
    model = get_peft_model(base_model("mlp"), TwoLayoutConfig(target_modules=["lin0"], r=2), adapter_name="low")
    model.add_adapter("full", TwoLayoutConfig(target_modules=["lin0"], r=10))
    fill_method_tensors(model, ("toy_",))
    return model.eval()


def test_alternative_layouts_are_found_by_forward_merge_delete_and_save(two_layout, tmp_path):
    model = two_adapters()
    layer = model.base_model.model.lin0
    assert layer.adapter_names == ["low", "full"]
    assert "low" not in layer.toy_w and "full" not in layer.toy_w_a  # the two layouts
    x = torch.randn(3, 10)
    base = output(model.base_model.model.lin0.base_layer, x)
    for name in ("low", "full"):
        model.set_adapter(name)
        expected = base + x @ layer.get_delta_weight(name).T.detach()
        assert not torch.allclose(expected, base)
        torch.testing.assert_close(output(layer, x), expected)  # forward finds the adapter
        # merge finds it too: merged output equals unmerged, unmerge restores
        w = layer.get_base_layer().weight.detach().clone()
        full_out = output(model, x)
        model.merge_adapter()
        assert layer.merged_adapters == [name]
        torch.testing.assert_close(output(model, x), full_out, atol=1e-5, rtol=0)
        model.unmerge_adapter()
        torch.testing.assert_close(layer.get_base_layer().weight, w, atol=1e-6, rtol=0)
    # mixed batch: each row through its own layout
    mixed = output(model, torch.cat([x[:1], x[1:2]]), adapter_names=["low", "full"])
    model.set_adapter("low")
    torch.testing.assert_close(mixed[0], output(model, x)[0])
    # save both, reload both, same outputs
    model.save_pretrained(tmp_path)
    low = get_peft_model_state_dict(model, adapter_name="low")
    full = get_peft_model_state_dict(model, adapter_name="full")
    assert sorted(low) == ["base_model.model.lin0.toy_w_a", "base_model.model.lin0.toy_w_b"]
    assert sorted(full) == ["base_model.model.lin0.toy_w"]
    loaded = PeftModel.from_pretrained(base_model("mlp"), tmp_path / "low", adapter_name="low")
    loaded.load_adapter(tmp_path / "full", adapter_name="full")
    for name in ("low", "full"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        # (the model's base went through merge + unmerge above: equal up to round-off)
        torch.testing.assert_close(output(loaded, x), output(model, x), atol=1e-6, rtol=0)
    # delete: the low-rank adapter leaves nothing behind, the full one still works
    model.set_adapter("full")
    model.delete_adapter("low")
    assert layer.adapter_names == ["full"]
    assert not [k for k in model.state_dict() if "low" in k.split(".")]
    torch.testing.assert_close(output(layer, x), base + x @ layer.get_delta_weight("full").T.detach(), atol=1e-6, rtol=0)


def test_state_dict_hooks_rename_on_save_and_back_on_load(two_layout, tmp_path):
    TwoLayoutModel.renamed_on_disk = {"toy_w_a": "toy_left"}
    model = two_adapters()
    model.save_pretrained(tmp_path, selected_adapters=["low"])
    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "low" / "adapter_model.safetensors"))
    assert keys == ["base_model.model.lin0.toy_left", "base_model.model.lin0.toy_w_b"]
    loaded = PeftModel.from_pretrained(base_model("mlp"), tmp_path / "low", adapter_name="low")
    model.set_adapter("low")
    x = torch.randn(2, 10)
    torch.testing.assert_close(output(loaded, x), output(model, x), atol=0, rtol=0)


def test_is_target_hook_lets_a_method_match_its_own_way(two_layout):
    """A tuner's ``is_target`` replaces the shared target_modules rules (LLaMA-Adapter reads a string as a name
    suffix, not a regex); filter_targets then sees only what it matched."""
    seen: list[list[str]] = []

    class PrefixModel(TwoLayoutModel):
        def is_target(self, config, key):  # a toy rule: the name *starts* with the string
            return key.startswith(config.target_modules)

        def filter_targets(self, config, keys):
            seen.append(list(keys))
            return keys

    spec = register_method(MethodSpec(peft_type="TWOLAYOUT", config_class=TwoLayoutConfig, tuner_class=PrefixModel,
                                      prefix="toy_"))
    try:
        # the shared rules read a string as a regex that must match the whole name: "lin" matches nothing
        model = get_peft_model(base_model("mlp"), TwoLayoutConfig(target_modules="lin", r=2))
        assert seen == [["lin0", "lin1"]]
        assert {n for n, m in model.named_modules() if isinstance(m, AdapterLayer)} == {
            "base_model.model.lin0", "base_model.model.lin1"}
    finally:
        register_method(two_layout)
        assert spec.peft_type == "TWOLAYOUT"


def test_method_flags_refuse_merge_and_mixed_batches(tmp_path):
    spec = register_method(MethodSpec(peft_type="TWOLAYOUT", config_class=TwoLayoutConfig, tuner_class=TwoLayoutModel,
                                      prefix="toy_", supports_merge=False, supports_mixed_batch=False))
    try:
        model = two_adapters()
        w = model.base_model.model.lin0.get_base_layer().weight.detach().clone()
        for call in (model.merge_adapter, model.merge_and_unload):
            with pytest.raises(ValueError, match="TWOLAYOUT adapters have no weight form"):
                call()
        assert torch.equal(model.base_model.model.lin0.get_base_layer().weight, w)
        with pytest.raises(ValueError, match="cannot serve mixed batches"):
            model(torch.randn(2, 10), adapter_names=["low", "full"])
        plain = model.unload()  # unloading needs no merge
        assert isinstance(plain.lin0, nn.Linear)
        assert spec.tuner_class.method is spec
    finally:
        unregister_method("TWOLAYOUT")


def test_the_merge_refusal_is_in_merge_not_in_the_math():
    """AdapterLayer.merge runs the method's check_mergeable before anything changes, so a layer merged on its own
    (not through merge_adapter) refuses as the model does, and merged_weights is the math alone: a lora_bias
    adapter on a bias-less layer gives b' = s·b_B there (what own_delta and check_merge read)."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="has no bias"):
        pm = get_peft_model(nn.Sequential(nn.Linear(6, 4, bias=False)), LoraConfig(target_modules=["0"], r=2,
                                                                                    lora_bias=True))
    layer = pm.base_model.model[0]
    for t in (layer.lora_B["default"].weight, layer.lora_B["default"].bias):
        nn.init.normal_(t)
    W = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        layer.merge()
    assert torch.equal(layer.get_base_layer().weight, W) and layer.get_base_layer().bias is None
    assert not layer.merged
    new_w, new_b = layer.merged_weights("default", W, None)
    torch.testing.assert_close(new_w, W + layer.get_delta_weight("default"), atol=1e-6, rtol=0)
    torch.testing.assert_close(new_b, layer.lora_B["default"].bias.detach() * layer.scaling["default"])


def test_a_layer_that_forgets_to_record_its_adapter_is_invisible():
    """The record is the contract: update_layer must end with _record_adapter (else forward skips it)."""

    class Forgetful(TwoLayoutLayer):
        def _record_adapter(self, adapter_name: str) -> None:
            pass

    layer = Forgetful(nn.Linear(4, 4), "a", r=4)
    assert layer.adapter_names == [] and "a" in layer.toy_w


# ---------------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------------
def test_registry_knows_lora_and_dispatches_configs(tmp_path):
    assert "LORA" in known_methods()
    spec = get_method("LORA")
    assert spec.config_class is LoraConfig and spec.prefix == "lora_" and spec.supports_merge
    assert get_method(LoraConfig()) is spec
    config = PeftConfig.from_dict({"peft_type": "LORA", "r": 4})
    assert type(config) is LoraConfig and config.r == 4
    assert config.peft_type == "LORA" and type(config.peft_type).__name__ == "PeftType"


@pytest.mark.parametrize("peft_type", ["VERA", "NOT_A_METHOD"])
def test_unknown_peft_type_lists_the_known_methods(tmp_path, peft_type):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": 4}))
    with pytest.raises(ValueError) as info:
        PeftConfig.from_pretrained(tmp_path)
    assert f"peft_type={peft_type!r}" in str(info.value) and "LORA" in str(info.value)
    model = base_model("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="known methods"):
        PeftModel.from_pretrained(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for auto in (AutoPeftModel, AutoPeftModelForCausalLM):  # the Auto classes read the registry before any base model
        with pytest.raises(ValueError, match="known methods"):
            auto.from_pretrained(tmp_path)


def test_a_config_without_peft_type_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(ValueError, match="no peft_type"):
        PeftConfig.from_pretrained(tmp_path)


def test_get_peft_model_refuses_an_unregistered_method():
    with pytest.raises(ValueError, match="TWOLAYOUT.*known methods"):
        get_peft_model(base_model("mlp"), TwoLayoutConfig(target_modules=["lin0"]))


def test_method_config_refuses_another_methods_file():
    with pytest.raises(ValueError, match="peft_type=LOHA, not LORA"):
        LoraConfig.from_dict({"peft_type": "LOHA", "r": 4})


# ---------------------------------------------------------------------------------------------------
# the shared targeting config
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    (dict(r=0), ["r=0", "positive integer"]),
    (dict(rank_pattern={"lin0": -1}), ["rank_pattern['lin0']=-1"]),
    (dict(target_modules=5), ["target_modules=5", "list of module names"]),
    (dict(modules_to_save="lin1"), ["modules_to_save='lin1'", "list of module names"]),
    (dict(layers_to_transform=[-1]), ["layers_to_transform=[-1]"]),
    (dict(target_modules=r"lin\d", layers_to_transform=[0]), ["regex"]),
    (dict(layers_pattern="layers"), ["layers_pattern needs layers_to_transform"]),
    (dict(alpha_pattern={"lin0": 2}), ["TWOLAYOUT has no 'alpha_pattern' option"]),
    (dict(bias="all"), ["TWOLAYOUT has no 'bias' option"]),
])
def test_shared_fields_are_validated_once_for_every_method(kwargs, words):
    with pytest.raises((ValueError, TypeError)) as info:
        TwoLayoutConfig(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_shared_fields_normalised_and_absent_fields_not_written():
    config = TwoLayoutConfig(target_modules=("lin1", "lin0", "lin1"), exclude_modules={"b", "a"},
                             modules_to_save=("head",))
    assert config.target_modules == ["lin0", "lin1"] and config.exclude_modules == ["a", "b"]
    assert config.modules_to_save == ["head"]
    data = config.to_dict()
    assert "alpha_pattern" not in data and "bias" not in data and "rank_pattern" in data
    assert {f.name for f in dataclasses.fields(LoraConfig)} >= {f.name for f in dataclasses.fields(TargetingConfig)}


def test_bias_modes_are_the_methods_own():
    with pytest.raises(ValueError, match="'none', 'all', 'lora_only'"):
        LoraConfig(bias="oft_only")


# ---------------------------------------------------------------------------------------------------
# per-step work of a method (AdaLoRA's allocation) and keys a method's file carries at their defaults
# ---------------------------------------------------------------------------------------------------
def test_step_hooks_find_tuners_that_act_per_step():
    """``step_hooks`` returns ``on_optimizer_step`` of the tuners that override it (none for LoRA); the lab's
    training loop calls each after every optimizer step with the 0-based step, before the user's on_step."""
    from peftlab.lab.train import train
    from peftlab.tuners.base import step_hooks

    lora = get_peft_model(base_model("mlp"), LoraConfig(target_modules=["lin0"]))
    assert step_hooks(lora) == []
    calls: list[tuple[str, int]] = []

    class Counting(type(lora.base_model)):
        def on_optimizer_step(self, global_step: int) -> None:
            assert all(p.grad is not None for p in self.parameters() if p.requires_grad)  # before zero_grad
            calls.append(("tuner", global_step))

    lora.base_model.__class__ = Counting
    assert step_hooks(lora) == [lora.base_model.on_optimizer_step]
    x = torch.randn(4, 10)
    train(lora, lambda step: (x, torch.zeros(4, dtype=torch.long)), steps=3, progress=False,
          on_step=lambda step, m, loss, opt: calls.append(("user", step)))
    assert calls == [("tuner", 0), ("user", 0), ("tuner", 1), ("user", 1), ("tuner", 2), ("user", 2)]


def test_file_defaults_are_accepted_only_at_their_default():
    @dataclass
    class WithFileDefaults(TargetingConfig):
        PEFT_TYPE = "LORA"
        FILE_DEFAULTS = {"use_rslora": False, "eva_config": None}

    data = {"target_modules": ["lin0"], "use_rslora": False, "eva_config": {}}
    config = WithFileDefaults.from_dict(data)
    assert config.to_dict()["use_rslora"] is False and config.to_dict()["eva_config"] is None
    with pytest.raises(ValueError, match="use_rslora=True.*only its default False"):
        WithFileDefaults.from_dict({**data, "use_rslora": True})


# ---------------------------------------------------------------------------------------------------
# per-token adapter weights (the hook X-LoRA's gate uses)
# ---------------------------------------------------------------------------------------------------
class _Fixed:
    """TokenWeights for one layer: the given weights there, nothing elsewhere."""

    def __init__(self, layer, weights):
        self.layer, self.weights = layer, weights

    def weights_for(self, layer):
        return self.weights if layer is self.layer else None


@pytest.mark.parametrize("method", ["toy", "lora"])
def test_token_weights_give_base_plus_weighted_deltas(two_layout, method):
    """w per token and adapter: base(x) + Σ_a w_a·Δ_a(x), through the generic ``adapter_delta`` (toy method) or a
    method's own (LoRA); adapters a layer lacks are skipped; layers the weights do not name are unchanged."""
    from peftlab.tuners.routing import token_weights

    if method == "toy":
        model = two_adapters()
        names = ["low", "full"]
    else:
        model = get_peft_model(base_model("mlp"), LoraConfig(target_modules=["lin0"], r=2), adapter_name="low")
        model.add_adapter("full", LoraConfig(target_modules=["lin0"], r=4))
        fill_method_tensors(model, ("lora_",))
        names = ["low", "full"]
    model.eval()
    layer = model.base_model.model.lin0
    x = torch.randn(3, 5, layer.in_features)
    w = {"low": torch.rand(3, 5, 1), "full": torch.rand(3, 5, 1), "absent": torch.rand(3, 5, 1)}
    with torch.no_grad():
        base = layer.base_layer(x)
        deltas = {n: layer.adapter_forward(x, [n]) - base for n in names}
        expected = base + sum(w[n] * deltas[n] for n in names)
        with token_weights(_Fixed(layer, w)):
            got = layer(x)
        with token_weights(_Fixed(object(), w)):
            untouched = layer(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(untouched, layer(x))
        with token_weights(_Fixed(layer, {})):  # no weights: the base layer alone
            assert torch.equal(layer(x), base)


def test_training_forward_through_a_merged_adapter_warns_once():
    """A merged adapter is a constant in the base weight: a training forward says its tensors get no gradient (once
    per layer and adapter), and they get none; an unmerged active adapter next to it trains silently."""
    import warnings as _w

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    pm = get_peft_model(net, LoraConfig(target_modules=["0", "2"], init_lora_weights=False))
    pm.add_adapter("other", LoraConfig(target_modules=["0", "2"], init_lora_weights=False))
    pm.base_model.set_adapter(["default", "other"])
    pm.merge_adapter(["default"])
    pm.train()
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="'default' is merged .* receive no gradient") as caught:
        pm(x).sum().backward()
    assert len([w for w in caught if "receive no gradient" in str(w.message)]) == 2  # one per adapted layer
    grads = {n: p.grad for n, p in pm.named_parameters() if "lora_" in n}
    assert all(g is None for n, g in grads.items() if ".default." in n)
    assert all(g is not None for n, g in grads.items() if ".other." in n)
    with _w.catch_warnings():
        _w.simplefilter("error")
        pm(x).sum().backward()  # said once
        pm.eval()
        pm(x)
