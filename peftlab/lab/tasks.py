"""Synthetic string tasks for the lab LM: one format, different skills.

Every example is ``<task> x1 x2 … xn =`` → `` y1 y2 … ym`` over the digits 0–9, e.g.
``sort 3 1 4 1 =`` → ``1 1 3 4``. The lab LM is pretrained on :data:`PRETRAIN_TASKS` only, so it
knows the format (prompt, ``=``, answer, end of sequence) and those skills; every other task is a
new skill for an adapter to learn, and the tasks can be mixed or merged because the task word says
which skill is wanted.

Explained in: book/lab.ipynb
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

SEP = "="  # separates the prompt from the answer
DIGITS: tuple[str, ...] = tuple("0123456789")


def _copy(xs: list[int]) -> list[int]:
    return list(xs)


def _reverse(xs: list[int]) -> list[int]:
    return xs[::-1]


def _sort(xs: list[int]) -> list[int]:
    return sorted(xs)


def _shift(xs: list[int]) -> list[int]:
    return [(x + 1) % 10 for x in xs]  # Caesar shift by +1 over the digits: y_i = (x_i + 1) mod 10


def _swap(xs: list[int]) -> list[int]:
    ys = list(xs)
    for i in range(0, len(ys) - 1, 2):  # swap neighbours: (x1 x2)(x3 x4)… → x2 x1 x4 x3 …
        ys[i], ys[i + 1] = ys[i + 1], ys[i]
    return ys


def _double(xs: list[int]) -> list[int]:
    return [x for x in xs for _ in range(2)]  # x1 x1 x2 x2 …


@dataclass(frozen=True)
class Task:
    """One synthetic task: a name (also its prompt word), a rule on digit lists and a description.

    Explained in: book/lab.ipynb
    """

    name: str
    rule: Callable[[list[int]], list[int]]
    description: str

    def example(self, xs: Sequence[int]) -> tuple[str, str]:
        """``(prompt, answer)`` strings for input digits ``xs``: ("sort 3 1 =", "1 3").

        Explained in: book/lab.ipynb
        """
        prompt = " ".join([self.name, *map(str, xs), SEP])
        answer = " ".join(map(str, self.rule(list(xs))))
        return prompt, answer


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("copy", _copy, "repeat the digits"),
        Task("reverse", _reverse, "the digits in reverse order"),
        Task("sort", _sort, "the digits in increasing order"),
        Task("shift", _shift, "add 1 to every digit, 9 wraps to 0 (a Caesar shift)"),
        Task("swap", _swap, "swap neighbouring pairs of digits"),
        Task("double", _double, "write every digit twice"),
    )
}
#: All task names, in a fixed order (the tokenizer's vocabulary depends on it).
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
#: Skills the lab LM is pretrained on.
PRETRAIN_TASKS: tuple[str, ...] = ("copy", "reverse")
#: Skills the lab LM has never seen: what adapters learn in later chapters.
DOWNSTREAM_TASKS: tuple[str, ...] = tuple(n for n in TASK_NAMES if n not in PRETRAIN_TASKS)
#: Default input lengths (number of digits), inclusive.
MIN_LEN, MAX_LEN = 4, 7


def get_task(name: str) -> Task:
    """The task called ``name``; ``ValueError`` listing the valid names otherwise.

    Explained in: book/lab.ipynb
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    return TASKS[name]


def sample(name: str, rng: random.Random, min_len: int = MIN_LEN, max_len: int = MAX_LEN) -> tuple[str, str]:
    """One random ``(prompt, answer)`` pair of task ``name`` (length uniform in [min_len, max_len]).

    Explained in: book/lab.ipynb
    """
    task = get_task(name)
    n = rng.randint(min_len, max_len)
    return task.example([rng.randrange(10) for _ in range(n)])


def _task_seed(name: str, seed: int) -> int:
    # a stable per-task offset, so tasks built from one seed do not share their inputs
    return seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(name))


