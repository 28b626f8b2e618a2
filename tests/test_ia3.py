"""(IA)³ and the T-Few losses: config checks, the layer's math, exact merging, add_weighted_adapter, the losses
against hand-computed values, and the lab's multiple-choice task. (The method-neutral invariants are rows of
test_invariants.py; peft interop is test_ia3_interop.py.)"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import base_model, output
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab import IA3Config, LoraConfig, get_peft_model
from peftlab.lab import multiple_choice as mc
from peftlab.lab.models import example_inputs
from peftlab.losses import tfew
from peftlab.tuners.ia3 import IA3Layer


# ---------------------------------------------------------------------------------------------------
# config and targeting errors
# ---------------------------------------------------------------------------------------------------
def test_feedforward_must_be_a_subset_of_targets():
    with pytest.raises(ValueError, match=r"feedforward_modules \['down_proj'\] are not in target_modules"):
        IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])  # fine
    IA3Config(target_modules=r".*proj", feedforward_modules=["down_proj"])  # a regex cannot be checked here


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(feedforward_modules=3), TypeError, "feedforward_modules"),
    (dict(init_ia3_weights="yes"), (TypeError, ValueError), "init_ia3_weights"),
    (dict(bias="all"), ValueError, "no 'bias' option"),
    (dict(rank_pattern={"q": 2}), ValueError, "no 'rank_pattern' option"),
    (dict(layers_to_transform=[0]), ValueError, "no 'layers_to_transform' option"),
])
def test_config_refuses_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        IA3Config(target_modules=["lin0"], **kwargs)


def test_config_keys_are_peft_keys():
    peft = pytest.importorskip("peft")
    ours = set(IA3Config(target_modules=["a"]).to_dict())
    theirs = set(peft.IA3Config(target_modules=["a"]).to_dict())
    assert ours == theirs


def test_unsupported_layer_is_named():
    with pytest.raises(ValueError, match=r"target module 'emb' is a Embedding; IA3 supports Linear, Conv1D, Conv2d"):
        get_peft_model(base_model("emb_conv1d"), IA3Config(target_modules=["emb"], feedforward_modules=[]))
    with pytest.raises(ValueError, match=r"'conv1d' is a Conv1d"):
        get_peft_model(base_model("conv1d"), IA3Config(target_modules=["conv1d"], feedforward_modules=[]))


def test_feedforward_entry_matching_no_target_is_an_error():
    with pytest.raises(ValueError, match=r"feedforward_modules entries \['lin9'\] match none of the targeted"):
        get_peft_model(base_model("mlp"), IA3Config(target_modules=r"lin\d", feedforward_modules=["lin9"]))


def test_no_default_feedforward_for_unknown_model_type():
    with pytest.raises(ValueError, match=r"feedforward_modules=None, and IA3 has no default for model_type=None"):
        get_peft_model(base_model("mlp"), IA3Config(target_modules=["lin0"]))
    get_peft_model(base_model("mlp"), IA3Config(target_modules=["lin0"], feedforward_modules=[]))


def test_default_feedforward_list_keeps_only_targeted_entries(tmp_path):
    """Targets given, feed-forward list from the model type's default: only entries that match a target are
    kept, so the saved config reloads. peft 0.21.2 saves the whole default (down_proj) and then refuses its
    own file ("feedforward_modules should be a subset of target_modules")."""
    from peftlab import PeftModel

    model = get_peft_model(base_model("llama"), IA3Config(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert model.peft_config["default"].feedforward_modules == []
    model.save_pretrained(tmp_path / "ours")
    PeftModel.from_pretrained(base_model("llama"), tmp_path / "ours")
    full = get_peft_model(base_model("llama"), IA3Config(task_type="CAUSAL_LM"))
    assert full.peft_config["default"].feedforward_modules == ["down_proj"]
    assert sorted(full.peft_config["default"].target_modules) == ["down_proj", "k_proj", "v_proj"]
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(base_model("llama"), peft.IA3Config(target_modules=["q_proj", "v_proj"],
                                                                        task_type="CAUSAL_LM"))
        ref.save_pretrained(tmp_path / "peft")
        with pytest.raises(ValueError, match="subset"):
            peft.PeftModel.from_pretrained(base_model("llama"), tmp_path / "peft")


def test_feedforward_list_matches_dotted_suffixes_only():
    """``feedforward_modules=['proj']`` means modules named ``proj`` (as in target_modules), not ``q_proj``
    (peft's ``endswith`` without a dot would make q_proj input-scaled)."""
    with pytest.raises(ValueError, match=r"entries \['proj'\] match none"):
        get_peft_model(base_model("llama"), IA3Config(target_modules=r".*q_proj", feedforward_modules=["proj"]))


# ---------------------------------------------------------------------------------------------------
# the layer: shapes and the two kinds of scaling
# ---------------------------------------------------------------------------------------------------
def test_vector_shapes_follow_peft():
    torch.manual_seed(0)
    assert IA3Layer(nn.Linear(5, 3), "a").ia3_l["a"].shape == (3, 1)
    assert IA3Layer(nn.Linear(5, 3), "a", is_feedforward=True).ia3_l["a"].shape == (1, 5)
    assert IA3Layer(Conv1D(3, 5), "a").ia3_l["a"].shape == (3, 1)  # Conv1D(nf=out, nx=in)
    assert IA3Layer(nn.Conv2d(4, 6, 3), "a").ia3_l["a"].shape == (1, 6, 1, 1)
    assert IA3Layer(nn.Conv2d(4, 6, 3), "a", is_feedforward=True).ia3_l["a"].shape == (1, 4, 1, 1)
    assert IA3Layer(nn.Conv3d(4, 6, 1), "a").ia3_l["a"].shape == (1, 6, 1, 1, 1)
    assert torch.equal(IA3Layer(nn.Linear(5, 3), "a").ia3_l["a"], torch.ones(3, 1))


def _random_vectors(layer: IA3Layer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, l in layer.ia3_l.items():
            l.copy_(1 + 0.5 * torch.randn(l.shape, generator=g))


def test_forward_is_the_definition():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = IA3Layer(base, "out")
    layer.update_layer("ff", is_feedforward=True)
    _random_vectors(layer)
    x = torch.randn(3, 2, 6)
    l_out, l_ff = layer.ia3_l["out"].reshape(-1), layer.ia3_l["ff"].reshape(-1)
    torch.testing.assert_close(layer(x), l_out * (x @ base.weight.T + base.bias))  # l ⊙ (W x + b)
    layer.set_adapter(["ff"])
    torch.testing.assert_close(layer(x), (l_ff * x) @ base.weight.T + base.bias)  # W (l ⊙ x) + b
    layer.set_adapter(["out", "ff"])  # several active adapters multiply
    torch.testing.assert_close(layer(x), l_out * ((l_ff * x) @ base.weight.T + base.bias))


def test_gradients_of_the_vectors():
    torch.manual_seed(0)
    layer = IA3Layer(nn.Linear(4, 3), "a")
    _random_vectors(layer)
    x = torch.randn(5, 4)
    g = torch.randn(5, 3)
    (layer(x) * g).sum().backward()
    z = layer.get_base_layer()(x).detach()
    torch.testing.assert_close(layer.ia3_l["a"].grad.reshape(-1), (g * z).sum(0))  # ∂L/∂l = Σ_t g ⊙ (W x + b)


@pytest.mark.parametrize("ff", [False, True], ids=["output-scaled", "feed-forward"])
def test_an_in_place_change_after_the_layer_keeps_the_gradients(ff):
    """An in-place activation right after an adapted nn.Linear (``LeakyReLU(inplace=True)``, ReLU in VGG-style
    heads) changes the layer's output in place. The fused output-scaling node reads that output for ∂l; it must
    notice the change and compute ∂l from W x + b instead, not raise (peft trains such models) and not use the
    changed values (LeakyReLU's, unlike ReLU's, would show in ∂l): its gradients equal those with an
    out-of-place activation."""
    grads = {}
    for inplace in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.LeakyReLU(0.2, inplace=inplace), nn.Linear(5, 3))
        pm = get_peft_model(model, IA3Config(target_modules=["0"], feedforward_modules=["0"] if ff else []))
        with torch.no_grad():
            l = pm.base_model.model[0].ia3_l["default"]
            l.copy_(1 + 0.5 * torch.randn(l.shape))
        x = torch.randn(4, 6, requires_grad=True)
        pm(x).pow(2).sum().backward()
        grads[inplace] = (x.grad, l.grad.clone())
    for got, want in zip(grads[True], grads[False]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("ff", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_training_path_has_autograd_gradients(ff, bias):
    """One adapter on a plain nn.Linear trains through one fused node that scales W instead of the
    activation; its gradients (x, l, and a trainable bias) equal autograd's on the definition, also where
    l has entries too small to divide by (0, 1e-30)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=bias)
    layer = IA3Layer(base, "a", is_feedforward=ff)
    with torch.no_grad():
        l = layer.ia3_l["a"]
        l.copy_(1 + 0.5 * torch.randn(l.shape))
        l.view(-1)[0], l.view(-1)[1] = 0.0, 1e-30
    if bias:
        base.bias.requires_grad_(True)
    x = torch.randn(2, 3, 6, requires_grad=True)
    g = torch.randn(2, 3, 5)
    (layer(x) * g).sum().backward()
    got = (x.grad, layer.ia3_l["a"].grad, base.bias.grad if bias else None)
    x2 = x.detach().clone().requires_grad_(True)
    l2 = layer.ia3_l["a"].detach().clone().reshape(-1).requires_grad_(True)
    b2 = base.bias.detach().clone().requires_grad_(True) if bias else None
    ref = torch.nn.functional.linear(x2 * l2, base.weight, b2) if ff else l2 * torch.nn.functional.linear(x2, base.weight, b2)
    (ref * g).sum().backward()
    torch.testing.assert_close(got[0], x2.grad)
    torch.testing.assert_close(got[1].reshape(-1), l2.grad)
    if bias:
        torch.testing.assert_close(got[2], b2.grad)


# ---------------------------------------------------------------------------------------------------
# merging: exact, and exactly undone
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, ff", [
    (lambda: nn.Linear(6, 4), False), (lambda: nn.Linear(6, 4), True),
    (lambda: Conv1D(4, 6), False), (lambda: Conv1D(4, 6), True),
    (lambda: nn.Conv2d(4, 6, 3, padding=1), False), (lambda: nn.Conv2d(4, 6, 3, padding=1), True),
    (lambda: nn.Conv2d(4, 6, 3, groups=2), True),
])
def test_merge_is_exact_and_unmerge_restores(make, ff):
    torch.manual_seed(0)
    base = make()
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = IA3Layer(base, "a", is_feedforward=ff)
    _random_vectors(layer)
    x = torch.randn(2, 4, 5, 5) if isinstance(base, nn.Conv2d) else torch.randn(3, 6)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-6)
    if not ff:
        torch.testing.assert_close(base.bias, b0 * layer.ia3_l["a"].detach().reshape(-1))
    else:
        assert torch.equal(base.bias, b0)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=0, rtol=2e-7)
    torch.testing.assert_close(base.bias, b0, atol=0, rtol=2e-7)


def test_unmerge_near_zero_is_exact_where_peft_is_not():
    """l = 0 wipes a row of W when merging, and a tiny l pushes W·l below float32's normal range: dividing
    back cannot restore them. peftlab saves those entries at merge time; peft divides by l + 1e-8, which
    leaves the zeroed row at 0 and is off by 1e-8/l elsewhere."""
    torch.manual_seed(0)
    base = nn.Linear(4, 5)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = IA3Layer(base, "a")
    with torch.no_grad():
        layer.ia3_l["a"].copy_(torch.tensor([[0.0], [1e-42], [1e-3], [1.0], [-2.0]]))
    layer.merge()
    assert set(layer._merge_saved["a"][0].tolist()) >= {0, 1, 2, 3, 4, 5, 6, 7}  # rows 0 and 1 saved
    layer.unmerge()
    assert not layer._merge_saved
    torch.testing.assert_close(base.weight, w0, atol=0, rtol=2e-7)
    torch.testing.assert_close(base.bias, b0, atol=0, rtol=2e-7)
    peft = pytest.importorskip("peft")
    from peft.tuners.ia3.layer import Linear as PeftIA3Linear

    ref_base = nn.Linear(4, 5)
    ref_base.load_state_dict({"weight": w0, "bias": b0})
    ref = PeftIA3Linear(ref_base, "a", config=peft.IA3Config(target_modules=["x"]))
    with torch.no_grad():
        ref.ia3_l["a"].copy_(layer.ia3_l["a"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.merge()
        ref.unmerge()
    assert torch.equal(ref_base.weight[0], torch.zeros(4))  # peft: row 0 is gone
    rel = ((ref_base.weight[2] - w0[2]) / w0[2]).abs().max()
    assert 1e-6 < rel < 1e-4  # ≈ 1e-8 / 1e-3


def test_merge_and_unload_on_a_model():
    model = get_peft_model(base_model("llama"), IA3Config(task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():
        if "ia3_l" in n:
            with torch.no_grad():
                p.mul_(1 + 0.3 * torch.randn(p.shape))
    x = example_inputs("llama")
    want = output(model, x)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, IA3Layer) for m in plain.modules())
    torch.testing.assert_close(output(plain, x), want, atol=1e-5, rtol=0)


def test_mixed_batch_with_input_and_output_scaling():
    model = get_peft_model(base_model("conv2d"), IA3Config(target_modules=["conv2d", "lin0"],
                                                           feedforward_modules=["conv2d"]))
    model.add_adapter("b", IA3Config(target_modules=["conv2d", "lin0"], feedforward_modules=["lin0"]))
    for n, p in model.named_parameters():
        if "ia3_l" in n:
            with torch.no_grad():
                p.mul_(1 + 0.3 * torch.randn(p.shape))
    model.eval()
    x = example_inputs("conv2d", batch=3)
    names = ["b", "__base__", "default"]
    mixed = output(model, x, adapter_names=names)
    alone = {"default": output(model, x)}
    model.set_adapter("b")
    alone["b"] = output(model, x)
    with model.disable_adapter():
        alone["__base__"] = output(model, x)
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[n][i], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# add_weighted_adapter
# ---------------------------------------------------------------------------------------------------
def _two_adapters(second_targets=("k_proj", "v_proj", "down_proj")):
    torch.manual_seed(0)
    model = get_peft_model(base_model("llama"), IA3Config(task_type="CAUSAL_LM"))
    model.add_adapter("b", IA3Config(target_modules=list(second_targets), task_type="CAUSAL_LM",
                                     feedforward_modules=[t for t in second_targets if t == "down_proj"]))
    for n, p in model.named_parameters():
        if "ia3_l" in n:
            with torch.no_grad():
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    return model


def test_add_weighted_adapter_is_the_weighted_sum():
    model = _two_adapters()
    model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "mix")
    assert "mix" in model.peft_config and model.active_adapter == "default"
    for _, layer in model.base_model.adapter_layers():
        want = 0.7 * layer.ia3_l["default"] + 0.3 * layer.ia3_l["b"]
        torch.testing.assert_close(layer.ia3_l["mix"], want)
        assert not layer.ia3_l["mix"].requires_grad
        assert layer.is_feedforward["mix"] == layer.is_feedforward["default"]


def test_add_weighted_adapter_absent_source_counts_as_ones():
    """Where only one source adapter is present, the other counts as its identity (ones); peft counts it as
    zero there, which scales the layer by the present adapter's weight alone."""
    model = _two_adapters(second_targets=("k_proj",))
    model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")
    v = model.base_model.model.model.layers[0].self_attn.v_proj
    torch.testing.assert_close(v.ia3_l["mix"], 0.5 * v.ia3_l["default"] + 0.5)
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(base_model("llama"), peft.IA3Config(task_type="CAUSAL_LM"))
        ref.add_adapter("b", peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[], task_type="CAUSAL_LM"))
        ref_v = ref.base_model.model.model.layers[0].self_attn.v_proj
        with torch.no_grad():
            ref_v.ia3_l["default"].copy_(v.ia3_l["default"])
        ref.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")
    torch.testing.assert_close(ref_v.ia3_l["mix"], 0.5 * v.ia3_l["default"])  # peft: the absent one is 0


@pytest.mark.parametrize("args, match", [
    ((["default", "b"], [0.5, 0.5], "default"), "already exists"),
    ((["default", "b"], [1.0], "m"), "2 adapters and 1 weights"),
    ((["default", "nope"], [1.0, 1.0], "m"), r"\['nope'\] do not exist"),
    ((["default", "b"], [float("nan"), 1.0], "m"), "finite"),
])
def test_add_weighted_adapter_errors(args, match):
    model = _two_adapters()
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(*args)
    assert set(model.peft_config) == {"default", "b"}


def test_add_weighted_adapter_refuses_mixed_sides_and_other_methods():
    model = get_peft_model(base_model("mlp"), IA3Config(target_modules=["lin0"], feedforward_modules=["lin0"]))
    model.add_adapter("out", IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="scale the input .* and others the output"):
        model.add_weighted_adapter(["default", "out"], [0.5, 0.5], "m")
    assert set(model.peft_config) == {"default", "out"}
    from peftlab.merging.ia3 import add_weighted_adapter

    lora = get_peft_model(base_model("mlp"), LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="not \\(IA\\)³"):
        add_weighted_adapter(lora.base_model, ["default"], [1.0], "m")


# ---------------------------------------------------------------------------------------------------
# the T-Few losses, against values computed by hand
# ---------------------------------------------------------------------------------------------------
def _logits_for(probs: list[list[list[float]]]) -> torch.Tensor:
    """Logits whose softmax is ``probs`` (log of the probabilities)."""
    return torch.tensor(probs).log()


def test_losses_match_hand_computed_values():
    """One example, two choices (N=1, C=2), vocabulary of 3, seq2seq alignment (no shift).
    Choice 0 (correct): tokens [0, 1] with p = 0.5 and 0.25. Choice 1 (wrong): tokens [2, pad] with p = 0.8."""
    probs = [[[0.5, 0.3, 0.2], [0.5, 0.25, 0.25]],
             [[0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]
    logits = _logits_for(probs)
    labels = torch.tensor([[0, 1], [2, -100]])
    res = tfew.tfew_loss(logits, labels, torch.tensor([0]), num_choices=2, shift=False)
    lm = -(math.log(0.5) + math.log(0.25)) / 2
    ul = -math.log(1 - 0.8) / 1
    beta = [(math.log(0.5) + math.log(0.25)) / 2, math.log(0.8) / 1]
    ln = -math.log(math.exp(beta[0]) / (math.exp(beta[0]) + math.exp(beta[1])))
    assert res.lm.item() == pytest.approx(lm, rel=1e-6)
    assert res.ul.item() == pytest.approx(ul, rel=1e-6)
    assert res.ln.item() == pytest.approx(ln, rel=1e-6)
    assert res.total.item() == pytest.approx(lm + ul + ln, rel=1e-6)
    torch.testing.assert_close(res.scores, torch.tensor([beta]))
    # rank classification uses β: the short wrong answer wins here (β = log 0.8 > mean log-prob of the right
    # one), although its summed log-likelihood is not what decides
    assert tfew.rank_classification(res.scores).tolist() == [1]
    only_lm = tfew.tfew_loss(logits, labels, torch.tensor([0]), num_choices=2, shift=False, ul=False, ln=False)
    assert only_lm.total.item() == pytest.approx(lm, rel=1e-6)


def test_length_normalisation_changes_the_ranking():
    """Σ log p favours the short choice, β = mean log p the long one."""
    logits = _logits_for([[[0.6, 0.2, 0.2]] * 3, [[0.2, 0.2, 0.6], [1 / 3] * 3, [1 / 3] * 3]])
    labels = torch.tensor([[0, 0, 0], [2, -100, -100]])
    total, length, beta = tfew.choice_scores(logits, labels, num_choices=2, shift=False)
    assert total.argmax(-1).item() == 1 and beta.argmax(-1).item() == 0
    assert length.tolist() == [[3, 1]]


def test_unlikelihood_is_finite_when_the_model_is_sure():
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, 60.0]]])  # the wrong choice's token has p = 1 - 1e-26
    res = tfew.tfew_loss(logits, torch.tensor([[0], [1]]), torch.tensor([0]), num_choices=2, shift=False)
    assert res.ul.item() == pytest.approx(-math.log(tfew.UL_FLOOR), rel=1e-4)


