"""Merging on disk: LoRA adapter folders (no base model needed) and full-model checkpoints.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, written by peft or peftlab)
holds, per adapted module, ``lora_A`` (r × in) and ``lora_B`` (out × r); with the config's r and α they
give ΔW = s·B·A. :func:`merge_adapter_folders` combines them with the same per-layer function as
``add_weighted_adapter`` (:func:`~peftlab.merging.lora.combine_lora_factors`) and writes a new folder
that loads in peft and peftlab, equal to ``add_weighted_adapter(..., seed=seed)`` on a model.

:func:`merge_checkpoints` merges full-model safetensors checkpoints through their task vectors.

Explained in: book/merging_adapters.ipynb
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from peftlab.merging.lora import (FACTOR_TYPES, LoraFactors, check_merge_arguments, combine_lora_factors,
                                  merged_config, module_generator, new_adapter_rank, reject_dora)
from peftlab.merging.methods import DENSITY_METHODS, MERGE_METHODS
from peftlab.merging.state_dicts import merge_state_dicts
from peftlab.utils.io import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, atomic_save_tensors, publish_folder

CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# on-disk suffix -> (factor, role)
_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias",
    ".lora_embedding_A": "emb_A", ".lora_embedding_B": "emb_B",
}


@dataclass
class AdapterModule:
    """The tensors of one adapted module in an adapter folder (on-disk shapes).

    Explained in: book/merging_adapters.ipynb
    """

    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    embedding: bool = False


@dataclass
class AdapterFolder:
    """A LoRA adapter read from disk: its config and its tensors grouped by module (names without the
    ``base_model.model.`` prefix).

    Explained in: book/merging_adapters.ipynb
    """

    path: str
    config: object
    modules: dict[str, AdapterModule] = field(default_factory=dict)

    def factors(self, key: str) -> LoraFactors:
        """Module ``key``'s factors in 2-D form, with s = α/r (α/√r with rsLoRA) from the config."""
        m = self.modules[key]
        r, alpha = self.config.rank_and_alpha(key)
        if m.A.shape[0] != r:
            raise ValueError(f"{self.path}: module {key!r} has lora_A of rank {m.A.shape[0]} but the config says "
                             f"r={r}; the folder's config and weights do not belong together")
        scaling = alpha / (r ** 0.5 if self.config.use_rslora else r)  # s = α/r (α/√r with rsLoRA)
        transposed = m.embedding or bool(self.config.fan_in_fan_out)
        return LoraFactors(m.A.flatten(1), m.B.flatten(1), scaling, m.bias, transposed)


def read_adapter_folder(path: str | os.PathLike) -> AdapterFolder:
    """Read a LoRA adapter folder written by peft or peftlab, with errors that say what is missing.

    Explained in: book/merging_adapters.ipynb
    """
    from peftlab.config import PeftConfig
    from peftlab.tuners.lora.config import LoraConfig

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter folder {path!r} does not exist")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        subs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, CONFIG_NAME)))
        hint = f"; its sub-folders {subs} are adapters (peft saves non-default adapters there)" if subs else ""
        raise FileNotFoundError(f"{path!r} has no {CONFIG_NAME}, so it is not an adapter folder{hint}")
    st = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(st):
        if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            raise ValueError(f"{path!r} holds only {WEIGHTS_NAME} (a pickle, which can run code when loaded); "
                             f"load it with allow_pickle=True and save it again as {SAFETENSORS_WEIGHTS_NAME}")
        raise FileNotFoundError(f"{path!r} has no {SAFETENSORS_WEIGHTS_NAME}; files there: "
                                f"{sorted(os.listdir(path))}")
    config = PeftConfig.from_pretrained(path)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{path!r} is a {config.peft_type} adapter; only LoRA adapters can be merged")
    reject_dora([path], [config])
    try:
        tensors = load_file(st)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{st} is not a readable safetensors file ({exc}); save the adapter again") from None
    folder = AdapterFolder(path, config)
    other = []
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix, role in _SUFFIXES.items():
            if name.endswith(suffix):
                module = folder.modules.setdefault(name[: -len(suffix)], AdapterModule())
                if role in ("emb_A", "emb_B"):
                    module.embedding = True
                setattr(module, {"emb_A": "A", "emb_B": "B"}.get(role, role), t)
                break
        else:
            other.append(key)
    if other:
        raise ValueError(
            f"{path!r} holds tensors that are not LoRA factors ({len(other)}, e.g. {other[:3]}): modules_to_save "
            "copies or base biases (bias='all'/'lora_only'). Merging those needs the base model: load the "
            "adapters into it and use add_weighted_adapter"
        )
    broken = [k for k, m in folder.modules.items() if m.A is None or m.B is None]
    if broken:
        raise ValueError(f"{path!r}: modules {broken[:3]} have lora_A without lora_B or the reverse")
    if not folder.modules:
        raise ValueError(f"{path!r} holds no LoRA tensors")
    return folder


