"""LoHa and LoKr against peft (the oracle), in both directions.

The shared harness (``tests/interop.py``) runs every case: under one seed a fresh adapter comes out tensor
for tensor the same (both libraries draw the factors in the same order) and starts as the identity; filled
with values seeded by their names, both adapters give the same modules, trainable tensors, count line and
outputs; the same ΔW, merged weights, merged/unmerged/disabled outputs; peftlab's files load in peft and
peft's in peftlab with the same outputs; the files hold the same tensors and config; training steps (with
rank and module dropout) give the same tensors; several adapters (different LoKr layouts in one layer)
travel both ways. This file adds LoHa's and LoKr's own checks and pins where peft 0.21.2 is wrong.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import base_model, output, quiet
from interop import DIRECTIONS, LIBS, Interop, peft
from torch import nn

import peftlab
from peftlab.tuners.base import AdapterLayer

pytestmark = pytest.mark.peer


class ConvNet(nn.Module):
    """Conv2d 3×3 (grouped), Conv2d 1×1 and Conv1d k=3 with enough channels for every LoKr layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.conv_b = nn.Conv2d(8, 12, 1)
        self.conv_c = nn.Conv1d(12, 8, 3)
        self.head = nn.Linear(8 * 14, 6)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv_b(torch.relu(self.conv_a(X))))  # (n, 12, 4, 4)
        h = torch.relu(self.conv_c(h.flatten(2)))  # (n, 8, 14)
        return self.head(h.flatten(1))


H = Interop("LoHa", prefixes=("hada_", "lokr_"), atol=1e-5, weight_atol=1e-6, delta_tol=(1e-7, 1e-6),
            extra_models={"convnet": (ConvNet, (4, 4, 4))}, file_markers={"LoHa": "hada_", "LoKr": "lokr_"})
ATOL = H.atol  # peftlab computes op(x; W₀ + ΔW), peft op(x; W₀) + op(x; ΔW): float32 rounding differs


# (case name, method, tiny model, config kwargs)
CASES: list[tuple[str, str, str, dict[str, Any]]] = []
for _m in ("LoHa", "LoKr"):
    CASES += [
        (f"{_m}-mlp", _m, "mlp", dict(target_modules=["lin0", "lin1"])),
        (f"{_m}-mlp-patterns", _m, "mlp", dict(target_modules=r"lin\d", r=4, alpha=8, rank_pattern={"lin1": 2},
                                               alpha_pattern={"lin0": 3})),
        (f"{_m}-mlp-init-false-mts", _m, "mlp", dict(target_modules=["lin0"], init_weights=False,
                                                     modules_to_save=["lin1"])),
        (f"{_m}-conv2d-flat", _m, "conv2d", dict(target_modules=["conv2d", "lin0"], r=2, alpha=5)),
        (f"{_m}-conv2d-effective", _m, "conv2d", dict(target_modules=["conv2d"], r=2, use_effective_conv2d=True)),
        (f"{_m}-convnet", _m, "convnet", dict(target_modules=["conv_a", "conv_b", "conv_c", "head"], r=2)),
        (f"{_m}-convnet-effective", _m, "convnet", dict(target_modules=["conv_a", "conv_b", "conv_c"], r=1,
                                                         use_effective_conv2d=True, rank_pattern={"conv_c": 2})),
        (f"{_m}-llama-all-linear", _m, "llama", dict(target_modules="all-linear", r=4, task_type="CAUSAL_LM",
                                                     rank_dropout=0.1, module_dropout=0.1)),
        (f"{_m}-llama-layers", _m, "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                                 layers_to_transform=[1], layers_pattern="layers",
                                                 task_type="CAUSAL_LM")),
        (f"{_m}-llama-default-targets", _m, "llama", dict(task_type="CAUSAL_LM", r=2, alpha=4)),
        (f"{_m}-t5-seq2seq", _m, "t5", dict(target_modules=["q", "v", "wo"], task_type="SEQ_2_SEQ_LM", r=4)),
        (f"{_m}-bert-cls", _m, "bert_cls", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
        (f"{_m}-bert-regex-feature", _m, "bert", dict(target_modules=r".*attention\.self\.(query|key)",
                                                      task_type="FEATURE_EXTRACTION", exclude_modules=["layer.0.attention.self.key"])),
        (f"{_m}-opt", _m, "opt", dict(target_modules=["q_proj", "fc2"], layers_to_transform=0,
                                      task_type="CAUSAL_LM")),
    ]
