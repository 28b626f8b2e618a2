"""The fast paths compute what the plain ones compute.

* the fused LoRA autograd node (training) equals base + s·B A x in value and in every gradient;
* the batched (bmm) mixed-adapter forward equals running each row through its own adapter, with
  ``__base__`` rows, adapters a layer lacks, and the per-adapter fallback (unequal ranks, dropout);
* fused DoRA equals the reference formula; merged forward equals unmerged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.tuners.lora.dora import reference_weight_norm
from peftlab.tuners.lora.layer import Linear as LoraLinear
from peftlab.tuners.lora.layer import LoraLinearFunction


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 16, bias=bias)
        self.lin1 = nn.Linear(16, 8, bias=bias)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.lin1(F.relu(self.lin0(x)))))


def _randomise(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _peft(r=4, targets=("lin0", "lin1"), **kw):
    torch.manual_seed(0)
    cfg = peftlab.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **kw)
    return peftlab.get_peft_model(MLP(), cfg)


# ---- the fused LoRA training node ----------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("base_trains", [False, True])
@pytest.mark.parametrize("tokens", [(3, 5), (1, 1)])  # T·(in + out) above in·out: merged weight; below: low-rank
def test_fused_lora_function_matches_autograd(bias: bool, base_trains: bool, tokens: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(*tokens, 12, requires_grad=True)
    W = torch.randn(16, 12, requires_grad=base_trains)
    b = torch.randn(16, requires_grad=base_trains) if bias else None
    A = torch.randn(4, 12, requires_grad=True)
    B = torch.randn(16, 4, requires_grad=True)
    s = 0.7
    plain = F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)
    fused = LoraLinearFunction.apply(x, W, b, A, B, s)
    assert fused.grad_fn._forward_cls is LoraLinearFunction  # the node itself, not a fallback
    assert fused.grad_fn.merged == (tokens == (3, 5))  # the backward node is the ctx of the forward
    torch.testing.assert_close(fused, plain)
    g = torch.randn_like(plain)
    inputs = [t for t in (x, W, b, A, B) if t is not None and t.requires_grad]
    want = torch.autograd.grad(plain, inputs, g)
    got = torch.autograd.grad(fused, inputs, g)
    for w, h in zip(want, got):
        torch.testing.assert_close(h, w)


def test_training_step_uses_the_fused_node_and_matches_plain_path() -> None:
    model = _peft()
    _randomise(model)
    x = torch.randn(6, 12)
    out = model(x)
    layer = model.base_model.model.lin0
    assert isinstance(layer, LoraLinear)
    assert type(layer(x).grad_fn).__name__.startswith("LoraLinearFunction")
    out.sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with torch.no_grad():  # the plain path's value
        plain_out = model(x)
    torch.testing.assert_close(out, plain_out)
    # the plain path's gradients: dropout module (not Identity) disables the fused node, p = 0 keeps the math
    for layer in (model.base_model.model.lin0, model.base_model.model.lin1):
        layer.lora_dropout["default"] = nn.Dropout(0.0)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast[n], p.grad, msg=n)


# ---- mixed batches -------------------------------------------------------------------------------
@pytest.fixture
def batched(monkeypatch):
    """The opt-in batched (bmm) mixed-batch path; the default path is the exact per-adapter forward."""
    monkeypatch.setattr(LoraLinear, "batched_mixed_batches", True)


def _multi(ranks=(4, 4, 4), dropout: float = 0.0, lin1_for_c: bool = True):
    torch.manual_seed(0)
    model = peftlab.get_peft_model(MLP(), peftlab.LoraConfig(r=ranks[0], lora_alpha=8, target_modules=["lin0", "lin1"],
                                                             lora_dropout=dropout), adapter_name="a")
    model.add_adapter("b", peftlab.LoraConfig(r=ranks[1], lora_alpha=4, target_modules=["lin0", "lin1"],
                                              lora_dropout=dropout))
    model.add_adapter("c", peftlab.LoraConfig(r=ranks[2], lora_alpha=8, use_rslora=True, lora_dropout=dropout,
                                              target_modules=["lin0", "lin1"] if lin1_for_c else ["lin0"]))
    _randomise(model)
    return model.eval()


def _per_adapter(model, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(x[i:i + 1]))
        else:
            model.set_adapter(name)
            rows.append(model(x[i:i + 1]))
    return torch.cat(rows)


@pytest.mark.parametrize("shape", [(7, 12), (7, 3, 12)])
@pytest.mark.parametrize("case", ["equal_ranks", "unequal_ranks", "adapter_missing_in_a_layer"])
def test_mixed_batch_equals_per_adapter_runs(shape, case: str, batched) -> None:
    model = _multi(ranks=(4, 2, 6) if case == "unequal_ranks" else (4, 4, 4),
                   lin1_for_c=case != "adapter_missing_in_a_layer")
    x = torch.randn(*shape)
    names = ["a", "b", "__base__", "c", "a", "c", "__base__"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        want = _per_adapter(model, x, names)
    torch.testing.assert_close(mixed, want)


@pytest.mark.parametrize("shape", [(6, 12), (6, 3, 12)])
@pytest.mark.parametrize("names", [["a", "b", "c", "b", "c", "a"], ["b", "a", "c"], ["a", "a", "b", "b", "c", "c"]])
def test_batched_segments_equal_per_adapter_runs(shape, names, batched) -> None:
    """Rows in runs of one adapter each (one request per adapter; beam search repeats each) read the stacks in place,
    without the per-row gather; repeated or interleaved adapters take the gather. Both equal the per-row runs."""
    from peftlab.tuners.routing import Routing, mixed_batch
    model = _multi()
    x = torch.randn(*shape)
    segmented = Routing(names).segment_rows(shape[0], tuple(dict.fromkeys(names)))
    assert (segmented is not None) == (names != ["a", "b", "c", "b", "c", "a"])
    with torch.no_grad():
        with mixed_batch(names):  # 3 names for 6 rows: each name covers two rows in turn
            mixed = model.base_model(x)
        want = _per_adapter(model, x, [n for n in names for _ in range(shape[0] // len(names))])
    torch.testing.assert_close(mixed, want)


def test_stack_cache_follows_added_and_deleted_adapters(batched) -> None:
    model = _multi()
    x = torch.randn(3, 12)
    names = ["a", "b", "c"]
    with torch.no_grad():
        model(x, adapter_names=names)
        model.delete_adapter("b")
        model.add_adapter("b", peftlab.LoraConfig(r=4, lora_alpha=4, target_modules=["lin0", "lin1"]))  # as before
        torch.testing.assert_close(model(x, adapter_names=names), _per_adapter(model, x, names))
        model.base_model.model.lin0.set_scale("c", 3.0)
        torch.testing.assert_close(model(x, adapter_names=names), _per_adapter(model, x, names))


def test_batched_path_is_taken_and_falls_back(batched) -> None:
    model = _multi()
    layer = model.base_model.model.lin0
    calls = []
    original = LoraLinear._stacked

    def spy(self, names, x):
        out = original(self, names, x)
        calls.append(out is not None)
        return out

    LoraLinear._stacked = spy
    try:
        with torch.no_grad():
            model(torch.randn(3, 12), adapter_names=["a", "b", "c"])
        assert calls and all(calls)  # equal ranks: batched products
        calls.clear()
        _multi(ranks=(4, 2, 4))(torch.randn(3, 12), adapter_names=["a", "b", "c"])
        assert calls and not any(calls)  # unequal ranks: the per-adapter loop
    finally:
        LoraLinear._stacked = original
    assert layer._stacked(("a", "b"), torch.randn(2, 12)) is not None


def test_mixed_batch_with_active_dropout_falls_back_and_trains(batched) -> None:
    model = _multi(dropout=0.1).train()
    layer = model.base_model.model.lin0
    assert layer._stacked(("a", "b", "c"), torch.randn(2, 12)) is None
    model(torch.randn(3, 12), adapter_names=["a", "b", "c"]).sum().backward()


def test_cached_stacks_are_not_used_with_active_dropout(batched) -> None:
    """Stacks built in eval mode are not reused once the model trains with dropout (even without gradients)."""
    model = _multi(dropout=0.1)
    layer = model.base_model.model.lin0
    x = torch.randn(3, 12)
    with torch.no_grad():
        model(x, adapter_names=["a", "b", "c"])
        assert layer._stacked(("a", "b", "c"), x) is not None  # eval: dropout is the identity
        model.train()
        assert layer._stacked(("a", "b", "c"), x) is None


def test_mixed_batch_gradients_match_grouped_loop(monkeypatch, batched) -> None:
    model = _multi()
    model.set_adapter(["a", "b", "c"])  # trainable
    x = torch.randn(4, 12)
    names = ["a", "b", "c", "__base__"]
    model(x, adapter_names=names).sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(fast) == 12  # A and B of three adapters in two layers
    model.zero_grad()
    monkeypatch.setattr(LoraLinear, "_stacked", lambda self, names, x: None)  # the per-adapter loop
    model(x, adapter_names=names).sum().backward()
    for n, g in fast.items():
        torch.testing.assert_close(g, model.get_parameter(n).grad, msg=n)


def test_stack_cache_follows_weight_updates(batched) -> None:
    model = _multi()
    x = torch.randn(3, 12)
    names = ["a", "b", "c"]
    with torch.no_grad():
        before = model(x, adapter_names=names)
        model.base_model.model.lin0.lora_B["b"].weight.mul_(2)
        after = model(x, adapter_names=names)
        want = _per_adapter(model, x, names)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want)


def _same_scaling():
    torch.manual_seed(0)
    model = peftlab.get_peft_model(MLP(), peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]),
                                   adapter_name="a")
    for n in ("b", "c"):
        model.add_adapter(n, peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]))
    _randomise(model)
    return model.eval()


@pytest.mark.parametrize("names", [["a", "b", "c"], ["c", "a", "__base__", "a"]])
def test_one_scaling_for_all_adapters(names, batched) -> None:
    """Equal scalings fold into the product (alpha); unequal ones scale each row (the other tests' models)."""
    model = _same_scaling()
    x = torch.randn(len(names), 12)
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        assert isinstance(model.base_model.model.lin0._stacked(tuple(dict.fromkeys(names)), x)[-1], float)
        torch.testing.assert_close(mixed, _per_adapter(model, x, names))


def test_batched_path_keeps_base_layer_backward_hooks(batched) -> None:
    """A full backward hook on the base layer sees its gradients on the batched path too."""
    model = _multi()
    for p in model.parameters():
        p.requires_grad_(False)
    seen = []
    handle = model.base_model.model.lin0.base_layer.register_full_backward_hook(lambda m, gi, go: seen.append(go[0]))
    x = torch.randn(3, 12, requires_grad=True)
    try:
        model(x, adapter_names=["a", "b", "c"]).sum().backward()
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == (3, 16)


@pytest.mark.parametrize("where", ["module", "global"])
def test_batched_path_keeps_base_layer_hooks(where: str, batched) -> None:
    """The batched path calls the base product directly only when no forward hook watches the base layer."""
    model = _multi()
    names = ["a", "b", "c"]
    x = torch.randn(3, 12)
    hook = lambda mod, inp, out: out + 1.0 if isinstance(mod, nn.Linear) and mod.in_features == 12 else None  # noqa: E731
    base = model.base_model.model.lin0.base_layer
    handle = (base.register_forward_hook(hook) if where == "module"
              else torch.nn.modules.module.register_module_forward_hook(hook))
    try:
        with torch.no_grad():
            got = model(x, adapter_names=names)
            want = _per_adapter(model, x, names)
    finally:
        handle.remove()
    with torch.no_grad():
        assert not torch.allclose(got, model(x, adapter_names=names))  # the hook did act
    torch.testing.assert_close(got, want)


def _shares_storage(t: torch.Tensor, stack: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()


def test_resident_stacks_are_the_weights(batched) -> None:
    """Without gradients to record, the adapters' weights move into the stacks (one copy, not two), so an in-place
    update is in the stack with nothing to check."""
    model = _multi()
    layer = model.base_model.model.lin0
    names = ("a", "b", "c")
    x = torch.randn(3, 12)
    with torch.inference_mode():
        model(x, adapter_names=list(names))
        _, A, B, *_ = layer._stacked(names, x)  # the cached stacks
    for i, n in enumerate(names):
        assert _shares_storage(layer.lora_A[n].weight, A) and _shares_storage(layer.lora_B[n].weight, B)
        assert torch.equal(layer.lora_A[n].weight, A[i]) and layer.lora_A[n].weight.is_contiguous()
    assert not A.is_inference()  # built under inference_mode, still usable for training
    with torch.no_grad():
        layer.lora_A["b"].weight.mul_(-2)  # as an optimizer step would
        torch.testing.assert_close(model(x, adapter_names=list(names)), _per_adapter(model, x, list(names)))


@pytest.mark.parametrize("how", ["assign", "setattr", "parameters_dict", "delete_and_register"])
def test_replaced_weight_drops_the_stacks(how: str, batched) -> None:
    """A weight replaced in its module (load_state_dict(assign=True), offloading hooks, by hand) is not the tensor in
    the stack; the stacks are built again. (Before resident stacks, the version check missed this: stale rows.)"""
    model = _multi()
    names = ["a", "b", "c"]
    x = torch.randn(3, 12)
    with torch.no_grad():
        model(x, adapter_names=names)
        module = model.base_model.model.lin0.lora_B["b"]
        new = nn.Parameter(torch.randn_like(module.weight))
        if how == "assign":
            model.load_state_dict({"base_model.model.lin0.lora_B.b.weight": new}, strict=False, assign=True)
        elif how == "setattr":
            module.weight = new
        elif how == "parameters_dict":
            module._parameters["weight"] = new
        else:
            del module.weight
            module.register_parameter("weight", new)
        assert model.base_model.model.lin0.lora_B["b"].weight is new
        torch.testing.assert_close(model(x, adapter_names=names), _per_adapter(model, x, names))


@pytest.mark.parametrize("what", ["adapter_module", "module_dict", "by_name"])
def test_cast_of_an_adapter_module_drops_the_stacks(what: str, batched) -> None:
    """``.to``/``.double()`` called on an adapter's own module (below the LoRA layer, as scripts that cast every
    ``lora_`` module do) gives its weights new storage outside the stack: the stacks are built again, and an
    update of the cast weight reaches the next mixed batch. (Only a cast through the LoRA layer was seen before.)"""
    model = _multi()
    names = ["a", "b", "c"]
    x = torch.randn(3, 12)
    layer = model.base_model.model.lin0
    with torch.no_grad():
        model(x, adapter_names=names)
        if what == "adapter_module":
            layer.lora_A["b"].double()
            layer.lora_B["b"].double()
        elif what == "module_dict":
            layer.lora_A.double()
            layer.lora_B.double()
        else:
            for name, module in model.named_modules():
                if "lora_" in name:
                    module.to(torch.float64)
        layer.lora_B["b"].weight.mul_(3.0)  # lands in the cast weight, not in an old stack
        torch.testing.assert_close(model(x, adapter_names=names), _per_adapter(model, x, names))


def test_load_in_swap_mode_drops_the_stacks(batched) -> None:
    """Under ``torch.__future__.set_swap_module_params_on_conversion(True)`` a load with ``assign=True`` swaps each
    parameter's contents (same object, new storage, no write to the parameter dict): the stacks are built again."""
    model = _multi()
    names = ["a", "b", "c"]
    x = torch.randn(3, 12)
    key = "base_model.model.lin0.lora_B.b.weight"
    new = torch.randn_like(model.get_parameter(key))
    with torch.no_grad():
        model(x, adapter_names=names)
        before = model.get_parameter(key)
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            model.load_state_dict({key: new}, strict=False, assign=True)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(False)
        assert torch.equal(model.get_parameter(key), new) and model.get_parameter(key) is before
        torch.testing.assert_close(model(x, adapter_names=names), _per_adapter(model, x, names))


def test_copies_watch_their_own_weights(tmp_path, batched) -> None:
    """A deepcopy or a pickled copy of a model that served watches its own adapter modules: casting the copy's
    adapter rebuilds the copy's stacks, and the original keeps serving its own weights."""
    model = _multi()
    names = ["a", "b", "c"]
    x = torch.randn(3, 12)
    with torch.no_grad():
        want = model(x, adapter_names=names)
        torch.save(model, tmp_path / "model.pt")
        copies = [copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)]
        for twin in copies:
            layer = twin.base_model.model.lin0
            torch.testing.assert_close(twin(x, adapter_names=names), want)
            layer.lora_A["b"].double()
            layer.lora_B["b"].double()
            layer.lora_B["b"].weight.mul_(3.0)
            torch.testing.assert_close(twin(x, adapter_names=names), _per_adapter(twin, x, names))
        torch.testing.assert_close(model(x, adapter_names=names), want)


def test_functional_call_uses_the_given_weights(batched) -> None:
    model = _multi()
    names = ["a", "b", "c"]
    x = torch.randn(3, 12)
    key = "base_model.model.lin1.lora_A.c.weight"
    other = torch.randn_like(model.get_parameter(key))
    with torch.no_grad():
        model(x, adapter_names=names)
        got = torch.func.functional_call(model, {key: other}, (x,), {"adapter_names": names})
        again = model(x, adapter_names=names)
        want_again = _per_adapter(model, x, names)
        model.get_parameter(key).copy_(other)
        want = _per_adapter(model, x, names)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, want_again)