def make_task(
    name: str,
    n: int,
    seed: int = 0,
    tokenizer: Any = None,
    min_len: int = MIN_LEN,
    max_len: int = MAX_LEN,
):
    """``n`` examples of task ``name`` as a ``datasets.Dataset`` (columns task, prompt, answer), from ``seed``.

    With a ``tokenizer`` the dataset is also tokenised by :func:`tokenize` (input_ids,
    attention_mask, labels with -100 on the prompt).

    Explained in: book/lab.ipynb
    """
    from datasets import Dataset

    get_task(name)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    rng = random.Random(_task_seed(name, seed))
    pairs = [sample(name, rng, min_len, max_len) for _ in range(n)]
    ds = Dataset.from_dict(
        {"task": [name] * n, "prompt": [p for p, _ in pairs], "answer": [a for _, a in pairs]}
    )
    return tokenize(ds, tokenizer) if tokenizer is not None else ds


def make_mixture(names: Iterable[str], n_per_task: int, seed: int = 0, tokenizer: Any = None, **kw: Any):
    """Several tasks in one shuffled ``Dataset`` (``n_per_task`` examples each).

    Explained in: book/lab.ipynb
    """
    from datasets import concatenate_datasets

    parts = [make_task(name, n_per_task, seed, tokenizer, **kw) for name in names]
    with _no_progress_bars():
        return concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """datasets' progress bars off inside the block (a bar per tiny map or flatten is noise in a chapter)."""
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    shown = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            enable_progress_bar()


def _prefix(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def encode_example(tokenizer: Any, prompt: str, answer: Optional[str] = None) -> dict[str, list[int]]:
    """Token ids of ``bos + prompt [+ " " + answer + eos]``; labels copy the answer ids, -100 elsewhere.

    Explained in: book/lab.ipynb
    """
    p = _prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if answer is None:
        return {"input_ids": p, "attention_mask": [1] * len(p)}
    a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = p + a
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(p) + a}


def tokenize(dataset: Any, tokenizer: Any) -> Any:
    """Add input_ids / attention_mask / labels to a task dataset with ``Dataset.map`` (loss only on the answer).

    Explained in: book/lab.ipynb
    """

    def fn(batch: dict[str, list]) -> dict[str, list]:
        enc = [encode_example(tokenizer, p, a) for p, a in zip(batch["prompt"], batch["answer"])]
        return {k: [e[k] for e in enc] for k in ("input_ids", "attention_mask", "labels")}

    with _no_progress_bars():
        return dataset.map(fn, batched=True, load_from_cache_file=False)


def pad(
    features: Sequence[dict[str, Any]], pad_token_id: int, side: str = "right"
) -> dict[str, torch.Tensor]:
    """Stack token lists into tensors: input_ids padded with ``pad_token_id``, attention_mask 0, labels -100.

    Explained in: book/lab.ipynb
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(f["input_ids"]) for f in features)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    out: dict[str, torch.Tensor] = {}
    for key, value in fill.items():
        if key not in features[0]:
            continue
        rows = []
        for f in features:
            row = list(f[key])
            gap = [value] * (width - len(row))
            rows.append(gap + row if side == "left" else row + gap)
        out[key] = torch.tensor(rows, dtype=torch.long)
    return out


class Collator:
    """Pads a list of tokenised examples into a batch (other columns such as "prompt" are dropped).

    Use as ``DataLoader(ds, collate_fn=Collator(tok))`` or ``Trainer(data_collator=Collator(tok))``.

    Explained in: book/lab.ipynb
    """

    def __init__(self, tokenizer: Any, side: str = "right") -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.side = side

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad(features, self.pad_token_id, self.side)


def loader(dataset: Any, tokenizer: Any, batch_size: int = 32, seed: int = 0, shuffle: bool = True):
    """A ``DataLoader`` over a tokenised task dataset, reshuffled every epoch from ``seed``.

    Explained in: book/lab.ipynb
    """
    from torch.utils.data import DataLoader

    if "input_ids" not in dataset.column_names:
        dataset = tokenize(dataset, tokenizer)
    cols = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
    rows = dataset.select_columns(cols).to_list()  # plain lists: fast indexing in the hot loop
    g = torch.Generator().manual_seed(seed)
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=Collator(tokenizer))


def _normalise(text: str) -> str:
    return " ".join(text.split())


@torch.no_grad()
def greedy_generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 64
) -> list[str]:
    """Greedy continuations of ``prompts`` (batched, left padding), cut at end of sequence, decoded.

    Uses ``model.generate`` when the model has it, else a plain argmax loop.

    Explained in: book/lab.ipynb
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    was_training = getattr(model, "training", False)
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = pad([encode_example(tokenizer, p) for p in chunk], pad_id, side="left")
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        if hasattr(model, "generate"):
            gen = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad_id, eos_token_id=eos_id,
            )
            outputs += decode_new_tokens(tokenizer, gen, ids.shape[1])
        else:
            outputs += decode_new_tokens(tokenizer, _argmax_loop(model, ids, mask, max_new_tokens, eos_id), 0)
    model.train(was_training)
    return outputs


