"""LoHa and LoKr against peft (the oracle), in both directions.

For each configuration the same tiny model is built twice, once per library. A fresh adapter made under the
same seed must come out tensor for tensor the same (both libraries draw the factors in the same order);
then every adapter tensor is filled with values seeded by its name, so both adapters are identical and
non-trivial, and the checks are those of ``test_lora_interop.py``: the same modules, trainable tensors,
count line and outputs; the same ΔW, merged weights and merged/unmerged/disabled outputs; peftlab's files
load in peft and peft's in peftlab with the same outputs; the files hold the same tensors and config keys;
training steps (with rank and module dropout) give the same tensors; several adapters travel both ways.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from typing import Any

import pytest
import torch
from conftest import base_model, output, quiet
from conftest import fill_trainable as shared_fill_trainable
from safetensors.torch import load_file
from torch import nn

import peftlab
from peftlab.lab.models import example_inputs

peft = pytest.importorskip("peft", reason="peft (the oracle) is not installed")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

from peftlab.tuners.base import AdapterLayer  # noqa: E402

pytestmark = pytest.mark.peer

LIBS = {"peft": peft, "peftlab": peftlab}
ATOL = 1e-5  # peftlab computes op(x; W₀ + ΔW), peft op(x; W₀) + op(x; ΔW): float32 rounding differs
PREFIXES = ("hada_", "lokr_", "modules_to_save")


class ConvNet(nn.Module):
    """Conv2d 3×3 (grouped), Conv2d 1×1 and Conv1d k=3 with enough channels for every LoKr layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.conv_b = nn.Conv2d(8, 12, 1)
        self.conv_c = nn.Conv1d(12, 8, 3)
        self.head = nn.Linear(8 * 14, 6)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv_b(torch.relu(self.conv_a(X))))  # (n, 12, 4, 4)
        h = torch.relu(self.conv_c(h.flatten(2)))  # (n, 8, 14)
        return self.head(h.flatten(1))


def make_model(name: str) -> nn.Module:
    if name == "convnet":
        torch.manual_seed(0)
        return ConvNet()
    return base_model(name)


