"""What OFT and BOFT share: the rotation math, a layer base and a tuner base.

Both methods multiply instead of adding. A frozen layer h = W x (W of shape (out, in)) becomes

    h = (W Rᵀ) x,    equivalently   x ↦ x R  (row vectors)  before the frozen layer,

with R an orthogonal (in × in) matrix: RᵀR = I, so W Rᵀ has the same singular values as W, and the angles
between its rows (the neurons) are those of W. R starts at I (the adapter changes nothing at step 0).

The pieces, as peft 0.21.2 computes them (so files interchange), written here once:

* :func:`skew_from_packed` / :func:`skew_from_square`: a skew-symmetric Q (Qᵀ = −Q) from free numbers, OFT's
  packed upper triangle (b(b−1)/2 per block) or BOFT's full b×b matrix (Q = ½(A − Aᵀ));
* :func:`cayley`: the exact Cayley map R = (I − Q)(I + Q)⁻¹, orthogonal for every skew Q (one small linear solve
  per block); :func:`cayley_neumann`: peft's truncated series I + 2Q + 2Q² + … + Qᵏ, cheaper and only
  approximately orthogonal;
* block-diagonal R (OFT): ``r`` blocks of size ``b`` with r·b = in, each rotating its own slice of the input;
* :func:`butterfly_perm`: the permutations that make BOFT's factors mix different strides, so a product of
  m block-diagonal factors is dense when 2^(m−1)·b ≥ in.

On a convolution the rotation acts on the flattened filter (in_channels · kh · kw); the layer rotates the
weight and runs the convolution once (what merging computes too).

Explained in: book/oft_boft.ipynb
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.tuners.base import (AdapterLayer, BaseTuner, divide_by_scale, fusable, hookless_linear, keep_output,
                                 kept_output, linear_output, second_order_grads, watched_by_hooks)
from peftlab.tuners.lycoris import DEFAULT_TARGET_MODULES  # peft gives OFT and BOFT LoRA's map too

#: the layer types peft 0.21.2 wraps with OFT and BOFT (here: Linear and Conv2d; no embeddings)
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


# ---------------------------------------------------------------------------------------------------
# the rotation math
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _triu(b: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(b, b, 1)
    return rows.to(device), cols.to(device)


@functools.lru_cache(maxsize=64)
def _skew_gather(b: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For packed upper triangles (m = b(b−1)/2 numbers): where each of the b·b entries of Q comes from in
    [0, p, −p] (index 0 for the diagonal, 1 + k above it, 1 + m + k below), and the flat positions of the upper
    and lower triangles (k-th entry and its mirror), on ``device``."""
    rows, cols = torch.triu_indices(b, b, 1)
    m = rows.numel()
    source = torch.zeros(b, b, dtype=torch.long)
    source[rows, cols] = torch.arange(1, m + 1)
    source[cols, rows] = torch.arange(m + 1, 2 * m + 1)
    return source.view(-1).to(device), (rows * b + cols).to(device), (cols * b + rows).to(device)


def skew_from_packed(vec: torch.Tensor, b: int) -> torch.Tensor:
    """(n, b(b−1)/2) upper-triangle entries → n skew-symmetric (b, b) matrices Q = U − Uᵀ (OFT's storage).

    Explained in: book/oft_boft.ipynb
    """
    rows, cols = _triu(b, str(vec.device))
    upper = vec.new_zeros(vec.shape[0], b, b)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)  # Qᵀ = −Q


def skew_from_square(a: torch.Tensor) -> torch.Tensor:
    """Any (…, b, b) → its skew-symmetric part Q = ½(A − Aᵀ) (BOFT's storage).

    Explained in: book/oft_boft.ipynb
    """
    return 0.5 * (a - a.transpose(-2, -1))


