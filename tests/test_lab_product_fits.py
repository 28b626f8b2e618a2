"""peftlab.lab.product_fits: fitting a target ΔW with LoRA, LoHa and LoKr parametrisations."""

from __future__ import annotations

import pytest
import torch

from peftlab.lab import product_fits as pf


def test_n_parameters_follow_the_formulas():
    assert pf.n_parameters("lora", (64, 64), 8) == 1024
    assert pf.n_parameters("loha", (64, 64), 4) == 1024
    assert pf.n_parameters("lokr", (64, 64), 8) == 128
    assert pf.n_parameters("lokr", (32, 16), 4) == 16 + 8 * 4


def test_each_parametrisation_fits_its_own_structure_and_reaches_its_rank():
    g = torch.Generator().manual_seed(0)
    kron_target = torch.kron(torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g))
    lokr = pf.fit(kron_target, "lokr", 4, steps=600)
    assert lokr.error < 1e-2 and lokr.rank == 16 and len(lokr.curve) == 600
    assert lokr.curve[-1] < lokr.curve[0]
    gauss = torch.randn(16, 16, generator=g)
    assert pf.fit(gauss, "lora", 2, steps=50).rank == 2
    assert pf.fit(gauss, "loha", 2, steps=50).rank == 4  # a Hadamard product of two rank-2 factors: rank r² here
    assert pf.fit(gauss, "lora", 2, steps=50) == pf.fit(gauss, "lora", 2, steps=50)  # seeded


def test_bad_input_is_refused_with_the_valid_choices():
    t = torch.randn(12, 12)
    with pytest.raises(ValueError, match="method='dora' is not one of"):
        pf.fit(t, "dora", 2, steps=1)
    with pytest.raises(ValueError, match="r=5 must divide both sides.*try a divisor such as 4"):
        pf.fit(t, "lokr", 5, steps=1)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        pf.fit(t, "lora", 2, steps=0)


def test_fit_layer_fits_a_library_layer_and_the_eckart_young_floor_holds():
    from torch import nn

    from peftlab.tuners.lokr.layer import LoKrLayer
    from peftlab.tuners.lora.layer import Linear as LoraLinear

    g = torch.Generator().manual_seed(1)
    target = torch.randn(16, 16, generator=g)
    torch.manual_seed(0)
    lora = pf.fit_layer(LoraLinear(nn.Linear(16, 16), "a", r=2, lora_alpha=2), target, steps=300)
    assert lora["rank"] == 2 and lora["parameters"] == 2 * (16 + 16)
    floor = pf.best_rank_error(target, 2)
    assert floor - 1e-3 <= lora["error"] < 1.0  # no rank-2 matrix beats the floor
    assert pf.best_rank_error(target, 16) == pytest.approx(0.0, abs=1e-6)
    kron_target = torch.kron(torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g))
    lokr = pf.fit_layer(LoKrLayer(nn.Linear(16, 16), "a", r=4, alpha=4), kron_target, steps=600)
    assert lokr["error"] < 1e-2
    with pytest.raises(TypeError, match="needs an adapter layer"):
        pf.fit_layer(nn.Linear(4, 4), torch.ones(4, 4), steps=1)