def decode_new_tokens(tokenizer: Any, output_ids: torch.Tensor, prompt_length: int) -> list[str]:
    """The text ``generate`` added to each row: the tokens after the first ``prompt_length`` (the padded prompt),
    cut at the first end-of-sequence token, decoded without special tokens, whitespace normalised.

    Explained in: book/integrations.ipynb
    """
    if output_ids.dim() != 2:
        raise ValueError(f"decode_new_tokens expects token ids of shape (batch, length), as generate returns; "
                         f"got shape {tuple(output_ids.shape)}")
    eos_id = tokenizer.eos_token_id
    texts = []
    for row in output_ids[:, prompt_length:].tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        texts.append(_normalise(tokenizer.decode(row, skip_special_tokens=True)))
    return texts


def _argmax_loop(model: Any, ids: torch.Tensor, mask: torch.Tensor, steps: int, eos_id: int) -> torch.Tensor:
    """Greedy decoding without a KV cache, for models that have no ``generate``."""
    new = []
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        nxt = logits.argmax(-1).masked_fill(done, eos_id)
        new.append(nxt)
        done |= nxt == eos_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
        if bool(done.all()):
            break
    return torch.stack(new, dim=1)


def exact_match(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    max_new_tokens: Optional[int] = None,
    batch_size: int = 64,
    return_predictions: bool = False,
) -> Any:
    """Fraction of examples whose greedy answer equals the reference exactly: EM = mean[ŷ == y].

    ``max_new_tokens`` defaults to the longest reference answer (in tokens) plus one for end of
    sequence. With ``return_predictions`` returns ``(score, predictions)``.

    Explained in: book/lab.ipynb
    """
    prompts, answers = list(dataset["prompt"]), [_normalise(a) for a in dataset["answer"]]
    if not prompts:
        raise ValueError("exact_match needs a non-empty dataset")
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in answers) + 1
    preds = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    score = sum(p == a for p, a in zip(preds, answers)) / len(answers)
    return (score, preds) if return_predictions else score


def exact_match_by_task(
    model: Any, tokenizer: Any, names: Iterable[str] = TASK_NAMES, n: int = 100, seed: int = 1, **kw: Any
) -> dict[str, float]:
    """Exact match on ``n`` fresh examples of each task (seed 1: held out from seed-0 training sets).

    Explained in: book/lab.ipynb
    """
    return {name: exact_match(model, tokenizer, make_task(name, n, seed), **kw) for name in names}


@torch.no_grad()
def token_accuracy(model: Any, tokenizer: Any, dataset: Any, batch_size: int = 128) -> float:
    """Fraction of answer tokens (end of sequence included) the model predicts right under teacher forcing.

    A softer score than exact match: a half-right answer counts half.

    Explained in: book/merging_adapters.ipynb
    """
    device = next(model.parameters()).device
    was_training = getattr(model, "training", False)
    model.eval()
    right = total = 0
    prompts, answers = list(dataset["prompt"]), list(dataset["answer"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        feats = [encode_example(tokenizer, p, a)
                 for p, a in zip(prompts[start:start + batch_size], answers[start:start + batch_size])]
        b = pad(feats, pad_id)
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        pred = logits[:, :-1].argmax(-1).cpu()  # position i predicts token i + 1
        labels = b["labels"][:, 1:]
        mask = labels != -100
        right += int(((pred == labels) & mask).sum())
        total += int(mask.sum())
    model.train(was_training)
    return right / total
