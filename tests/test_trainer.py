"""peftlab.Trainer: adapter-only checkpoints, exact resume, best model and save_model for every method;
gradient checkpointing with adapters gives the same gradients.

Explained in: book/distributed.ipynb
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab import LoraConfig, PeftModel, TaskType, get_peft_model
from peftlab.config import TargetingConfig
from peftlab.registry import methods
from peftlab.utils.save_and_load import adapter_state_dict, get_peft_model_state_dict

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=FutureWarning)


def tiny_llama(tied: bool = True, seed: int = 0):
    """A SmolLM2-like tiny Llama: input and output embeddings are one tensor when ``tied``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=24, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def dataset(n: int = 32, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, 24, (n, 6), generator=g).tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * 6] * n, "labels": rows})


def args(tmp: Path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp), per_device_train_batch_size=4, learning_rate=5e-2, report_to=[],
                disable_tqdm=True, use_cpu=True, logging_steps=1, save_strategy="steps", seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def lora(seed: int = 0, **kw) -> PeftModel:
    return get_peft_model(tiny_llama(seed=seed), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4,
                                                             target_modules=["q_proj", "v_proj"], **kw))


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def adapter(model: PeftModel, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


# ---- checkpoints ------------------------------------------------------------------------------------
def test_checkpoint_holds_the_adapter_and_optimizer_not_the_model(tmp_path: Path) -> None:
    from peftlab import Trainer

    model = lora()
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=4, save_steps=2), train_dataset=dataset())
    trainer.train()  # tied embeddings: transformers.Trainer's raw state-dict save would raise here
    ckpt = tmp_path / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
            "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    saved = load_file(ckpt / "adapter_model.safetensors")
    assert set(saved) == set(get_peft_model_state_dict(model))  # the adapter, every tensor of it, nothing else
    final = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    for k, v in adapter(model).items():
        assert torch.equal(final[k], v)


def test_plain_transformers_trainer_cannot_checkpoint_a_tied_peftlab_model(tmp_path: Path) -> None:
    """Why peftlab.Trainer exists (book/quickstart.ipynb, book/distributed.ipynb say so): transformers.Trainer sees
    a plain nn.Module and writes its whole state dict, which safetensors refuses when the embeddings are tied."""
    model = lora()
    trainer = transformers.Trainer(model=model, args=args(tmp_path, max_steps=2, save_steps=2), train_dataset=dataset())
    with pytest.raises(RuntimeError, match="share memory"):
        trainer.train()
    assert not (tmp_path / "checkpoint-2" / "adapter_model.safetensors").exists()


