"""The three matrix products behind LoRA, LoHa and LoKr, written from their definitions.

* matrix product     (AB)[i, j]         = Σ_k A[i, k] · B[k, j]          (矩阵乘法)
* Hadamard product   (A ⊙ B)[i, j]      = A[i, j] · B[i, j]               (哈达玛积)
* Kronecker product  (A ⊗ B)[i·p+k, j·q+l] = A[i, j] · B[k, l]            (克罗内克积)

plus ``vec`` (向量化: stack the columns) and its inverse ``unvec``, and ``kron_rearrange`` (Van Loan and
Pitsianis' rearrangement, which turns a Kronecker product into a rank-1 matrix). Each function is
written so that the code reads like its formula (broadcasting over the index grid); the
tests check them against ``torch.matmul``, ``*`` and ``torch.kron``. Adapters use the
torch ops; this module is for reading and for checking identities.

Explained in: book/products.ipynb
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hadamard", "kron", "kron_rearrange", "matmul", "unvec", "vec"]


def _check_matrix(name: str, X: Tensor) -> None:
    if not isinstance(X, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(X).__name__}")
    if X.ndim != 2:
        raise ValueError(f"{name} must be a matrix (2-D), got shape {tuple(X.shape)}")


def matmul(A: Tensor, B: Tensor) -> Tensor:
    """Matrix product: C[i, j] = Σ_k A[i, k] · B[k, j]; (m × n) times (n × p) gives (m × p).

    Explained in: book/products.ipynb
    """
    _check_matrix("A", A)
    _check_matrix("B", B)
    (m, n), (n2, p) = A.shape, B.shape
    if n != n2:
        raise ValueError(
            f"matmul: A has shape {tuple(A.shape)} and B has shape {tuple(B.shape)}; "
            f"A's columns ({n}) must equal B's rows ({n2}), e.g. B of shape ({n}, {p})"
        )
    # terms[i, k, j] = A[i, k] · B[k, j]; shape (m, n, p)
    terms = A[:, :, None] * B[None, :, :]
    # C[i, j] = Σ_k terms[i, k, j]; shape (m, p)
    return terms.sum(dim=1)


def hadamard(A: Tensor, B: Tensor) -> Tensor:
    """Hadamard (element-wise) product A ⊙ B: C[i, j] = A[i, j] · B[i, j]; both m × n.

    Explained in: book/products.ipynb
    """
    _check_matrix("A", A)
    _check_matrix("B", B)
    if A.shape != B.shape:
        raise ValueError(
            f"hadamard: A has shape {tuple(A.shape)} and B has shape {tuple(B.shape)}; "
            f"the Hadamard product needs equal shapes, e.g. B of shape {tuple(A.shape)}"
        )
    m, n = A.shape
    C = A.new_empty((m, n), dtype=torch.result_type(A, B))
    # one multiplication per entry, exactly as in the definition (no matrix-level op)
    for i in range(m):
        for j in range(n):
            C[i, j] = A[i, j] * B[i, j]
    return C


def kron(A: Tensor, B: Tensor) -> Tensor:
    """Kronecker product: (A ⊗ B)[i·p+k, j·q+l] = A[i, j] · B[k, l]; (m×n) ⊗ (p×q) is (mp × nq).

    Block (i, j) of the result is the p × q matrix A[i, j] · B.

    Explained in: book/products.ipynb
    """
    _check_matrix("A", A)
    _check_matrix("B", B)
    (m, n), (p, q) = A.shape, B.shape
    # T[i, k, j, l] = A[i, j] · B[k, l]; shape (m, p, n, q)
    T = A[:, None, :, None] * B[None, :, None, :]
    # merge (i, k) into the row i·p + k and (j, l) into the column j·q + l
    return T.reshape(m * p, n * q)


def vec(X: Tensor) -> Tensor:
    """Vectorisation: stack the columns of X (m × n) into one vector of length mn.

    vec(X)[j·m + i] = X[i, j], so the first m entries are column 0.

    Explained in: book/products.ipynb
    """
    _check_matrix("X", X)
    # X.T is (n, m) and row-major; flattening it lists column 0 of X first, then column 1, ...
    return X.T.reshape(-1)


def unvec(v: Tensor, rows: int) -> Tensor:
    """Inverse of :func:`vec`: refill the columns of a ``rows`` × (len(v) / rows) matrix.

    Explained in: book/products.ipynb
    """
    if not isinstance(v, Tensor) or v.ndim != 1:
        raise ValueError(f"unvec needs a 1-D tensor, got {getattr(v, 'shape', type(v).__name__)}")
    if rows <= 0 or v.numel() % rows != 0:
        raise ValueError(
            f"unvec: a vector of length {v.numel()} cannot fill {rows} rows; "
            f"rows must be a positive divisor of {v.numel()}"
        )
    return v.reshape(v.numel() // rows, rows).T


def kron_rearrange(M: Tensor, block: tuple[int, int]) -> Tensor:
    """Van Loan–Pitsianis rearrangement: one row per p × q block of M, so that R(A ⊗ B) = vec(A) vec(B)ᵀ.

    Row i + j·m (column-major over the m × n grid of blocks) is vec(M_ij)ᵀ of block (i, j). M = A ⊗ B exactly
    when R(M) has rank 1, and a sum of k Kronecker products has rearrangement rank ≤ k, which is how a picture
    of a weight update tells a Kronecker structure (LoKr) from any other.

    Explained in: book/delta_w_gallery.ipynb
    """
    _check_matrix("M", M)
    p, q = block
    rows, cols = M.shape
    if p <= 0 or q <= 0 or rows % p or cols % q:
        raise ValueError(f"kron_rearrange: blocks of {p} × {q} do not tile a {rows} × {cols} matrix; "
                         f"choose p dividing {rows} and q dividing {cols}")
    m, n = rows // p, cols // q
    # T[i, k, j, l] = M[i·p + k, j·q + l]; block (i, j) is T[i, :, j, :]
    T = M.reshape(m, p, n, q)
    # row i + j·m holds vec(block (i, j)) = its columns stacked: index l·p + k
    return T.permute(2, 0, 3, 1).reshape(m * n, p * q)