def test_dtype_change_and_copies_keep_stacks_right(batched) -> None:
    model = _multi()
    names = ["a", "b", "c"]
    x = torch.randn(3, 12)
    with torch.no_grad():
        model(x, adapter_names=names)
        model.double()  # new storage for every weight (_apply): the stacks go, and are built in float64
        xd = x.double()
        torch.testing.assert_close(model(xd, adapter_names=names), _per_adapter(model, xd, names))
        twin = copy.deepcopy(model)
        twin.base_model.model.lin0.lora_A["a"].weight.add_(1.0)  # the copy's stack, not the original's
        torch.testing.assert_close(model(xd, adapter_names=names), _per_adapter(model, xd, names))
        torch.testing.assert_close(twin(xd, adapter_names=names), _per_adapter(twin, xd, names))
        assert not torch.allclose(twin(xd, adapter_names=names), model(xd, adapter_names=names))


def test_training_after_serving_reaches_the_weights(batched) -> None:
    """Weights that live in a resident stack still train: with gradients recorded the stacks are built from them on
    every call (a weight made trainable after the stacks were built included), and an optimizer step lands in
    the stack that the next decode reads."""
    model = _multi()
    for p in model.parameters():
        p.requires_grad_(False)
    names = ["a", "b", "c", "__base__"]
    x = torch.randn(4, 12)
    model(x, adapter_names=names)  # grad mode, nothing trainable: the resident stacks
    model.set_adapter(["a", "b", "c"])  # now trainable
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x, adapter_names=names).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 12
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(model(x, adapter_names=names), _per_adapter(model, x, names))


