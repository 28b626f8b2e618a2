"""Drop-in parity with peft: run one table of tiny custom models × LoRA configs × scenarios through peft
and through peftlab (peftlab's objects bound to peft's names), and count where they behave the same.

The table is modelled on peft's own ``tests/test_custom_models.py`` (its MLP, embedding + transformers
``Conv1D``, Conv1d/2d/3d, grouped conv, ``nn.MultiheadAttention`` and tiny transformers models, with
LoRA configs including DoRA, the initialisations, the bias modes, modules_to_save, several adapters and
merging). A scenario drives the public API the way a peft user does and records what a user sees: output
tensors (adapter tensors filled with values seeded by their names, so both libraries hold the same
adapter), exact identities (``torch.equal``), error and warning types, state-dict keys, trainable names,
files written and layer reprs. A case counts when peft completes the scenario; it passes when peftlab
records the same observations (tensors within 1e-5).

Differences peftlab keeps on purpose (peft bugs) are listed in :data:`DELIBERATE`: an observation of a
case named there is not counted against peftlab (the test pins each one separately, see
tests/test_peft_parity.py and book/peft_differences.md).

Run ``python tools/peft_parity.py`` (``--quick`` for the representative subset the test runs); it prints
the count and every remaining difference.

Explained in: book/peft_differences.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import os
import sys
import tempfile
import time
import types
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

ATOL = 1e-5

# ---------------------------------------------------------------------------------------------------
# the two libraries under one set of names
# ---------------------------------------------------------------------------------------------------
NAMES = ("LoraConfig", "get_peft_model", "PeftModel", "get_peft_model_state_dict", "set_peft_model_state_dict",
         "inject_adapter_in_model", "PeftType", "PeftWarning")


_LIBS: dict[str, types.SimpleNamespace] = {}


def library(name: str) -> types.SimpleNamespace:
    """peft's public names, bound to peft's or to peftlab's objects."""
    if name not in _LIBS:
        mod = __import__(name)
        _LIBS[name] = types.SimpleNamespace(name=name, **{n: getattr(mod, n, None) for n in NAMES})
    return _LIBS[name]


# ---------------------------------------------------------------------------------------------------
# tiny models (peft's custom models)
# ---------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


class EmbConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(X))))))


class ConvNd(nn.Module):
    def __init__(self, dim: int, cin: int, cout: int, k: int, size: int, groups: int = 1) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.shape = (cin,) + (size,) * dim
        self.conv = conv(cin, cout, k, groups=groups)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(cout * (size - k + 1) ** dim, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.float().reshape(X.shape[0], *self.shape)
        return self.sm(self.lin0(self.flat(self.relu(self.conv(X)))))


class Mha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.float().reshape(X.shape[0], 1, 10)  # (seq, batch=1, embed)
        X, _ = self.mha(X, X, X)
        return self.sm(self.lin0(X.reshape(X.shape[0], 10)))


def _tiny(name: str) -> nn.Module:
    from peftlab.lab.models import tiny_model

    return tiny_model(name)


@dataclass
class ModelSpec:
    build: Callable[[], nn.Module]
    inputs: Callable[[int], Any]
    targets: list[str]
    modules_to_save: list[str] | None = None
    linear: bool = True  # initialisations that read the base weight apply (all targets linear)
    task_type: str | None = None


def _floats(n: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, width, generator=g)


def _ids(n: int, vocab: int = 100, seq: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (n, seq), generator=g)


def _lm_inputs(n: int) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(n, 128, 6)}


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(MLP, lambda n: _floats(n, 10), ["lin0", "lin1"], ["lin1"]),
    "emb_conv1d": ModelSpec(EmbConv1D, _ids, ["emb", "conv1d"], ["lin0"], linear=False),
    "conv1d": ModelSpec(lambda: ConvNd(1, 2, 4, 2, 5), lambda n: _floats(n, 10), ["conv"], ["lin0"], linear=False),
    "conv2d": ModelSpec(lambda: ConvNd(2, 5, 10, 3, 3), lambda n: _floats(n, 45), ["conv"], ["lin0"], linear=False),
    "conv3d": ModelSpec(lambda: ConvNd(3, 2, 4, 2, 3), lambda n: _floats(n, 54), ["conv"], ["lin0"], linear=False),
    "conv2d_groups": ModelSpec(lambda: ConvNd(2, 4, 4, 3, 3, groups=2), lambda n: _floats(n, 36), ["conv"],
                               ["lin0"], linear=False),
    "mha": ModelSpec(Mha, lambda n: _floats(n, 10), ["mha"], ["lin0"], linear=False),
    "llama": ModelSpec(lambda: _tiny("llama"), _lm_inputs, ["q_proj", "v_proj"], None, task_type="CAUSAL_LM"),
    "gpt2": ModelSpec(lambda: _tiny("gpt2"), _lm_inputs, ["c_attn"], None, task_type="CAUSAL_LM"),
}

