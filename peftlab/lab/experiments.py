"""Experiments the chapters run and the tests check: full fine-tuning against LoRA, on H1 and the lab LM.

A :class:`Run` records one fine-tuning run (method, rank, seed, score, trainable parameters, the learned
weight updates ΔW). :func:`h1_run` fine-tunes H1's odd-digit MLP on even digits (the LoRA paper's claim in
miniature), :func:`h1_sweep` repeats it over ranks and seeds, and :func:`lm_run` teaches a causal LM a new
string task scored by exact match. :func:`energy_fraction`, :func:`rank_for_energy` and
:func:`subspace_similarity` measure how low-rank a ΔW is.

Explained in: book/lora.ipynb
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from peftlab import LoraConfig, TaskType, get_peft_model
from peftlab.lab import digits, tasks
from peftlab.lab.train import train
from peftlab.tuners.base import AdapterLayer

__all__ = [
    "H1_LAYERS",
    "deltas_by_label",
    "Run",
    "energy_fraction",
    "h1_lora_config",
    "h1_run",
    "h1_sweep",
    "lm_run",
    "lora_deltas",
    "mean_score",
    "numerical_rank",
    "rank_for_energy",
    "seeded",
    "singular_values",
    "subspace_similarity",
    "summary",
    "table",
]

#: H1's adapted layers: all three Linear layers (the head must learn the even classes).
H1_LAYERS: tuple[str, ...] = ("l1", "l2", "l3")
#: H1's fine-tuning recipe (paper-claims.md §2.1): Adam, batch 64, 300 steps; LoRA lr 3e-3, full FT lr 1e-3.
H1_STEPS, H1_BATCH, H1_LORA_LR, H1_FULL_LR = 300, 64, 3e-3, 1e-3
METHODS: tuple[str, ...] = ("full", "lora")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded, restoring the global random state afterwards.

    Explained in: book/lora.ipynb
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass
class Run:
    """One fine-tuning run: method, rank, seed, test score, parameter counts and the learned ΔW.

    ``score`` is a fraction in [0, 1] (H1: even-test accuracy; LM: exact match). ``trainable`` counts the
    parameters the optimizer updated, ``base_params`` those of the model before any adapter was added, so
    ``fraction = trainable / base_params``. ``delta[name]`` is ΔW (out × in) of each adapted ``Linear``:
    W_after − W_before for full fine-tuning, (α/r)·B A for LoRA. ``model`` is the trained model when the
    run was asked to keep it.

    Explained in: book/lora.ipynb
    """

    method: str
    r: Optional[int]
    seed: int
    score: float
    trainable: int
    base_params: int
    seconds: float
    loss: list[float] = field(default_factory=list, repr=False)
    delta: dict[str, Tensor] = field(default_factory=dict, repr=False)
    model: Optional[nn.Module] = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """``"full FT"`` or ``"LoRA r=4"``."""
        return "full FT" if self.method == "full" else f"LoRA r={self.r}"

    @property
    def fraction(self) -> float:
        """Trainable parameters as a fraction of the base model's parameters."""
        return self.trainable / self.base_params


def _check_method(method: str, r: Optional[int]) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r}; valid methods: {', '.join(map(repr, METHODS))}")
    if method == "lora" and (not isinstance(r, int) or r <= 0):
        raise ValueError(f"method='lora' needs a positive integer rank r, got r={r!r}")