def test_save_after_serving_round_trips(tmp_path, batched) -> None:
    model = _multi()
    names = ["a", "b", "c"]
    x = torch.randn(3, 12)
    with torch.no_grad():
        want = model(x, adapter_names=names)  # the weights now share each layer's stacks
    model.save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    fresh = peftlab.PeftModel.from_pretrained(MLP(), str(tmp_path / "a") if (tmp_path / "a").is_dir() else str(tmp_path),
                                              adapter_name="a")
    for n in ("b", "c"):
        fresh.load_adapter(str(tmp_path / n), adapter_name=n)
    fresh.base_model.model.load_state_dict(model.base_model.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x, adapter_names=names), want)


# ---- DoRA and merging ----------------------------------------------------------------------------
def test_fused_dora_equals_reference_formula() -> None:
    model = _peft(use_dora=True)
    _randomise(model)
    layer = model.base_model.model.lin0
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    x = torch.randn(5, 12)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s, m = layer.scaling["default"], layer.lora_magnitude_vector["default"].weight
    n = reference_weight_norm(layer, "default")
    want = (m / n) * (F.linear(x, W) + s * F.linear(F.linear(x, A), B)) + b  # h = (m/‖W + sBA‖)(W + sBA)x + b
    torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("dora", [False, True])
