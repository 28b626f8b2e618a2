"""peftlab.lab.digits: the H1 / H4 harnesses (splits, transforms, determinism, cache)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from peftlab.lab import digits as D

torch.set_num_threads(1)

SMALL = dict(steps=300, hidden=64)  # a few hundred ms of training


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------ data


def test_split_sizes_are_the_specified_ones():
    d = D.load()
    sizes = {name: len(d[name]) for name in d.names()}
    assert sizes == {
        "odd_train": 634, "odd_test": 272, "even_train": 623, "even_test": 268,
        "train": 1257, "test": 540, "val": 270, "merge_test": 270,
    }
    assert set(d.odd_train.y.tolist()) == {1, 3, 5, 7, 9}
    assert set(d.even_test.y.tolist()) == {0, 2, 4, 6, 8}
    assert d.train.x.dtype == torch.float32 and d.train.x.shape == (1257, 64)
    assert d.train.x.min() == -1.0 and d.train.x.max() == 1.0


def _rows(split):
    return {tuple(r) for r in torch.cat([split.x, split.y[:, None].float()], 1).tolist()}


def test_splits_are_disjoint_and_cover_the_data():
    d = D.load()
    train, test = _rows(d.train), _rows(d.test)
    assert not (train & test)  # (duplicate images in load_digits would show up here)
    assert _rows(d.val) | _rows(d.merge_test) == test and not (_rows(d.val) & _rows(d.merge_test))
    assert _rows(d.odd_train) | _rows(d.even_train) == train


def test_load_is_deterministic_per_seed():
    a, b, c = D.load(0), D.load.__wrapped__(0), D.load(1)
    assert torch.equal(a.odd_train.x, b.odd_train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.odd_train.x, c.odd_train.x)
    assert len(c.odd_train) == 634  # same sizes, other permutation


def test_unknown_split_and_task_are_clear_errors():
    with pytest.raises(KeyError, match="splits: odd_train"):
        D.load()["odd"]
    with pytest.raises(KeyError, match="tasks: plain, rot90"):
        D.transform(torch.zeros(1, 64), "rot45")


def test_batches_are_seeded_full_and_cycle():
    d = D.load()
    it1, it2 = D.batches(d.even_train, 64, seed=3), D.batches(d.even_train, 64, seed=3)
    for _ in range(12):  # 623 // 64 = 9 batches per epoch: crosses an epoch boundary
        (x1, y1), (x2, y2) = next(it1), next(it2)
        assert x1.shape == (64, 64) and torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError, match="batch_size"):
        next(D.batches(d.val, 1000))


# ------------------------------------------------------------------ task transforms


def test_task_transforms_do_what_they_say():
    img = torch.arange(64.0).reshape(1, 8, 8)  # img[0, r, c] = 8r + c
    x = img.reshape(1, 64)

    def T(task):
        return D.transform(x, task).reshape(8, 8)

    im = img[0]
    assert torch.equal(T("plain"), im)
    assert torch.equal(T("flipLR")[:, 0], im[:, 7])  # first column is the old last one
    assert torch.equal(T("flipUD")[0], im[7])  # first row is the old last one
    assert torch.equal(T("transpose"), im.T)
    assert torch.equal(T("invert"), -im)
    assert torch.equal(T("roll2")[:, 2], im[:, 0]) and torch.equal(T("roll2")[:, 0], im[:, 6])
    assert torch.equal(T("rollUD")[2], im[0])
    # rot90 counter-clockwise: the top row becomes the left column, read bottom-up
    assert torch.equal(T("rot90")[:, 0], im[0].flip(0))
    assert torch.equal(T("rot180"), im.flip(0).flip(1))
    r = x
    for _ in range(4):
        r = D.transform(r, "rot90")
    assert torch.equal(r, x)  # four quarter turns are the identity
    for task in D.TASKS:
        if task != "invert":  # every other task only moves pixels
            assert torch.equal(D.transform(x, task).sort().values, x.sort().values), task


def test_task_split_keeps_labels():
    s = D.task_split(D.load().val, "rot90")
    assert torch.equal(s.y, D.load().val.y) and s.name == "val/rot90"
    assert not torch.equal(s.x, D.load().val.x)


# ------------------------------------------------------------------ H1 model, accuracy, cache


def test_mlp_shape_names_and_parameter_count():
    m = D.MLP()
    assert [n for n, _ in m.named_children()] == ["l1", "l2", "l3"]
    assert sum(p.numel() for p in m.parameters()) == 85_002
    assert m(torch.zeros(5, 64)).shape == (5, 10)


def test_pretrained_small_knows_odd_not_even(cache):
    m = D.pretrained_mlp(**SMALL)
    assert D.accuracy(m, "odd_test") >= 0.9
    assert D.accuracy(m, "even_test") <= 0.02  # the head has never been asked for an even class
    m.train()
    D.accuracy(m, D.load().odd_train)
    assert m.training  # accuracy() restores the mode


def test_pretraining_is_deterministic_across_fresh_caches(tmp_path, monkeypatch):
    states = []
    for k in range(2):
        monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / f"c{k}"))
        states.append(D.pretrained_mlp(**SMALL).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "c2"))
    other = D.pretrained_mlp(seed=1, **SMALL).state_dict()
    assert not torch.equal(states[0]["l1.weight"], other["l1.weight"])


def test_cache_is_reused_and_stores_the_curve(cache, monkeypatch):
    first = D.pretrained_mlp(**SMALL)
    files = list((cache / "digits").glob("h1-mlp-*.safetensors"))
    assert len(files) == 1
    curve = D.pretraining_curve(**SMALL)
    assert len(curve["loss"]) == SMALL["steps"] and curve["loss"][-1] < curve["loss"][0]

    def no_training(*a, **k):
        raise AssertionError("trained again instead of using the cache")

    monkeypatch.setattr(D, "_fit", no_training)
    again = D.pretrained_mlp(**SMALL)
    assert again is not first  # a fresh copy each call
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def test_corrupt_cache_entry_is_rebuilt(cache):
    D.pretrained_mlp(**SMALL)
    (path,) = (cache / "digits").glob("h1-mlp-*.safetensors")
    path.write_bytes(b"not a safetensors file")
    m = D.pretrained_mlp(**SMALL)
    assert D.accuracy(m, "odd_test") >= 0.9
    assert path.stat().st_size > 1000


def test_parallel_callers_train_once(cache, monkeypatch):
    calls = []
    real_fit = D._fit

    def counting_fit(*a, **k):
        calls.append(1)
        time.sleep(0.2)  # widen the race window
        return real_fit(*a, **k)

    monkeypatch.setattr(D, "_fit", counting_fit)
    out = []
    threads = [threading.Thread(target=lambda: out.append(D.pretrained_mlp(steps=50, hidden=32))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 3


def test_unwritable_cache_folder_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("PEFTLAB_CACHE", str(blocker / "cache"))
    with pytest.raises(OSError, match="PEFTLAB_CACHE to a writable folder"):
        D.pretrained_mlp(**SMALL)


# ------------------------------------------------------------------ H4 testbed


def test_merging_testbed_small(cache):
    tb = D.merging_testbed(tasks=("rot90", "flipLR"), hidden=32, steps=60, pretrain_steps=300)
    pre = tb.theta_pre
    assert set(pre) == {"l1.weight", "l1.bias", "l2.weight", "l2.bias"}  # trunk only, no head
    tv = tb.task_vectors
    assert set(tv) == {"rot90", "flipLR"} and set(tv["rot90"]) == set(pre)
    assert any(v.abs().max() > 0 for v in tv["rot90"].values())
    # the pretrained model learned plain digits
    assert D.accuracy(tb.pretrained, D.task_split(tb.data.val, "plain")) >= 0.85
    # θ_pre + τ_t is task t's own fine-tuned trunk: its accuracy on t is the normaliser
    own = tb.evaluate(tb.apply(tv["rot90"], 1.0), "val")
    assert own["rot90"] == pytest.approx(tb.individual("val")["rot90"])
    assert tb.individual("val")["rot90"] > tb.evaluate(pre, "val")["rot90"]  # fine-tuning helped
    n_pre, n_test = tb.normalised(pre, "val"), tb.normalised(pre, "test")
    assert 0.0 <= n_pre < 1.0 and 0.0 <= n_test < 1.0
    with pytest.raises(ValueError, match="'val'"):
        tb.evaluate(pre, "train")
    with pytest.raises(KeyError, match="unknown task"):
        D.merging_testbed(tasks=("rot45",))


def test_h2_teacher_rescales_the_first_layer_rows():
    base, teacher = D.pretrained_mlp(), D.h2_teacher(seed=0, spread=0.7)
    s = teacher.l1.weight.detach().norm(dim=1) / base.l1.weight.detach().norm(dim=1)  # s_i per output unit
    assert torch.allclose(teacher.l1.weight, s[:, None] * base.l1.weight, atol=1e-6)
    assert torch.allclose(teacher.l1.bias, s * base.l1.bias, atol=1e-6)
    assert float(s.log().abs().max()) <= 0.7 + 1e-6 and float(s.std()) > 0  # exp(U(−0.7, 0.7)), not all equal
    assert torch.equal(teacher.l2.weight, base.l2.weight) and not teacher.training
    assert torch.equal(D.h2_teacher(seed=0).l1.weight, teacher.l1.weight)


def test_convnet_shapes_and_size():
    """H1's convolutional classifier: (N, 64) pixels in, (N, 10) logits out, 15,338 parameters, and LoHa,
    LoKr and LoRA all wrap its convolutions."""
    from peftlab import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model

    model = D.ConvNet()
    assert sum(p.numel() for p in model.parameters()) == 15_338
    assert model(torch.zeros(3, 64)).shape == (3, 10)
    for config in (LoraConfig(r=2, target_modules=["c2", "c3", "head"]),
                   LoHaConfig(r=2, target_modules=["c2", "c3", "head"], use_effective_conv2d=True),
                   LoKrConfig(target_modules=["c2", "c3", "head"])):
        pm = get_peft_model(D.ConvNet(), config)
        assert pm(torch.zeros(2, 64)).shape == (2, 10)
