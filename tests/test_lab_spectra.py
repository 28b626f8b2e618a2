"""peftlab.lab.spectra: singular values, energy, ranks, subspace similarity, magnitude and direction."""

from __future__ import annotations

import pytest
import torch

from peftlab.lab import spectra as spec


def test_energy_and_ranks_on_known_matrices():
    M = torch.diag(torch.tensor([4.0, 3.0, 0.0]))
    assert spec.energy_fraction(M, 1) == pytest.approx(16 / 25)
    assert spec.energy_fraction(M, 2) == pytest.approx(1.0)
    assert spec.rank_for_energy(M, 0.5) == 1 and spec.rank_for_energy(M, 0.9) == 2 and spec.rank_for_energy(M, 1.0) == 2
    assert spec.numerical_rank(M) == 2
    Z = torch.zeros(4, 5)
    assert spec.energy_fraction(Z, 1) == 1.0 and spec.rank_for_energy(Z) == 0 and spec.numerical_rank(Z) == 0
    with pytest.raises(ValueError, match="fraction"):
        spec.rank_for_energy(M, 0.0)
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)
    assert spec.numerical_rank(low) == 3 and spec.rank_for_energy(low, 1.0) <= 3
    assert torch.allclose(spec.singular_values(low)[:3], torch.linalg.svdvals(low.double())[:3])


def test_subspace_similarity():
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64)).Q
    M1 = U[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ U[:, :3].T
    M2 = U[:, 3:6] @ U[:, 3:6].T
    assert spec.subspace_similarity(M1, M1, 3, 3) == pytest.approx(1.0)
    assert spec.subspace_similarity(M1, 5 * M1, 1, 3) == pytest.approx(1.0)  # top-1 inside the top-3
    assert spec.subspace_similarity(M1, M2, 3, 3) == pytest.approx(0.0, abs=1e-12)  # orthogonal directions


def test_magnitude_direction() -> None:
    W0 = torch.randn(4, 6)
    assert spec.magnitude_direction(W0, W0) == (0.0, 0.0) or max(spec.magnitude_direction(W0, W0)) < 1e-12
    dm, dd = spec.magnitude_direction(W0, 2 * W0)  # pure rescale: no direction change
    assert abs(dm - float(W0.norm(dim=1).mean())) < 1e-6 and dd < 1e-12
