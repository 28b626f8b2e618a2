"""OFT and BOFT against peft (the oracle), in both directions, and the places where peftlab differs on purpose.

The shared harness (``tests/interop.py``) runs every case: under one seed a fresh random adapter
(``init_weights=False``) comes out tensor for tensor the same, and the default one is the identity; filled
with values seeded by their names, both give the same outputs, trainable tensors and count line, the same
merged and unmerged weights, disabled outputs and unloaded model; each library's files load in the other with
the same outputs, and both write the same files (tensors and config).

Pinned differences (peft 0.21.2 on a CPU):

* BOFT with ``boft_n_butterfly_factor=2``: peft without its CUDA extension warns and builds one factor while
  the config keeps 2; peftlab builds two everywhere. Such a file is checked against a reference built from
  peft's own pieces (its permutation matrices and Cayley map), and peft cannot load it.
* OFT on a k×k convolution (k > 1) with padding: peft rotates unfolded patches and folds them back, so a
  fresh adapter is not the identity and merged ≠ unmerged; peftlab's unmerged output equals peft's merged one.
* OFT ``module_dropout``: peft stores it but never applies it; peftlab drops blocks in training.
* An OFT block size that does not divide a layer: peft picks a nearby divisor with a warning; peftlab refuses.
* Two OFT adapters active at once: peft's unmerged forward composes them in the opposite order to its merge;
  peftlab's forward composes them as merging does.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import base_model, output, quiet
from interop import LIBS, Interop, peft
from safetensors.torch import load_file
from torch import nn

import peftlab

pytestmark = pytest.mark.peer

# Unmerging rotates W back by Rᵀ: W₀ (and the disabled outputs after a merge and an unmerge) comes back only to
# float rounding, differently in each library. peft on a CPU warns when it builds or loads BOFT (no CUDA
# extension: one butterfly factor, see test_boft_two_factors_peft_cpu_fallback_and_reference).
H = Interop("OFT", prefixes=("oft_", "boft_"), atol=1e-5, weight_atol=1e-6, unmerge_atol=1e-5, disabled_atol=1e-5,
            identity_atol=1e-6, file_markers={"OFT": "oft_R", "BOFT": "boft_R"},
            known_warnings=("Failed to load the CUDA extension", "Setting boft_n_butterfly_factor to 1"))
ATOL = H.atol

# (case name, method, tiny model, config kwargs)
CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("OFT-mlp", "OFT", "mlp", dict(target_modules=["lin0", "lin1"], oft_block_size=5)),
    ("OFT-mlp-exact-r-bias", "OFT", "mlp", dict(target_modules=["lin0", "lin1"], r=2, oft_block_size=0,
                                                use_cayley_neumann=False, bias="oft_only")),
    ("OFT-mlp-share-coft", "OFT", "mlp", dict(target_modules=["lin0", "lin1"], oft_block_size=5, block_share=True,
                                              coft=True, eps=0.5, num_cayley_neumann_terms=6)),
    ("OFT-conv2d", "OFT", "conv2d", dict(target_modules=["conv2d", "lin0"], oft_block_size=5)),
    ("OFT-llama", "OFT", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], oft_block_size=8,
                                       task_type="CAUSAL_LM")),
    ("OFT-bert-cls", "OFT", "bert_cls", dict(target_modules=["query", "value"], r=4, oft_block_size=0,
                                             task_type="SEQ_CLS")),
    ("BOFT-mlp", "BOFT", "mlp", dict(target_modules=["lin0", "lin1"], boft_block_size=5)),
    ("BOFT-conv2d", "BOFT", "conv2d", dict(target_modules=["conv2d", "lin0"], boft_block_size=5)),
    ("BOFT-llama-blocks-bias", "BOFT", "llama", dict(target_modules=["q_proj", "o_proj"], boft_block_size=0,
                                                     boft_block_num=4, bias="boft_only", task_type="CAUSAL_LM")),
    ("BOFT-t5", "BOFT", "t5", dict(target_modules=["q", "v"], boft_block_size=8, task_type="SEQ_2_SEQ_LM")),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fresh_random_adapter_is_the_same(case):
    """``init_weights=False``: the same draws in the same order; and the default init is the identity in both."""
    H.check_fresh(case, init_weights=False)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_model_outputs_and_merge(case, pair_cache):
    ref, ours = H.pair(pair_cache, case)
    H.check_same_model(case, ref, ours)
    x = H.inputs(case[2])
    assert not torch.allclose(output(ours, x), output(base_model(case[2]), x), atol=1e-5)
    H.check_merge_cycle(case, delta=False)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_files_travel_both_ways(case, pair_cache, tmp_path):
    ref, ours = H.pair(pair_cache, case)
    for src, dst in ((ours, "peft"), (ref, "peftlab")):
        loaded = H.check_loads_in_other(case, src, dst, tmp_path / dst, resave=dst == "peftlab")
        assert type(loaded.base_model).__name__ == f"{case[1]}Model"
    H.check_same_files(case, ref, ours, tmp_path / "files")


# ---------------------------------------------------------------------------------------------------
# where peftlab differs on purpose
# ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="peft's CPU fallback: with CUDA it may build its extension")
def test_boft_two_factors_peft_cpu_fallback_and_reference(tmp_path):
    """peft on a CPU builds one factor for boft_n_butterfly_factor=2 (with a warning), so a peft-format file
    with two factors is checked against a reference assembled from peft's own permutations and Cayley map."""
    from peft.tuners.boft.layer import BOFTLayer as PeftBOFTLayer

    kwargs = dict(target_modules=["q_proj"], boft_block_size=4, boft_n_butterfly_factor=2, task_type="CAUSAL_LM")
    with pytest.warns(UserWarning, match="Setting boft_n_butterfly_factor to 1"):
        torch.manual_seed(0)
        ref = peft.get_peft_model(base_model("llama"), peft.BOFTConfig(**kwargs))
    assert ref.peft_config["default"].boft_n_butterfly_factor == 2  # the config still says 2 ...
    ref_layer = ref.base_model.model.model.layers[0].self_attn.q_proj
    assert ref_layer.boft_R["default"].shape == (1, 8, 4, 4)  # ... but one factor trains
    ours = H.build("peftlab", ("-", "BOFT", "llama", kwargs))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.boft_R["default"].shape == (2, 8, 4, 4)
    # the reference: R = P_1 B_1 P_1ᵀ · P_0 B_0 P_0ᵀ from peft's helpers, applied as peft's forward does
    a = layer.boft_R["default"].detach().double()
    blocks = PeftBOFTLayer.cayley_batch(None, a.reshape(-1, 4, 4)).view(2, 8, 4, 4)
    rot = torch.eye(32, dtype=torch.float64)
    for i in range(2):
        perm = PeftBOFTLayer.block_butterfly_perm(None, 32, 8 // 2**i, 2, 1)
        p = PeftBOFTLayer.perm2mat(None, perm).double()
        rot = p @ torch.block_diag(*blocks[i]) @ p.T @ rot
    with torch.no_grad():
        torch.testing.assert_close(layer.rotation("default").double(), rot, atol=1e-6, rtol=0)
    assert (rot.abs() > 1e-9).double().mean() == pytest.approx(0.25)  # 8-wide blocks: two factors mixed
    x = torch.randn(3, 32, dtype=torch.float64)
    base = layer.get_base_layer()
    expected = (x @ rot) @ base.weight.double().T * layer.boft_s["default"].double().view(-1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x.float()).double(), expected, atol=1e-5, rtol=0)
    # the file holds both factors, and peft (one factor on a CPU) cannot load it
    ours.save_pretrained(tmp_path)
    assert load_file(str(tmp_path / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.self_attn.q_proj.boft_R"].shape == (2, 8, 4, 4)
    with quiet(), pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    again = H.load("peftlab", "llama", tmp_path).eval()
    x = H.inputs("llama")
    torch.testing.assert_close(output(again, x), output(ours, x), atol=0, rtol=0)


class PaddedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_oft_padded_conv_peft_quirk(tmp_path):
    """peft's unfold → rotate → fold on a 3×3 convolution sums overlapping patches: its fresh adapter is not the
    identity, and its unmerged output differs from its merged one. peftlab rotates the filters: identity at init,
    and its unmerged output equals peft's merged output for the same file."""
    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    kwargs = dict(target_modules=["conv"], oft_block_size=6)
    base_out = PaddedConv()(x).detach()
    case = ("padded-conv", "OFT", "-", kwargs)
    fresh_ref = H.build("peft", case, fill=False, base=PaddedConv())
    assert not torch.allclose(output(fresh_ref, x), base_out, atol=1e-3)
    fresh = H.build("peftlab", case, fill=False, base=PaddedConv())
    torch.testing.assert_close(output(fresh, x), base_out, atol=1e-6, rtol=0)
    ref = H.build("peft", case, base=PaddedConv())
    ours = H.build("peftlab", case, base=PaddedConv())
    ours_out = output(ours, x)
    with quiet():
        ref.merge_adapter()
    torch.testing.assert_close(ours_out, output(ref, x), atol=ATOL, rtol=0)


def test_oft_module_dropout_peft_never_applies_it():
    kwargs = dict(target_modules=["lin1"], oft_block_size=2, module_dropout=0.5)
    x = H.inputs("mlp")
    for lib, differs in (("peft", False), ("peftlab", True)):
        pm = H.build(lib, ("-", "OFT", "mlp", kwargs))
        pm.base_model.model.drop.p = 0.0  # the MLP's own dropout off: only the adapter's counts
        evaluated = output(pm, x)
        pm.train()
        torch.manual_seed(0)
        trained = output(pm, x)
        assert (not torch.allclose(trained, evaluated, atol=1e-6)) == differs, lib


def test_oft_block_size_that_does_not_divide():
    kwargs = dict(target_modules=["lin0"], oft_block_size=4)
    with pytest.warns(UserWarning, match=r"Adjusted `oft_block_size` to \(5\)"):
        ref = peft.get_peft_model(base_model("mlp"), peft.OFTConfig(**kwargs))
    assert ref.base_model.model.lin0.oft_block_size["default"] == 5
    with pytest.raises(ValueError, match=r"oft_block_size=4 does not divide.*\[2, 5, 10\]"):
        peftlab.get_peft_model(base_model("mlp"), peftlab.OFTConfig(**kwargs))


def test_two_active_oft_adapters_compose_as_merging_does():
    """peft rotates x by the first active adapter, then the second, but merges them the other way round, so its
    merged output differs from its unmerged one; peftlab composes them as merging does. One active adapter at a
    time (the case files are about) is the same in both."""
    x = H.inputs("mlp")
    kwargs = dict(target_modules=["lin0"], oft_block_size=5)
    results = {}
    for lib in ("peft", "peftlab"):
        pm = H.build(lib, ("-", "OFT", "mlp", kwargs))
        with quiet():
            pm.add_adapter("other", getattr(LIBS[lib], "OFTConfig")(**kwargs))
        H.fill(pm, "other")
        pm.base_model.set_adapter(["default", "other"])
        unmerged = output(pm, x)
        with quiet():
            pm.merge_adapter()
        results[lib] = (unmerged, output(pm, x))
    assert not torch.allclose(results["peft"][0], results["peft"][1], atol=1e-4)
    torch.testing.assert_close(results["peftlab"][0], results["peftlab"][1], atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftlab"][1], results["peft"][1], atol=ATOL, rtol=0)  # same merged weights
