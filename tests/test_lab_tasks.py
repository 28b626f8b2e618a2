"""Tasks: rules, generators, tokenisation, padding and exact-match evaluation."""

import pytest
import torch
import torch.nn as nn

from peftlab.lab import tasks
from peftlab.lab.lm import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize(
    "name, xs, ys",
    [
        ("copy", [3, 1, 4], [3, 1, 4]),
        ("reverse", [3, 1, 4, 1], [1, 4, 1, 3]),
        ("sort", [3, 1, 4, 1, 5], [1, 1, 3, 4, 5]),
        ("shift", [0, 8, 9], [1, 9, 0]),
        ("swap", [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]),
        ("double", [7, 0], [7, 7, 0, 0]),
    ],
)
def test_rules(name, xs, ys):
    prompt, answer = tasks.get_task(name).example(xs)
    assert prompt == f"{name} {' '.join(map(str, xs))} ="
    assert answer == " ".join(map(str, ys))


def test_at_least_five_tasks_and_split():
    assert len(tasks.TASK_NAMES) >= 5
    assert set(tasks.PRETRAIN_TASKS) | set(tasks.DOWNSTREAM_TASKS) == set(tasks.TASK_NAMES)
    assert not set(tasks.PRETRAIN_TASKS) & set(tasks.DOWNSTREAM_TASKS)


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_make_task_is_deterministic_and_correct(name):
    a, b, c = tasks.make_task(name, 50, seed=0), tasks.make_task(name, 50, seed=0), tasks.make_task(name, 50, seed=1)
    assert a["prompt"] == b["prompt"] and a["answer"] == b["answer"]
    assert a["prompt"] != c["prompt"]
    rule = tasks.get_task(name).rule
    for prompt, answer in zip(a["prompt"], a["answer"]):
        word, *digits, sep = prompt.split()
        assert word == name and sep == tasks.SEP
        assert tasks.MIN_LEN <= len(digits) <= tasks.MAX_LEN
        assert answer.split() == [str(d) for d in rule([int(d) for d in digits])]


def test_tasks_do_not_share_inputs():
    a, b = tasks.make_task("sort", 20, 0), tasks.make_task("shift", 20, 0)
    assert [p.split()[1:] for p in a["prompt"]] != [p.split()[1:] for p in b["prompt"]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task 'add'.*valid tasks: copy, reverse"):
        tasks.make_task("add", 10)
    with pytest.raises(ValueError, match="n must be"):
        tasks.make_task("copy", 0)
    with pytest.raises(ValueError, match="min_len"):
        tasks.make_task("copy", 5, min_len=5, max_len=3)


def test_tokenize_masks_the_prompt(tok):
    ds = tasks.make_task("sort", 8, seed=0, tokenizer=tok)
    for row in ds:
        ids, labels = row["input_ids"], row["labels"]
        n_prompt = len(row["prompt"].split()) + 1  # + bos
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tok.decode(ids[n_prompt:], skip_special_tokens=True) == row["answer"]


def test_collator_pads(tok):
    ds = tasks.make_task("double", 6, seed=0, tokenizer=tok)
    batch = tasks.Collator(tok)(list(ds))
    width = max(len(r) for r in ds["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (6, width)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(r) for r in ds["input_ids"]]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    left = tasks.pad(list(ds), tok.pad_token_id, side="left")
    assert (left["attention_mask"][:, -1] == 1).all()
    mix = tasks.make_mixture(["sort", "shift"], 5, seed=0, tokenizer=tok)
    assert sorted(set(mix["task"])) == ["shift", "sort"] and len(mix) == 10
    xb = next(iter(tasks.loader(mix, tok, batch_size=4)))
    assert xb["input_ids"].shape[0] == 4


def test_tokenising_and_mixing_show_no_progress_bars(tok, capfd):
    from datasets.utils.logging import is_progress_bar_enabled

    assert is_progress_bar_enabled()
    tasks.make_mixture(["sort", "shift"], 50, seed=0, tokenizer=tok)
    assert capfd.readouterr().err == ""  # no bar for the map nor for flattening the shuffled indices
    assert is_progress_bar_enabled()  # and datasets' own setting is left as it was


class Oracle(nn.Module):
    """A hand-made 'perfect model': reads the prompt ids and puts all mass on the right next token."""

    def __init__(self, tok, wrong=False):
        super().__init__()
        self.tok, self.wrong = tok, wrong
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids=None):
        V = len(self.tok)
        logits = torch.zeros(*input_ids.shape, V)
        for i, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            words = self.tok.convert_ids_to_tokens([t for t, m in zip(ids, mask) if m][1:])  # drop bos
            k = words.index(tasks.SEP)
            name, digits = words[0], [int(d) for d in words[1:k]]
            target = tasks.get_task(name).rule(digits)
            if self.wrong:
                target = target[::-1] + [0]
            target_ids = self.tok.convert_tokens_to_ids([str(d) for d in target]) + [self.tok.eos_token_id]
            done = len(words) - k - 1
            logits[i, -1, target_ids[min(done, len(target_ids) - 1)]] = 1.0
        return type("Out", (), {"logits": logits})()


def test_exact_match_perfect_and_wrong(tok):
    ds = tasks.make_task("swap", 12, seed=3)
    score, preds = tasks.exact_match(Oracle(tok), tok, ds, batch_size=5, return_predictions=True)
    assert score == 1.0 and preds == ds["answer"]
    assert tasks.exact_match(Oracle(tok, wrong=True), tok, ds) == 0.0
    scores = tasks.exact_match_by_task(Oracle(tok), tok, n=6)
    assert scores == {name: 1.0 for name in tasks.TASK_NAMES}


def test_exact_match_with_generate(tok):
    """The transformers path (model.generate, left padding) on a random tiny lab model."""
    from peftlab.lab import lm

    cfg = lm.LabLMConfig(hidden_size=16, intermediate_size=32, steps=0)
    model = lm.build_model(cfg)
    ds = tasks.make_task("copy", 10, seed=0)
    a, preds = tasks.exact_match(model, tok, ds, batch_size=4, return_predictions=True)
    b = tasks.exact_match(model, tok, ds, batch_size=10)
    assert a == b and 0.0 <= a <= 1.0 and len(preds) == 10  # batching and padding do not change answers


def test_decode_new_tokens_cuts_the_prompt_and_stops_at_eos(tok):
    prompt = tasks.pad([tasks.encode_example(tok, "sort 3 1 ="), tasks.encode_example(tok, "copy 2 =")],
                       tok.pad_token_id, side="left")["input_ids"]
    width = prompt.shape[1]
    new = [tok.convert_tokens_to_ids(list("13")) + [tok.eos_token_id] + tok.convert_tokens_to_ids(["7"]),
           tok.convert_tokens_to_ids(list("2222"))]  # row 0 ends with eos and junk after it; row 1 has no eos
    out = torch.cat([prompt, torch.tensor(new)], dim=1)
    assert tasks.decode_new_tokens(tok, out, width) == ["1 3", "2 2 2 2"]
    assert tasks.decode_new_tokens(tok, out, width + 2) == ["", "2 2"]
    with pytest.raises(ValueError, match="shape \\(batch, length\\)"):
        tasks.decode_new_tokens(tok, out[0], width)
