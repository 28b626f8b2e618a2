"""A ``transformers.TrainerCallback`` that runs the per-step work some methods need (AdaLoRA's rank allocation).

``Trainer(..., callbacks=[peftlab.AdaLoraCallback()])``: after every optimizer step, before the gradients are
cleared (``on_optimizer_step``), every tuner in the model whose method acts per step gets
``on_optimizer_step(state.global_step)``; for AdaLoRA that is ``update_and_allocate``. The lab's training
loop does the same without a callback (:func:`peftlab.lab.train.train`).

Explained in: book/adalora.ipynb
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from peftlab.tuners.base import step_hooks


class PeftlabCallback(TrainerCallback):
    """Calls each tuner's per-step hook (AdaLoRA: ``update_and_allocate``) after every optimizer step.

    Explained in: book/adalora.ipynb
    """

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("PeftlabCallback needs the model (transformers passes it to callbacks as model=...)")
        for hook in step_hooks(model):
            hook(state.global_step)