def _check_compatible(folders: Sequence[AdapterFolder], allow_different_targets: bool) -> list[str]:
    """Same base model, same modules (unless allowed), same shapes; returns the module names (union)."""
    bases = {f.config.base_model_name_or_path for f in folders} - {None}
    if len(bases) > 1:
        lines = ", ".join(f"{f.path!r}: {f.config.base_model_name_or_path!r}" for f in folders)
        raise ValueError(f"the adapters were trained on different base models ({lines}); merged weights would "
                         "not fit either base")
    keys = [set(f.modules) for f in folders]
    union = set().union(*keys)
    if not allow_different_targets and any(k != keys[0] for k in keys):
        parts = [f"{f.path!r} lacks {sorted(union - k)[:4]}" for f, k in zip(folders, keys) if k != union]
        raise ValueError("the adapters adapt different modules (" + "; ".join(parts) + "). Pass "
                         "--allow-different-targets to merge over the union (an adapter adds nothing where it "
                         "has no factors), as add_weighted_adapter does")
    for key in sorted(union):
        present = [(f, f.modules[key]) for f in folders if key in f.modules]
        shapes = {(m.embedding, tuple(m.A.shape[1:]), m.B.shape[0], tuple(m.B.shape[2:])) for _, m in present}
        if len(shapes) > 1:
            lines = "; ".join(f"{f.path!r}: A {tuple(m.A.shape)}, B {tuple(m.B.shape)}" for f, m in present)
            raise ValueError(f"module {key!r} has different shapes in the adapters ({lines}); they were made for "
                             "different models")
    return sorted(union)


def _prepare_out_dir(out_dir: str, force: bool) -> None:
    if os.path.isfile(out_dir):
        raise FileExistsError(f"--out {out_dir!r} is a file; give a folder for the merged adapter")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise FileExistsError(f"--out {out_dir!r} exists and is not empty; pass --force to replace it")


def _publish_dir(tmp: str, out_dir: str) -> None:
    """Move the finished temporary folder to ``out_dir``, replacing an old one in one atomic step."""
    publish_folder(tmp, out_dir)


def merge_adapter_folders(adapter_dirs: Sequence[str | os.PathLike], weights: Sequence[float] | None,
                          out_dir: str | os.PathLike, combination_type: str = "svd", density: float | None = None,
                          svd_rank: int | None = None, majority_sign_method: str = "total",
                          svd_clamp: float | None = None, seed: int | None = 0, force: bool = False,
                          allow_different_targets: bool = False, progress: bool = True) -> str:
    """Merge LoRA adapter folders into a new adapter folder, without loading a base model.

    Equals ``add_weighted_adapter(names, weights, "merged", combination_type, ..., seed=seed)`` on a model
    holding the same adapters (DARE's masks are drawn per module from (seed, module name)).

    Explained in: book/merging_adapters.ipynb
    """
    dirs = [os.fspath(d) for d in adapter_dirs]
    out_dir = os.fspath(out_dir)
    weights = [1.0] * len(dirs) if weights is None else [float(w) for w in weights]
    combination_type = check_merge_arguments(dirs, weights, combination_type, density, majority_sign_method,
                                             svd_rank, svd_clamp)
    _prepare_out_dir(out_dir, force)
    folders = [read_adapter_folder(d) for d in dirs]
    keys = _check_compatible(folders, allow_different_targets)
    configs = [f.config for f in folders]
    new_rank = new_adapter_rank(configs, dirs, combination_type, svd_rank)

    module_ranks: dict[str, int] = {}
    for key in keys:
        ranks = {f.path: f.modules[key].A.shape[0] for f in folders if key in f.modules}
        if combination_type in FACTOR_TYPES:
            if len(set(ranks.values())) > 1:
                raise ValueError(f"module {key!r} has ranks {ranks}; combination_type={combination_type!r} needs "
                                 "equal ranks at every module (use 'cat' or an svd type)")
            module_ranks[key] = next(iter(ranks.values()))
        else:
            module_ranks[key] = new_rank
    config = merged_config(configs, new_rank, module_ranks)
    config.inference_mode = True
    config.peft_version = None  # filled in on save

    tensors: dict[str, torch.Tensor] = {}
    for key in tqdm(keys, desc=f"Merging ({combination_type})", unit="module", disable=not progress):
        present = [(f, w) for f, w in zip(folders, weights) if key in f.modules]
        factors = [f.factors(key) for f, _ in present]
        A, B, bias = combine_lora_factors(factors, [w for _, w in present], combination_type, module_ranks[key],
                                          density, majority_sign_method, svd_clamp,
                                          generator=module_generator(seed, key))
        like = present[0][0].modules[key]
        rank = module_ranks[key]
        A = A.reshape(rank, *like.A.shape[1:]).to(like.A.dtype)  # conv: (r, in, *kernel)
        B = B.reshape(like.B.shape[0], rank, *like.B.shape[2:]).to(like.B.dtype)  # conv: (out, r, 1, …)
        prefix = PEFT_PREFIX + key
        if like.embedding:
            tensors[prefix + ".lora_embedding_A"], tensors[prefix + ".lora_embedding_B"] = A, B
        else:
            tensors[prefix + ".lora_A.weight"], tensors[prefix + ".lora_B.weight"] = A, B
            if config.lora_bias:
                tensors[prefix + ".lora_B.bias"] = (bias if bias is not None else B.new_zeros(B.shape[0])).to(B.dtype)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-merge-", dir=parent)
    try:
        atomic_save_tensors(tensors, os.path.join(tmp, SAFETENSORS_WEIGHTS_NAME))
        config.save_pretrained(tmp)
        _publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------------------------
