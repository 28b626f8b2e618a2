"""One table of (case, tiny model, config) rows, each run through every invariant an adapter method keeps.

The table is method-neutral: a row holds any method's config, and a method adds rows plus one entry in
``TRAITS`` (its parameter-count formula from its chapter, which initialisations are the identity, what a
second adapter for a row looks like) — never a new file of copied tests.

Invariants (one test function each, parametrized over ``CASES``):

* identity at init, where the method's default init is the identity (LoRA: B = 0, or A = 0 for
  embeddings), and the opposite for an init that is not;
* only adapter parameters train, exactly the right ones for ``bias`` and ``modules_to_save``
  (adapter tensors are recognised by the method's tensor prefix in the registry, ``lora_``, ``hada_``, ...);
* the trainable count equals the method's formula, plus ``modules_to_save`` copies and trained biases;
* merge then unmerge restores the base weights; merged output equals unmerged (methods that merge);
* save/load round trip gives the same outputs and the same tensors (every trained tensor is saved);
* disabling adapters gives the base model's output exactly;
* deleting an adapter removes every tensor and key of it; ``unload()`` gives back the original classes;
* a mixed batch (``adapter_names=[...]`` with ``"__base__"``) equals each adapter run on its own rows
  (methods that serve mixed batches).

Checks that would be vacuous with a zero-initialised adapter use non-identity adapters: every adapter tensor
is filled with deterministic values seeded by its name (distinct per tensor, so swapped tensors show).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import base_model, fill_, output, output_with_grad, quiet
from torch import nn

from peftlab import (AdaLoraConfig, AdaptionPromptConfig, BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig,
                     OFTConfig, PeftModel, get_peft_model)
from peftlab.config import TargetingConfig
from peftlab.lab.models import example_inputs
from peftlab.registry import get_method, methods
from peftlab.tuners.base import AdapterLayer, layer_features
from peftlab.tuners.modules_to_save import ModulesToSaveWrapper
from peftlab.utils.save_and_load import get_peft_model_state_dict

ATOL_MERGE = 1e-5  # merged vs unmerged output, float32
ATOL_WEIGHTS = 1e-6  # weights after merge + unmerge vs before
ATOL_OUT = 1e-5  # outputs after merge + unmerge vs before (T5's logits reach ~10: a few float32 ulps)
ATOL_IDENTITY = 1e-5  # an init that is the identity up to round-off (PiSSA/OLoRA residual, DoRA's m/‖W‖)


@dataclass
class Case:
    name: str
    model: str
    config: TargetingConfig  # copied for every use: get_peft_model fills in and fixes up its config
    n_targets: int  # how many modules the config must adapt (checked against the model)
    task_modules: tuple[str, ...] = field(default=())  # heads the task type adds to modules_to_save

    def make_config(self, **overrides: Any) -> TargetingConfig:
        config = copy.deepcopy(self.config)
        for k, v in overrides.items():
            setattr(config, k, v)
        return config

    @property
    def traits(self) -> Traits:
        return TRAITS[str(self.config.peft_type)]

    @property
    def method(self):
        return get_method(self.config)


# ---------------------------------------------------------------------------------------------------
# what the table needs to know of each method
# ---------------------------------------------------------------------------------------------------
@dataclass
class Traits:
    """A method's entry: its chapter's parameter-count formula and how its initialisations behave."""

    #: trainable tensors of one adapter in one layer (the formula in the method's chapter); it may also
    #: assert the layer's per-module settings (rank, scaling) against the config
    count: Callable[[AdapterLayer, TargetingConfig, str], int]
    #: "exact" (a fresh adapter changes nothing), "approx" (up to round-off) or None (it changes outputs)
    identity: Callable[[TargetingConfig], str | None]
    #: the config's init value that is the exact identity (used to test "identity" for a row that is not)
    identity_init: Any = True
    #: the initialisation rewrote the base weight (PiSSA/OLoRA): disabling gives that base, not the original
    mutates_base: Callable[[TargetingConfig], bool] = lambda config: False


def expected_r_alpha(config: TargetingConfig, key: str) -> tuple[int, float]:
    """r and α for module ``key`` by peft's pattern rule: first key with re.match(rf'(.*\\.)?({k})$')."""
    import re

    r, alpha = getattr(config, config.RANK_FIELD), getattr(config, config.ALPHA_FIELD)
    for k, v in config.rank_pattern.items():
        if re.match(rf"(.*\.)?({k})$", key):
            r = v
            break
    for k, v in config.alpha_pattern.items():
        if re.match(rf"(.*\.)?({k})$", key):
            alpha = v
            break
    return r, alpha


def lora_count(layer: AdapterLayer, config: LoraConfig, key: str) -> int:
    """LoRA's formula: r·(in+out) per linear, r·(num_emb+dim) per embedding, r·(in·k+out) per conv, plus out
    for lora_bias and for DoRA's magnitude m."""
    r, alpha = expected_r_alpha(config, key)
    assert layer.r["default"] == r, key
    root = math.sqrt(r) if config.use_rslora else r
    assert layer.scaling["default"] == pytest.approx(alpha / root), key
    base = layer.get_base_layer()
    n_in, n_out = layer_features(base)
    if isinstance(base, nn.Embedding):
        return r * (n_in + n_out)
    k = math.prod(base.kernel_size) if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else 1
    return r * (n_in * k + n_out) + (n_out if config.lora_bias else 0) + (n_out if config.use_dora else 0)


