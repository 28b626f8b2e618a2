"""Integrations: transformers' ``model.add_adapter`` API, diffusers' LoRA calls on the lab pipeline, AutoPeftModel.

The ``peft`` package is the oracle where a file or a key crosses libraries: adapters saved by the
transformers-style API load in peft with the same outputs, peft's adapters load through it, and a peft
adapter folder loads into the pipeline's denoiser.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import peftlab
from peftlab import LoraConfig, PeftModel, TaskType
from peftlab.integrations import diffusers as dif
from peftlab.integrations.transformers import PeftAdapterMixin, enable_adapters_api, get_tuner
from peftlab.lab import pipeline as pl
from peftlab.tuners.base import AdapterLayer
from peftlab.utils.save_and_load import PEFT_PREFIX

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]


def _ids(seed: int = 0, batch: int = 2, seq: int = 6) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _cfg(**kw) -> LoraConfig:
    return LoraConfig(**{"target_modules": TARGETS, "init_lora_weights": False, **kw})


def _adapter_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


# ---------------------------------------------------------------------------------------------------
# transformers-style API
# ---------------------------------------------------------------------------------------------------
def test_add_switch_disable_delete(make_base):
    model = enable_adapters_api(make_base("llama"))
    ids = _ids()
    base = _logits(model, ids)
    keys_before = set(model.state_dict())
    assert type(model).__name__ == "LlamaForCausalLM" and isinstance(model, PeftAdapterMixin)

    torch.manual_seed(1)
    model.add_adapter(_cfg(), adapter_name="a1")
    torch.manual_seed(2)
    model.add_adapter(_cfg(target_modules=["q_proj"]), adapter_name="a2")
    assert model.active_adapters() == ["a2"]  # transformers activates the adapter it adds
    assert list(model.peft_config) == ["a1", "a2"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".a2." in n for n in trainable)
    out2 = _logits(model, ids)

    model.set_adapter("a1")
    out1 = _logits(model, ids)
    assert model.active_adapters() == ["a1"]
    assert not torch.allclose(out1, base) and not torch.allclose(out1, out2)
    assert all(".a1." in n for n, p in model.named_parameters() if p.requires_grad)

    model.set_adapter(["a1", "a2"])
    both = _logits(model, ids)
    assert model.active_adapters() == ["a1", "a2"] and not torch.allclose(both, out1)

    model.set_adapter("a1")
    model.disable_adapters()
    assert torch.equal(_logits(model, ids), base)  # exactly the base model
    model.enable_adapters()
    assert torch.equal(_logits(model, ids), out1)

    model.delete_adapter("a1")  # the active one: the remaining adapter takes over
    assert list(model.peft_config) == ["a2"] and model.active_adapters() == ["a2"]
    assert torch.allclose(_logits(model, ids), out2)
    model.delete_adapter("a2")
    assert get_tuner(model) is None and not hasattr(model, "peft_config")
    assert not _adapter_layers(model) and set(model.state_dict()) == keys_before
    assert torch.equal(_logits(model, ids), base)


def test_errors_name_the_fix(make_base):
    model = enable_adapters_api(make_base("llama"))
    for call in (lambda: model.set_adapter("x"), model.disable_adapters, model.active_adapters,
                 lambda: model.delete_adapter("x"), model.get_adapter_state_dict):
        with pytest.raises(ValueError, match="No adapter loaded"):
            call()
    with pytest.raises(TypeError, match="PeftConfig"):
        model.add_adapter({"r": 8})
    model.add_adapter(_cfg(), adapter_name="a")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter(_cfg(), adapter_name="a")
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        model.set_adapter(["a", "b"])
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        model.delete_adapter("b")
    with pytest.raises(ValueError, match="matched no module"):
        model.add_adapter(_cfg(target_modules=["nope"]), adapter_name="c")
    assert list(model.peft_config) == ["a"]  # the failed add left nothing behind


def test_state_dict_matches_peft_oracle(make_base):
    """Same keys and tensors as peft's inject_adapter_in_model + get_peft_model_state_dict."""
    ours = enable_adapters_api(make_base("llama"))
    ours.add_adapter(_cfg(r=4, lora_alpha=8), adapter_name="default")
    sd = ours.get_adapter_state_dict()
    assert sd and not any(k.startswith(PEFT_PREFIX) for k in sd)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in sd

    theirs = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8),
                                          make_base("llama"))
    peft.set_peft_model_state_dict(theirs, sd)
    back = peft.get_peft_model_state_dict(theirs)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    ids = _ids(3)
    assert torch.allclose(_logits(ours, ids), _logits(theirs, ids), atol=1e-6)