# Full-model checkpoints
# ---------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or a folder holding ``model.safetensors`` (or shards with
    ``model.safetensors.index.json``, or exactly one ``.safetensors`` file). Pickles are refused.

    Explained in: book/merging_adapters.ipynb
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"{path!r} is not a .safetensors file; peftlab does not load pickled checkpoints "
                             "(.bin/.pt can run code when loaded): save it with safetensors first")
        files = [path]
    elif os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            files = [os.path.join(path, "model.safetensors")]
        elif os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            files = [os.path.join(path, s) for s in shards]
        else:
            found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(found) != 1:
                raise FileNotFoundError(f"{path!r} holds {len(found)} .safetensors files ({found[:4]}) and no "
                                        "model.safetensors or model.safetensors.index.json; pass the file itself")
            files = [os.path.join(path, found[0])]
    else:
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{f} is not a readable safetensors file ({exc})") from None
    return sd


def merge_checkpoints(model_paths: Sequence[str | os.PathLike], base_path: str | os.PathLike,
                      out_file: str | os.PathLike, method: str = "task_arithmetic",
                      weights: Sequence[float] | None = None, density: float | None = None, scaling: float = 1.0,
                      majority_sign_method: str = "total", seed: int | None = 0, scope: str = "tensor",
                      exclude: Sequence[str] = (), force: bool = False, progress: bool = True) -> str:
    """θ = θ_base + λ · merge(θ₁ − θ_base, …; w), read from and written to safetensors files.

    Explained in: book/merging_adapters.ipynb
    """
    out_file = os.fspath(out_file)
    if method not in MERGE_METHODS:
        raise ValueError(f"method={method!r}; valid methods: {', '.join(MERGE_METHODS)}")
    if method in DENSITY_METHODS and density is None:
        raise ValueError(f"method={method!r} needs --density in (0, 1]: the fraction of each task vector to keep")
    if weights is not None and len(weights) != len(model_paths):
        raise ValueError(f"got {len(model_paths)} models and {len(weights)} weights; pass one weight per model")
    if os.path.isdir(out_file):
        raise FileExistsError(f"--out {out_file!r} is a folder; give a file name such as merged.safetensors")
    if os.path.exists(out_file) and not force:
        raise FileExistsError(f"--out {out_file!r} exists; pass --force to replace it")
    if not out_file.endswith(".safetensors"):
        raise ValueError(f"--out {out_file!r} should end in .safetensors (the merged checkpoint's format)")
    base = load_checkpoint(base_path)
    finetuned = [load_checkpoint(p) for p in model_paths]
    merged = merge_state_dicts(base, finetuned, weights, method, density, majority_sign_method, scaling, scope,
                               seed, exclude=exclude, progress=progress)
    atomic_save_tensors(merged, out_file)
    return out_file