def lora_identity(config: LoraConfig) -> str | None:
    init = config.init_lora_weights
    if init is False:
        return None
    if init in (True, "gaussian") and not config.use_dora:
        return "exact"
    return "approx"  # PiSSA/OLoRA (residual base + s·B₀A₀) and DoRA ((m/‖W‖)·W x with m = ‖W‖)


def _lycoris_sizes(layer: AdapterLayer, config: TargetingConfig, key: str) -> tuple[int, int, int, int, bool]:
    """(r, out, in per group, kernel elements, effective conv?) after checking r and α/r against the config."""
    r, alpha = expected_r_alpha(config, key)
    assert layer.r["default"] == r, key
    assert layer.scaling["default"] == pytest.approx(alpha / r), key
    base = layer.get_base_layer()
    if isinstance(base, nn.Linear):
        return r, base.out_features, base.in_features, 1, False
    k = math.prod(base.kernel_size)
    return r, base.out_channels, base.in_channels // base.groups, k, config.use_effective_conv2d and k > 1


def loha_count(layer: AdapterLayer, config: TargetingConfig, key: str) -> int:
    """LoHa's formula: 2r(out + in·k) (two rank-r products); effective conv: 2r(out + in) + 2r²·k (two cores)."""
    r, n_out, n_in, k, effective = _lycoris_sizes(layer, config, key)
    return 2 * r * (n_out + n_in) + 2 * r * r * k if effective else 2 * r * (n_out + n_in * k)


def lokr_count(layer: AdapterLayer, config: TargetingConfig, key: str) -> int:
    """LoKr's formula with out = a·b, in = c·d: W1 is a·c, or r(a + c) when decompose_both and r < max(a, c)/2;
    W2 is b·d·k when r ≥ max(b, d)/2, else r(b + d·k), or r(b + d) + r²·k on an effective conv."""
    from peftlab.tuners.lokr import factorization

    r, n_out, n_in, k, effective = _lycoris_sizes(layer, config, key)
    (a, b), (c, d) = factorization(n_out, config.decompose_factor), factorization(n_in, config.decompose_factor)
    w1 = r * (a + c) if config.decompose_both and r < max(a, c) / 2 else a * c
    if r >= max(b, d) / 2:
        w2 = b * d * k
    else:
        w2 = r * (b + d) + r * r * k if effective else r * (b + d * k)
    return w1 + w2


def lycoris_identity(config: TargetingConfig) -> str | None:
    return None if config.init_weights is False else "exact"  # one zero factor: ΔW = 0 exactly


def adalora_count(layer: AdapterLayer, config: TargetingConfig, key: str) -> int:
    """AdaLoRA's formula: r₀·(in·k + out) for Q and P plus r₀ singular values Λ (r₀ = init_r), scaling α / r₀."""
    r = config.init_r
    assert layer.r["default"] == r, key
    assert layer.factor("default") == pytest.approx(config.lora_alpha / (r + 1e-5), rel=1e-6), key  # peft's ε
    base = layer.get_base_layer()
    n_in, n_out = layer_features(base)
    k = math.prod(base.kernel_size) if isinstance(base, nn.Conv2d) else 1
    return r * (n_in * k + n_out) + r


def ia3_count(layer: AdapterLayer, config: TargetingConfig, key: str) -> int:
    """(IA)³'s formula: one number per input feature of a feed-forward target, per output feature otherwise
    (channels on a convolution)."""
    import re

    ff = config.feedforward_modules
    is_ff = bool(ff) and (re.fullmatch(ff, key) is not None if isinstance(ff, str)
                          else any(key == e or key.endswith("." + e) for e in ff))
    assert layer.is_feedforward["default"] == is_ff, key
    n_in, n_out = layer_features(layer.get_base_layer())
    return n_in if is_ff else n_out
def _rotated_size(layer: AdapterLayer) -> int:
    base = layer.get_base_layer()
    return base.in_channels * math.prod(base.kernel_size) if isinstance(base, nn.Conv2d) else base.in_features