def test_causal_shift_and_bad_inputs():
    logits = torch.randn(4, 5, 7)
    labels = torch.full((4, 5), -100)
    labels[:, 3:] = 2
    logp, mask = tfew.token_log_probs(logits, labels)
    assert mask.shape == (4, 4) and mask[:, 2:].all() and not mask[:, :2].any()
    torch.testing.assert_close(logp[:, 2], torch.log_softmax(logits[:, 2], -1)[:, 2])  # position 2 predicts token 3
    with pytest.raises(ValueError, match="one correct index per example"):
        tfew.tfew_loss(logits, labels, torch.tensor([0, 1, 0]), num_choices=2)
    with pytest.raises(ValueError, match=r"correct indices must be in \[0, 2\)"):
        tfew.tfew_loss(logits, labels, torch.tensor([0, 2]), num_choices=2)
    with pytest.raises(ValueError, match="no answer token"):
        tfew.tfew_loss(logits, torch.full((4, 5), -100), torch.tensor([0, 1]), num_choices=2)


# ---------------------------------------------------------------------------------------------------
# the multiple-choice lab task, the lab loop and transformers.Trainer
# ---------------------------------------------------------------------------------------------------
def test_make_choices_is_deterministic_and_well_formed():
    a, b = mc.make_choices("sort", 50, seed=3), mc.make_choices("sort", 50, seed=3)
    assert a == b and a != mc.make_choices("sort", 50, seed=4)
    for ex in a:
        assert len(set(ex.choices)) == 4
        digits = [int(d) for d in ex.prompt.split()[1:-1]]
        assert ex.choices[ex.label] == " ".join(map(str, sorted(digits)))
    assert {ex.label for ex in a} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="at least 2 choices"):
        mc.make_choices("sort", 3, num_choices=1)


