"""The lab language model: a small Llama pretrained locally on the lab's synthetic tasks.

The model is a transformers ``LlamaForCausalLM`` with a real word-level tokenizer
(``tokenizers`` → ``PreTrainedTokenizerFast``). It is pretrained on :data:`tasks.PRETRAIN_TASKS`
(copy, reverse) so that it knows the task format but none of the downstream skills, then cached
with ``save_pretrained`` under ``$PEFTLAB_CACHE`` (default ``~/.cache/peftlab``) so every chapter
reuses it. In the gpu profile :func:`load_lab_model` returns a small hub model instead.

Explained in: book/lab.ipynb
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import contextlib

import torch

from peftlab.lab import profile as _profile
from peftlab.lab import tasks as _tasks
from peftlab.lab.cache import ENV_CACHE, LabCacheError, atomic_path, cache_root, config_hash, file_lock
from peftlab.lab.train import History, train

ENV_MODEL = "PEFTLAB_LAB_MODEL"  # a local folder (or hub id) that replaces the lab LM
GPU_MODEL = "HuggingFaceTB/SmolLM2-135M"
CACHE_VERSION = 1  # bump when the pretraining recipe changes in a way the config does not show

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
#: Spare words with untrained embeddings, for chapters that need new symbols (e.g. soft prompts).
EXTRA_WORDS: tuple[str, ...] = tuple(f"<extra_{i}>" for i in range(4))
LETTERS: tuple[str, ...] = tuple("abcdefghijklmnopqrstuvwxyz")


# --- tokenizer ------------------------------------------------------------------------------


def vocabulary() -> list[str]:
    """The lab vocabulary: special tokens, digits, the separator, task words, letters, spare words.

    Explained in: book/lab.ipynb
    """
    words = [*SPECIAL_TOKENS, *_tasks.DIGITS, _tasks.SEP, *_tasks.TASK_NAMES, *LETTERS, *EXTRA_WORDS]
    assert len(set(words)) == len(words), "duplicate word in the lab vocabulary"
    return words


def build_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast``: text splits on whitespace, one id per word.

    ``tok("sort 3 1 =")`` → ``[<bos>, sort, 3, 1, =]``; ``decode`` joins words with single spaces.

    Explained in: book/lab.ipynb
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="right", model_max_length=128,
    )
    return tok


# --- model config and pretraining recipe -----------------------------------------------------


@dataclass(frozen=True)
class LabLMConfig:
    """Size of the lab LM and its pretraining recipe; every field is part of the cache key.

    Explained in: book/lab.ipynb
    """

    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 64
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of steps spent warming up (one-cycle schedule)
    min_len: int = _tasks.MIN_LEN
    max_len: int = _tasks.MAX_LEN
    pretrain_tasks: tuple[str, ...] = _tasks.PRETRAIN_TASKS
    eval_n: int = 100  # examples per task for the accuracy recorded after pretraining


def lab_config(prof: Union[_profile.Profile, str, None] = None) -> LabLMConfig:
    """The lab LM recipe for a profile: smaller and shorter in smoke, the full recipe in cpu.

    Explained in: book/lab.ipynb
    """
    prof = _as_profile(prof)
    if prof.name == "smoke":
        return LabLMConfig(hidden_size=48, intermediate_size=192, steps=600, batch_size=64, lr=5e-3, eval_n=50)
    return LabLMConfig()


def _as_profile(prof: Union[_profile.Profile, str, None]) -> _profile.Profile:
    if isinstance(prof, _profile.Profile):
        return prof
    return _profile.get(prof)


def build_model(cfg: LabLMConfig, seed: int = 0) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` of the lab's size (same seed → same weights).

    Explained in: book/lab.ipynb
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = vocabulary()
    mcfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=vocab.index(PAD),
        bos_token_id=vocab.index(BOS),
        eos_token_id=vocab.index(EOS),
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    _profile.seed_everything(seed)
    return LlamaForCausalLM(mcfg)


def pretraining_batches(cfg: LabLMConfig, tokenizer: Any, seed: int = 0):
    """Step → batch of pretraining examples, a deterministic function of (seed, step).

    Each batch mixes the pretraining tasks evenly; loss only on answers (labels -100 on prompts).

    Explained in: book/lab.ipynb
    """
    collate = _tasks.Collator(tokenizer)
    names = cfg.pretrain_tasks

    def batch(step: int) -> dict[str, torch.Tensor]:
        rng = random.Random(seed * 1_000_003 + step)
        feats = []
        for i in range(cfg.batch_size):
            prompt, answer = _tasks.sample(names[i % len(names)], rng, cfg.min_len, cfg.max_len)
            feats.append(_tasks.encode_example(tokenizer, prompt, answer))
        return collate(feats)

    return batch


def pretrain(
    cfg: LabLMConfig, seed: int = 0, progress: bool = True, device: Union[str, torch.device, None] = None
) -> tuple[Any, Any, History]:
    """Pretrain a lab LM from scratch: AdamW, one-cycle LR, ``cfg.steps`` steps on the pretraining tasks.

    Returns ``(model, tokenizer, history)``; ``history.evals`` holds the exact match per task
    after pretraining. Deterministic for a given seed on one machine.

    Explained in: book/lab.ipynb
    """
    tokenizer = build_tokenizer()
    model = build_model(cfg, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=max(cfg.steps, 1), pct_start=cfg.warmup
    )

    def evaluate(m: Any) -> dict[str, float]:
        return _tasks.exact_match_by_task(m, tokenizer, _tasks.TASK_NAMES, n=cfg.eval_n, seed=12345)

    history = train(
        model, pretraining_batches(cfg, tokenizer, seed), steps=cfg.steps, optimizer=opt,
        scheduler=sched, grad_clip=1.0, seed=seed, progress=progress, device=device, eval_fn=evaluate,
    )
    model.eval()
    return model, tokenizer, history


@contextlib.contextmanager
def _quiet_transformers() -> Any:
    """Hide transformers' per-file progress bars (loading / writing weights) for the lab's tiny files."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


