"""(IA)³ against peft (the oracle), in both directions.

For each configuration the same tiny model is built twice, once per library. A fresh adapter made under the
same seed must be the same tensor for tensor (both draw a normal vector per layer, in the same order, then
set it to ones); then every vector is filled with values seeded by its name, so both adapters are identical
and non-trivial, and the checks follow test_loha_lokr_interop.py: the same modules, trainable tensors,
count line and outputs; the same merged weights and merged/disabled outputs; peftlab's files load in peft and
peft's in peftlab with the same outputs; the files hold the same tensors and config keys; training steps give
the same vectors; several adapters travel both ways.
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
ATOL = 1e-5


class ConvNet(nn.Module):
    """A plain 3×3 Conv2d, a grouped one and a head: output scaling on the first, input scaling on the second."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.head = nn.Linear(6 * 16, 5)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv_b(torch.relu(self.conv_a(X)))).flatten(1))


def make_model(name: str) -> nn.Module:
    if name == "convnet":
        torch.manual_seed(0)
        return ConvNet()
    return base_model(name)


def inputs(name: str, batch: int = 2):
    if name == "convnet":
        return torch.randn(batch, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    return example_inputs(name, batch=batch)


# (case name, tiny model, config kwargs)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("llama-default", "llama", dict(task_type="CAUSAL_LM")),
    ("bert-cls-default", "bert_cls", dict(task_type="SEQ_CLS")),
    ("bert-encoder-default", "bert", dict(task_type="FEATURE_EXTRACTION")),
    ("llama-regex", "llama", dict(target_modules=r".*\.(k_proj|v_proj|up_proj|down_proj)",
                                  feedforward_modules=r".*\.(down_proj|up_proj)", task_type="CAUSAL_LM")),
    ("t5-default", "t5", dict(task_type="SEQ_2_SEQ_LM")),
    ("t5-regex-decoder", "t5", dict(target_modules=r".*decoder.*(SelfAttention|EncDecAttention)\.(k|v)|.*wo",
                                    feedforward_modules=r".*decoder.*wo", task_type="SEQ_2_SEQ_LM")),
    ("gpt2-conv1d-default", "gpt2", dict(task_type="CAUSAL_LM")),
    ("opt-default", "opt", dict(task_type="CAUSAL_LM")),
    ("convnet-conv2d", "convnet", dict(target_modules=["conv_a", "conv_b", "head"], feedforward_modules=["conv_b"])),
    ("mlp-modules-to-save", "mlp", dict(target_modules=["lin0"], feedforward_modules=["lin0"],
                                        modules_to_save=["lin1"])),
    ("mlp-init-false", "mlp", dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"],
                                   init_ia3_weights=False)),
]
IDS = [c[0] for c in CASES]