@pytest.fixture(scope="module")
def lab_tokenizer():
    from peftlab.lab import lm

    return lm.build_tokenizer()


def _tiny_lab_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg)


def test_collator_and_losses_on_a_model(lab_tokenizer):
    tok = lab_tokenizer
    examples = mc.make_choices("sort", 3, seed=0)
    batch = next(iter(mc.loader(examples, tok, batch_size=3, shuffle=False)))
    n, c, t = batch["input_ids"].shape
    assert (n, c) == (3, 4) and batch["labels"].shape == (3, 4, t) and batch["label"].tolist() == [e.label for e in examples]
    model = get_peft_model(_tiny_lab_model(tok), IA3Config(task_type="CAUSAL_LM"))
    res = tfew.batch_losses(model, batch)
    # the same L_LM as the model's own loss on the right choices alone
    idx = torch.arange(n)
    own = model(input_ids=batch["input_ids"][idx, batch["label"]], attention_mask=batch["attention_mask"][idx, batch["label"]],
                labels=batch["labels"][idx, batch["label"]]).loss
    torch.testing.assert_close(res.lm, own, rtol=1e-5, atol=1e-6)
    loss = tfew.TFewLoss()(model, batch)
    loss.backward()
    assert all(p.grad is not None for n_, p in model.named_parameters() if p.requires_grad)