# (config name, LoraConfig kwargs, models it applies to: "*" or a list)
CONFIGS: list[tuple[str, dict[str, Any], Any]] = [
    ("default", {}, "*"),
    ("r4-alpha8-rslora", dict(r=4, lora_alpha=8, use_rslora=True), "*"),
    ("dropout", dict(lora_dropout=0.1), "*"),
    ("init-gaussian", dict(init_lora_weights="gaussian"), "*"),
    ("init-false", dict(init_lora_weights=False), "*"),
    ("init-pissa", dict(init_lora_weights="pissa", r=2), "linear"),
    ("init-olora", dict(init_lora_weights="olora", r=2), "linear"),
    ("dora", dict(use_dora=True), "*"),
    ("bias-all", dict(bias="all"), "*"),
    ("bias-lora-only", dict(bias="lora_only"), "*"),
    ("lora-bias", dict(lora_bias=True), "*"),
    ("modules-to-save", dict(modules_to_save="auto"), "*"),
]

#: scenario -> configs it runs with ("*" all)
QUICK_MODELS = ("mlp", "emb_conv1d", "conv2d", "conv2d_groups", "mha", "gpt2")


# ---------------------------------------------------------------------------------------------------
# helpers the scenarios use
# ---------------------------------------------------------------------------------------------------
def fill_(t: torch.Tensor, name: str) -> None:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    noise = (torch.rand(t.shape, generator=g) * 0.2 - 0.1).to(t.dtype)
    with torch.no_grad():
        if "lora_magnitude_vector" in name:
            t.mul_(1 + noise)
        else:
            t.copy_(noise)


def fill_adapter(model: nn.Module, adapter: str) -> None:
    """Fill every tensor of ``adapter`` (LoRA tensors and modules_to_save copies), seeded by its name."""
    for n, p in model.named_parameters():
        parts = n.split(".")
        if adapter in parts and any(x.startswith("lora_") or x == "modules_to_save" for x in parts):
            fill_(p, n)


