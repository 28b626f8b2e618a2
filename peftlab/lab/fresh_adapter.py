"""A fresh LoRA adapter, before and at its first training step: where it sits, how it starts, how far it moves.

:func:`adapter_layout` says which layers ``target_modules`` gave an adapter and what that costs;
:func:`h1_lora_with_init` and :func:`init_comparison` put three initialisations of LoRA on harness H1 side by
side at step 0 (PEFT's B = 0, both factors zero, both random); :func:`factor_grad_norms` gives the gradient each
factor gets; :func:`first_step_change` measures how far one Adam step moves the model, for the α/r argument.

Explained in: book/lora.ipynb
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab import LoraConfig, get_peft_model
from peftlab.lab import digits
from peftlab.lab.finetune import H1_LAYERS, h1_lora_config, seeded
from peftlab.tuners.lora import layer as lora_layer

__all__ = ["INITS", "adapter_layout", "factor_grad_norms", "first_step_change", "h1_lora_with_init",
           "init_comparison"]

#: The three initialisations compared: PEFT's (A random, B = 0), both factors zero, both random.
INITS: tuple[str, ...] = ("B = 0 (PEFT)", "both zero", "both random")


def adapter_layout(model: nn.Module) -> dict[str, Any]:
    """Where a LoRA model's adapters sit and what they cost, as one table row.

    ``adapted layers`` and their ``kinds`` (the last part of each name), ``trainable`` parameters, the formula
    Σ r·(d_in + d_out) over the adapted layers (``r(d_in + d_out)``, equal to ``trainable`` for linear layers),
    and ``% of base``: trainable / base-model parameters.

    Explained in: book/lora.ipynb
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, lora_layer.LoraLayer)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layer; wrap it first with get_peft_model(model, "
                         f"LoraConfig(...))")
    trainable, total = model.get_nb_trainable_parameters()
    formula = sum(m.r[a] * (m.in_features + m.out_features) for m in layers.values() for a in m.r)
    return {"adapted layers": len(layers), "kinds": ", ".join(sorted({n.rsplit(".", 1)[-1] for n in layers})),
            "trainable": trainable, "r(d_in + d_out)": formula, "% of base": 100 * trainable / (total - trainable)}


def h1_lora_with_init(init: str, r: int = 4, lora_alpha: float = 8, seed: int = 0) -> nn.Module:
    """H1's pretrained MLP with LoRA on its three layers, initialised one of three ways (:data:`INITS`).

    ``"B = 0 (PEFT)"``: A Kaiming-uniform, B = 0, so ΔW = BA = 0; ``"both zero"``: A = B = 0;
    ``"both random"``: ``init_lora_weights=False`` (B random too, so ΔW ≠ 0 before training).

    Explained in: book/lora.ipynb
    """
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}")
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(H1_LAYERS),
                        init_lora_weights=init != "both random")
    with seeded(seed):
        model = get_peft_model(digits.pretrained_mlp(), config)
    if init == "both zero":
        for module in model.modules():
            if isinstance(module, lora_layer.Linear):
                nn.init.zeros_(module.lora_A["default"].weight)
    return model


def factor_grad_norms(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(Σ ‖∂L/∂A‖, Σ ‖∂L/∂B‖) over every adapted layer, L the cross-entropy of ``model`` on the batch (x, y).

    Explained in: book/lora.ipynb
    """
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    norm = {f: sum(float(p.grad.norm()) for n, p in model.named_parameters() if f in n and p.grad is not None)
            for f in ("lora_A", "lora_B")}
    return norm["lora_A"], norm["lora_B"]


def init_comparison(base: nn.Module, x: Tensor, y: Tensor, test: digits.Split,
                    inits: Sequence[str] = INITS) -> tuple[Any, dict[str, nn.Module]]:
    """The initialisations of :func:`h1_lora_with_init` at step 0, against ``base`` on the split ``test``.

    One row per init: ``logit change`` ‖f(x) − f₀(x)‖ / ‖f₀(x)‖ on ``test``, ``odd loss`` and ``odd acc %`` (H1's
    pretraining task), and each factor's gradient norm on the batch (x, y). Returns the DataFrame (index
    ``init``) and the models by init.

    Explained in: book/lora.ipynb
    """
    import pandas as pd

    rows, models = [], {}
    with torch.no_grad():
        base_logits = base(test.x)
    for init in inits:
        model = models[init] = h1_lora_with_init(init)
        was_training = model.training
        model.eval()  # one evaluation serves the logit change, the loss and the accuracy
        with torch.no_grad():
            logits = model(test.x)
        model.train(was_training)
        grad_a, grad_b = factor_grad_norms(model, x, y)
        rows.append({"init": init,
                     "logit change": float((logits - base_logits).norm() / base_logits.norm()),
                     "odd loss": float(F.cross_entropy(logits, test.y)),
                     "odd acc %": 100 * float((logits.argmax(dim=-1) == test.y).float().mean()),
                     "‖∂L/∂A‖": grad_a, "‖∂L/∂B‖": grad_b})
    return pd.DataFrame(rows).set_index("init"), models


def first_step_change(r: int, lora_alpha: float, x: Tensor, y: Tensor, seed: int = 0, lr: float = 1e-3) -> float:
    """How far one Adam step moves H1 with LoRA (rank r, ``lora_alpha``): ‖f₁(x) − f₀(x)‖ / ‖f₀(x)‖ on the batch.

    Adam's first update is about ±lr per entry whatever the gradient's size, so the change follows the scaling
    α/r times the r terms the detour sums: flat in r for a fixed α, growing with r for α = 2r.

    Explained in: book/lora.ipynb
    """
    with seeded(seed):
        model = get_peft_model(digits.pretrained_mlp(), h1_lora_config(r, lora_alpha))
    with torch.no_grad():
        before = model(x)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with torch.no_grad():
        return float((model(x) - before).norm() / before.norm())