def test_merged_forward_equals_unmerged(dora: bool) -> None:
    model = _peft(use_dora=dora).eval()
    _randomise(model)
    x = torch.randn(5, 12)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        merged = model(x)
        model.unmerge_adapter()
        again = model(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=1e-4, atol=1e-5)


def test_fused_node_not_used_for_half_precision_base() -> None:
    model = copy.deepcopy(_peft())
    model.base_model.model.lin0.base_layer.to(torch.bfloat16)
    layer = model.base_model.model.lin0
    x = torch.randn(2, 12, dtype=torch.bfloat16)
    assert not layer._fusable("default", x)


@pytest.mark.parametrize("shape", [(7, 12), (7, 3, 12)])
def test_default_mixed_batch_is_exactly_the_per_adapter_forward(shape) -> None:
    """Without the opt-in, each adapter's rows run through the operations of that adapter's own forward (peft's
    form), so a mixed batch equals the per-adapter runs bit for bit."""
    model = _multi()
    x = torch.randn(*shape)
    names = ["a", "b", "__base__", "c", "a", "c", "__base__"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        outs = {}
        for name in ("a", "b", "c"):
            model.set_adapter(name)
            outs[name] = model(x)
        with model.disable_adapter():
            outs["__base__"] = model(x)
    for row, name in enumerate(names):
        assert torch.equal(mixed[row], outs[name][row]), (row, name)


# ---- every method's training node, with an in-place activation after the adapted layers ------------------
class _InPlaceMLP(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(8, 4)
        self.act0, self.act1 = nn.LeakyReLU(0.2, inplace=inplace), nn.LeakyReLU(0.2, inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act1(self.lin1(self.act0(self.lin0(x)))))


_TARGETS = ["lin0", "lin1"]
IN_PLACE_CONFIGS = {
    "lora": lambda: peftlab.LoraConfig(r=4, target_modules=_TARGETS),
    "dora": lambda: peftlab.LoraConfig(r=4, target_modules=_TARGETS, use_dora=True),
    "loha": lambda: peftlab.LoHaConfig(r=4, target_modules=_TARGETS),
    "lokr": lambda: peftlab.LoKrConfig(r=4, target_modules=_TARGETS),
    "oft": lambda: peftlab.OFTConfig(oft_block_size=4, target_modules=_TARGETS),
    "oft-exact": lambda: peftlab.OFTConfig(oft_block_size=4, target_modules=_TARGETS, use_cayley_neumann=False),
    "boft": lambda: peftlab.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=_TARGETS),
    "boft-2": lambda: peftlab.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=_TARGETS),
    "ia3": lambda: peftlab.IA3Config(target_modules=_TARGETS, feedforward_modules=[]),
    "ia3-ff": lambda: peftlab.IA3Config(target_modules=_TARGETS, feedforward_modules=["lin1"]),
    "adalora": lambda: peftlab.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=_TARGETS),
}


