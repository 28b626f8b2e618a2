"""Write the book's appendix page book/benchmarks.md from the saved results (no benchmark runs here).

    .venv/bin/python benchmarks/report.py [benchmarks/results/latest.json]

The page shows the table of the last saved run with its date and machine; ``make bench`` runs the
benchmarks and then this script. The plot is copied to book/_static/benchmarks.png.

Explained in: book/benchmarks.md
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "book" / "benchmarks.md"
IMAGE = ROOT / "book" / "_static" / "benchmarks.png"

#: scenarios whose results carry no "about" text of their own (the step, inference and file scenarios of every
#: method do: benchmarks/run.py's METHODS)
SCENARIO_TEXT = {
    "lora_step": "LoRA training step (forward, backward, AdamW): Llama hidden 256, 4 layers, batch 8 × seq 128, "
                 "r = 16 on q, k, v, o. *limit*: the same model frozen, forward + backward to the activations only",
    "dora_step": "DoRA training step, same model and targets",
    "inference": "Forward pass (inference mode), same model, batch 8 × seq 128: adapter unmerged, merged, and the "
                 "base model alone",
    "serving": "One decode step (sequence 1, KV cache of 64 tokens) for 16 requests, each with its own one of 16 "
               "adapters (`adapter_names=`), against the base model's decode step",
    "merging": "`add_weighted_adapter(..., combination_type='ties', density=0.5)` over three adapters; "
               "`save_pretrained` and `load_adapter` of one adapter",
    "memory": "Peak memory of three training steps over the loaded model (CPU: peak RSS growth in a fresh process; "
              "CUDA: `max_memory_allocated`): LoRA against full fine-tuning",
    "lab_scale": "The book's scale: Llama hidden 128, 3 layers, batch 32 × seq 20, LoRA r = 8 on every linear "
                 "layer, against peft, full fine-tuning and the frozen-model limit. Between peftlab's step and the "
                 "limit lie the rank-r products (skinny matrix products run far below peak on one CPU thread) and "
                 "AdamW over 42 small tensors, which peft pays as well",
    "adaption_prompt_decode": "One decode step (sequence 1, KV cache of 64 tokens) for 16 requests with one "
                              "LLaMA-Adapter, against the base model's decode step",
    "xlora": "An X-LoRA forward (scaling pass and real pass over three LoRA experts, r = 16 on q, k, v, o) against "
             "one plain LoRA forward, and against peft's X-LoRA with the same experts and gate weights",
}

#: what a method's training step does beyond the frozen model's forward and backward (shown under a missed target;
#: the numbers stay in the run's tables)
STEP_WORK = {
    "oft": "Beyond the frozen layer's two products (forward, and ∂x, taken with the rotated weight), each adapted "
           "layer rotates the weight (W Rᵀ, out·in·b: 8 blocks of 32 here; once forward, once again backward) and "
           "runs one batched product over the tokens, x_iᵀ ∂x_i (tokens·in·b), from which ∂R_i = (x_iᵀ ∂x_i) R_i⁻ᵀ "
           "is a 32 × 32 product per block; R⁻¹ of the five-term series, which is not exactly orthogonal, takes a "
           "few Newton–Schulz steps on the blocks (where the series is far from orthogonal the backward runs a "
           "second token product instead): together about a sixth of one (tokens × 256 × 256) product per layer, "
           "some 2 % of the limit's multiply-adds. The blocks R_i of all 16 layers come from their packed "
           "parameters through peft's default five-term Cayley–Neumann series in one autograd node per step "
           "(`BatchedRotation`: Paterson–Stockmeyer, two (128, 32, 32) products forward and three back, among some "
           "twenty small operations), and their inverses in one Newton–Schulz run; layer by layer (`SkewRotation`, "
           "`batch_rotations = False`) the same work took 16 times the calls. What remains is a cost that does not "
           "shrink with the batch: two node calls and the layer's own Python per layer. peft does the same products "
           "in another order (it rotates the tokens in the forward and lets autograd record every step), so the "
           "two steps differ by a few percent of the limit, the size of a shared machine's noise.",
    "boft": "As OFT, with blocks of 8. peftlab runs BOFT's token products on pairs of blocks joined into 16-wide "
            "block-diagonal ones (one CPU thread multiplies 8-wide blocks several times slower per useful flop "
            "than 16-wide ones, zeros included), and since the exact Cayley map gives an orthogonal R, the backward "
            "takes G = ∂x R: ∂x is the frozen layer's own product with the rotated, scaled weight, and only "
            "∂R_i = (x_iᵀ ∂x_i) R_i runs over the tokens. The output scale s sits in the same autograd node: it "
            "scales the rotated weight's columns (out·in, not the (tokens, out) output), and ∂s = Σ_t g ⊙ h / s is "
            "read off the output in one pass backward, so no unscaled copy of the output is kept. The 32 small "
            "inverses per layer (R = 2(I + Q)⁻¹ − I) run for all 16 layers in one batched node per step, as OFT's "
            "series does; the per-layer fixed cost remains. peft builds the dense "
            "($d_\\text{in} \\times d_\\text{in}$) rotation with permutation matrices at every step and lets "
            "autograd record it. With two factors R is still "
            "block-diagonal, with blocks of 16 (factor i permutes only inside groups of b·2^i inputs): peftlab forms "
            "those blocks from the factors (one butterfly pass over 16 rows) and runs the same node, where the "
            "factor-by-factor path gathered and multiplied the activations once per factor each way.",
    "ia3": "(IA)³ adds little to the limit: a scaled copy of each adapted weight (12 of them here) and a sum over the "
           "tokens per learned vector, ∂l = Σ_t (activation ⊙ gradient), which no product the frozen model runs "
           "can absorb: each step reads the k and v outputs (8 of tokens × 256) and down_proj's inputs (4 of "
           "tokens × 1024) once more, with their gradients (about 48 MB at this batch, a millisecond or two on "
           "one core). The target asks for less than the limit whenever peft's own step costs under 1/0.97 ≈ "
           "1.03× the limit.",
    "dora": "DoRA adds to LoRA's rank-r products the (tokens, out) rescaling by m/n and its gradient Σ_t g ⊙ z, and "
            "forms W·(m/n) again in each backward.",
    "adalora": "AdaLoRA adds the rank-12 products of each adapted layer (formed as W + sP(ΛQ) once, reused in the "
               "backward), the orthogonality penalty (a small Gram matrix per P and Q), and `update_and_allocate` "
               "after every step (scores over all P, Λ, Q with a handful of fused `torch._foreach` operations, a sort "
               "of all triplet scores and the mask). The target asks for less than the limit whenever peft's own step "
               "costs under 1/0.9 ≈ 1.11× the limit.",
}

#: the per-method table: (column, scenario suffix, ratio)
METHOD_COLUMNS = [
    ("step / peft", "_step", "peftlab/peft"), ("step / limit", "_step", "peftlab/limit"),
    ("peft step / limit", "_step", "peft/limit"), ("unmerged / base", "_inference", "peftlab unmerged/base"),
    ("merged / base", "_inference", "peftlab merged/base"), ("mixed / unmerged", "_inference", "peftlab mixed/unmerged"),
    ("save / peft", "_io", "save peftlab/peft"), ("load / peft", "_io", "load peftlab/peft"),
]
#: LoRA's inference and files are measured by the scenarios it had first
LORA_ALIASES = {("lora", "_inference", "peftlab unmerged/base"): ("inference", "peftlab unmerged/base"),
                ("lora", "_inference", "peftlab merged/base"): ("inference", "peftlab merged/base"),
                ("lora", "_io", "save peftlab/peft"): ("merging", "save peftlab/peft"),
                ("lora", "_io", "load peftlab/peft"): ("merging", "load peftlab/peft")}


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Appendix: benchmarks against peft",
        "",
        "peftlab and the `peft` package run the same models on the same inputs in one process. Each scenario "
        "runs its candidates interleaved (A B C, B C A, …) so that all of them see the same machine load; a "
        "ratio is the median over the repetitions of the per-round ratio (lower is faster for peftlab). "
        "This page shows the last saved run, not a live one: `make bench` runs "
        "`benchmarks/run.py` and rewrites it.",
        "",
        f"**Run of {m['date']}** on {m.get('gpu', m['cpu'])} ({m['device']}, {m['cores']} cores, "
        f"{m['torch_threads']} torch thread(s), OMP_NUM_THREADS={m['OMP_NUM_THREADS']}), torch {m['torch']}, "
        f"peft {m.get('peft', '?')}, transformers {m.get('transformers', '?')}, dtype {results['dtype']}, "
        f"{results['reps']} repetitions per scenario. Load average at start {m['load_avg_start'][0]:.2f}, at end "
        f"{m.get('load_avg_end', [float('nan')])[0]:.2f} (the machine was shared, so single timings are noisy; "
        f"the interquartile range of each ratio is shown, and the ratio of the two candidates' fastest times, "
        f"the best case each reached).",
        "",
        "## Targets",
        "",
        "Each method's issue set a target for its training step against peft's (and the LoRA family some more); "
        "they live in `TARGETS` in `benchmarks/run.py`.",
        "",
        "A training-step target is also shown against two references measured in the same run. The *limit* is "
        "the frozen model's forward and backward down to the embedding: target × peft/limit. The *floor* is "
        "lower: the frozen model's forward, and a backward that stops at the outputs of the first block's q, k "
        "and v projections, which is as far as an adapter on those layers needs it (the limit's three products "
        "for ∂x under them go). Every method here adapts those layers or layers after them, so none can train "
        "faster than the floor: below 1 in the *target / floor* column, no implementation can meet the target "
        "in that run. The LoRA, OFT and BOFT steps, the book's scale and the serving step also time a *bound*: "
        "the floor (for serving, the base model's decode step) plus the products the method cannot skip and its "
        "optimizer step, timed alone on stand-in tensors; a missed target is set beside it below. The OFT and "
        "BOFT steps also run *stripped*: the same model with each adapted layer cut down to one autograd node "
        "that runs only those products and none of the checks a library needs (an instrument, not a layer).",
        "",
        "| scenario | ratio | measured | target | target / limit | target / floor | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in results.get("targets", []):
        ratios = results["scenarios"][t["scenario"]]["ratios"]
        r = ratios[t["ratio"]]
        iqr = f" ({r['q1']:.2f}–{r['q3']:.2f})" if "q1" in r else ""
        limit = (f"{t['target'] * ratios['peft/limit']['median']:.2f}"
                 if t["ratio"] == "peftlab/peft" and "peft/limit" in ratios else "")
        floor = target_over_floor(t, ratios)
        lines.append(f"| {t['scenario']} | {t['ratio']} | {t['value']:.3f}{iqr} | ≤ {t['target']} | {limit} | "
                     f"{'' if floor is None else f'{floor:.2f}'} | {'yes' if t['met'] else '**no**'} |")
    lines += ["", "```{image} _static/benchmarks.png", ":alt: time ratios against their targets", "```", ""]
    lines += pinned_table(results)
    lines += method_table(results)
    lines += bound_section(results)
    lines += missed_steps(results)
    lines += ["## All measurements", ""]
    targets = {(t["scenario"], t["ratio"]): t["target"] for t in results.get("targets", [])}
    for name, res in results["scenarios"].items():
        lines += [f"### {name}", "", res.get("about") or SCENARIO_TEXT.get(name, ""), ""]
        if "median_ms" in res:
            lines += ["| candidate | median time (ms) |", "| --- | --- |"]
            lines += [f"| {k} | {v:.2f} |" for k, v in res["median_ms"].items()]
            lines.append("")
        if "peak_MiB" in res:
            lines += ["| candidate | peak memory over the model (MiB) |", "| --- | --- |"]
            lines += [f"| {k} | {v:.1f} |" for k, v in res["peak_MiB"].items()]
            lines.append("")
        lines += ["| ratio | median | quartiles | fastest / fastest | target |", "| --- | --- | --- | --- | --- |"]
        for k, r in res["ratios"].items():
            q = f"{r['q1']:.3f}–{r['q3']:.3f}" if "q1" in r else "—"
            fastest = f"{r['of_min']:.3f}" if "of_min" in r else "—"
            tgt = f"≤ {targets[name, k]}" if (name, k) in targets else ""
            lines.append(f"| {k} | {r['median']:.3f} | {q} | {fastest} | {tgt} |")
        lines.append("")
    lines += [
        "## What makes peftlab fast here",
        "",
        "- **Training** (`LoraLinearFunction` in `peftlab/tuners/lora/layer.py`): a LoRA linear layer that trains is "
        "one autograd node for $h = W_0x + b + s\\,BAx$ instead of the seven or so that separate `linear`, "
        "`addmm` and `reshape` calls record, and its rank-$r$ products run as $(r, T)$ matrices "
        "($A x^\\top$, $B^\\top g^\\top$), the orientation in which the CPU BLAS kernels are 2–4× faster for "
        "$r \\ll$ in, out. The other methods that train a linear layer do the same: LoHa and LoKr "
        "(`peftlab/tuners/lycoris.py`) form $W_0 + \\Delta W$ once and run one product, OFT and BOFT "
        "(`RotatedLinear` in `peftlab/tuners/orthogonal.py`) rotate the weight ($W R^\\top$, out·in·b) "
        "instead of every token, run blocks narrower than 16 in joined pairs, take "
        "$\\partial L/\\partial(xR) = (\\partial x) R^{-\\top}$ to spare a product over the tokens ($R^{-\\top} = R$ "
        "when $R$ is orthogonal, a few Newton–Schulz steps on the blocks for the truncated series), build every "
        "layer's blocks in one node per step (`BatchedRotation`; BOFT with several factors forms R's diagonal "
        "blocks and takes the same node), AdaLoRA (`SVDLinearFunction`) forms $W + sP(\\Lambda Q)$ once and "
        "reuses it in the backward, and its allocator updates every score with a handful of fused `torch._foreach` calls.",
        "- **Mixed-adapter serving** (`Linear.mixed_batch_forward`): the adapters' $A$ and $B$ are stacked once "
        "and then *are* their storage (each adapter's weight a view of its slot, one copy in memory), so an "
        "in-place update (an optimizer step, a load) changes the stack itself and a decode step checks nothing "
        "per tensor; a weight replaced in its module, or moved with `.to`, drops the stacks. Each row reads its "
        "own slot, and two batched products (`bmm`, `baddbmm`, the scaling folded in) replace peft's loop over "
        "adapters with its index lists. Unequal ranks, active dropout, DoRA or `lora_bias` fall back to the "
        "per-adapter loop.",
        "- **DoRA** (`peftlab/tuners/lora/dora.py`): the norm $\\lVert W + sBA\\rVert$ from a low-rank identity "
        "instead of materialising $BA$, and one fused forward/backward.",
        "",
        "`tests/test_fast_paths.py` checks that each fast path computes what the plain one computes, and that the "
        "fused nodes behave as autograd's operators do where a user leans on them: an in-place activation after "
        "an adapted layer (`ReLU(inplace=True)`) works (each node returns a fresh tensor, not a view of one it "
        "made, and a node that reads its own output notices the change and recomputes), second derivatives "
        "(`create_graph=True`) come from the node's plain formula, and under `torch.func` transforms (per-sample "
        "gradients) or forward-mode AD the layers take their generic path.",
        "",
    ]
    return "\n".join(lines)


#: what each scenario's *bound* adds to the floor (benchmarks/run.py: lora_products, rotation_products,
#: serving_products, optimiser_step_on)
_LORA_BOUND = ("the four rank-r products per adapted layer that no LoRA step can skip (A x and g B over the tokens, "
               "then ∂A and ∂B), plus AdamW's step on the adapter's tensors")
BOUND_WORK = {
    "lora_step": _LORA_BOUND,
    "lab_scale": _LORA_BOUND,
    "oft_step": "the rotated weight W Rᵀ and the blocks' gradient Σ xᵢᵀ Gᵢ over the tokens per adapted layer, G = g W "
                "where the floor computes no ∂x (block 0's q, k and v), plus AdamW's step on the adapter's tensors "
                "(the rotation's construction from its parameters left out)",
    "boft_step": "the rotated weight W Rᵀ, the blocks' gradient Σ xᵢᵀ Gᵢ over the tokens and the pass for "
                 "∂s (Σ_t g ⊙ h) per adapted layer, G = g W where the floor computes no ∂x (block 0's q, k and v), "
                 "plus AdamW's step on the adapter's tensors (the rotation's construction from its parameters left "
                 "out)",
    "serving": "two batched products per adapted layer over the 16 requests' stacked A and s·B (each request's "
               "adapter read from memory), on top of the base model's decode step",
}
#: the candidate a target's ratio divides by
DENOMINATOR = {"peftlab/peft": "peft", "peftlab/limit": "limit", "peftlab/base": "base"}


def bound_room(t: dict, res: dict) -> dict | None:
    """For a target on a scenario with a *bound*: the bound as a multiple of the target's denominator (the median
    of the per-round ratios, as every ratio here), the milliseconds the target leaves above the bound, and what
    peftlab spends above it; None where the scenario has no bound or the target is of another kind."""
    den = DENOMINATOR.get(t["ratio"])
    ratios, ms = res.get("ratios", {}), res.get("median_ms", {})
    if den is None or f"bound/{den}" not in ratios or "peftlab/bound" not in ratios:
        return None
    over = ratios[f"bound/{den}"]["median"]
    return {"bound_over": over, "room": (t["target"] - over) * ms[den],
            "peftlab": (ratios["peftlab/bound"]["median"] - 1) * ms["bound"], "den": den}


def bound_section(results: dict) -> list[str]:
    """Under every missed target whose scenario measured a bound: how close the best possible implementation
    comes, and how much the target leaves it for everything beyond the unavoidable products."""
    out = []
    for t in results.get("targets", []):
        res = results["scenarios"][t["scenario"]]
        room = None if t["met"] else bound_room(t, res)
        if room is None:
            continue
        if not out:
            out = ["## The missed targets against the bound", "",
                   "Some scenarios also time a *bound*: the floor (or, for serving, the base model's decode step) "
                   "plus the work that the method's gradients or outputs cannot do without, run alone on stand-in "
                   "tensors of the step's shapes, in the same interleaved run. The stand-ins share one input per "
                   "width, so they find the cache warmer than a real step does: the bound errs low. Whatever a "
                   "target leaves above it is all the room there is for the rest of what an adapted layer costs "
                   "(its dispatch, its autograd node, allocation, and what the bound leaves out).", ""]
        n = res.get("adapted_layers") or 0
        den = {"peft": "peft's step", "limit": "the limit", "base": "the base model's decode step"}[room["den"]]
        head = (f"**{t['scenario']}: {t['ratio']} ≤ {t['target']}** (measured {t['value']:.3f}). The bound, "
                f"{BOUND_WORK.get(t['scenario'], 'the work the method cannot skip')}, costs "
                f"{room['bound_over']:.3f}× {den}. ")
        per = (lambda ms: f" ({ms * 1e3 / n:.0f} µs per adapted layer, {n} layers)") if n else (lambda ms: "")
        pin = results.get("pinned", {}).get(t["scenario"])
        proom = bound_room(t, pin) if pin else None
        faults = res.get("faults_per_step", {}).get("bound", 0)
        if room["room"] > 0:
            body = (f"The target leaves {room['room']:.1f} ms above it{per(room['room'])}; peftlab spends "
                    f"{room['peftlab']:.1f} ms there{per(room['peftlab'])}.")
        elif proom is None and not faults:  # nothing to blame but the products
            body = (f"The bound alone lies {-room['room']:.1f} ms above what the target allows: with these products "
                    f"run by this machine's BLAS, no implementation can meet the target in this run.")
        else:
            body = (f"The bound alone lies {-room['room']:.1f} ms above what the target allows in this run"
                    + (f", where it took {faults:.0f} page faults a step" if faults else "") + ".")
        out += [head + body, ""]
        out += fixed_cost_text(res, room, n)
        out += stripped_text(t, res, pin)
        if proom is not None:
            out += [f"Without page faults (the allocator pinned) the bound costs {proom['bound_over']:.3f}× {den}; "
                    + (f"the target leaves {proom['room']:.1f} ms above it and peftlab spends {proom['peftlab']:.1f} ms."
                       if proom["room"] > 0 else
                       f"it lies {-proom['room']:.1f} ms above what the target allows: with these products run by "
                       "this machine's BLAS, no implementation can meet the target, page faults or not."), ""]
    return out


def stripped_text(t: dict, res: dict, pin: dict | None) -> list[str]:
    """For a missed target whose scenario also timed its layers stripped to their products (benchmarks/run.py
    ``strip_rotations``): that step against the target, in this run and pinned; nothing otherwise."""
    key = f"stripped/{DENOMINATOR.get(t['ratio'])}"
    got = res.get("ratios", {}).get(key)
    if got is None:
        return []
    pinned = (pin or {}).get("ratios", {}).get(key)
    values = [got["median"]] + ([pinned["median"]] if pinned else [])
    text = (f"The same step with every adapted layer stripped to its products (one autograd node each that runs "
            f"only the products above and skips everything a library must check: the bias, second derivatives, "
            f"an output changed in place, s near 0, the generic path; `strip_rotations` in benchmarks/run.py) "
            f"measures {got['median']:.3f}" + (f" ({pinned['median']:.3f} pinned)" if pinned else "") + ". ")
    if min(values) > t["target"]:
        text += ("It misses the target too: what peftlab's layer does beyond the products is not what stands "
                 "between this design and the target.")
    elif max(values) > t["target"]:
        text += "It meets the target in one pass and misses it in the other."
    else:
        text += "It meets the target: the layer's checks and module path cost the difference."
    return [text, ""]


def fixed_cost_text(res: dict, room: dict, n: int) -> list[str]:
    """What each adapted layer costs before its products (benchmarks/run.py ``fixed_cost``), peftlab's node and the
    same layer as PyTorch's own operators, set against the room a missed target leaves above the bound; nothing
    where the scenario did not time it."""
    fc = res.get("fixed_cost_us")
    if not fc or not n:
        return []
    each = fc["adapted"] - fc["frozen"] - fc["products"]
    total = each * n / 1e3
    text = (f"Timed on 2 tokens, so that a product costs only its call, one adapted layer's forward and backward "
            f"take {fc['adapted']:.0f} µs, the frozen layer's {fc['frozen']:.0f} µs and the bound's four products "
            f"{fc['products']:.0f} µs: the {each:.0f} µs that remain (the layer's module call, its autograd node "
            f"written in Python, the accumulation of ∂A and ∂B) come to {total:.1f} ms over {n} layers, whatever "
            f"the batch. ")
    native_total = None
    if "native" in fc:
        native_each = fc["native"] - fc["frozen"] - fc["products"]
        native_total = native_each * n / 1e3
        text += (f"Written as PyTorch's own operators on the same tensors instead (peft's graph, with no module call "
                 f"and no node in Python), the layer takes {fc['native']:.0f} µs: {native_each:.0f} µs above the "
                 f"frozen layer and the products, {native_total:.1f} ms over the layers. ")
    if room["room"] <= 0:
        text += "All of it comes on top of a bound that already misses the target."
    elif total >= room["room"] and native_total is not None and native_total >= room["room"]:
        text += (f"Either way more than the {room['room']:.1f} ms the target leaves above the bound in this run: "
                 f"the layers' fixed cost alone misses the target, however fast the products run.")
    elif total >= room["room"]:
        text += (f"That is more than the {room['room']:.1f} ms the target leaves above the bound in this run: with "
                 f"one such node per layer the target is out of reach, however fast the products run.")
    else:
        text += (f"peftlab's share is {total / room['room']:.0%} of the {room['room']:.1f} ms the target leaves "
                 f"above the bound.")
    return [text, ""]


def target_over_floor(t: dict, ratios: dict) -> float | None:
    """A step target as a multiple of the run's floor (the frozen model's forward and the backward as far as
    block 0's projections: see benchmarks/run.py ``adapter_floor``), or None for a target of another kind."""
    per = {"peftlab/peft": "floor/peft", "peftlab/limit": "floor/limit"}.get(t["ratio"])
    if per is None or per not in ratios:
        return None
    return t["target"] / ratios[per]["median"]


