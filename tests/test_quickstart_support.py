"""What the quickstart and configs chapters rely on: Trainer with a peftlab model, the notes' counts, Hub loading.

Explained in: book/quickstart.ipynb, book/configs.ipynb
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import io
import os
import shutil
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from peftlab import LoraConfig, PeftModel, TaskType, get_peft_model

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=FutureWarning)


def tiny_llama(tied: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=24, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def dataset(n: int = 32):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1, 24, (n, 6), generator=g).tolist()
    # a string column the model cannot take: Trainer must drop it (forward signature)
    return Dataset.from_dict({"text": ["x"] * n, "input_ids": rows, "attention_mask": [[1] * 6] * n, "labels": rows})


def printed(model) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue().strip()


# ---- transformers.Trainer ----------------------------------------------------------------------------
def test_trainer_trains_a_peftlab_model_and_reloads_its_best_checkpoint(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    peft_model = get_peft_model(tiny_llama(), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, per_device_train_batch_size=8,
                             num_train_epochs=2, eval_strategy="epoch", save_strategy="epoch",
                             load_best_model_at_end=True, logging_steps=1, report_to=[], disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset(), eval_dataset=dataset(8))
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # "text" removed by the forward signature
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and trainer.state.best_model_checkpoint is not None
    # a peftlab model is a plain nn.Module to Trainer: the checkpoint is its whole state dict
    from safetensors import safe_open

    with safe_open(os.path.join(trainer.state.best_model_checkpoint, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(".lora_A.default." in k for k in keys) and any(k.endswith("embed_tokens.weight") for k in keys)
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)  # it trained
    assert all(("lora_" in n) == p.requires_grad for n, p in peft_model.named_parameters())


def test_trainer_checkpoint_of_tied_embeddings_is_refused_by_safetensors(tmp_path: Path) -> None:
    """transformers.Trainer saves a non-peft module as a raw safetensors state dict, which refuses tied tensors:
    why peftlab.Trainer exists (tests/test_trainer.py). If this starts passing, update book/quickstart.ipynb."""
    from transformers import Trainer, TrainingArguments

    peft_model = get_peft_model(tiny_llama(tied=True), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, save_strategy="steps",
                             save_steps=1, report_to=[], disable_tqdm=True, use_cpu=True)
    with pytest.raises(RuntimeError, match="share memory"):
        Trainer(model=peft_model, args=args, train_dataset=dataset()).train()


# ---- the notes' printed lines, on the meta device ------------------------------------------------------
def test_notes_counts_for_opt_350m_and_mt0_large_on_meta_device() -> None:
    from transformers import MT5Config, MT5ForConditionalGeneration, OPTConfig, OPTForCausalLM

    with torch.device("meta"):
        opt = OPTForCausalLM(OPTConfig(vocab_size=50272, hidden_size=1024, ffn_dim=4096, num_hidden_layers=24,
                                       num_attention_heads=16, max_position_embeddings=2048, word_embed_proj_dim=512,
                                       do_layer_norm_before=False))
    opt = get_peft_model(opt, LoraConfig(r=16, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM,
                                         lora_alpha=32, lora_dropout=0.05))
    assert printed(opt) == "trainable params: 1,572,864 || all params: 332,769,280 || trainable%: 0.4727"

    cfg = MT5Config(vocab_size=250112, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24,
                    num_heads=16, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        mt0 = MT5ForConditionalGeneration(cfg)
    tied = mt0.lm_head.weight is mt0.shared.weight
    mt0 = get_peft_model(mt0, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, r=8, lora_alpha=32,
                                         lora_dropout=0.1))
    trainable, total = mt0.get_nb_trainable_parameters()
    embedding = 250112 * 1024
    assert trainable == 2_359_296
    assert total + (embedding if tied else 0) == 1_231_940_608  # 975,825,920 when lm_head is tied (transformers 5)
    with torch.device("meta"):
        mt0.get_base_model().lm_head.weight = torch.nn.Parameter(torch.empty(250112, 1024), requires_grad=False)
    assert printed(mt0) == "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915"


# ---- loading from the Hub: pickled adapters only when allowed --------------------------------------------
@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A stand-in for huggingface_hub.snapshot_download over one repository holding a pickled adapter."""
    import huggingface_hub

    model = get_peft_model(tiny_llama(), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, init_lora_weights=False))
    repo = tmp_path / "repo"
    model.save_pretrained(repo, safe_serialization=False)  # adapter_model.bin, as older Hub adapters are
    calls: list[dict] = []

    def snapshot_download(repo_id, allow_patterns=None, revision=None, **kw):
        calls.append({"repo_id": repo_id, "allow_patterns": list(allow_patterns or []), "revision": revision})
        out = tmp_path / "snapshot" / str(len(calls))
        out.mkdir(parents=True)
        for f in os.listdir(repo):
            if allow_patterns is None or any(fnmatch.fnmatch(f, p) for p in allow_patterns):
                shutil.copy(repo / f, out / f)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)  # "someone/tiny-lora" must not exist as a local folder
    return model.eval(), calls


def test_hub_adapter_saved_as_pickle_loads_with_allow_pickle(fake_hub) -> None:
    trained, calls = fake_hub
    loaded = PeftModel.from_pretrained(tiny_llama(), "someone/tiny-lora", allow_pickle=True, revision="v1")
    assert "adapter_model.bin" in calls[-1]["allow_patterns"] and calls[-1]["revision"] == "v1"
    x = torch.randint(0, 24, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, trained(input_ids=x).logits)

    base = PeftModel.from_pretrained(tiny_llama(), "someone/tiny-lora", allow_pickle=True, adapter_name="a")
    base.load_adapter("someone/tiny-lora", adapter_name="b", allow_pickle=True)
    assert "adapter_model.bin" in calls[-1]["allow_patterns"] and set(base.peft_config) == {"a", "b"}


def test_hub_adapter_saved_as_pickle_loads_by_default_with_a_warning(fake_hub) -> None:
    """As peft: a Hub adapter with only adapter_model.bin is fetched and read with torch.load(weights_only=True),
    with a warning that safetensors is preferred."""
    _, calls = fake_hub
    with pytest.warns(UserWarning, match="weights_only=True"):
        PeftModel.from_pretrained(tiny_llama(), "someone/tiny-lora")
    assert "adapter_model.bin" in calls[-1]["allow_patterns"]


# ---- a PeftModel without a task type: Trainer keeps the columns the base model's forward takes -----------
def test_trainer_keeps_columns_for_a_peft_model_without_task_type(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))  # plain PeftModel
    assert type(peft_model) is PeftModel
    params = inspect.signature(peft_model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, save_strategy="no",
                             report_to=[], disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset())
    assert set(next(iter(trainer.get_train_dataloader()))) == {"input_ids", "attention_mask", "labels"}
    trainer.train()


def test_plain_peft_model_forward_still_behaves_like_a_method(tmp_path: Path) -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    peft_model = get_peft_model(mlp, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)).eval()
    x = torch.randn(3, 4)
    expected = peft_model(x)
    assert torch.equal(peft_model.forward(x), expected)
    clone = copy.deepcopy(peft_model)
    assert clone.forward.args[0] is clone and torch.equal(clone(x), expected)  # bound to the copy, not the original
    torch.save(peft_model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(loaded(x), expected)