@pytest.mark.peer
def test_saved_adapter_loads_in_peft(make_base, adapter_dir):
    model = enable_adapters_api(make_base("llama"))
    model.add_adapter(_cfg(task_type=TaskType.CAUSAL_LM), adapter_name="sort")
    model.add_adapter(_cfg(), adapter_name="other")
    model.set_adapter("sort")
    ids = _ids(4)
    expected = _logits(model, ids)
    model.save_pretrained(adapter_dir)
    assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = list(load_file(adapter_dir / "adapter_model.safetensors"))
    assert keys and all(k.startswith(PEFT_PREFIX) for k in keys)  # transformers' default save_peft_format=True
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["inference_mode"] is True and config["peft_type"] == "LORA"

    loaded = peft.PeftModel.from_pretrained(make_base("llama"), adapter_dir)
    assert torch.allclose(_logits(loaded, ids), expected, atol=1e-6)
    again = PeftModel.from_pretrained(make_base("llama"), adapter_dir)
    assert torch.allclose(_logits(again, ids), expected, atol=1e-6)

    raw = adapter_dir / "raw"
    model.save_pretrained(raw, save_peft_format=False)  # the keys get_adapter_state_dict gives
    assert not any(k.startswith(PEFT_PREFIX) for k in load_file(raw / "adapter_model.safetensors"))
    assert torch.allclose(_logits(PeftModel.from_pretrained(make_base("llama"), raw), ids), expected, atol=1e-6)
    with pytest.warns(UserWarning, match="missing adapter keys"):  # peft needs the prefix: why it is the default
        peft.PeftModel.from_pretrained(make_base("llama"), raw)

    model.set_adapter(["sort", "other"])
    with pytest.raises(ValueError, match="one at a time"):
        model.save_pretrained(adapter_dir / "both")
    assert not (adapter_dir / "both").exists()


@pytest.mark.peer
def test_load_adapter_saved_by_peft(make_base, adapter_dir):
    torch.manual_seed(0)
    pm = peft.get_peft_model(make_base("llama"), peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False))
    pm.save_pretrained(adapter_dir)
    ids = _ids(5)
    expected = _logits(pm, ids)

    model = enable_adapters_api(make_base("llama"))
    model.train()
    model.load_adapter(adapter_dir, adapter_name="peft_one")
    assert model.active_adapters() == ["peft_one"] and not model.training
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference by default
    assert torch.allclose(_logits(model, ids), expected, atol=1e-6)

    model.load_adapter(adapter_dir, adapter_name="trainable", is_trainable=True)
    assert model.active_adapters() == ["trainable"]
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"trainable"}


def test_load_adapter_bad_input_leaves_model_unchanged(make_base, adapter_dir, tmp_path):
    model = enable_adapters_api(make_base("llama"))
    ids = _ids(6)
    with pytest.raises(FileNotFoundError):
        model.load_adapter(tmp_path / "missing", adapter_name="x")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        LoraConfig(target_modules=TARGETS).save_pretrained(tmp_path / "config_only")
        model.load_adapter(tmp_path / "config_only", adapter_name="x")
    assert get_tuner(model) is None and not _adapter_layers(model)

    other = enable_adapters_api(make_base("llama"))
    other.add_adapter(_cfg(r=2), adapter_name="small")
    other.save_pretrained(adapter_dir)
    model.add_adapter(_cfg(r=4), adapter_name="mine")
    before = _logits(model, ids)
    sd = other.get_adapter_state_dict()
    bad = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in sd.items()}
    with pytest.raises(ValueError, match="other shapes"):
        model.load_adapter(adapter_state_dict=bad, peft_config=_cfg(r=2), adapter_name="bad")
    assert list(model.peft_config) == ["mine"] and model.active_adapters() == ["mine"]
    assert torch.equal(_logits(model, ids), before)
    model.load_adapter(adapter_dir, adapter_name="small")  # the good file still loads
    assert model.active_adapters() == ["small"]


