"""A small training loop shared by every chapter.

One optimizer step per batch: ``loss = loss_fn(model, batch)``, backward, optional gradient
clipping, the ``on_backward`` hooks, ``optimizer.step()``, optional ``scheduler.step()``, the
``on_step`` hooks, ``zero_grad``. Losses stay on the device as tensors and are converted once at
the end, so a step costs no extra GPU synchronisation.

A hook is a callable ``hook(step, model, loss, optimizer)`` (``step`` counts from 0, ``loss`` is
the step's detached loss tensor). Both kinds run while the gradients are present: ``on_backward``
before the optimizer has moved the weights (to read or change gradients), ``on_step`` after it (to
change weights the optimizer must not touch again this step, as AdaLoRA's rank allocation does
after ``optimizer.step()``). A hook returns ``None``; to stop training, raise.

Explained in: book/lab.ipynb
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftlab.lab.profile import seed_everything
from peftlab.tuners.base import step_hooks as tuner_step_hooks

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
EvalFn = Callable[[nn.Module], Union[float, Mapping[str, float]]]
#: ``hook(step, model, loss, optimizer)``, called once per optimizer step (see the module docstring)
StepHook = Callable[[int, nn.Module, torch.Tensor, torch.optim.Optimizer], None]
Hooks = Union[StepHook, Sequence[StepHook], None]


@dataclass
class History:
    """What a training run recorded: per-step loss, periodic evaluations, wall time.

    ``steps[i]`` is the 1-based step whose training loss is ``loss[i]``; ``evals[name]`` holds
    ``(step, value)`` pairs (step 0 is the model before training).

    Explained in: book/lab.ipynb
    """

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    evals: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    seconds: float = 0.0

    def smoothed(self, window: int = 10) -> list[float]:
        """Running mean of the loss over the last ``window`` steps: s_t = mean(loss[t-w+1..t]).

        Explained in: book/lab.ipynb
        """
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        out, total = [], 0.0
        for i, value in enumerate(self.loss):
            total += value
            if i >= window:
                total -= self.loss[i - window]
            out.append(total / min(i + 1, window))
        return out

    def final_loss(self, window: int = 10) -> float:
        """Mean training loss over the last ``window`` steps (nan before any step).

        Explained in: book/lab.ipynb
        """
        if not self.loss:
            return math.nan
        tail = self.loss[-window:]
        return sum(tail) / len(tail)

    def steps_to(self, threshold: float, window: int = 10) -> Optional[int]:
        """First step at which the ``window``-step running loss falls below ``threshold`` (None if never).

        Explained in: book/lab.ipynb
        """
        for step, value in zip(self.steps, self.smoothed(window)):
            if value < threshold:
                return step
        return None

    def last(self, name: str = "eval") -> float:
        """The most recent value of evaluation ``name``.

        Explained in: book/lab.ipynb
        """
        if name not in self.evals or not self.evals[name]:
            raise KeyError(f"no evaluation named {name!r}; recorded: {sorted(self.evals)}")
        return self.evals[name][-1][1]

    @property
    def steps_per_second(self) -> float:
        """Training throughput of the run (evaluation time included).

        Explained in: book/lab.ipynb
        """
        return len(self.steps) / self.seconds if self.seconds > 0 else math.nan


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor inside a (nested) dict / list / tuple batch to ``device``.

    Explained in: book/lab.ipynb
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """``model(**batch).loss`` for dict batches; cross-entropy of ``model(x)`` for ``(x, y)`` pairs.

    Explained in: book/lab.ipynb
    """
    if isinstance(batch, Mapping):
        out = model(**batch)
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError(
                "model(**batch) returned no loss; put 'labels' in the batch or pass loss_fn=..."
            )
        return loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        return F.cross_entropy(model(x), y)
    raise TypeError(
        f"default loss needs a dict batch or an (x, y) pair, got {type(batch).__name__}; pass loss_fn=..."
    )


def _batch_stream(batches: Union[Iterable[Batch], Callable[[int], Batch]]) -> Callable[[int], Batch]:
    """Turn an iterable (re-iterated when exhausted, so a DataLoader reshuffles) or ``step -> batch``."""
    if callable(batches) and not hasattr(batches, "__iter__"):
        return batches  # type: ignore[return-value]
    if not hasattr(batches, "__iter__"):
        raise TypeError(f"batches must be an iterable or a callable step -> batch, got {type(batches).__name__}")
    state: dict[str, Iterator[Batch]] = {}

    def get(step: int) -> Batch:
        it = state.get("it")
        if it is None:
            it = state["it"] = iter(batches)  # type: ignore[arg-type]
        try:
            return next(it)
        except StopIteration:
            it = state["it"] = iter(batches)  # type: ignore[arg-type]
            try:
                return next(it)
            except StopIteration:
                raise ValueError("batches is empty") from None

    return get


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _record_eval(history: History, step: int, result: Union[float, Mapping[str, float]]) -> None:
    items = result.items() if isinstance(result, Mapping) else [("eval", result)]
    for name, value in items:
        history.evals.setdefault(name, []).append((step, float(value)))


def _run_eval(model: nn.Module, eval_fn: EvalFn, history: History, step: int) -> None:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        result = eval_fn(model)
    model.train(was_training)
    _record_eval(history, step, result)


def _simulated_hub_model(model: nn.Module) -> bool:
    from peftlab.lab import hub

    return hub.is_simulated(model)


def _hook_list(hooks: Hooks, name: str) -> list[StepHook]:
    if hooks is None:
        return []
    listed = [hooks] if callable(hooks) else list(hooks)
    for h in listed:
        if not callable(h):
            raise TypeError(f"{name} must be a callable hook(step, model, loss, optimizer) or a list of them; "
                            f"got {type(h).__name__}")
    return listed


def _method_hook(hook: Callable[[int], None]) -> StepHook:
    def run(step: int, model: nn.Module, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        hook(step)

    run.__name__ = getattr(hook, "__qualname__", "on_optimizer_step")
    return run


def _call_hooks(hooks: list[StepHook], name: str, step: int, model: nn.Module, loss: torch.Tensor,
                opt: torch.optim.Optimizer) -> None:
    for h in hooks:
        result = h(step, model, loss, opt)
        if result is not None:
            raise TypeError(f"{name} hook {getattr(h, '__name__', h)!r} returned {result!r}; hooks return None "
                            "(training does not stop on a return value: raise an exception to stop it)")


def train(
    model: nn.Module,
    batches: Union[Iterable[Batch], Callable[[int], Batch]],
    *,
    steps: int,
    lr: float = 1e-3,
    optimizer: Union[torch.optim.Optimizer, Callable[[list[nn.Parameter]], torch.optim.Optimizer], None] = None,
    loss_fn: Optional[LossFn] = None,
    eval_fn: Optional[EvalFn] = None,
    eval_every: int = 0,
    seed: int = 0,
    device: Union[torch.device, str, None] = None,
    progress: bool = True,
    grad_clip: Optional[float] = None,
    scheduler: Any = None,
    autocast: Optional[bool] = None,
    on_backward: Hooks = None,
    on_step: Hooks = None,
) -> History:
    """Train ``model`` for ``steps`` optimizer steps and return its :class:`History`.

    ``batches``: an iterable (cycled) or a callable ``step -> batch`` (step counts from 0).
    ``loss_fn(model, batch) -> loss`` defaults to :func:`default_loss`. ``optimizer``: an
    optimizer, a factory ``params -> optimizer``, or ``None`` for AdamW(lr) over the parameters
    with ``requires_grad``. ``scheduler``: an LR scheduler, or a factory ``optimizer -> scheduler``;
    stepped after every optimizer step. ``eval_fn(model) -> float | {name: float}`` runs under
    ``torch.no_grad`` in eval mode at step 0, every ``eval_every`` steps and at the end
    (only at the end when ``eval_every=0``). ``autocast``: bf16 autocast, default on for CUDA and for
    a shrunk hub model of a simulated GPU section (``PEFTLAB_GPU_SIM=1``, on the CPU: the GPU's
    mixed-precision code path).
