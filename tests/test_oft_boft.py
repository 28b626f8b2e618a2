"""OFT and BOFT: the rotation math, the butterfly, merging, dropout and the errors.

Invariants shared with every method (identity at init, save/load, delete, mixed batches, ...) are rows of
``test_invariants.py``; the comparison with peft is ``test_oft_boft_interop.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import base_model, fill_trainable, output
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from peftlab import BOFTConfig, OFTConfig, get_peft_model
from peftlab.lab.models import example_inputs
from peftlab.tuners.boft.layer import BOFTLayer
from peftlab.tuners.oft.layer import OFTLayer
from peftlab.tuners.orthogonal import (RotatedLinear, SkewRotation, block_diagonal, block_group, butterfly_perm,
                                       butterfly_rotate, cayley, cayley_neumann, rotation_blocks, skew_from_packed,
                                       skew_from_square)

PREFIXES = ("oft_", "boft_")


def eye_like(r: torch.Tensor) -> torch.Tensor:
    return torch.eye(r.shape[-1], dtype=r.dtype).expand_as(r)


# ---------------------------------------------------------------------------------------------------
# the Cayley map
# ---------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(b=st.integers(2, 12), n=st.integers(1, 4), scale=st.floats(0.0, 20.0), seed=st.integers(0, 2**31 - 1))
def test_cayley_is_orthogonal_for_any_skew_parameter(b, n, scale, seed):
    """RᵀR = RRᵀ = I and det R = +1 for every skew Q, however large (the exact map; float64)."""
    g = torch.Generator().manual_seed(seed)
    vec = torch.randn(n, b * (b - 1) // 2, generator=g, dtype=torch.float64) * scale
    q = skew_from_packed(vec, b)
    assert torch.equal(q, -q.transpose(-2, -1))
    r = cayley(q)
    torch.testing.assert_close(r.transpose(-2, -1) @ r, eye_like(r), atol=1e-10, rtol=0)
    torch.testing.assert_close(r @ r.transpose(-2, -1), eye_like(r), atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(n, dtype=torch.float64), atol=1e-8, rtol=0)
    a = torch.randn(n, b, b, generator=g, dtype=torch.float64) * scale  # BOFT's storage: any square matrix
    rb = cayley(skew_from_square(a))
    torch.testing.assert_close(rb.transpose(-2, -1) @ rb, eye_like(rb), atol=1e-10, rtol=0)


def test_cayley_of_zero_is_the_identity_exactly():
    for b in (2, 5, 32):
        q = torch.zeros(3, b, b)
        assert torch.equal(cayley(q), eye_like(q))
        assert torch.equal(cayley_neumann(q, 5), eye_like(q))


@pytest.mark.parametrize("terms", [2, 3, 4, 5, 6, 8])
def test_neumann_series_is_peft_series(terms):
    """peft's series, term for term (terms 3 and 4 give the same matrix there, and here)."""
    peft_layer = pytest.importorskip("peft.tuners.oft.layer")
    b = 6
    vec = torch.randn(3, b * (b - 1) // 2, generator=torch.Generator().manual_seed(terms)) * 0.3
    module = peft_layer.OFTRotationModule(3, vec.shape[1], b, 3 * b, num_cayley_neumann_terms=terms)
    ref = module._cayley_batch(vec, b, True, terms)
    torch.testing.assert_close(cayley_neumann(skew_from_packed(vec, b), terms), ref, atol=1e-6, rtol=0)
    exact = module._cayley_batch(vec, b, False)
    torch.testing.assert_close(cayley(skew_from_packed(vec, b)), exact, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", [0.01, 0.05])
def test_neumann_error_by_number_of_terms(scale):
    """‖RᵀR − I‖ of peft's series for ‖Q‖ < 1: terms 3 and 4 coincide; with an odd last power (an even number of
    terms) the error falls fast; one more term (an even last power, weight 1) makes it worse again, so peft's
    default of 5 terms is less orthogonal than 4."""
    b = 8
    q = skew_from_packed(torch.randn(4, b * (b - 1) // 2, generator=torch.Generator().manual_seed(0),
                                     dtype=torch.float64) * scale, b)
    err = {k: torch.linalg.matrix_norm(cayley_neumann(q, k).mT @ cayley_neumann(q, k) - eye_like(q)).max().item()
           for k in range(2, 11)}
    assert err[3] == err[4]
    floor = 1e-14  # float64 rounding
    assert all(err[k] > err[k + 2] or err[k + 2] < floor for k in (2, 4, 6, 8, 5, 7))
    assert all(err[k] > 10 * err[k - 1] for k in (5, 7, 9))


# ---------------------------------------------------------------------------------------------------
# the butterfly
# ---------------------------------------------------------------------------------------------------
def perm_matrix(perm: torch.Tensor) -> torch.Tensor:
    p = torch.zeros(len(perm), len(perm), dtype=torch.float64)
    p[torch.arange(len(perm)), perm] = 1.0  # P[j, perm[j]] = 1
    return p


def dense_butterfly(factors: torch.Tensor) -> torch.Tensor:
    """The reference: R = M_{m−1} ⋯ M_0 with M_i = P_i B_i P_iᵀ, every matrix dense (the paper's product)."""
    m, nb, b, _ = factors.shape
    n = nb * b
    rot = torch.eye(n, dtype=factors.dtype)
    for i in range(m):
        p = perm_matrix(butterfly_perm(n, b, i, m))
        rot = p @ torch.block_diag(*factors[i]) @ p.T @ rot
    return rot


@pytest.mark.parametrize("n, b, m", [(16, 4, 1), (16, 4, 2), (16, 2, 4), (32, 4, 3), (24, 2, 3), (48, 8, 2)])
def test_butterfly_rotate_equals_the_dense_product(n, b, m):
    g = torch.Generator().manual_seed(n + b + m)
    factors = cayley(skew_from_square(torch.randn(m, n // b, b, b, generator=g, dtype=torch.float64)))
    x = torch.randn(5, n, generator=g, dtype=torch.float64)
    rot = dense_butterfly(factors)
    torch.testing.assert_close(butterfly_rotate(x, factors), x @ rot, atol=1e-12, rtol=0)
    torch.testing.assert_close(rot.T @ rot, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


def test_butterfly_permutations_are_peft_permutations():
    peft_layer = pytest.importorskip("peft.tuners.boft.layer")
    for n, b, m in [(32, 4, 2), (32, 4, 3), (64, 8, 3), (48, 4, 2), (16, 2, 4), (8, 2, 1)]:
        for i in range(m):
            ref = peft_layer.BOFTLayer.block_butterfly_perm(None, n, int(n // b / 2**i), int(b / 2), m - 1)
            assert torch.equal(butterfly_perm(n, b, i, m), ref), (n, b, m, i)


def test_butterfly_factors_reach_further_and_fill_r():
    """One factor is block-diagonal (density 1/blocks); each factor doubles the reach; log2(n/b) + 1 factors
    make R dense. Identical block-diagonal factors without permutations would stay block-diagonal."""
    n, b = 32, 4
    densities = []
    for m in (1, 2, 3, 4):
        factors = cayley(skew_from_square(torch.randn(m, n // b, b, b, generator=torch.Generator().manual_seed(m),
                                                      dtype=torch.float64)))
        rot = dense_butterfly(factors)
        densities.append((rot.abs() > 1e-12).double().mean().item())
    assert densities[0] == pytest.approx(b / n)
    assert densities == sorted(densities) and densities[-1] == 1.0
    assert densities[1] == pytest.approx(2 * b / n)
    # without the permutations: still block-diagonal
    same = torch.block_diag(*factors[0]) @ torch.block_diag(*factors[1])
    assert (same.abs() > 1e-12).double().mean().item() == pytest.approx(b / n)


def test_boft_two_factors_train_on_cpu():
    """boft_n_butterfly_factor=2 gives two factors on the CPU, both receive gradients, and R stays orthogonal."""
    model = get_peft_model(base_model("llama"), BOFTConfig(target_modules=["q_proj"], boft_block_size=4,
                                                           boft_n_butterfly_factor=2, task_type="CAUSAL_LM"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.boft_R["default"].shape == (2, 8, 4, 4)
    fill_trainable(model, prefixes=PREFIXES)
    model.train()
    x = example_inputs("llama")
    model(**x).loss.backward()
    grad = layer.boft_R["default"].grad
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0
    with torch.no_grad():
        rot = layer.rotation("default").double()
    torch.testing.assert_close(rot.T @ rot, torch.eye(32, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (rot.abs() > 1e-9).double().mean() == pytest.approx(0.25)  # 2 factors of 4-blocks: 8-wide reach


# ---------------------------------------------------------------------------------------------------
# layers: merging, the fused path, convolutions, dropout, several adapters
# ---------------------------------------------------------------------------------------------------
def filled(config, model="mlp", scale: float = 1.0):
    pm = get_peft_model(base_model(model), config).eval()
    fill_trainable(pm, prefixes=PREFIXES)
    if scale != 1.0:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if ("oft_R" in n or "boft_R" in n):
                    p.mul_(scale)
    return pm


@pytest.mark.parametrize("config", [
    OFTConfig(target_modules=["lin0", "lin1"], oft_block_size=5),
    OFTConfig(target_modules=["lin0", "lin1"], oft_block_size=10, use_cayley_neumann=False),
    BOFTConfig(target_modules=["lin0"], boft_block_size=10),
], ids=["oft-neumann", "oft-exact", "boft"])
def test_merge_unmerge_exact_even_for_large_rotations(config):
    """With ‖Q‖ ≈ 1 the truncated series is far from orthogonal; unmerging inverts it (exact Cayley: Rᵀ)."""
    pm = filled(config, scale=10.0)
    x = example_inputs("mlp")
    layer = pm.base_model.model.lin0
    w0 = layer.get_base_layer().weight.detach().clone()
    rot = layer.rotation("default").double()
    err = (rot.T @ rot - torch.eye(10, dtype=torch.float64)).abs().max().item()
    assert (err > 1e-2) == getattr(config, "use_cayley_neumann", False), err
    before = output(pm, x)
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, x), before, atol=1e-5, rtol=0)
    pm.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("neumann", [True, False], ids=["series", "exact"])
def test_fused_training_path_equals_autograd(neumann):
    """RotatedLinear (weight rotated once, hand-written backward) gives autograd's outputs and gradients; with
    the exact map its backward takes G from ∂x (R orthogonal), with the series the general one."""
    torch.manual_seed(0)
    pm = filled(OFTConfig(target_modules=["lin0", "lin1"], oft_block_size=5, use_cayley_neumann=neumann))
    x = example_inputs("mlp").requires_grad_(True)
    grads = {}
    for fused in (True, False):
        for p in pm.parameters():
            p.grad = None
        x.grad = None
        if not fused:  # the generic path: x R, then the frozen layer
            for layer in (pm.base_model.model.lin0, pm.base_model.model.lin1):
                layer.fused_forward = lambda *a, **k: None
        out = pm(x)
        out.pow(2).sum().backward()
        grads[fused] = (out.detach(), x.grad.clone(),
                        [p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad])
    torch.testing.assert_close(grads[True][0], grads[False][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[True][1], grads[False][1], atol=1e-6, rtol=0)
    for a, b in zip(grads[True][2], grads[False][2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("packed", [True, False], ids=["oft-packed", "boft-square"])
@pytest.mark.parametrize("terms", [None, 1, 2, 3, 4, 5, 7], ids=lambda t: "exact" if t is None else f"{t}-terms")
def test_skew_rotation_node_equals_the_reference_maps(packed, terms):
    """SkewRotation (one node, hand-written backward) gives the reference functions' R and, in float64,
    gradcheck's gradients, for the exact map and every series length; one shared block too."""
    g = torch.Generator().manual_seed(0 if terms is None else terms)
    b = 5
    for n in (3, 1):
        shape = (n, b * (b - 1) // 2) if packed else (n, b, b)
        p = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.4).requires_grad_(True)
        q = skew_from_packed(p, b) if packed else skew_from_square(p)
        ref = cayley(q) if terms is None else cayley_neumann(q, terms)
        torch.testing.assert_close(SkewRotation.apply(p, b, packed, terms), ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(rotation_blocks(p, b, packed, terms), ref, atol=1e-12, rtol=0)
        assert torch.autograd.gradcheck(lambda p: SkewRotation.apply(p, b, packed, terms), (p,))
        with torch.no_grad():  # inference: the reference functions themselves
            assert torch.equal(rotation_blocks(p, b, packed, terms), ref)


@pytest.mark.parametrize("r,b", [(4, 8), (6, 3), (3, 5), (2, 16), (5, 2)])
@pytest.mark.parametrize("scaled", [False, True], ids=["no-scale", "scale"])
@pytest.mark.parametrize("orthogonal", [False, True], ids=["any-R", "orthogonal-R"])
@pytest.mark.parametrize("seq", [3, 5], ids=["weight-formed-again", "weight-kept"])
def test_rotated_linear_node_gradients(r, b, scaled, orthogonal, seq):
    """RotatedLinear against autograd through x R, the frozen layer and s, for block widths that run grouped
    (b < 16: blocks joined into wider ones, k > 1, or all of them when no divisor of r reaches 16) and
    ungrouped, with the general backward and the one for orthogonal R (G = ∂x R), with the rotated weight kept
    for the backward (2·5 tokens ≥ 7 outputs) and formed again (2·3 < 7); float64, so the hand-written backward
    must match to rounding."""
    g = torch.Generator().manual_seed(r * 100 + b)
    n, out = r * b, 7
    x = torch.randn(2, seq, n, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    bias = torch.randn(out, generator=g, dtype=torch.float64)
    a = (torch.randn(r, b, b, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    s = (1 + 0.1 * torch.randn(out, generator=g, dtype=torch.float64)).requires_grad_(scaled)
    grads = {}
    for fused in (True, False):
        blocks = cayley(skew_from_square(a))
        if fused:
            y = RotatedLinear.apply(x, w, bias, blocks, s if scaled else None, orthogonal)
        else:
            y = nn.functional.linear(x @ block_diagonal(blocks), w) * (s if scaled else 1) + bias
        y.pow(2).sum().backward()
        grads[fused] = (y.detach(), x.grad, a.grad, s.grad if scaled else None)
        x.grad = a.grad = s.grad = None
    for got, want in zip(grads[True], grads[False]):
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    k = block_group(r, b)
    assert r % k == 0 and (k == 1) == (b >= 16) and (k * b >= 16 or k == r)
    if scaled:
        assert torch.autograd.gradcheck(
            lambda x, a, s: RotatedLinear.apply(x, w, bias, cayley(skew_from_square(a)), s, orthogonal), (x, a, s))


def test_boft_scale_gradient_after_an_in_place_change():
    """A LeakyReLU(inplace=True) after a BOFT layer changes the layer's output in place: the fused node (which reads
    ∂s off its output, learns of the change from the output's version counter and forms x (W Rᵀ)ᵀ again) gives
    the gradients of an out-of-place activation."""
    grads = {}
    for inplace in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(0.2, inplace=inplace), nn.Linear(8, 3))
        pm = get_peft_model(model, BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=1))
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn(p.shape))
        x = torch.randn(4, 8, requires_grad=True)
        pm(x).pow(2).sum().backward()
        grads[inplace] = [x.grad] + [p.grad.clone() for p in pm.parameters() if p.requires_grad]
    assert len(grads[True]) == 3  # x, boft_R, boft_s
    for got, want in zip(grads[True], grads[False]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_rotated_linear_scale_gradient_where_s_vanishes(with_bias):
    """∂s, ∂x and ∂R stay autograd's (float64) when entries of s are zero, tiny or negative (s = 0, 1e-30, −1e-20
    beside ordinary entries): ∂s is read off the output divided by s only where |s| is above the floor; the other
    entries are formed from x directly."""
    g = torch.Generator().manual_seed(7)
    r, b, out = 2, 8, 6
    x = torch.randn(3, 4, r * b, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out, r * b, generator=g, dtype=torch.float64)
    bias = torch.randn(out, generator=g, dtype=torch.float64) if with_bias else None
    a = (torch.randn(r, b, b, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    s = torch.tensor([1.2, 0.0, 1e-30, 0.7, -1e-20, -0.9], dtype=torch.float64, requires_grad=True)
    grads = {}
    for fused in (True, False):
        blocks = cayley(skew_from_square(a))
        if fused:
            y = RotatedLinear.apply(x, w, bias, blocks, s, True)
        else:
            y = nn.functional.linear(x @ block_diagonal(blocks), w) * s + (0 if bias is None else bias)
        (y.pow(2).sum() + y.sum()).backward()
        grads[fused] = (y.detach(), x.grad, a.grad, s.grad)
        x.grad = a.grad = s.grad = None
    assert torch.isfinite(grads[True][3]).all()
    for got, want in zip(grads[True], grads[False]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("size", [0.0, 0.01, 1.0], ids=["R=I", "near-orthogonal", "far-from-orthogonal"])
def test_rotated_linear_with_a_truncated_series(size):
    """With a truncated Cayley–Neumann R (not orthogonal) RotatedLinear's backward inverts R by Newton–Schulz when
    R is near orthogonal (one token product) and runs the two token products when it is not; either way it
    gives autograd's gradients to float64 rounding."""
    import peftlab.tuners.orthogonal as orth

    g = torch.Generator().manual_seed(3)
    r, b, out = 4, 16, 9
    x = torch.randn(2, 5, r * b, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out, r * b, generator=g, dtype=torch.float64)
    p = (torch.randn(r, b * (b - 1) // 2, generator=g, dtype=torch.float64) * size).requires_grad_(True)
    blocks = cayley_neumann(skew_from_packed(p, b), 5)
    inverse = orth.near_orthogonal_inverse(blocks.detach())
    assert (inverse is None) == (size == 1.0)  # ‖Q‖ ≈ 5 there: the series is nowhere near orthogonal
    if inverse is not None:
        torch.testing.assert_close(torch.bmm(blocks.detach(), inverse), torch.eye(b, dtype=torch.float64).expand(r, b, b),
                                   atol=1e-13, rtol=0)
    grads = {}
    for fused in (True, False):
        blocks = cayley_neumann(skew_from_packed(p, b), 5)
        y = RotatedLinear.apply(x, w, None, blocks, None, False) if fused else (
            nn.functional.linear(x @ block_diagonal(blocks), w))
        y.pow(2).sum().backward()
        grads[fused] = (y.detach(), x.grad, p.grad)
        x.grad = p.grad = None
    for got, want in zip(grads[True], grads[False]):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-10)
    assert orth.near_orthogonal_inverse(torch.eye(b, device="meta").expand(r, b, b)) is None  # not on a CPU: no read-back


@pytest.mark.parametrize("scale", [1.0, 10.0], ids=["small-Q", "large-Q"])
def test_fused_boft_path_equals_autograd(scale):
    """BOFT with one factor trains through RotatedLinear with its scale s inside the node (and the orthogonal
    backward, G = ∂x R): the generic path's outputs and gradients (x, boft_R, boft_s) to float32 rounding,
    grouped blocks included (b = 2), for small rotations and for ‖Q‖ ≈ 1."""
    torch.manual_seed(0)
    pm = filled(BOFTConfig(target_modules=["lin0", "lin1"], boft_block_size=2), scale=scale)  # eval: no dropout
    x = example_inputs("mlp").requires_grad_(True)
    layers = (pm.base_model.model.lin0, pm.base_model.model.lin1)
    assert any(block_group(l.boft_block_num["default"], 2) > 1 for l in layers)
    grads = {}
    for fused in (True, False):
        for p in pm.parameters():
            p.grad = None
        x.grad = None
        if not fused:
            for layer in layers:
                layer.fused_forward = lambda *a, **k: None
        out = pm(x)
        out.pow(2).sum().backward()
        grads[fused] = (out.detach(), x.grad.clone(),
                        {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    torch.testing.assert_close(grads[True][0], grads[False][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[True][1], grads[False][1], atol=1e-6, rtol=0)
    assert any("boft_s" in n for n in grads[True][2])
    for n, g in grads[True][2].items():
        torch.testing.assert_close(g, grads[False][2][n], atol=1e-6, rtol=1e-5, msg=n)


class BigConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(6 * 5 * 5, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("config", [OFTConfig(target_modules=["conv"], oft_block_size=6),
                                    BOFTConfig(target_modules=["conv"], boft_block_size=6, boft_n_butterfly_factor=2)],
                         ids=["oft", "boft"])
def test_conv2d_is_the_rotated_convolution(config):
    """A 3×3 convolution with padding on a 5×5 image: the adapted layer is the convolution with filters
    s ⊙ (W Rᵀ), a fresh adapter is the identity exactly, and merged equals unmerged."""
    torch.manual_seed(0)
    base = BigConv()
    x = torch.randn(2, 4, 5, 5)
    expected = base(x).detach()
    pm = get_peft_model(base, config).eval()
    torch.testing.assert_close(output(pm, x), expected, atol=1e-6, rtol=0)
    fill_trainable(pm, prefixes=PREFIXES)
    layer = pm.base_model.model.conv
    w = layer.get_base_layer().weight
    rot = layer.rotation("default")
    s = layer.out_scale("default")
    w_rot = w.reshape(6, -1) @ rot.T * (1 if s is None else s.view(-1, 1))
    ref = torch.nn.functional.conv2d(x, w_rot.reshape(w.shape), layer.get_base_layer().bias, padding=1)
    got = output(pm, x)
    assert not torch.allclose(got, expected, atol=1e-4)
    torch.testing.assert_close(layer(x).detach(), ref, atol=1e-5, rtol=0)
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, x), got, atol=1e-5, rtol=0)


def test_oft_module_dropout_replaces_blocks_in_training():
    """In training int(p·r) blocks become I (peft 0.21.2 never applies this setting); eval is unaffected."""
    pm = filled(OFTConfig(target_modules=["lin1"], oft_block_size=2, module_dropout=0.5))
    layer = pm.base_model.model.lin1
    eval_blocks = layer.blocks("default")
    torch.manual_seed(0)
    train_blocks = layer.blocks("default", training=True)
    same = [torch.equal(a, b) for a, b in zip(train_blocks, eval_blocks)]
    is_eye = [torch.equal(b, torch.eye(2)) for b in train_blocks]
    assert sum(is_eye) == 5 and sum(same) == 5 and all(s != e for s, e in zip(same, is_eye))


def test_boft_dropout_hits_one_factor():
    pm = filled(BOFTConfig(target_modules=["lin1"], boft_block_size=2, boft_n_butterfly_factor=2,
                           boft_dropout=0.5))
    layer = pm.base_model.model.lin1
    full = layer.factors("default")
    torch.manual_seed(1)
    dropped = layer.factors("default", training=True)
    changed = [not torch.equal(a, b) for a, b in zip(full, dropped)]
    assert sum(changed) == 1
    i = changed.index(True)
    assert sum(torch.equal(b, torch.eye(2)) for b in dropped[i]) == 5


def test_several_active_adapters_merge_as_they_run():
    """Rotations do not commute: with two active adapters the unmerged forward composes them in the order
    merging does (the first named acts on W first), so merged equals unmerged."""
    for cfg in (OFTConfig(target_modules=["lin0"], oft_block_size=5),
                BOFTConfig(target_modules=["lin0"], boft_block_size=2, boft_n_butterfly_factor=1)):
        pm = filled(cfg)
        pm.add_adapter("other", cfg)
        fill_trainable(pm, "other", prefixes=PREFIXES)
        pm.base_model.set_adapter(["default", "other"])
        x = example_inputs("mlp")
        both = output(pm, x)
        pm.set_adapter("default")
        one = output(pm, x)
        assert not torch.allclose(both, one, atol=1e-5)
        pm.base_model.set_adapter(["default", "other"])
        pm.merge_adapter()
        torch.testing.assert_close(output(pm, x), both, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(r=4, oft_block_size=8), r"r=4 and oft_block_size=8 are both set.*oft_block_size=8\) or OFTConfig\(r=4"),
    (dict(r=0, oft_block_size=0), "set one of them"),
    (dict(oft_block_size=-2), "non-negative integer"),
    (dict(module_dropout=1.0), r"module_dropout=1.0 must be a probability in \[0, 1\)"),
    (dict(eps=0.0), "eps=0.0: COFT's radius must be a positive number"),
    (dict(num_cayley_neumann_terms=1), "fewer than 2 terms"),
    (dict(rank_pattern={"lin0": 2}), "has no 'rank_pattern' option"),
    (dict(bias="lora_only"), "valid values: 'none', 'all', 'oft_only'"),
])
def test_oft_config_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        OFTConfig(target_modules=["lin0"], **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(boft_block_size=4, boft_block_num=2), "both set"),
    (dict(boft_block_size=0, boft_block_num=0), "set one of them"),
    (dict(boft_n_butterfly_factor=0), "positive integer"),
    (dict(boft_dropout=-0.1), "probability"),
    (dict(bias="oft_only"), "'none', 'all', 'boft_only'"),
])
def test_boft_config_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        BOFTConfig(target_modules=["lin0"], **kwargs)


@pytest.mark.parametrize("config, match", [
    (OFTConfig(target_modules=["lin0"], oft_block_size=4),
     r"oft_block_size=4 does not divide .*in_features = 10.* Valid oft_block_size values for this layer: \[2, 5, 10\]"),
    (OFTConfig(target_modules=["lin0"], r=3, oft_block_size=0), r"r=3 does not divide.*\[1, 2, 5\]"),
    (OFTConfig(target_modules=["lin0"], oft_block_size=1), "blocks of size 1"),
    (BOFTConfig(target_modules=["lin1"], boft_block_size=3), r"boft_block_size=3 does not divide the layer's input size 20"),
    (BOFTConfig(target_modules=["lin1"], boft_block_size=2, boft_n_butterfly_factor=4),
     r"boft_n_butterfly_factor=4 with blocks of size 2 spans b·2\^\(m−1\) = 16 inputs, which must divide the "
     r"layer's input size 20. No boft_block_size allows 4 factors here; with boft_block_size=2 use "
     r"boft_n_butterfly_factor=2 or fewer"),
    (BOFTConfig(target_modules=["lin1"], boft_block_size=0, boft_block_num=5, boft_n_butterfly_factor=2),
     r"even number of blocks; boft_block_num=5 gives 5 blocks of size 4.*\[2, 10\]"),
])
def test_layer_size_errors_name_the_numbers_and_valid_choices(config, match):
    model = base_model("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed


def test_grouped_conv_is_refused():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, groups=2)

    for cfg in (OFTConfig(target_modules=["conv"], oft_block_size=2), BOFTConfig(target_modules=["conv"])):
        with pytest.raises(ValueError, match=r"grouped nn.Conv2d \(groups=2\)"):
            get_peft_model(Grouped(), cfg)


def test_unsupported_layer_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="supports Linear, Conv2d"):
            get_peft_model(base_model("emb_conv1d"), OFTConfig(target_modules=["emb"], oft_block_size=5))


def test_block_diagonal_and_shared_block():
    blocks = cayley(skew_from_packed(torch.randn(1, 3, dtype=torch.float64), 3))
    full = block_diagonal(blocks, 4)
    assert full.shape == (12, 12)
    for i in range(4):
        assert torch.equal(full[3 * i:3 * i + 3, 3 * i:3 * i + 3], blocks[0])
    assert (full.abs() > 0).double().mean() <= 0.25 + 1e-12
    # a layer with block_share stores one block and uses it r times
    pm = filled(OFTConfig(target_modules=["lin1"], oft_block_size=5, block_share=True))
    layer = pm.base_model.model.lin1
    assert layer.oft_R["default"].weight.shape == (1, 10)
    rot = layer.rotation("default")
    assert torch.equal(rot[:5, :5], rot[15:, 15:])
    assert isinstance(layer, OFTLayer) and not isinstance(layer, BOFTLayer)


@pytest.mark.parametrize("config", [OFTConfig(target_modules=["lin0", "lin1"], oft_block_size=5),
                                    BOFTConfig(target_modules=["lin0", "lin1"], boft_block_size=5)],
                         ids=["oft", "boft"])
def test_safe_merge_refuses_a_diverged_adapter_and_changes_nothing(config):
    pm = filled(config)
    with torch.no_grad():
        next(p for n, p in pm.named_parameters() if "lin1" in n and ("oft_R" in n or "boft_R" in n)).fill_(float("nan"))
    before = {n: p.clone() for n, p in pm.named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError, match="would put NaN or inf"):
        pm.merge_adapter(safe_merge=True)
    assert all(torch.equal(p, before[n]) for n, p in pm.named_parameters() if "base_layer" in n)


def test_huge_counts_are_refused_at_once_by_name():
    """Counts that drive a loop or an exponent (fuzzing found both hanging: 2**40 Neumann terms ran 2**40
    matrix products per forward, and 2**(2**40 − 1) was computed to check a butterfly's reach)."""
    import time

    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"num_cayley_neumann_terms=1099511627776: at most 64 terms.*"
                                         r"use_cayley_neumann=False"):
        OFTConfig(num_cayley_neumann_terms=2**40)
    assert OFTConfig(num_cayley_neumann_terms=64).num_cayley_neumann_terms == 64
    assert OFTConfig(num_cayley_neumann_terms=2**40, use_cayley_neumann=False)  # the terms are unused then
    with pytest.raises(ValueError, match=r"boft_n_butterfly_factor=1099511627776 spans b·2\^\(m−1\) inputs, far more"):
        get_peft_model(base_model("mlp"), BOFTConfig(target_modules=["lin1"], boft_block_size=4,
                                                     boft_n_butterfly_factor=2**40))
    assert time.perf_counter() - start < 5


def test_oft_trains_under_bf16_autocast():
    # the fused rotation's backward receives a bf16 gradient while its saved weight and blocks are float32
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 8)), OFTConfig(oft_block_size=4, target_modules=["0"]))
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().pow(2).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------------
# a training step's rotations, built together (StepRotations)
# ---------------------------------------------------------------------------------------------------
class ThreeLayers(nn.Module):
    """Three adapted linears; ``skip`` leaves the last out of the forward (its adapter must get no gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 12)
        self.skip = False
        self.checkpoint: bool | None = None  # use_reentrant for torch.utils.checkpoint around self.a; None: none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint is None:
            h = torch.relu(self.a(x))
        else:
            h = torch.utils.checkpoint.checkpoint(lambda x: torch.relu(self.a(x)), x,
                                                  use_reentrant=self.checkpoint)
        h = self.b(h)
        return h if self.skip else self.c(h)


STEP_CONFIGS = {
    "oft-neumann": OFTConfig(oft_block_size=4, target_modules=["a", "b", "c"]),
    "oft-exact": OFTConfig(oft_block_size=4, target_modules=["a", "b", "c"], use_cayley_neumann=False),
    "oft-shared": OFTConfig(oft_block_size=4, target_modules=["a", "b", "c"], block_share=True),
    "oft-dropout": OFTConfig(oft_block_size=2, target_modules=["a", "b", "c"], module_dropout=0.5),
    "boft-1": BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=["a", "b", "c"]),
    "boft-2": BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["a", "b", "c"]),
}


def step_grads(config, together: bool, run=None, **model_kw):
    """Gradients of every trained tensor after ``run(model, x)`` (default: one backward of a squared output), with
    the step's rotations built together or layer by layer, and how many BatchedRotation nodes were built."""
    from unittest import mock

    from peftlab.tuners.orthogonal import BatchedRotation

    torch.manual_seed(0)
    net = ThreeLayers()
    for k, v in model_kw.items():
        setattr(net, k, v)
    pm = get_peft_model(net, config)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape))
    pm.base_model.batch_rotations = together
    x = torch.randn(6, 16, requires_grad=True)
    torch.manual_seed(1)  # module dropout draws the same blocks either way
    with mock.patch.object(BatchedRotation, "apply", wraps=BatchedRotation.apply) as built:
        (run or (lambda m, x: m(x).pow(2).sum().backward()))(pm, x)
    return {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}, built.call_count


@pytest.mark.parametrize("name", list(STEP_CONFIGS))
@pytest.mark.parametrize("skip", [False, True], ids=["all-layers-run", "one-layer-skipped"])
def test_step_rotations_are_one_node_with_the_per_layer_gradients(name, skip):
    """A training forward builds every layer's rotation in one BatchedRotation node (none when told not to), and
    the gradients are those of the per-layer build to rounding; a layer the forward skipped leaves its adapter
    without a gradient (None, not zeros: AdamW would still move a tensor with a zero gradient)."""
    together, n_together = step_grads(STEP_CONFIGS[name], True, skip=skip)
    alone, n_alone = step_grads(STEP_CONFIGS[name], False, skip=skip)
    assert (n_together, n_alone) == (1, 0)
    assert together.keys() == alone.keys()
    for key, want in alone.items():
        assert (want is None) == (together[key] is None) == (skip and ".c." in key), key
        if want is not None:
            torch.testing.assert_close(together[key], want, rtol=1e-5, atol=1e-7)


def test_a_step_finds_the_layers_model_modules_would():
    """The layers a training forward gathers (``orthogonal_layers``, a plain walk, every step) are those
    ``model.modules()`` yields, in its order: nested containers, a layer reached under two names counted once."""
    from peftlab.tuners.orthogonal import OrthogonalLayer, orthogonal_layers

    torch.manual_seed(0)
    net = nn.Sequential(ThreeLayers(), nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 16)]))
    pm = get_peft_model(net, OFTConfig(oft_block_size=4, target_modules=["a", "b", "c", "1.0.0", "1.1"]))
    inner = pm.base_model.model
    inner.add_module("again", inner[0].b)  # the same adapted layer under a second name
    want = [m for m in inner.modules() if isinstance(m, OrthogonalLayer)]
    assert len(want) == 5 and orthogonal_layers(inner) == want


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_step_rotations_under_activation_checkpointing(reentrant):
    """torch.utils.checkpoint runs the checkpointed layer again during the backward, when the step's rotations are
    gone: the layer builds its own in both runs (non-reentrant checkpointing would otherwise refuse a recomputation
    that saves other tensors), the others still share the node, and the gradients are those without checkpoint."""
    config = STEP_CONFIGS["oft-neumann"]
    plain, _ = step_grads(config, False)
    got, n_built = step_grads(config, True, checkpoint=reentrant)
    assert n_built == 1
    for key, want in plain.items():
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-7)


def test_step_rotations_with_a_second_derivative_and_two_graphs():
    """create_graph=True differentiates the shared node again (a gradient penalty on ∂x), and two forwards whose
    losses are backpropagated one after the other each get their own node (the first backward frees its graph)."""
    config = STEP_CONFIGS["oft-neumann"]

    def penalty(m, x):
        (gx,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()

    def two_graphs(m, x):
        first, second = m(x).pow(2).sum(), m(2 * x).pow(2).sum()
        first.backward()
        second.backward()
    for run, nodes in ((penalty, 1), (two_graphs, 2)):
        want, _ = step_grads(config, False, run)
        got, n_built = step_grads(config, True, run)
        assert n_built == nodes
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)


def test_coft_layers_build_their_own_rotation():
    """COFT projects each Q in place before building R, so its layers stay out of the shared node (and train as
    before)."""
    config = OFTConfig(oft_block_size=4, target_modules=["a", "b", "c"], coft=True, eps=1e-2)
    together, n_built = step_grads(config, True)
    alone, _ = step_grads(config, False)
    assert n_built == 0
    for key in alone:
        torch.testing.assert_close(together[key], alone[key])


def test_near_orthogonal_inverses_decide_layer_by_layer():
    """One run inverts several layers' truncated-series blocks: a layer whose blocks are near orthogonal gets
    the inverses near_orthogonal_inverse gives it alone (to rounding, float64), one with a block far from
    orthogonal gets None, and the other layers do not notice it."""
    from peftlab.tuners.orthogonal import near_orthogonal_inverse, near_orthogonal_inverses

    g = torch.Generator().manual_seed(3)
    sizes, sizes_q = [2, 3, 1], [0.05, 2.0, 0.2]
    layers = [cayley_neumann(skew_from_square(torch.randn(n, 6, 6, generator=g, dtype=torch.float64) * q), 5)
              for n, q in zip(sizes, sizes_q)]
    got = near_orthogonal_inverses(torch.cat(layers), sizes)
    for blocks, inverse in zip(layers, got):
        alone = near_orthogonal_inverse(blocks)
        assert (inverse is None) == (alone is None)
        if alone is not None:
            torch.testing.assert_close(inverse, alone, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(torch.bmm(blocks, inverse), eye_like(blocks), rtol=0, atol=1e-12)
    assert [i is None for i in got] == [False, True, False]


# ---------------------------------------------------------------------------------------------------
# a butterfly's R as diagonal blocks of b·2^(m−1)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_group_blocks_are_the_butterflys_diagonal_blocks(m):
    """R = M_{m−1} ⋯ M_0 is block-diagonal with blocks of g = b·2^(m−1): group_blocks gives them (float64, to
    rounding against the dense R of the factor-by-factor butterfly), and None once g passes the cap."""
    import peftlab.tuners.boft.layer as boft_layer

    g = torch.Generator().manual_seed(m)
    n, b = 64, 4
    factors = cayley(skew_from_square(torch.randn(m, n // b, b, b, generator=g, dtype=torch.float64)))
    dense = butterfly_rotate(torch.eye(n, dtype=torch.float64), factors)
    blocks = boft_layer.group_blocks(factors)
    assert blocks.shape == (n // (b << (m - 1)), b << (m - 1), b << (m - 1))
    torch.testing.assert_close(block_diagonal(blocks), dense, rtol=0, atol=1e-13)
    # off the diagonal blocks the dense R is exactly zero: the blocks are all of R
    assert torch.count_nonzero(dense * (block_diagonal(torch.ones_like(blocks)) == 0)) == 0
    if m > 1:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(boft_layer, "MAX_GROUP_WIDTH", (b << (m - 1)) - 1)
            assert boft_layer.group_blocks(factors) is None


@pytest.mark.parametrize("m", [2, 3])
def test_boft_with_several_factors_trains_through_the_fused_node(m):
    """With m > 1 factors a training step runs RotatedLinear on R's blocks (the gathers act on g rows only, not
    on the activations), with the gradients of the factor-by-factor butterfly (forced by a cap of 0) to float32
    rounding."""
    import peftlab.tuners.boft.layer as boft_layer

    from peftlab.lab.graphs import node_counts

    config = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=m, target_modules=["a", "b", "c"])
    nodes = {}

    def run(fused: bool):
        def step(model, x):
            loss = model(x).pow(2).sum()
            nodes[fused] = node_counts(loss)
            loss.backward()
        return step
    fused, _ = step_grads(config, True, run(True))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(boft_layer, "MAX_GROUP_WIDTH", 0)
        gathered, _ = step_grads(config, True, run(False))
    assert nodes[True]["RotatedLinearBackward"] == 3
    assert nodes[False]["RotatedLinearBackward"] == 0
    for key in gathered:
        torch.testing.assert_close(fused[key], gathered[key], rtol=1e-4, atol=1e-6)