def inputs(name: str, batch: int = 2):
    if name == "convnet":
        return torch.randn(batch, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    return example_inputs(name, batch=batch)


# (case name, method, tiny model, config kwargs)
CASES: list[tuple[str, str, str, dict[str, Any]]] = []
for _m in ("LoHa", "LoKr"):
    CASES += [
        (f"{_m}-mlp", _m, "mlp", dict(target_modules=["lin0", "lin1"])),
        (f"{_m}-mlp-patterns", _m, "mlp", dict(target_modules=r"lin\d", r=4, alpha=8, rank_pattern={"lin1": 2},
                                               alpha_pattern={"lin0": 3})),
        (f"{_m}-mlp-init-false-mts", _m, "mlp", dict(target_modules=["lin0"], init_weights=False,
                                                     modules_to_save=["lin1"])),
        (f"{_m}-conv2d-flat", _m, "conv2d", dict(target_modules=["conv2d", "lin0"], r=2, alpha=5)),
        (f"{_m}-conv2d-effective", _m, "conv2d", dict(target_modules=["conv2d"], r=2, use_effective_conv2d=True)),
        (f"{_m}-convnet", _m, "convnet", dict(target_modules=["conv_a", "conv_b", "conv_c", "head"], r=2)),
        (f"{_m}-convnet-effective", _m, "convnet", dict(target_modules=["conv_a", "conv_b", "conv_c"], r=1,
                                                         use_effective_conv2d=True, rank_pattern={"conv_c": 2})),
        (f"{_m}-llama-all-linear", _m, "llama", dict(target_modules="all-linear", r=4, task_type="CAUSAL_LM",
                                                     rank_dropout=0.1, module_dropout=0.1)),
        (f"{_m}-llama-layers", _m, "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                                 layers_to_transform=[1], layers_pattern="layers",
                                                 task_type="CAUSAL_LM")),
        (f"{_m}-llama-default-targets", _m, "llama", dict(task_type="CAUSAL_LM", r=2, alpha=4)),
        (f"{_m}-t5-seq2seq", _m, "t5", dict(target_modules=["q", "v", "wo"], task_type="SEQ_2_SEQ_LM", r=4)),
        (f"{_m}-bert-cls", _m, "bert_cls", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
        (f"{_m}-bert-regex-feature", _m, "bert", dict(target_modules=r".*attention\.self\.(query|key)",
                                                      task_type="FEATURE_EXTRACTION", exclude_modules=["layer.0.attention.self.key"])),
        (f"{_m}-opt", _m, "opt", dict(target_modules=["q_proj", "fc2"], layers_to_transform=0,
                                      task_type="CAUSAL_LM")),
    ]
CASES += [
    ("LoKr-decompose-both", "LoKr", "llama", dict(target_modules=["q_proj", "up_proj"], r=1, decompose_both=True,
                                                  task_type="CAUSAL_LM")),
    ("LoKr-decompose-factor", "LoKr", "llama", dict(target_modules=["q_proj", "o_proj"], decompose_factor=4,
                                                    r=1, task_type="CAUSAL_LM")),
    ("LoKr-lycoris-init", "LoKr", "mlp", dict(target_modules=["lin0", "lin1"], init_weights="lycoris", r=1)),
    # (not conv_c: peft 0.21.2 cannot run an effective Conv1d LoKr, see test_divergence_lokr_effective_conv1d)
    ("LoKr-lycoris-init-conv", "LoKr", "convnet", dict(target_modules=["conv_a", "conv_b"], init_weights="lycoris",
                                                       r=1, use_effective_conv2d=True)),
    ("LoKr-rank-dropout-scale", "LoKr", "mlp", dict(target_modules=["lin0"], rank_dropout=0.3,
                                                    rank_dropout_scale=True, r=1)),
    ("LoKr-decompose-both-conv", "LoKr", "convnet", dict(target_modules=["conv_b", "conv_c"], r=1,
                                                         decompose_both=True)),
]
IDS = [c[0] for c in CASES]


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_warnings():
    """Fail on any warning other than the known FutureWarning/DeprecationWarning noise."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    real = [w for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not real, [f"{w.category.__name__}: {w.message}" for w in real]


def fill_trainable(model: nn.Module, adapter: str = "default") -> None:
    shared_fill_trainable(model, adapter, prefixes=("hada_", "lokr_"))


def config(lib_name: str, method: str, kwargs: dict[str, Any]):
    return getattr(LIBS[lib_name], f"{method}Config")(**kwargs)


def build(lib_name: str, method: str, model: str, kwargs: dict[str, Any], fill: bool = True, seed: int = 7):
    base = make_model(model)
    torch.manual_seed(seed)  # after building the base, which may come from a cache (no draws) or not
    pm = LIBS[lib_name].get_peft_model(base, config(lib_name, method, kwargs))
    if fill:
        fill_trainable(pm)
    return pm.eval()


def adapted_names(pm) -> set[str]:
    return {n for n, m in pm.get_base_model().named_modules() if isinstance(m, (BaseTunerLayer, AdapterLayer))}


def trainable_names(pm) -> set[str]:
    return {n for n, p in pm.named_parameters() if p.requires_grad}


def adapter_params(pm) -> dict[str, torch.Tensor]:
    return {n: p for n, p in pm.named_parameters() if any(s.startswith(PREFIXES) for s in n.split("."))}


def count_line(pm) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pm.print_trainable_parameters()
    return buf.getvalue()


def read_files(folder) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(str(folder / "adapter_model.safetensors")), json.loads((folder / "adapter_config.json").read_text())


def as_comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """peft writes sets (target_modules, ...) in arbitrary order: compare lists as sets."""
    return {k: (sorted(map(str, v)) if isinstance(v, list) and k != "layers_to_transform" else v)
            for k, v in cfg.items()}


@pytest.fixture(scope="module")
def pair_cache():
    return {}


def pair(cache, case):
    name, method, model, kwargs = case
    if name not in cache:
        cache[name] = (build("peft", method, model, kwargs), build("peftlab", method, model, kwargs))
    return cache[name]


# ---------------------------------------------------------------------------------------------------
# same model, same config
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fresh_adapter_is_the_same(case):
    """Under one seed both libraries create the same tensors (same shapes, same draws, same zeros), print
    the same count line, and start as the identity."""
    name, method, model, kwargs = case
    ref, ours = build("peft", method, model, kwargs, fill=False), build("peftlab", method, model, kwargs, fill=False)
    ref_p, our_p = adapter_params(ref), adapter_params(ours)
    assert {k: tuple(v.shape) for k, v in our_p.items()} == {k: tuple(v.shape) for k, v in ref_p.items()}
    for k in ref_p:
        assert torch.equal(our_p[k], ref_p[k]), k
    assert count_line(ours) == count_line(ref)
    assert count_line(ours).startswith("trainable params: ")
    x = inputs(model)
    torch.testing.assert_close(output(ours, x), output(ref, x), atol=ATOL, rtol=0)
    if kwargs.get("init_weights", True) is not False:
        with ours.disable_adapter():
            base = output(ours, x)
        torch.testing.assert_close(output(ours, x), base, atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_config_same_model(case, pair_cache):
    name, method, model, kwargs = case
    ref, ours = pair(pair_cache, case)
    assert type(ours).__name__ == type(ref).__name__
    assert adapted_names(ours) == adapted_names(ref)
    assert trainable_names(ours) == trainable_names(ref)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert count_line(ours) == count_line(ref)
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = inputs(model)
    torch.testing.assert_close(output(ours, x), output(ref, x), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
# layer-level numerics
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_layer_numerics(case):
    name, method, model, kwargs = case
    ref, ours = build("peft", method, model, kwargs), build("peftlab", method, model, kwargs)
    x = inputs(model)
    unmerged = output(ref, x)
    ref_layers = {n: m for n, m in ref.get_base_model().named_modules() if isinstance(m, BaseTunerLayer)}
    our_layers = {n: m for n, m in ours.get_base_model().named_modules() if isinstance(m, AdapterLayer)}
    assert ref_layers.keys() == our_layers.keys()
    for key, layer in our_layers.items():
        ref_layer = ref_layers[key]
        assert layer.scaling["default"] == pytest.approx(ref_layer.scaling["default"], rel=1e-12), key
        assert layer.r["default"] == ref_layer.r["default"], key
        with torch.no_grad():
            torch.testing.assert_close(layer.get_delta_weight("default"), ref_layer.get_delta_weight("default"),
                                       atol=1e-7, rtol=1e-6, msg=key)
    with quiet():
        ref.merge_adapter()
    ours.merge_adapter()
    for key, layer in our_layers.items():
        torch.testing.assert_close(layer.get_base_layer().weight, ref_layers[key].get_base_layer().weight,
                                   atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(output(ours, x), output(ref, x), atol=ATOL, rtol=0)
    torch.testing.assert_close(output(ours, x), unmerged, atol=ATOL, rtol=0)
    with quiet():
        ref.unmerge_adapter()
    ours.unmerge_adapter()
    for key, layer in our_layers.items():
        torch.testing.assert_close(layer.get_base_layer().weight, ref_layers[key].get_base_layer().weight,
                                   atol=1e-6, rtol=0, msg=key)
    with quiet():
        with ref.disable_adapter():
            ref_disabled = output(ref, x)
        with ours.disable_adapter():
            our_disabled = output(ours, x)
    torch.testing.assert_close(our_disabled, ref_disabled, atol=0, rtol=0)
    with quiet():
        ref_plain, our_plain = ref.merge_and_unload(), ours.merge_and_unload()
    assert {n: type(m) for n, m in our_plain.named_modules()} == {n: type(m) for n, m in ref_plain.named_modules()}
    ref_sd, our_sd = ref_plain.state_dict(), our_plain.state_dict()
    assert our_sd.keys() == ref_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(our_sd[k], ref_sd[k], atol=1e-6, rtol=0, msg=k)


# ---------------------------------------------------------------------------------------------------
# checkpoints in both directions, and the files themselves
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peftlab_saves_peft_loads(case, pair_cache, tmp_path):
    name, method, model, kwargs = case
    ref, ours = pair(pair_cache, case)
    ours.save_pretrained(tmp_path)
    with no_warnings():  # no unknown config keys, no missing or unexpected adapter keys
        loaded = peft.PeftModel.from_pretrained(make_model(model), tmp_path)
    assert type(loaded).__name__ == type(ours).__name__
    x = inputs(model)
    torch.testing.assert_close(output(loaded, x), output(ours, x), atol=ATOL, rtol=0)
    ref_params = dict(loaded.named_parameters())
    for n, p in adapter_params(ours).items():
        torch.testing.assert_close(ref_params[n], p, atol=0, rtol=0, msg=n)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_saves_peftlab_loads(case, pair_cache, tmp_path):
    name, method, model, kwargs = case
    ref, ours = pair(pair_cache, case)
    with quiet():
        ref.save_pretrained(tmp_path)
    with no_warnings():
        loaded = peftlab.PeftModel.from_pretrained(make_model(model), tmp_path)
    assert type(loaded).__name__ == type(ref).__name__
    assert type(loaded.peft_config["default"]).__name__ == f"{method}Config"
    x = inputs(model)
    torch.testing.assert_close(output(loaded, x), output(ref, x), atol=ATOL, rtol=0)
    our_params = dict(loaded.named_parameters())
    for n, p in adapter_params(ref).items():
        torch.testing.assert_close(our_params[n], p, atol=0, rtol=0, msg=n)
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    first, second = read_files(tmp_path)[0], read_files(again)[0]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_files(case, pair_cache, tmp_path):
    name, method, model, kwargs = case
    ref, ours = pair(pair_cache, case)
    with quiet():
        ref.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "peftlab")
    ref_files = sorted(p.name for p in (tmp_path / "peft").iterdir())
    our_files = sorted(p.name for p in (tmp_path / "peftlab").iterdir())
    assert our_files == ref_files  # the model card README.md included
    ref_tensors, ref_config = read_files(tmp_path / "peft")
    our_tensors, our_config = read_files(tmp_path / "peftlab")
    assert {k: tuple(v.shape) for k, v in our_tensors.items()} == {k: tuple(v.shape) for k, v in ref_tensors.items()}
    prefix = "hada_" if method == "LoHa" else "lokr_"
    assert any(prefix in k for k in our_tensors)
    for k in ref_tensors:
        assert our_tensors[k].dtype == ref_tensors[k].dtype, k
        assert torch.equal(our_tensors[k], ref_tensors[k]), k
    assert our_config.keys() == ref_config.keys()
    assert as_comparable(our_config) == as_comparable(ref_config)
    with no_warnings():
        ref_read = peft.PeftConfig.from_pretrained(str(tmp_path / "peftlab"))
        our_read = peftlab.PeftConfig.from_pretrained(tmp_path / "peft")
    assert type(ref_read).__name__ == type(our_read).__name__ == f"{method}Config"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loading_for_training_trains_the_same_tensors(case, pair_cache, tmp_path):
    name, method, model, kwargs = case
    ref, ours = pair(pair_cache, case)
    ours.save_pretrained(tmp_path)
    with quiet():
        ref_loaded = peft.PeftModel.from_pretrained(make_model(model), tmp_path, is_trainable=True)
    our_loaded = peftlab.PeftModel.from_pretrained(make_model(model), tmp_path, is_trainable=True)
    assert trainable_names(our_loaded) == trainable_names(ref_loaded) == trainable_names(ours)
    assert count_line(our_loaded) == count_line(ref_loaded)
    assert not trainable_names(peftlab.PeftModel.from_pretrained(make_model(model), tmp_path))


# ---------------------------------------------------------------------------------------------------
# training: the same steps give the same tensors (dropout draws included)
# ---------------------------------------------------------------------------------------------------
def loss_of(model, name: str, out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().pow(2).mean()
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).pow(2).mean()


# LoHa's effective conv is left out: peft's gradients there are wrong (test_divergence_loha_effective_conv_gradients)
TRAIN_CASES = [c for c in CASES if c[2] in ("mlp", "convnet", "llama", "conv2d")
               and not (c[1] == "LoHa" and c[3].get("use_effective_conv2d"))]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_training_steps_match(case):
    """Three SGD steps from the same filled adapter: the same tensors in both libraries. Rank and module
    dropout draw from torch's generator in the same order in both, so seeded runs agree with them too."""
    name, method, model, kwargs = case
    x = inputs(model, batch=3)
    trained = {}
    for lib in LIBS:
        pm = build(lib, method, model, kwargs).train()
        if model == "mlp":
            pm.get_base_model().drop.p = 0.0  # the toy MLP's own dropout is not the adapter's
        opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
        torch.manual_seed(123)
        for _ in range(3):
            out = pm(**x) if isinstance(x, dict) else pm(x)
            loss_of(pm, model, out).backward()
            opt.step()
            opt.zero_grad()
        trained[lib] = adapter_params(pm)
    assert trained["peftlab"].keys() == trained["peft"].keys()
    for k in trained["peft"]:
        torch.testing.assert_close(trained["peftlab"][k], trained["peft"][k], atol=2e-5, rtol=1e-4, msg=k)


# ---------------------------------------------------------------------------------------------------
# several adapters (different layouts in one layer), a non-default one in a sub-folder
# ---------------------------------------------------------------------------------------------------
MULTI = {
    "LoHa": ("llama", dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
             dict(target_modules=["v_proj", "o_proj", "up_proj"], r=2, alpha=16, task_type="CAUSAL_LM")),
    # in v_proj (16 -> 16: blocks 4 x 4) the first adapter keeps lokr_w2 whole (r=8), the second factors it (r=1)
    "LoKr": ("llama", dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
             dict(target_modules=["v_proj", "o_proj"], r=1, decompose_both=True, init_weights=False,
                  task_type="CAUSAL_LM")),
    "LoKr-conv": ("convnet", dict(target_modules=["conv_a", "conv_c"], r=4),
                  dict(target_modules=["conv_a", "conv_b"], r=1, use_effective_conv2d=True)),
}


def build_multi(lib_name: str, key: str):
    model, first, second = MULTI[key]
    method = key.split("-")[0]
    pm = build(lib_name, method, model, first)
    pm.add_adapter("second", config(lib_name, method, second))
    fill_trainable(pm, "second")
    return pm.eval()


def run_each(pm, x) -> dict[str, torch.Tensor]:
    outs = {}
    for adapter in ("default", "second"):
        pm.set_adapter(adapter)
        outs[adapter] = output(pm, x)
    pm.set_adapter("default")
    return outs


@pytest.mark.parametrize("key", list(MULTI))
@pytest.mark.parametrize("direction", ["peftlab->peft", "peft->peftlab"])
def test_several_adapters_both_ways(key, direction, tmp_path):
    src, dst = direction.split("->")
    saver = build_multi(src, key)
    model = MULTI[key][0]
    x = inputs(model, batch=4)
    expected = run_each(saver, x)
    assert not torch.allclose(expected["default"], expected["second"])
    with quiet():
        saver.save_pretrained(tmp_path)
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    with no_warnings():
        loaded = LIBS[dst].PeftModel.from_pretrained(make_model(model), tmp_path)
        loaded.load_adapter(tmp_path / "second", adapter_name="second")
    got = run_each(loaded, x)
    for adapter in expected:
        torch.testing.assert_close(got[adapter], expected[adapter], atol=ATOL, rtol=0, msg=adapter)
    # mixed batches (peftlab only: peft 0.21.2 has no adapter_names for LoHa/LoKr): each row as its adapter
    ours = loaded if dst == "peftlab" else saver
    names = ["second", "__base__", "default", "second"]
    mixed = output(ours, x, adapter_names=names)
    with ours.disable_adapter():
        base = output(ours, x)
    for row, adapter in enumerate(names):
        want = base[row] if adapter == "__base__" else expected[adapter][row]
        torch.testing.assert_close(mixed[row], want, atol=ATOL, rtol=0, msg=f"row {row}")


@pytest.mark.parametrize("key", list(MULTI))
def test_several_adapters_same_folders(key, tmp_path):
    ref, ours = build_multi("peft", key), build_multi("peftlab", key)
    with quiet():
        ref.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "peftlab")

    def tree(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != "README.md")

    assert tree(tmp_path / "peftlab") == tree(tmp_path / "peft")
    for sub in ("", "second"):
        ref_t, ref_c = read_files(tmp_path / "peft" / sub)
        our_t, our_c = read_files(tmp_path / "peftlab" / sub)
        assert our_t.keys() == ref_t.keys()
        assert all(torch.equal(our_t[k], ref_t[k]) for k in ref_t)
        assert as_comparable(our_c) == as_comparable(ref_c)


