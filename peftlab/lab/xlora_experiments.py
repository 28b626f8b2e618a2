"""Experiments of the X-LoRA chapter on the lab LM: where the gate sends each task's prompts, the paper's
Figure 2 redrawn from a run, the scalings token by token during generation, and what a forward costs.

* :func:`answer_scalings`: per example, the gate's scalings averaged over the positions that predict answer
  tokens (the positions before the task word cannot know the task);
* :func:`draw_figure2`: for one example of each task, the scalings as a heatmap (rows: the tokens, or the
  layers) and the bar chart of the scalings summed over the layers;
* :func:`generation_scalings`: the mix that chose each new token of a greedy answer (the scalings log);
* :func:`percent_exact_match`, :func:`timing_batch`, :func:`forward_seconds`: the scores and timings of the
  chapter's comparison tables.

Explained in: book/xlora.ipynb
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from peftlab.lab import tasks, timing

__all__ = ["answer_scalings", "draw_figure2", "forward_seconds", "generation_scalings", "percent_exact_match",
           "timing_batch"]

_COLUMNS = ("input_ids", "attention_mask", "labels")


def answer_scalings(model: Any, tokenizer: Any, dataset: Any) -> Tensor:
    """The gate's scalings of each example, averaged over the positions that predict answer tokens:
    (examples, layers, experts), float32 on the CPU. Position t predicts token t + 1, so a position counts
    when the label of the next token is not ignored (-100). One forward of the whole (padded) dataset.

    Explained in: book/xlora.ipynb
    """
    batch = tasks.Collator(tokenizer)(list(dataset.select_columns(list(_COLUMNS))))
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    lam = model.get_latest_scalings().float().cpu()  # (batch, seq, layers, experts)
    predicts = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts[:, :-1] = batch["labels"][:, 1:] != -100
    w = predicts[..., None, None].to(lam.dtype)
    return (lam * w).sum(1) / w.sum(1)


def draw_figure2(model: Any, tokenizer: Any, examples: Mapping[str, Any], per_example: Mapping[str, Tensor],
                 experts: Sequence[str], rows: Literal["tokens", "layers"] = "tokens") -> Any:
    """The paper's Figure 2 from a run: for one example of each task (``examples``: task → example with
    ``input_ids``, ``prompt``, ``answer``), the scalings as a heatmap (rows: each token read, averaged over the
    layers; or each LoRA layer, averaged over the answer positions) over the ``experts``, and under it the
    bars of ``per_example[task][0]`` (that example's answer-position scalings, :func:`answer_scalings`)
    summed over the layers. Returns the figure.

    Explained in: book/xlora.ipynb
    """
    import matplotlib.pyplot as plt

    from peftlab import viz

    if rows not in ("tokens", "layers"):
        raise ValueError(f"rows={rows!r}: 'tokens' (one row per token read) or 'layers' (one per LoRA layer)")
    n = len(examples)
    fig, axes = plt.subplots(2, n, figsize=(10 * n / 3, 6.4), gridspec_kw={"height_ratios": [2.4, 1]},
                             squeeze=False)
    device = next(model.parameters()).device
    for k, (task, ex) in enumerate(examples.items()):
        if rows == "tokens":
            ids = torch.tensor([ex["input_ids"]], device=device)
            with torch.no_grad():
                model(input_ids=ids)
            grid = model.get_latest_scalings()[0].float().cpu().mean(1)  # (tokens, experts)
            labels, ylabel = tokenizer.convert_ids_to_tokens(ex["input_ids"]), "token (the one read)"
        else:
            grid = per_example[task][0]  # (layers, experts)
            labels, ylabel = [str(i) for i in range(grid.shape[0])], "LoRA layer"
        ax = axes[0, k]
        viz.heatmap(grid, ax=ax, signed=False, vmax=1.0, colorbar=(k == n - 1), annotate=True, fmt="{:.1f}",
                    xlabel="expert", ylabel=ylabel if k == 0 else "", colorbar_label="scaling λ")
        ax.set_title(f"{ex['prompt']} {ex['answer']}", fontsize=9)
        ax.set_aspect("auto")
        ax.set_xticks(range(len(experts)), list(experts))
        ax.set_yticks(range(grid.shape[0]), labels, fontsize=7)
        viz.bars(dict(zip(experts, per_example[task][0].sum(0).tolist())), ax=axes[1, k],
                 ylabel="Σ over layers" if k == 0 else "")
    return fig


def generation_scalings(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> tuple[str, Tensor]:
    """The greedy answer to ``prompt`` and the scalings that chose each of its tokens: (steps, layers,
    experts), the last position of every forward ``generate`` ran, read from the scalings log (cleared
    before and after; logging is off afterwards).

    Explained in: book/xlora.ipynb
    """
    model.clear_scalings_log()
    model.enable_scalings_logging()
    try:
        answer = tasks.greedy_generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens)[0]
    finally:
        model.disable_scalings_logging()
    log = model.get_scalings_log()
    model.clear_scalings_log()
    return answer, torch.stack([s[0, -1].float().cpu() for s in log])


def percent_exact_match(model: Any, tokenizer: Any, tests: Mapping[str, Any]) -> dict[str, float]:
    """Exact match in % on each task's test set (``tests``: task → dataset).

    Explained in: book/xlora.ipynb
    """
    return {t: 100 * float(tasks.exact_match(model, tokenizer, ds)) for t, ds in tests.items()}


def timing_batch(tokenizer: Any, tests: Mapping[str, Any], per_task: int) -> dict[str, Tensor]:
    """One padded batch of the first ``per_task`` prompts-with-answers of every task's test set.

    Explained in: book/xlora.ipynb
    """
    rows = [row for ds in tests.values()
            for row in ds.select(range(min(per_task, len(ds)))).select_columns(["input_ids", "attention_mask"])]
    return tasks.Collator(tokenizer)(rows)


def forward_seconds(model: Any, batch: Mapping[str, Tensor], repeats: int) -> float:
    """Median seconds of one forward of ``model`` on ``batch`` without gradients (one warm-up run first).

    Explained in: book/xlora.ipynb
    """
    with torch.no_grad():
        return timing.median_latency({"forward": lambda: model(**batch)}, repeats=repeats, inner=1,
                                     warmup=1)["forward"]