def _trained(method: str, inplace: bool = False) -> nn.Module:
    """The MLP with ``method``'s adapter in training mode, every trainable tensor moved off its initial value (so
    no adapter is the identity)."""
    torch.manual_seed(0)
    pm = peftlab.get_peft_model(_InPlaceMLP(inplace), IN_PLACE_CONFIGS[method]()).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return pm


@pytest.mark.parametrize("method", list(IN_PLACE_CONFIGS))
def test_training_survives_an_in_place_activation_after_the_layer(method: str) -> None:
    """An in-place activation after an adapted layer changes the layer's output in place, which a frozen nn.Linear
    tolerates (it never reads its output) and so does peft. Every method's training path must too, with the
    gradients of the same model whose activations work out of place (a node that read the changed output would
    be off: LeakyReLU changes values where its gradient is not zero). A custom autograd node that returned a view
    made inside it (a reshaped 2-D product, F.linear on (batch, seq, in) with a bias) would make PyTorch refuse
    the in-place activation outright."""
    grads = {}
    for inplace in (False, True):
        pm = _trained(method, inplace)
        x = torch.randn(2, 5, 16, requires_grad=True)  # (batch, seq, features): F.linear with a bias returns a view
        pm(x).pow(2).sum().backward()
        grads[inplace] = [x.grad] + [p.grad for p in pm.parameters() if p.requires_grad]
    assert all(t is not None for t in grads[True])
    for got, want in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", list(IN_PLACE_CONFIGS))
