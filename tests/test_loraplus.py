"""LoRA+: ``create_loraplus_optimizer`` builds peft's four parameter groups (A, embedding, B, B without decay)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import base_model

import peftlab
from peftlab.lab.models import example_inputs
from peftlab.optimizers import create_loraplus_optimizer

peft = pytest.importorskip("peft", reason="peft (the oracle) is not installed")
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer  # noqa: E402

LIBS = {"peft": (peft, peft_create_loraplus_optimizer), "peftlab": (peftlab, create_loraplus_optimizer)}
CASES = [
    ("mlp", "mlp", dict(target_modules=["lin0", "lin1"])),
    ("mlp-bias-all-mts", "mlp", dict(target_modules=["lin0"], bias="all", modules_to_save=["lin1"])),
    ("emb-conv1d", "emb_conv1d", dict(target_modules=["emb", "conv1d", "lin0"])),
    ("llama-dora-embed", "llama", dict(target_modules=["embed_tokens", "q_proj", "v_proj"], use_dora=True,
                                       exclude_modules=["embed_tokens"], task_type="CAUSAL_LM")),
    ("llama-embed", "llama", dict(target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM")),
    ("bert-cls-lora-bias", "bert_cls", dict(target_modules=["query", "value"], lora_bias=True, task_type="SEQ_CLS")),
]
IDS = [c[0] for c in CASES]
KW = dict(lr=2e-4, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.01, loraplus_lr_embedding=3e-6)


def canonical(name: str) -> str:
    """peft and peftlab name every adapter tensor alike (DoRA's m included)."""
    return name


def groups(lib_name: str, model: str, kwargs: dict, optimizer_cls=torch.optim.AdamW, **extra):
    lib, create = LIBS[lib_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = lib.get_peft_model(base_model(model), lib.LoraConfig(**kwargs))
        opt = create(pm, optimizer_cls, **KW, **extra)
    names = {id(p): canonical(n) for n, p in pm.named_parameters()}
    return pm, opt, [({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"]) for g in opt.param_groups]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_groups_equal_peft(case):
    _, model, kwargs = case
    _, ref_opt, ref = groups("peft", model, kwargs)
    pm, opt, ours = groups("peftlab", model, kwargs)
    assert ours == ref  # same parameters, learning rates and weight decay, group by group
    assert type(opt) is type(ref_opt) and opt.defaults["lr"] == ref_opt.defaults["lr"]
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert set().union(*(g[0] for g in ours)) == trainable  # every trainable tensor in exactly one group
    assert sum(len(g[0]) for g in ours) == len(trainable)


def test_group_contents():
    _, _, g = groups("peftlab", "llama", CASES[4][2])
    (a, lr_a, _), (emb, lr_emb, _), (b, lr_b, wd_b), (b_nd, lr_b_nd, wd_nd) = g
    assert lr_a == 2e-4 and lr_b == lr_b_nd == 2e-4 * 16 and lr_emb == 3e-6 and wd_b == 0.01 and wd_nd == 0.0
    assert all("lora_A" in n for n in a)
    assert all("lora_B" in n for n in b)
    assert emb == {"base_model.model.model.embed_tokens.lora_embedding_A.default",
                   "base_model.model.model.embed_tokens.lora_embedding_B.default"}
    _, _, g = groups("peftlab", "llama", CASES[3][2])
    assert any(n.endswith("lora_magnitude_vector.default.weight") for n in g[2][0])  # 1-D: in B's group (λ·η)
    _, _, g = groups("peftlab", "mlp", CASES[1][2])
    assert {n for n in g[3][0]} >= {"base_model.model.lin0.base_layer.bias"}  # biases: no weight decay


def test_extra_optimizer_kwargs_and_a_step():
    pm = peftlab.get_peft_model(base_model("mlp"), peftlab.LoraConfig(target_modules=["lin0", "lin1"]))
    opt = create_loraplus_optimizer(pm, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=16, momentum=0.9)
    assert opt.defaults["momentum"] == 0.9
    x = example_inputs("mlp")
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    opt.step()
    for n, p in pm.named_parameters():
        if p.requires_grad:  # SGD's first step: Δp = −lr·g, with lr·16 for B
            lr = 0.1 * 16 if "lora_B" in n else 0.1
            torch.testing.assert_close(p - before[n], -lr * grads[n], atol=1e-7, rtol=1e-5, msg=n)
    assert all(grads[n].abs().sum() > 0 for n in grads if "lora_B" in n)


def test_bad_ratio():
    pm = peftlab.get_peft_model(base_model("mlp"), peftlab.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0)
