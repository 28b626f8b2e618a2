"""``XLoraConfig``: peft 0.21.2's X-LoRA config, with the same fields, defaults and warnings.

Explained in: book/xlora.ipynb
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

from peftlab.config import CONFIG_NAME, PEFT_FORMAT_VERSION, PeftConfig, PeftType
from peftlab.utils.io import atomic_write_text


@dataclass
class XLoraConfig(PeftConfig):
    """X-LoRA (arXiv 2402.07148): frozen LoRA experts mixed per token and per layer by a learned gate.

    * ``hidden_size``: the base model's hidden size (the gate reads the last hidden state); peft sets 4096 with
      a warning when it is missing, and the model refuses a size that differs from the base model's;
    * ``adapters``: expert name → LoRA folder (ours or peft's); loaded in order, expert ``i`` is the LoRA
      adapter named ``str(i)`` inside the model (as in peft);
    * ``enable_softmax`` (True): softmax over the experts of the gate's logits, at ``softmax_temperature`` (1.0);
    * ``layerwise_scalings`` (False): one scaling per LoRA layer and expert (else one per expert, the same
      for every layer);
    * ``top_k_lora`` (None): keep only the k largest scalings per token and layer (the rest are set to 0);
      ``enable_softmax_topk`` (False): a softmax over those k;
    * ``xlora_depth`` (1), ``xlora_size`` (2048), ``xlora_dropout_p`` (0.2): the gate, a linear layer (depth 1)
      or an MLP of ``depth`` linear layers of width ``xlora_size`` with ReLU and dropout;
    * ``use_trainable_adapters`` (False): train the experts too (default: only the gate);
    * ``scaling_pass_value`` (0.0): the scaling every expert gets in the first pass, the one that only
      produces the hidden states for the gate (0: the base model);
    * ``global_scaling_weight`` (1.0): a factor on every expert's output.

    Explained in: book/xlora.ipynb
    """

    PEFT_TYPE = PeftType.XLORA.value

    hidden_size: int | None = None
    adapters: dict[str, str] | None = None
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.XLORA
        if self.hidden_size is None:  # peft's default, with its warning; the model checks it against the base
            warnings.warn("XLoraConfig(hidden_size=None): using 4096, as peft does; pass the base model's "
                          "hidden_size", UserWarning, stacklevel=3)
            self.hidden_size = 4096
        if self.adapters is None:
            warnings.warn("XLoraConfig(adapters=None): no experts yet; pass {name: LoRA folder}", UserWarning,
                          stacklevel=3)
            self.adapters = {}
        if self.hidden_size <= 0:
            raise ValueError(f"hidden_size={self.hidden_size}: must be the base model's (positive) hidden size")
        if self.xlora_depth <= 0:
            raise ValueError(f"xlora_depth={self.xlora_depth}: the gate needs at least one layer (1 = linear)")
        if self.xlora_depth > 1 and self.xlora_size <= 0:
            raise ValueError(f"xlora_size={self.xlora_size}: the gate's hidden width must be positive")
        if not 0.0 <= self.xlora_dropout_p < 1.0:
            raise ValueError(f"xlora_dropout_p={self.xlora_dropout_p}: a dropout probability in [0, 1)")
        if self.softmax_temperature <= 0:
            raise ValueError(f"softmax_temperature={self.softmax_temperature}: must be positive (lower = sharper)")
        if self.top_k_lora is not None and self.top_k_lora < 1:
            raise ValueError(f"top_k_lora={self.top_k_lora}: keep at least one expert per token, or None for all")
        if self.enable_softmax_topk and self.top_k_lora is None:
            warnings.warn("enable_softmax_topk=True without top_k_lora does nothing until top_k_lora is set",
                          UserWarning, stacklevel=3)
        if self.enable_softmax_topk and self.enable_softmax:
            warnings.warn("enable_softmax and enable_softmax_topk are both on: the top-k scalings go through two "
                          "softmaxes (peft warns of worse results)", UserWarning, stacklevel=3)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` with the keys sorted, as every config, but ``adapters`` in its own order:
        expert ``i`` is the gate's output ``i``. (peft sorts the expert names too, so a peft X-LoRA reloads its
        experts in another order than it trained them with unless their names sort in that order.)"""
        data = self.to_dict()
        data["peft_version"] = data.get("peft_version") or PEFT_FORMAT_VERSION
        ordered = {k: data[k] for k in sorted(data)}
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(ordered, indent=2) + "\n")