def oft_count(layer: AdapterLayer, config: TargetingConfig, key: str) -> int:
    """OFT's formula: r blocks of b(b−1)/2 free entries (one block with block_share), r·b = in (in·kh·kw)."""
    n = _rotated_size(layer)
    b = config.oft_block_size if config.r == 0 else n // config.r
    assert layer.oft_block_size["default"] == b and layer.r["default"] == n // b, key
    return (1 if config.block_share else n // b) * b * (b - 1) // 2


def boft_count(layer: AdapterLayer, config: TargetingConfig, key: str) -> int:
    """BOFT's formula: m factors of (in/b) full b×b matrices, plus the output scale s (out)."""
    n = _rotated_size(layer)
    b = config.boft_block_size or n // config.boft_block_num
    return config.boft_n_butterfly_factor * (n // b) * b * b + layer_features(layer.get_base_layer())[1]


def orthogonal_identity(approx: bool) -> Callable[[TargetingConfig], str | None]:
    # BOFT computes (W x')·s + b: with s = 1 equal to W x + b up to the rounding of adding b separately
    return lambda config: None if config.init_weights is False else ("approx" if approx else "exact")


def adaption_prompt_count(layer: AdapterLayer, config: TargetingConfig, key: str) -> int:
    """LLaMA-Adapter's formula: adapter_len · hidden (the prompt) + 1 (the gate) per adapted attention module."""
    assert layer.adapter_len["default"] == config.adapter_len, key
    return config.adapter_len * layer.get_base_layer().config.hidden_size + 1


TRAITS: dict[str, Traits] = {
    "ADALORA": Traits(count=adalora_count, identity=lambda c: None if c.init_lora_weights is False else "exact"),
    "LORA": Traits(count=lora_count, identity=lora_identity,
                   mutates_base=lambda c: c.init_lora_weights in ("pissa", "olora")),
    "LOHA": Traits(count=loha_count, identity=lycoris_identity),
    "LOKR": Traits(count=lokr_count, identity=lycoris_identity),
    "IA3": Traits(count=ia3_count, identity=lambda c: "exact" if c.init_ia3_weights else None),
    "OFT": Traits(count=oft_count, identity=orthogonal_identity(False)),
    "BOFT": Traits(count=boft_count, identity=orthogonal_identity(True)),
    # a zero gate: the prompt's attention is multiplied by 0 (no init option; no merge, no mixed batches)
    "ADAPTION_PROMPT": Traits(count=adaption_prompt_count, identity=lambda config: "exact"),
}


LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

CASES = [
    # --- toy modules ----------------------------------------------------------------------------
    Case("mlp-default", "mlp", LoraConfig(target_modules=["lin0"]), 1),
    Case("mlp-both", "mlp", LoraConfig(target_modules=["lin0", "lin1"]), 2),
    Case("mlp-gaussian", "mlp", LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights="gaussian"), 2),
    Case("mlp-init-false", "mlp", LoraConfig(target_modules=["lin0"], init_lora_weights=False), 1),
    Case("mlp-rslora", "mlp", LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=16, use_rslora=True), 2),
    Case("mlp-rank-alpha-pattern", "mlp",
         LoraConfig(target_modules=["lin0", "lin1"], r=8, lora_alpha=8, rank_pattern={"lin0": 3},
              alpha_pattern={"lin1": 32}), 2),
    Case("mlp-dropout", "mlp", LoraConfig(target_modules=["lin0"], lora_dropout=0.1), 1),
    Case("mlp-bias-all", "mlp", LoraConfig(target_modules=["lin0"], bias="all"), 1),
    Case("mlp-bias-lora-only", "mlp", LoraConfig(target_modules=["lin0"], bias="lora_only"), 1),
    Case("mlp-lora-bias", "mlp", LoraConfig(target_modules=["lin0", "lin1"], lora_bias=True), 2),
    Case("mlp-modules-to-save", "mlp", LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]), 1),
    Case("mlp-mts-bias-all", "mlp", LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], bias="all"), 1),
    Case("mlp-regex", "mlp", LoraConfig(target_modules=r"lin\d"), 2),
    Case("mlp-all-linear", "mlp", LoraConfig(target_modules="all-linear"), 2),
    Case("emb-conv1d", "emb_conv1d", LoraConfig(target_modules=["emb", "conv1d"]), 2),
    Case("emb-conv1d-gaussian", "emb_conv1d", LoraConfig(target_modules=["emb", "conv1d", "lin0"], r=4,
                                                   init_lora_weights="gaussian"), 3),
    Case("emb-conv1d-init-false", "emb_conv1d", LoraConfig(target_modules=["emb", "conv1d"], init_lora_weights=False), 2),
    Case("conv1d", "conv1d", LoraConfig(target_modules=["conv1d"], r=4), 1),
    Case("conv1d-lora-bias", "conv1d", LoraConfig(target_modules=["conv1d", "lin0"], r=2, lora_bias=True), 2),
    Case("conv2d", "conv2d", LoraConfig(target_modules=["conv2d"]), 1),
    Case("conv2d-lin-bias-all", "conv2d", LoraConfig(target_modules=["conv2d", "lin0"], bias="all", r=3,
                                                lora_alpha=6), 2),
    # --- tiny transformers models -----------------------------------------------------------------
    Case("llama-qv", "llama", LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), 4),
    Case("llama-all-linear", "llama", LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", r=4), 14),
    Case("llama-layers", "llama", LoraConfig(target_modules=LLAMA_ATTN, layers_to_transform=[1], layers_pattern="layers",
                                       task_type="CAUSAL_LM"), 4),
    Case("llama-embed-rank-pattern", "llama",
         LoraConfig(target_modules=["embed_tokens", "q_proj", "down_proj"], rank_pattern={"down_proj": 2},
              alpha_pattern={r"layers\.0\.self_attn\.q_proj": 2}, task_type="CAUSAL_LM"), 5),
    Case("gpt2-conv1d", "gpt2", LoraConfig(target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM",
                                     fan_in_fan_out=True), 6),
    Case("gpt2-cls", "gpt2_cls", LoraConfig(target_modules=["c_attn"], task_type="SEQ_CLS", fan_in_fan_out=True), 2,
         ("score",)),
    Case("opt-layer0", "opt", LoraConfig(target_modules=["q_proj", "v_proj", "fc1"], layers_to_transform=0,
                                   task_type="CAUSAL_LM", lora_dropout=0.05), 3),
    Case("opt-bias-lora-only", "opt", LoraConfig(target_modules=["q_proj", "out_proj"], bias="lora_only",
                                           task_type="CAUSAL_LM"), 4),
    Case("t5-qv", "t5", LoraConfig(target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"), 12),
    Case("t5-regex", "t5", LoraConfig(target_modules=r".*decoder.*(SelfAttention|EncDecAttention)\.(q|k)",
                                task_type="SEQ_2_SEQ_LM", init_lora_weights="gaussian"), 8),
    Case("bert-qv", "bert", LoraConfig(target_modules=["query", "value"]), 4),
    Case("bert-cls-rslora", "bert_cls", LoraConfig(target_modules=["query", "value", "dense"], task_type="SEQ_CLS",
                                              use_rslora=True, r=4), 11, ("classifier",)),
    # --- LoRA in practice: DoRA, PiSSA, OLoRA, rsLoRA -----------------------------------------------
    Case("mlp-dora", "mlp", LoraConfig(target_modules=["lin0", "lin1"], use_dora=True), 2),
    Case("mlp-dora-bias-all", "mlp", LoraConfig(target_modules=["lin0"], use_dora=True, bias="all",
                                          modules_to_save=["lin1"]), 1),
    Case("mlp-pissa", "mlp", LoraConfig(target_modules=["lin0"], r=4, lora_alpha=8, init_lora_weights="pissa"), 1),
    Case("mlp-olora-rslora", "mlp", LoraConfig(target_modules=["lin0"], r=4, lora_alpha=8, use_rslora=True,
                                         init_lora_weights="olora"), 1),
    Case("llama-dora", "llama", LoraConfig(target_modules=LLAMA_ATTN, use_dora=True, task_type="CAUSAL_LM"), 8),
    Case("llama-pissa-dora-rslora", "llama", LoraConfig(target_modules=["q_proj", "down_proj"], r=4, use_rslora=True,
                                                  init_lora_weights="pissa", use_dora=True,
                                                  task_type="CAUSAL_LM"), 4),
    Case("gpt2-dora", "gpt2", LoraConfig(target_modules=["c_attn", "c_proj"], use_dora=True, fan_in_fan_out=True,
                                   task_type="CAUSAL_LM"), 6),
    Case("gpt2-olora", "gpt2", LoraConfig(target_modules=["c_attn"], init_lora_weights="olora", fan_in_fan_out=True,
                                    task_type="CAUSAL_LM"), 2),
    Case("opt-dora-dropout", "opt", LoraConfig(target_modules=["q_proj", "v_proj"], use_dora=True, lora_dropout=0.1,
                                         task_type="CAUSAL_LM"), 4),
    Case("t5-rslora-r16", "t5", LoraConfig(target_modules=["q", "v"], r=16, lora_alpha=4, use_rslora=True,
                                     task_type="SEQ_2_SEQ_LM"), 12),
    # --- LoHa and LoKr ------------------------------------------------------------------------------
    Case("loha-mlp", "mlp", LoHaConfig(target_modules=["lin0", "lin1"]), 2),
    Case("loha-mlp-patterns-dropouts", "mlp", LoHaConfig(target_modules=r"lin\d", r=4, alpha=8, rank_pattern={"lin1": 2},
                                                        alpha_pattern={"lin0": 3}, rank_dropout=0.2,
                                                        module_dropout=0.1), 2),
    Case("loha-mlp-init-false-mts", "mlp", LoHaConfig(target_modules=["lin0"], init_weights=False,
                                                      modules_to_save=["lin1"]), 1),
    Case("loha-conv2d-flat", "conv2d", LoHaConfig(target_modules=["conv2d", "lin0"], r=2, alpha=4), 2),
    # the effective form multiplies five ±0.1 fills per entry: a large α makes the filled ΔW visible
    Case("loha-conv2d-effective", "conv2d", LoHaConfig(target_modules=["conv2d"], r=3, alpha=3000,
                                                       use_effective_conv2d=True), 1),
    Case("loha-conv1d-effective", "conv1d", LoHaConfig(target_modules=["conv1d"], r=2, alpha=200000,
                                                       use_effective_conv2d=True), 1),
    Case("loha-llama-qv", "llama", LoHaConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), 4),
    Case("loha-t5", "t5", LoHaConfig(target_modules=["q", "v"], r=4, task_type="SEQ_2_SEQ_LM"), 12),
    Case("loha-bert-cls", "bert_cls", LoHaConfig(target_modules=["query", "value"], task_type="SEQ_CLS"), 4,
         ("classifier",)),
    Case("lokr-mlp", "mlp", LoKrConfig(target_modules=["lin0", "lin1"]), 2),
    Case("lokr-mlp-lycoris", "mlp", LoKrConfig(target_modules=["lin0", "lin1"], r=1, init_weights="lycoris",
                                               rank_dropout=0.3, rank_dropout_scale=True), 2),
    Case("lokr-mlp-init-false", "mlp", LoKrConfig(target_modules=["lin0"], init_weights=False), 1),
    Case("lokr-conv2d-flat", "conv2d", LoKrConfig(target_modules=["conv2d"], r=1), 1),
    Case("lokr-conv2d-effective", "conv2d", LoKrConfig(target_modules=["conv2d"], r=1, use_effective_conv2d=True,
                                                       decompose_both=True), 1),
    Case("lokr-llama-decompose-both", "llama", LoKrConfig(target_modules=LLAMA_ATTN, r=1, decompose_both=True,
                                                          task_type="CAUSAL_LM"), 8),
    Case("lokr-llama-factor", "llama", LoKrConfig(target_modules=["q_proj", "up_proj"], decompose_factor=4, r=2,
                                                  rank_pattern={"up_proj": 8}, task_type="CAUSAL_LM"), 4),
    Case("lokr-t5", "t5", LoKrConfig(target_modules=["q", "v", "wo"], r=2, task_type="SEQ_2_SEQ_LM"), 16),
    Case("lokr-bert-cls", "bert_cls", LoKrConfig(target_modules=["query", "value"], r=1, alpha=2, task_type="SEQ_CLS"),
         4, ("classifier",)),
    # --- AdaLoRA -------------------------------------------------------------------------------------
    Case("adalora-mlp", "mlp", AdaLoraConfig(target_modules=["lin0", "lin1"], total_step=10), 2),
    Case("adalora-mlp-dropout-bias-mts", "mlp", AdaLoraConfig(target_modules=["lin0"], init_r=4, target_r=2, lora_alpha=16,
                                                             lora_dropout=0.1, bias="lora_only", total_step=10,
                                                             modules_to_save=["lin1"]), 1),
    Case("adalora-mlp-init-false", "mlp", AdaLoraConfig(target_modules=["lin0"], init_lora_weights=False,
                                                        total_step=10), 1),
    Case("adalora-conv2d", "conv2d", AdaLoraConfig(target_modules=["conv2d", "lin0"], init_r=3, target_r=2,
                                                   total_step=10), 2),
    Case("adalora-llama-layers", "llama", AdaLoraConfig(target_modules=LLAMA_ATTN, layers_to_transform=[1],
                                                        layers_pattern="layers", total_step=10,
                                                        task_type="CAUSAL_LM"), 4),
    Case("adalora-gpt2", "gpt2", AdaLoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, bias="all",
                                               total_step=10, task_type="CAUSAL_LM"), 2),
    Case("adalora-t5", "t5", AdaLoraConfig(target_modules=["q", "v"], init_r=4, target_r=2, total_step=10,
                                           task_type="SEQ_2_SEQ_LM"), 12),
    Case("adalora-bert-cls", "bert_cls", AdaLoraConfig(target_modules=["query", "value"], total_step=10,
                                                       task_type="SEQ_CLS"), 4, ("classifier",)),
    # --- (IA)³ --------------------------------------------------------------------------------------
    Case("ia3-mlp-ff", "mlp", IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]), 2),
    Case("ia3-mlp-regex-init-false", "mlp", IA3Config(target_modules=r"lin\d", feedforward_modules=r".*lin0",
                                                      init_ia3_weights=False), 2),
    Case("ia3-mlp-mts", "mlp", IA3Config(target_modules=["lin0"], feedforward_modules=[], modules_to_save=["lin1"]),
         1),
    Case("ia3-conv2d", "conv2d", IA3Config(target_modules=["conv2d", "lin0"], feedforward_modules=["lin0"]), 2),
    Case("ia3-conv2d-ff", "conv2d", IA3Config(target_modules=["conv2d"], feedforward_modules=["conv2d"]), 1),
    Case("ia3-llama-default", "llama", IA3Config(task_type="CAUSAL_LM"), 6),
    Case("ia3-gpt2-default", "gpt2", IA3Config(task_type="CAUSAL_LM"), 4),
    Case("ia3-t5-default", "t5", IA3Config(task_type="SEQ_2_SEQ_LM"), 16),
    Case("ia3-bert-cls-default", "bert_cls", IA3Config(task_type="SEQ_CLS"), 8, ("classifier",)),
    # --- OFT and BOFT -------------------------------------------------------------------------------
    Case("oft-mlp", "mlp", OFTConfig(target_modules=["lin0", "lin1"], oft_block_size=5), 2),
    Case("oft-mlp-exact-coft-bias", "mlp", OFTConfig(target_modules=["lin0", "lin1"], r=2, oft_block_size=0,
                                                     use_cayley_neumann=False, coft=True, eps=0.5,
                                                     bias="oft_only"), 2),
    Case("oft-mlp-block-share-init-false", "mlp", OFTConfig(target_modules=["lin1"], oft_block_size=4,
                                                            block_share=True, init_weights=False,
                                                            modules_to_save=["lin0"]), 1),
    Case("oft-conv2d", "conv2d", OFTConfig(target_modules=["conv2d", "lin0"], oft_block_size=5), 2),
    Case("oft-llama", "llama", OFTConfig(target_modules=["q_proj", "v_proj"], oft_block_size=8, module_dropout=0.1,
                                         num_cayley_neumann_terms=6, task_type="CAUSAL_LM"), 4),
    Case("boft-mlp", "mlp", BOFTConfig(target_modules=["lin0", "lin1"], boft_block_size=5), 2),
    Case("boft-mlp-butterfly2", "mlp", BOFTConfig(target_modules=["lin1"], boft_block_size=2,
                                                  boft_n_butterfly_factor=2, bias="all"), 1),
    Case("boft-conv2d", "conv2d", BOFTConfig(target_modules=["conv2d"], boft_block_size=9, bias="boft_only"), 1),
    Case("boft-llama-butterfly3", "llama", BOFTConfig(target_modules=["q_proj", "o_proj"], boft_block_size=4,
                                                      boft_n_butterfly_factor=3, boft_dropout=0.1,
                                                      task_type="CAUSAL_LM"), 4),
    Case("boft-bert-cls-butterfly2", "bert_cls", BOFTConfig(target_modules=["query", "value"], boft_block_size=0,
                                                            boft_block_num=8, boft_n_butterfly_factor=2,
                                                            task_type="SEQ_CLS"), 4, ("classifier",)),
    # --- LLaMA-Adapter (the tiny Llama has 2 blocks, 4 query heads over 2 key/value heads) ------------
    Case("adaption-prompt-llama-top", "llama", AdaptionPromptConfig(adapter_len=4, adapter_layers=1,
                                                                    task_type="CAUSAL_LM"), 1),
    Case("adaption-prompt-llama-all", "llama", AdaptionPromptConfig(adapter_len=1, adapter_layers=2,
                                                                    target_modules="self_attn",
                                                                    task_type="CAUSAL_LM"), 2),
]
CASE_IDS = [c.name for c in CASES]


