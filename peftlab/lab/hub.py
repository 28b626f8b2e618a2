"""Hub repositories without a download: the gpu profile's code path, simulated on a CPU.

The chapters' GPU sections load real hub models (``facebook/opt-350m``, ``bigscience/mt0-large``,
``HuggingFaceTB/SmolLM2-135M``) and a hub adapter (``ybelkada/opt-350m-lora``) through
:meth:`peftlab.lab.profile.Profile.hub`. In the gpu profile that returns the repository id unchanged. With
``PEFTLAB_GPU_SIM=1`` (as ``make test`` runs) the GPU sections run on the CPU and ``Profile.hub`` returns a
local folder instead, built by :func:`simulated_repo`:

* a model repository: the same architecture, from the repository's own ``config.json`` (shipped in
  ``peftlab/lab/hub_configs/``), shrunk by :func:`shrink_config` to two layers and small widths, with
  random weights (seeded by the repository id), and a byte-level BPE tokenizer trained on a few strings
  (:func:`sim_tokenizer`): any text encodes;
* an adapter repository: its shipped ``adapter_config.json`` and random adapter weights that fit the
  simulated base model, in the format the repository holds (``adapter_model.bin`` for ``ybelkada/opt-350m-lora``, see
  :data:`PICKLED_ADAPTERS`; safetensors otherwise).

Every call of a GPU section (``from_pretrained``, ``generate``, ``get_peft_model``, training) runs as on
the GPU; only the numbers differ, so claims about the real models are asserted in the gpu profile only.

Explained in: book/reliability.ipynb
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch

HUB_CONFIGS = Path(__file__).resolve().parent / "hub_configs"
PAD, EOS, BOS, UNK = "<pad>", "</s>", "<s>", "<unk>"  # ids 0, 1, 2, 3 in the simulated tokenizer
SIM_LAYERS = 2
SIM_HEAD_DIM = 16
SIM_MAX_HEADS = 4
SIM_MAX_POSITIONS = 256
SIM_VOCAB = 384

_LAYER_KEYS = ("num_hidden_layers", "num_layers", "num_decoder_layers")
_WIDTH_KEYS = ("hidden_size", "d_model")
_FFN_KEYS = ("ffn_dim", "intermediate_size", "d_ff")
_DROPPED_KEYS = ("_name_or_path", "torch_dtype", "dtype", "transformers_version")

#: Adapter repositories that hold a pickled ``adapter_model.bin`` (the others: ``adapter_model.safetensors``).
PICKLED_ADAPTERS = frozenset({"ybelkada/opt-350m-lora"})

_built: dict[str, Path] = {}
_lock = threading.Lock()
_root: Path | None = None


def _folder_name(repo_id: str) -> str:
    return repo_id.replace("/", "--")


def shipped_repos() -> list[str]:
    """Repository ids whose config file ships with peftlab (the ones a simulated GPU section can load).

    Explained in: book/reliability.ipynb
    """
    return sorted(p.name.replace("--", "/", 1) for p in HUB_CONFIGS.iterdir() if p.is_dir())


def shipped_folder(repo_id: str) -> Path:
    """The folder holding ``repo_id``'s shipped ``config.json`` (model) or ``adapter_config.json`` (adapter).

    Explained in: book/reliability.ipynb
    """
    folder = HUB_CONFIGS / _folder_name(str(repo_id))
    if not folder.is_dir():
        raise ValueError(
            f"no shipped config for hub repository {repo_id!r}, so it cannot be simulated; shipped: "
            f"{shipped_repos()}. Add its config.json (or adapter_config.json) under {HUB_CONFIGS}/"
            f"{_folder_name(str(repo_id))}/"
        )
    return folder


def shrink_config(config: dict[str, Any], vocab_size: int = SIM_VOCAB) -> dict[str, Any]:
    """``config`` (a ``config.json`` dict) with the same architecture at lab size.

    At most ``SIM_LAYERS`` layers; at most ``SIM_MAX_HEADS`` attention heads of width ``SIM_HEAD_DIM`` (grouped-query
    attention keeps its ratio of query to key/value heads); hidden width = heads × head width; feed-forward width
    2 × hidden; an embedding projection (OPT's ``word_embed_proj_dim``) stays when the original has one; the
    vocabulary and special-token ids of :func:`sim_tokenizer`.

    Explained in: book/reliability.ipynb
    """
    out = {k: v for k, v in config.items() if k not in _DROPPED_KEYS}
    for key in _LAYER_KEYS:
        if key in out:
            out[key] = min(int(out[key]), SIM_LAYERS)
    heads_key = "num_attention_heads" if "num_attention_heads" in out else "num_heads"
    heads = int(out.get(heads_key, SIM_MAX_HEADS))
    kv = out.get("num_key_value_heads")
    if kv:
        ratio = max(1, heads // int(kv))  # query heads per key/value head
        kv = max(1, min(int(kv), SIM_MAX_HEADS // ratio or 1))
        out["num_key_value_heads"] = kv
        heads = kv * ratio
    else:
        heads = min(heads, SIM_MAX_HEADS)
    out[heads_key] = heads
    width = heads * SIM_HEAD_DIM
    old_width = next((int(config[k]) for k in _WIDTH_KEYS if k in config), width)
    for key in _WIDTH_KEYS:
        if key in out:
            out[key] = width
    for key in ("d_kv", "head_dim"):
        if key in out:
            out[key] = SIM_HEAD_DIM
    for key in _FFN_KEYS:
        if key in out:
            out[key] = 2 * width
    if "word_embed_proj_dim" in out:
        out["word_embed_proj_dim"] = width if int(config["word_embed_proj_dim"]) == old_width else width // 2
    if "max_position_embeddings" in out:
        out["max_position_embeddings"] = min(int(out["max_position_embeddings"]), SIM_MAX_POSITIONS)
    out["vocab_size"] = int(vocab_size)
    ids = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "decoder_start_token_id": 0}
    out.update({k: v for k, v in ids.items() if k in out})
    return out


def sim_tokenizer() -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on a few strings: any text encodes, no download.

    Special tokens ``<pad>`` 0, ``</s>`` 1 (eos), ``<s>`` 2 (bos), ``<unk>`` 3; no token is added automatically.

    Explained in: book/reliability.ipynb
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from peftlab.lab import lm

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SIM_VOCAB, special_tokens=[PAD, EOS, BOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [" ".join(lm.vocabulary()[len(lm.SPECIAL_TOKENS):]),
             "Hello, my name is", "Hello World", "The quick brown fox jumps over the lazy dog.",
             "translate English to French: the house is wonderful", "sort 3 1 2 = 1 2 3", "swap 5 4 = 4 5"]
    core.train_from_iterator(texts * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                   unk_token=UNK, model_max_length=SIM_MAX_POSITIONS)


def _seed(repo_id: str) -> int:
    return zlib.crc32(repo_id.encode())


def _workdir() -> Path:
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="peftlab-hub-sim-"))
        atexit.register(shutil.rmtree, _root, ignore_errors=True)
    return _root


def _build_model_repo(repo_id: str, src: Path, dest: Path) -> None:
    import transformers

    from peftlab.lab import lm

    tok = sim_tokenizer()
    config = json.loads((src / "config.json").read_text())
    small = shrink_config(config, vocab_size=len(tok))
    arch = (small.get("architectures") or [None])[0]
    cls = getattr(transformers, str(arch), None)
    if cls is None:
        raise ValueError(f"{repo_id}: config.json names architecture {arch!r}, which transformers "
                         f"{transformers.__version__} does not have")
    cfg = transformers.AutoConfig.for_model(**small)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(repo_id))
        model = cls(cfg)
    with lm._quiet_transformers():
        model.save_pretrained(dest)
        tok.save_pretrained(dest)


def _build_adapter_repo(repo_id: str, src: Path, dest: Path) -> None:
    import transformers

    from peftlab import PeftConfig, get_peft_model, get_peft_model_state_dict
    from peftlab.lab import lm

    data = json.loads((src / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an old peft's keys; the chapter's own load shows the warning
        config = PeftConfig.from_dict(data)
    base_dir = simulated_repo(str(config.base_model_name_or_path))
    arch = json.loads((base_dir / "config.json").read_text())["architectures"][0]
    with lm._quiet_transformers():
        base = getattr(transformers, arch).from_pretrained(base_dir)
    config.inference_mode = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(repo_id))
        model = get_peft_model(base, config)
        with torch.no_grad():  # a trained adapter: B ≠ 0
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "adapter_config.json", dest / "adapter_config.json")
    if repo_id in PICKLED_ADAPTERS:  # what the repository holds: a pickle, read weights_only
        torch.save(state, dest / "adapter_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(dest / "adapter_model.safetensors"))


def is_simulated(model: Any) -> bool:
    """True when ``model`` (or the base model a PeftModel wraps) was loaded from a :func:`simulated_repo` folder.

    The lab's ``train`` uses it to run bf16 autocast on such models, as it does on a GPU.

    Explained in: book/reliability.ipynb
    """
    if _root is None:
        return False
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    source = str(getattr(getattr(base, "config", None), "_name_or_path", "") or "")
    return bool(source) and Path(source).resolve().is_relative_to(_root.resolve())


def simulated_repo(repo_id: str) -> Path:
    """A local folder standing in for hub repository ``repo_id``, built once per process (see the module).

    Explained in: book/reliability.ipynb
    """
    repo_id = str(repo_id)
    with _lock:
        if repo_id in _built:
            return _built[repo_id]
    src = shipped_folder(repo_id)
    dest = _workdir() / _folder_name(repo_id)
    tmp = Path(tempfile.mkdtemp(dir=_workdir(), prefix=".tmp-"))
    try:
        if (src / "config.json").is_file():
            _build_model_repo(repo_id, src, tmp)
        elif (src / "adapter_config.json").is_file():
            _build_adapter_repo(repo_id, src, tmp)
        else:
            raise ValueError(f"{src} holds neither config.json nor adapter_config.json")
        with _lock:
            if repo_id not in _built:
                tmp.rename(dest)
                _built[repo_id] = dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _built[repo_id]
