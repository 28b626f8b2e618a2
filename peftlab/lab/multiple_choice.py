"""A multiple-choice version of the lab's string tasks, for T-Few's losses and rank classification.

Each example is a prompt of a lab task (``sort 3 1 4 =``) with C answer choices: the right answer and
near misses (two neighbouring digits swapped, one digit off by one, the digits copied as they are, the
digits reversed), shuffled, with ``label`` the index of the right one. Everything is built offline from
the task rules, deterministically from a seed.

Batches have ``input_ids``/``attention_mask``/``labels`` of shape (N, C, T) and ``label`` (N,), the format
:mod:`peftlab.losses.tfew` reads.

Explained in: book/ia3.ipynb
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from peftlab.lab import tasks as _tasks


@dataclass(frozen=True)
class ChoiceExample:
    """One prompt, its answer choices and the index of the right one.

    Explained in: book/ia3.ipynb
    """

    prompt: str
    choices: tuple[str, ...]
    label: int


def _near_misses(xs: list[int], answer: list[int], rng: random.Random) -> list[list[int]]:
    """Wrong answers close to ``answer``, in a fixed order of preference."""
    out = []
    if len(answer) > 1:  # two neighbours swapped
        i = rng.randrange(len(answer) - 1)
        out.append(answer[:i] + [answer[i + 1], answer[i]] + answer[i + 2:])
    i = rng.randrange(len(answer))  # one digit off by one
    out.append(answer[:i] + [(answer[i] + rng.choice((1, 9))) % 10] + answer[i + 1:])
    out += [list(xs), xs[::-1]]  # what the pretrained skills (copy, reverse) would answer
    return out


def make_choices(task: str, n: int, seed: int = 0, num_choices: int = 4, min_len: int = _tasks.MIN_LEN,
                 max_len: int = _tasks.MAX_LEN) -> list[ChoiceExample]:
    """``n`` multiple-choice examples of lab task ``task`` with ``num_choices`` distinct choices each.

    Explained in: book/ia3.ipynb
    """
    rule = _tasks.get_task(task)
    if num_choices < 2:
        raise ValueError(f"num_choices={num_choices}: a multiple-choice example needs at least 2 choices")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(_tasks._task_seed("mc-" + task, seed))
    out = []
    while len(out) < n:
        xs = [rng.randrange(10) for _ in range(rng.randint(min_len, max_len))]
        prompt, answer = rule.example(xs)
        right = answer.split()
        wrong: list[str] = []
        for cand in _near_misses(xs, [int(d) for d in right], rng):
            text = " ".join(map(str, cand))
            if text != answer and text not in wrong:
                wrong.append(text)
        while len(wrong) < num_choices - 1:  # fall back to random digit strings of the same length
            text = " ".join(str(rng.randrange(10)) for _ in right)
            if text != answer and text not in wrong:
                wrong.append(text)
        choices = [answer, *wrong[:num_choices - 1]]
        rng.shuffle(choices)
        out.append(ChoiceExample(prompt, tuple(choices), choices.index(answer)))
    return out


def encode(tokenizer: Any, example: ChoiceExample) -> dict[str, Any]:
    """Token ids of every choice after the prompt (labels only on the answer), and the label.

    Explained in: book/ia3.ipynb
    """
    enc = [_tasks.encode_example(tokenizer, example.prompt, c) for c in example.choices]
    return {"input_ids": [e["input_ids"] for e in enc], "attention_mask": [e["attention_mask"] for e in enc],
            "labels": [e["labels"] for e in enc], "label": example.label}


class ChoiceCollator:
    """Pads encoded examples into (N, C, T) tensors plus ``label`` (N,); usable as a Trainer data collator.

    Explained in: book/ia3.ipynb
    """

    def __init__(self, tokenizer: Any) -> None:
        self.pad_token_id = int(tokenizer.pad_token_id)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        c = len(features[0]["input_ids"])
        flat = [{k: f[k][j] for k in ("input_ids", "attention_mask", "labels")} for f in features for j in range(c)]
        padded = _tasks.pad(flat, self.pad_token_id)
        out = {k: v.view(len(features), c, -1) for k, v in padded.items()}
        out["label"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
        return out


def loader(examples: Sequence[ChoiceExample], tokenizer: Any, batch_size: int = 8, seed: int = 0,
           shuffle: bool = True):
    """A ``DataLoader`` of (N, C, T) multiple-choice batches, reshuffled every epoch from ``seed``.

    Explained in: book/ia3.ipynb
    """
    from torch.utils.data import DataLoader

    rows = [encode(tokenizer, e) for e in examples]
    g = torch.Generator().manual_seed(seed)
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=ChoiceCollator(tokenizer))


def accuracy(model: Any, tokenizer: Any, examples: Sequence[ChoiceExample], batch_size: int = 32) -> float:
    """Rank-classification accuracy: the share of examples whose right choice has the largest β.

    Explained in: book/ia3.ipynb
    """
    from peftlab.losses.tfew import rank_classification_accuracy

    return rank_classification_accuracy(model, loader(examples, tokenizer, batch_size, shuffle=False))


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, examples: Sequence[ChoiceExample], batch_size: int = 32) -> dict[str, float]:
    """Rank-classification accuracy and the three T-Few losses on held-out examples (means over examples),
    plus the mean log-probability per token of the wrong choices.

    Explained in: book/ia3.ipynb
    """
    from peftlab.losses.tfew import batch_losses, rank_classification

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = {"accuracy": 0.0, "lm": 0.0, "ul": 0.0, "ln": 0.0}
    wrong_logp = wrong_tokens = 0.0
    n = 0
    try:
        for batch in loader(examples, tokenizer, batch_size, shuffle=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            res = batch_losses(model, batch)
            k = len(batch["label"])
            sums["accuracy"] += float((rank_classification(res.scores) == batch["label"]).sum())
            for name in ("lm", "ul", "ln"):
                sums[name] += float(getattr(res, name)) * k
            wrong = torch.ones_like(res.scores, dtype=torch.bool)
            wrong[torch.arange(k), batch["label"]] = False
            length = (batch["labels"] != -100).sum(-1).float()  # answer tokens of each choice (end of sequence too)
            wrong_logp += float((res.scores * length)[wrong].sum())
            wrong_tokens += float(length[wrong].sum())
            n += k
    finally:
        model.train(was)
    out = {name: v / n for name, v in sums.items()}
    out["distractor_log_prob"] = wrong_logp / wrong_tokens
    return out


@dataclass
class ChoiceRun:
    """One multiple-choice fine-tuning run: its setting, rank-classification accuracy and losses.

    Explained in: book/ia3.ipynb
    """

    label: str
    seed: int
    accuracy: float
    test: dict[str, float]  # evaluate(): accuracy, lm, ul, ln, distractor_log_prob on the test examples
    trainable: int
    seconds: float
    loss: list[float] = field(default_factory=list)
    model: Any = None


def finetune_choices(config: Any, load: Any, *, label: str, ul: bool, ln: bool, task: str = "sort",
                     seed: int = 0, steps: int = 300, lr: float = 3e-2, n_train: int = 32, n_test: int = 200,
                     batch_size: int = 8, device: Optional[str] = None, keep_model: bool = False) -> ChoiceRun:
    """Fine-tune ``load()``'s model with adapter ``config`` on ``n_train`` multiple-choice examples of ``task``
    with L_LM (+ L_UL if ``ul``) (+ L_LN if ``ln``); score rank classification on ``n_test`` held-out ones.

    Training examples come from seed 0, test examples from seed 1; ``seed`` sets the adapter's initial
    draws and the batch order. Adam at ``lr``.

    Explained in: book/ia3.ipynb
    """
    from peftlab import get_peft_model
    from peftlab.lab import finetune as _ft
    from peftlab.lab import train as _train
    from peftlab.losses.tfew import TFewLoss

    train_set, test_set = make_choices(task, n_train, seed=0), make_choices(task, n_test, seed=1)
    model, tok = load()
    with _ft.seeded(seed):
        model = get_peft_model(model, config)
    if device is not None:
        model.to(device)
    start = time.perf_counter()
    history = _train.train(model, loader(train_set, tok, batch_size, seed=seed), steps=steps, seed=seed,
                           optimizer=lambda params: torch.optim.Adam(params, lr=lr), loss_fn=TFewLoss(ul, ln),
                           progress=False, device=device)
    seconds = time.perf_counter() - start
    scores = evaluate(model, tok, test_set)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ChoiceRun(label, seed, scores["accuracy"], scores, trainable, seconds, list(history.loss),
                     model if keep_model else None)