# --- cache ------------------------------------------------------------------------------------


def cache_key(cfg: LabLMConfig, seed: int, profile_name: str) -> str:
    """Folder name for a pretrained lab LM: profile, seed and a hash of config + vocabulary + recipe version.

    Explained in: book/lab.ipynb
    """
    payload = {"config": asdict(cfg), "vocab": vocabulary(), "seed": seed, "version": CACHE_VERSION}
    return f"lab-lm-{profile_name}-seed{seed}-{config_hash(payload, length=12)}"


@dataclass
class CacheEntry:
    """Where a pretrained lab LM lives and whether this call had to pretrain it.

    Explained in: book/lab.ipynb
    """

    path: Path
    trained_now: bool
    config: LabLMConfig
    seed: int
    history: History = field(repr=False, default_factory=History)


def _history_to_json(h: History) -> dict[str, Any]:
    return {"steps": h.steps, "loss": h.loss, "evals": h.evals, "seconds": h.seconds}


def _history_from_json(d: dict[str, Any]) -> History:
    evals = {k: [(int(s), float(v)) for s, v in pairs] for k, pairs in d.get("evals", {}).items()}
    return History(steps=list(d["steps"]), loss=list(d["loss"]), evals=evals, seconds=float(d["seconds"]))


def ensure_pretrained(
    prof: Union[_profile.Profile, str, None] = None,
    seed: int = 0,
    cache_dir: Union[str, Path, None] = None,
    config: Optional[LabLMConfig] = None,
    progress: bool = True,
) -> CacheEntry:
    """Return the cached lab LM for (profile, config, seed), pretraining and saving it first if missing.

    The folder is written under a temporary name and renamed, while holding a lock file, so two
    processes (parallel notebooks) never see a half-written model and pretrain it only once.

    Explained in: book/lab.ipynb
    """
    prof = _as_profile(prof)
    cfg = config if config is not None else lab_config(prof)
    root = cache_root(cache_dir)
    key = cache_key(cfg, seed, prof.name)
    final = root / key
    history_file = "pretraining.json"
    with file_lock(final):
        if (final / history_file).exists():
            with open(final / history_file) as f:
                hist = _history_from_json(json.load(f)["history"])
            return CacheEntry(final, False, cfg, seed, hist)
        model, tokenizer, hist = pretrain(cfg, seed, progress=progress)
        # replaces a stale, incomplete folder from an interrupted older version
        with atomic_path(final, folder=True) as tmp:
            with _quiet_transformers():
                model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            with open(tmp / history_file, "w") as f:  # written last: its presence marks a complete folder
                json.dump({"config": asdict(cfg), "seed": seed, "profile": prof.name,
                           "history": _history_to_json(hist)}, f)
    return CacheEntry(final, True, cfg, seed, hist)


def pretraining_history(prof: Union[_profile.Profile, str, None] = None, seed: int = 0,
                        cache_dir: Union[str, Path, None] = None) -> History:
    """The pretraining loss curve (and final exact match per task) of the cached lab LM.

    Explained in: book/lab.ipynb
    """
    return ensure_pretrained(prof, seed, cache_dir).history


# --- loading ----------------------------------------------------------------------------------


def load_pretrained_folder(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a folder (or hub id) and make the tokenizer lab-ready.

    Sets a pad token (eos when missing) and left padding side for batched generation.

    Explained in: book/lab.ipynb
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no eos token; the lab tasks need one")
    return model.to(device).eval(), tokenizer


def load_lab_model(
    profile: Union[_profile.Profile, str, None] = None,
    *,
    path: Union[str, Path, None] = None,
    seed: int = 0,
    cache_dir: Union[str, Path, None] = None,
    config: Optional[LabLMConfig] = None,
    progress: bool = True,
) -> tuple[Any, Any]:
    """The lab model and tokenizer for a profile, on the profile's device, in eval mode.

    smoke / cpu: the locally pretrained lab LM (pretrained on first use, then from the cache).
    gpu: ``HuggingFaceTB/SmolLM2-135M``. ``path`` (or ``$PEFTLAB_LAB_MODEL``) replaces either
    with a saved model folder; ``config`` replaces the profile's recipe (tests use a tiny one).

    Explained in: book/lab.ipynb
    """
    prof = _as_profile(profile)
    override = path if path is not None else os.environ.get(ENV_MODEL) or None
    if override is not None:
        if not Path(override).expanduser().exists() and not _looks_like_hub_id(str(override)):
            raise FileNotFoundError(
                f"lab model folder {str(override)!r} does not exist (from the path argument or {ENV_MODEL})"
            )
        src = Path(override).expanduser() if Path(override).expanduser().exists() else override
        return load_pretrained_folder(src, prof.device)
    if prof.name == "gpu":
        return load_pretrained_folder(GPU_MODEL, prof.device)
    entry = ensure_pretrained(prof, seed, cache_dir, config=config, progress=progress)
    return load_pretrained_folder(entry.path, prof.device)


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))