def test_every_registered_method_has_rows():
    """A registered method without rows in this table would go untested."""
    covered = {str(c.config.peft_type) for c in CASES}
    assert {m.peft_type for m in methods() if m.peft_type in TRAITS} <= covered
    assert covered <= set(TRAITS)


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def inputs(case: Case, batch: int = 2):
    return example_inputs(case.model, batch=batch)


def make(case: Case, adapter_name: str = "default", **overrides) -> PeftModel:
    """The case's PeftModel in eval mode (new dropout modules start in training mode, as in peft)."""
    with warnings.catch_warnings():  # Conv1D rows without fan_in_fan_out=True: see test_conv1d_fan_in_fan_out
        warnings.filterwarnings("ignore", message=".*setting fan_in_fan_out", category=UserWarning)
        return get_peft_model(base_model(case.model), case.make_config(**overrides), adapter_name=adapter_name).eval()


def is_adapter_param(name: str, adapter: str, prefix: str) -> bool:
    """A tensor of ``adapter``: a name part starting with the method's prefix followed by the adapter name,
    or a ``modules_to_save`` copy of it."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if parts[i + 1] == adapter and (part.startswith(prefix) or part == "modules_to_save"):
            return True
    return False


def fill_adapter(model: PeftModel, adapter: str, prefix: str, biases: bool = False) -> None:
    """Make ``adapter`` non-trivial (as if trained); with ``biases`` also the trainable base biases."""
    for n, p in model.named_parameters():
        if is_adapter_param(n, adapter, prefix) or (biases and p.requires_grad and n.endswith("bias")):
            fill_(p, f"{adapter}:{n}")


def add_second(model: PeftModel, case: Case, name: str) -> None:
    """Add a non-identity adapter ``name`` with the case's config (bias="none": one adapter may train biases;
    an init that rewrites the base weight would change the shared base again, so the second adapter starts
    from the method's identity init)."""
    overrides: dict[str, Any] = {"bias": "none", "modules_to_save": case.config.modules_to_save}
    if case.traits.mutates_base(case.config) and case.config.INIT_FIELD:
        overrides[case.config.INIT_FIELD] = case.traits.identity_init
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*setting fan_in_fan_out", category=UserWarning)
        model.add_adapter(name, case.make_config(**overrides))
    model.eval()  # the new adapter's dropout modules start in training mode
    fill_adapter(model, name, case.method.prefix)