def out(model: nn.Module, x: Any, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        y = model(**x, **kw) if isinstance(x, dict) else model(x, **kw)
    return y.logits if hasattr(y, "logits") else y


def recorded(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    """(result or "raises <Type>", warning category names)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - the type is the observation
            result = f"raises {type(e).__name__}"
    cats = sorted({w.category.__name__ for w in caught if not issubclass(w.category, (DeprecationWarning,
                                                                                          FutureWarning))})
    return result, cats


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") or hasattr(m, "lora_embedding_A")}


def layer_reprs(model: nn.Module) -> dict[str, str]:
    return {n: repr(m).split("(")[0] for n, m in adapter_layers(model).items()}


def trainable(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


_BASES: dict[int, nn.Module] = {}


@dataclass
class Ctx:
    lib: types.SimpleNamespace
    spec: ModelSpec
    kwargs: dict[str, Any]
    obs: dict[str, Any] = field(default_factory=dict)

    def config(self, **extra: Any):
        kw = {"target_modules": list(self.spec.targets), **self.kwargs, **extra}
        if kw.get("modules_to_save") == "auto":
            kw["modules_to_save"] = self.spec.modules_to_save
            if kw["modules_to_save"] is None:
                kw["modules_to_save"] = ["lm_head"]
        if self.spec.task_type:
            kw.setdefault("task_type", self.spec.task_type)
        return self.lib.LoraConfig(**kw)

    def base(self) -> nn.Module:
        key = id(self.spec)
        if key not in _BASES:  # built once under seed 0, then copied
            torch.manual_seed(0)
            _BASES[key] = self.spec.build().eval()
        return copy.deepcopy(_BASES[key])

    def model(self, **extra: Any):
        torch.manual_seed(0)
        return self.lib.get_peft_model(self.base(), self.config(**extra)).eval()

    def x(self, n: int = 4) -> Any:
        return self.spec.inputs(n)

    def note(self, key: str, value: Any) -> None:
        self.obs[key] = value


# ---------------------------------------------------------------------------------------------------
# scenarios (peft's custom-model tests, as a user would write them)
# ---------------------------------------------------------------------------------------------------
def s_create(c: Ctx) -> None:
    base = c.base()
    x = c.x()
    y0 = out(base, x)
    torch.manual_seed(0)
    pm, warn = recorded(lambda: c.lib.get_peft_model(base, c.config()))
    c.note("create_warnings", warn)
    if isinstance(pm, str):
        raise RuntimeError(pm)
    pm.eval()
    c.note("fresh_equals_base", torch.equal(out(pm, x), y0) if c.kwargs.get("init_lora_weights", True) is not False
           else None)
    c.note("layer_reprs", layer_reprs(pm))
    c.note("trainable", trainable(pm))
    c.note("state_dict_keys", sorted(pm.state_dict()))
    c.note("adapter_keys", sorted(c.lib.get_peft_model_state_dict(pm)))
    c.note("active_adapters", list(pm.active_adapters))
    pt = pm.peft_config["default"].peft_type
    c.note("peft_type", (isinstance(pt, str), str(pt.value if hasattr(pt, "value") else pt),
                         type(pt).__name__))
    c.note("layer_active_adapters", sorted({tuple(m.active_adapters) for m in adapter_layers(pm).values()}))
    c.note("tuner_prefix", getattr(pm.base_model, "prefix", None))


def s_forward_train(c: Ctx) -> None:
    pm = c.model()
    fill_adapter(pm, "default")
    x = c.x()
    c.note("output", out(pm, x))
    pm.train()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(0)
    y = pm(**x) if isinstance(x, dict) else pm(x)
    y = y.logits if hasattr(y, "logits") else y
    (y.float() ** 2).mean().backward()
    opt.step()
    c.note("changed", sorted(n for n, p in pm.named_parameters() if not torch.equal(p, before[n])))


def s_save_load(c: Ctx) -> None:
    pm = c.model()
    fill_adapter(pm, "default")
    x = c.x()
    y = out(pm, x)
    with tempfile.TemporaryDirectory() as tmp:
        _, warn = recorded(lambda: pm.save_pretrained(tmp))
        c.note("save_warnings", warn)
        c.note("files", sorted(os.listdir(tmp)))
        loaded, warn = recorded(lambda: c.lib.PeftModel.from_pretrained(c.base(), tmp))
        c.note("load_warnings", warn)
        c.note("loaded_output", out(loaded, x) if not isinstance(loaded, str) else loaded)
        low, _ = recorded(lambda: c.lib.PeftModel.from_pretrained(c.base(), tmp, low_cpu_mem_usage=True))
        c.note("low_cpu_mem_output", out(low, x) if not isinstance(low, str) else low)
        if not isinstance(loaded, str):
            res, warn = recorded(lambda: loaded.load_adapter(tmp, adapter_name="other"))
            c.note("load_adapter_result", (sorted(getattr(res, "unexpected_keys", ["<none>"])),
                                           sorted(k for k in getattr(res, "missing_keys", ["<none>"])
                                                  if "lora_" in k or "<none>" in k)))
            c.note("load_adapter_warnings", warn)
    c.note("output_before_save", y)


def s_merge(c: Ctx) -> None:
    pm = c.model()
    fill_adapter(pm, "default")
    x = c.x()
    y = out(pm, x)
    res, warn = recorded(lambda: pm.merge_adapter())
    c.note("merge", (res, warn))
    if res is None:
        c.note("merged_output", out(pm, x))
        c.note("merge_twice", recorded(lambda: pm.merge_adapter()))
        c.note("unmerge", recorded(lambda: pm.unmerge_adapter()))
        c.note("unmerged_output", out(pm, x))
    res, warn = recorded(lambda: pm.merge_and_unload(safe_merge=True))
    c.note("merge_and_unload", (res if isinstance(res, str) else type(res).__name__, warn))
    if not isinstance(res, str):
        c.note("merged_unloaded_output", out(res, x))
        c.note("adapter_layers_left", sorted(adapter_layers(res)))


def s_disable(c: Ctx) -> None:
    pm = c.model()
    fill_adapter(pm, "default")
    base = c.base()
    x = c.x()
    y = out(pm, x)

    def run():
        with pm.disable_adapter():
            return out(pm, x)
    yd, warn = recorded(run)
    c.note("disable_warnings", warn)
    c.note("disabled_is_base", torch.equal(yd, out(base, x)) if not isinstance(yd, str) else yd)
    c.note("reenabled_equals", torch.equal(out(pm, x), y))
    c.note("trainable_after", trainable(pm))
    # disable with a merged adapter
    res, _ = recorded(lambda: pm.merge_adapter())
    if res is None:
        yd, warn = recorded(run)
        c.note("disabled_merged_is_base", torch.allclose(yd, out(base, x), atol=ATOL) if not isinstance(yd, str)
               else yd)
        c.note("disabled_merged_warnings", warn)


def s_multi(c: Ctx) -> None:
    pm = c.model()
    fill_adapter(pm, "default")
    x = c.x()
    res, warn = recorded(lambda: pm.add_adapter("other", c.config(r=4, lora_alpha=6)))
    c.note("add_adapter", (res, warn))
    if res is not None:
        return
    fill_adapter(pm, "other")
    c.note("active_after_add", list(pm.active_adapters))
    c.note("trainable_after_add", trainable(pm))
    ys = {}
    for a in ("default", "other"):
        pm.set_adapter(a)
        ys[a] = out(pm, x)
    c.note("per_adapter_outputs", ys)
    c.note("trainable_other", trainable(pm))
    names = ["default", "other", "__base__", "other"]
    ym, warn = recorded(lambda: out(pm, x, adapter_names=names))
    c.note("mixed_warnings", warn)
    if isinstance(ym, str):
        c.note("mixed", ym)
    else:
        with pm.disable_adapter():
            yb = out(pm, x)
        ref = torch.stack([ys["default"][0], ys["other"][1], yb[2], ys["other"][3]])
        c.note("mixed_exact", torch.equal(ym, ref))
        c.note("mixed_close", torch.allclose(ym, ref, atol=ATOL))
    c.note("delete_unknown", recorded(lambda: pm.delete_adapter("nope"))[0])
    res, warn = recorded(lambda: pm.delete_adapter("other"))  # the active one
    c.note("delete_active", (res, warn, list(pm.active_adapters), sorted(pm.peft_config)))
    c.note("keys_after_delete", sorted(pm.state_dict()))
    res, warn = recorded(lambda: pm.delete_adapter("default"))  # the last one
    c.note("delete_last", (res, sorted(pm.peft_config)))


def s_several_active(c: Ctx) -> None:
    pm = c.model()
    fill_adapter(pm, "default")
    x = c.x()
    res, _ = recorded(lambda: pm.add_adapter("other", c.config(r=4)))
    if res is not None:
        c.note("add", res)
        return
    fill_adapter(pm, "other")
    res, warn = recorded(lambda: pm.base_model.set_adapter(["default", "other"]))
    c.note("set_two", (res, warn))
    if res is None:
        c.note("two_active_output", out(pm, x))
        c.note("active", list(pm.active_adapters))
        c.note("merge_two", recorded(lambda: pm.merge_adapter())[0])


SCENARIOS: dict[str, Callable[[Ctx], None]] = {
    "create": s_create, "forward_train": s_forward_train, "save_load": s_save_load, "merge": s_merge,
    "disable": s_disable, "multi": s_multi, "several_active": s_several_active,
}

# ---------------------------------------------------------------------------------------------------
# deliberate differences: (case glob, observation key, why)
# ---------------------------------------------------------------------------------------------------
MHA_BUG = ("peft 0.21.2 adds out_proj's ΔW twice on nn.MultiheadAttention (its merge-for-forward merges out_proj "
           "once by hand and once more through the inner LoRA layer), so its outputs and merged weights carry 2·ΔW_out; "
           "peftlab applies ΔW once (the merged model equals the unmerged one)")
DORA_MIXED = "peft refuses mixed batches with DoRA adapters; peftlab serves them (each row equals its adapter alone)"
GROUPED_DORA = ("DoRA on a grouped conv: peft builds the norm ‖W + ΔW‖ from B·A reshaped out of its layout (not the "
                "kernel the layer applies); peftlab takes the norm of the dense kernel W + ΔW, so a trained magnitude "
                "gives other outputs")
LORA_BIAS_WARNING = ("lora_bias=True: peft's save-time check mistakes the 1-D lora_B.bias for an unsharded tensor and "
                     "warns (PeftWarning); peftlab does not")
MHA_LORA_BIAS = ("`lora_bias=True` on `nn.MultiheadAttention`: peft creates lora_B's biases, warns that the layer has no "
                 "bias, and its merge-for-forward lets no gradient reach them (in_proj's never enters the output); "
                 "peftlab adds s·b_B to in_proj_bias and out_proj.bias in the forward and when merging, so they train")
PISSA_RANK = ("PiSSA/OLoRA with r above min(in, out) (the MLP's 20→2 lin1 with r=4): peft builds lora_A with "
              "out_features=r but a weight of min(in, out) rows (a config that cannot reload its own tensors); "
              "peftlab refuses the rank and names the limit")
MIXED_EXACT = ("mixed batches: peftlab computes each adapter's low-rank term on the whole batch, so every row equals "
               "that adapter's own run bit for bit; peft's sub-batch products (and its modules_to_save wrapper) can "
               "round differently")

DELIBERATE: list[tuple[str, str, str]] = [
    *[("mha/*", key, MHA_BUG) for key in ("*output*", "merge", "unmerge", "changed")],
    ("*/dora/multi", "mixed", DORA_MIXED),
    ("conv2d_groups/dora/*", "*output*", GROUPED_DORA),
    ("*/lora-bias/*", "*warnings", LORA_BIAS_WARNING),
    ("mha/lora-bias/*", "add_adapter", MHA_LORA_BIAS), ("mha/lora-bias/*", "create*", MHA_LORA_BIAS),
    ("mlp/init-pissa/multi", "*", PISSA_RANK), ("mlp/init-olora/multi", "*", PISSA_RANK),
    ("mlp/init-pissa/several_active", "*", PISSA_RANK), ("mlp/init-olora/several_active", "*", PISSA_RANK),
    ("*/multi", "mixed_exact", MIXED_EXACT),
]


def deliberate(case: str, key: str) -> str | None:
    for pattern, k, why in DELIBERATE:
        if fnmatch.fnmatch(case, pattern) and fnmatch.fnmatch(key, k):
            return why
    return None


# ---------------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------------
def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and torch.allclose(a.float(), b.float(), atol=ATOL, rtol=ATOL))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def short(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}[{v.flatten()[:3].tolist()}...]"
    s = repr(v)
    return s if len(s) < 300 else s[:300] + "..."


def cases(quick: bool = False) -> list[tuple[str, str, str]]:
    out_ = []
    for model, spec in MODELS.items():
        if quick and model not in QUICK_MODELS:
            continue
        for cname, _, applies in CONFIGS:
            if applies == "linear" and not spec.linear:
                continue
            for scen in SCENARIOS:
                out_.append((model, cname, scen))
    return out_


def run_case(libname: str, model: str, cname: str, scen: str) -> tuple[dict[str, Any], str | None]:
    lib = library(libname)
    kwargs = dict(next(kw for n, kw, _ in CONFIGS if n == cname))
    ctx = Ctx(lib, MODELS[model], kwargs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            SCENARIOS[scen](ctx)
    except Exception as e:  # noqa: BLE001 - a scenario the library cannot complete
        return ctx.obs, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return ctx.obs, None


@dataclass
class Report:
    total: int = 0
    peft_failed: list[str] = field(default_factory=list)
    passed: int = 0
    deliberate: list[str] = field(default_factory=list)
    deliberate_cases: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    failed_cases: list[str] = field(default_factory=list)

    @property
    def counted(self) -> int:
        return self.total - len(self.peft_failed)

    @property
    def ratio(self) -> float:
        """Cases where peftlab does exactly what peft does, of those peft completes."""
        return self.passed / max(1, self.counted)

    @property
    def ratio_with_deliberate(self) -> float:
        """The same, counting cases whose only differences are deliberate (listed in DELIBERATE) as agreeing."""
        return (self.passed + len(self.deliberate_cases)) / max(1, self.counted)


def run(quick: bool = False, select: str | None = None, verbose: bool = False) -> Report:
    torch.set_num_threads(1)
    rep = Report()
    for model, cname, scen in cases(quick):
        case = f"{model}/{cname}/{scen}"
        if select and not fnmatch.fnmatch(case, select):
            continue
        rep.total += 1
        ref, ref_err = run_case("peft", model, cname, scen)
        if ref_err is not None:
            rep.peft_failed.append(f"{case}: {ref_err}")
            continue
        ours, our_err = run_case("peftlab", model, cname, scen)
        diffs, kept = [], []
        if our_err is not None:
            why = deliberate(case, "error")
            (kept if why else diffs).append(f"{case}: error: peftlab fails: {our_err}"
                                            + (f"  [deliberate: {why}]" if why else ""))
        for key in ref:
            if key not in ours:
                if our_err is None:
                    why = deliberate(case, key)
                    (kept if why else diffs).append(f"{case}: {key}: missing in peftlab"
                                                    + (f"  [deliberate: {why}]" if why else ""))
                continue
            if not same(ref[key], ours[key]):
                line = f"{case}: {key}: peft={short(ref[key])} peftlab={short(ours[key])}"
                why = deliberate(case, key)
                (kept if why else diffs).append(line + (f"  [deliberate: {why}]" if why else ""))
        if diffs:
            rep.differences.extend(diffs)
            rep.failed_cases.append(case)
        elif kept:
            rep.deliberate_cases.append(case)
            rep.deliberate.extend(kept)
        else:
            rep.passed += 1
        if verbose:
            print(f"{'ok  ' if not diffs else 'DIFF'} {case}", flush=True)
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the representative subset tests/test_peft_parity.py runs")
    ap.add_argument("--select", help="only cases matching this glob (model/config/scenario)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rep = run(args.quick, args.select, args.verbose)
    print(f"\ncases: {rep.total}; peft completes {rep.counted}; peftlab the same in {rep.passed} "
          f"({100 * rep.ratio:.1f}%); differing only deliberately in {len(rep.deliberate_cases)} more "
          f"({100 * rep.ratio_with_deliberate:.1f}% together); other differences in {len(rep.failed_cases)} "
          f"[{time.perf_counter() - t0:.0f} s]")
    if rep.deliberate:
        print(f"\ndeliberate differences ({len(rep.deliberate_cases)} cases):")
        for line in rep.deliberate:
            print("  " + line)
    if rep.differences:
        print(f"\nremaining differences ({len(rep.failed_cases)} cases):")
        for line in rep.differences:
            print("  " + line)
    if rep.peft_failed:
        print(f"\npeft cannot complete ({len(rep.peft_failed)}):")
        for line in rep.peft_failed:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