@pytest.mark.peer
def test_peft_loads_a_peftlab_trainer_checkpoint(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from peftlab import Trainer

    model = lora()
    Trainer(model=model, args=args(tmp_path, max_steps=2, save_steps=2), train_dataset=dataset()).train()
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "checkpoint-2"))
    x = torch.tensor([[1, 5, 7, 9]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, model(input_ids=x).logits)


def test_resume_continues_with_the_losses_of_an_uninterrupted_run(tmp_path: Path) -> None:
    from peftlab import Trainer

    full = Trainer(model=lora(), args=args(tmp_path / "a", max_steps=6, save_steps=3), train_dataset=dataset())
    full.train()
    # a new process: the same base model, an adapter initialised differently (the checkpoint must replace it)
    resumed_model = lora()
    with torch.no_grad():
        for p in resumed_model.parameters():
            if p.requires_grad:
                p.normal_()
    resumed = Trainer(model=resumed_model, args=args(tmp_path / "b", max_steps=6, save_steps=3),
                      train_dataset=dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    a, b = losses(full), losses(resumed)  # the resumed log starts with the checkpoint's steps 1-3
    assert sorted(b) == [1, 2, 3, 4, 5, 6] and resumed.state.global_step == 6
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    for k, v in adapter(full.model).items():
        torch.testing.assert_close(adapter(resumed_model)[k], v, rtol=1e-6, atol=1e-7)


def test_adapters_added_in_place_checkpoint_and_resume(tmp_path: Path) -> None:
    """transformers' adapter API (peftlab.integrations): the model keeps its class, the adapters live inside it."""
    from peftlab import Trainer
    from peftlab.integrations import enable_adapters_api, get_tuner

    def make():
        model = enable_adapters_api(tiny_llama())
        model.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM))
        model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"], task_type=TaskType.CAUSAL_LM), "other")
        model.set_adapter("default")
        return model

    def state(model, name="default"):
        return {k: v.detach().clone() for k, v in adapter_state_dict(model, name,
                                                                     get_tuner(model).peft_config[name]).items()}

    full_model = make()
    full = Trainer(model=full_model, args=args(tmp_path / "a", max_steps=4, save_steps=2), train_dataset=dataset())
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(ckpt))
    assert (ckpt / "other" / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    resumed_model = make()
    with torch.no_grad():
        for p in resumed_model.parameters():
            if p.requires_grad:
                p.normal_()
    resumed = Trainer(model=resumed_model, args=args(tmp_path / "b", max_steps=4, save_steps=2),
                      train_dataset=dataset())
    resumed.train(resume_from_checkpoint=str(ckpt))
    for step in (3, 4):
        assert losses(resumed)[step] == pytest.approx(losses(full)[step], rel=1e-6, abs=1e-7)
    for k, v in state(full_model).items():
        torch.testing.assert_close(state(resumed_model)[k], v, rtol=1e-6, atol=1e-7)
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a" / "checkpoint-4"))  # peft's format
    for k, v in state(full_model).items():
        assert torch.equal(get_peft_model_state_dict(reloaded)["base_model.model." + k], v), k


def test_resume_from_a_folder_without_adapter_is_a_clear_error(tmp_path: Path) -> None:
    from peftlab import Trainer

    (tmp_path / "empty").mkdir()
    trainer = Trainer(model=lora(), args=args(tmp_path, max_steps=2), train_dataset=dataset())
    with pytest.raises(ValueError, match="no adapter weights.*peftlab.Trainer"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "empty"))


def test_adapter_only_checkpoints_load_under_trainers_fsdp_option(tmp_path: Path) -> None:
    """Trainer's fsdp option runs on GPUs only; there transformers' own loader would keep the current adapter and
    log a warning. With the trainer's FSDP flag switched on here, peftlab still copies the adapter in (the copy
    into FSDP2-sharded parameters is checked by tests/test_distributed.py); FSDP's own model files go to
    transformers."""
    from peftlab import Trainer

    model = lora()
    trainer = Trainer(model=model, args=args(tmp_path / "run", max_steps=2, save_steps=2), train_dataset=dataset())
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    trained = adapter(model)
    trainer.is_fsdp_enabled = True
    for load in (lambda: trainer._load_from_checkpoint(str(ckpt)), trainer._load_best_model):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_()
        trainer.state.best_model_checkpoint = str(ckpt)
        load()
        for k, v in trained.items():
            assert torch.equal(adapter(model)[k], v), k
    (ckpt / "pytorch_model_fsdp.bin").touch()  # FSDP's own model state: transformers' loader, not peftlab's
    assert trainer._engine_loads(str(ckpt)) and not trainer._engine_loads(str(tmp_path))


def test_a_model_without_peftlab_adapters_goes_through_transformers_unchanged(tmp_path: Path) -> None:
    from peftlab import Trainer

    model = tiny_llama(tied=False)
    Trainer(model=model, args=args(tmp_path, max_steps=2, save_steps=2), train_dataset=dataset()).train()
    assert "model.safetensors" in os.listdir(tmp_path / "checkpoint-2")


