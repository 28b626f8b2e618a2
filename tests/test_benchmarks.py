"""benchmarks/run.py and report.py: every scenario runs (on tiny models, one repetition), every method peftlab
registers has its scenarios, every target names a ratio its scenario reports, and the appendix page renders.

Timings here mean nothing; ``make bench`` measures.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run = _load("run")
report = _load("report")

# the memory scenario starts three fresh interpreters (peak RSS cannot be reset in-process): too slow for a unit
# test, and its code path is the LoRA step's
SKIPPED = {"memory"}


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(run, "TINY", True)
    return argparse.Namespace(reps=1, warmup=0, device="cpu", profile=False)


@pytest.mark.parametrize("name", [s for s in run.SCENARIOS if s not in SKIPPED])
def test_scenario_runs_and_reports_its_targets(name, tiny):
    tiny.profile = name == "oft_step"  # the profiled step once
    res = run.SCENARIOS[name](tiny, "cpu", run.torch.float32)
    for s, ratio, _ in run.TARGETS:
        if s == name:
            assert ratio in res["ratios"], f"TARGETS names {ratio!r}, which {name} does not report"
    for r in res["ratios"].values():
        assert math.isfinite(r["median"]) and r["median"] > 0
    if name.endswith(("_step", "_inference", "_io")):
        assert res["about"]
    if name in ("oft_step", "boft_step"):  # their layers stripped to the products, beside peftlab's
        assert {"stripped/peft", "peftlab/stripped"} <= set(res["ratios"])
    if tiny.profile:
        assert set(res["profile"]) == {"peftlab", "peft", "limit"}
        assert all(row["self_ms"] >= 0 and row["op"] for rows in res["profile"].values() for row in rows)


def test_every_registered_method_is_benchmarked():
    from peftlab.registry import known_methods

    for peft_type in known_methods():
        method = peft_type.lower()
        assert method in run.METHODS, f"{peft_type} has no entry in benchmarks/run.py's METHODS"
        assert f"{method}_step" in run.SCENARIOS
    for s, _, _ in run.TARGETS:
        assert s in run.SCENARIOS, f"TARGETS names the unknown scenario {s!r}"


def test_page_renders_targets_methods_and_missed_profiles(tiny):
    results = run.measure(["ia3_step", "ia3_inference"], argparse.Namespace(**{**vars(tiny), "profile": True}))
    # a missed target (forced here) gets its analysis and its operator table
    t = next(t for t in results["targets"] if t["scenario"] == "ia3_step")
    t["met"], t["target"] = False, 0.01
    page = report.render(results)
    assert "| ia3 |" in page and "(≤ 0.01, **missed**)" in page
    assert "### ia3_step: where the time goes" in page and "asks for" in page and "| `aten::mm` |" in page
    assert "nan" not in page
    # a target of 0.01× peft lies below the floor: the page says no implementation can meet it, with the numbers
    r = results["scenarios"]["ia3_step"]["ratios"]
    assert report.target_over_floor(t, r) == pytest.approx(0.01 / r["floor/peft"]["median"])
    assert "| target / floor |" in page and "below the floor (median times)" in page


def test_page_shows_the_pinned_pass_beside_the_default_run(tiny):
    """The training scenarios' second pass (allocator pinned, in a fresh interpreter) lands in the results and on
    the page: its ratios beside the default run's, the default run's page faults per candidate, and, under a missed
    target, what the target leaves without page faults."""
    results = run.measure(["ia3_step"], tiny)
    results["pinned"] = run.pinned_pass(["ia3_step"], tiny)
    pin = results["pinned"]["ia3_step"]
    assert set(pin) == {"ratios", "median_ms", "faults_per_step"} and "floor/peft" in pin["ratios"]
    assert set(results["scenarios"]["ia3_step"]["faults_per_step"]) == {"peftlab", "peft", "limit", "floor"}
    t = next(t for t in results["targets"] if t["scenario"] == "ia3_step")
    t["met"], t["target"] = False, 0.01
    page = report.render(results)
    assert "## Page faults, and the same steps without them" in page
    row = next(line for line in page.splitlines() if line.startswith("| ia3_step |") and "→" in line)
    assert f"{pin['ratios']['peftlab/peft']['median']:.3f}" in row
    assert "Without page faults (the allocator pinned" in page and "below the floor, so without page faults" in page
    assert "nan" not in page


def test_pinned_allocator_keeps_freed_memory():
    """``pin_allocator``: a freed block stays with the process, so allocating and writing it again takes no page
    faults. With glibc's defaults the first 30 MiB block is mapped and unmapped, the second comes from the heap and
    faults in all its 7,680 pages. A fresh interpreter without torch (pinning changes the whole process, and
    nothing else may have moved glibc's dynamic thresholds)."""
    import subprocess

    code = (
        "import ctypes, ctypes.util, resource, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "from allocator import pin_allocator\n"
        "pinned = sys.argv[1] == 'pinned' and pin_allocator()\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "n = 30 * 2**20\n"
        "def touch():\n"
        "    p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)\n"
        "touch()\n"
        "f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "touch()\n"
        "print(pinned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n")
    faults = {}
    for mode in ("default", "pinned"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        pinned, n = out.stdout.split()
        assert pinned == str(mode == "pinned")
        faults[mode] = int(n)
    assert faults["default"] > 7000 and faults["pinned"] < 100, faults


def test_adapter_floor_stops_the_backward_at_block_zeros_projections(tiny):
    """The floor runs the limit's forward and backward less exactly what no adapter needs: the three products for
    ∂x under block 0's q, k and v projections (and the embedding's gradient); the backward still reaches their
    outputs, where an adapter on those layers takes its gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch = run.torch
    batch = {"input_ids": run.tokens(2, 16, "cpu")}
    batch["labels"] = batch["input_ids"]

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.mm = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.mm += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    limit = run.floor_model(run.llama(64, 2, "cpu", torch.float32))
    floor_model = run.llama(64, 2, "cpu", torch.float32)
    floor = run.adapter_floor(floor_model)
    reached = []  # (a hook registered after the floor's, which makes the output a leaf that wants a gradient)
    floor_model.model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda m, i, out: [out.register_hook(lambda g: reached.append(g.shape))] and None)
    counts = {}
    for name, step in (("limit", lambda: limit(**batch).loss.backward()), ("floor", lambda: floor(batch))):
        with Count() as c:
            step()
        counts[name] = c.mm
    assert counts["limit"] - counts["floor"] == 3
    assert reached and all(p.grad is None for p in floor_model.parameters())


def test_fixed_cost_is_set_against_the_room():
    """A layer's fixed cost (adapted − frozen − the bound's product calls, per layer, times the layers) beside the
    milliseconds a missed target leaves above the bound."""
    res = {"fixed_cost_us": {"adapted": 140.0, "frozen": 60.0, "products": 12.0}}
    over = report.fixed_cost_text(res, {"room": 0.7}, 21)[0]
    assert "the 68 µs that remain" in over and "1.4 ms over 21 layers" in over and "out of reach" in over
    assert "own operators" not in over  # a run without the native probe says nothing of it
    assert "14% of the 10.0 ms" in report.fixed_cost_text(res, {"room": 10.0}, 21)[0]
    assert "already misses" in report.fixed_cost_text(res, {"room": -1.0}, 21)[0]
    assert report.fixed_cost_text({}, {"room": 1.0}, 21) == []
    # with the same layer as PyTorch's own operators: 150 − 60 − 12 = 78 µs, 1.6 ms over 21 layers
    both = {"fixed_cost_us": {**res["fixed_cost_us"], "native": 150.0}}
    text = report.fixed_cost_text(both, {"room": 0.7}, 21)[0]
    assert "takes 150 µs: 78 µs above" in text and "1.6 ms over the layers" in text and "Either way" in text
    cheap = {"fixed_cost_us": {**res["fixed_cost_us"], "native": 80.0}}  # operators alone would fit the room
    text = report.fixed_cost_text(cheap, {"room": 0.7}, 21)[0]
    assert "Either way" not in text and "with one such node per layer the target is out of reach" in text


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_stripped_layers_compute_what_peftlabs_do(method):
    """The *stripped* candidate's layers (bare products in one node, an instrument) give the loss and every gradient
    of peftlab's own step, on trained-looking adapters; and the page sets their step against a missed target."""
    from peftlab.lab.graphs import node_counts

    torch = run.torch
    x = run.tokens(2, 16, "cpu")
    batch = {"input_ids": x, "labels": x}
    models = [run.METHODS[method].model("peftlab", "cpu", torch.float32).train() for _ in range(2)]
    run.strip_rotations(models[1])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p, q in zip(*(m.parameters() for m in models)):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
                q.copy_(p)
    losses = [m(**batch).loss for m in models]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0])
    grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in models]
    assert len(grads[0]) == (16 if method == "oft" else 32)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    nodes = node_counts(models[1](**batch).loss)
    assert "RotatedLinearBackward" not in nodes and nodes["StrippedRotationBackward"] == 16

    target = {"scenario": "boft_step", "ratio": "peftlab/peft", "target": 0.70}
    res = {"ratios": {"stripped/peft": {"median": 0.705}}}
    def pinned(value):
        return {"ratios": {"stripped/peft": {"median": value}}}
    assert "misses the target too" in report.stripped_text(target, res, pinned(0.71))[0]
    assert "in one pass" in report.stripped_text(target, res, pinned(0.69))[0]
    assert "meets the target" in report.stripped_text({**target, "target": 0.8}, res, None)[0]
    assert report.stripped_text(target, {"ratios": {}}, None) == []


