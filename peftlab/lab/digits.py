"""Real data, small and fast: scikit-learn's bundled 8×8 digits, three harnesses on top.

**H1, "odd → even"** (PiSSA's toy, moved from MNIST to ``load_digits``): an MLP
64 → 256 → 256 → 10 pretrained on odd digits only, to be adapted to even digits. Its
head has never predicted an even class, so even-test accuracy starts at 0 %.

**H2, "rescaled teacher"** (DoRA's claim in miniature): H1's pretrained MLP with the output
units of its first layer rescaled (:func:`h2_teacher`); a student is distilled towards it.

**H4, the merging testbed**: a shared trunk 64 → H → H with one 10-way head per task;
tasks are fixed input transforms of the digits (rot90, flipLR, invert, …). Each task
fine-tunes trunk + its own head; task vectors τ_t are trunk deltas; a merged trunk is
scored with every task's own head.

Data (fixed for every chapter): 1,797 images, features x/16 mapped to [−1, 1], one fixed
permutation (seed 0), within odd and within even digits the first 70 % train, the rest
test (odd 634 / 272, even 623 / 268; together 1,257 / 540). H4 splits the 540 held-out
images into ``val`` (270, for choosing λ or k) and ``merge_test`` (270).

Trained models are cached under the lab cache folder (``PEFTLAB_CACHE``, default
``~/.cache/peftlab``) as safetensors, keyed by their configuration, written atomically and
under a file lock so parallel notebook workers train each model once
(:func:`peftlab.lab.cache.cached_module`). Training runs on the CPU (a few seconds) so every
machine gets the same weights.

Explained in: book/lab.ipynb
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from peftlab.lab import cache as _cache
from peftlab.lab.cache import ENV_CACHE

__all__ = [
    "DEFAULT_TASKS",
    "FORMAT",
    "MLP",
    "Classifier",
    "Digits",
    "Split",
    "TASKS",
    "Testbed",
    "Trunk",
    "accuracy",
    "batches",
    "cache_dir",
    "finetune_task",
    "h2_teacher",
    "load",
    "merging_testbed",
    "pretrained_classifier",
    "pretrained_mlp",
    "pretraining_curve",
    "task_split",
    "transform",
]

#: part of every digits cache key: bump when the data split or a training recipe changes (old entries are ignored)
FORMAT = 1
N_IMAGES = 1797
TRAIN_FRACTION = 0.7
N_VAL = 270


# ============================================================================ data


@dataclass(frozen=True)
class Split:
    """A named set of examples: ``x`` (N, 64) float32 in [−1, 1], ``y`` (N,) int64 labels 0–9.

    Explained in: book/lab.ipynb
    """

    name: str
    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def images(self) -> Tensor:
        """The examples as (N, 8, 8) images (row-major pixels)."""
        return self.x.reshape(-1, 8, 8)


@dataclass(frozen=True)
class Digits:
    """All splits of the digits data; ``data["even_test"]`` works as well as ``data.even_test``.

    Explained in: book/lab.ipynb
    """

    odd_train: Split
    odd_test: Split
    even_train: Split
    even_test: Split
    train: Split  # odd_train ∪ even_train (1,257)
    test: Split  # odd_test ∪ even_test (540), in permutation order
    val: Split  # first 270 of ``test``: choose λ / k on these
    merge_test: Split  # last 270 of ``test``: report on these

    def __getitem__(self, name: str) -> Split:
        if name not in self.names():
            raise KeyError(f"unknown split {name!r}; splits: {', '.join(self.names())}")
        return getattr(self, name)

    @staticmethod
    def names() -> tuple[str, ...]:
        return ("odd_train", "odd_test", "even_train", "even_test", "train", "test", "val", "merge_test")


@lru_cache(maxsize=4)
def load(seed: int = 0) -> Digits:
    """Load the digits and split them as H1/H4 specify (deterministic per ``seed``; 0 is the book's).

    Features: x/16 mapped to [−1, 1]. Permutation: ``numpy.random.default_rng(seed)``. Within
    odd and within even digits, the first ⌊0.7·n⌋ of the permutation train, the rest test.

    Explained in: book/lab.ipynb
    """
    import numpy as np
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.data, dtype=torch.float32) / 16.0 * 2.0 - 1.0  # pixels 0..16 → [−1, 1]
    y = torch.tensor(raw.target, dtype=torch.int64)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))

    def take(name: str, idx: Tensor) -> Split:
        return Split(name, x[idx].contiguous(), y[idx].contiguous())

    parts: dict[str, Tensor] = {}
    for parity, rest in (("odd", 1), ("even", 0)):
        idx = perm[y[perm] % 2 == rest]  # this parity, in permutation order
        n_train = int(TRAIN_FRACTION * len(idx))
        parts[f"{parity}_train"], parts[f"{parity}_test"] = idx[:n_train], idx[n_train:]
    position = torch.empty_like(perm)
    position[perm] = torch.arange(len(perm))  # where each image sits in the permutation

    def in_perm_order(idx: Tensor) -> Tensor:
        return idx[torch.argsort(position[idx])]

    train = in_perm_order(torch.cat([parts["odd_train"], parts["even_train"]]))
    test = in_perm_order(torch.cat([parts["odd_test"], parts["even_test"]]))
    return Digits(
        **{k: take(k, v) for k, v in parts.items()},
        train=take("train", train),
        test=take("test", test),
        val=take("val", test[:N_VAL]),
        merge_test=take("merge_test", test[N_VAL:]),
    )


def batches(split: Split, batch_size: int = 64, seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``(x, y)`` minibatches: each epoch a fresh shuffle (seeded), incomplete last batch dropped.

    Explained in: book/lab.ipynb
    """
    n = len(split)
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in 1..{n} (the size of split {split.name!r}), got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield split.x[idx], split.y[idx]


def _resolve(split: Union[Split, str], data: Optional[Digits]) -> Split:
    if isinstance(split, Split):
        return split
    return (data or load())[split]


@torch.no_grad()
def accuracy(model: nn.Module, split: Union[Split, str], data: Optional[Digits] = None) -> float:
    """Fraction of ``split`` (a :class:`Split` or a split name) that ``model`` classifies correctly.

    acc = (1/N) Σ_n [argmax_c model(x_n)_c = y_n], in [0, 1]; evaluated in eval mode on the
    model's device, the model's train/eval mode is restored afterwards.

    Explained in: book/lab.ipynb
    """
    s = _resolve(split, data)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = model(s.x.to(device))
    finally:
        model.train(was_training)
    return float((logits.argmax(dim=-1).cpu() == s.y).float().mean())


# ============================================================================ task transforms (H4)


def _img(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Lift an (N, 8, 8) image transform to (N, 64) feature rows."""

    def g(x: Tensor) -> Tensor:
        return f(x.reshape(-1, 8, 8)).reshape(-1, 64).contiguous()

    g.__doc__ = f.__doc__
    return g


# name → fixed transform of (N, 64) inputs; images are (N, rows, cols)
TASKS: dict[str, Callable[[Tensor], Tensor]] = {
    "plain": _img(lambda im: im),  # the pretraining task
    "rot90": _img(lambda im: torch.rot90(im, k=1, dims=(1, 2))),  # 90° counter-clockwise
    "flipLR": _img(lambda im: torch.flip(im, dims=(2,))),  # mirror left ↔ right
    "invert": _img(lambda im: -im),  # ink ↔ paper (features are in [−1, 1])
    "transpose": _img(lambda im: im.transpose(1, 2)),  # swap rows and columns
    "flipUD": _img(lambda im: torch.flip(im, dims=(1,))),  # mirror top ↔ bottom
    "roll2": _img(lambda im: torch.roll(im, shifts=2, dims=2)),  # shift 2 columns right, wrapping around
    "rot180": _img(lambda im: torch.rot90(im, k=2, dims=(1, 2))),  # 180° rotation
    "rollUD": _img(lambda im: torch.roll(im, shifts=2, dims=1)),  # shift 2 rows down, wrapping around
}
DEFAULT_TASKS: tuple[str, ...] = ("rot90", "flipLR", "invert", "transpose", "flipUD", "roll2")


def transform(x: Tensor, task: str) -> Tensor:
    """Apply task ``task``'s fixed input transform to feature rows ``x`` (N, 64).

    Explained in: book/lab.ipynb
    """
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return TASKS[task](x)


def task_split(split: Split, task: str) -> Split:
    """The same examples and labels with the task's input transform applied.

    Explained in: book/lab.ipynb
    """
    return Split(f"{split.name}/{task}", transform(split.x, task), split.y)


# ============================================================================ models


class MLP(nn.Module):
    """H1's classifier: 64 → 256 → 256 → 10, ReLU. Layers ``l1``, ``l2``, ``l3`` (adapter targets).

    Parameters: 64·256+256 + 256·256+256 + 256·10+10 = 85,002.

    Explained in: book/lab.ipynb
    """

    def __init__(self, hidden: int = 256, n_in: int = 64, n_classes: int = 10) -> None:
        super().__init__()
        self.l1 = nn.Linear(n_in, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))  # logits (N, 10)


class ConvNet(nn.Module):
    """H1 with convolutions: the 8×8 digit through ``c1`` (1 → 16), ``c2`` (16 → 32), 2×2 max-pool, ``c3``
    (32 → 32), 2×2 max-pool, then the ``head`` (128 → 10); 3×3 kernels, padding 1, ReLU.

    Parameters: 160 + 4,640 + 9,248 + 1,290 = 15,338.

    Explained in: book/loha_lokr.ipynb
    """

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32 * 2 * 2, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.c1(x.reshape(-1, 1, 8, 8)))  # (N, 16, 8, 8)
        h = F.max_pool2d(F.relu(self.c2(h)), 2)  # (N, 32, 4, 4)
        h = F.max_pool2d(F.relu(self.c3(h)), 2)  # (N, 32, 2, 2)
        return self.head(h.flatten(1))  # logits (N, 10)


class Trunk(nn.Module):
    """H4's shared trunk: 64 → H → H, ReLU after each layer. Layers ``l1``, ``l2``.

    Explained in: book/lab.ipynb
    """

    def __init__(self, hidden: int = 256, n_in: int = 64) -> None:
        super().__init__()
        self.l1 = nn.Linear(n_in, hidden)
        self.l2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.l2(F.relu(self.l1(x))))  # features (N, H)


class Classifier(nn.Module):
    """H4's model for one task: ``trunk`` (shared, merged) then a 10-way ``head`` (per task).

    Explained in: book/lab.ipynb
    """

    def __init__(self, hidden: int = 256, n_classes: int = 10) -> None:
        super().__init__()
        self.trunk = Trunk(hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))  # logits (N, 10)


# ============================================================================ the cache


def cache_dir() -> Path:
    """The lab cache folder: ``$PEFTLAB_CACHE``, else ``~/.cache/peftlab`` (see :func:`peftlab.lab.cache.cache_root`).

    Explained in: book/lab.ipynb
    """
    return _cache.cache_root()


def _cached(
    kind: str, config: Mapping[str, object], build: Callable[[], tuple[nn.Module, dict]], make: Callable[[], nn.Module]
) -> tuple[nn.Module, dict]:
    """``kind`` trained with ``config``, from ``<cache>/digits/`` or built now; the key includes :data:`FORMAT`."""
    return _cache.cached_module("digits", kind, {"format": FORMAT, **config}, build, make)


def _init(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a model with weights drawn from ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _fit(
    model: nn.Module,
    split: Split,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    optimizer: str = "adam",
    momentum: float = 0.9,
    progress: bool = False,
) -> dict:
    """Train on CPU with cross-entropy; return the info stored with the model."""
    from peftlab.lab.train import train

    if optimizer == "adam":
        make_opt = lambda ps: torch.optim.Adam(ps, lr=lr)  # noqa: E731
    elif optimizer == "sgd":
        make_opt = lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum)  # noqa: E731
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    start = time.perf_counter()
    hist = train(
        model,
        batches(split, batch_size, seed),
        steps=steps,
        lr=lr,
        optimizer=make_opt,
        seed=seed,
        device="cpu",
        progress=progress,
    )
    return {"loss": [round(v, 6) for v in hist.loss], "seconds": round(time.perf_counter() - start, 3)}


# ============================================================================ H1


def _h1_config(seed: int, steps: int, lr: float, batch_size: int, hidden: int) -> dict:
    return {"harness": "H1", "seed": seed, "steps": steps, "lr": lr, "batch_size": batch_size, "hidden": hidden}


def _h1(seed: int, steps: int, lr: float, batch_size: int, hidden: int, progress: bool) -> tuple[nn.Module, dict]:
    config = _h1_config(seed, steps, lr, batch_size, hidden)

    def build() -> tuple[nn.Module, dict]:
        model = _init(lambda: MLP(hidden), seed)
        info = _fit(model, load().odd_train, steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
        return model, info

    return _cached("h1-mlp", config, build, lambda: MLP(hidden))


def pretrained_mlp(
    seed: int = 0, steps: int = 1500, lr: float = 1e-3, batch_size: int = 64, hidden: int = 256, progress: bool = False
) -> MLP:
    """H1's MLP pretrained on odd digits only (Adam, cross-entropy), from the cache or trained now (~2 s).

    Returns a fresh copy on the CPU each call (safe to fine-tune in place).

    Explained in: book/lab.ipynb
    """
    model, _ = _h1(seed, steps, lr, batch_size, hidden, progress)
    return model  # type: ignore[return-value]


def pretrained_convnet(seed: int = 0, steps: int = 1500, lr: float = 1e-3, batch_size: int = 64,
                       progress: bool = False) -> ConvNet:
    """H1's task with :class:`ConvNet`: pretrained on odd digits only (Adam, cross-entropy), cached.

    Returns a fresh copy on the CPU each call (safe to fine-tune in place).

    Explained in: book/loha_lokr.ipynb
    """
    config = {"harness": "H1-conv", "seed": seed, "steps": steps, "lr": lr, "batch_size": batch_size}

    def build() -> tuple[nn.Module, dict]:
        model = _init(ConvNet, seed)
        info = _fit(model, load().odd_train, steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
        return model, info

    model, _ = _cached("h1-convnet", config, build, ConvNet)
    return model  # type: ignore[return-value]


def pretraining_curve(
    seed: int = 0, steps: int = 1500, lr: float = 1e-3, batch_size: int = 64, hidden: int = 256
) -> dict:
    """The stored record of H1's pretraining: ``{"loss": [per-step loss], "seconds": wall time}``.

    Explained in: book/lab.ipynb
    """
    _, info = _h1(seed, steps, lr, batch_size, hidden, False)
    return info


# ============================================================================ H4


def pretrained_classifier(
    hidden: int = 256, seed: int = 0, steps: int = 1500, lr: float = 1e-3, batch_size: int = 64, progress: bool = False
) -> Classifier:
    """H4's trunk + head pretrained on plain digits (all ten classes, Adam), cached.

    Explained in: book/lab.ipynb
    """
    config = {"harness": "H4-pre", "seed": seed, "steps": steps, "lr": lr, "batch_size": batch_size, "hidden": hidden}

    def build() -> tuple[nn.Module, dict]:
        model = _init(lambda: Classifier(hidden), seed)
        return model, _fit(model, load().train, steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)

    model, _ = _cached("h4-pre", config, build, lambda: Classifier(hidden))
    return model  # type: ignore[return-value]


def h2_teacher(seed: int = 0, spread: float = 0.7) -> nn.Module:
    """Harness H2's teacher: H1's pretrained MLP with the rows of ``l1`` (bias included) scaled by exp(U(−a, a)).

    Explained in: book/lora_in_practice.ipynb
    """
    teacher = pretrained_mlp()
    g = torch.Generator().manual_seed(seed)
    s = torch.exp((torch.rand(teacher.l1.out_features, generator=g) * 2 - 1) * spread)  # s_i, one per output unit
    with torch.no_grad():
        teacher.l1.weight.mul_(s[:, None])
        teacher.l1.bias.mul_(s)
    return teacher.eval()


def _task_seed(seed: int, task: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(task.encode())) % 2**31


def finetune_task(
    task: str,
    hidden: int = 256,
    seed: int = 0,
    steps: int = 600,
    lr: float = 1e-2,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    batch_size: int = 64,
    pretrain_steps: int = 1500,
    progress: bool = False,
) -> Classifier:
    """Fine-tune the pretrained trunk + a copy of its head on one task's transformed digits, cached.

    Default recipe (the TIES miniature's): SGD, momentum 0.9, lr 0.01, 600 steps, batch 64.

    Explained in: book/lab.ipynb
    """
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    config = {
        "harness": "H4-ft", "task": task, "seed": seed, "steps": steps, "lr": lr, "optimizer": optimizer,
        "momentum": momentum if optimizer == "sgd" else None, "batch_size": batch_size, "hidden": hidden,
        "pretrain_steps": pretrain_steps,
    }

    def build() -> tuple[nn.Module, dict]:
        model = pretrained_classifier(hidden, seed, pretrain_steps)
        split = task_split(load().train, task)
        info = _fit(model, split, steps=steps, lr=lr, batch_size=batch_size, seed=_task_seed(seed, task),
                    optimizer=optimizer, momentum=momentum, progress=progress)
        return model, info

    model, _ = _cached("h4-ft", config, build, lambda: Classifier(hidden))
    return model  # type: ignore[return-value]


StateDict = dict[str, Tensor]


@dataclass
class Testbed:
    """H4: the pretrained trunk, one fine-tuned model per task, task vectors, and scoring.

    ``theta_pre``: the pretrained trunk's state; ``task_vectors[t] = θ_t − θ_pre`` (trunk only);
    ``evaluate(trunk_state)`` scores a trunk on each task with the task's own fine-tuned head;
    ``normalised(trunk_state)`` = mean over tasks of acc(merged) / acc(fine-tuned alone).

    Explained in: book/lab.ipynb
    """

    tasks: tuple[str, ...]
    hidden: int
    pretrained: Classifier
    finetuned: dict[str, Classifier]
    data: Digits = field(repr=False)
    _individual: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)

    @property
    def theta_pre(self) -> StateDict:
        """The pretrained trunk's weights (a copy)."""
        return {k: v.detach().clone() for k, v in self.pretrained.trunk.state_dict().items()}

    @property
    def task_vectors(self) -> dict[str, StateDict]:
        """τ_t = θ_t − θ_pre for each task, over the trunk's parameters only (heads stay per task)."""
        pre = self.pretrained.trunk.state_dict()
        return {
            t: {k: (v - pre[k]).detach().clone() for k, v in m.trunk.state_dict().items()}
            for t, m in self.finetuned.items()
        }

    def apply(self, delta: Mapping[str, Tensor], lam: float = 1.0) -> StateDict:
        """θ_pre + λ·δ for a trunk delta δ (e.g. a sum of task vectors)."""
        return {k: v + lam * delta[k] for k, v in self.theta_pre.items()}

    def _split(self, split: str) -> Split:
        if split not in ("val", "merge_test", "test"):
            raise ValueError(f"split must be 'val' (choose λ/k) or 'test' (report), got {split!r}")
        return self.data.val if split == "val" else self.data.merge_test

    def evaluate(self, trunk_state: Mapping[str, Tensor], split: str = "val") -> dict[str, float]:
        """Accuracy per task of a trunk with weights ``trunk_state`` and each task's own head."""
        s = self._split(split)
        trunk = Trunk(self.hidden)
        trunk.load_state_dict(dict(trunk_state))
        out = {}
        with torch.no_grad():
            feats = {t: trunk(transform(s.x, t)) for t in self.tasks}
            for t in self.tasks:
                pred = self.finetuned[t].head(feats[t]).argmax(-1)
                out[t] = float((pred == s.y).float().mean())
        return out

    def individual(self, split: str = "val") -> dict[str, float]:
        """Accuracy of each fine-tuned model on its own task (the normaliser)."""
        key = "val" if split == "val" else "test"
        if key not in self._individual:
            s = self._split(split)
            self._individual[key] = {t: accuracy(self.finetuned[t], task_split(s, t)) for t in self.tasks}
        return self._individual[key]

    def normalised(self, trunk_state: Mapping[str, Tensor], split: str = "val") -> float:
        """Normalised accuracy: mean_t acc_t(merged trunk) / acc_t(fine-tuned t alone)."""
        acc, ind = self.evaluate(trunk_state, split), self.individual(split)
        return sum(acc[t] / ind[t] for t in self.tasks) / len(self.tasks)


def merging_testbed(
    tasks: Sequence[str] = DEFAULT_TASKS,
    hidden: int = 256,
    seed: int = 0,
    steps: int = 600,
    lr: float = 1e-2,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    pretrain_steps: int = 1500,
    progress: bool = False,
) -> Testbed:
    """Build H4: pretrain trunk + head on plain digits, fine-tune one copy per task (all cached).

    Explained in: book/lab.ipynb
    """
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS or t == "plain"]
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; tasks: {', '.join(t for t in TASKS if t != 'plain')}")
    pre = pretrained_classifier(hidden, seed, pretrain_steps, progress=progress)
    ft = {
        t: finetune_task(t, hidden, seed, steps, lr, optimizer, momentum, pretrain_steps=pretrain_steps, progress=progress)
        for t in tasks
    }
    return Testbed(tasks, hidden, pre, ft, load())