def test_trainer_trains_the_adapter_and_checkpoints_only_it(make_base, tmp_path):
    """The notes' flow: model.add_adapter(config), then transformers' Trainer; checkpoints hold the adapter."""
    from transformers import Trainer, TrainingArguments

    model = enable_adapters_api(make_base("llama"))
    model.add_adapter(LoraConfig(target_modules=TARGETS))
    rows = torch.randint(0, 128, (8, 6), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             save_steps=2, use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    Trainer(model=model, args=args, train_dataset=data).train()
    assert model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().sum() > 0  # B left zero
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    saved = sorted(os.listdir(tmp_path / "checkpoint-2"))
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved
    again = PeftModel.from_pretrained(make_base("llama"), tmp_path / "checkpoint-2")
    ids = _ids(8)
    assert torch.allclose(_logits(again, ids), _logits(model, ids), atol=1e-6)


def test_mixin_on_a_plain_module(adapter_dir):
    class Net(PeftAdapterMixin, nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0 = nn.Linear(6, 8)
            self.lin1 = nn.Linear(8, 3)

        def forward(self, x):
            return self.lin1(torch.relu(self.lin0(x)))

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="no adapters to save"):
        net.save_pretrained(adapter_dir)
    net.add_adapter(LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    assert net.active_adapters() == ["default"]
    out = net(x)
    net.save_pretrained(adapter_dir)

    torch.manual_seed(0)
    fresh = Net()
    theirs = peft.PeftModel.from_pretrained(fresh, adapter_dir)
    assert torch.allclose(theirs(x), out, atol=1e-6)
    assert "lin0" in json.loads((adapter_dir / "adapter_config.json").read_text())["target_modules"]


# ---------------------------------------------------------------------------------------------------
# diffusers-style API on the lab pipeline
# ---------------------------------------------------------------------------------------------------
def _pipe(seed: int = 0) -> pl.DigitDiffusionPipeline:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return pl.DigitDiffusionPipeline(unet=pl.Denoiser(hidden=32))


def _add(pipe: pl.DigitDiffusionPipeline, name: str, seed: int, r: int = 4, alpha: float = 8,
         text_encoder: bool = False) -> None:
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=list(pl.UNET_TARGETS),
                                     init_lora_weights=False), adapter_name=name)
    if text_encoder:
        pipe.text_encoder.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                                 init_lora_weights=False), adapter_name=name)


def _unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 8, 8, generator=g), torch.randint(0, 100, (5,), generator=g), torch.randn(5, 32, generator=g)


def _images(pipe: pl.DigitDiffusionPipeline) -> torch.Tensor:
    return pipe(["a drawing of the digit seven", "two"], num_inference_steps=4,
                generator=torch.Generator().manual_seed(0)).images


def test_pipeline_samples_are_deterministic():
    pipe = _pipe()
    a, b = _images(pipe), _images(pipe)
    assert a.shape == (2, 8, 8) and torch.equal(a, b) and a.abs().max() <= 1
    ids = pipe.tokenizer(["a drawing of the digit seven", "xyz", ""])["input_ids"]
    assert ids[0, :6].tolist() == [pl.VOCAB.index(w) for w in "a drawing of the digit seven".split()]
    assert ids[1, 0] == 1 and ids[2].sum() == 0  # <unk>; an empty prompt is all <pad>


