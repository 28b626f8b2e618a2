"""X-LoRA against peft 0.21.2 (the oracle).

* The same experts (LoRA folders written by peft or by peftlab) and the same gate weights, moved between the
  libraries in both directions, give the same scalings and outputs, for the gate's options.
* peft's saved X-LoRA folders load in peftlab, and peftlab's in peft.
* What peft 0.21.2 keeps and loses when it saves (pinned, so a fixed peft shows up here): its gate file drops
  every tensor whose name contains an expert index (``layers.0.weight`` with experts ``"0"``, ``"1"``), and the
  expert subfolders it writes hold base weights and miss layers whose index is an expert's name. peftlab saves
  every gate tensor and each expert as a plain LoRA folder.
* peft's X-LoRA only works with experts named ``"0"``, ``"1"``, …: other names crash its forward.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import base_model
from interop import DIRECTIONS, peft
from safetensors.torch import load_file

import peftlab

pytestmark = pytest.mark.peer

HIDDEN = 32
IDS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))


def base():
    m = base_model("llama")
    m.config.use_cache = False  # peft refuses a model with use_cache=True
    return m


def save_experts(lib, root, n=2):
    out = {}
    for i in range(n):
        torch.manual_seed(200 + i)
        cfg = lib.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        folder = os.path.join(root, f"{lib.__name__}_{i}")
        lib.get_peft_model(base(), cfg).save_pretrained(folder)
        out[str(i)] = folder  # peft's X-LoRA needs the names "0", "1", ...
    return out


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("xl"))
    return {"peft": save_experts(peft, root), "peftlab": save_experts(peftlab, root)}


def build(lib, adapters, **kw):
    torch.manual_seed(0)
    cfg = lib.XLoraConfig(task_type="CAUSAL_LM", hidden_size=HIDDEN, adapters=dict(adapters), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(base(), cfg).eval()


def gate(model):
    return {k: v for k, v in model.state_dict().items() if "internal_xlora_classifier" in k}


def run(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids).logits
    return out, model.get_latest_scalings()


def test_config_has_peft_s_fields_defaults_and_file_keys():
    """XLoraConfig: peft 0.21.2's X-LoRA fields, in its order, with its defaults; the same keys on disk; a missing
    hidden_size becomes 4096 and missing adapters {} with a warning, in both."""
    import dataclasses

    def own_fields(cls, base):
        shared = {f.name for f in dataclasses.fields(base)}
        return [(f.name, f.default) for f in dataclasses.fields(cls) if f.name not in shared]

    ours, theirs = own_fields(peftlab.XLoraConfig, peftlab.PeftConfig), own_fields(peft.XLoraConfig, peft.PeftConfig)
    assert ours == theirs and len(ours) == 13
    kw = {"hidden_size": HIDDEN, "adapters": {"0": "x"}}
    assert set(peftlab.XLoraConfig(**kw).to_dict()) == set(peft.XLoraConfig(**kw).to_dict())
    for lib in (peftlab, peft):
        with pytest.warns(UserWarning, match="4096"):
            cfg = lib.XLoraConfig(adapters={})
        assert cfg.hidden_size == 4096
        with pytest.warns(UserWarning):
            assert lib.XLoraConfig(hidden_size=HIDDEN).adapters == {}


OPTIONS = [
    {},
    {"xlora_depth": 2, "xlora_size": 8, "layerwise_scalings": True},
    {"top_k_lora": 1, "enable_softmax_topk": True, "enable_softmax": False},
    {"scaling_pass_value": 0.5, "global_scaling_weight": 0.7, "softmax_temperature": 0.5},
]


@pytest.mark.parametrize("kw", OPTIONS, ids=["default", "mlp_layerwise", "top1", "pass_value"])
@pytest.mark.parametrize("experts_from", ["peft", "peftlab"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_same_gate_weights_same_outputs(expert_dirs, kw, experts_from, direction):
    adapters = expert_dirs[experts_from]
    ours, theirs = build(peftlab, adapters, **kw), build(peft, adapters, **kw)
    src, dst = (theirs, ours) if direction == "peft->peftlab" else (ours, theirs)
    moved = gate(src)
    torch.manual_seed(3)
    for p in moved.values():  # shared storage: the source's gate changes too
        p.normal_(0, 0.5)
    assert dst.load_state_dict(moved, strict=False).unexpected_keys == []
    assert sorted(gate(dst)) == sorted(moved)
    a, sa = run(ours)
    b, sb = run(theirs)
    torch.testing.assert_close(sa, sb, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(a, base()(input_ids=IDS).logits, atol=1e-3)  # the experts do change the output


def test_generate_matches_peft(expert_dirs):
    ours, theirs = build(peftlab, expert_dirs["peft"]), build(peft, expert_dirs["peft"])
    ours.load_state_dict(gate(theirs), strict=False)
    prompt = IDS[:, :3]
    kw = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
              pad_token_id=0)
    assert torch.equal(ours.generate(**kw), theirs.generate(**kw))


def test_what_peft_keeps_and_loses_when_it_saves(expert_dirs, tmp_path):
    theirs = build(peft, expert_dirs["peft"], xlora_depth=2, xlora_size=8)
    with torch.no_grad():
        for p in gate(theirs).values():
            p.normal_()
    theirs.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    # layers.0 (a name holding the expert index "0") is lost; layers.3 is kept
    assert sorted(saved) == ["base_model.internal_xlora_classifier.layers.3.bias",
                             "base_model.internal_xlora_classifier.layers.3.weight"]
    # its expert subfolders are not LoRA folders: base weights inside, layer 1 (expert "1"'s name) missing
    sub = load_file(tmp_path / "peft" / "0" / "adapter_model.safetensors")
    assert any(k.endswith("mlp.down_proj.weight") for k in sub)
    assert not any(".layers.1." in k for k in sub)
    # peftlab loads the folder: the experts from the paths the config records, the gate tensors peft kept
    # (the lost ones keep their fresh initialisation, with a warning naming them)
    with pytest.warns(UserWarning, match=r"lacks the X-LoRA gate tensors \['layers.0.bias', 'layers.0.weight'\]"):
        ours = peftlab.PeftModel.from_pretrained(base(), tmp_path / "peft")
    mine = gate(ours)
    assert torch.equal(mine["base_model.internal_xlora_classifier.layers.3.weight"],
                       saved["base_model.internal_xlora_classifier.layers.3.weight"])
    # peft itself reloads the same partial gate
    again = peft.PeftModel.from_pretrained(base(), str(tmp_path / "peft"), adapters=expert_dirs["peft"])
    theirs_reloaded = gate(again)
    assert not torch.equal(theirs_reloaded["base_model.internal_xlora_classifier.layers.0.weight"],
                           gate(theirs)["base_model.internal_xlora_classifier.layers.0.weight"])
    # with the lost tensors put back, peftlab's loaded model computes what the saved peft model computed
    ours.load_state_dict({k: v for k, v in gate(theirs).items() if ".layers.0." in k}, strict=False)
    torch.testing.assert_close(run(ours)[0], run(theirs)[0], atol=1e-5, rtol=1e-5)


def test_peft_loads_peftlabs_folder_completely(expert_dirs, tmp_path):
    ours = build(peftlab, expert_dirs["peftlab"], xlora_depth=2, xlora_size=8)
    with torch.no_grad():
        for p in ours.base_model.internal_xlora_classifier.parameters():
            p.normal_()
    ours.save_pretrained(tmp_path / "ours")
    assert len(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == 4  # every gate tensor
    # the config names the experts' subfolders relative to the folder; peft opens them relative to the working
    # directory, so it is given the full paths
    cfg = peft.XLoraConfig.from_pretrained(str(tmp_path / "ours"))
    assert cfg.adapters == {"0": "0", "1": "1"}
    cfg.adapters = {name: str(tmp_path / "ours" / name) for name in cfg.adapters}
    theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path / "ours"), config=cfg).eval()
    torch.testing.assert_close(run(theirs)[0], run(ours)[0], atol=1e-5, rtol=1e-5)


def test_peft_needs_experts_named_by_index(expert_dirs):
    named = {"a": expert_dirs["peft"]["0"], "b": expert_dirs["peft"]["1"]}
    theirs = build(peft, named)
    with pytest.raises(KeyError):
        run(theirs)
    ours = build(peftlab, named)  # peftlab keeps the names and numbers the experts inside
    assert run(ours)[1].shape[-1] == 2


def test_peft_refuses_a_model_with_use_cache_and_warns_on_top_k_below_one(expert_dirs):
    """peft refuses a base model whose config has use_cache=True; peftlab turns the cache off for each forward
    (the gate must see the whole sequence). peft only warns on top_k_lora=0; peftlab refuses it."""
    cached = base_model("llama")
    assert cached.config.use_cache
    cfg = {"task_type": "CAUSAL_LM", "hidden_size": HIDDEN, "adapters": dict(expert_dirs["peft"])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="use_cache"):
            peft.get_peft_model(cached, peft.XLoraConfig(**cfg))
        torch.manual_seed(0)  # the gate's initialisation, as build() seeds it
        ours = peftlab.get_peft_model(base_model("llama"), peftlab.XLoraConfig(**cfg)).eval()
    torch.testing.assert_close(run(ours)[0], run(build(peftlab, expert_dirs["peft"]))[0])
    with pytest.warns(UserWarning, match="at least 1"):
        peft.XLoraConfig(**cfg, top_k_lora=0)
    with pytest.raises(ValueError, match="top_k_lora=0"):
        peftlab.XLoraConfig(**cfg, top_k_lora=0)


def test_peft_sorts_the_expert_names_when_it_saves(tmp_path):
    """peft writes adapter_config.json with sorted keys, the experts' names included, so a peft X-LoRA whose
    expert names do not sort in their order reloads them in another order than its gate was trained with;
    peftlab keeps the order (and peft reads peftlab's file in that order)."""
    adapters = {"b": "/x/b", "a": "/x/a"}
    peft.XLoraConfig(hidden_size=HIDDEN, adapters=adapters).save_pretrained(str(tmp_path / "peft"))
    assert list(peft.XLoraConfig.from_pretrained(str(tmp_path / "peft")).adapters) == ["a", "b"]
    peftlab.XLoraConfig(hidden_size=HIDDEN, adapters=adapters).save_pretrained(tmp_path / "ours")
    assert list(peft.XLoraConfig.from_pretrained(str(tmp_path / "ours")).adapters) == ["b", "a"]
    assert list(peftlab.PeftConfig.from_pretrained(tmp_path / "ours").adapters) == ["b", "a"]