def test_lokr_layouts_differ_per_adapter_in_one_layer():
    """One LoKr layer holding a whole ``lokr_w2`` for one adapter and factors for another, as peft does."""
    ours = build_multi("peftlab", "LoKr")
    layer = ours.get_base_model().model.layers[0].self_attn.v_proj
    assert "default" in layer.lokr_w2 and "default" not in layer.lokr_w2_a
    assert "second" in layer.lokr_w2_a and "second" in layer.lokr_w1_a and "second" not in layer.lokr_w2
    assert layer.adapter_names == ["default", "second"]
    ours.delete_adapter("second")
    assert not any("second" in getattr(layer, n) for n in layer.adapter_layer_names)


# ---------------------------------------------------------------------------------------------------
# what both libraries refuse
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["LoHa", "LoKr"])
def test_gpt2_conv1d_is_refused_by_both(method):
    """Neither library wraps GPT-2's transformers Conv1D with LoHa/LoKr; peftlab says so before changing
    anything."""
    for lib in LIBS:
        with pytest.raises((TypeError, ValueError)):
            with quiet():
                LIBS[lib].get_peft_model(base_model("gpt2"), config(lib, method, dict(target_modules=["c_attn"])))


# ---------------------------------------------------------------------------------------------------
# known divergences: peftlab deliberately differs from peft 0.21.2
# ---------------------------------------------------------------------------------------------------
def test_divergence_loha_effective_conv_gradients():
    """peft's ``HadaWeightCP.backward`` computes ∂/∂hada_w1_a from the *other* branch's core (and likewise for
    hada_w2_a), so training LoHa with ``use_effective_conv2d`` follows wrong gradients there. peftlab lets
    autograd differentiate the einsum: its gradients pass gradcheck; peft's do not."""
    from peft.tuners.loha.layer import HadaWeightCP

    from peftlab.tuners.lycoris import cp_weight

    g = torch.Generator().manual_seed(0)
    shapes = [(2, 2, 3, 3), (2, 5), (2, 4), (2, 2, 3, 3), (2, 5), (2, 4)]
    ts = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(lambda *a: cp_weight(a[0], a[1], a[2]) * cp_weight(a[3], a[4], a[5]), ts)
    ours = torch.autograd.grad((cp_weight(*ts[:3]) * cp_weight(*ts[3:])).sum(), ts)
    theirs = torch.autograd.grad(HadaWeightCP.apply(*ts, torch.tensor(1.0, dtype=torch.float64)).sum(), ts)
    wrong = [i for i in range(6) if not torch.allclose(ours[i], theirs[i])]
    assert wrong == [1, 4]  # hada_w1_a and hada_w2_a; the cores and the b factors agree


