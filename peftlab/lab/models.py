"""Tiny models for tests and quick demos: transformers architectures from configs, and toy modules.

Every builder is deterministic per seed and needs no download: transformers models are built
from their config objects (hidden size 16–64, 2 layers, small vocabulary), so tests can run
every adapter method through Llama's ``nn.Linear``, GPT-2's ``Conv1D``, OPT, T5 and BERT.

Explained in: book/lab.ipynb
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from peftlab.lab.profile import seed_everything

VOCAB = 128  # shared vocabulary size of the tiny transformers models
SEQ = 32  # maximum sequence length


# --- plain PyTorch toy modules (as in PEFT's tests/test_custom_models.py) --------------------


class MLP(nn.Module):
    """10 → 20 → 2 MLP with ReLU, dropout and log-softmax: ``lin0``, ``lin1`` are the targets.

    Input (batch, 10) → output (batch, 2) log-probabilities.

    Explained in: book/lab.ipynb
    """

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.float()
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.lin1(X)
        return self.sm(X)


class ModelEmbConv1D(nn.Module):
    """Embedding (100 → 5) then GPT-2's ``Conv1D`` (5 → 1, weight stored (in, out)) then a linear head.

    Input token ids (batch, 10) → (batch, 2) log-probabilities.

    Explained in: book/lab.ipynb
    """

    def __init__(self, emb_size: int = 100) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(emb_size, 5)
        self.conv1d = Conv1D(1, 5)  # Conv1D(nf=out, nx=in): weight shape (in=5, out=1)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = self.emb(X)  # (batch, 10, 5)
        X = self.conv1d(X)  # (batch, 10, 1)
        X = self.relu(X)
        X = self.flat(X)  # (batch, 10)
        X = self.lin0(X)
        return self.sm(X)


class ModelConv1D(nn.Module):
    """``nn.Conv1d`` (1 → 1 channel, kernel 2) on a length-10 signal, then a linear head.

    Input (batch, 10) → (batch, 2) log-probabilities.

    Explained in: book/lab.ipynb
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(9, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.float().reshape(-1, 1, 10)  # (batch, channels=1, length=10)
        X = self.conv1d(X)  # (batch, 1, 9)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        return self.sm(X)


class ModelConv2D(nn.Module):
    """``nn.Conv2d`` (5 → 10 channels, kernel 3) on a 3×3 image, then a linear head.

    Input (batch, 45) reshaped to (batch, 5, 3, 3) → (batch, 2) log-probabilities.

    Explained in: book/lab.ipynb
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.float().reshape(-1, 5, 3, 3)
        X = self.conv2d(X)  # (batch, 10, 1, 1)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        return self.sm(X)


def toy_input(name: str, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """A valid input batch for the toy module ``name`` (see :data:`TOY_MODELS`).

    Explained in: book/lab.ipynb
    """
    g = torch.Generator().manual_seed(seed)
    if name == "emb_conv1d":
        return torch.randint(0, 100, (batch, 10), generator=g)
    if name == "conv2d":
        return torch.randn(batch, 45, generator=g)
    if name in ("mlp", "conv1d"):
        return torch.randn(batch, 10, generator=g)
    raise ValueError(f"unknown toy model {name!r}; valid: {', '.join(TOY_MODELS)}")


# --- tiny transformers models (configs only, no download) ----------------------------------


def _llama(task: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def _gpt2(task: str):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    # bos/eos must lie inside the vocabulary (GPT-2's default 50256 does not).
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=SEQ,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=2,
    )
    return GPT2ForSequenceClassification(cfg) if task == "seq_cls" else GPT2LMHeadModel(cfg)


def _opt(task: str):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=SEQ, word_embed_proj_dim=32,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return OPTForCausalLM(cfg)


def _t5(task: str):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(cfg)


def _bert(task: str):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=SEQ, pad_token_id=0, num_labels=2,
    )
    return BertForSequenceClassification(cfg) if task == "seq_cls" else BertModel(cfg)


# name → (builder, task). task: causal_lm | seq2seq_lm | seq_cls | feature | toy
_REGISTRY: dict[str, tuple[Callable[[str], nn.Module], str]] = {
    "llama": (_llama, "causal_lm"),
    "gpt2": (_gpt2, "causal_lm"),
    "gpt2_cls": (_gpt2, "seq_cls"),
    "opt": (_opt, "causal_lm"),
    "t5": (_t5, "seq2seq_lm"),
    "bert": (_bert, "feature"),
    "bert_cls": (_bert, "seq_cls"),
    "mlp": (lambda task: MLP(), "toy"),
    "emb_conv1d": (lambda task: ModelEmbConv1D(), "toy"),
    "conv1d": (lambda task: ModelConv1D(), "toy"),
    "conv2d": (lambda task: ModelConv2D(), "toy"),
}

#: Every name :func:`tiny_model` accepts (parametrize tests over it).
TINY_MODELS: tuple[str, ...] = tuple(_REGISTRY)
#: The transformers architectures among them.
TRANSFORMERS_MODELS: tuple[str, ...] = tuple(n for n, (_, t) in _REGISTRY.items() if t != "toy")
#: The plain PyTorch toy modules among them.
TOY_MODELS: tuple[str, ...] = tuple(n for n, (_, t) in _REGISTRY.items() if t == "toy")


def model_task(name: str) -> str:
    """The head of tiny model ``name``: causal_lm, seq2seq_lm, seq_cls, feature or toy.

    Explained in: book/lab.ipynb
    """
    _check(name)
    return _REGISTRY[name][1]


def _check(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown tiny model {name!r}; valid names: {', '.join(TINY_MODELS)}")


def tiny_model(name: str, seed: int = 0) -> nn.Module:
    """Build tiny model ``name`` with weights drawn from ``seed`` (same seed → same weights), in eval mode.

    Explained in: book/lab.ipynb
    """
    _check(name)
    builder, task = _REGISTRY[name]
    seed_everything(seed)
    model = builder(task)
    return model.eval()


def tiny_llama(seed: int = 0) -> nn.Module:
    """Tiny ``LlamaForCausalLM`` (hidden 32, 2 layers, 4 heads / 2 KV heads, vocab 128).

    Explained in: book/lab.ipynb
    """
    return tiny_model("llama", seed)


def tiny_gpt2(seed: int = 0, classification: bool = False) -> nn.Module:
    """Tiny ``GPT2LMHeadModel`` (its projections are ``Conv1D``, weight (in, out)) or the classifier.

    Explained in: book/lab.ipynb
    """
    return tiny_model("gpt2_cls" if classification else "gpt2", seed)


def tiny_opt(seed: int = 0) -> nn.Module:
    """Tiny ``OPTForCausalLM`` (hidden 32, 2 layers, vocab 128).

    Explained in: book/lab.ipynb
    """
    return tiny_model("opt", seed)


def tiny_t5(seed: int = 0) -> nn.Module:
    """Tiny ``T5ForConditionalGeneration`` (encoder-decoder, d_model 32, 2 + 2 layers).

    Explained in: book/lab.ipynb
    """
    return tiny_model("t5", seed)


def tiny_bert(seed: int = 0, classification: bool = False) -> nn.Module:
    """Tiny ``BertModel`` or ``BertForSequenceClassification`` (2 labels).

    Explained in: book/lab.ipynb
    """
    return tiny_model("bert_cls" if classification else "bert", seed)


def example_inputs(name: str, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor] | torch.Tensor:
    """Valid inputs for tiny model ``name``: a kwargs dict for transformers models (with labels), a tensor for toys.

    Explained in: book/lab.ipynb
    """
    _check(name)
    task = _REGISTRY[name][1]
    if task == "toy":
        return toy_input(name, batch, seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if task == "causal_lm":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    if task == "seq2seq_lm":
        labels = torch.randint(3, VOCAB, (batch, seq // 2), generator=g)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if task == "seq_cls":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), generator=g)}
    return {"input_ids": ids, "attention_mask": mask}
