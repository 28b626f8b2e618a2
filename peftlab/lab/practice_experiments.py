"""Experiments of the "LoRA in practice" chapter: H1 runs with any LoraConfig or optimizer, harness H2, DoRA's
magnitude/direction decomposition, and an interleaved latency timer.

:func:`h1_finetune` fine-tunes H1's odd-digit MLP on even digits with any ``LoraConfig`` (or fully, with
``config=None``) and optional weight snapshots; :func:`h2_teacher` / :func:`h2_run` are harness H2 (distil a
teacher whose first-layer output units were rescaled); :func:`magnitude_direction` is the DoRA paper's ΔM, ΔD;
:func:`effective_weight` reads the weight any adapted ``Linear`` applies; :func:`median_latency` times
functions interleaved.

Explained in: book/lora_in_practice.ipynb
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab import LoraConfig, get_peft_model
from peftlab.lab import digits
from peftlab.lab.experiments import H1_BATCH, H1_LAYERS, seeded
from peftlab.lab.train import train

__all__ = [
    "PracticeRun",
    "effective_weight",
    "h1_finetune",
    "h2_run",
    "h2_teacher",
    "magnitude_direction",
    "median_latency",
]

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


def h2_teacher(seed: int = 0, spread: float = 0.7) -> nn.Module:
    """Harness H2's teacher: H1's pretrained MLP with the rows of ``l1`` (bias included) scaled by exp(U(−a, a)).

    Explained in: book/lora_in_practice.ipynb
    """
    teacher = digits.pretrained_mlp()
    g = torch.Generator().manual_seed(seed)
    s = torch.exp((torch.rand(teacher.l1.out_features, generator=g) * 2 - 1) * spread)  # s_i, one per output unit
    with torch.no_grad():
        teacher.l1.weight.mul_(s[:, None])
        teacher.l1.bias.mul_(s)
    return teacher.eval()


def h2_run(config: Optional[LoraConfig], *, steps: int = 400, lr: float = 3e-3, seed: int = 0,
           teacher: Optional[nn.Module] = None) -> tuple[float, int, list[float]]:
    """Distil the H2 teacher into the pretrained MLP with an adapter ``config`` (``None``: no adaptation).

    MSE to the teacher's logits on all training digits (batch 64, Adam ``lr``). Returns (test MSE, trainable
    parameters, training loss per step).

    Explained in: book/lora_in_practice.ipynb
    """
    data = digits.load()
    teacher = h2_teacher() if teacher is None else teacher
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


def magnitude_direction(W0: Tensor, W: Tensor) -> tuple[float, float]:
    """The DoRA paper's ΔM and ΔD between W0 and W, per output unit i (a row of a PyTorch weight), averaged:

    ΔM = mean_i |‖W_i‖ − ‖W0_i‖|,  ΔD = mean_i (1 − cos(W_i, W0_i)).

    Explained in: book/lora_in_practice.ipynb
    """
    W0, W = W0.double(), W.double()
    dm = (W.norm(dim=1) - W0.norm(dim=1)).abs().mean()
    dd = (1 - F.cosine_similarity(W, W0, dim=1)).mean()
    return float(dm), float(dd)


def median_latency(fns: Mapping[str, Callable[[], Any]], repeats: int = 30, inner: int = 10,
                   warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, timed interleaved (round-robin) so drifts hit all alike.

    Explained in: book/lora_in_practice.ipynb
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}
