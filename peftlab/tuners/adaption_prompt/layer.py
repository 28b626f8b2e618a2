"""The adapted attention of LLaMA-Adapter (arXiv 2303.16199, Eq. 6–8), around a Llama-family attention module.

For the queries Q of one layer (rotary position applied, as the layer's own attention does) and a learnable
prompt P (adapter_len × hidden), projected by the layer's frozen key and value projections:

    t = Linear_o( Attn(Q, K, V)  +  g · softmax(Q K_Pᵀ / √d) V_P ),      K_P = P W_kᵀ,  V_P = P W_vᵀ

The first term is the unchanged attention over the sequence (its own softmax, mask, KV cache); the second is
attention over the prompt alone, with a softmax of its own, scaled by the gate ``g`` that starts at zero, so
a fresh adapter changes nothing. The gated read is added to the input of the module's own ``o_proj`` (a
forward pre-hook during the call): one W_o product serves both terms, and o_proj's bias is added once. The
prompt has no position (no rotary on K_P) and needs no mask: every token may read all of it. Grouped-query
attention (fewer key/value heads than query heads) shares each prompt key/value head among its group of
query heads, as the layer does with its own keys.

Tensors (peft's names): ``adaption_prompt`` (1, adapter_len, hidden), N(0, 1) as in the official code;
``adaption_gate`` (1,), zero.

Explained in: book/llama_adapter.ipynb
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftlab.tuners.base import AdapterLayer


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x₁, x₂) → (−x₂, x₁) over the last dimension: the rotation rotary embeddings use,
    q' = q·cos + rotate_half(q)·sin.

    Explained in: book/llama_adapter.ipynb
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class AdaptedAttention(AdapterLayer):
    """A Llama-family attention module (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, rotary position
    embeddings passed in as ``position_embeddings``) plus named adaption prompts with their gates.

    Explained in: book/llama_adapter.ipynb
    """

    adapter_layer_names = ("adaption_prompt", "adaption_gate")
    other_param_names = ("adapter_len",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, adapter_len: int, **_: Any) -> None:
        super().__init__(base_layer)
        attn = self.get_base_layer()
        self.hidden_size = attn.q_proj.in_features
        self.head_dim = attn.head_dim
        self.num_key_value_groups = attn.num_key_value_groups  # query heads per key/value head
        self.scaling = attn.scaling  # 1/√d
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()
        self.adapter_len: dict[str, int] = {}
        self.update_layer(adapter_name, adapter_len)
        self.set_adapter([adapter_name])

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().q_proj.weight  # the device and dtype adapter tensors follow

    def update_layer(self, adapter_name: str, adapter_len: int, **_: Any) -> None:
        """Create the prompt P (1, adapter_len, hidden) ~ N(0, 1) and the gate g = 0 of ``adapter_name``.

        Explained in: book/llama_adapter.ipynb
        """
        kw = self._new_tensor_kwargs()
        self.adapter_len[adapter_name] = adapter_len
        self.adaption_prompt[adapter_name] = nn.Parameter(torch.empty(1, adapter_len, self.hidden_size, **kw).normal_())
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, **kw))  # zero-init: starts as the base model
        self._record_adapter(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        raise ValueError("an adaption prompt has no weight form to merge: its attention depends on every query. Keep "
                         "it unmerged (disable_adapters gives the base model, unload() removes the adapter layers)")

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # transformers' decoder layers pass hidden_states by keyword
        return super().forward(hidden_states, *args, **kwargs)

    def prompt_attention(self, queries: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """softmax(Q K_Pᵀ/√d) V_P for rotated queries (batch, heads, seq, d) → (batch, heads, seq, d), before
        the gate. The prompt's own softmax: no mask, no position.

        Explained in: book/llama_adapter.ipynb
        """
        attn = self.get_base_layer()
        b, n_heads, s, d = queries.shape
        prompt = self.adaption_prompt[adapter_name].to(attn.k_proj.weight.dtype)
        n = prompt.shape[1]
        k = attn.k_proj(prompt).view(1, n, -1, d).transpose(1, 2)  # K_P (1, kv_heads, n, d)
        v = attn.v_proj(prompt).view(1, n, -1, d).transpose(1, 2)  # V_P (1, kv_heads, n, d)
        kv = k.shape[1]
        # grouped-query attention: the query heads of one group (kv_heads · group = heads) read one prompt head
        q = queries.reshape(b, kv, (n_heads // kv) * s, d)
        scores = (q @ k.transpose(-1, -2).to(q.dtype)) * self.scaling  # Q K_Pᵀ/√d, (b, kv, group·s, n)
        weights = scores.softmax(-1, dtype=torch.float32).to(q.dtype)  # the prompt's own softmax
        return (weights @ v.to(q.dtype)).view(b, n_heads, s, d)

    def queries(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                projected: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's queries with rotary position applied, (batch, heads, seq, d), from ``q_proj(x)``
        (``projected``: that product as the module computed it, else computed again).

        Explained in: book/llama_adapter.ipynb
        """
        b, s, _ = x.shape
        if projected is None:
            projected = self.get_base_layer().q_proj(x)
        q = projected.view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)  # (batch, 1, seq, d)
        return q * cos + rotate_half(q) * sin

    def adapter_forward(self, x: torch.Tensor, adapters: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        """The module's own attention with Σ_a g_a · softmax(Q K_Pᵀ/√d) V_P added to the input of ``o_proj``:
        t = Linear_o(Attn + gated reads), one W_o product for both and o_proj's bias once (the paper's form).

        Explained in: book/llama_adapter.ipynb
        """
        position_embeddings = kwargs.get("position_embeddings", args[0] if args else None)
        if position_embeddings is None:
            raise ValueError(f"{type(self.get_base_layer()).__name__} was called without position_embeddings; "
                             "LLaMA-Adapter needs the rotary (cos, sin) that transformers' decoder layers pass: "
                             "call the whole model, or pass position_embeddings=(cos, sin)")
        attn = self.get_base_layer()
        seen: list[torch.Tensor] = []  # the module's own q_proj(x): its queries, without computing W_q x twice

        def add_reads(module: nn.Module, inputs: tuple) -> tuple:  # o_proj's input: (batch, seq, heads · d)
            q = self.queries(x, position_embeddings, seen[0] if len(seen) == 1 else None)
            mixed = inputs[0]
            for name in adapters:
                gated = self.adaption_gate[name].to(q.dtype) * self.prompt_attention(q, name)  # S_gᴷ V_P
                mixed = mixed + gated.transpose(1, 2).reshape(mixed.shape).to(mixed.dtype)
            return (mixed, *inputs[1:])

        handles = [attn.q_proj.register_forward_hook(lambda mod, inp, out: seen.append(out)),
                   attn.o_proj.register_forward_pre_hook(add_reads)]
        try:
            return self.base_layer(x, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def extra_repr(self) -> str:
        return f"adapter_len={self.adapter_len}, " + super().extra_repr()