``on_backward`` / ``on_step``: a hook ``hook(step, model, loss, optimizer)`` or a list of them,
called once per step after ``loss.backward()`` (and clipping), before / after ``optimizer.step()``,
always before ``zero_grad``, so gradients are present in both. A tuner's own per-step work
(``BaseTuner.on_optimizer_step``: AdaLoRA's ``update_and_allocate(step)``) runs first among the
``on_step`` hooks without being asked.

    Explained in: book/lab.ipynb
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if eval_every < 0:
        raise ValueError(f"eval_every must be >= 0, got {eval_every}")
    backward_hooks, step_hooks = _hook_list(on_backward, "on_backward"), _hook_list(on_step, "on_step")
    # a method's own per-step work (AdaLoRA's rank allocation) runs first among the on_step hooks, so it
    # cannot be forgotten
    step_hooks = [_method_hook(h) for h in tuner_step_hooks(model)] + step_hooks
    seed_everything(seed)
    if device is not None:
        device = torch.device(device)
        model.to(device)
    else:
        device = _model_device(model)
    use_autocast = (device.type == "cuda" or _simulated_hub_model(model)) if autocast is None else autocast
    if use_autocast and device.type not in ("cuda", "cpu"):
        raise ValueError(f"bf16 autocast runs on CUDA or the CPU, not on {device.type}; pass autocast=False")

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
    if optimizer is None:
        opt = torch.optim.AdamW(params, lr=lr)
    elif isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    elif callable(optimizer):
        opt = optimizer(params)
    else:
        raise TypeError(f"optimizer must be an Optimizer, a factory or None, got {type(optimizer).__name__}")
    sched = scheduler
    if sched is not None and not hasattr(sched, "step") and callable(sched):
        sched = sched(opt)
    loss_fn = loss_fn or default_loss
    get_batch = _batch_stream(batches)
    history = History()
    losses: list[torch.Tensor] = []

    bar = None
    if progress and steps > 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="train", leave=False, dynamic_ncols=True)
    postfix_every = max(1, steps // 20)

    start = time.perf_counter()
    if eval_fn is not None and eval_every > 0:
        _run_eval(model, eval_fn, history, 0)
    model.train()
    for step in range(steps):
        batch = to_device(get_batch(step), device)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
        with ctx:
            loss = loss_fn(model, batch)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if backward_hooks:
            _call_hooks(backward_hooks, "on_backward", step, model, loss.detach(), opt)
        opt.step()
        if sched is not None:
            sched.step()
        if step_hooks:
            _call_hooks(step_hooks, "on_step", step, model, loss.detach(), opt)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
        done = step + 1
        if eval_fn is not None and eval_every > 0 and done % eval_every == 0 and done != steps:
            _run_eval(model, eval_fn, history, done)
        if bar is not None:
            bar.update(1)
            if done % postfix_every == 0 or done == steps:
                bar.set_postfix(loss=f"{losses[-1].item():.4f}")  # one sync every ~5 % of the run
    if eval_fn is not None and not (steps == 0 and eval_every > 0):  # step 0 already evaluated
        _run_eval(model, eval_fn, history, steps)
    if bar is not None:
        bar.close()
    history.seconds = time.perf_counter() - start
    history.steps = list(range(1, steps + 1))
    history.loss = torch.stack(losses).cpu().tolist() if losses else []
    return history
