"""LoRA+ (Hayou, Ghosh & Yu, 2024): train B with a larger learning rate than A, η_B = λ·η_A.

With one learning rate, feature learning in wide models is inefficient: A and B need learning rates whose
ratio grows with width; a fixed ratio λ (about 16) captures most of it. The optimizer gets peft's four
parameter groups:

* A (every trainable tensor that is not B, not 1-D and not an embedding adapter): lr = η_A;
* LoRA factors of embedding layers: lr = ``loraplus_lr_embedding`` (1e-6);
* B, and every 1-D tensor (DoRA's magnitude, trained biases), with weight decay: lr = λ·η_A;
* the same without weight decay (biases and layer-norm weights): lr = λ·η_A, weight decay 0.

Explained in: book/lora_in_practice.ipynb
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

from torch import nn
from torch.optim import Optimizer
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

from peftlab.tuners.lora.layer import Embedding


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float, loraplus_lr_ratio: float,
                              loraplus_weight_decay: float = 0.0, loraplus_lr_embedding: float = 1e-6,
                              **kwargs: Any) -> Optimizer:
    """``optimizer_cls`` over the trainable parameters in LoRA+'s groups: A at ``lr``, B at ``lr·loraplus_lr_ratio``.

    Extra ``kwargs`` go to the optimizer (e.g. ``betas``). Same groups, in the same order, as
    ``peft.optimizers.create_loraplus_optimizer``.

    Explained in: book/lora_in_practice.ipynb
    """
    if loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio={loraplus_lr_ratio}: the ratio η_B/η_A must be positive (LoRA+ uses ~16)")
    decay = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
    groups: dict[str, dict[str, nn.Parameter]] = {"A": {}, "embedding": {}, "B": {}, "B_no_decay": {}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # an adapter tensor sits in a ModuleDict/ParameterDict below its layer: <layer>.lora_embedding_A.<adapter>
        module_name = ".".join(name.split(".")[:-2])
        module = attrgetter(module_name)(model) if module_name else None
        if isinstance(module, Embedding):
            groups["embedding"][name] = param
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decay else "B_no_decay"][name] = param
        else:
            groups["A"][name] = param
    param_groups = [
        {"params": list(groups["A"].values()), "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": list(groups["embedding"].values()), "weight_decay": loraplus_weight_decay,
         "lr": loraplus_lr_embedding},
        {"params": list(groups["B"].values()), "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": list(groups["B_no_decay"].values()), "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    return optimizer_cls(param_groups, lr=lr, **kwargs)
