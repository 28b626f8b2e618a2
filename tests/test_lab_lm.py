"""The lab LM: tokenizer, deterministic pretraining, the on-disk cache, loading, Trainer compatibility."""

import threading

import pytest
import torch

from peftlab.lab import lm, tasks

# A lab LM small enough to pretrain in well under a second.
TINY = lm.LabLMConfig(hidden_size=16, intermediate_size=32, steps=4, batch_size=8, eval_n=2)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache folder through the environment variable."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(lm.ENV_CACHE, str(folder))
    monkeypatch.delenv(lm.ENV_MODEL, raising=False)
    return folder


@pytest.fixture(scope="module")
def tok():
    return lm.build_tokenizer()


def test_tokenizer_round_trip(tok, tmp_path):
    texts = ["copy 1 2 3 =", "sort 9 0 9 = 0 9 9", "reverse 5 ="] + list(tasks.make_task("double", 5)["prompt"])
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) == len(text.split()) + 1  # one id per word
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.unk_token_id not in ids
    assert tok("copy  1\t2 ")["input_ids"] == tok("copy 1 2")["input_ids"]  # whitespace normalised
    assert tok("hello")["input_ids"][1] == tok.unk_token_id
    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(texts[1])["input_ids"] == tok(texts[1])["input_ids"]
    assert (again.pad_token_id, again.eos_token_id, again.bos_token_id) == (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    assert len(tok) == len(lm.vocabulary())


def test_pretraining_is_deterministic():
    a, _, ha = lm.pretrain(TINY, seed=0, progress=False)
    b, _, hb = lm.pretrain(TINY, seed=0, progress=False)
    c, _, _ = lm.pretrain(TINY, seed=1, progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ha.loss == hb.loss
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert set(ha.evals) == set(tasks.TASK_NAMES)


def test_pretraining_batches_are_answer_only(tok):
    batch = lm.pretraining_batches(TINY, tok, seed=0)(0)
    again = lm.pretraining_batches(TINY, tok, seed=0)(0)
    assert torch.equal(batch["input_ids"], again["input_ids"])
    sep = tok.convert_tokens_to_ids(tasks.SEP)
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        k = ids.index(sep)
        assert all(l == -100 for l in labels[: k + 1]) and labels[k + 1] != -100


def test_cache_reuse(cache):
    first = lm.ensure_pretrained("smoke", config=TINY, progress=False)
    assert first.trained_now and first.path.parent == cache
    second = lm.ensure_pretrained("smoke", config=TINY, progress=False)
    assert not second.trained_now and second.path == first.path
    assert second.history.loss == pytest.approx(first.history.loss)
    # a different seed or recipe is a different entry
    assert lm.cache_key(TINY, 1, "smoke") != first.path.name
    assert lm.cache_key(lm.LabLMConfig(), 0, "smoke") != first.path.name
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]  # no half-written folder left

    model, tok = lm.load_lab_model("smoke", config=TINY, progress=False)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    fresh, _, _ = lm.pretrain(TINY, seed=0, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert tok("copy 1 =")["input_ids"] == lm.build_tokenizer()("copy 1 =")["input_ids"]


def test_parallel_loads_pretrain_once(cache):
    results = []
    run = lambda: results.append(lm.ensure_pretrained("smoke", config=TINY, progress=False))
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.trained_now for r in results) == [False, True]


def test_unwritable_cache_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(lm.ENV_CACHE, str(blocker / "cache"))
    with pytest.raises(lm.LabCacheError, match="PEFTLAB_CACHE") as err:
        lm.load_lab_model("smoke", config=TINY, progress=False)
    assert str(blocker / "cache") in str(err.value)


def test_load_from_local_folder(tmp_path, tok, monkeypatch):
    """The gpu profile's hub-model path, exercised offline with a locally saved tiny model."""
    model = lm.build_model(TINY, seed=3)
    folder = tmp_path / "my-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    loaded, tok2 = lm.load_lab_model("cpu", path=folder)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert tok2.pad_token_id is not None
    monkeypatch.setenv(lm.ENV_MODEL, str(folder))
    via_env, _ = lm.load_lab_model("smoke")
    assert torch.equal(via_env.lm_head.weight, model.lm_head.weight)
    ds = tasks.make_task("copy", 4, seed=0)
    assert 0.0 <= tasks.exact_match(loaded, tok2, ds) <= 1.0
    with pytest.raises(FileNotFoundError, match="PEFTLAB_LAB_MODEL"):
        lm.load_lab_model("cpu", path=tmp_path / "missing")


@pytest.mark.parametrize("frozen_base", [False, True])
def test_trains_under_transformers_trainer(tmp_path, tok, frozen_base):
    from transformers import Trainer, TrainingArguments

    model = lm.build_model(TINY, seed=0)
    if frozen_base:
        model.requires_grad_(False)
        model.model.layers[-1].self_attn.q_proj.requires_grad_(True)  # "some trainable parameters"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = tasks.make_task("sort", 16, seed=0, tokenizer=tok)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=tasks.Collator(tok))
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if frozen_base:
        assert changed == {"model.layers.1.self_attn.q_proj.weight"}
    else:
        assert "lm_head.weight" in changed and "model.layers.0.mlp.up_proj.weight" in changed