@contextlib.contextmanager
def no_warnings():
    """Fail on any warning other than the known FutureWarning/DeprecationWarning noise."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    real = [w for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not real, [f"{w.category.__name__}: {w.message}" for w in real]


def fill_trainable(model: nn.Module, adapter: str = "default") -> None:
    shared_fill_trainable(model, adapter, prefixes=("ia3_",))


def build(lib_name: str, model: str, kwargs: dict[str, Any], fill: bool = True, seed: int = 7):
    base = make_model(model)
    torch.manual_seed(seed)
    with quiet():  # GPT-2's fan_in_fan_out fix-up
        pm = LIBS[lib_name].get_peft_model(base, LIBS[lib_name].IA3Config(**kwargs))
    if fill:
        fill_trainable(pm)
    return pm.eval()


def adapter_params(pm) -> dict[str, torch.Tensor]:
    return {n: p for n, p in pm.named_parameters()
            if any(s.startswith(("ia3_", "modules_to_save")) for s in n.split("."))}


def count_line(pm) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pm.print_trainable_parameters()
    return buf.getvalue()


def read_files(folder) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(str(folder / "adapter_model.safetensors")), json.loads((folder / "adapter_config.json").read_text())


def as_comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: (sorted(map(str, v)) if isinstance(v, list) else v) for k, v in cfg.items()}


@pytest.fixture(scope="module")
def pair_cache():
    return {}


def pair(cache, case):
    name, model, kwargs = case
    if name not in cache:
        cache[name] = (build("peft", model, kwargs), build("peftlab", model, kwargs))
    return cache[name]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fresh_adapter_and_model_are_the_same(case):
    name, model, kwargs = case
    ref, ours = build("peft", model, kwargs, fill=False), build("peftlab", model, kwargs, fill=False)
    ref_p, our_p = adapter_params(ref), adapter_params(ours)
    assert {k: tuple(v.shape) for k, v in our_p.items()} == {k: tuple(v.shape) for k, v in ref_p.items()}
    for k in ref_p:
        assert torch.equal(our_p[k], ref_p[k]), k
    assert count_line(ours) == count_line(ref)
    assert {n for n, m in ours.get_base_model().named_modules() if isinstance(m, AdapterLayer)} == \
        {n for n, m in ref.get_base_model().named_modules() if isinstance(m, BaseTunerLayer)}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in ref.named_parameters() if p.requires_grad}
    x = inputs(model)
    torch.testing.assert_close(output(ours, x), output(ref, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_numerics(case):
    name, model, kwargs = case
    ref, ours = build("peft", model, kwargs), build("peftlab", model, kwargs)
    x = inputs(model)
    unmerged = output(ours, x)
    torch.testing.assert_close(unmerged, output(ref, x), atol=ATOL, rtol=0)
    with quiet():
        ref.merge_adapter()
    ours.merge_adapter()
    ref_layers = {n: m for n, m in ref.get_base_model().named_modules() if isinstance(m, BaseTunerLayer)}
    for key, layer in ((n, m) for n, m in ours.get_base_model().named_modules() if isinstance(m, AdapterLayer)):
        for what in ("weight", "bias"):
            got, want = getattr(layer.get_base_layer(), what), getattr(ref_layers[key].get_base_layer(), what)
            if want is not None:
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=f"{key}.{what}")
    torch.testing.assert_close(output(ours, x), unmerged, atol=ATOL, rtol=0)
    with quiet():
        ref_plain, our_plain = ref.merge_and_unload(), ours.merge_and_unload()
    ref_sd, our_sd = ref_plain.state_dict(), our_plain.state_dict()
    assert our_sd.keys() == ref_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(our_sd[k], ref_sd[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peftlab_saves_peft_loads(case, pair_cache, tmp_path):
    name, model, kwargs = case
    _, ours = pair(pair_cache, case)
    ours.save_pretrained(tmp_path)
    with no_warnings():
        loaded = peft.PeftModel.from_pretrained(make_model(model), tmp_path)
    x = inputs(model)
    torch.testing.assert_close(output(loaded, x), output(ours, x), atol=ATOL, rtol=0)
    ref_params = dict(loaded.named_parameters())
    for n, p in adapter_params(ours).items():
        torch.testing.assert_close(ref_params[n], p, atol=0, rtol=0, msg=n)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_saves_peftlab_loads(case, pair_cache, tmp_path):
    name, model, kwargs = case
    ref, _ = pair(pair_cache, case)
    with quiet():
        ref.save_pretrained(tmp_path)
    with no_warnings():
        loaded = peftlab.PeftModel.from_pretrained(make_model(model), tmp_path)
    assert type(loaded.peft_config["default"]).__name__ == "IA3Config"
    x = inputs(model)
    torch.testing.assert_close(output(loaded, x), output(ref, x), atol=ATOL, rtol=0)
    our_params = dict(loaded.named_parameters())
    for n, p in adapter_params(ref).items():
        torch.testing.assert_close(our_params[n], p, atol=0, rtol=0, msg=n)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_files(case, pair_cache, tmp_path):
    name, model, kwargs = case
    ref, ours = pair(pair_cache, case)
    with quiet():
        ref.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "peftlab")
    ref_tensors, ref_config = read_files(tmp_path / "peft")
    our_tensors, our_config = read_files(tmp_path / "peftlab")
    assert any(k.endswith(".ia3_l") for k in our_tensors)
    assert our_tensors.keys() == ref_tensors.keys()
    for k in ref_tensors:
        assert our_tensors[k].dtype == ref_tensors[k].dtype, k
        assert torch.equal(our_tensors[k], ref_tensors[k]), k
    assert our_config.keys() == ref_config.keys()
    assert as_comparable(our_config) == as_comparable(ref_config)


TRAIN_CASES = [c for c in CASES if c[1] in ("llama", "convnet", "mlp", "gpt2")]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_training_steps_match(case):
    name, model, kwargs = case
    x = inputs(model, batch=3)
    trained = {}
    for lib in LIBS:
        pm = build(lib, model, kwargs).train()
        if model == "mlp":
            pm.get_base_model().drop.p = 0.0
        opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            out = pm(**x) if isinstance(x, dict) else pm(x)
            out = out if isinstance(out, torch.Tensor) else out.logits
            out.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        trained[lib] = adapter_params(pm)
    assert trained["peftlab"].keys() == trained["peft"].keys()
    for k in trained["peft"]:
        torch.testing.assert_close(trained["peftlab"][k], trained["peft"][k], atol=2e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("direction", ["peftlab->peft", "peft->peftlab"])
def test_several_adapters_both_ways(direction, tmp_path):
    src, dst = direction.split("->")
    lib = LIBS[src]
    saver = build(src, "llama", dict(task_type="CAUSAL_LM"))
    saver.add_adapter("second", lib.IA3Config(target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"],
                                              task_type="CAUSAL_LM"))
    fill_trainable(saver, "second")
    saver.eval()
    x = inputs("llama", batch=4)

    def run_each(pm):
        outs = {}
        for adapter in ("default", "second"):
            pm.set_adapter(adapter)
            outs[adapter] = output(pm, x)
        pm.set_adapter("default")
        return outs

    expected = run_each(saver)
    with quiet():
        saver.save_pretrained(tmp_path)
    with no_warnings():
        loaded = LIBS[dst].PeftModel.from_pretrained(base_model("llama"), tmp_path)
        loaded.load_adapter(tmp_path / "second", adapter_name="second")
    got = run_each(loaded)
    for adapter in expected:
        torch.testing.assert_close(got[adapter], expected[adapter], atol=ATOL, rtol=0, msg=adapter)


def test_add_weighted_adapter_matches_peft_where_every_source_is_present():
    models = {}
    for name, lib in LIBS.items():
        pm = build(name, "llama", dict(task_type="CAUSAL_LM"))
        pm.add_adapter("b", lib.IA3Config(task_type="CAUSAL_LM"))
        fill_trainable(pm, "b")
        with quiet():
            pm.add_weighted_adapter(["default", "b"], [0.6, 0.4], "mix")
            pm.set_adapter("mix")
        models[name] = pm.eval()
    x = inputs("llama")
    torch.testing.assert_close(output(models["peftlab"], x), output(models["peft"], x), atol=ATOL, rtol=0)
    ours, ref = adapter_params(models["peftlab"]), adapter_params(models["peft"])
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-7, rtol=0, msg=k)