def test_set_adapters_is_a_weighted_sum_of_deltas():
    """set_adapters([a, b], [wa, wb]) computes the unet with W₀ + wa·ΔW_a + wb·ΔW_b in every LoRA layer."""
    pipe = _pipe()
    expected = copy.deepcopy(pipe.unet)
    _add(pipe, "a", 1)
    _add(pipe, "b", 2, r=2, alpha=3)
    wa, wb = 0.7, -0.4
    with torch.no_grad():
        for name, layer in get_tuner(pipe.unet).adapter_layers():
            target = expected.get_submodule(name)
            target.weight += wa * layer.get_delta_weight("a") + wb * layer.get_delta_weight("b")
    pipe.set_adapters(["a", "b"], [wa, wb])
    assert pipe.get_active_adapters() == ["a", "b"]
    x, t, c = _unet_inputs()
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, t, c), expected(x, t, c), atol=1e-5)
        # and one layer, term by term: h = W₀x + wa·Δ_a(x) + wb·Δ_b(x)
        layer = pipe.unet.in_proj
        h = x.flatten(1)
        parts = {}
        for n in ("a", "b"):
            pipe.set_adapters(n)
            parts[n] = layer(h) - layer.base_layer(h)
        pipe.set_adapters(["a", "b"], [wa, wb])
        assert torch.allclose(layer(h), layer.base_layer(h) + wa * parts["a"] + wb * parts["b"], atol=1e-5)
    pipe.set_adapters("a")  # weights default to 1.0 again
    assert get_tuner(pipe.unet).model.in_proj.scaling["a"] == pytest.approx(8 / 4)


def test_disable_lora_restores_the_base_pipeline():
    pipe = _pipe()
    base = _images(pipe)
    _add(pipe, "a", 1, text_encoder=True)
    pipe.set_adapters("a")
    styled = _images(pipe)
    assert not torch.allclose(styled, base)
    pipe.disable_lora()
    assert torch.equal(_images(pipe), base)
    pipe.enable_lora()
    assert torch.equal(_images(pipe), styled)
    pipe.set_adapters("a", 0.0)  # weight 0 is the base too
    assert torch.equal(_images(pipe), base)


def test_fuse_and_unfuse_restore():
    pipe = _pipe()
    _add(pipe, "a", 1, text_encoder=True)
    _add(pipe, "b", 2)
    weights = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    x, t, c = _unet_inputs()
    with torch.no_grad():
        unfused = pipe.unet(x, t, c)
        pipe.set_adapters(["a", "b"], [0.6, 0.3])
        scaled = pipe.unet(x, t, c)
        pipe.set_adapters(["a", "b"], [1.0, 0.5])
        pipe.fuse_lora(lora_scale=0.6)
        assert all(get_tuner(m).model is m for m in (pipe.unet, pipe.text_encoder))
        assert pipe.unet.in_proj.merged and pipe.text_encoder.proj.merged
        assert torch.allclose(pipe.unet(x, t, c), scaled, atol=1e-5)
        with pytest.raises(ValueError, match="unfuse_lora"):
            pipe.set_adapters("a")
        pipe.unfuse_lora()
        assert not pipe.unet.in_proj.merged
        assert torch.allclose(pipe.unet(x, t, c), unfused, atol=1e-5)
    for n, p in pipe.unet.named_parameters():
        assert torch.allclose(p, weights[n], atol=1e-6), n


