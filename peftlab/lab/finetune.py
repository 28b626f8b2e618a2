"""Fine-tuning runs: full fine-tuning or an adapter, on a digits harness or the lab LM, recorded as a run.

A :class:`Run` records one fine-tuning run (method, rank, seed, score, trainable parameters, the learned
weight updates ΔW). :func:`h1_run` fine-tunes H1's odd-digit MLP on even digits (the LoRA paper's claim in
miniature), :func:`h1_sweep` repeats it over ranks and seeds, :func:`h1_finetune` runs H1 with any adapter
config or optimizer and can snapshot the effective weights, :func:`h2_run` distils harness H2's teacher
(:func:`peftlab.lab.digits.h2_teacher`), and :func:`lm_run` teaches a causal LM a new string task scored by
exact match. :func:`adapter_deltas` reads ΔW off every adapted layer; :func:`table`, :func:`summary` and
:func:`mean_score` tabulate runs. How low-rank a ΔW is: :mod:`peftlab.lab.spectra`.

Explained in: book/lora.ipynb, book/lora_in_practice.ipynb
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab import LoraConfig, TaskType, get_peft_model
from peftlab.lab import digits, tasks
from peftlab.lab.train import train
from peftlab.tuners.base import AdapterLayer

__all__ = [
    "H1_LAYERS",
    "ModelLoader",
    "PracticeRun",
    "Run",
    "adapter_deltas",
    "deltas_by_label",
    "effective_weight",
    "h1_finetune",
    "h1_lora_config",
    "h1_run",
    "h1_sweep",
    "h2_run",
    "lm_run",
    "mean_score",
    "seeded",
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


def adapter_deltas(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """ΔW of every adapted layer in ``model`` (LoRA: (α/r)·B A), keyed by the wrapped module's name (detached, CPU).

    Layers whose method has no weight update to read (``get_delta_weight`` raises ``NotImplementedError``) are
    left out.

    Explained in: book/lora.ipynb
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and adapter_name in module.adapter_names:
            key = name.removeprefix("base_model.model.")
            try:
                with torch.no_grad():
                    delta = module.get_delta_weight(adapter_name)
            except NotImplementedError:
                continue
            out[key] = delta.detach().float().cpu().clone()
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
            delta = adapter_deltas(model)
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


# ============================================================================ H1 with any adapter config


OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass
class PracticeRun:
    """One run: training loss per step, test score, the trained model and optional weight snapshots.

    ``snapshots`` is a list of ``(step, {layer: W_eff (out, in)})`` taken every ``snapshot_every`` steps.

    Explained in: book/lora_in_practice.ipynb
    """

    loss: list[float]
    score: float
    model: nn.Module = field(repr=False)
    snapshots: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list, repr=False)

    def final_loss(self, window: int = 10) -> float:
        """Mean training loss over the last ``window`` steps."""
        tail = self.loss[-window:]
        return sum(tail) / len(tail)

    def steps_to(self, threshold: float, window: int = 10) -> Optional[int]:
        """First step at which the ``window``-step running mean of the loss is below ``threshold`` (or None)."""
        for i in range(window, len(self.loss) + 1):
            if sum(self.loss[i - window:i]) / window < threshold:
                return i
        return None


@torch.no_grad()
def effective_weight(module: nn.Module) -> Tensor:
    """The weight an adapted (or plain) ``Linear`` applies, read off its outputs: W_eff = (f(I) − f(0))ᵀ.

    Works for LoRA, DoRA and 4-bit bases alike (it only calls the module), shape (out, in), float32, CPU.

    Explained in: book/lora_in_practice.ipynb
    """
    n_in = module.in_features if hasattr(module, "in_features") else module.get_base_layer().in_features
    p = next(module.parameters())
    eye = torch.eye(n_in, device=p.device)
    was = module.training
    module.eval()
    try:
        W = (module(eye) - module(torch.zeros(1, n_in, device=p.device))).T
    finally:
        module.train(was)
    return W.float().cpu()