def test_hooks_on_the_base_layer_see_every_training_path(method: str) -> None:
    """A fused training node computes the base layer's product without calling it; where a hook watches that layer
    (here a full backward hook, as gradient-inspection tools register) the layer takes its generic path, so the
    hook fires, with the gradients the fused node gives."""
    x = torch.randn(2, 5, 16, requires_grad=True)  # so the base layer's own output needs a gradient too
    pm = _trained(method)
    pm(x).pow(2).sum().backward()
    fused = [p.grad for p in pm.parameters() if p.requires_grad]
    pm = _trained(method)
    seen = []
    pm.base_model.model.lin0.base_layer.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].shape))
    pm(x).pow(2).sum().backward()
    assert seen == [torch.Size([2, 5, 16])]
    for got, want in zip([p.grad for p in pm.parameters() if p.requires_grad], fused, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", list(IN_PLACE_CONFIGS))
def test_second_derivatives_through_every_training_node(method: str) -> None:
    """A Hessian-vector product (gradients taken with create_graph=True, then differentiated again: gradient
    penalties, second-order methods) through each method's fused training node equals the finite difference of
    the first derivative, ((∇L(θ + εv) − ∇L(θ − εv)) / 2ε, in float64). The hand-written backwards are not
    differentiable as written; with grad mode on in the backward they differentiate the plain formula instead."""
    torch.manual_seed(0)
    pm = peftlab.get_peft_model(_InPlaceMLP(False), IN_PLACE_CONFIGS[method]()).train().double()
    params = [p for p in pm.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]

    def grads(create_graph: bool = False):
        return torch.autograd.grad(pm(x).pow(2).sum(), params, create_graph=create_graph)

    first = grads(create_graph=True)
    hvp = torch.autograd.grad(sum((a * b).sum() for a, b in zip(first, v)), params)
    if method == "dora":  # DoRA holds the norm ‖W + sBA‖ constant in its gradient (as peft does), which a finite
        return _check_dora_hvp_against_peft(pm, x, v, hvp)  # difference would not: peft is the reference there
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(eps * d)
    up = grads()
    with torch.no_grad():
        for p, d in zip(params, v):
            p.sub_(2 * eps * d)
    down = grads()
    for got, a, b in zip(hvp, up, down, strict=True):
        torch.testing.assert_close(got, (a - b) / (2 * eps), rtol=1e-5, atol=1e-6)


def _check_dora_hvp_against_peft(pm, x: torch.Tensor, v: list[torch.Tensor], hvp) -> None:
    import peft

    torch.manual_seed(0)
    ref = peft.get_peft_model(_InPlaceMLP(False), peft.LoraConfig(r=4, target_modules=_TARGETS, use_dora=True))
    ref = ref.train().double()
    ours = dict(pm.named_parameters())
    theirs = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    assert [n for n, _ in theirs] == [n for n, p in pm.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(ours[n])
    params = [p for _, p in theirs]
    first = torch.autograd.grad(ref(x).pow(2).sum(), params, create_graph=True)
    want = torch.autograd.grad(sum((a * b).sum() for a, b in zip(first, v)), params)
    for got, w in zip(hvp, want, strict=True):
        torch.testing.assert_close(got, w)


@pytest.mark.parametrize("method", list(IN_PLACE_CONFIGS))
def test_torch_func_transforms_run_through_every_training_path(method: str) -> None:
    """Per-sample gradients (torch.func.vmap over torch.func.grad of a functional_call, as differentially private
    training computes them) work with every method and equal the ordinary backward's gradients sample by sample:
    under a transform the layers leave their fused nodes (which have no rules for torch.func) for the generic
    path. LoHa and LoKr draw their module-dropout number in training even at p = 0, as peft does (a seeded run
    then draws the same numbers), so they take grad alone there: vmap refuses random draws in both libraries."""
    from torch.func import functional_call, grad, vmap

    pm = _trained(method)
    params = {n: p.detach() for n, p in pm.named_parameters() if p.requires_grad}
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))

    def loss(params, xi):
        return functional_call(pm, params, (xi.unsqueeze(0),)).pow(2).sum()

    per_sample = ([grad(loss)(params, xi) for xi in x] if method in ("loha", "lokr")
                  else [{n: t[i] for n, t in vmap(grad(loss), in_dims=(None, 0))(params, x).items()}
                        for i in range(len(x))])
    for i, xi in enumerate(x):
        pm.zero_grad()
        pm(xi.unsqueeze(0)).pow(2).sum().backward()
        for n, p in pm.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_sample[i][n], p.grad, msg=lambda m: f"{n}, sample {i}: {m}")


@pytest.mark.parametrize("method", list(IN_PLACE_CONFIGS))
def test_forward_mode_ad_runs_through_every_training_path(method: str) -> None:
    """Forward-mode AD (dual numbers: a Jacobian-vector product in one pass) works with every method and gives the
    finite difference of the output along the tangent (float64): the fused nodes have no jvp rule, so the layers
    take their generic path inside ``forward_ad.dual_level``."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    pm = peftlab.get_peft_model(_InPlaceMLP(False), IN_PLACE_CONFIGS[method]()).train().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(pm(fwAD.make_dual(x, t))).tangent
    eps = 1e-6
    with torch.no_grad():
        torch.manual_seed(0)  # LoHa and LoKr draw their module-dropout number (p = 0) in training
        up = pm(x + eps * t)
        torch.manual_seed(0)
        down = pm(x - eps * t)
    torch.testing.assert_close(tangent, (up - down) / (2 * eps), rtol=1e-6, atol=1e-7)
