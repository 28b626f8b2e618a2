"""Tiny models: every builder runs, is deterministic per seed, and has the advertised layers."""

import pytest
import torch
import torch.nn as nn

from peftlab.lab import models


def _forward(name, model):
    x = models.example_inputs(name)
    return model(**x) if isinstance(x, dict) else model(x)


@pytest.mark.parametrize("name", models.TINY_MODELS)
def test_builds_and_runs(name):
    model = models.tiny_model(name)
    out = _forward(name, model)
    if models.model_task(name) == "toy":
        assert out.shape == (2, 2)
        assert torch.isfinite(out).all()
    elif models.model_task(name) == "feature":
        assert out.last_hidden_state.shape[-1] <= 64
    else:
        assert torch.isfinite(out.loss)
    assert not model.training  # returned in eval mode


@pytest.mark.parametrize("name", models.TINY_MODELS)
def test_deterministic_per_seed(name):
    a, b, c = models.tiny_model(name, seed=1), models.tiny_model(name, seed=1), models.tiny_model(name, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


@pytest.mark.parametrize("name", models.TRANSFORMERS_MODELS)
def test_transformers_models_are_tiny(name):
    cfg = models.tiny_model(name).config
    assert 16 <= cfg.hidden_size <= 64 if hasattr(cfg, "hidden_size") else True
    assert cfg.num_hidden_layers == 2
    assert 100 <= cfg.vocab_size <= 1000


def test_layer_types():
    from transformers.pytorch_utils import Conv1D

    kinds = lambda m: {type(x) for x in m.modules()}
    assert Conv1D in kinds(models.tiny_gpt2())
    assert Conv1D in kinds(models.tiny_model("emb_conv1d"))
    assert nn.Conv1d in kinds(models.tiny_model("conv1d"))
    assert nn.Conv2d in kinds(models.tiny_model("conv2d"))
    mlp = models.MLP()
    assert (mlp.lin0.in_features, mlp.lin0.out_features, mlp.lin1.out_features) == (10, 20, 2)
    llama = models.tiny_llama()
    assert isinstance(llama.model.layers[0].self_attn.q_proj, nn.Linear)
    assert models.tiny_t5().config.is_encoder_decoder
    assert models.tiny_bert(classification=True).config.num_labels == 2
    assert type(models.tiny_opt()).__name__ == "OPTForCausalLM"
    gpt2 = models.tiny_gpt2()
    assert gpt2.config.bos_token_id < gpt2.config.vocab_size and gpt2.config.eos_token_id < gpt2.config.vocab_size


def test_unknown_name():
    with pytest.raises(ValueError, match="valid names: .*llama"):
        models.tiny_model("gpt5")