def _layers(model: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Module]:
    inner = model.base_model.model if hasattr(model, "base_model") else model
    return {n: inner.get_submodule(n) for n in names}


def h1_finetune(
    config: Optional[LoraConfig],
    *,
    steps: int = 300,
    lr: float = 3e-3,
    seed: int = 0,
    optimizer: Optional[OptimizerFactory] = None,
    snapshot_every: int = 0,
    snapshot_layers: tuple[str, ...] = H1_LAYERS,
    base: Optional[nn.Module] = None,
) -> PracticeRun:
    """Fine-tune H1's odd-digit MLP (or ``base``) on even digits with ``config`` (``None``: full fine-tuning).

    Adam at ``lr`` unless ``optimizer(model)`` builds one (e.g. LoRA+); batch 64; ``seed`` sets the adapter
    initialisation and the batch order. Score: even-test accuracy.

    Explained in: book/lora_in_practice.ipynb
    """
    data = digits.load()
    model: nn.Module = digits.pretrained_mlp() if base is None else base
    if config is not None:
        with seeded(seed):
            model = get_peft_model(model, config)  # type: ignore[arg-type]
    snaps: list[tuple[int, dict[str, Tensor]]] = []
    count = {"step": 0}

    def snapshot(m: nn.Module) -> float:
        snaps.append((count["step"], {n: effective_weight(l) for n, l in _layers(m, snapshot_layers).items()}))
        count["step"] += snapshot_every
        return 0.0

    opt = optimizer(model) if optimizer is not None else (lambda ps: torch.optim.Adam(ps, lr=lr))
    hist = train(model, digits.batches(data.even_train, H1_BATCH, seed), steps=steps, optimizer=opt, seed=seed,
                 device="cpu", progress=False, eval_fn=snapshot if snapshot_every else None,
                 eval_every=snapshot_every)
    if snaps:
        snaps[-1] = (steps, snaps[-1][1])  # the final snapshot is taken at the last step
    return PracticeRun(hist.loss, digits.accuracy(model, data.even_test), model, snaps)


# ============================================================================ H2: distil a rescaled teacher


def h2_run(config: Optional[LoraConfig], *, steps: int = 400, lr: float = 3e-3, seed: int = 0,
           teacher: Optional[nn.Module] = None) -> tuple[float, int, list[float]]:
    """Distil the H2 teacher into the pretrained MLP with an adapter ``config`` (``None``: no adaptation).

    MSE to the teacher's logits on all training digits (batch 64, Adam ``lr``). Returns (test MSE, trainable
    parameters, training loss per step).

    Explained in: book/lora_in_practice.ipynb
    """
    data = digits.load()
    teacher = digits.h2_teacher() if teacher is None else teacher
    student: nn.Module = digits.pretrained_mlp()
    loss: list[float] = []
    trainable = 0
    if config is not None:
        with seeded(seed):
            student = get_peft_model(student, config)  # type: ignore[arg-type]
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)

        def mse(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
            x, _ = batch
            with torch.no_grad():
                target = teacher(x)
            return F.mse_loss(model(x), target)

        hist = train(student, digits.batches(data.train, H1_BATCH, seed), steps=steps,
                     optimizer=lambda ps: torch.optim.Adam(ps, lr=lr), loss_fn=mse, seed=seed, device="cpu",
                     progress=False)
        loss = hist.loss
    with torch.no_grad():
        student.eval()
        test = float(F.mse_loss(student(data.test.x), teacher(data.test.x)))
    return test, trainable, loss


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
    delta = adapter_deltas(model) if keep_delta and method == "lora" else {}
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


def deltas_by_label(runs: Sequence[Run], seed: int, layer: str) -> Mapping[str, Tensor]:
    """ΔW of ``layer`` for every run of ``seed`` that kept it, keyed by the run's label.

    Explained in: book/lora.ipynb
    """
    return {x.label: x.delta[layer] for x in runs if x.seed == seed and layer in x.delta}
