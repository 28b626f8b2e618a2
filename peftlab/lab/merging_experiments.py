"""Experiments of the model-merging chapters, built on :mod:`peftlab.merging` and the lab harnesses.

* TIES step by step (:func:`ties_steps`) and how often trimmed task vectors disagree in sign
  (:func:`sign_conflict_fraction`);
* the digits merging testbed H4: every merge method with λ (and the density) chosen on the
  validation split and reported on the test split (:func:`pick_lambda`, :func:`compare_on_testbed`);
* DARE's drop-rate curves on a full fine-tuning delta and on a LoRA delta of the same task
  (:func:`h4_full_delta`, :func:`h4_lora_delta`, :func:`drop_rate_curve`), and what makes one delta fragile
  (:func:`dare_measures`);
* task adapters on the lab LM, saved as adapter folders, loaded side by side, merged with every
  combination type and scored per task (:func:`train_task_adapters`, :func:`load_adapters`,
  :func:`task_scores`, :func:`merge_grid`).

Explained in: book/ties.ipynb, book/dare.ipynb, book/merging_adapters.ipynb
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

from peftlab import LoraConfig, PeftModel
from peftlab.lab import digits, tasks
from peftlab.lab.finetune import ModelLoader, Run, finetune, lm_run
from peftlab.merging import (COMBINATION_TYPES, calculate_majority_sign_mask, cross_term_error, disjoint_merge,
                             merge_task_vectors, prune, random_pruning)
from peftlab.merging.lora import DENSITY_TYPES
from peftlab.merging.prune import reshape_weight_task_tensors, stack_task_tensors

__all__ = [
    "LAMBDAS",
    "MergeResult",
    "TaskDelta",
    "TiesSteps",
    "compare_on_testbed",
    "dare_measures",
    "drop_rate_curve",
    "h4_full_delta",
    "h4_lora_delta",
    "load_adapters",
    "merge_grid",
    "merged_name",
    "pick_lambda",
    "results_table",
    "sign_conflict_fraction",
    "task_scores",
    "ties_steps",
    "train_task_adapters",
]

#: the λ grid every method searches on the validation split: 0.1, 0.2, …, 2.0
LAMBDAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 21))


# ============================================================================ TIES, step by step


@dataclass
class TiesSteps:
    """The three steps of TIES on stacked task tensors (T, …), each kept for a picture.

    ``trimmed``: top-k magnitudes of each task (trim); ``elected``: the sign γ per entry, ±1 (elect);
    ``agree``: which trimmed entries are non-zero and carry γ; ``merged``: their weighted mean (merge).

    Explained in: book/ties.ipynb
    """

    task_tensors: Tensor
    trimmed: Tensor
    elected: Tensor
    agree: Tensor
    merged: Tensor


def ties_steps(task_tensors: Union[Sequence[Tensor], Tensor], density: float,
               majority_sign_method: Literal["total", "frequency"] = "total",
               weights: Optional[Sequence[float]] = None) -> TiesSteps:
    """Run TIES with the library's steps and keep every intermediate (``merged`` equals :func:`peftlab.merging.ties`).

    Explained in: book/ties.ipynb
    """
    stacked = stack_task_tensors(task_tensors)
    w = torch.ones(stacked.shape[0], dtype=stacked.dtype) if weights is None else torch.tensor(
        [float(x) for x in weights], dtype=stacked.dtype)
    trimmed = torch.stack([prune(t, density, method="magnitude") for t in stacked])  # 1. trim, per task
    agree = calculate_majority_sign_mask(trimmed, method=majority_sign_method)  # 2. elect (unweighted)
    # γ is the sign the agreeing entries carry; where nothing agrees the library elects +1
    elected = torch.where((trimmed * agree).sum(dim=0) < 0, -1, 1).to(stacked.dtype)
    merged = disjoint_merge(trimmed * reshape_weight_task_tensors(trimmed, w), agree)  # 3. disjoint mean
    return TiesSteps(stacked, trimmed, elected, agree, merged)


def sign_conflict_fraction(task_tensors: Union[Sequence[Tensor], Tensor]) -> float:
    """Fraction of entries where some task tensor is > 0 and another < 0 (zeros never conflict).

    Explained in: book/ties.ipynb
    """
    stacked = stack_task_tensors(task_tensors)
    conflict = (stacked > 0).any(dim=0) & (stacked < 0).any(dim=0)
    return float(conflict.float().mean())


# ============================================================================ the merging testbed (H4)


@dataclass
class MergeResult:
    """One merge on the testbed: method, density, the λ chosen on validation, normalised accuracy (val, test).

    ``per_task`` holds the test accuracy of each task (its own head on the merged trunk).

    Explained in: book/ties.ipynb
    """

    method: str
    density: Optional[float]
    lam: float
    val: float
    test: float
    per_task: dict[str, float] = field(default_factory=dict)


StateDict = dict[str, Tensor]


def pick_lambda(tb: digits.Testbed, delta: Mapping[str, Tensor], lambdas: Sequence[float] = LAMBDAS,
                method: str = "", density: Optional[float] = None) -> MergeResult:
    """θ = θ_pre + λ·δ for every λ in ``lambdas``; keep the best on validation, report it on test.

    Ties on validation go to the smaller λ.

    Explained in: book/ties.ipynb
    """
    if not lambdas:
        raise ValueError("lambdas is empty; pass the grid of λ to search, e.g. LAMBDAS")
    scores = [(tb.normalised(tb.apply(delta, lam), "val"), -lam, lam) for lam in lambdas]
    val, _, lam = max(scores)
    state = tb.apply(delta, lam)
    return MergeResult(method, density, lam, val, tb.normalised(state, "test"), tb.evaluate(state, "test"))


def _best(results: Sequence[MergeResult]) -> MergeResult:
    return max(results, key=lambda r: (r.val, -(r.density or 0.0)))


def compare_on_testbed(tb: digits.Testbed, ties_densities: Sequence[float] = (0.1, 0.2, 0.3),
                       dare_densities: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 0.7),
                       lambdas: Sequence[float] = LAMBDAS, seed: int = 0, frequency: bool = True) -> list[MergeResult]:
    """Zero-shot, averaging, task arithmetic, TIES and DARE + TIES on one testbed.

    Averaging is θ_pre + (1/T) Σ τ_t (nothing to choose). Task arithmetic chooses λ; TIES and DARE + TIES
    choose the density and λ together, all on validation. "TIES" trims the top-k of the whole task vector
    (the paper's reference code), "TIES per tensor" each weight matrix on its own (peft, layer by layer),
    "TIES, frequency" elects the sign by count instead of mass (if ``frequency``). DARE's masks come from ``seed``.

    Explained in: book/ties.ipynb
    """
    tvs = [tb.task_vectors[t] for t in tb.tasks]
    T = len(tvs)
    zero = {k: torch.zeros_like(v) for k, v in tvs[0].items()}
    out = [pick_lambda(tb, zero, [1.0], "zero-shot")]
    out.append(pick_lambda(tb, merge_task_vectors(tvs, [1.0 / T] * T), [1.0], "averaging"))
    out.append(pick_lambda(tb, merge_task_vectors(tvs), lambdas, "task arithmetic"))
    for label, scope in (("TIES", "model"), ("TIES per tensor", "tensor")):
        out.append(_best([pick_lambda(tb, merge_task_vectors(tvs, method="ties", density=k, scope=scope), lambdas,
                                      label, k) for k in ties_densities]))
    if frequency:
        out.append(_best([pick_lambda(tb, merge_task_vectors(tvs, method="ties", density=k, scope="model",
                                                             majority_sign_method="frequency"), lambdas,
                                      "TIES, frequency", k) for k in ties_densities]))
    out.append(_best([pick_lambda(tb, merge_task_vectors(tvs, method="dare_ties", density=k, seed=seed), lambdas,
                                  "DARE + TIES", k) for k in dare_densities]))
    return out


def results_table(results: Sequence[MergeResult], seed: Optional[int] = None) -> Any:
    """One row per merge: method, density, λ, normalised accuracy on val and test (%), per-task test accuracy (%).

    Returns a ``pandas.DataFrame``.

    Explained in: book/ties.ipynb
    """
    import pandas as pd

    rows = []
    for r in results:
        row = {"method": r.method, "density": r.density, "λ": r.lam, "val %": 100 * r.val, "test %": 100 * r.test}
        if seed is not None:
            row = {"seed": seed, **row}
        row.update({f"{t} %": 100 * a for t, a in r.per_task.items()})
        rows.append(row)
    return pd.DataFrame(rows)


# ============================================================================ DARE: drop-rate curves


@dataclass
class TaskDelta:
    """A fine-tuned H4 model as pretrained trunk + trunk delta, with its own (fine-tuned) head.

    ``delta`` maps trunk parameter names (``l1.weight`` …) to θ_ft − θ_pre (full fine-tuning) or to
    s·B·A (LoRA; no bias change). :meth:`accuracy` scores θ_pre + δ on the task's test digits.

    Explained in: book/dare.ipynb
    """

    task: str
    hidden: int
    theta_pre: StateDict
    delta: StateDict
    head: StateDict
    label: str = ""

    def accuracy(self, delta: Optional[Mapping[str, Tensor]] = None) -> float:
        """Test accuracy (all 540 test digits, transformed) with trunk θ_pre + ``delta`` (default: the whole delta)."""
        delta = self.delta if delta is None else delta
        model = digits.Classifier(self.hidden)
        model.trunk.load_state_dict({k: v + delta[k] if k in delta else v for k, v in self.theta_pre.items()})
        model.head.load_state_dict(self.head)
        return digits.accuracy(model, digits.task_split(digits.load().test, self.task))


def h4_full_delta(task: str = "rot90", hidden: int = 1024, steps: int = 600, lr: float = 1e-4,
                  seed: int = 0) -> TaskDelta:
    """Full fine-tuning of H4's pretrained trunk + head on one task with Adam at a small learning rate (cached).

    Explained in: book/dare.ipynb
    """
    pre = digits.pretrained_classifier(hidden, seed)
    ft_model = digits.finetune_task(task, hidden, seed, steps=steps, lr=lr, optimizer="adam")
    theta_pre = {k: v.detach().clone() for k, v in pre.trunk.state_dict().items()}
    delta = {k: (v - theta_pre[k]).detach().clone() for k, v in ft_model.trunk.state_dict().items()}
    head = {k: v.detach().clone() for k, v in ft_model.head.state_dict().items()}
    return TaskDelta(task, hidden, theta_pre, delta, head, "full fine-tuning")


def h4_lora_delta(task: str = "rot90", hidden: int = 1024, r: int = 16, steps: int = 600, lr: float = 1e-3,
                  seed: int = 0) -> TaskDelta:
    """LoRA (r, α = 2r) on H4's two trunk layers, the head trained in full (``modules_to_save``), Adam
    (:func:`peftlab.lab.finetune.finetune` on ``"h4:<task>"`` from the classifier pretrained with ``seed``).

    The delta is ΔW = (α/r)·B A of each trunk layer; biases do not change.

    Explained in: book/dare.ipynb
    """
    base = digits.pretrained_classifier(hidden, seed)
    theta_pre = {k: v.detach().clone() for k, v in base.trunk.state_dict().items()}
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["trunk.l1", "trunk.l2"], modules_to_save=["head"])
    run = finetune(config, f"h4:{task}", seed=seed, steps=steps, lr=lr, batch_size=64, eval_every=0, base=base,
                   keep_model=True)
    model = run.model
    delta = {k: torch.zeros_like(v) for k, v in theta_pre.items()}
    for name, dW in run.delta.items():  # {"trunk.l1": ΔW, "trunk.l2": ΔW}
        delta[name.removeprefix("trunk.") + ".weight"] = dW
    head_module = model.base_model.model.head.modules_to_save["default"]
    head = {k: v.detach().clone() for k, v in head_module.state_dict().items()}
    return TaskDelta(task, hidden, theta_pre, delta, head, f"LoRA r={r}")


def drop_rate_curve(delta: Mapping[str, Tensor], evaluate: Callable[[dict[str, Tensor]], float],
                    drop_rates: Sequence[float], n_masks: int = 3, rescale: bool = True,
                    seed: int = 0) -> dict[float, list[float]]:
    """Score DARE's δ̂ = m ⊙ δ / (1 − p) (or, without ``rescale``, m ⊙ δ: "DropOnly") at each drop rate p.

    Each p gets ``n_masks`` masks m ~ Bernoulli(1 − p) per tensor, from generators seeded by (seed, mask);
    p = 0 is the undropped delta (one score). Returns p → list of scores.

    Explained in: book/dare.ipynb
    """
    out: dict[float, list[float]] = {}
    for p in drop_rates:
        if not 0 <= p < 1:
            raise ValueError(f"drop rate p={p} must be in [0, 1): the fraction of delta entries dropped")
        if p == 0:
            out[p] = [evaluate(dict(delta))]
            continue
        scores = []
        for m in range(n_masks):
            g = torch.Generator().manual_seed(1_000 * seed + m)
            scores.append(evaluate({k: random_pruning(v, 1 - p, rescale=rescale, generator=g)
                                    for k, v in delta.items()}))
        out[p] = scores
    return out


def dare_measures(td: TaskDelta, p: float = 0.9, seed: int = 0) -> dict[str, dict[str, float]]:
    """Why DARE at drop rate ``p`` hurts one delta more than another: for every matrix δ of ``td.delta`` (with W its
    pretrained weight), its size and spread, and the noise one DARE mask adds, n = DARE_p(δ) − δ.

    Per layer: ‖δ‖_F/‖W‖_F, mean |δ_ij|, the stable rank ‖δ‖²_F/σ₁(δ)², σ₁(δ)/σ₁(W), the spectral norm of the noise
    ‖n‖₂/‖W‖₂, and ‖n‖²_F/‖δ‖²_F (which DARE's variance puts at p/(1 − p) in expectation). The mask comes from a
    generator seeded with ``seed``.

    Explained in: book/dare.ipynb
    """
    if not 0 < p < 1:
        raise ValueError(f"drop rate p={p} must be in (0, 1): the fraction of delta entries DARE drops")
    two = lambda M: float(torch.linalg.matrix_norm(M, 2))  # spectral norm σ₁  # noqa: E731
    rows = {}
    for layer, d in td.delta.items():
        if d.dim() != 2:
            continue  # biases: no spectrum
        W = td.theta_pre[layer]
        s = torch.linalg.svdvals(d)
        noise = random_pruning(d, 1 - p, rescale=True, generator=torch.Generator().manual_seed(seed)) - d
        rows[layer] = {
            "‖δ‖_F / ‖W‖_F": float(d.norm() / W.norm()),
            "mean |δ_ij|": float(d.abs().mean()),
            "stable rank": float(s.square().sum() / s[0] ** 2),
            "σ₁(δ) / σ₁(W)": float(s[0]) / two(W),
            f"‖noise‖₂ / ‖W‖₂ at p={p}": two(noise) / two(W),
            "‖noise‖²_F / ‖δ‖²_F": float(noise.square().sum() / d.square().sum()),
        }
    return rows


# ============================================================================ task adapters on the lab LM


def train_task_adapters(load: ModelLoader, task_names: Sequence[str], folder: Union[str, os.PathLike],
                        r: int = 8, target_modules: Union[Sequence[str], str] = "all-linear", steps: int = 300,
                        seeds: Union[int, Sequence[int]] = 0, adapter_names: Optional[Sequence[str]] = None,
                        **kw: Any) -> dict[str, Run]:
    """Train one LoRA adapter per task with :func:`peftlab.lab.finetune.lm_run` and save each as an adapter
    folder ``folder/<adapter name>`` (peft format). Returns adapter name → run (score = exact match).

    ``seeds`` (one for all, or one per task) sets each adapter's random A and batch order, as independently
    trained adapters would have.

    Explained in: book/merging_adapters.ipynb
    """
    names = list(adapter_names) if adapter_names is not None else list(task_names)
    if len(names) != len(task_names):
        raise ValueError(f"got {len(task_names)} tasks and {len(names)} adapter names")
    seed_list = [seeds] * len(names) if isinstance(seeds, int) else list(seeds)
    if len(seed_list) != len(names):
        raise ValueError(f"got {len(task_names)} tasks and {len(seed_list)} seeds")
    runs = {}
    for task, name, seed in zip(task_names, names, seed_list):
        run = lm_run(load, "lora", task, r=r, target_modules=target_modules, seed=seed, steps=steps,
                        keep_model=True, **kw)
        run.model.save_pretrained(os.path.join(folder, name))
        run.model = None  # the folder holds it now
        runs[name] = run
    return runs


def load_adapters(load: ModelLoader, folders: Mapping[str, Union[str, os.PathLike]]) -> tuple[PeftModel, Any]:
    """A fresh base model with every adapter folder loaded under its name (the first one active), as the notes
    do with ``PeftModel.from_pretrained`` and ``load_adapter``.

    Explained in: book/merging_adapters.ipynb
    """
    items = list(folders.items())
    if not items:
        raise ValueError("no adapter folders to load")
    base, tok = load()
    model = PeftModel.from_pretrained(base, items[0][1], adapter_name=items[0][0])
    for name, path in items[1:]:
        model.load_adapter(path, adapter_name=name)
    model.eval()
    return model, tok


def task_scores(model: PeftModel, tokenizer: Any, tests: Mapping[str, Any],
                adapter: Optional[str] = None) -> dict[str, dict[str, float]]:
    """Exact match and token accuracy on each task's test set with ``adapter`` active (None: the base model).

    Explained in: book/merging_adapters.ipynb
    """
    def score() -> dict[str, dict[str, float]]:
        return {t: {"exact match": float(tasks.exact_match(model, tokenizer, ds)),
                    "token accuracy": tasks.token_accuracy(model, tokenizer, ds)} for t, ds in tests.items()}

    if adapter is None:
        with model.disable_adapter():
            return score()
    model.set_adapter(adapter)
    return score()


def merged_name(combination_type: str, density: Optional[float]) -> str:
    """An adapter name for a merge, e.g. ``ties_d20`` (adapter names cannot contain dots).

    Explained in: book/merging_adapters.ipynb
    """
    return combination_type if density is None else f"{combination_type}_d{round(100 * density)}"


def merge_grid(model: PeftModel, tokenizer: Any, adapters: Sequence[str], weights: Sequence[float],
               tests: Mapping[str, Any], types: Sequence[str] = COMBINATION_TYPES,
               densities: Sequence[float] = (0.2, 0.5), seed: int = 0, keep: bool = False) -> Any:
    """Merge ``adapters`` with every combination type (types that trim: at every density) and score each task.

    One row per (type, density, task), named by :func:`merged_name`: exact match and token accuracy (%), and
    the merge's mean relative
    distance from the exact Σ wᵢ ΔWᵢ over layers (:func:`peftlab.merging.cross_term_error`). DARE masks are
    seeded with ``seed``. Merged adapters are deleted afterwards unless ``keep``. Returns a ``pandas.DataFrame``.

    Explained in: book/merging_adapters.ipynb
    """
    import pandas as pd

    rows = []
    active = model.active_adapter
    for ct in types:
        for density in (densities if ct in DENSITY_TYPES else [None]):
            name = merged_name(ct, density)
            model.add_weighted_adapter(list(adapters), list(weights), name, combination_type=ct, density=density,
                                       seed=seed)
            errors = cross_term_error(model.base_model, list(adapters), list(weights), ct, density=density, seed=seed)
            error = sum(errors.values()) / len(errors)
            for task, s in task_scores(model, tokenizer, tests, name).items():
                rows.append({"merge": name, "type": ct, "density": density, "task": task,
                             "exact match %": 100 * s["exact match"], "token accuracy %": 100 * s["token accuracy"],
                             "distance from Σ wΔW": error})
            if not keep:
                model.set_adapter(active)
                model.delete_adapter(name)
    model.set_adapter(active)
    return pd.DataFrame(rows)