def pinned_table(results: dict) -> list[str]:
    """The training scenarios again with glibc's allocator pinned (no page faults), beside the default run and
    its page faults per step."""
    pinned = results.get("pinned")
    if not pinned:
        return []
    targets = {t["scenario"]: t["target"] for t in results.get("targets", []) if t["ratio"] == "peftlab/peft"}
    lines = [
        "## Page faults, and the same steps without them", "",
        "On a CPU, PyTorch takes its tensors from the C library's `malloc`. glibc hands memory back to the "
        "operating system when a large enough block at the top of its heap is free (the *trim threshold*) and "
        "serves large requests from fresh mappings; the next step then takes a minor page fault, a zeroed "
        "4 KiB page from the kernel, for every page it touches again. How much is handed back depends on the "
        "order of earlier allocations, so identical runs can differ severalfold in their counts, and in this "
        "benchmark's single process the candidates also pay for each other's frees. "
        "The targets above are judged on the default run, which is what a user's process gets. The training "
        "scenarios then run once more in a fresh interpreter with the allocator pinned (`pin_allocator` in "
        "`benchmarks/run.py`: no trimming, no mappings below 32 MiB), where a step takes almost no faults and "
        "the ratios measure the computation alone.", "",
        "| scenario | peftlab/peft | pinned | floor/peft pinned | target / floor pinned | "
        "faults per step: peftlab · peft · floor (default) | peftlab's step (ms): default → pinned |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, res in pinned.items():
        default = results["scenarios"].get(name, {})
        r, rd = res["ratios"], default.get("ratios", {})
        floor = r.get("floor/peft", {}).get("median")
        tf = f"{targets[name] / floor:.2f}" if name in targets and floor else ""
        f = default.get("faults_per_step", {})
        faults = " · ".join(f"{f[c]:,.0f}" if c in f else "—" for c in ("peftlab", "peft", "floor"))
        ms = f"{default['median_ms']['peftlab']:.1f} → {res['median_ms']['peftlab']:.1f}" if default else ""
        lines.append(f"| {name} | {rd['peftlab/peft']['median']:.3f} | {r['peftlab/peft']['median']:.3f} | "
                     f"{'' if floor is None else f'{floor:.3f}'} | {tf} | {faults} | {ms} |")
    return [*lines, ""]


def _ratio(results: dict, scenario: str, ratio: str) -> dict | None:
    return results["scenarios"].get(scenario, {}).get("ratios", {}).get(ratio)


def method_table(results: dict) -> list[str]:
    """One row per method: its step against peft (with its target) and the limit, inference, mixed batches, files."""
    methods = [n[: -len("_step")] for n in results["scenarios"] if n.endswith("_step")]
    if not methods:
        return []
    targets = {(t["scenario"], t["ratio"]): t for t in results.get("targets", [])}
    lines = ["## Every method", "",
             "Time ratios of the latest run (lower is faster for peftlab; — where the method has no such path or the "
             "run left the scenario out). *limit*: the frozen model's forward and backward alone; *base*: the model "
             "without adapter; *mixed*: a batch whose rows use four different adapters (peft serves mixed batches "
             "for LoRA only).", "",
             "| method | " + " | ".join(c for c, _, _ in METHOD_COLUMNS) + " |",
             "| --- |" + " --- |" * len(METHOD_COLUMNS)]
    for method in methods:
        cells = []
        for _, suffix, ratio in METHOD_COLUMNS:
            scenario, key = LORA_ALIASES.get((method, suffix, ratio), (method + suffix, ratio))
            r = _ratio(results, scenario, key)
            cell = "—" if r is None else f"{r['median']:.2f}"
            t = targets.get((scenario, key))
            if t is not None:
                cell += f" (≤ {t['target']}{'' if t['met'] else ', **missed**'})"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def missed_steps(results: dict) -> list[str]:
    """For every missed training-step target: the target as a multiple of the physical limit, and the operators
    that take the time in peftlab's step, peft's and the limit's (one profiled step each)."""
    out = []
    for t in results.get("targets", []):
        res = results["scenarios"][t["scenario"]]
        if t["met"] or not t["scenario"].endswith("_step") or t["ratio"] != "peftlab/peft":
            continue
        r = res["ratios"]
        if not out:
            out = ["## Where the time goes in the missed step targets", ""]
        out += [f"### {t['scenario']}: where the time goes", ""]
        if "peft/limit" in r:
            asks = t["target"] * r["peft/limit"]["median"]
            ours = r["peftlab/limit"]["median"]
            out += [f"peft's step costs {r['peft/limit']['median']:.2f}× the frozen model's forward and backward in "
                    f"this run, so the target (≤ {t['target']}× peft) asks for {asks:.2f}× that limit; peftlab's step "
                    f"costs {ours:.2f}× the limit (medians of per-round ratios, which do not multiply exactly)."
                    + (" The target lies below the limit in this run (the floor below says whether any "
                       "implementation could meet it)." if asks < 1 else "")
                    + (f" What peftlab adds to the limit, {(ours - 1) * 100:.0f} %, is the method's own work, by "
                       "operator below." if ours > 1 else " peftlab's step is at the limit, within the run's noise."),
                    ""]
        if "floor/peft" in r:
            ms = res["median_ms"]
            room = t["target"] * ms["peft"] - ms["floor"]
            out += [f"The floor (the frozen model, its backward stopped at block 0's q, k, v outputs) costs "
                    f"{r['floor/peft']['median']:.3f}× peft's step: the target leaves "
                    + (f"{room:.1f} ms of a {ms['peft']:.0f} ms step (median times) for everything the method adds "
                       f"to it; peftlab adds {ms['peftlab'] - ms['floor']:.1f} ms, peft "
                       f"{ms['peft'] - ms['floor']:.1f} ms." if room > 0 else
                       f"nothing: it lies {-room:.1f} ms below the floor (median times), so no implementation of "
                       f"the method can meet it in this run."),
                    ""]
        pin = results.get("pinned", {}).get(t["scenario"])
        if pin and "floor/peft" in pin["ratios"]:
            ms, fp = pin["median_ms"], pin["ratios"]["floor/peft"]["median"]
            room = t["target"] * ms["peft"] - ms["floor"]
            out += [f"Without page faults (the allocator pinned, see above) peftlab's step costs "
                    f"{pin['ratios']['peftlab/peft']['median']:.3f}× peft's and the floor {fp:.3f}×: "
                    + (f"the target leaves {room:.1f} ms for the method's own work; peftlab adds "
                       f"{ms['peftlab'] - ms['floor']:.1f} ms, peft {ms['peft'] - ms['floor']:.1f} ms."
                       if room > 0 else
                       f"the target lies {-room:.1f} ms below the floor, so without page faults no implementation "
                       f"of the method meets it; with them it is met only by paying fewer faults than peft."),
                    ""]
        work = STEP_WORK.get(t["scenario"][: -len("_step")])
        if work:
            out += [work, ""]
        prof = res.get("profile")
        if prof:
            ops: dict[str, dict[str, float]] = {}
            for cand, rows in prof.items():
                for row in rows:
                    ops.setdefault(row["op"], {})[cand] = row["self_ms"]
            cands = list(prof)
            out += ["Self time per operator in one profiled step (ms; the top operators of each candidate):", "",
                    "| operator | " + " | ".join(cands) + " |", "| --- |" + " --- |" * len(cands)]
            order = sorted(ops, key=lambda o: -max(ops[o].values()))
            for op in order:
                out.append(f"| `{op}` | " + " | ".join(f"{ops[op][c]:.1f}" if c in ops[op] else "·" for c in cands)
                           + " |")
            out.append("")
    return out


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks" / "results" / "latest.json"
    results = json.loads(path.read_text())
    PAGE.write_text(render(results))
    png = path.with_suffix(".png")
    if png.is_file():
        IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, IMAGE)
    print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