def test_save_and_load_lora_weights_roundtrip(tmp_path):
    pipe = _pipe()
    _add(pipe, "bold", 1, r=4, alpha=8, text_encoder=True)
    pipe.set_adapters("bold")
    styled = _images(pipe)
    path = pipe.save_lora_weights(tmp_path, adapter_name="bold")
    assert os.path.basename(path) == dif.LORA_WEIGHT_NAME
    with safe_open(path, framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder"}
    assert "unet.in_proj.lora_A.weight" in keys and "text_encoder.proj.lora_B.weight" in keys
    assert json.loads(meta[dif.LORA_ADAPTER_METADATA_KEY])["unet.lora_alpha"] == 8

    fresh = _pipe()
    fresh.load_lora_weights(tmp_path, adapter_name="bold")
    assert fresh.get_list_adapters() == {"unet": ["bold"], "text_encoder": ["bold"]}
    assert fresh.get_active_adapters() == ["bold"]
    assert torch.allclose(_images(fresh), styled, atol=1e-6)

    # a state dict without metadata: r from lora_A's shape, lora_alpha = r (diffusers' rule)
    other = _pipe()
    other.load_lora_weights(load_file(path))
    assert other.get_active_adapters() == ["default_0"]
    config = other.unet.peft_config["default_0"]
    assert config.r == 4 and config.lora_alpha == 4 and "mid.1" in config.target_modules
    other.load_lora_weights(load_file(path))
    assert other.get_active_adapters() == ["default_1"]


@pytest.mark.peer
def test_peft_adapter_folder_loads_into_the_unet(tmp_path):
    pipe = _pipe()
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(pipe.unet),
                             peft.LoraConfig(r=4, lora_alpha=16, target_modules=["in_proj", "out_proj"],
                                             init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    x, t, c = _unet_inputs(1)
    with torch.no_grad():
        expected = pm(x, t, c)
    pipe.load_lora_weights(tmp_path, adapter_name="from_peft")
    assert pipe.get_list_adapters() == {"unet": ["from_peft"]}
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, t, c), expected, atol=1e-6)

    # and back: the pipeline's unet adapter, saved the transformers way, loads in peft
    pipe.unet.save_pretrained(tmp_path / "back")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(_pipe().unet), tmp_path / "back")
    with torch.no_grad():
        assert torch.allclose(again(x, t, c), expected, atol=1e-6)