def _count(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def lora_deltas(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """ΔW = (α/r)·B A of every LoRA layer in ``model``, keyed by the wrapped module's name (detached, CPU).

    Explained in: book/lora.ipynb
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and adapter_name in module.adapter_names:
            key = name.removeprefix("base_model.model.")
            with torch.no_grad():
                out[key] = module.get_delta_weight(adapter_name).detach().float().cpu().clone()
    return out


def _linear_weights(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    return {n: model.get_submodule(n).weight.detach().float().cpu().clone() for n in names}


# ============================================================================ H1: digits odd → even


def h1_lora_config(r: int, lora_alpha: Optional[float] = None) -> LoraConfig:
    """LoRA on H1's three layers with α = 2r unless given (so the scaling α/r stays 2 at every rank).

    Explained in: book/lora.ipynb
    """
    return LoraConfig(r=r, lora_alpha=2 * r if lora_alpha is None else lora_alpha, target_modules=list(H1_LAYERS))


def h1_run(
    method: str = "lora",
    r: Optional[int] = 4,
    seed: int = 0,
    steps: int = H1_STEPS,
    lr: Optional[float] = None,
    batch_size: int = H1_BATCH,
    lora_alpha: Optional[float] = None,
    keep_delta: bool = True,
    keep_model: bool = False,
) -> Run:
    """Fine-tune H1's odd-digit MLP on even digits, by full fine-tuning or LoRA; score on even-test.

    The base model is the same for every seed (``digits.pretrained_mlp()``, pretraining seed 0); ``seed``
    sets the LoRA initialisation and the batch order. ``lr`` defaults to 3e-3 for LoRA, 1e-3 for full FT.

    Explained in: book/lora.ipynb
    """
    _check_method(method, r)
    data = digits.load()
    model: nn.Module = digits.pretrained_mlp()
    base_params = _count(model)
    before = _linear_weights(model, H1_LAYERS) if method == "full" and keep_delta else {}
    if method == "lora":
        with seeded(seed):  # the random A of every layer
            model = get_peft_model(model, h1_lora_config(r, lora_alpha))  # type: ignore[arg-type]
    lr = lr if lr is not None else (H1_LORA_LR if method == "lora" else H1_FULL_LR)
    hist = train(
        model, digits.batches(data.even_train, batch_size, seed), steps=steps,
        optimizer=lambda ps: torch.optim.Adam(ps, lr=lr), seed=seed, device="cpu", progress=False,
    )
    delta: dict[str, Tensor] = {}
    if keep_delta:
        if method == "lora":
            delta = lora_deltas(model)
        else:
            after = _linear_weights(model, H1_LAYERS)
            delta = {n: after[n] - before[n] for n in H1_LAYERS}  # ΔW = W − W₀
    return Run(method, r if method == "lora" else None, seed, digits.accuracy(model, data.even_test),
               _count(model, trainable_only=True), base_params, hist.seconds, hist.loss, delta,
               model if keep_model else None)


def h1_sweep(
    ranks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = H1_STEPS,
    full: bool = True,
    progress: bool = False,
    keep_delta: Union[bool, Callable[[str, Optional[int], int], bool]] = True,
    keep_model: Union[bool, Callable[[str, Optional[int], int], bool]] = False,
) -> list[Run]:
    """Full fine-tuning (if ``full``) and LoRA at every rank in ``ranks``, each for every seed in ``seeds``.

    ``keep_delta`` and ``keep_model`` may be predicates ``(method, r, seed) -> bool`` (keep only for some runs).

    Explained in: book/lora.ipynb
    """
    plan: list[tuple[str, Optional[int], int]] = [("full", None, s) for s in seeds] if full else []
    plan += [("lora", r, s) for r in ranks for s in seeds]
    from tqdm.auto import tqdm

    runs = []
    for method, r, seed in tqdm(plan, desc="H1 runs", disable=not progress, leave=False):
        keep = keep_delta(method, r, seed) if callable(keep_delta) else keep_delta
        keep_m = keep_model(method, r, seed) if callable(keep_model) else keep_model
        runs.append(h1_run(method, r, seed, steps=steps, keep_delta=keep, keep_model=keep_m))
    return runs


# ============================================================================ the lab LM: a new string task


ModelLoader = Callable[[], tuple[Any, Any]]


def lm_run(
    load: ModelLoader,
    method: str = "lora",
    task: str = "shift",
    r: Optional[int] = 8,
    target_modules: Union[Sequence[str], str] = ("q_proj", "v_proj"),
    seed: int = 0,
    steps: int = 300,
    lr: Optional[float] = None,
    batch_size: int = 32,
    n_train: int = 4000,
    n_test: int = 200,
    lora_alpha: Optional[float] = None,
    device: Union[str, torch.device, None] = None,
    keep_delta: bool = False,
    keep_model: bool = False,
) -> Run:
    """Teach a causal LM the string task ``task`` by full fine-tuning or LoRA; score exact match by greedy decoding.

    ``load()`` returns a fresh ``(model, tokenizer)`` (e.g. ``lambda: lm.load_lab_model(P)``). Training uses
    ``n_train`` examples drawn with seed 0, the score ``n_test`` examples drawn with seed 1; ``seed`` sets the
    LoRA initialisation and the batch order. Adam, lr 3e-3 for LoRA and 1e-3 for full FT unless given;
    α = 2r unless given. Loss on answer tokens only.

    Explained in: book/lora.ipynb
    """
    _check_method(method, r)
    tasks.get_task(task)
    model, tok = load()
    if device is not None:
        model.to(device)
    base_params = _count(model)
    if method == "lora":
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        config = LoraConfig(r=r, lora_alpha=2 * r if lora_alpha is None else lora_alpha, target_modules=targets,
                            task_type=TaskType.CAUSAL_LM)
        with seeded(seed):
            model = get_peft_model(model, config)
    lr = lr if lr is not None else (H1_LORA_LR if method == "lora" else H1_FULL_LR)
    train_set = tasks.make_task(task, n_train, seed=0, tokenizer=tok)
    test_set = tasks.make_task(task, n_test, seed=1)
    hist = train(
        model, tasks.loader(train_set, tok, batch_size, seed), steps=steps,
        optimizer=lambda ps: torch.optim.Adam(ps, lr=lr), seed=seed, progress=False,
    )
    score = tasks.exact_match(model, tok, test_set)
    delta = lora_deltas(model) if keep_delta and method == "lora" else {}
    return Run(method, r if method == "lora" else None, seed, float(score), _count(model, trainable_only=True),
               base_params, hist.seconds, hist.loss, delta, model if keep_model else None)


# ============================================================================ tables


def table(runs: Sequence[Run]) -> Any:
    """One row per run: label, method, r, seed, score (%), trainable parameters, fraction (%), seconds.

    Returns a ``pandas.DataFrame``.

    Explained in: book/lora.ipynb
    """
    import pandas as pd

    return pd.DataFrame([
        {"run": x.label, "method": x.method, "r": x.r, "seed": x.seed, "score %": 100 * x.score,
         "trainable": x.trainable, "trainable %": 100 * x.fraction, "seconds": x.seconds}
        for x in runs
    ])


def summary(runs: Sequence[Run]) -> Any:
    """Mean and standard deviation of the score (%) over seeds, per method and rank (a ``pandas.DataFrame``).

    Explained in: book/lora.ipynb
    """
    df = table(runs)
    out = df.groupby("run", sort=False).agg(
        r=("r", "first"), seeds=("seed", "count"), mean=("score %", "mean"), std=("score %", "std"),
        trainable=("trainable", "first"), fraction=("trainable %", "first"),
    )
    return out.rename(columns={"mean": "score % (mean)", "std": "score % (std)", "fraction": "trainable %"})


def mean_score(runs: Sequence[Run], method: str, r: Optional[int] = None) -> float:
    """Mean score (a fraction) over the seeds of the runs with this method (and rank, for LoRA).

    Explained in: book/lora.ipynb
    """
    chosen = [x.score for x in runs if x.method == method and (method == "full" or x.r == r)]
    if not chosen:
        raise KeyError(f"no run with method={method!r}, r={r!r}; runs: {sorted({x.label for x in runs})}")
    return sum(chosen) / len(chosen)


# ============================================================================ how low-rank is ΔW?


def singular_values(M: Tensor) -> Tensor:
    """σ₁ ≥ σ₂ ≥ … of a matrix, in float64.

    Explained in: book/lora.ipynb
    """
    return torch.linalg.svdvals(M.detach().double().cpu())


def energy_fraction(M: Tensor, k: int) -> float:
    """Share of ‖M‖²_F in the top ``k`` singular values: Σ_{i≤k} σ_i² / Σ_i σ_i² (1.0 for M = 0).

    By Eckart–Young, 1 − energy_fraction is the squared relative error of the best rank-k approximation.

    Explained in: book/lora.ipynb
    """
    s2 = singular_values(M).square()
    total = float(s2.sum())
    return 1.0 if total == 0 else float(s2[:k].sum()) / total


def rank_for_energy(M: Tensor, fraction: float = 0.9) -> int:
    """Smallest k whose top-k singular values hold at least ``fraction`` of ‖M‖²_F.

    Explained in: book/lora.ipynb
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    s2 = singular_values(M).square()
    if float(s2.sum()) == 0:
        return 0
    cum = torch.cumsum(s2, 0) / s2.sum()
    return int((cum < fraction - 1e-12).sum()) + 1


def numerical_rank(M: Tensor, rel_tol: float = 1e-5) -> int:
    """Number of singular values above ``rel_tol`` · σ₁ (float32 products leave ~1e-7 noise in the rest).

    Explained in: book/lora.ipynb
    """
    s = singular_values(M)
    return 0 if float(s[0]) == 0 else int((s > rel_tol * s[0]).sum())


def subspace_similarity(M1: Tensor, M2: Tensor, i: int, j: int) -> float:
    """The LoRA paper's φ(M1, M2, i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖²_F / min(i, j), in [0, 1].

    U are left singular vectors (output directions): 1 when the top-i directions of M1 and the top-j
    of M2 span nested subspaces, about max(i, j)/d for random directions in d dimensions.

    Explained in: book/lora.ipynb
    """
    U1 = torch.linalg.svd(M1.detach().double().cpu(), full_matrices=False).U[:, :i]
    U2 = torch.linalg.svd(M2.detach().double().cpu(), full_matrices=False).U[:, :j]
    return float((U1.T @ U2).square().sum()) / min(i, j)


def deltas_by_label(runs: Sequence[Run], seed: int, layer: str) -> Mapping[str, Tensor]:
    """ΔW of ``layer`` for every run of ``seed`` that kept it, keyed by the run's label.

    Explained in: book/lora.ipynb
    """
    return {x.label: x.delta[layer] for x in runs if x.seed == seed and layer in x.delta}