def cayley(q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley map of skew (…, b, b): R = (I − Q)(I + Q)⁻¹, orthogonal (RᵀR = I) for every skew Q.

    I + Q is always invertible (Q's eigenvalues are imaginary), and R never has eigenvalue −1: the map reaches
    the rotations of SO(b) without reflections. Q = 0 gives R = I.

    Explained in: book/oft_boft.ipynb
    """
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    # R (I + Q) = I − Q, solved on the right (the two factors commute, so R = (I + Q)⁻¹(I − Q) as well)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """peft's Cayley–Neumann series for skew (…, b, b): I + 2Q + 2Q² + … + 2Qᵏ⁻¹ + Qᵏ, k = max(terms − 1, 3).

    (I + Q)(I − Q)⁻¹ = (I + Q)(I + Q + Q² + …) = I + 2Q + 2Q² + …, truncated; the last kept power has weight 1
    (peft ≥ 0.18). Orthogonal only up to the first dropped power, so small ‖Q‖ is needed. As in peft, terms=1
    gives I, terms=2 gives I + 2Q, and terms=3 and 4 give the same matrix (I + 2Q + 2Q² + Q³).

    Explained in: book/oft_boft.ipynb
    """
    r = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q).clone()
    if terms <= 1:
        return r
    r = r + 2 * q
    if terms == 2:
        return r
    power = q @ q
    r = r + 2 * power
    for _ in range(3, terms - 1):
        power = power @ q
        r = r + 2 * power
    return r + power @ q  # the last power, weight 1


def block_diagonal(blocks: torch.Tensor, n_blocks: int | None = None) -> torch.Tensor:
    """(r, b, b) → the (r·b, r·b) block-diagonal matrix; one shared block (1, b, b) repeated ``n_blocks`` times.

    Explained in: book/oft_boft.ipynb
    """
    n = blocks.shape[0] if n_blocks is None else n_blocks
    if blocks.shape[0] == 1 and n > 1:
        blocks = blocks.expand(n, -1, -1)
    return torch.block_diag(*blocks.unbind(0))


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x ↦ x R for block-diagonal R: (…, r·b) with (r, b, b) blocks (or one shared block (1, b, b)).

    Blocks narrower than :data:`MIN_BLOCK_WIDTH` run as wider block-diagonal ones (:func:`block_group`), and
    without gradients the product is written straight into the output's layout.

    Explained in: book/oft_boft.ipynb
    """
    b = blocks.shape[-1]
    shape = x.shape
    if blocks.shape[0] == 1:  # one shared block: every slice of b inputs through it, as one product
        return (x.reshape(-1, b) @ blocks[0]).view(shape)
    r = shape[-1] // b
    k = block_group(r, b)
    rk, bk = r // k, b * k
    wide = widen_blocks(blocks, k)
    xb = x.reshape(-1, rk, bk).transpose(0, 1)  # (r/k, tokens, kb)
    if torch.is_grad_enabled() and (x.requires_grad or blocks.requires_grad):
        return torch.bmm(xb, wide).transpose(0, 1).reshape(shape)
    out = x.new_empty(shape)
    torch.bmm(xb, wide, out=out.view(-1, rk, bk).transpose(0, 1))
    return out


def butterfly_perm(n: int, block_size: int, factor: int, n_factors: int) -> torch.Tensor:
    """Indices of BOFT's permutation for butterfly factor ``factor`` (0-based) of ``n_factors``: ``perm``.

    Factor i works on groups of g = b·2^i consecutive inputs, cut into 2^(i+1) chunks of b/2: the permutation
    lists the even chunks first, then the odd ones, so the factor's b×b blocks pair chunks that lie b·2^(i−1)
    apart (stride doubles from factor to factor; factor 0 is the identity). As a matrix, P[j, perm[j]] = 1,
    and the factor is P B Pᵀ with B block-diagonal. One factor: no permutation.

    Explained in: book/oft_boft.ipynb
    """
    if n_factors == 1:
        return torch.arange(n)
    half = block_size // 2
    chunks = 2 ** (factor + 1)  # per group of size half · chunks = block_size · 2^factor
    order = list(range(0, chunks, 2)) + list(range(1, chunks, 2))  # evens, then odds
    within = torch.cat([torch.arange(c * half, (c + 1) * half) for c in order])
    group = half * chunks
    return (torch.arange(0, n, group).view(-1, 1) + within.view(1, -1)).reshape(-1)


@functools.lru_cache(maxsize=256)
def _butterfly_indices(n: int, block_size: int, factor: int, n_factors: int, device: str,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, its inverse) on ``device``: x P = x[..., inverse], y Pᵀ = y[..., perm]."""
    perm = butterfly_perm(n, block_size, factor, n_factors)
    return perm.to(device), torch.argsort(perm).to(device)


def butterfly_rotate(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """x ↦ x R with R = M_{m−1} ⋯ M_1 M_0, M_i = P_i B_i P_iᵀ (B_i block-diagonal from ``factors[i]``, (nb, b, b)).

    Each factor costs a gather, one block product and a gather: O(in · b) per row instead of the O(in²) of the
    dense R (peft builds R densely, with (in × in) permutation matrices, at every step).

    Explained in: book/oft_boft.ipynb
    """
    m, _, b, _ = factors.shape
    n = x.shape[-1]
    for i in range(m - 1, -1, -1):  # x M_{m−1} first
        if i == 0 or m == 1:
            x = rotate_blocks(x, factors[i])
            continue
        perm, inverse = _butterfly_indices(n, b, i, m, str(x.device))
        x = rotate_blocks(x.index_select(-1, inverse), factors[i]).index_select(-1, perm)  # x P_i, B_i, Pᵢᵀ
    return x


def multiplicative_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Training-time dropout for rotations: int(p·n) random blocks of (n, b, b) become I (n = 1: unchanged).

    Explained in: book/oft_boft.ipynb
    """
    n, b = blocks.shape[0], blocks.shape[-1]
    k = int(p * n)
    if n == 1 or k == 0:
        return blocks
    drop = torch.zeros(n, dtype=torch.bool)
    drop[torch.randperm(n)[:k]] = True
    eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
    return torch.where(drop.to(blocks.device).view(n, 1, 1), eye, blocks)


def neumann_coefficients(terms: int) -> list[int]:
    """The coefficients c_0, …, c_k of :func:`cayley_neumann`'s series: [1], [1, 2], or [1, 2, …, 2, 1] with
    k = max(terms − 1, 3).

    Explained in: book/oft_boft.ipynb
    """
    if terms <= 1:
        return [1]
    if terms == 2:
        return [1, 2]
    return [1] + [2] * (max(terms - 1, 3) - 1) + [1]


def reference_rotation(p: torch.Tensor, b: int, packed: bool, terms: int | None) -> torch.Tensor:
    """The blocks R_i from their free numbers by the plain functions (what autograd differentiates twice).

    Explained in: book/oft_boft.ipynb
    """
    q = skew_from_packed(p, b) if packed else skew_from_square(p)
    return cayley(q) if terms is None else cayley_neumann(q, terms)


def _rotation_forward(p: torch.Tensor, b: int, packed: bool, terms: int | None,
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """R from p as :class:`SkewRotation` computes it, and what its backward needs besides p's shape."""
    if packed:  # as skew_from_packed, by one gather from [0, p, −p] (no pass over a transposed matrix)
        source = _skew_gather(b, str(p.device))[0]
        q = torch.cat([p.new_zeros(p.shape[0], 1), p, -p], 1).index_select(1, source).view(-1, b, b)
    else:
        q = skew_from_square(p)
    eye = torch.eye(b, device=p.device, dtype=p.dtype)
    if terms is None:
        inv = torch.linalg.inv_ex(eye + q)[0]
        return 2 * inv - eye, (inv,)
    c = neumann_coefficients(terms)
    if len(c) == 1:
        return eye.expand_as(q).clone(), ()
    if len(c) == 5:  # Paterson–Stockmeyer: S = Q², T = c₂I + c₃Q + c₄S, R = c₀I + c₁Q + S T (two products)
        sq = torch.bmm(q, q)
        t = torch.add(sq if c[4] == 1 else sq * c[4], q, alpha=c[3])
        t.diagonal(dim1=-2, dim2=-1).add_(c[2])  # the identity terms on the diagonals only
        base = q * c[1]
        base.diagonal(dim1=-2, dim2=-1).add_(c[0])
        return torch.baddbmm(base, sq, t), (q, sq, t)
    eye2 = eye * 2
    steps = [torch.add(eye if c[-2] == 1 else eye2, q, alpha=c[-1])]
    for cj in reversed(c[:-2]):  # P_j = Q P_(j+1) + c_j I
        steps.append(torch.baddbmm(eye2 if cj == 2 else eye, q, steps[-1]))
    return steps[-1], (q, *steps[:-1])  # Q, P_(k−1), …, P_1


def _rotation_backward(grad: torch.Tensor, saved: Sequence[torch.Tensor], b: int, packed: bool,
                       terms: int | None, shape: torch.Size) -> torch.Tensor:
    """∂L/∂p (p of ``shape``) from ∂L/∂R and what :func:`_rotation_forward` saved."""
    if terms is None:
        inv_t = saved[0].mT
        gq = torch.bmm(torch.bmm(inv_t, grad), inv_t).mul_(-2)
    else:
        c = neumann_coefficients(terms)
        if len(c) == 1:  # R = I
            return grad.new_zeros(shape)
        if len(c) == 5:
            gq = _paterson_stockmeyer_grad(grad, *saved, c)
        else:
            q, *steps = saved  # steps: P_(k−1), …, P_1
            gq = None
            g = grad
            for nxt in reversed(steps):  # P_j = Q P_(j+1) + c_j I, from j = 0 up
                gq = torch.bmm(g, nxt.mT) if gq is None else torch.baddbmm(gq, g, nxt.mT)
                g = torch.bmm(q.mT, g)
            gq = g * c[-1] if gq is None else gq.add_(g, alpha=c[-1])  # P_(k−1) = c_k Q + c_(k−1) I
    if packed:  # the skew part's upper triangle: each entry less its mirror
        _, upper, lower = _skew_gather(b, str(grad.device))
        flat = gq.reshape(-1, b * b)
        return flat.index_select(1, upper).sub_(flat.index_select(1, lower))
    return (gq - gq.mT).mul_(0.5)


def _paterson_stockmeyer_grad(g: torch.Tensor, q: torch.Tensor, sq: torch.Tensor, t: torch.Tensor,
                              c: list[int]) -> torch.Tensor:
    """A matrix whose skew part is that of ∂L/∂Q for R = c₀I + c₁Q + S T (S = Q², T = c₂I + c₃Q + c₄S), in three
    products. With Qᵀ = −Q (so S is symmetric): ∂T = S G, ∂S = G Tᵀ + c₄ S G, and ∂Q = c₁G + c₃∂T + ∂S Qᵀ + Qᵀ∂S;
    the skew part of the last two terms is that of −Q M with M = ∂S + ∂Sᵀ (QM − (QM)ᵀ = QM + MQ), so only
    the skew part of c₁G + c₃SG − QM is needed, which is all the parameters see."""
    sg = torch.bmm(sq, g)
    ds = torch.baddbmm(sg, g, t.mT, beta=c[4])  # G Tᵀ + c₄ S G
    # c₁G + c₃SG − QM as c₁(G + (c₃/c₁)SG) − QM, the factor c₁ applied inside the product's pass
    return torch.baddbmm(torch.add(g, sg, alpha=c[3] / c[1]), q, ds + ds.mT, beta=c[1], alpha=-1)


class SkewRotation(torch.autograd.Function):
    """The blocks R_i from their free numbers in one autograd node (what training runs; equal to rounding to
    ``cayley(skew_from_packed(p, b))``, ``cayley_neumann(…, terms)`` and ``cayley(skew_from_square(a))``).

    ``packed``: p is (n, b(b−1)/2), Q = U − Uᵀ (OFT); else p is (n, b, b), Q = ½(A − Aᵀ) (BOFT). ``terms``: None
    for the exact map, written R = 2(I + Q)⁻¹ − I (= (I − Q)(I + Q)⁻¹), whose backward is
    ∂Q = −2 (I + Q)⁻ᵀ ∂R (I + Q)⁻ᵀ; else the series p(Q) = Σ c_j Q^j by Horner's rule, P_k = c_k I,
    P_j = Q P_(j+1) + c_j I, R = P_0, whose backward walks the same steps back: ∂Q += ∂P_j P_(j+1)ᵀ,
    ∂P_(j+1) = Qᵀ ∂P_j. peft's default, five terms (degree 4), runs as Paterson–Stockmeyer instead: two products
    forward and three back (see :func:`_paterson_stockmeyer_grad`) where Horner takes three and six. Autograd
    records some twenty small operations for the same; each costs more in bookkeeping than in arithmetic at
    these sizes.

    Explained in: book/oft_boft.ipynb
    """

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor, b: int, packed: bool, terms: int | None) -> torch.Tensor:
        out, saved = _rotation_forward(p, b, packed, terms)
        ctx.b, ctx.packed, ctx.terms = b, packed, terms
        ctx.save_for_backward(p, *saved)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        p, *saved = ctx.saved_tensors
        b, packed, terms = ctx.b, ctx.packed, ctx.terms
        if torch.is_grad_enabled():  # create_graph=True: differentiable again (see second_order_grads)
            return (second_order_grads(lambda p: reference_rotation(p, b, packed, terms), (p,),
                                       ctx.needs_input_grad[:1], grad)[0], None, None, None)
        return _rotation_backward(grad, saved, b, packed, terms, p.shape), None, None, None


class BatchedRotation(torch.autograd.Function):
    """:class:`SkewRotation` for several layers' parameters (same b, storage and series) in one node: one batched
    series instead of one per layer, each layer's blocks a view of the result. Inputs whose blocks got no
    gradient (a layer that did not run) get none (``None``, as a per-layer node would leave them). ``sink``, a
    dict, receives ``"inverses"``: each layer's blocks inverted by :func:`near_orthogonal_inverses` (for a
    truncated series), which the layers' backward would otherwise compute one by one.

    Explained in: book/oft_boft.ipynb
    """

    @staticmethod
    def forward(ctx: Any, sink: dict, b: int, packed: bool, terms: int | None, *ps: torch.Tensor):
        ctx.set_materialize_grads(False)
        sizes = [p.shape[0] for p in ps]
        out, saved = _rotation_forward(torch.cat(ps), b, packed, terms)
        ctx.b, ctx.packed, ctx.terms, ctx.sizes = b, packed, terms, sizes
        ctx.save_for_backward(*saved, *ps)
        if terms is not None:
            sink["inverses"] = near_orthogonal_inverses(out, sizes)
        return out.split(sizes)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None):
        n = len(ctx.sizes)
        *saved, = ctx.saved_tensors
        saved, ps = saved[:-n], saved[-n:]
        b, packed, terms = ctx.b, ctx.packed, ctx.terms
        used = [i for i, g in enumerate(grads) if g is not None and ctx.needs_input_grad[4 + i]]
        out: list[torch.Tensor | None] = [None] * n
        if used and torch.is_grad_enabled():  # create_graph=True: the plain functions, recorded
            with torch.enable_grad():
                rs = reference_rotation(torch.cat(ps), b, packed, terms).split(ctx.sizes)
                got = torch.autograd.grad([rs[i] for i in used], [ps[i] for i in used], [grads[i] for i in used],
                                          create_graph=True, allow_unused=True)
            for i, g in zip(used, got):
                out[i] = g
        elif used:
            full = torch.cat([g if g is not None else ps[i].new_zeros(ps[i].shape[0], b, b)
                              for i, g in enumerate(grads)])  # zeros where a layer's blocks took no part
            shape = (sum(ctx.sizes), *ps[0].shape[1:])
            gp = _rotation_backward(full, saved, b, packed, terms, shape).split(ctx.sizes)
            for i in used:
                out[i] = gp[i]
        return (None, None, None, None, *out)


def rotation_blocks(p: torch.Tensor, b: int, packed: bool, terms: int | None) -> torch.Tensor:
    """R_i from their free numbers (see :class:`SkewRotation`): one autograd node when ``p`` trains (outside
    autocast, which would cast its products; there autograd records the reference functions).

    Explained in: book/oft_boft.ipynb
    """
    if torch.is_grad_enabled() and p.requires_grad and fusable(p):
        return SkewRotation.apply(p, b, packed, terms)
    return reference_rotation(p, b, packed, terms)


#: the narrowest blocks the CPU's batched products run near their speed at (one thread: width 16 runs 3× faster
#: than width 8 per useful flop, despite the zeros); narrower blocks are grouped up to this width
MIN_BLOCK_WIDTH = 16


@functools.lru_cache(maxsize=256)
def block_group(r: int, b: int) -> int:
    """How many consecutive b×b blocks (of r) :class:`RotatedLinear`'s token products treat as one wider block:
    the fewest, dividing r, whose width reaches :data:`MIN_BLOCK_WIDTH` (1 when b already does).

    Explained in: book/oft_boft.ipynb
    """
    return next((g for g in divisors(r) if g * b >= MIN_BLOCK_WIDTH), r)


def widen_blocks(blocks: torch.Tensor, g: int) -> torch.Tensor:
    """(r, b, b) → (r/g, g·b, g·b): each group of g consecutive blocks as one block-diagonal block.

    Explained in: book/oft_boft.ipynb
    """
    r, b, _ = blocks.shape
    if g == 1:
        return blocks
    wide = blocks.new_zeros(r // g, g, b, g, b)
    wide.diagonal(dim1=1, dim2=3).copy_(blocks.view(r // g, g, b, b).permute(0, 2, 3, 1))
    return wide.view(r // g, g * b, g * b)


def near_orthogonal_inverse(blocks: torch.Tensor, tol: float = 0.5) -> torch.Tensor | None:
    """R_i⁻¹ for blocks (r, b, b) that are near orthogonal (‖I − R_iR_iᵀ‖_F ≤ ``tol`` for every i, so every
    singular value lies in [√(1 − tol), √(1 + tol)]), else None (the caller takes a path without the inverse).

    Newton–Schulz from X₀ = Rᵀ: with E_k = I − R X_k, X_(k+1) = X_k (I + E_k) gives E_(k+1) = E_k², so the
    error squares each step and stops at rounding after a few b×b products (LAPACK's batched inverse costs
    more than the token product it would save). Deciding reads a number back from the device, so on an
    accelerator (where that would stall the queue, and token products are cheap) the answer is None.

    Explained in: book/oft_boft.ipynb
    """
    return near_orthogonal_inverses(blocks, [blocks.shape[0]], tol)[0]


def near_orthogonal_inverses(blocks: torch.Tensor, sizes: Sequence[int], tol: float = 0.5,
                             ) -> list[torch.Tensor | None]:
    """:func:`near_orthogonal_inverse` for consecutive groups of blocks (``sizes``: each layer's count) in one run:
    each group whose blocks are all near orthogonal gets their inverses, the others None.

    Explained in: book/oft_boft.ipynb
    """
    if blocks.device.type != "cpu":
        return [None] * len(sizes)
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    err = eye - torch.bmm(blocks, blocks.mT)
    norms = torch.linalg.matrix_norm(err).tolist()
    groups = [norms[end - n:end] for n, end in zip(sizes, itertools.accumulate(sizes))]
    ok = [all(v <= tol for v in group) for group in groups]  # NaN fails too
    if not any(ok):
        return [None] * len(sizes)
    if not all(ok):  # the others keep X = Rᵀ: their error is left out of the iteration
        keep = torch.tensor(ok, device=blocks.device).repeat_interleave(torch.tensor(sizes, device=blocks.device))
        err = err * keep.view(-1, 1, 1)
    size = max((v for group, good in zip(groups, ok) if good for v in group), default=0.0)
    inv, eps = blocks.mT, torch.finfo(blocks.dtype).eps
    while size > eps:
        inv = torch.baddbmm(inv, inv, err)
        size *= size
        if size > eps:
            err = torch.bmm(err, err)
    return [piece if good else None for piece, good in zip(inv.split(list(sizes)), ok)]


def rotated_weight_t(weight: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(s ⊙ W Rᵀ)ᵀ = R Wᵀ (columns scaled by s) for block-diagonal R, (in, out): (r, b, b) @ (r, b, out) block by
    block, contiguous in the layout a product with x reads (W may be some rows of a weight: (k, in) → (in, k))."""
    r, b, _ = blocks.shape
    w_rot_t = torch.bmm(blocks, weight.T.view(r, b, -1)).view(r * b, -1)
    return w_rot_t if scale is None else w_rot_t.mul_(scale)  # the product is fresh: scaled where it lies


class RotatedLinear(torch.autograd.Function):
    """h = s ⊙ (x (W Rᵀ)ᵀ) + b for block-diagonal R (r, b, b), a frozen W (out, r·b) and an optional per-output
    scale s (BOFT), as one autograd node.

    Forward rotates the weight (out·in·b) rather than every token. Backward, with g = ∂L/∂h and
    G = g (s ⊙ W) (∂L/∂(xR), the product a frozen layer computes anyway): ∂x = G Rᵀ and ∂R_i = x_iᵀ G_i, block
    by block, and ∂s = Σ_tokens g ⊙ (x (W Rᵀ)ᵀ). That is two token products; one goes when R is invertible:
    ∂x = g (s ⊙ W Rᵀ) (the product the frozen layer computes anyway, with the rotated weight), G_i = ∂x_i R_i⁻ᵀ,
    so ∂R_i = (x_iᵀ ∂x_i) R_i⁻ᵀ, a b×b product per block. For an orthogonal R (``orthogonal``: the exact
    Cayley map) R⁻ᵀ = R; a truncated Cayley–Neumann series is inverted block by block, when it is near enough
    to orthogonal (‖RᵀR − I‖_F ≤ ½, so κ(R) ≤ √3) for the inverse to lose nothing, else the two products run.
    Blocks narrower than :data:`MIN_BLOCK_WIDTH` run the token products in groups (:func:`block_group`): more
    flops, less time. ∂x is written straight into its (tokens, in) layout. The rotated weight waits for the
    backward when it is no larger than the input the node keeps anyway; else the backward forms it again. With
    s, the forward scales the rotated weight's columns (out·in) rather than the output (tokens·out), and ∂s is
    read off the output, Σ_tokens g ⊙ (h − b) / s (:func:`~peftlab.tuners.base.keep_output`), so no unscaled
    copy of the output is kept. ``inverse``: R⁻¹ when the caller has it (:class:`StepRotations` inverts every
    layer's blocks at once), else the backward inverts.

    Explained in: book/oft_boft.ipynb
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                blocks: torch.Tensor, scale: torch.Tensor | None = None, orthogonal: bool = False,
                inverse: torch.Tensor | None = None) -> torch.Tensor:
        # s scales the rotated weight's columns, so one product gives the scaled output (s ⊙ (W Rᵀ)) x
        w_rot_t = rotated_weight_t(weight, blocks, scale)
        ctx.orthogonal = orthogonal
        # the backward's ∂x uses (s ⊙ W Rᵀ)ᵀ again: kept when it is no larger than the input the node keeps anyway
        # (many tokens), formed again otherwise (few tokens: a weight-sized tensor per layer would outweigh them)
        ctx.kept = x.numel() >= w_rot_t.numel()
        ctx.save_for_backward(x, weight, blocks, bias, scale, inverse, *((w_rot_t,) if ctx.kept else ()))
        h = linear_output(x, w_rot_t.T, bias)[0]
        if scale is not None and ctx.needs_input_grad[4] and not torch.is_inference(h):  # ∂s reads h (÷ s)
            keep_output(ctx, h)
        return h

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, weight, blocks, bias, scale, inverse, *kept = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable again (see second_order_grads)

            def reference(x: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
                h = F.linear(rotate_blocks(x, blocks), weight)
                return (h if scale is None else h * scale) + (0 if bias is None else bias)
            need = ctx.needs_input_grad
            gx, gb, gs = second_order_grads(reference, (x, blocks, scale), (need[0], need[3], need[4]), g)
            return gx, None, None, gb, gs, None, None
        r, b, _ = blocks.shape
        g2 = g.reshape(-1, g.shape[-1])
        t, (out, n) = g2.shape[0], weight.shape
        k = block_group(r, b)
        rk, bk = r // k, b * k
        grad_scale = None
        if ctx.orthogonal:  # R⁻¹ (given, or formed here); None: two token products
            inverse = blocks.mT
        elif inverse is None:
            inverse = near_orthogonal_inverse(blocks)
        if inverse is not None:  # ∂x = g (s ⊙ W Rᵀ), then G_i = ∂x_i R_i⁻ᵀ
            w_rot_t = kept[0] if kept else rotated_weight_t(weight, blocks, scale)
            gx = torch.mm(g2, w_rot_t.T)
            grad_x = gx.view(x.shape) if ctx.needs_input_grad[0] else None
            gr = gx
        else:
            w = weight if scale is None else weight * scale.view(-1, 1)
            gr = torch.mm(g2, w)  # ∂L/∂(xR), (tokens, in)
            grad_x = None
            if ctx.needs_input_grad[0]:  # ∂x_i = G_i R_iᵀ, written straight into (tokens, in)
                grad_x = torch.empty_like(gr)
                torch.bmm(gr.view(t, rk, bk).transpose(0, 1), widen_blocks(blocks, k).transpose(1, 2),
                          out=grad_x.view(t, rk, bk).transpose(0, 1))
                grad_x = grad_x.view(x.shape)
        # Σ_tokens x_iᵀ gr_i, (r/k, kb, kb); with groups, the b×b blocks on the diagonal
        grad_wide = torch.bmm(x.reshape(t, rk, bk).permute(1, 2, 0), gr.view(t, rk, bk).transpose(0, 1))
        grad_blocks = grad_wide if k == 1 else (
            grad_wide.view(rk, k, b, k, b).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(r, b, b))
        if inverse is not None:
            grad_blocks = torch.bmm(grad_blocks, inverse.mT)  # x_iᵀ ∂x_i R_i⁻ᵀ = x_iᵀ G_i
        if scale is not None and ctx.needs_input_grad[4]:

            def direct(idx: Any) -> torch.Tensor:  # Σ_tokens g ⊙ (x (W Rᵀ)ᵀ) for outputs idx, from x
                return (g2[:, idx] * torch.mm(x.reshape(t, -1), rotated_weight_t(weight[idx], blocks))).sum(0)
            h = kept_output(ctx)
            if h is None:
                grad_scale = direct(slice(None))
            else:  # Σ_tokens g ⊙ (h − b) / s: the output read back, unscaled
                h2 = h.reshape(t, -1)
                grad_scale = divide_by_scale((g2 * (h2 if bias is None else h2 - bias)).sum(0), scale, direct)
        return grad_x, None, None, grad_blocks, grad_scale, None, None


class StepRotations:
    """The rotations of one forward that records gradients, built together: every layer training one adapter
    (not merged, not disabled) whose blocks come from free numbers alike (same b, storage, series, dtype,
    device) joins one :class:`BatchedRotation` node, built when the first of them asks. Per layer, the blocks
    of 16 attention projections cost some twenty small operations each way; together, the same twenty once
    (and the truncated series' inverses, which the layers' backward needs, in one run too).

    A layer asks only while recording gradients and without saved-tensor hooks: under activation checkpointing
    (``torch.utils.checkpoint``) the forward runs again during the backward, after the step's rotations are
    gone, and must save what the first run saved, so such layers build their own. A parameter changed in place
    since the forward began is built again by its layer too.

    Explained in: book/oft_boft.ipynb
    """

    def __init__(self, layers: Iterable[OrthogonalLayer]) -> None:
        groups: dict[tuple, list[tuple[OrthogonalLayer, str, torch.Tensor]]] = {}
        for layer in layers:
            active = layer._active_adapters
            if (layer.disable_adapters or layer.merged_adapters or len(active) != 1 or active[0] not in layer._adapters
                    or not layer.joins_step_rotations(active[0])):
                continue
            p, b, packed, terms = layer.rotation_source(active[0])
            if not (p.requires_grad and fusable(p)):
                continue
            groups.setdefault((b, packed, terms, p.dtype, p.device, tuple(p.shape[1:])), []).append(
                (layer, active[0], p))
        #: id(layer) → (adapter, group, position, p, p's version when the step began)
        self._where: dict[int, tuple[str, int, int, torch.Tensor, int]] = {}
        self._groups = [(key, members) for key, members in groups.items() if len(members) > 1]
        #: per group, once built: (each member's blocks, each member's inverse or None)
        self._built: list[tuple[tuple[torch.Tensor, ...], list[torch.Tensor | None]] | None]
        self._built = [None] * len(self._groups)
        for g, (_, members) in enumerate(self._groups):
            for i, (layer, name, p) in enumerate(members):
                self._where[id(layer)] = (name, g, i, p, p._version)

    def __bool__(self) -> bool:
        return bool(self._groups)

    def blocks(self, layer: OrthogonalLayer, adapter_name: str) -> torch.Tensor | None:
        """``layer``'s blocks of ``adapter_name`` from the group's node (built now if it is the first to ask), or None
        where the layer must build its own."""
        where = self._where.get(id(layer))
        if where is None or where[0] != adapter_name or not torch.is_grad_enabled() or saved_tensor_hooks_active():
            return None
        _, g, i, p, version = where
        if p._version != version:
            return None
        built = self._built[g]
        if built is None:
            (b, packed, terms, *_), members = self._groups[g]
            sink: dict[str, Any] = {}
            blocks = BatchedRotation.apply(sink, b, packed, terms, *(m[2] for m in members))
            built = self._built[g] = (blocks, sink.get("inverses") or [None] * len(members))
        return built[0][i]

    def inverse(self, layer: OrthogonalLayer, adapter_name: str, blocks: torch.Tensor) -> torch.Tensor | None:
        """R⁻¹ of ``blocks`` if they are exactly the blocks this step built for ``layer`` (and the series left them
        near enough to orthogonal), else None."""
        where = self._where.get(id(layer))
        if where is None or where[0] != adapter_name or self._built[where[1]] is None:
            return None
        mine, inverses = self._built[where[1]]
        return inverses[where[2]] if mine[where[2]] is blocks else None


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are set (``torch.utils.checkpoint`` without reentrancy, CPU offloading, …)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


#: the rotations of the running forward, while an :class:`OrthogonalTuner` records gradients
_STEP_ROTATIONS: contextvars.ContextVar[StepRotations | None] = contextvars.ContextVar("peftlab_step_rotations",
                                                                                      default=None)


# ---------------------------------------------------------------------------------------------------
# layer
# ---------------------------------------------------------------------------------------------------
class OrthogonalLayer(AdapterLayer):
    """A frozen nn.Linear or nn.Conv2d whose input side each adapter rotates: W' = s ⊙ (W Rᵀ).

    A method implements :meth:`rotation_source` (the free numbers its blocks come from, which
    :meth:`source_blocks` turns into blocks), :meth:`rotate` (x ↦ x R on the last dimension, the fast path),
    :meth:`rotation` (R as a dense (in, in) matrix), :meth:`out_scale` (BOFT's s, or None) and
    :meth:`exactly_orthogonal`.
    ``in_dim`` is ``in_features``, or in_channels·kh·kw on a convolution.

    Explained in: book/oft_boft.ipynb
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        if not isinstance(base, SUPPORTED_LAYERS):
            raise ValueError(f"{type(self).__name__} wraps nn.Linear or nn.Conv2d, not {type(base).__name__}")
        self.is_conv = isinstance(base, nn.Conv2d)
        self.in_dim = self.in_features * (math.prod(base.kernel_size) if self.is_conv else 1)

    # ---- a method's math ----------------------------------------------------------------------------
    def rotate(self, x: torch.Tensor, adapter_name: str, training: bool = False) -> torch.Tensor:
        """x R for x (…, in_dim); ``training`` applies the method's multiplicative dropout."""
        raise NotImplementedError

    def rotation(self, adapter_name: str, training: bool = False) -> torch.Tensor:
        """R as a dense (in_dim, in_dim) matrix (merging, convolutions, pictures)."""
        eye = torch.eye(self.in_dim, device=self.weight.device, dtype=self._adapter_dtype(adapter_name))
        return self.rotate(eye, adapter_name, training)

    def out_scale(self, adapter_name: str) -> torch.Tensor | None:
        """A per-output factor s (BOFT's boft_s, flattened to (out,)), or None."""
        return None

    def exactly_orthogonal(self, adapter_name: str) -> bool:
        """True when R is orthogonal up to rounding (exact Cayley), False for a truncated series."""
        return True

    def _adapter_dtype(self, adapter_name: str) -> torch.dtype:
        return self._first_tensor(adapter_name).dtype

    def _first_tensor(self, adapter_name: str) -> torch.Tensor:
        entry = self.adapter_tensors(adapter_name)[0][1]
        return entry if isinstance(entry, torch.Tensor) else next(entry.parameters())

    # ---- merge ----------------------------------------------------------------------------------
    def _flat(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)  # (out, in·kh·kw) on a convolution

    def merged_weights(self, adapter_name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """W' = s ⊙ (W Rᵀ) (rows scaled by s); the bias is unchanged."""
        rot = self.rotation(adapter_name).float()
        new = self._flat(weight).float() @ rot.T
        s = self.out_scale(adapter_name)
        if s is not None:
            new = new * s.float().view(-1, 1)
        return new.reshape(weight.shape).to(weight.dtype), bias

    def unmerged_weights(self, adapter_name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """W = (W' / s) R⁻ᵀ: Rᵀ⁻¹ = R for an exact rotation; a truncated series is inverted (float64)."""
        w = self._flat(weight).double()
        s = self.out_scale(adapter_name)
        if s is not None:
            w = w / s.double().view(-1, 1)
        rot = self.rotation(adapter_name).double()
        w = w @ rot if self.exactly_orthogonal(adapter_name) else torch.linalg.solve(rot, w.T).T  # W' R⁻ᵀ
        return w.reshape(weight.shape).to(weight.dtype), bias

    # ---- forward --------------------------------------------------------------------------------
    def adapter_forward(self, x: torch.Tensor, adapters: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Several active adapters act in the order merging composes them: the first named acts last on x."""
        if self.is_conv:
            return self._conv_forward(x, adapters, args, kwargs)
        if len(adapters) == 1 and torch.is_grad_enabled():
            fused = self.fused_forward(x, adapters[0], args, kwargs)
            if fused is not None:
                return fused
        out_dtype = x.dtype
        scale = None
        for name in reversed(list(adapters)):
            dt = self._first_tensor(name).dtype
            x = self.rotate(x.to(dt), name, self.training)
            s = self.out_scale(name)
            if s is not None:
                scale = s if scale is None else scale * s
        base = self.get_base_layer()
        if scale is None:
            return self.base_layer(x.to(out_dtype), *args, **kwargs)
        plain = None if args or kwargs else hookless_linear(base)
        if plain is not None and x.dtype == plain[0].dtype:
            out = F.linear(x, plain[0]) * scale  # (W x')·s + b
            return out + plain[1] if plain[1] is not None else out
        result = self.base_layer(x.to(out_dtype), *args, **kwargs)
        if base.bias is not None:  # s scales W x', not the bias
            return ((result - base.bias) * scale.to(result.dtype) + base.bias).to(out_dtype)
        return (result * scale.to(result.dtype)).to(out_dtype)

    def block_diagonal_blocks(self, adapter_name: str) -> torch.Tensor | None:
        """R's (r, b, b) blocks when R is block-diagonal (OFT; BOFT with one factor), else None."""
        return None

    def fused_forward(self, x: torch.Tensor, adapter_name: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """Training one adapter with a block-diagonal R on a plain, frozen nn.Linear: :class:`RotatedLinear`,
        then the output scale s if the method has one; None when the generic path must run."""
        base = self._modules["base_layer"]
        if type(base) is not nn.Linear or watched_by_hooks(base) or args or kwargs:
            return None
        w, bias = base._parameters["weight"], base._parameters["bias"]
        if w.requires_grad or (bias is not None and bias.requires_grad):
            return None
        blocks = self.block_diagonal_blocks(adapter_name)
        if blocks is None or not fusable(x, w, blocks):
            return None
        s = self.out_scale(adapter_name)
        if s is not None and s.dtype != x.dtype:
            return None
        # (W Rᵀ x)·s + b; an exactly orthogonal R spares a token product in the backward
        orthogonal = self.exactly_orthogonal(adapter_name)
        inverse = None if orthogonal else self._step_inverse(adapter_name, blocks)
        return RotatedLinear.apply(x, w, bias, blocks, s, orthogonal, inverse)

    # ---- a training step's rotations, built together ---------------------------------------------------
    def rotation_source(self, adapter_name: str) -> tuple[torch.Tensor, int, bool, int | None]:
        """(p, b, packed, terms): what this adapter's blocks come from (:func:`rotation_blocks`)."""
        raise NotImplementedError

    def joins_step_rotations(self, adapter_name: str) -> bool:
        """Whether a training forward may build this adapter's blocks with the other layers'
        (:class:`StepRotations`); False where the method changes its parameters just before each build."""
        return True

    def source_blocks(self, adapter_name: str) -> torch.Tensor:
        """This adapter's blocks from :meth:`rotation_source`: the training forward's shared node
        (:class:`StepRotations`) where it has them, else built here."""
        step = _STEP_ROTATIONS.get()
        blocks = None if step is None else step.blocks(self, adapter_name)
        return rotation_blocks(*self.rotation_source(adapter_name)) if blocks is None else blocks

    def _step_inverse(self, adapter_name: str, blocks: torch.Tensor) -> torch.Tensor | None:
        """R⁻¹ of ``blocks`` when they are the step's own (not changed since, e.g. by dropout), else None."""
        step = _STEP_ROTATIONS.get()
        return None if step is None else step.inverse(self, adapter_name, blocks)

    def _conv_forward(self, x: torch.Tensor, adapters: Sequence[str], args: tuple, kwargs: dict) -> torch.Tensor:
        """A convolution with the rotated filters s ⊙ (W Rᵀ): one convolution, equal to the merged layer."""
        base = self.get_base_layer()
        w = self._flat(base.weight)
        for name in adapters:  # merging order: the first named is applied to W first
            rot = self.rotation(name, self.training)
            w = w.to(rot.dtype) @ rot.T
            s = self.out_scale(name)
            if s is not None:
                w = w * s.view(-1, 1)
        w = w.reshape(base.weight.shape).to(base.weight.dtype)
        bias = base.bias
        return base._conv_forward(x.to(w.dtype), w, bias)


# ---------------------------------------------------------------------------------------------------
# tuner
# ---------------------------------------------------------------------------------------------------
class OrthogonalTuner(BaseTuner):
    """Injects OFT or BOFT layers (see :class:`~peftlab.tuners.base.BaseTuner`). A forward that records gradients
    builds the rotations of all layers that train one adapter in one node per kind of block
    (:class:`StepRotations`; ``batch_rotations = False`` on the class or the model builds each layer's own).

    Explained in: book/oft_boft.ipynb
    """

    default_target_modules = DEFAULT_TARGET_MODULES
    #: build the step's rotations together (:class:`StepRotations`) in a forward that records gradients
    batch_rotations: bool = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.batch_rotations and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return self.model(*args, **kwargs)
        step = StepRotations(orthogonal_layers(self.model))
        if not step:
            return self.model(*args, **kwargs)
        token = _STEP_ROTATIONS.set(step)
        try:
            return self.model(*args, **kwargs)
        finally:
            _STEP_ROTATIONS.reset(token)

    @staticmethod
    def rotated_size(target: nn.Module) -> int:
        """The size R acts on: in_features, or in_channels·kh·kw of a convolution."""
        if isinstance(target, nn.Conv2d):
            return target.in_channels * math.prod(target.kernel_size)
        return target.in_features

    def check_layer(self, config: Any, target: nn.Module, key: str) -> None:
        if isinstance(target, nn.Conv2d) and target.groups > 1:
            raise ValueError(
                f"target module {key!r} is a grouped nn.Conv2d (groups={target.groups}); {self.method_name} rotates "
                "the whole filter of an ungrouped convolution. Leave it out of target_modules"
            )


def orthogonal_layers(model: nn.Module) -> list[OrthogonalLayer]:
    """``model``'s OFT and BOFT layers in module order (what ``model.modules()`` would find, without its names and
    memo: a training forward asks for them every step)."""
    found, seen, stack = [], set(), [model]
    while stack:
        module = stack.pop()
        if module is None or id(module) in seen:  # a slot set to None; a module reached twice counts once
            continue
        seen.add(id(module))
        if isinstance(module, OrthogonalLayer):  # no adapter layer nests another
            found.append(module)
        else:
            stack.extend(reversed(module._modules.values()))
    return found


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` (to name valid block sizes in errors)."""
    return [d for d in range(1, n + 1) if n % d == 0]