def test_load_lora_weights_errors_leave_the_pipeline_unchanged(tmp_path):
    pipe = _pipe()
    _add(pipe, "a", 1)
    pipe.set_adapters("a")
    before = _images(pipe)
    good = {f"unet.{k}": v for k, v in pipe.unet.get_adapter_state_dict("a").items()}

    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe.load_lora_weights(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"pytorch_lora_weights.safetensors.*notes.txt"):
        pipe.load_lora_weights(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="weight_name='style.safetensors'"):
        pipe.load_lora_weights(tmp_path / "empty", weight_name="style.safetensors")
    (tmp_path / "empty" / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        pipe.load_lora_weights(tmp_path / "empty", weight_name="broken.safetensors")
    with pytest.raises(ValueError, match="belong to no component"):
        pipe.load_lora_weights({**good, "vae.decoder.lora_A.weight": torch.zeros(4, 4)}, adapter_name="x")
    with pytest.raises(ValueError, match="not LoRA tensors"):
        pipe.load_lora_weights({**good, "unet.in_proj.weight": torch.zeros(32, 64)}, adapter_name="x")
    unknown = {**good, "unet.nope.lora_A.weight": torch.zeros(4, 64), "unet.nope.lora_B.weight": torch.zeros(8, 4)}
    with pytest.raises(ValueError, match="belong to no module"):
        pipe.load_lora_weights(unknown, adapter_name="x")
    wrong_shape = {k: torch.zeros(v.shape[0], v.shape[1] + 1) for k, v in good.items()}
    with pytest.raises(ValueError, match="other shapes"):
        pipe.load_lora_weights(wrong_shape, adapter_name="x")
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_weights(good, adapter_name="a")
    file = tmp_path / "te_only.safetensors"
    save_file({"text_encoder.nope.lora_A.weight": torch.zeros(4, 32),
               "text_encoder.nope.lora_B.weight": torch.zeros(32, 4)}, str(file))
    with pytest.raises(ValueError, match="matched no module"):
        pipe.load_lora_weights(file, adapter_name="x")

    assert pipe.get_list_adapters() == {"unet": ["a"]} and pipe.get_active_adapters() == ["a"]
    assert get_tuner(pipe.text_encoder) is None
    assert torch.equal(_images(pipe), before)


def test_set_adapters_and_delete_errors_and_unload():
    pipe = _pipe()
    base = _images(pipe)
    _add(pipe, "a", 1, text_encoder=True)
    _add(pipe, "b", 2)
    with pytest.raises(ValueError, match="not loaded"):
        pipe.set_adapters(["a", "zzz"])
    with pytest.raises(ValueError, match="one weight each"):
        pipe.set_adapters(["a", "b"], [1.0])
    pipe.set_adapters("b")  # the text encoder holds no "b": it runs without LoRA
    assert get_tuner(pipe.text_encoder).active_adapters == []
    pipe.delete_adapters("a")
    assert pipe.get_list_adapters() == {"unet": ["b"]} and get_tuner(pipe.text_encoder) is None
    with pytest.raises(ValueError, match="not loaded"):
        pipe.delete_adapters("a")
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # unfuses first
    assert pipe.get_list_adapters() == {} and not _adapter_layers(pipe.unet)
    assert torch.allclose(_images(pipe), base, atol=1e-6)


def test_train_style_lora_trains_only_the_lora():
    pipe = _pipe()
    frozen = {n: p.detach().clone() for n, p in pipe.components().named_parameters()}
    hist = pl.train_style_lora(pipe, "flipped", steps=3, r=2, batch_size=8, text_encoder=True)
    assert len(hist.loss) == 3
    params = dict(pipe.components().named_parameters())
    for n, before in frozen.items():
        key = n.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        now = params.get(n, params.get(key))
        assert now is not None and torch.equal(now, before), n
    assert pipe.get_list_adapters() == {"unet": ["flipped"], "text_encoder": ["flipped"]}
    b = pipe.unet.in_proj.lora_B["flipped"].weight
    assert b.abs().sum() > 0  # B started at zero and moved
    with pytest.raises(ValueError, match="unknown style"):
        pl.train_style_lora(pipe, "italic", steps=1)


# ---------------------------------------------------------------------------------------------------
# AutoPeftModel
# ---------------------------------------------------------------------------------------------------
def test_auto_peft_model_from_a_local_folder(make_base, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    make_base("llama").save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(0)
    pm = peftlab.get_peft_model(base, _cfg(task_type=TaskType.CAUSAL_LM))
    ids = _ids(7)
    expected = _logits(pm, ids)
    pm.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == str(base_dir)

    loaded = peftlab.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, peftlab.PeftModelForCausalLM)
    assert torch.allclose(_logits(loaded, ids), expected, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="task_type='CAUSAL_LM'"):
        peftlab.AutoPeftModelForSeq2SeqLM.from_pretrained(tmp_path / "adapter")

    # the transformers-style API writes base_model_name_or_path too, so its folder loads the same way
    model = enable_adapters_api(AutoModelForCausalLM.from_pretrained(base_dir))
    model.load_adapter(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "tf_style")
    again = peftlab.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "tf_style")
    assert torch.allclose(_logits(again, ids), expected, atol=1e-6)

    config = LoraConfig(target_modules=TARGETS)
    config.save_pretrained(tmp_path / "no_base")
    save_file({}, str(tmp_path / "no_base" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="no base_model_name_or_path"):
        peftlab.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "no_base")


def test_image_grid_shapes_and_labels():
    import matplotlib

    matplotlib.use("Agg")
    from peftlab import viz

    fig = viz.image_grid(torch.zeros(2, 3, 8, 8), row_labels=["a", "b"], col_labels=["0", "1", "2"], title="t")
    assert len(fig.axes) == 6 and fig.axes[0].get_ylabel() == "a" and fig.axes[2].get_title() == "2"
    assert len(viz.image_grid(torch.zeros(4, 8, 8)).axes) == 4  # (n, H, W): one row
    with pytest.raises(ValueError, match="row labels"):
        viz.image_grid(torch.zeros(2, 3, 8, 8), row_labels=["a"])
    with pytest.raises(ValueError, match="rows, cols, H, W"):
        viz.image_grid(torch.zeros(8, 8))
    matplotlib.pyplot.close("all")
