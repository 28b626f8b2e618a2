"""Fine-tuning runs: any method (or full fine-tuning) on a lab LM task or a digits harness, recorded as a Run.

:func:`finetune` is the one entry point every chapter uses: a peftlab method config (``LoraConfig(...)``, any
method's) or ``"full"``, on a lab LM task (exact match) or a digits harness (``"h1"``, ``"h4:<transform>"``:
accuracy); it returns a :class:`Run`: score, trainable and total parameters, wall time, memory, the loss and
eval curves, the learned update ΔW of every adapted layer, the config and the seed. The per-step hooks of
:func:`peftlab.lab.train.train` pass through.

Built on it: :func:`h1_run` and :func:`h1_sweep` (LoRA against full fine-tuning on H1 over ranks and seeds),
:func:`h1_finetune` (H1 with any config or optimizer, with weight snapshots), :func:`lm_run` (LoRA or full
fine-tuning on the lab LM). :func:`h2_run` distils harness H2's teacher (:func:`peftlab.lab.digits.h2_teacher`).
:func:`adapted_layers` finds the adapter layers (the library's walk), :func:`adapter_deltas` reads ΔW off them;
:func:`table`, :func:`summary` and :func:`mean_score` tabulate runs. How low-rank a ΔW is: :mod:`peftlab.lab.spectra`.

Explained in: book/lab.ipynb, book/lora.ipynb, book/lora_in_practice.ipynb
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab import LoraConfig, TaskType, get_peft_model
from peftlab.config import PeftConfig
from peftlab.lab import digits, tasks
from peftlab.lab import profile as _profile
from peftlab.lab.train import Hooks, train
from peftlab.tuners.base import AdapterLayer, BaseTuner

__all__ = [
    "DIGITS_HARNESSES",
    "H1_LAYERS",
    "H4_LAYERS",
    "METHOD_NAMES",
    "ModelLoader",
    "Run",
    "adapted_layers",
    "adapter_deltas",
    "deltas_by_label",
    "effective_weight",
    "finetune",
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
#: H1's fine-tuning recipe: Adam, batch 64, 300 steps; LoRA lr 3e-3, full FT lr 1e-3.
H1_STEPS, H1_BATCH, H1_LORA_LR, H1_FULL_LR = 300, 64, 3e-3, 1e-3
#: H4's adapted layers (the trunk; the head is trained in full) and its default width.
H4_LAYERS: tuple[str, ...] = ("trunk.l1", "trunk.l2")
H4_HIDDEN = 256
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
    """One fine-tuning run: what was trained, how well, at what cost, and what it learned.

    ``method`` is ``"full"`` or the method's name (``"lora"``, …: the config's ``peft_type`` in lower case),
    ``r`` the config's rank where it has one. ``score`` is a fraction in [0, 1] (``metric``: exact match on a
    lab LM task, accuracy on a digits harness). ``trainable`` counts the parameters the optimizer updated
    (``get_nb_trainable_parameters()[0]`` for an adapted model), ``total`` every parameter of the trained
    model (adapters included), ``base_params`` those of the model before any adapter, so ``fraction =
    trainable / base_params``. ``seconds``: wall time of the training loop (with the evaluations it ran).
    ``memory_bytes``: bytes of every parameter, a gradient per trainable one and the optimizer's state (what
    training must hold, exact and the same on every machine); ``peak_memory_bytes``: the measured peak
    growth during training (CUDA's peak allocation; on Linux CPUs the peak resident set, a process-wide
    lower bound; ``None`` where it cannot be read). ``loss``: training loss per step; ``evals``: ``(step,
    score)`` every ``eval_every`` steps, the last the final score. ``delta[name]`` is ΔW (out × in) of each
    adapted layer (the method's ``get_delta_weight``), or W − W₀ of each ``Linear`` for full fine-tuning.
    ``snapshots``: ``(step, {layer: effective weight})``. ``model`` (and ``tokenizer``) when kept.

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
    task: str = ""
    metric: str = ""
    total: int = 0
    memory_bytes: int = 0
    peak_memory_bytes: Optional[int] = None
    evals: list[tuple[int, float]] = field(default_factory=list, repr=False)
    config: Optional[PeftConfig] = field(default=None, repr=False)
    steps: int = 0
    lr: Optional[float] = None
    batch_size: int = 0
    snapshots: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """``"full FT"``, ``"LoRA r=4"``, or the method's name where it has no rank."""
        name = METHOD_NAMES.get(self.method, self.method)
        return name if self.method == "full" or self.r is None else f"{name} r={self.r}"

    @property
    def fraction(self) -> float:
        """Trainable parameters as a fraction of the base model's parameters."""
        return self.trainable / self.base_params

    def final_loss(self, window: int = 10) -> float:
        """Mean training loss over the last ``window`` steps."""
        tail = self.loss[-window:]
        return sum(tail) / len(tail)

    def steps_to(self, threshold: float, window: int = 10) -> Optional[int]:
        """First step at which the mean loss of the ``window`` steps up to it is below ``threshold`` (or None)."""
        for i in range(window, len(self.loss) + 1):
            if sum(self.loss[i - window:i]) / window < threshold:
                return i
        return None


def _check_method(method: str, r: Optional[int]) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r}; valid methods: {', '.join(map(repr, METHODS))}")
    if method == "lora" and (not isinstance(r, int) or r <= 0):
        raise ValueError(f"method='lora' needs a positive integer rank r, got r={r!r}")