CASES += [
    ("LoKr-decompose-both", "LoKr", "llama", dict(target_modules=["q_proj", "up_proj"], r=1, decompose_both=True,
                                                  task_type="CAUSAL_LM")),
    ("LoKr-decompose-factor", "LoKr", "llama", dict(target_modules=["q_proj", "o_proj"], decompose_factor=4,
                                                    r=1, task_type="CAUSAL_LM")),
    ("LoKr-lycoris-init", "LoKr", "mlp", dict(target_modules=["lin0", "lin1"], init_weights="lycoris", r=1)),
    # (not conv_c: peft 0.21.2 cannot run an effective Conv1d LoKr, see test_divergence_lokr_effective_conv1d)
    ("LoKr-lycoris-init-conv", "LoKr", "convnet", dict(target_modules=["conv_a", "conv_b"], init_weights="lycoris",
                                                       r=1, use_effective_conv2d=True)),
    ("LoKr-rank-dropout-scale", "LoKr", "mlp", dict(target_modules=["lin0"], rank_dropout=0.3,
                                                    rank_dropout_scale=True, r=1)),
    ("LoKr-decompose-both-conv", "LoKr", "convnet", dict(target_modules=["conv_b", "conv_c"], r=1,
                                                         decompose_both=True)),
]
IDS = [c[0] for c in CASES]

# LoHa's effective conv is left out of training: peft's gradients there are wrong
# (test_divergence_loha_effective_conv_gradients)
TRAIN_CASES = [c for c in CASES if c[2] in ("mlp", "convnet", "llama", "conv2d")
               and not (c[1] == "LoHa" and c[3].get("use_effective_conv2d"))]

globals().update(H.case_tests(CASES, "test_fresh_adapter_is_the_same", "test_same_config_same_model",
                              "test_layer_numerics", "test_peftlab_saves_peft_loads", "test_peft_saves_peftlab_loads",
                              "test_same_files", "test_loading_for_training_trains_the_same_tensors"))
globals().update(H.case_tests(TRAIN_CASES, "test_training_steps_match"))


# ---------------------------------------------------------------------------------------------------
# several adapters (different layouts in one layer), a non-default one in a sub-folder
# ---------------------------------------------------------------------------------------------------
MULTI = {
    "LoHa": ("LoHa", "LoHa", "llama", [
        dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        dict(target_modules=["v_proj", "o_proj", "up_proj"], r=2, alpha=16, task_type="CAUSAL_LM")]),
    # in v_proj (16 -> 16: blocks 4 x 4) the first adapter keeps lokr_w2 whole (r=8), the second factors it (r=1)
    "LoKr": ("LoKr", "LoKr", "llama", [
        dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        dict(target_modules=["v_proj", "o_proj"], r=1, decompose_both=True, init_weights=False,
             task_type="CAUSAL_LM")]),
    "LoKr-conv": ("LoKr-conv", "LoKr", "convnet", [
        dict(target_modules=["conv_a", "conv_c"], r=4),
        dict(target_modules=["conv_a", "conv_b"], r=1, use_effective_conv2d=True)]),
}


@pytest.mark.parametrize("key", list(MULTI))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_several_adapters_both_ways(key, direction, tmp_path):
    """Mixed batches in peftlab only: peft 0.21.2 has no ``adapter_names`` for LoHa/LoKr."""
    H.check_several_adapters_both_ways(MULTI[key], direction, tmp_path, mixed="peftlab")


@pytest.mark.parametrize("key", list(MULTI))
def test_several_adapters_same_folders(key, tmp_path):
    H.check_several_adapters_same_folders(MULTI[key], tmp_path)


def test_lokr_layouts_differ_per_adapter_in_one_layer():
    """One LoKr layer holding a whole ``lokr_w2`` for one adapter and factors for another, as peft does."""
    ours = H.build_multi("peftlab", MULTI["LoKr"])
    layer = ours.get_base_model().model.layers[0].self_attn.v_proj
    assert "default" in layer.lokr_w2 and "default" not in layer.lokr_w2_a
    assert "second" in layer.lokr_w2_a and "second" in layer.lokr_w1_a and "second" not in layer.lokr_w2
    assert layer.adapter_names == ["default", "second"]
    ours.delete_adapter("second")
    assert not any("second" in getattr(layer, n) for n in layer.adapter_layer_names)