def trained(case: Case, **overrides) -> PeftModel:
    """The case's model with a non-identity ``default`` adapter (trainable biases filled too)."""
    model = make(case, **overrides)
    fill_adapter(model, "default", case.method.prefix, biases=True)
    return model


def base_params(model: PeftModel, prefix: str) -> dict[str, torch.Tensor]:
    """Weights of the wrapped base model under their original names (adapter tensors left out)."""
    out = {}
    for n, p in model.get_base_model().named_parameters():
        parts = n.split(".")
        if "modules_to_save" in parts or any(is_adapter_param(n, a, prefix) for a in model.peft_config):
            continue
        out[".".join(x for x in parts if x not in ("base_layer", "original_module"))] = p.detach().clone()
    return out


def module_types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


def adapted(model: PeftModel) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, AdapterLayer)}


def expected_trainable(model: PeftModel, case: Case, adapter: str = "default") -> set[str]:
    """Names that must train: the adapter's own tensors, its modules_to_save copies and the biases
    ``bias`` asks for, written from the naming rules rather than taken from the library."""
    bias = case.config.bias
    prefix = case.method.prefix
    want = set()
    for n, _ in model.named_parameters():
        parts = n.split(".")
        if is_adapter_param(n, adapter, prefix):
            want.add(n)
        elif bias == "all" and parts[-1] == "bias" and "original_module" not in parts \
                and "modules_to_save" not in parts and not any(p.startswith(prefix) for p in parts):
            want.add(n)
        elif bias.endswith("_only") and n.endswith("base_layer.bias"):
            want.add(n)
    return want