def test_bound_products_run_what_their_methods_cannot_skip(tiny):
    """The bound's stand-in products: four rank-r products per LoRA layer (A xᵀ, Bᵀ gᵀ, ∂A, ∂B: 2·r·T·(in + out)
    multiply-adds), two batched products per OFT/BOFT layer (the rotated weight, the blocks' gradient), BOFT's
    pass for ∂s (a product and a sum over the tokens; s itself scales the weight) and G = g W on the three layers
    whose input takes no gradient (block 0's q, k, v: the floor computes no ∂x there, the rotation's gradient needs
    G all the same), two per layer for serving; and the page puts every missed target beside its bound."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch = run.torch

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.macs = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__.split(".")[0])
            if func is torch.ops.aten.mm.default:
                self.macs += args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
            return func(*args, **(kwargs or {}))

    model = run.METHODS["lora"].model("peftlab", "cpu", torch.float32)
    products, layers = run.lora_products(model, 10)
    with Count() as c:
        products()
    assert layers == 16 and c.ops.count("mm") == 4 * 16
    assert c.macs == sum(2 * m.r["default"] * 10 * (m.in_features + m.out_features) for m in model.modules()
                         if hasattr(m, "lora_A") and hasattr(m, "r"))
    for method, per_layer in (("oft", {"bmm": 2}), ("boft", {"bmm": 2, "mul": 1, "sum": 1})):
        model = run.METHODS[method].model("peftlab", "cpu", torch.float32)
        products, layers = run.rotation_products(model, 10)
        with Count() as c:
            products()
        assert layers == 16 and all(c.ops.count(op) == n * 16 for op, n in per_layer.items()), (method, c.ops[:8])
        w = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        assert c.ops.count("mm") == 3 and c.macs == 3 * 10 * w.shape[0] * w.shape[1]  # G on block 0's q, k, v
        assert all(p.grad is None for p in model.parameters())  # finding them ran a forward only

    results = run.measure(["lora_step", "serving", "lab_scale"], tiny)
    for name, n in (("lora_step", 16), ("serving", 16), ("lab_scale", 21)):
        res = results["scenarios"][name]
        assert "bound" in res["median_ms"] and "peftlab/bound" in res["ratios"] and res["adapted_layers"] == n
    for name in ("lora_step", "lab_scale"):  # the LoRA steps also time a layer's fixed cost (2 tokens)
        fc = results["scenarios"][name]["fixed_cost_us"]
        assert set(fc) == {"adapted", "frozen", "native", "products"} and all(v > 0 for v in fc.values())
    for t in results["targets"]:  # one missed target with room above the bound, one below it
        if (t["scenario"], t["ratio"]) == ("lora_step", "peftlab/limit"):
            t["met"], t["target"] = False, 100.0
        if (t["scenario"], t["ratio"]) == ("serving", "peftlab/base"):
            t["met"], t["target"] = False, 0.01
    page = report.render(results)
    assert "## The missed targets against the bound" in page and "nan" not in page
    assert "**lora_step: peftlab/limit ≤ 100.0**" in page and "µs per adapted layer, 16 layers); peftlab spends" in page
    assert "come to" in page and "ms over 16 layers, whatever the batch" in page
    assert "**serving: peftlab/base ≤ 0.01**" in page and "no implementation can meet the target in this run" in page