# ---------------------------------------------------------------------------------------------------
# what both libraries refuse
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["LoHa", "LoKr"])
def test_gpt2_conv1d_is_refused_by_both(method):
    """Neither library wraps GPT-2's transformers Conv1D with LoHa/LoKr; peftlab says so before changing
    anything."""
    for lib in LIBS:
        with pytest.raises((TypeError, ValueError)):
            with quiet():
                LIBS[lib].get_peft_model(base_model("gpt2"), H.config(lib, method, dict(target_modules=["c_attn"])))


# ---------------------------------------------------------------------------------------------------
# known divergences: peftlab deliberately differs from peft 0.21.2
# ---------------------------------------------------------------------------------------------------
def test_divergence_loha_effective_conv_gradients():
    """peft's ``HadaWeightCP.backward`` computes ∂/∂hada_w1_a from the *other* branch's core (and likewise for
    hada_w2_a), so training LoHa with ``use_effective_conv2d`` follows wrong gradients there. peftlab lets
    autograd differentiate the einsum: its gradients pass gradcheck; peft's do not."""
    from peft.tuners.loha.layer import HadaWeightCP

    from peftlab.tuners.lycoris import cp_weight

    g = torch.Generator().manual_seed(0)
    shapes = [(2, 2, 3, 3), (2, 5), (2, 4), (2, 2, 3, 3), (2, 5), (2, 4)]
    ts = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(lambda *a: cp_weight(a[0], a[1], a[2]) * cp_weight(a[3], a[4], a[5]), ts)
    ours = torch.autograd.grad((cp_weight(*ts[:3]) * cp_weight(*ts[3:])).sum(), ts)
    theirs = torch.autograd.grad(HadaWeightCP.apply(*ts, torch.tensor(1.0, dtype=torch.float64)).sum(), ts)
    wrong = [i for i in range(6) if not torch.allclose(ours[i], theirs[i])]
    assert wrong == [1, 4]  # hada_w1_a and hada_w2_a; the cores and the b factors agree


def test_divergence_lokr_effective_conv1d():
    """An effective-conv LoKr on a Conv1d whose W2 is factored: peft 0.21.2 fails in ``torch.kron`` (the
    einsum's (b, d, k, 1) result has a stride kron's internal view rejects); peftlab computes it, and its ΔW
    is W1 ⊗ CP(t2, w2_a, w2_b) with the kernel in W2's trailing dimension."""
    kwargs = dict(target_modules=["conv_c"], r=1, use_effective_conv2d=True)
    case = ("-", "LoKr", "convnet", kwargs)
    ref, ours = H.build("peft", case), H.build("peftlab", case)
    x = H.inputs("convnet")
    with pytest.raises(RuntimeError, match="view size"):
        output(ref, x)
    layer = ours.get_base_model().conv_c
    assert "default" in layer.lokr_t2 and tuple(layer.lokr_t2["default"].shape) == (1, 1, 3, 1)
    w1 = layer.lokr_w1["default"]
    core = torch.einsum("ijk,ip,jq->pqk", layer.lokr_t2["default"][..., 0], layer.lokr_w2_a["default"],
                        layer.lokr_w2_b["default"])  # (b, d, k)
    expected = torch.einsum("ac,bdk->abcdk", w1, core).reshape(8, 12, 3) * layer.scaling["default"]
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)
    torch.testing.assert_close(output(ours, x), output(ours.merge_and_unload(), x), atol=ATOL, rtol=0)


def test_divergence_decompose_factor_must_divide():
    """peft quietly falls back to another split when ``decompose_factor`` does not divide a size; peftlab
    refuses, naming the module and its sizes (the factor the user asked for would not be the one used)."""
    peft.get_peft_model(base_model("mlp"), peft.LoKrConfig(target_modules=["lin0"], decompose_factor=3))
    model = base_model("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"decompose_factor=3 does not divide .*'lin0'"):
        peftlab.get_peft_model(model, peftlab.LoKrConfig(target_modules=["lin0"], decompose_factor=3))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
