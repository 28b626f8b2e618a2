"""Every method on the same lab task: configs at a matched budget and at defaults, one table, a decision guide.

:func:`method_config` builds each method's config on a lab task, either at the library's own defaults
(``setting="default"``) or with the one size knob the method has (``knob``); :func:`match_budget` picks, for
each method, the knob whose trainable-parameter count on the actual base model lands nearest a budget.
:func:`compare` trains every (method, setting, seed) with :func:`peftlab.lab.finetune.finetune` and times each
optimizer step; :func:`table` turns the runs into one DataFrame (score mean and spread, parameters, step
time, memory, time to a target score, and the flags ``merges`` / ``mixed batches`` read from the method
registry). :func:`check_merge`, :func:`check_mixed_batch` and :func:`check_interchange` test those flags
against what a trained model does; the Pareto plots are :func:`peftlab.viz.pareto`. :func:`rank_agreement` sets the lab's ranking beside PEFT's GPU method
comparison (:data:`PEFT_METAMATHQA`); :func:`decision_guide` derives recommendations from the table.

Explained in: book/choosing_a_method.ipynb
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from peftlab import (AdaLoraConfig, AdaptionPromptConfig, BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig,
                     OFTConfig, TaskType, get_peft_model)
from peftlab.config import PeftConfig
from peftlab.lab import finetune as ft
from peftlab.lab.merge_checks import logits, unload_outputs
from peftlab.registry import get_method
from peftlab.tuners.matching import _matches
from peftlab.tuners.orthogonal import divisors
from peftlab.tuners.routing import BASE_ADAPTER

__all__ = [
    "LABELS",
    "LM_ONLY",
    "LM_TARGETS",
    "METHODS",
    "PEFT_METAMATHQA",
    "PEFT_NOISE",
    "PEFT_TO_LAB",
    "Entry",
    "check_interchange",
    "check_merge",
    "check_mixed_batch",
    "compare",
    "count_trainable",
    "decision_guide",
    "knobs",
    "add_checks",
    "check_flags",
    "match_budget",
    "plan",
    "points",
    "show",
    "method_config",
    "spearman",
    "rank_agreement",
    "table",
]

#: every method of the book that fits one task from scratch, plus full fine-tuning ("full")
METHODS: tuple[str, ...] = ("full", "lora", "dora", "loha", "lokr", "oft", "boft", "ia3", "adalora",
                            "adaption_prompt")
#: display names: the lab's one table (:data:`peftlab.lab.finetune.METHOD_NAMES`)
LABELS: dict[str, str] = ft.METHOD_NAMES
#: methods that only apply to the lab language model (LLaMA-Adapter needs Llama's attention blocks)
LM_ONLY: frozenset[str] = frozenset({"adaption_prompt"})
#: the modules every weight-based method adapts on a language model at the matched budget (W_q, W_v)
LM_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")

#: PEFT's method comparison on a GPU (huggingface/peft, method_comparison/MetaMathQA, results of 2026-07, the
#: newest snapshot that has the run): Llama-3.2-3B fine-tuned on MetaMathQA, GSM8K test accuracy (%), trainable
#: parameters, peak GPU memory (GiB) and training time (s) on an L40S; each method at its default recipe
#: (LR 1e-4 unless named). LoKr's default (r 32, LR 1e-4) is from the 2026-01 snapshot, its only run.
PEFT_METAMATHQA: dict[str, dict[str, Any]] = {
    "full": {"experiment": "full-finetuning (LR 1e-5)", "gsm8k %": 47.2, "params": 3_212_749_824,
             "memory GiB": 36.2, "seconds": 2147},
    "lora": {"experiment": "lora r32", "gsm8k %": 47.8, "params": 9_175_040, "memory GiB": 20.8, "seconds": 942},
    "dora": {"experiment": "lora r32 DoRA", "gsm8k %": 46.9, "params": 9_289_728, "memory GiB": 22.8,
             "seconds": 1191},
    "loha": {"experiment": "loha r32", "gsm8k %": 39.3, "params": 18_350_080, "memory GiB": 22.3, "seconds": 1397},
    "lokr": {"experiment": "lokr r32 (2026-01)", "gsm8k %": 38.0, "params": 279_552, "memory GiB": 22.0,
             "seconds": 1318},
    "oft": {"experiment": "oft r32 (32 blocks)", "gsm8k %": 49.1, "params": 8_171_520, "memory GiB": 20.8,
            "seconds": 1192},
    "boft": {"experiment": "boft default", "gsm8k %": 34.3, "params": 802_816, "memory GiB": 23.0,
             "seconds": 6926},
    "ia3": {"experiment": "ia3 default", "gsm8k %": 31.1, "params": 286_720, "memory GiB": 21.6, "seconds": 987},
    "adalora": {"experiment": "adalora 64 → 32", "gsm8k %": 37.3, "params": 18_353_664, "memory GiB": 21.2,
                "seconds": 1169},
    "adaption_prompt": {"experiment": "adaptionprompt (LR 5e-4)", "gsm8k %": 21.2, "params": 8_601_628,
                        "memory GiB": 20.9, "seconds": 1178},
}
PEFT_TO_LAB = {k: LABELS[k] for k in PEFT_METAMATHQA}
#: PEFT scores closer than this many points count as tied when the lab's ranking is set beside PEFT's (one run
#: per method there; PEFT's reruns of identical configs drift by up to 2.8 points)
PEFT_NOISE: float = 3.0


# ============================================================================ configs


def _is_lm(task: str) -> bool:
    return ft._parse_task(task).kind == "lm"


def _in_features(base: nn.Module, targets: Sequence[str]) -> list[int]:
    return [m.in_features for n, m in base.named_modules() if isinstance(m, nn.Linear) and _matches(targets, n)]


def _targets(task: str) -> list[str]:
    return list(LM_TARGETS) if _is_lm(task) else list(ft.H1_LAYERS if task == "h1" else ft.H4_LAYERS)


def method_config(method: str, task: str, knob: Optional[Mapping[str, Any]] = None, *, steps: int = 100,
                  base: Optional[nn.Module] = None) -> Union[PeftConfig, str]:
    """The config of ``method`` on ``task``: the library's defaults (``knob=None``) or the size ``knob`` gives.

    Defaults are the config class's own (LoRA r = 8, α = 8; OFT block 32; BOFT block 4, one factor; …) with the
    lab's targets (``W_q, W_v`` on the LM, the harness's layers on digits; IA3 on the LM: ``k_proj, v_proj``
    and the feed-forward ``down_proj``, peft's default for Llama). Fields the library has no default for get
    the paper's values: AdaLoRA's schedule (``total_step=steps``), LLaMA-Adapter's K = 10 prompts in every
    block. A default OFT block that does not divide a layer becomes the largest divisor below it. With a
    ``knob`` (from :func:`knobs`) the method is sized: LoRA-family α = 2r (scaling 2, the lab's convention).
    ``"full"`` is full fine-tuning.

    Explained in: book/choosing_a_method.ipynb
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; valid methods: {', '.join(METHODS)}")
    lm = _is_lm(task)
    if method in LM_ONLY and not lm:
        raise ValueError(f"{LABELS[method]} adapts Llama attention blocks: use it on a lab LM task, not {task!r}")
    if method == "full":
        return "full"
    tt = {"task_type": TaskType.CAUSAL_LM} if lm else {}
    T = _targets(task)
    k = dict(knob or {})
    if method in ("lora", "dora"):
        extra = {"r": k["r"], "lora_alpha": 2 * k["r"]} if k else {}
        return LoraConfig(target_modules=T, use_dora=method == "dora", **extra, **tt)
    if method == "loha":
        return LoHaConfig(target_modules=T, **({"r": k["r"], "alpha": 2 * k["r"]} if k else {}), **tt)
    if method == "lokr":
        return LoKrConfig(target_modules=T, **({"r": k["r"], "alpha": 2 * k["r"],
                                                "decompose_factor": k["decompose_factor"]} if k else {}), **tt)
    if method == "oft":
        size = k.get("oft_block_size", OFTConfig().oft_block_size)
        if not k and base is not None:  # a default block that does not divide every layer: the largest that does
            ins = _in_features(base, T)
            size = max(d for d in divisors(math.gcd(*ins)) if d <= size) if ins else size
        return OFTConfig(target_modules=T, oft_block_size=size, **tt)
    if method == "boft":
        return BOFTConfig(target_modules=T, **k, **tt)
    if method == "ia3":
        if lm and not k:
            return IA3Config(**tt)  # the library's default targets for Llama
        return IA3Config(target_modules=T, feedforward_modules=[], **tt)
    if method == "adalora":
        init_r = k.get("init_r", 0)
        sized = {"init_r": init_r, "target_r": max(1, (2 * init_r) // 3), "lora_alpha": 2 * init_r} if k else {}
        return AdaLoraConfig(target_modules=T, **sized, tinit=steps // 10, tfinal=steps // 5, total_step=steps,
                             **tt)
    # adaption_prompt: K prompts in the top L blocks
    n_blocks = base.config.num_hidden_layers if base is not None and hasattr(base, "config") else 2
    return AdaptionPromptConfig(adapter_len=k.get("adapter_len", 10), adapter_layers=k.get("adapter_layers", n_blocks),
                                **tt)


def knobs(method: str, base: nn.Module, task: str) -> list[dict[str, Any]]:
    """The sizes :func:`match_budget` tries for ``method`` on ``base`` (empty: the method has no size knob).

    LoRA, DoRA, LoHa: rank r; AdaLoRA: initial rank (final rank ⅔ of it); LoKr: rank and ``decompose_factor``;
    OFT: every block size dividing the adapted layers; BOFT: block size × butterfly factors; LLaMA-Adapter:
    prompt length × blocks. IA3 and full fine-tuning have no size knob.

    Explained in: book/choosing_a_method.ipynb
    """
    ranks = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    if method in ("lora", "dora", "loha"):
        return [{"r": r} for r in ranks]
    if method == "adalora":
        return [{"init_r": r} for r in ranks if r >= 2]
    if method == "lokr":
        return [{"r": r, "decompose_factor": f} for r in ranks for f in (-1, 2, 4, 8, 16)]
    ins = _in_features(base, _targets(task))
    common = divisors(math.gcd(*ins)) if ins else []
    if method == "oft":
        return [{"oft_block_size": b} for b in common if b >= 2]
    if method == "boft":
        out = []
        for b in common:
            for m in range(1, 5):
                if b >= 2 and all((n // b) % (2 ** (m - 1)) == 0 and 2 ** (m - 1) <= n // b for n in ins):
                    out.append({"boft_block_size": b, "boft_n_butterfly_factor": m})
        return out
    if method == "adaption_prompt":
        n_blocks = base.config.num_hidden_layers
        return [{"adapter_len": n, "adapter_layers": L} for n in (1, 2, 4, 8, 10, 16, 32, 64)
                for L in range(1, n_blocks + 1)]
    return []


def count_trainable(config: Union[PeftConfig, str], base: nn.Module, task: str) -> int:
    """Trainable parameters of ``config`` on ``base`` (as :func:`finetune` would build it): every parameter of
    ``base`` for full fine-tuning (``"full"``), else those of the adapter, built on a copy of ``base``.

    Explained in: book/choosing_a_method.ipynb
    """
    if isinstance(config, str):
        return sum(p.numel() for p in base.parameters())
    config = ft._with_defaults(config, ft._parse_task(task))
    return int(get_peft_model(copy.deepcopy(base), config).get_nb_trainable_parameters()[0])  # type: ignore[operator]


def match_budget(method: str, budget: int, base: nn.Module, task: str, *, steps: int = 100
                 ) -> tuple[Union[PeftConfig, str], dict[str, Any], int]:
    """The config of ``method`` whose trainable count on ``base`` is nearest ``budget`` (in log ratio).

    Returns ``(config, knob, count)``; a method without a size knob (IA3, full FT) returns its default and its
    own count, and ``knob == {}``. Sizes the library refuses on this model are skipped.

    Explained in: book/choosing_a_method.ipynb
    """
    if budget <= 0:
        raise ValueError(f"budget must be a positive number of parameters, got {budget}")
    best: Optional[tuple[float, Union[PeftConfig, str], dict[str, Any], int]] = None
    candidates = knobs(method, base, task)
    for knob in candidates or [None]:
        try:
            config = method_config(method, task, knob, steps=steps, base=base)
            n = count_trainable(config, base, task)
        except ValueError:
            continue  # a size this model cannot take (e.g. a block larger than the layer)
        gap = abs(math.log(n / budget))
        if best is None or gap < best[0]:
            best = (gap, config, dict(knob or {}), n)
    if best is None:
        raise ValueError(f"no size of {method} fits {task!r}'s model; tried {candidates}")
    return best[1], best[2], best[3]


def plan(task: str, base: nn.Module, budget: int, *, steps: int, methods: Sequence[str] = METHODS,
         settings: Sequence[str] = ("matched", "default")) -> tuple[dict, dict, Any]:
    """Every method's config on ``task``: at the matched ``budget`` and at its defaults; full fine-tuning once.

    Methods that do not apply to the task (LLaMA-Adapter on digits) are left out. Returns ``(configs, knobs,
    counts)``: ``configs[(method, setting)]`` for :func:`compare`, the knob each matched config used, and a
    DataFrame of the sizes and trainable counts.

    Explained in: book/choosing_a_method.ipynb
    """
    import pandas as pd

    configs: dict[tuple[str, str], Union[PeftConfig, str]] = {}
    used: dict[tuple[str, str], dict[str, Any]] = {}
    rows = []
    for method in methods:
        if method in LM_ONLY and not _is_lm(task):
            continue
        for setting in (("default",) if method == "full" else settings):
            if setting == "matched":
                config, knob, n = match_budget(method, budget, base, task, steps=steps)
            else:
                config, knob = method_config(method, task, None, steps=steps, base=base), {}
                n = count_trainable(config, base, task)
            configs[(method, setting)], used[(method, setting)] = config, knob
            rows.append({"method": LABELS[method], "setting": setting, "size": _knob_text(method, knob, config),
                         "trainable": n, "× budget": n / budget})
    return configs, used, pd.DataFrame(rows)


# ============================================================================ runs


@dataclass
class Entry:
    """One training run of the comparison: which method and setting, its :class:`~peftlab.lab.finetune.Run`,
    the median seconds per optimizer step, the knob that sized it.

    Explained in: book/choosing_a_method.ipynb
    """

    method: str
    setting: str
    run: ft.Run
    step_seconds: float
    knob: dict[str, Any] = field(default_factory=dict)


def compare(configs: Mapping[tuple[str, str], Union[PeftConfig, str]], task: str, *, steps: int,
            seeds: Sequence[int] = (0,), eval_every: Optional[int] = None, knobs_used: Optional[Mapping] = None,
            keep_model: Callable[[str, str, int], bool] = lambda m, s, seed: False,
            lrs: Optional[Mapping[str, float]] = None, **finetune_kwargs: Any) -> list[Entry]:
    """Train every ``configs[(method, setting)]`` on ``task`` for every seed with :func:`finetune`.

    Each run records its eval curve (``eval_every``, default steps // 5) for the time to a target score, and the
    wall time of every optimizer step (an ``on_step`` hook); ``step_seconds`` is their median, so the steps
    that ran an evaluation do not count. Full fine-tuning uses the lab's full-FT learning rate, adapters the
    adapter one (the lab's defaults) unless ``lrs[method]`` names one; ``finetune_kwargs`` pass through
    (``base``, ``n_test``, ``device``, …).

    Explained in: book/choosing_a_method.ipynb
    """
    out = []
    for (method, setting), config in configs.items():
        for seed in seeds:
            stamps: list[float] = []

            def tick(step: int, model: nn.Module, loss: Tensor, opt: Any) -> None:
                stamps.append(time.perf_counter())

            every = eval_every if eval_every is not None else max(1, steps // 5)
            t0 = time.perf_counter()
            stamps.append(t0)
            lr = (lrs or {}).get(method)
            run = ft.finetune(config, task, seed=seed, steps=steps, eval_every=every, on_step=tick, lr=lr,
                              keep_delta=False, keep_model=keep_model(method, setting, seed), **finetune_kwargs)
            diffs = [b - a for a, b in zip(stamps, stamps[1:])][1:]  # the first includes setup and step-0 eval
            step_s = statistics.median(diffs) if diffs else run.seconds / max(1, run.steps)
            out.append(Entry(method, setting, run, step_s, dict((knobs_used or {}).get((method, setting), {}))))
    return out


def _time_to(run: ft.Run, target: float, step_seconds: float) -> float:
    for step, score in run.evals:
        if score >= target:
            return step * step_seconds
    return math.nan


def _knob_text(method: str, knob: Mapping[str, Any], config: Any) -> str:
    if method == "full":
        return "every weight"
    names = {"r": "r", "init_r": "r₀", "decompose_factor": "f", "oft_block_size": "b", "boft_block_size": "b",
             "boft_n_butterfly_factor": "m", "adapter_len": "K", "adapter_layers": "L"}
    if not knob and config is not None:
        fields = {"lora": ("r",), "dora": ("r",), "loha": ("r",), "lokr": ("r", "decompose_factor"),
                  "oft": ("oft_block_size",), "boft": ("boft_block_size", "boft_n_butterfly_factor"),
                  "adalora": ("init_r",), "adaption_prompt": ("adapter_len", "adapter_layers")}.get(method, ())
        knob = {f: getattr(config, f) for f in fields}
    if not knob:
        return "no size knob"
    # LoKr's decompose_factor −1 (its default) means "chosen for you": each size split near its square root
    return ", ".join(f"{names.get(k, k)}={'auto' if k == 'decompose_factor' and v == -1 else v}"
                     for k, v in knob.items())


def table(entries: Sequence[Entry], target: Optional[float] = None) -> Any:
    """One row per (method, setting): score mean and spread over seeds (%), trainable parameters, median step
    time (ms), training-state memory and measured peak (KiB), time to ``target`` (s), and the registry's flags.

    ``target`` (a score fraction) defaults to 90 % of full fine-tuning's mean score. ``merges`` and ``mixed
    batches`` come from the method registry (``get_method(config).supports_merge`` / ``supports_mixed_batch``);
    they are empty for full fine-tuning, which has no adapter. Time to target: the first evaluated step at or
    above ``target`` times the median step time (evaluations excluded), averaged over the seeds whose curve
    reached it (NaN if none did; ``reached`` counts them).

    Explained in: book/choosing_a_method.ipynb
    """
    import pandas as pd

    if not entries:
        raise ValueError("table needs at least one Entry (run compare first)")
    if target is None:
        full = [e.run.score for e in entries if e.method == "full"]
        if not full:
            raise ValueError("no full fine-tuning run to set the target from; pass target=")
        target = 0.9 * sum(full) / len(full)
    groups: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.method, e.setting), []).append(e)
    rows = []
    for (method, setting), es in groups.items():
        scores = [100 * e.run.score for e in es]
        times = [_time_to(e.run, target, e.step_seconds) for e in es]
        reached = [t for t in times if not math.isnan(t)]
        spec = get_method(es[0].run.config) if es[0].run.config is not None else None
        peaks = [e.run.peak_memory_bytes for e in es if e.run.peak_memory_bytes is not None]
        rows.append({
            "method": LABELS[method], "setting": setting, "size": _knob_text(method, es[0].knob, es[0].run.config),
            "score % (mean)": statistics.fmean(scores),
            "score % (spread)": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "seeds": len(es), "trainable": es[0].run.trainable,
            "trainable %": 100 * es[0].run.fraction,
            "step ms": 1000 * statistics.median(e.step_seconds for e in es),
            "state KiB": es[0].run.memory_bytes / 1024,
            "peak KiB": max(peaks) / 1024 if peaks else math.nan,
            "time to target s": statistics.fmean(reached) if reached else math.nan,
            "reached": len(reached),
            "merges": pd.NA if spec is None else spec.supports_merge,
            "mixed batches": pd.NA if spec is None else spec.supports_mixed_batch,
            "key": method,
        })
    df = pd.DataFrame(rows)
    for col in ("merges", "mixed batches"):
        df[col] = df[col].astype("boolean")
    df.attrs["target %"] = 100 * target
    return df


def show(df: Any) -> Any:
    """The table for the page: the bookkeeping column dropped, numbers rounded, empty cells as "—".

    Explained in: book/choosing_a_method.ipynb
    """
    view = df.drop(columns=["key"]).set_index(["method", "setting"])
    fmt = {"score % (mean)": "{:.1f}", "score % (spread)": "{:.1f}", "trainable": "{:,}", "trainable %": "{:.2f}",
           "step ms": "{:.2f}", "state KiB": "{:.0f}", "peak KiB": "{:.0f}", "time to target s": "{:.2f}"}
    return view.style.format({k: v for k, v in fmt.items() if k in view.columns}, na_rep="—")


def points(df: Any, cost: str = "trainable", setting: Optional[str] = None) -> tuple[dict, dict]:
    """``({label: (cost, mean score)}, {label: spread})`` of the rows (of one ``setting``), for :func:`peftlab.viz.pareto`.

    Explained in: book/choosing_a_method.ipynb
    """
    rows = df if setting is None else df[(df.setting == setting) | (df.key == "full")]
    label = [m if setting is not None else f"{m} ({s})" for m, s in zip(rows["method"], rows["setting"])]
    pts = {k: (float(c), float(v)) for k, c, v in zip(label, rows[cost], rows["score % (mean)"])}
    spread = {k: float(v) for k, v in zip(label, rows["score % (spread)"])}
    return pts, spread


# ============================================================================ the flags, checked on models


def check_merge(model: nn.Module, inputs: Tensor, atol: float = 1e-4) -> bool:
    """True when ``merge_and_unload`` works on a copy of ``model`` and gives the adapted model's outputs
    (:func:`peftlab.lab.merge_checks.unload_outputs`).

    A method without a weight form raises (the library refuses); that reads as ``False``.

    Explained in: book/choosing_a_method.ipynb
    """
    try:
        want, got = unload_outputs(model, inputs)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return bool(torch.allclose(got, want, atol=atol))


@torch.no_grad()
def check_mixed_batch(model: nn.Module, inputs: Tensor, atol: float = 1e-5) -> bool:
    """True when ``model(inputs, adapter_names=[...])`` serves alternate rows with the adapter and the base model,
    each row equal to running it alone. A refusal by the library reads as ``False``.

    Explained in: book/choosing_a_method.ipynb
    """
    model.eval()
    names = [("default" if i % 2 == 0 else BASE_ADAPTER) for i in range(inputs.shape[0])]
    try:
        mixed = logits(model(inputs, adapter_names=names))
    except (ValueError, NotImplementedError, TypeError):
        return False
    adapted = logits(model(inputs))
    with model.disable_adapter():
        plain = logits(model(inputs))
    want = torch.stack([adapted[i] if n == "default" else plain[i] for i, n in enumerate(names)])
    return bool(torch.allclose(mixed, want, atol=atol))


@torch.no_grad()
def check_interchange(model: nn.Module, fresh_base: Callable[[], nn.Module], inputs: Tensor,
                      load: Optional[Callable[[nn.Module, str], nn.Module]], atol: float = 1e-4) -> Optional[bool]:
    """Save ``model``'s adapter, load the folder with ``load(fresh_base(), folder)`` and compare outputs.

    Pass ``peft.PeftModel.from_pretrained`` as ``load`` to check that peft reads peftlab's file (peftlab itself
    never imports peft); ``None`` when ``load`` is ``None`` (peft is not installed). Any error while loading
    reads as ``False``; the loader's warnings are silenced.

    Explained in: book/choosing_a_method.ipynb
    """
    if load is None:
        return None
    model.eval()
    want = logits(model(inputs))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        try:
            with warnings.catch_warnings():  # the loader's own notices (e.g. peft's missing CUDA extension)
                warnings.simplefilter("ignore")
                other = load(fresh_base(), folder)
                other.eval()
                got = logits(other(inputs))
        except Exception:  # noqa: BLE001 - any failure to load or run is a "does not interchange"
            return False
    return bool(got.shape == want.shape and torch.allclose(got.float(), want.float(), atol=atol))


def check_flags(entries: Sequence[Entry], inputs: Tensor, fresh_base: Callable[[], nn.Module],
                load: Optional[Callable[[nn.Module, str], nn.Module]] = None) -> Any:
    """For every kept model in ``entries`` (full fine-tuning aside): does it merge, serve a mixed batch, and load
    with ``load`` (e.g. ``peft.PeftModel.from_pretrained``)? One row per (method, setting), a DataFrame.

    Explained in: book/choosing_a_method.ipynb
    """
    import pandas as pd

    rows, seen = [], set()
    for e in entries:
        if e.method == "full" or e.run.model is None or (e.method, e.setting) in seen:
            continue
        seen.add((e.method, e.setting))
        rows.append({"key": e.method, "setting": e.setting, "merge works": check_merge(e.run.model, inputs),
                     "mixed batch works": check_mixed_batch(e.run.model, inputs),
                     "peft files": check_interchange(e.run.model, fresh_base, inputs, load)})
    out = pd.DataFrame(rows)
    out["peft files"] = out["peft files"].astype("boolean")
    return out


def add_checks(df: Any, checks: Any) -> Any:
    """``df`` (from :func:`table`) with the ``peft files`` column of ``checks`` (from :func:`check_flags`).

    Explained in: book/choosing_a_method.ipynb
    """
    out = df.merge(checks[["key", "setting", "peft files"]], on=["key", "setting"], how="left")
    out["peft files"] = out["peft files"].astype("boolean")
    out.attrs.update(df.attrs)
    cols = [c for c in out.columns if c != "key"] + ["key"]
    return out[cols]


# ============================================================================ reading the table


def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (1 = smallest), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks (ties share their mean rank);
    NaN when either side is constant. The lab's one rank correlation (scipy is not a dependency of peftlab).

    Explained in: book/choosing_a_method.ipynb
    """
    x, y = [float(v) for v in x], [float(v) for v in y]  # any sequence (a pandas Series too), read in order
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of equal length >= 2, got {len(x)} and {len(y)}")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else math.nan


def rank_agreement(df: Any, setting: str = "default", noise: float = PEFT_NOISE) -> tuple[Any, float]:
    """The lab's scores beside PEFT's GSM8K numbers, per method, with both rankings and their Spearman ρ.

    Uses the rows of ``df`` (from :func:`table`) in ``setting`` whose method PEFT also ran. ``agrees`` marks a
    method whose rank differs by at most one place, or whose PEFT score is within ``noise`` points of the
    neighbours it swaps with (:data:`PEFT_NOISE` by default).

    Explained in: book/choosing_a_method.ipynb
    """
    import pandas as pd

    rows = df[(df.setting == setting) & df.key.isin(list(PEFT_METAMATHQA))]
    out = pd.DataFrame({"method": rows["method"].values, "lab score %": rows["score % (mean)"].values,
                        "PEFT GSM8K %": [PEFT_METAMATHQA[k]["gsm8k %"] for k in rows.key],
                        "PEFT trainable": [PEFT_METAMATHQA[k]["params"] for k in rows.key]})
    n = len(out)
    out["lab rank"] = [n + 1 - r for r in _ranks(list(out["lab score %"]))]
    out["PEFT rank"] = [n + 1 - r for r in _ranks(list(out["PEFT GSM8K %"]))]
    rho = spearman(list(out["lab score %"]), list(out["PEFT GSM8K %"]))
    peft_scores = list(out["PEFT GSM8K %"])
    agrees = []
    for i in range(n):
        if abs(out["lab rank"][i] - out["PEFT rank"][i]) <= 1:
            agrees.append(True)
            continue
        # the methods PEFT puts between this one's two ranks: all within the noise of it?
        lo, hi = sorted((out["lab rank"][i], out["PEFT rank"][i]))
        between = [peft_scores[j] for j in range(n) if lo <= out["PEFT rank"][j] <= hi and j != i]
        agrees.append(all(abs(s - peft_scores[i]) <= noise for s in between))
    out["agrees"] = agrees
    return out.sort_values("PEFT rank").reset_index(drop=True), rho


def decision_guide(df: Any, noise: Optional[float] = None) -> Any:
    """Recommendations read off a :func:`table`: for each need, the method(s) that meet it best in the rows.

    A score counts as "as good as the best" within ``noise`` points (default: twice the median spread over
    seeds of the rows, at least 1 point). Needs: best score; fewest parameters among those as good as the
    best; fastest step among those as good as the best; to merge into the base weights; to serve mixed
    batches; the smallest adapter that still reaches the target. Returns a DataFrame (need, pick, why).

    Explained in: book/choosing_a_method.ipynb
    """
    import pandas as pd

    ad = df[df.key != "full"]
    if noise is None:
        noise = max(1.0, 2 * float(df["score % (spread)"].median()))
    best = float(ad["score % (mean)"].max())
    good = ad[ad["score % (mean)"] >= best - noise]

    def name(row: Any) -> str:
        return f"{row['method']} ({row['size']}, {row['setting']})"

    rows = []
    top = ad.loc[ad["score % (mean)"].idxmax()]
    rows.append({"need": "the best score with an adapter", "pick": name(top),
                 "why": f"{top['score % (mean)']:.1f} % (full FT: {float(df[df.key == 'full']['score % (mean)'].max()):.1f} %)"
                 if (df.key == "full").any() else f"{top['score % (mean)']:.1f} %"})
    small = good.loc[good["trainable"].idxmin()]
    rows.append({"need": "the fewest parameters at the best score", "pick": name(small),
                 "why": f"{int(small['trainable']):,} trainable, {small['score % (mean)']:.1f} % "
                        f"(within {noise:.1f} points of the best)"})
    fast = good.loc[good["step ms"].idxmin()]
    rows.append({"need": "the fastest training step at the best score", "pick": name(fast),
                 "why": f"{fast['step ms']:.2f} ms per step, {fast['score % (mean)']:.1f} %"})
    for col, need in (("merges", "no extra latency at inference (merge into W)"),
                      ("mixed batches", "serving many adapters in one batch")):
        ok = ad[ad[col].fillna(False).astype(bool)]
        not_ok = sorted(set(ad[~ad[col].fillna(False).astype(bool)]["method"]))
        if len(ok):
            pick = ok.loc[ok["score % (mean)"].idxmax()]
            why = f"best score among methods that can; cannot: {', '.join(not_ok) or 'none'}"
            rows.append({"need": need, "pick": name(pick), "why": why})
    reach = ad[ad["reached"] > 0]
    if len(reach):
        cheap = reach.loc[reach["trainable"].idxmin()]
        rows.append({"need": f"the smallest adapter reaching {df.attrs.get('target %', float('nan')):.0f} %",
                     "pick": name(cheap), "why": f"{int(cheap['trainable']):,} trainable parameters"})
    return pd.DataFrame(rows)
