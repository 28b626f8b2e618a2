"""peftlab.linalg: the products equal torch's, and the identities the book states hold.

Property-based (hypothesis) on small float64 matrices.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peftlab import linalg

torch.set_num_threads(1)
# local to this module (a global profile would change other test files' settings)
small = settings(max_examples=40, deadline=None, derandomize=True)

dims = st.integers(min_value=1, max_value=4)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def rand(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def low_rank(seed: int, m: int, n: int, r: int) -> torch.Tensor:
    """An m × n matrix of rank min(r, m, n) (almost surely)."""
    return rand(seed, m, r) @ rand(seed + 1, r, n)


def rank(X: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(X))


# ------------------------------------------------------------------ equal to the torch ops


@small
@given(m=dims, n=dims, p=dims, seed=seeds)
def test_matmul_equals_torch(m, n, p, seed):
    A, B = rand(seed, m, n), rand(seed + 7, n, p)
    torch.testing.assert_close(linalg.matmul(A, B), A @ B)


@small
@given(m=dims, n=dims, seed=seeds)
def test_hadamard_equals_torch(m, n, seed):
    A, B = rand(seed, m, n), rand(seed + 7, m, n)
    torch.testing.assert_close(linalg.hadamard(A, B), A * B)


@small
@given(m=dims, n=dims, p=dims, q=dims, seed=seeds)
def test_kron_equals_torch_and_index_formula(m, n, p, q, seed):
    A, B = rand(seed, m, n), rand(seed + 7, p, q)
    C = linalg.kron(A, B)
    torch.testing.assert_close(C, torch.kron(A, B))
    assert C.shape == (m * p, n * q)
    i, j, k, l = m - 1, n - 1, p - 1, q - 1
    assert C[i * p + k, j * q + l] == A[i, j] * B[k, l]


def test_the_notes_2x2_examples_on_integers():
    # a..h = 1..8
    A = torch.tensor([[1, 2], [3, 4]])
    B = torch.tensor([[5, 6], [7, 8]])
    assert linalg.matmul(A, B).tolist() == [[1 * 5 + 2 * 7, 1 * 6 + 2 * 8], [3 * 5 + 4 * 7, 3 * 6 + 4 * 8]]
    assert linalg.hadamard(A, B).tolist() == [[5, 12], [21, 32]]
    assert linalg.kron(A, B).tolist() == [
        [5, 6, 10, 12],
        [7, 8, 14, 16],
        [15, 18, 20, 24],
        [21, 24, 28, 32],
    ]


# ------------------------------------------------------------------ vec / unvec


@small
@given(m=dims, n=dims, seed=seeds)
def test_vec_stacks_columns_and_unvec_inverts(m, n, seed):
    X = rand(seed, m, n)
    v = linalg.vec(X)
    assert v.shape == (m * n,)
    torch.testing.assert_close(v[:m], X[:, 0])  # first column first
    torch.testing.assert_close(linalg.unvec(v, m), X)


# ------------------------------------------------------------------ identities


@small
@given(m=dims, n=dims, p=dims, q=dims, r1=dims, r2=dims, seed=seeds)
def test_rank_of_kron_is_product_of_ranks(m, n, p, q, r1, r2, seed):
    A, B = low_rank(seed, m, n, r1), low_rank(seed + 3, p, q, r2)
    assert rank(linalg.kron(A, B)) == rank(A) * rank(B)


@small
@given(m=st.integers(1, 6), n=st.integers(1, 6), r1=dims, r2=dims, seed=seeds)
def test_rank_of_hadamard_at_most_product_of_ranks(m, n, r1, r2, seed):
    A, B = low_rank(seed, m, n, r1), low_rank(seed + 3, m, n, r2)
    assert rank(linalg.hadamard(A, B)) <= rank(A) * rank(B)


def test_hadamard_of_two_rank_2_reaches_rank_4():
    # generic rank-2 ∘ rank-2 on 6 × 6 reaches the bound r1·r2 = 4 (what LoHa relies on)
    A, B = low_rank(0, 6, 6, 2), low_rank(10, 6, 6, 2)
    assert rank(A) == rank(B) == 2
    assert rank(linalg.hadamard(A, B)) == 4


@small
@given(m=dims, n=dims, k=dims, p=dims, q=dims, s=dims, seed=seeds)
def test_mixed_product_rule(m, n, k, p, q, s, seed):
    # (A ⊗ B)(C ⊗ D) = (AC) ⊗ (BD) with A m×n, C n×k, B p×q, D q×s
    A, C = rand(seed, m, n), rand(seed + 1, n, k)
    B, D = rand(seed + 2, p, q), rand(seed + 3, q, s)
    left = linalg.matmul(linalg.kron(A, B), linalg.kron(C, D))
    right = linalg.kron(linalg.matmul(A, C), linalg.matmul(B, D))
    torch.testing.assert_close(left, right)


@small
@given(m=dims, n=dims, p=dims, q=dims, seed=seeds)
def test_kron_times_vec_is_vec_of_sandwich(m, n, p, q, seed):
    # (A ⊗ B) vec(X) = vec(B X Aᵀ), A m×n, B p×q, X q×n
    A, B, X = rand(seed, m, n), rand(seed + 1, p, q), rand(seed + 2, q, n)
    left = linalg.matmul(linalg.kron(A, B), linalg.vec(X)[:, None])[:, 0]
    right = linalg.vec(linalg.matmul(linalg.matmul(B, X), A.T))
    torch.testing.assert_close(left, right)


@small
@given(m=dims, n=dims, p=dims, q=dims, seed=seeds)
def test_transpose_rules(m, n, p, q, seed):
    A, B = rand(seed, m, n), rand(seed + 1, p, q)
    torch.testing.assert_close(linalg.kron(A, B).T, linalg.kron(A.T, B.T))  # (A⊗B)ᵀ = Aᵀ⊗Bᵀ
    C = rand(seed + 2, n, p)
    torch.testing.assert_close(linalg.matmul(A, C).T, linalg.matmul(C.T, A.T))  # (AC)ᵀ = CᵀAᵀ
    D = rand(seed + 3, m, n)
    torch.testing.assert_close(linalg.hadamard(A, D).T, linalg.hadamard(A.T, D.T))


# ------------------------------------------------------------------ errors


def test_matmul_shape_error_names_both_shapes_and_the_fix():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\).*\(3, 5\)"):
        linalg.matmul(torch.ones(2, 3), torch.ones(4, 5))


def test_hadamard_shape_error_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        linalg.hadamard(torch.ones(2, 3), torch.ones(3, 2))


@pytest.mark.parametrize("fn", [linalg.matmul, linalg.hadamard, linalg.kron])
def test_non_matrices_rejected(fn):
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.ones(3), torch.ones(3, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn([[1.0]], torch.ones(1, 1))


def test_unvec_rejects_bad_rows():
    with pytest.raises(ValueError, match="divisor"):
        linalg.unvec(torch.ones(6), 4)
