"""(IA)³ against peft (the oracle), in both directions.

The shared harness (``tests/interop.py``) runs every case: under one seed a fresh adapter is the same tensor
for tensor (both draw a normal vector per layer, in the same order, then set it to ones) and the identity;
filled with values seeded by their names, both give the same modules, trainable tensors, count line and
outputs; the same merged weights and merged/unmerged/disabled outputs and unloaded model; peftlab's files
load in peft and peft's in peftlab with the same outputs; the files hold the same tensors and config;
training steps give the same vectors; several adapters travel both ways. This file adds add_weighted_adapter.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import output, quiet
from interop import DIRECTIONS, LIBS, Interop
from torch import nn

pytestmark = pytest.mark.peer


class ConvNet(nn.Module):
    """A plain 3×3 Conv2d, a grouped one and a head: output scaling on the first, input scaling on the second."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.head = nn.Linear(6 * 16, 5)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv_b(torch.relu(self.conv_a(X)))).flatten(1))


# unmerging divides W by the vector, so the restored W₀ (and the disabled outputs after a merge and an unmerge)
# may differ from the original in the last bit, differently in each library
H = Interop("IA3", prefixes=("ia3_",), atol=1e-5, weight_atol=1e-6, disabled_atol=1e-6, init_key="init_ia3_weights",
            extra_models={"convnet": (ConvNet, (4, 4, 4))}, file_markers={"IA3": ".ia3_l"})
ATOL = H.atol

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

TRAIN_CASES = [c for c in CASES if c[1] in ("llama", "convnet", "mlp", "gpt2")]

globals().update(H.case_tests(CASES, "test_peftlab_saves_peft_loads", "test_peft_saves_peftlab_loads",
                              "test_same_files"))
globals().update(H.case_tests(TRAIN_CASES, "test_training_steps_match"))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fresh_adapter_and_model_are_the_same(case, pair_cache):
    H.check_fresh(case)
    H.check_same_model(case, *H.pair(pair_cache, case))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_numerics(case):
    """(IA)³ has no ΔW of its own to compare: it scales W₀ (rows, or columns for feed-forward layers)."""
    H.check_merge_cycle(case, delta=False)


MULTI = ("llama", "llama", [dict(task_type="CAUSAL_LM"), dict(target_modules=["q_proj", "up_proj"],
                                                                feedforward_modules=["up_proj"], task_type="CAUSAL_LM")])


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_several_adapters_both_ways(direction, tmp_path):
    H.check_several_adapters_both_ways(MULTI, direction, tmp_path, mixed="peftlab")


def test_add_weighted_adapter_matches_peft_where_every_source_is_present():
    models = {}
    for name, lib in LIBS.items():
        pm = H.build(name, ("-", "llama", dict(task_type="CAUSAL_LM")))
        pm.add_adapter("b", lib.IA3Config(task_type="CAUSAL_LM"))
        H.fill(pm, "b")
        with quiet():
            pm.add_weighted_adapter(["default", "b"], [0.6, 0.4], "mix")
            pm.set_adapter("mix")
        models[name] = pm.eval()
    x = H.inputs("llama")
    torch.testing.assert_close(output(models["peftlab"], x), output(models["peft"], x), atol=ATOL, rtol=0)
    ours, ref = H.adapter_params(models["peftlab"]), H.adapter_params(models["peft"])
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-7, rtol=0, msg=k)