def _base_with_current_params(case: Case, model: PeftModel) -> nn.Module:
    """A plain base model holding the wrapped model's current base weights (e.g. trained biases)."""
    plain = base_model(case.model)
    plain.load_state_dict(base_params(model, case.method.prefix), strict=False)
    return plain


def _names_in_layers(model: PeftModel) -> set[str]:
    names = set()
    for m in model.get_base_model().modules():
        if isinstance(m, AdapterLayer):
            names.update(m.adapter_names)
            for attr in (*m.adapter_layer_names, *m.other_param_names):
                names.update(getattr(m, attr).keys())
        elif isinstance(m, ModulesToSaveWrapper):
            names.update(m.modules_to_save.keys())
    return names


# ---------------------------------------------------------------------------------------------------
# the invariants
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_identity_at_init(case: Case):
    kind = case.traits.identity(case.config)
    x = inputs(case)
    expected = output(base_model(case.model), x)
    if kind is None:  # the opposite claim: this init changes the output ...
        assert not torch.allclose(output(make(case), x), expected, atol=1e-6)
        # ... while the method's identity init does not
        torch.testing.assert_close(output(make(case, **{case.config.INIT_FIELD: case.traits.identity_init}), x),
                                   expected, atol=0, rtol=0)
        return
    atol = 0 if kind == "exact" else ATOL_IDENTITY
    torch.testing.assert_close(output(make(case), x), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_only_adapter_parameters_trainable(case: Case):
    model = make(case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(model, case)
    assert not any(n.endswith("base_layer.weight") for n in trainable)
    for m in case.task_modules:
        assert any(f"{m}.modules_to_save.default." in n for n in trainable), f"task head {m} is not trained"
    # a gradient step moves exactly the trainable tensors
    fill_adapter(model, "default", case.method.prefix)  # a non-identity adapter, so every tensor gets gradients
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = output_with_grad(model, inputs(case))
    out.float().pow(2).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved <= trainable
    assert moved, "no parameter moved in a gradient step"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parameter_count_formula(case: Case, capsys):
    base = base_model(case.model)
    base_total = sum(p.numel() for p in base.parameters())
    model = make(case)
    layers = adapted(model)
    assert len(layers) == case.n_targets, sorted(layers)
    config = model.peft_config["default"]
    adapter_total = sum(case.traits.count(layer, config, key) for key, layer in layers.items())
    expected = adapter_total
    copies = 0
    for _, w in model.get_base_model().named_modules():
        if isinstance(w, ModulesToSaveWrapper):
            copies += sum(p.numel() for p in w.original_module.parameters())
    bias = case.config.bias
    if bias == "all":  # every bias of the base model; a modules_to_save copy's bias is already counted
        wrapped = {n for n, m in base.named_modules()
                   if isinstance(model.get_base_model().get_submodule(n), ModulesToSaveWrapper)} if copies else set()
        expected += sum(p.numel() for n, p in base.named_parameters()
                        if n.endswith("bias") and n.rpartition(".")[0] not in wrapped)
    elif bias.endswith("_only"):
        expected += sum(layer.get_base_layer().bias.numel() for layer in layers.values()
                        if layer.get_base_layer().bias is not None)
    expected += copies
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    # all params = base + adapter tensors + the copies (biases are base tensors, counted once)
    assert total == base_total + adapter_total + copies
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert line == (f"trainable params: {expected:,d} || all params: {total:,d} || "
                    f"trainable%: {100 * expected / total:.4f}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_merge_unmerge_restores_and_merged_equals_unmerged(case: Case):
    model = trained(case)
    prefix = case.method.prefix
    if not case.method.supports_merge:
        with pytest.raises(ValueError, match="no weight form"):
            model.merge_adapter()
        return
    x = inputs(case)
    unmerged = output(model, x)
    before = base_params(model, prefix)
    model.merge_adapter()
    merged_weights = base_params(model, prefix)
    assert any(not torch.equal(before[k], merged_weights[k]) for k in before), "merging changed nothing"
    torch.testing.assert_close(output(model, x), unmerged, atol=ATOL_MERGE, rtol=0)
    model.unmerge_adapter()
    after = base_params(model, prefix)
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=ATOL_WEIGHTS, rtol=0, msg=k)
    torch.testing.assert_close(output(model, x), unmerged, atol=ATOL_OUT, rtol=0)
    # merge_and_unload: the plain model with the original classes computes the adapted output
    types = module_types(base_model(case.model))
    plain = model.merge_and_unload()
    assert module_types(plain) == types
    torch.testing.assert_close(output(plain, x), unmerged, atol=ATOL_MERGE, rtol=0)


MERGING_CASES = [c for c in CASES if c.method.supports_merge]


@pytest.mark.parametrize("case", MERGING_CASES, ids=[c.name for c in MERGING_CASES])
def test_merged_adapter_and_active_unmerged_one_compose(case: Case):
    """An adapter merged into the base weight while another stays active and unmerged: the active one acts on
    top of the merged weight, so the output equals merging both (peft 0.21.2 drops the unmerged one: see
    book/peft_differences.md)."""
    x = inputs(case)
    model = trained(case)
    add_second(model, case, "other")  # "default" stays the active adapter
    before = base_params(model, case.method.prefix)
    model.merge_adapter(["other"])
    partial = output(model, x)
    after = base_params(model, case.method.prefix)
    assert any(not torch.equal(before[k], after[k]) for k in before), "merging changed nothing"
    # what peft computes: the adapted layers give their (merged) base layer's output alone
    skipping = copy.deepcopy(model)
    for layer in adapted(skipping).values():
        layer.set_adapter([], trainable=False)
    dropped = output(skipping, x)
    model.merge_adapter(["default"])
    full = output(model, x)
    torch.testing.assert_close(partial, full, atol=ATOL_MERGE, rtol=0)
    gap, err = (dropped - full).abs().max(), (partial - full).abs().max()
    assert gap > 10 * err, f"the active adapter's effect ({gap:.2e}) is lost in rounding ({err:.2e})"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_save_load_round_trip(case: Case, tmp_path):
    model = trained(case)
    x = inputs(case)
    expected = output(model, x)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    with quiet():
        loaded = PeftModel.from_pretrained(base_model(case.model), tmp_path)
    assert type(loaded) is type(model)
    torch.testing.assert_close(output(loaded, x), expected, atol=0, rtol=0)
    saved, reloaded = get_peft_model_state_dict(model), get_peft_model_state_dict(loaded)
    assert saved.keys() == reloaded.keys()
    for k in saved:
        assert torch.equal(saved[k], reloaded[k]), k
    # every tensor that trained comes back (bias="lora_only" included: peft issue #3306)
    loaded_params = dict(loaded.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(loaded_params[n], p), n
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default
    with quiet():
        trainable = PeftModel.from_pretrained(base_model(case.model), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_disable_restores_base(case: Case):
    x = inputs(case)
    original = output(base_model(case.model), x)
    model = trained(case)
    adapted_out = output(model, x)
    assert not torch.allclose(adapted_out, original, atol=1e-6)
    bias = case.config.bias
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with model.disable_adapter():
            disabled = output(model, x)
    if bias == "none" and not case.traits.mutates_base(case.config):
        torch.testing.assert_close(disabled, original, atol=0, rtol=0)
    else:  # trained biases stay (and a warning says so), PiSSA/OLoRA leave the residual base: disabled = that base
        if bias != "none":
            assert any("bias" in str(w.message) for w in caught)
        torch.testing.assert_close(disabled, output(_base_with_current_params(case, model), x), atol=0, rtol=0)
    torch.testing.assert_close(output(model, x), adapted_out, atol=0, rtol=0)
    if not case.method.supports_merge:
        return
    # disabling a merged model unmerges first, so it still computes the base
    model.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bias warning again
        with model.disable_adapter():
            torch.testing.assert_close(output(model, x), disabled, atol=ATOL_OUT, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_delete_removes_everything(case: Case):
    x = inputs(case)
    model = trained(case)
    expected = output(model, x)
    prefix = case.method.prefix
    # a second adapter, added then deleted, leaves no trace
    add_second(model, case, "other")
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert "other" not in _names_in_layers(model)
    assert not [k for k in model.state_dict() if "other" in k.split(".")]
    torch.testing.assert_close(output(model, x), expected, atol=0, rtol=0)
    # switch to a second adapter and delete the first: nothing of "default" remains
    add_second(model, case, "second")
    model.set_adapter("second")
    model.delete_adapter("default")
    assert set(model.peft_config) == {"second"} and model.active_adapter == "second"
    assert "default" not in _names_in_layers(model)
    assert not [k for k in model.state_dict() if "default" in k.split(".")]
    assert len(adapted(model)) == case.n_targets
    # unload: the original classes, with the original weights (trained biases aside)
    types = module_types(base_model(case.model))
    current = base_params(model, prefix)
    plain = model.unload()
    assert module_types(plain) == types
    sd = plain.state_dict()
    for k, v in current.items():
        assert torch.equal(sd[k], v), k
    if case.config.bias == "none" and not case.traits.mutates_base(case.config):
        torch.testing.assert_close(output(plain, x), output(base_model(case.model), x), atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mixed_batch_equals_separate_runs(case: Case):
    x = inputs(case, batch=4)
    model = trained(case)
    add_second(model, case, "other")
    names = ["other", "__base__", "default", "other"]
    if not case.method.supports_mixed_batch:
        with pytest.raises(ValueError, match="mixed batches"):
            output(model, x, adapter_names=names)
        return
    mixed = output(model, x, adapter_names=names)
    alone = {"default": output(model, x)}
    model.set_adapter("other")
    alone["other"] = output(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with model.disable_adapter():
            alone["__base__"] = output(model, x)
    assert not torch.allclose(alone["default"], alone["other"], atol=1e-6)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-6, rtol=0, msg=f"row {row} ({name})")


def test_conv1d_fan_in_fan_out():
    """GPT-2's Conv1D stores its weight (in, out): LoRA sets fan_in_fan_out=True with a warning (as peft does,
    changing the config), and ΔW comes out transposed like the weight."""
    config = LoraConfig(target_modules=["c_attn"])
    with pytest.warns(UserWarning, match="fan_in_fan_out=True"):
        model = get_peft_model(base_model("gpt2"), config)
    assert config.fan_in_fan_out is True
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    fill_adapter(model, "default", "lora_")
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert layer.get_base_layer().weight.shape == (32, 96)  # (in, out)
    torch.testing.assert_close(layer.get_delta_weight("default"), (B @ A).T * layer.scaling["default"])
    with pytest.warns(UserWarning, match="fan_in_fan_out=False"):
        get_peft_model(base_model("mlp"), LoraConfig(target_modules=["lin0"], fan_in_fan_out=True))