def test_divergence_lokr_effective_conv1d():
    """An effective-conv LoKr on a Conv1d whose W2 is factored: peft 0.21.2 fails in ``torch.kron`` (the
    einsum's (b, d, k, 1) result has a stride kron's internal view rejects); peftlab computes it, and its ΔW
    is W1 ⊗ CP(t2, w2_a, w2_b) with the kernel in W2's trailing dimension."""
    kwargs = dict(target_modules=["conv_c"], r=1, use_effective_conv2d=True)
    ref, ours = build("peft", "LoKr", "convnet", kwargs), build("peftlab", "LoKr", "convnet", kwargs)
    x = inputs("convnet")
    with pytest.raises(RuntimeError, match="view size"):
        output(ref, x)
    layer = ours.get_base_model().conv_c
    assert "default" in layer.lokr_t2 and tuple(layer.lokr_t2["default"].shape) == (1, 1, 3, 1)
    w1 = layer.lokr_w1["default"]
    core = torch.einsum("ijk,ip,jq->pqk", layer.lokr_t2["default"][..., 0], layer.lokr_w2_a["default"],
                        layer.lokr_w2_b["default"])  # (b, d, k)
    expected = torch.einsum("ac,bdk->abcdk", w1, core).reshape(8, 12, 3) * layer.scaling["default"]
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)
    torch.testing.assert_close(output(ours, x), output(ours.merge_and_unload(), x), atol=ATOL, rtol=0)


def test_divergence_decompose_factor_must_divide():
    """peft quietly falls back to another split when ``decompose_factor`` does not divide a size; peftlab
    refuses, naming the module and its sizes (the factor the user asked for would not be the one used)."""
    peft.get_peft_model(base_model("mlp"), peft.LoKrConfig(target_modules=["lin0"], decompose_factor=3))
    model = base_model("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"decompose_factor=3 does not divide .*'lin0'"):
        peftlab.get_peft_model(model, peftlab.LoKrConfig(target_modules=["lin0"], decompose_factor=3))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
