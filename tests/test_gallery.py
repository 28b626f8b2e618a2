"""The ΔW gallery (peftlab.lab.gallery, viz.delta_gallery / delta_panel, linalg.kron_rearrange).

Each method trains briefly on the gallery's task; its ΔW read through merge_and_unload must equal the layer's
own rule, and the structure the chapter asserts must hold on the trained adapters.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from peftlab import LoraConfig, get_peft_model, linalg, viz  # noqa: E402
from peftlab.lab import gallery as G  # noqa: E402
from peftlab.lab import spectra  # noqa: E402

STEPS = 20
LAYER = "trunk.l2"


@pytest.fixture(scope="module")
def exhibits():
    return G.train_gallery(STEPS)


def _close(a, b, tol=1e-5):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def test_every_method_is_in_the_gallery(exhibits):
    methods = {e.method for e in exhibits.values()}
    assert methods == {"lora", "loha", "lokr", "oft", "boft", "ia3", "dora", "adalora", "full"}
    for e in exhibits.values():
        assert set(e.delta) == set(G.GALLERY_LAYERS), e.label
        assert all(d.shape == e.own[n].shape for n, d in e.delta.items())


def test_merged_minus_base_equals_the_layers_own_delta(exhibits):
    for e in exhibits.values():
        for n, d in e.delta.items():
            assert float(d.abs().max()) > 0, f"{e.label} {n}: no update after {STEPS} steps"
            assert _close(d, e.own[n]), f"{e.label} {n}: merge_and_unload − base differs from the layer's own ΔW"


def test_own_delta_is_get_delta_weight_for_additive_methods():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(6, 5)), LoraConfig(r=2, target_modules=["0"],
                                                                      init_lora_weights=False))
    layer = G.adapted_layers(model)["0"]
    assert torch.allclose(G.own_delta(layer), layer.get_delta_weight("default"))
    assert torch.allclose(G.merged_minus_base(model)["0"], layer.get_delta_weight("default"), atol=1e-6)
    with pytest.raises(KeyError, match="adapted layers"):
        G.merged_minus_base(model, ["1"])


def test_the_structure_each_method_promises(exhibits):
    by = {e.method: e for e in exhibits.values()}
    lora = by["lora"]
    assert spectra.numerical_rank(lora.delta[LAYER]) <= lora.structure[LAYER]["r"]
    loha = by["loha"]
    assert spectra.numerical_rank(loha.delta[LAYER]) <= loha.structure[LAYER]["r"] ** 2
    lokr = by["lokr"]
    R = linalg.kron_rearrange(lokr.delta[LAYER], lokr.structure[LAYER]["block"])
    assert spectra.numerical_rank(R) == 1
    for name in ("oft", "boft"):
        e = by[name]
        rot = e.structure[LAYER]["R"].double()
        assert torch.allclose(rot.T @ rot, torch.eye(rot.shape[0], dtype=torch.float64), atol=1e-5)
    oft = by["oft"].structure[LAYER]
    b = oft["block_size"]
    mask = torch.block_diag(*[torch.ones(b, b)] * (oft["R"].shape[0] // b)).bool()
    assert float(oft["R"][~mask].abs().max()) == 0.0
    W0 = by["ia3"].base[LAYER]
    assert torch.equal(W0, _h4_base_weight())  # the frozen weight the adapters wrap is H4's pretrained one
    ia3 = by["ia3"]
    l = ia3.structure[LAYER]["l"]
    assert not ia3.structure[LAYER]["feedforward"]
    assert torch.allclose(ia3.delta[LAYER], (l - 1).view(-1, 1) * W0, atol=1e-6)  # ΔW = diag(l − 1) W₀
    dora = by["dora"].structure[LAYER]
    assert torch.allclose((W0 + by["dora"].delta[LAYER]).norm(dim=1), dora["m"], rtol=1e-4, atol=1e-6)
    ada = by["adalora"].structure
    for n in G.GALLERY_LAYERS:
        assert ada[n]["allocated"] == int((ada[n]["lambda"] != 0).sum())


def _h4_base_weight():
    from peftlab.lab import digits

    return digits.pretrained_classifier(256, 0).trunk.l2.weight.detach().float()


def test_structure_pictures_and_panels_draw(exhibits):
    ref = exhibits["full FT"].delta[LAYER]
    for e in exhibits.values():
        kind, data, title = G.structure_picture(e, LAYER)
        fig = viz.delta_panel(e.delta[LAYER], title=e.label, reference=ref, part=(kind, data, title))
        main = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        assert len(main) == (2 if kind == "none" else 3), e.label
        assert main[0].get_title() == e.label and main[1].get_xscale() == "log"
        plt.close(fig)


def test_delta_gallery_axes():
    torch.manual_seed(0)
    deltas = {f"m{k}": torch.randn(12, 10) for k in range(7)}
    fig = viz.delta_gallery(deltas, reference=torch.randn(12, 10), ncols=4, zoom=8)
    assert len(fig.axes) == 2 * 2 * 4
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 2 * 7
    heat = [ax for ax in visible if ax.images]
    assert [ax.get_title().split("\n")[0] for ax in heat] == list(deltas)
    assert all(ax.images[0].get_array().shape == (8, 8) for ax in heat)
    spec = [ax for ax in visible if not ax.images]
    assert all(ax.get_yscale() == "log" and ax.get_xscale() == "log" for ax in spec)
    assert all(len(ax.get_lines()) == 2 for ax in spec)  # the update and the reference
    plt.close(fig)
    with pytest.raises(ValueError, match="non-empty"):
        viz.delta_gallery({})
    with pytest.raises(ValueError, match="matrix"):
        viz.delta_gallery({"v": torch.randn(4)})
    with pytest.raises(ValueError, match="part kind"):
        viz.delta_panel(torch.randn(3, 3), part=("image", None, ""))


def test_kron_rearrange():
    A, B = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    R = linalg.kron_rearrange(torch.kron(A, B), (5, 2))
    assert torch.allclose(R, torch.outer(linalg.vec(A), linalg.vec(B)))
    C, D = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    two = torch.kron(A, B) + torch.kron(C, D)
    assert spectra.numerical_rank(linalg.kron_rearrange(two, (5, 2))) == 2
    with pytest.raises(ValueError, match="do not tile"):
        linalg.kron_rearrange(torch.kron(A, B), (4, 2))


def test_gallery_configs_refuse_bad_sizes():
    with pytest.raises(ValueError, match="at least 10"):
        G.gallery_configs(5)
    with pytest.raises(ValueError, match="positive integer"):
        G.gallery_configs(100, r=0)


def test_every_gallery_method_trains_under_bf16_autocast():
    """The fused training paths (LoHa, OFT, IA3, AdaLoRA) step aside under autocast, as LoRA's does: the gpu profile
    trains in bf16 autocast, and a float32 node meeting a bf16 gradient failed there."""
    for label, cfg in G.gallery_configs(20, target_modules=["0", "2"]).items():
        if cfg == "full":
            continue
        torch.manual_seed(0)
        model = get_peft_model(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)), cfg)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = torch.randn(4, 32, requires_grad=True)  # a float32 input that needs its gradient (as in an LM)
            y = model(x)
        y.float().pow(2).mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), label
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), label
