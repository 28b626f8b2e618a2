"""Which modules an adapter goes into: PEFT's ``target_modules`` rules, written out.

* a list: a module matches when its full name equals an entry or ends with ``"." + entry``;
* a string: a regular expression that must match the *whole* module name (``re.fullmatch``);
* ``"all-linear"``: every ``nn.Linear``, GPT-2 ``Conv1D`` and 4-bit ``Linear4bit`` except the output head;
* ``exclude_modules`` (same rules) is checked first; ``modules_to_save`` modules are never targets;
* ``layers_to_transform`` (+ ``layers_pattern``) keeps only the blocks with those indices.

Explained in: book/lora.ipynb
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.quantization.nf4 import Linear4bit

ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")

def _matches(spec: str | Sequence[str], key: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith("." + name) for name in spec)


def layer_index(key: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The block index in a module name: ``model.layers.3.self_attn.q_proj`` -> 3 (``None`` if there is none)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_excluded(config, key: str) -> bool:
    """True when ``exclude_modules`` or ``modules_to_save`` rule ``key`` out as a target."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude and _matches(exclude, key):
        return True
    modules_to_save = getattr(config, "modules_to_save", None) or ()
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in modules_to_save)


def check_target_module_exists(config, key: str) -> bool:
    """Whether the module named ``key`` is a target of ``config`` (PEFT's rules, see the module docstring)."""
    if is_excluded(config, key):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:  # an exact full name is taken as is, without the layer filter (as in peft)
        return True
    if not any(key.endswith("." + name) for name in targets):
        return False
    wanted = getattr(config, "layers_to_transform", None)
    if wanted is None or (isinstance(wanted, list) and len(wanted) == 0):
        return True
    idx = layer_index(key, getattr(config, "layers_pattern", None))
    if idx is None:
        return False
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def get_pattern_key(pattern_keys: Iterable[str], key: str) -> str:
    """The first ``rank_pattern``/``alpha_pattern`` key whose regex matches the end of ``key`` (else ``key``)."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


# a 4-bit base layer is a linear layer too (QLoRA on "all-linear")
LINEAR_TYPES = (nn.Linear, Conv1D, Linear4bit)


def output_head_names(model: nn.Module, task_type=None) -> set[str]:
    """Full names of the output head (the LM head, or a classification head for SEQ_CLS) that
    ``"all-linear"`` leaves alone."""
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (AttributeError, NotImplementedError):
            head = None
    if head is None and str(task_type) == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
    if head is None:
        return set()
    return {n for n, m in model.named_modules() if m is head or getattr(m, "base_layer", None) is head}


def linear_module_names(model: nn.Module, task_type=None) -> set[str]:
    """Full names of every linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) except the output head."""
    names = {n for n, m in model.named_modules() if n and isinstance(m, LINEAR_TYPES)}
    return names - output_head_names(model, task_type)


def near_misses(spec, names: Sequence[str], limit: int = 8) -> list[str]:
    """Module names that look close to what ``spec`` asked for (for error messages)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
    wanted = [spec] if isinstance(spec, str) else list(spec or [])
    found: list[str] = []
    for w in wanted:
        tail = w.rsplit(".", 1)[-1]
        for cand in difflib.get_close_matches(tail, leaves, n=4, cutoff=0.5):
            if cand not in found:
                found.append(cand)
    if not found:  # nothing close: show the leaf names that exist, so the user can pick
        found = leaves
    return found[:limit]
