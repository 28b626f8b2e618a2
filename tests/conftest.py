"""Shared test setup: one CPU thread, quiet known warnings, and cached tiny base models.

The machine running the suite is shared, so every test process uses one thread. Tiny models are built
once per (name, seed) and handed out as deep copies (building Llama's config the first time is slow).
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
import zlib
from collections.abc import Callable, Iterator

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Known noise: peft 0.21.2 on transformers 5.x emits a FutureWarning on every call.
warnings.filterwarnings("ignore", category=FutureWarning)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning")
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning")


_BASE_CACHE: dict[tuple[str, int], torch.nn.Module] = {}


def base_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A fresh copy of tiny model ``name`` built under ``seed`` (built once, then deep-copied)."""
    from peftlab.lab.models import tiny_model

    key = (name, seed)
    if key not in _BASE_CACHE:
        _BASE_CACHE[key] = tiny_model(name, seed)
    return copy.deepcopy(_BASE_CACHE[key])


@pytest.fixture
def make_base():
    """``make_base(name, seed=0)`` -> a fresh tiny model (see :func:`base_model`)."""
    return base_model


def tiny_llama(family: str = "llama", kv_heads: int = 2, layers: int = 2, seed: int = 0, **extra):
    """A tiny Llama or Mistral causal LM (hidden 32, 4 query heads, ``kv_heads`` key/value heads) built under
    ``seed``, with its biases (zero in transformers) made visible; ``extra`` goes to the config."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    cls, cfg_cls = (LlamaForCausalLM, LlamaConfig) if family == "llama" else (MistralForCausalLM, MistralConfig)
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **extra)
    model = cls(cfg).eval()
    with torch.no_grad():  # transformers initialises biases to zero: make them visible
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def tiny_lm_config():
    """The tiny lab language model's config (hidden 16, four pretraining steps)."""
    from peftlab.lab import lm

    return lm.LabLMConfig(hidden_size=16, intermediate_size=32, steps=4, batch_size=8, eval_n=2)


@pytest.fixture
def load_tiny(tmp_path, monkeypatch):
    """A loader of the tiny pretrained lab language model (:func:`tiny_lm_config`), cached in the test's own
    folder: ``model, tokenizer = load_tiny()``."""
    from peftlab.lab import lm

    config = tiny_lm_config()
    monkeypatch.setenv(lm.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(lm.ENV_MODEL, raising=False)
    return lambda: lm.load_lab_model("smoke", config=config, progress=False)


@pytest.fixture(scope="module")
def pair_cache() -> dict:
    """A test module's cache of built (peft, peftlab) model pairs (see ``tests/interop.py``)."""
    return {}


@pytest.fixture
def adapter_dir(tmp_path):
    """An empty folder for one test's adapter files."""
    path = tmp_path / "adapter"
    path.mkdir()
    return path


# ---------------------------------------------------------------------------------------------------
# helpers shared by the test files (import them: ``from conftest import fill_, output, quiet``)
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence every warning inside the block (fan_in_fan_out fix-ups, peft's deprecations)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def output(model: torch.nn.Module, x, **kwargs) -> torch.Tensor:
    """The model's main output tensor without gradients (logits, hidden states or a toy model's output)."""
    with torch.no_grad():
        return output_with_grad(model, x, **kwargs)


def output_with_grad(model: torch.nn.Module, x, **kwargs) -> torch.Tensor:
    out = model(**x, **kwargs) if isinstance(x, dict) else model(x, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


# Adapter tensors that scale something and start near one (DoRA's magnitude, IA3's vectors): filled
# with values near their own instead of replaced, so a "trained" adapter stays a sensible model.
SCALE_LIKE_TENSORS = ("lora_magnitude_vector", "ia3_l", "boft_s")


def fill_(tensor: torch.Tensor, name: str) -> None:
    """Deterministic values in ±0.1 seeded by ``name`` (different names get different values); a
    scale-like tensor (see ``SCALE_LIKE_TENSORS``) is multiplied by 1 ± 10 % instead."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    noise = (torch.rand(tensor.shape, generator=g) * 0.2 - 0.1).to(tensor.dtype)
    with torch.no_grad():
        if any(part in SCALE_LIKE_TENSORS for part in name.replace(":", ".").split(".")):
            tensor.mul_(1 + noise)
        else:
            tensor.copy_(noise)


def fill_params(model: torch.nn.Module, select: Callable[[str, torch.nn.Parameter], bool],
                seed_name: Callable[[str], str] = lambda n: n) -> None:
    """``fill_`` every parameter ``select(name, p)`` picks, seeded by ``seed_name(name)`` (so two libraries
    that name a tensor alike get the same values)."""
    for n, p in model.named_parameters():
        if select(n, p):
            fill_(p, seed_name(n))


def is_method_tensor(name: str, prefixes: tuple[str, ...] = ("lora_",)) -> bool:
    """A parameter name with a part that starts with one of the methods' tensor prefixes."""
    return any(part.startswith(prefixes) for part in name.split("."))


def fill_method_tensors(model: torch.nn.Module, prefixes: tuple[str, ...] = ("lora_",)) -> None:
    """``fill_`` every adapter tensor (a name part starting with one of ``prefixes``), seeded by its name."""
    fill_params(model, lambda n, p: is_method_tensor(n, prefixes))


def fill_trainable(model: torch.nn.Module, adapter: str = "default", prefixes: tuple[str, ...] = ("lora_",)) -> None:
    """``fill_`` every trainable tensor and every tensor of ``adapter`` (seeded by name, equal across libraries)."""
    fill_params(model, lambda n, p: p.requires_grad or (
        adapter in n.split(".") and is_method_tensor(n, (*prefixes, "modules_to_save"))))


def every_row_dropped(n: int) -> torch.Tensor:
    """A stand-in for ``torch.rand`` under LoHa/LoKr rank dropout: the mask's n draws (one per output row) all below
    any p, so every row is dropped; a single draw (module dropout's) above any p, so the adapter still runs."""
    return torch.zeros(n) if n > 1 else torch.ones(n)