def test_save_model_with_a_gathered_state_dict_writes_its_adapter_tensors(tmp_path: Path) -> None:
    """FSDP and DeepSpeed gather a full state dict for save_model; the model's own parameters may be shards."""
    from peftlab import Trainer

    model = lora()
    model.add_adapter("other", LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, target_modules=["q_proj"]))
    trainer = Trainer(model=model, args=args(tmp_path / "run", max_steps=1), train_dataset=dataset())
    gathered = {k: v.detach() + 1 for k, v in model.state_dict().items()}  # differs from the live parameters
    trainer._save(str(tmp_path / "out"), state_dict=gathered)
    for name, folder in (("default", tmp_path / "out"), ("other", tmp_path / "out" / "other")):
        saved = load_file(folder / "adapter_model.safetensors")
        live = adapter(model, name)
        assert set(saved) == set(live)
        for k, v in live.items():
            assert torch.equal(saved[k], v + 1), k
        assert (folder / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out"))
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in gathered.items() if ".lora_" in k and "default" in k)
    with pytest.raises(ValueError, match="lacks .* tensors of adapter 'default'.*FULL_STATE_DICT"):
        trainer._save(str(tmp_path / "bad"), state_dict={k: v for k, v in gathered.items() if "lora_A" not in k})


# ---- every registered method: load_best_model_at_end and save_model ----------------------------------
# methods whose config does not take a list of target layers, needs a field without a default, or whose
# default does not fit the tiny Llama's 16 features (OFT's block size of 32)
METHOD_KWARGS = {"ADAPTION_PROMPT": {"adapter_len": 2, "adapter_layers": 1, "target_modules": "self_attn"},
                 "OFT": {"oft_block_size": 4}, "BOFT": {"boft_block_size": 4},
                 "ADALORA": {"total_step": 100}}


def method_config(spec) -> TargetingConfig:
    kwargs = {"target_modules": ["q_proj", "v_proj"], **METHOD_KWARGS.get(spec.peft_type, {})}
    if not issubclass(spec.config_class, TargetingConfig) and spec.peft_type not in METHOD_KWARGS:
        pytest.fail(f"{spec.peft_type}: add a config for this method to METHOD_KWARGS in tests/test_trainer.py")
    return spec.config_class(task_type=TaskType.CAUSAL_LM, **kwargs)


# X-LoRA is built from saved LoRA experts and holds one gate: it has its own test below
@pytest.mark.parametrize("spec", [s for s in methods() if s.peft_type != "XLORA"], ids=lambda s: s.peft_type)
def test_best_model_at_end_and_save_model_for_every_method(spec, tmp_path: Path) -> None:
    from peftlab import Trainer

    model = get_peft_model(tiny_llama(), method_config(spec))
    model.add_adapter("other", method_config(spec))  # a second, inactive adapter: saved in a sub-folder
    other = adapter(model, "other")
    # a metric that names step 2 the best, whatever the losses do: the reload must go back to checkpoint-2
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=4, save_steps=1, eval_strategy="steps", eval_steps=1,
                                             load_best_model_at_end=True, metric_for_best_model="pick",
                                             greater_is_better=True),
                      train_dataset=dataset(), eval_dataset=dataset(8, seed=1),
                      compute_metrics=lambda _: {"pick": float(trainer.state.global_step == 2)})
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2"), best
    assert os.path.isfile(os.path.join(best, "other", "adapter_model.safetensors"))
    saved_best = load_file(os.path.join(best, "adapter_model.safetensors"))
    last = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    now = adapter(model)
    assert any(not torch.equal(last[k], now[k]) for k in now)  # something was reloaded ...
    for k, v in now.items():  # ... the best checkpoint's tensors, exactly
        assert torch.equal(saved_best[k], v), k
    for k, v in adapter(model, "other").items():
        assert torch.equal(other[k], v)  # the inactive adapter did not train

    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert {"adapter_model.safetensors", "adapter_config.json", "other"} <= set(os.listdir(out))
    model.eval()
    x = torch.tensor([[1, 5, 7, 9]])
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(out))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits)