def test_lab_loop_and_trainer_lower_the_loss(lab_tokenizer, tmp_path):
    from transformers import TrainingArguments

    from peftlab.lab.train import train

    tok = lab_tokenizer
    examples = mc.make_choices("sort", 16, seed=0)
    model = get_peft_model(_tiny_lab_model(tok), IA3Config(task_type="CAUSAL_LM"))
    hist = train(model, mc.loader(examples, tok, batch_size=8), steps=20, lr=0.1, loss_fn=tfew.TFewLoss(),
                 progress=False)
    assert sum(hist.loss[-3:]) < sum(hist.loss[:3])
    model = get_peft_model(_tiny_lab_model(tok), IA3Config(task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=20, learning_rate=0.1,
                             remove_unused_columns=False, report_to=[], logging_steps=1, save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    rows = [mc.encode(tok, e) for e in examples]
    trainer = tfew.TFewTrainer(model=model, args=args, train_dataset=rows, data_collator=mc.ChoiceCollator(tok))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20 and sum(losses[-3:]) < sum(losses[:3])


def test_scaled_activations_diagram_marks_the_scaled_boxes():
    import matplotlib

    matplotlib.use("Agg")
    from peftlab import viz

    ax = viz.scaled_activations([["q", "k"], ["attn"], ["down"]], {"k": "out", "down": "in"}, title="t")
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("⊙ l") == 2 and {"q", "k", "attn", "down"} <= set(texts)
    marks = {round(t.get_position()[0], 2) for t in ax.texts if t.get_text() == "⊙ l"}
    assert marks == {round(1.0 + 0.1, 2), round(2 * 1.35 - 0.1, 2)}  # after k's box, before down's box


@pytest.mark.parametrize("feedforward", [[], ["0"]])
def test_ia3_trains_under_bf16_autocast(feedforward):
    # the fused functions' backward receives a bf16 gradient while the weight and l stay float32
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 8)),
                           IA3Config(target_modules=["0"], feedforward_modules=feedforward))
    x = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().pow(2).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and x.grad.dtype == x.dtype