def _count(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def adapted_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, AdapterLayer]:
    """The adapter layers of ``model`` (a PEFT model) holding ``adapter_name``, keyed by the wrapped module's path
    in the base model: the library's own walk (``BaseTuner.adapter_layers``), filtered by adapter.

    Explained in: book/delta_w_gallery.ipynb
    """
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, BaseTuner):
        raise TypeError(f"adapted_layers needs a PEFT model (get_peft_model(model, config)); got "
                        f"{type(model).__name__}")
    return {name: layer for name, layer in tuner.adapter_layers() if adapter_name in layer.adapter_names}


def adapter_deltas(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """ΔW of every adapted layer in ``model`` (LoRA: (α/r)·B A), keyed by the wrapped module's name (detached, CPU).

    Layers whose method has no weight update to read (``get_delta_weight`` raises ``NotImplementedError``) are
    left out.

    Explained in: book/lora.ipynb
    """
    out = {}
    for key, module in adapted_layers(model, adapter_name).items():
        try:
            with torch.no_grad():
                delta = module.get_delta_weight(adapter_name)
        except NotImplementedError:
            continue
        out[key] = delta.detach().float().cpu().clone()
    return out


def _linear_weights(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    return {n: model.get_submodule(n).weight.detach().float().cpu().clone() for n in names}


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


# ============================================================================ one entry point for every method

#: the digits harnesses :func:`finetune` knows besides the lab LM's tasks ("h4:<transform>" for H4)
DIGITS_HARNESSES: tuple[str, ...] = ("h1", "h4")
#: display names of the methods (the papers' spellings), for run labels and every lab table
METHOD_NAMES: dict[str, str] = {"full": "full FT", "lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr",
                                "oft": "OFT", "boft": "BOFT", "ia3": "IA3", "adalora": "AdaLoRA", "xlora": "X-LoRA",
                                "adaption_prompt": "LLaMA-Adapter"}
ModelLoader = Callable[[], tuple[Any, Any]]
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass
class _Task:
    """A parsed task: which harness, the training batches, the metric and its evaluation split."""

    name: str
    kind: str  # "lm", "h1" or "h4"
    metric: str
    transform: Optional[str] = None


def _parse_task(task: str) -> _Task:
    if not isinstance(task, str):
        raise TypeError(f"task must be a string: a lab LM task ({', '.join(tasks.TASK_NAMES)}), 'h1' or "
                        f"'h4:<transform>'; got {type(task).__name__}")
    if task == "h1":
        return _Task(task, "h1", "even-test accuracy")
    if task == "h4" or task.startswith("h4:"):
        transform = task.partition(":")[2]
        if transform not in digits.TASKS:
            raise ValueError(f"task {task!r}: H4 needs a transform, 'h4:<transform>' with one of "
                             f"{', '.join(digits.TASKS)} (e.g. 'h4:rot90')")
        return _Task(task, "h4", "test accuracy", transform)
    if task in tasks.TASKS:
        return _Task(task, "lm", "exact match")
    raise ValueError(f"unknown task {task!r}; valid tasks: the lab LM's {', '.join(tasks.TASK_NAMES)}, "
                     f"the digits harnesses 'h1' and 'h4:<transform>' ({', '.join(digits.TASKS)})")


def _method_name(method: Union[PeftConfig, str]) -> str:
    if isinstance(method, str):
        if method != "full":
            raise ValueError(f"method={method!r}: pass a peftlab config (e.g. LoraConfig(...)) or 'full' for full "
                             "fine-tuning")
        return "full"
    if not isinstance(method, PeftConfig):
        raise TypeError(f"method must be a peftlab config (e.g. LoraConfig(...)) or 'full', got "
                        f"{type(method).__name__}")
    return str(method.peft_type).lower()


def _with_defaults(config: PeftConfig, target: _Task) -> PeftConfig:
    """A copy of ``config`` with the harness's targets where it names none (digits models have no model type)."""
    config = copy.deepcopy(config)
    if target.kind == "h1" and hasattr(config, "target_modules") and config.target_modules is None:
        config.target_modules = list(H1_LAYERS)
    if target.kind == "h4":
        if hasattr(config, "target_modules") and config.target_modules is None:
            config.target_modules = list(H4_LAYERS)
        if hasattr(config, "modules_to_save") and config.modules_to_save is None:
            config.modules_to_save = ["head"]  # the new task's head is trained in full
    return config


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of what training keeps: every parameter, a gradient per trainable one, the optimizer's state."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, Tensor))
    return params + grads + state


class _PeakMemory:
    """Peak memory growth over a block: CUDA's ``max_memory_allocated``; on Linux CPUs the peak resident set
    (``VmHWM``, reset through ``/proc/self/clear_refs``) over the resident set at the start; else ``None``.

    The CPU figure is a process-wide lower bound: memory the allocator had already taken from the system
    and reuses does not show as growth.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes, self._before = device, None, 0
        self._cpu_ok = False

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            gc.collect()
            with open("/proc/self/statm") as f:
                self._before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            self._cpu_ok = True
        except (OSError, ValueError):
            self._cpu_ok = False
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        elif self._cpu_ok:
            with open("/proc/self/status") as f:
                hwm = [line for line in f.read().splitlines() if line.startswith("VmHWM:")]
            self.bytes = max(0, int(hwm[0].split()[1]) * 1024 - self._before) if hwm else None


def _eval_schedule(steps: int, every: int) -> list[int]:
    """The steps at which :func:`peftlab.lab.train.train` calls ``eval_fn`` with ``eval_every=every``."""
    if every <= 0:
        return [steps]
    points = list(range(0, steps, every))
    return points + [steps] if steps > 0 else points


def finetune(
    method: Union[PeftConfig, str],
    task: str,
    *,
    seed: int = 0,
    steps: Optional[int] = None,
    lr: Optional[float] = None,
    batch_size: Optional[int] = None,
    optimizer: Optional[OptimizerFactory] = None,
    eval_every: Optional[int] = None,
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    hidden: Optional[int] = None,
    base: Union[nn.Module, ModelLoader, None] = None,
    device: Union[str, torch.device, None] = None,
    on_backward: Hooks = None,
    on_step: Hooks = None,
    snapshot_every: int = 0,
    snapshot_layers: Optional[Sequence[str]] = None,
    keep_delta: bool = True,
    keep_model: bool = False,
    profile: Union[_profile.Profile, str, None] = None,
) -> Run:
    """Fine-tune with any peftlab method config (or ``"full"``) on a lab task; return the :class:`Run`.

    ``method``: a config (``LoraConfig(...)``, any method's), applied with ``get_peft_model`` under
    ``seeded(seed)``, or ``"full"`` (every parameter trains). ``task``: a lab LM task (``"swap"``, ``"shift"``,
    …: exact match by greedy decoding on ``n_test`` examples drawn with seed 1, training on ``n_train`` drawn
    with seed 0, loss on answer tokens), ``"h1"`` (H1's odd-digit MLP on even digits: even-test accuracy) or
    ``"h4:<transform>"`` (H4's pretrained classifier of width ``hidden`` on one transformed-digit task: test
    accuracy). On a digits harness a config without ``target_modules`` adapts H1's three layers or H4's two
    trunk layers, and H4 trains its head in full (``modules_to_save=["head"]``) unless told otherwise.

    ``base``: the model to fine-tune instead of the harness's pretrained one (digits: a module; lab LM: a
    loader ``() -> (model, tokenizer)``, default the profile's lab LM). Sizes not given come from the
    profile: steps (H1 300 everywhere; H4 300/600; LM 150/400/300), batch 64 (digits) or 32 (LM), n_train
    4000, n_test 100/200. Adam at ``lr`` (3e-3 for an adapter, 1e-3 for full fine-tuning; the gpu profile's
    hub model 5e-4 / 5e-5) unless ``optimizer(model)`` builds one. ``eval_every``: the eval curve's spacing
    (default steps // 5 for digits, 0 for the LM: only the final score); the final point is the score.
    ``on_backward`` / ``on_step``: per-step hooks of :func:`peftlab.lab.train.train`. ``snapshot_every``:
    keep the effective weights of ``snapshot_layers`` (default: the adapted layers' names on digits) every
    so many steps. ``keep_delta``: ΔW per adapted layer (``get_delta_weight``; methods without one are left
    out) or, for full fine-tuning, W − W₀ of every ``Linear``.

    Explained in: book/lab.ipynb
    """
    kind = _parse_task(task)
    name = _method_name(method)
    P = _profile.get(profile.name if isinstance(profile, _profile.Profile) else profile)
    adapter = name != "full"
    if steps is None:
        steps = {"h1": H1_STEPS, "h4": P.pick(smoke=300, cpu=600), "lm": P.pick(smoke=150, cpu=400, gpu=300)}[
            kind.kind]
    if batch_size is None:
        batch_size = 32 if kind.kind == "lm" else H1_BATCH
    if lr is None:
        hub = kind.kind == "lm" and P.name == "gpu" and base is None
        lr = (5e-4 if adapter else 5e-5) if hub else (H1_LORA_LR if adapter else H1_FULL_LR)
    if eval_every is None:
        eval_every = 0 if kind.kind == "lm" else max(1, steps // 5)
    if steps < 0 or eval_every < 0 or snapshot_every < 0:
        raise ValueError(f"steps, eval_every and snapshot_every must be >= 0; got {steps}, {eval_every}, "
                         f"{snapshot_every}")

    # ---- the base model and the data
    tok = None
    if kind.kind == "lm":
        n_train = 4000 if n_train is None else n_train
        n_test = P.pick(smoke=100, cpu=200) if n_test is None else n_test
        if base is None:
            from peftlab.lab import lm  # transformers only when a chapter needs the lab LM

            model, tok = lm.load_lab_model(P, progress=False)
        elif callable(base) and not isinstance(base, nn.Module):
            model, tok = base()
        else:
            raise TypeError("on a lab LM task, base is a loader () -> (model, tokenizer), e.g. "
                            "lambda: lm.load_lab_model('smoke')")
        if device is not None:
            model.to(device)
        train_set = tasks.make_task(task, n_train, seed=0, tokenizer=tok)
        test_set = tasks.make_task(task, n_test, seed=1)
        batches: Any = tasks.loader(train_set, tok, batch_size, seed)
    else:
        data = digits.load()
        if isinstance(base, nn.Module):
            model = base
        elif base is not None:
            model = base()
        elif kind.kind == "h1":
            model = digits.pretrained_mlp()
        else:
            model = digits.pretrained_classifier(H4_HIDDEN if hidden is None else hidden, 0)
        if kind.kind == "h1":
            train_split, test_split = data.even_train, data.even_test
        else:
            train_split = digits.task_split(data.train, kind.transform)  # type: ignore[arg-type]
            test_split = digits.task_split(data.test, kind.transform)  # type: ignore[arg-type]
        batches = digits.batches(train_split, batch_size, seed)
        device = "cpu" if device is None else device  # the digits harnesses train on the CPU unless told
        model.to(device)
    base_params = _count(model)
    before: dict[str, Tensor] = {}
    if not adapter and keep_delta:
        before = _linear_weights(model, _linear_names(model))
    config = None
    if adapter:
        config = _with_defaults(method, kind)  # type: ignore[arg-type]
        with seeded(seed):  # the adapter's random initialisation
            model = get_peft_model(model, config)  # type: ignore[arg-type]

    # ---- evaluation: the metric every eval_every steps, effective-weight snapshots every snapshot_every
    def metric(m: nn.Module) -> float:
        if kind.kind == "lm":
            return float(tasks.exact_match(m, tok, test_set))
        return digits.accuracy(m, test_split)

    if snapshot_layers is None:
        snapshot_layers = H1_LAYERS if kind.kind == "h1" else H4_LAYERS if kind.kind == "h4" else ()
    every = math.gcd(eval_every, snapshot_every)
    schedule = iter(_eval_schedule(steps, every))
    snaps: list[tuple[int, dict[str, Tensor]]] = []

    def evaluate(m: nn.Module) -> dict[str, float]:
        step = next(schedule)
        out = {}
        if step == steps or (eval_every and step % eval_every == 0):
            out["score"] = metric(m)
        if snapshot_every and (step == steps or step % snapshot_every == 0):
            snaps.append((step, {n: effective_weight(lyr) for n, lyr in _layers(m, tuple(snapshot_layers)).items()}))
        return out

    # ---- train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(model) if optimizer is not None else torch.optim.Adam(params, lr=lr)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    with _PeakMemory(dev) as peak:
        hist = train(model, batches, steps=steps, optimizer=opt, seed=seed, device=device, progress=False,
                     eval_fn=evaluate if every else None, eval_every=every,
                     on_backward=on_backward, on_step=on_step)
    evals = [(s, v) for s, v in hist.evals.get("score", [])]
    if not evals or evals[-1][0] != steps:  # no evaluation during training: score the trained model now
        evals.append((steps, metric(model)))
    score = evals[-1][1]

    # ---- what the run learned
    delta: dict[str, Tensor] = {}
    if keep_delta:
        if adapter:
            delta = adapter_deltas(model)
        else:
            after = _linear_weights(model, list(before))
            delta = {n: after[n] - before[n] for n in before}  # ΔW = W − W₀
    if adapter:
        trainable, total = model.get_nb_trainable_parameters()  # type: ignore[operator]
    else:
        trainable, total = _count(model, trainable_only=True), _count(model)
    return Run(name, getattr(config, "r", None), seed, float(score), trainable, base_params, hist.seconds,
               hist.loss, delta, model if keep_model else None, task=task, metric=kind.metric, total=total,
               memory_bytes=_state_bytes(model, opt), peak_memory_bytes=peak.bytes, evals=evals, config=config,
               steps=steps, lr=float(lr) if optimizer is None else None, batch_size=batch_size, snapshots=snaps,
               tokenizer=tok if keep_model else None)


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

    :func:`finetune` on ``"h1"`` with :func:`h1_lora_config` (``method="lora"``) or ``"full"``. The base model
    is the same for every seed (``digits.pretrained_mlp()``, pretraining seed 0); ``seed`` sets the LoRA
    initialisation and the batch order. ``lr`` defaults to 3e-3 for LoRA, 1e-3 for full FT.

    Explained in: book/lora.ipynb
    """
    _check_method(method, r)
    lr = lr if lr is not None else (H1_LORA_LR if method == "lora" else H1_FULL_LR)
    config: Union[PeftConfig, str] = "full"
    if method == "lora":
        config = h1_lora_config(r, lora_alpha)  # type: ignore[arg-type]
    return finetune(config, "h1", seed=seed, steps=steps, lr=lr, batch_size=batch_size, eval_every=0,
                    keep_delta=keep_delta, keep_model=keep_model)


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


def h1_finetune(
    config: Optional[PeftConfig],
    *,
    steps: int = 300,
    lr: float = 3e-3,
    seed: int = 0,
    optimizer: Optional[OptimizerFactory] = None,
    snapshot_every: int = 0,
    snapshot_layers: tuple[str, ...] = H1_LAYERS,
    base: Optional[nn.Module] = None,
) -> Run:
    """Fine-tune H1's odd-digit MLP (or ``base``) on even digits with ``config`` (``None``: full fine-tuning).

    :func:`finetune` on ``"h1"``, keeping the model: Adam at ``lr`` unless ``optimizer(model)`` builds one
    (e.g. LoRA+); batch 64; ``seed`` sets the adapter initialisation and the batch order. Score: even-test
    accuracy. ``snapshot_every``: the effective weights of ``snapshot_layers`` every so many steps.

    Explained in: book/lora_in_practice.ipynb
    """
    return finetune(config if config is not None else "full", "h1", seed=seed, steps=steps, lr=lr,
                    optimizer=optimizer, eval_every=0, snapshot_every=snapshot_every,
                    snapshot_layers=snapshot_layers, base=base, keep_delta=False, keep_model=True)


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

    :func:`finetune` with ``base=load``: ``load()`` returns a fresh ``(model, tokenizer)`` (e.g. ``lambda:
    lm.load_lab_model(P)``). Training uses ``n_train`` examples drawn with seed 0, the score ``n_test`` examples
    drawn with seed 1; ``seed`` sets the LoRA initialisation and the batch order. Adam, lr 3e-3 for LoRA and
    1e-3 for full FT unless given; α = 2r unless given. Loss on answer tokens only.

    Explained in: book/lora.ipynb
    """
    _check_method(method, r)
    tasks.get_task(task)
    config: Union[PeftConfig, str] = "full"
    if method == "lora":
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        config = LoraConfig(r=r, lora_alpha=2 * r if lora_alpha is None else lora_alpha,  # type: ignore[operator]
                            target_modules=targets, task_type=TaskType.CAUSAL_LM)
    lr = lr if lr is not None else (H1_LORA_LR if method == "lora" else H1_FULL_LR)
    return finetune(config, task, seed=seed, steps=steps, lr=lr, batch_size=batch_size, eval_every=0,
                    n_train=n_train, n_test=n_test, base=load, device=device, keep_delta=keep_delta,
                    keep_model=keep_model)


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
