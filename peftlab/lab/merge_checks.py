"""How exactly an adapter folds into its base weights: the output gaps of merging, unmerging and unloading.

Explained in: book/lora_in_practice.ipynb
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["logits", "merge_gaps", "unload_outputs"]


def logits(out: Any) -> Tensor:
    """A model's output as a tensor: ``.logits`` of a transformers output, else the output itself.

    Explained in: book/lora_in_practice.ipynb
    """
    return out.logits if hasattr(out, "logits") else out


def unload_outputs(model: nn.Module, x: Any) -> tuple[Tensor, Tensor]:
    """``(f(x), f'(x))``: the outputs (logits, for a transformers model) of ``model`` and of a copy of it merged
    with ``merge_and_unload`` (a 4-bit base is dequantised first). ``model`` is left as it was, in eval mode;
    a method without a weight form raises the library's refusal.

    Explained in: book/lora_in_practice.ipynb, book/choosing_a_method.ipynb
    """
    model.eval()
    with torch.no_grad():
        before = logits(model(x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a 4-bit merge warns that it re-quantises: that is what is measured
            unloaded = logits(copy.deepcopy(model).merge_and_unload()(x))
    return before, unloaded


def merge_gaps(model: nn.Module, x: Tensor) -> dict[str, float]:
    """max |f'(x) − f(x)| for three ways of folding the adapter of ``model`` (a PEFT model) into its base.

    ``merge_and_unload``: a copy merged and stripped of its adapter layers (:func:`unload_outputs`);
    ``merge_adapter``: ``model`` merged in place, W ← W + ΔW (a 4-bit base rounds W + ΔW back to its grid);
    ``after unmerge``: ``model`` after ``unmerge_adapter``, against its output before the merge. ``model`` is
    left unmerged, in eval mode.

    Explained in: book/lora_in_practice.ipynb
    """
    if not (hasattr(model, "merge_adapter") and hasattr(model, "merge_and_unload")):
        raise TypeError(f"merge_gaps needs a PEFT model (get_peft_model(...) or PeftModel.from_pretrained(...)); "
                        f"got {type(model).__name__}")
    before, unloaded = unload_outputs(model, x)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 4-bit merge warns that it re-quantises: that is what is measured
        model.merge_adapter()
        merged = logits(model(x))
        model.unmerge_adapter()
        unmerged = logits(model(x))
    return {"merge_adapter": float((merged - before).abs().max()),
            "after unmerge": float((unmerged - before).abs().max()),
            "merge_and_unload": float((unloaded - before).abs().max())}