def test_xlora_checkpoints_hold_the_gate_best_model_and_save_model(tmp_path: Path) -> None:
    from peftlab import Trainer, XLoraConfig

    experts = {}
    for i in range(2):  # two saved LoRA experts on the same base
        folder = tmp_path / f"expert{i}"
        expert = lora(seed=i)
        with torch.no_grad():  # trained-looking experts (B ≠ 0): otherwise the gate's scalings change nothing
            for name, p in expert.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        expert.save_pretrained(str(folder))
        experts[str(i)] = str(folder)
    model = get_peft_model(tiny_llama(), XLoraConfig(task_type=TaskType.CAUSAL_LM, hidden_size=16, adapters=experts,
                                                     xlora_depth=1))
    gate = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    assert gate and all("xlora" in k for k in gate)  # only the gate trains
    trainer = Trainer(model=model, args=args(tmp_path / "run", max_steps=4, save_steps=1, eval_strategy="steps",
                                             eval_steps=1, load_best_model_at_end=True, metric_for_best_model="pick",
                                             greater_is_better=True),
                      train_dataset=dataset(), eval_dataset=dataset(8, seed=1),
                      compute_metrics=lambda _: {"pick": float(trainer.state.global_step == 2)})
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2"), best
    assert not any(f.startswith("model") for f in os.listdir(best))  # the gate and experts, not the base model
    x = torch.tensor([[1, 5, 7, 9]])
    model.eval()
    reloaded_best = PeftModel.from_pretrained(tiny_llama(), best)
    with torch.no_grad():
        torch.testing.assert_close(reloaded_best(input_ids=x).logits, model(input_ids=x).logits)
    now = {k: v for k, v in model.named_parameters() if v.requires_grad}
    assert any(not torch.equal(gate[k], now[k]) for k in gate)  # the gate trained
    out = tmp_path / "final"
    trainer.save_model(str(out))
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(out))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits)


# ---- gradient checkpointing ---------------------------------------------------------------------------
def tiny_vit(seed: int = 0):
    """An image classifier: its main input is ``pixel_values``, so transformers adds no input-grad hook itself."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                               num_labels=3))


BASES = {"llama": tiny_llama, "vit": tiny_vit}


def grads(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    if name == "llama":
        x = torch.tensor([[1, 5, 7, 9, 3, 2], [4, 4, 8, 1, 6, 2]])
        loss = model(input_ids=x, labels=x).loss
    else:
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        loss = model(pixel_values=x, labels=torch.tensor([0, 2])).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("when", ["before-wrapping", "after-wrapping"])
@pytest.mark.parametrize("name", sorted(BASES))
def test_gradient_checkpointing_gives_the_same_adapter_gradients(name: str, reentrant: bool, when: str) -> None:
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: all get grads
    reference = grads(get_peft_model(BASES[name](), copy.deepcopy(config)), name)
    assert reference and all(g.abs().sum() > 0 for g in reference.values())
    kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": reentrant}}
    if when == "before-wrapping":  # peft's path: PeftModel makes the embeddings' output require grad
        base = BASES[name]()  # (without that, re-entrant checkpointing of the ViT raises in backward)
        base.activation_checkpointing_enable(**kwargs)
        model = get_peft_model(base, copy.deepcopy(config))
    else:  # Trainer's path (gradient_checkpointing=True), on the wrapped model
        model = get_peft_model(BASES[name](), copy.deepcopy(config))
        model.activation_checkpointing_enable(**kwargs)
    assert model.get_base_model().is_activation_checkpointing
    checkpointed = grads(model, name)
    assert set(checkpointed) == set(reference)
    for n, g in reference.items():
        torch.testing.assert_close(checkpointed[n], g, rtol=1e-5, atol=1e-7)


def test_peft_loses_the_gradient_when_checkpointing_starts_after_wrapping() -> None:
    """The difference from peft 0.21 this file pins: peft adds the input-grad hook only in PeftModel.__init__."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_vit(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="does not require grad"):
        grads(model, "vit")
    ours = get_peft_model(tiny_vit(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert grads(ours, "vit")


def test_trainer_with_gradient_checkpointing_trains_the_same_adapter(tmp_path: Path) -> None:
    from peftlab import Trainer

    runs = []
    for gc in (False, True):
        model = lora()
        Trainer(model=model, args=args(tmp_path / str(gc), max_steps=3, save_strategy="no", gradient_checkpointing=gc,
                                       gradient_checkpointing_kwargs={"use_reentrant": True}),
                train_dataset=dataset()).train()
        runs.append(adapter(model))
    initial = adapter(lora())
    assert all(not torch.equal(runs[0][k], initial[k]) for k in initial if "lora_B" in k)  # it trained
    for k, v in runs[0].items():
        torch.testing.assert_close(runs[1][k], v, rtol=1e-5, atol=1e-6)
