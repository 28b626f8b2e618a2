"""``PeftModel``: a base model plus adapters, with PEFT's public API (save, load, switch, merge, count).

``PeftModel`` holds the tuner as ``base_model`` and the original model as ``base_model.model``, which gives
PEFT's state-dict names. The task subclasses (causal LM, seq2seq, sequence classification, ...) add what
their task needs: ``generate``, a trainable classification head.

Explained in: book/quickstart.ipynb
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from peftlab.config import PeftConfig, TaskType
from peftlab.registry import get_method
from peftlab.tuners.base import BaseTuner
from peftlab.tuners.routing import BASE_ADAPTER, mixed_batch
from peftlab.utils.io import (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, atomic_save_tensors, load_adapter_weights,
                              resolve_adapter_dir)
from peftlab.utils.io import atomic_folder, atomic_write_text
from peftlab.config import PEFT_FORMAT_VERSION
from peftlab.utils.save_and_load import adapter_state_dict, load_adapter_state_dict

def tuner_for(config: PeftConfig) -> type[BaseTuner]:
    """The tuner class of ``config``'s method, from the registry (a clear error for an unknown method)."""
    return get_method(config).tuner_class


def _model_name(model: nn.Module) -> str | None:
    name = model.__dict__.get("name_or_path")
    if name is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name or None


def _checkpointing_on(model: nn.Module) -> bool:
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 name, then 4's
        if hasattr(type(model), attr) or attr in model.__dict__:
            return bool(getattr(model, attr))
    return True  # not a transformers model: as peft, assume it may checkpoint


def prepare_model_for_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Make the embeddings' output require grad, as peft's ``PeftModel`` does when the base model checkpoints.

    With (re-entrant) gradient checkpointing a checkpointed block returns a tensor that requires grad only if
    one of its *inputs* does; the base is frozen, so without this the adapters inside the block get no
    gradient. transformers' ``enable_input_require_grads`` adds the forward hook; other models get the same
    hook on ``get_input_embeddings()``.

    Explained in: book/distributed.ipynb
    """
    if not _checkpointing_on(model):
        return model
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    return model


class PeftModel(nn.Module):
    """A base model with adapters.

    Explained in: book/quickstart.ipynb
    """

    #: modules a task adds to ``modules_to_save`` by itself (e.g. the classifier head)
    task_modules_to_save: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        peft_config = self._add_task_modules(peft_config, model)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _model_name(model)
        # (only when asked: a tuner that builds its layers otherwise, like X-LoRA, need not take the option)
        meta = {"low_cpu_mem_usage": True} if low_cpu_mem_usage else {}
        self.base_model = tuner_for(peft_config)(model, {adapter_name: peft_config}, adapter_name, **meta)
        prepare_model_for_gradient_checkpointing(model)
        if not autocast_adapter_dtype:
            self._keep_base_dtype(adapter_name)
        if type(self).forward is PeftModel.forward:
            self._show_base_signature(model)

    def _show_base_signature(self, model: nn.Module) -> None:
        """Give this instance's ``forward`` the signature of ``model.forward`` (plus ``adapter_names``).

        transformers' Trainer keeps only the dataset columns named in ``signature(model.forward)``; for peft's
        own PeftModel it inspects the base model instead, which it cannot know to do for peftlab's.
        """
        try:
            base = inspect.signature(model.forward)
        except (TypeError, ValueError):
            return
        params = [p for p in base.parameters.values() if p.name != "adapter_names"]
        names = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
        forward = functools.partial(PeftModel.forward, self)
        forward.__signature__ = base.replace(parameters=[p for p in params if p not in var_kw] + [names] + var_kw)
        self.forward = forward

    def _add_task_modules(self, config: PeftConfig, model: nn.Module) -> PeftConfig:
        if not self.task_modules_to_save or not hasattr(config, "modules_to_save"):
            return config
        wanted = list(config.modules_to_save or [])
        config.modules_to_save = wanted + [m for m in self.task_modules_to_save if m not in wanted]
        # peft lists every head name; the tuner skips the ones this model lacks
        return config

    # ---- delegation ---------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    def _keep_base_dtype(self, adapter_name: str) -> None:
        """``autocast_adapter_dtype=False``: the adapter's tensors in the base dtype (e.g. bf16), not float32."""
        dtype = next(self.get_base_model().parameters()).dtype
        for _, layer in self.base_model.adapter_layers():
            for _, entry in layer.adapter_tensors(adapter_name):
                if isinstance(entry, nn.Module):
                    entry.to(dtype)
                else:
                    entry.data = entry.data.to(dtype)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (its adapter layers included)."""
        return self.base_model.model

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """The base model's ``activation_checkpointing_enable`` (what ``Trainer(gradient_checkpointing=True)``
        calls), then the input-grad hook of :func:`prepare_model_for_gradient_checkpointing`. peft 0.21 adds the
        hook only when checkpointing was on before wrapping, so a ViT checkpointed after wrapping fails there.

        Explained in: book/distributed.ipynb
        """
        self.get_base_model().activation_checkpointing_enable(*args, **kwargs)
        prepare_model_for_gradient_checkpointing(self.get_base_model())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """transformers 4's name for :meth:`activation_checkpointing_enable` (same hook afterwards)."""
        self.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
                                                            **kwargs)
        prepare_model_for_gradient_checkpointing(self.get_base_model())

    # ---- forward ----------------------------------------------------------------------------------
    def _check_adapter_names(self, adapter_names: Sequence[str] | None, batch: int | None) -> None:
        if adapter_names is None:
            return
        method = self.base_model.method
        if method is not None and not method.supports_mixed_batch:
            raise ValueError(f"adapter_names=[...]: {method.peft_type} adapters cannot serve mixed batches; run one "
                             "batch per adapter with set_adapter(name)")
        if isinstance(adapter_names, str):
            raise TypeError("adapter_names takes one adapter name per row of the batch (a list), not a string")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE_ADAPTER})
        if unknown:
            raise ValueError(f"adapter_names contains unknown adapters {unknown}; adapters: "
                             f"{sorted(self.peft_config)} (or {BASE_ADAPTER!r} for the base model)")
        if batch is not None and len(adapter_names) != batch:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows; "
                             "give one adapter name per row")

    @staticmethod
    def _batch_size(args: tuple, kwargs: dict) -> int | None:
        for v in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("x")):
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return v.shape[0]
        return None

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Run the model; ``adapter_names`` (one per row) routes each row through its own adapter."""
        self._check_adapter_names(adapter_names, self._batch_size(args, kwargs))
        with mixed_batch(adapter_names):
            return self.base_model(*args, **kwargs)

    # ---- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter (not activated: call ``set_adapter`` to use it). ``low_cpu_mem_usage=True`` creates
        its tensors on the meta device (load a checkpoint into it next); ``autocast_adapter_dtype=False`` keeps
        them in the base model's dtype."""
        current = next(iter(self.peft_config.values()), peft_config)
        if str(peft_config.peft_type) != str(current.peft_type):
            raise ValueError(f"this model's adapters are {current.peft_type}; a {peft_config.peft_type} adapter "
                             "cannot be added to it")
        peft_config = self._add_task_modules(peft_config, self.get_base_model())
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = current.base_model_name_or_path
        self._check_new_adapter_config(adapter_name, peft_config)
        self.base_model.inject_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        if not autocast_adapter_dtype:
            self._keep_base_dtype(adapter_name)
        # a fresh adapter is trainable only when it is active: keep the current active adapter as it was
        if self.active_adapter:
            self.base_model.set_adapter(self.active_adapter)

    def _check_new_adapter_config(self, adapter_name: str, config: PeftConfig) -> None:
        """peft's rule: of several adapters, at most one may train biases (``bias`` other than "none"), since the
        biases are shared by all of them."""
        configs = {**self.peft_config, adapter_name: config}
        biased = [n for n, c in configs.items() if getattr(c, "bias", "none") != "none"]
        if len(biased) > 1:
            raise ValueError(
                f"{type(self).__name__} supports only 1 adapter with bias. When using multiple adapters, set bias to "
                "'none' for all adapters (the base biases they would train are shared by every adapter)"
            )

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter; it trains unless ``inference_mode=True`` (or it was loaded
        for inference)."""
        if isinstance(adapter_name, str) and adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; adapters: {sorted(self.peft_config)}")
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)  # a list: several active

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters on or off without changing which adapter is active."""
        self.base_model.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter. Deleting the active one activates the first remaining adapter by name (with a
        warning, as peft does); after the last one no adapter is active and the model computes the base model.
        A merged adapter is refused (unmerge it first)."""
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within this context the model computes exactly what the base model computes. Afterwards the adapter
        layers are enabled again, unless all of them were disabled before (peft's semantics); when some were
        enabled and others not, a warning says that all will be enabled afterwards."""
        states = {not layer.disable_adapters for _, layer in self.base_model.adapter_layers()}
        if len(states) > 1:
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. This "
                          "is most likely unintentional. After exiting the disable_adapter context, all adapters will "
                          "be enabled", UserWarning, stacklevel=3)
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            if states != {False}:  # enabled, or irregular: enabled again (all disabled before: left disabled)
                self.base_model.enable_adapter_layers()

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None, requantize: bool = False) -> nn.Module:
        """Merge adapters into the base weights and return the plain base model.

        A 4-bit base layer becomes an ``nn.Linear`` holding deq(Q) + ΔW exactly (in its compute dtype), or,
        with ``requantize=True``, a 4-bit layer again holding quant(deq(Q) + ΔW), which loses precision.

        Explained in: book/lora_in_practice.ipynb
        """
        return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge,
                                                adapter_names=adapter_names, requantize=requantize)

    def unload(self) -> nn.Module:
        """Remove all adapter layers and return the plain base model, unchanged."""
        return self.base_model.unload()

    # ---- counting ---------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counting every ``named_parameters()`` entry once."""
        trainable = total = 0
        for _, p in self.named_parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print peft's line: ``trainable params: N || all params: M || trainable%: P``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- files ------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: Sequence[str] | None = None, save_embedding_layers: str | bool = "auto",
                        is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
                        **kwargs: Any) -> None:
        """Write each adapter as ``adapter_model.safetensors`` + ``adapter_config.json``; the ``default``
        adapter in ``save_directory``, any other in ``save_directory/<name>``; and a model card ``README.md``
        (written, or updated when one is there, as peft does).

        ``save_embedding_layers``: ``"auto"`` (peft's default) also writes the whole input/output embedding
        matrices when an embedding is a target or the vocabulary was resized, with a warning; ``True`` always,
        ``False`` never.

        ``path_initial_model_for_weight_conversion``: the folder where a PiSSA/OLoRA adapter was saved right
        after ``get_peft_model`` (before training). The adapter is then written as a plain LoRA for the
        *unmodified* base: ΔW = s(B A − B₀A₀) = s·[B, −B₀]·[A; A₀], so the saved adapter has **rank 2r** (and
        α doubled, α·√2 with rsLoRA, to keep the scaling). The initial folder's config is rewritten with
        ``init_lora_weights=True``, as peft does.

        Explained in: book/configs.ipynb, book/lora_in_practice.ipynb
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!s} is a file; pass a folder path")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = sorted(set(names) - set(self.peft_config))
        if unknown:
            raise ValueError(f"selected_adapters {unknown} do not exist; adapters: {sorted(self.peft_config)}")
        if not is_main_process:
            return
        with atomic_folder(save_directory, keep_existing=True) as stage:  # all adapters appear at once, or none
            self.create_or_update_model_card(stage)
            self._save_adapters(stage, names, safe_serialization, path_initial_model_for_weight_conversion,
                                save_embedding_layers)

    def _save_adapters(self, save_directory: str, names: Sequence[str], safe_serialization: bool,
                       path_initial_model_for_weight_conversion: str | os.PathLike | None,
                       save_embedding_layers: str | bool = "auto") -> None:
        for name in names:
            folder = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            config = copy.copy(self.peft_config[name])
            state = adapter_state_dict(self, name, config, save_embedding_layers=save_embedding_layers)
            if path_initial_model_for_weight_conversion is not None:
                state, config = tuner_for(config).convert_for_save(state, config,
                                                                   path_initial_model_for_weight_conversion)
            config.inference_mode = True
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = _model_name(self.get_base_model())
            if config.task_type is None:
                base = self.get_base_model()
                config.auto_mapping = {"base_model_class": type(base).__name__,
                                       "parent_library": type(base).__module__}
            config.to_json_string()  # a value JSON cannot hold fails here, before any file is replaced
            os.makedirs(folder, exist_ok=True)
            weights = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
            atomic_save_tensors(state, os.path.join(folder, weights), safe_serialization)
            config.save_pretrained(folder)
            self.base_model.save_companions(folder, name, safe_serialization)  # e.g. X-LoRA's experts

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write ``README.md`` in ``output_dir``, or update the one there, with what peft puts in a model card:
        ``library_name: peft`` (the file format), the tags (``lora``, ``transformers``, ``base_model:adapter:...``),
        ``base_model``, ``pipeline_tag`` for a causal LM, and a framework-versions line.

        Explained in: book/peft_differences.md
        """
        write_model_card(self, output_dir)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                    create_pr: bool = False, max_shard_size: int | str | None = "50GB",
                    tags: list[str] | None = None) -> str:
        """Save the adapters (and the model card) and upload them to the Hub repository ``repo_id`` through
        ``huggingface_hub`` (created when it does not exist); returns the commit's URL. transformers' signature,
        which peft's ``PeftModel`` inherits.

        Explained in: book/peft_differences.md
        """
        import tempfile

        import huggingface_hub

        api = huggingface_hub.HfApi(token=token if isinstance(token, str) else None)
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            if tags:
                add_model_card_tags(os.path.join(tmp, "README.md"), tags)
            commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message or
                                       "Upload model", commit_description=commit_description, token=token,
                                       revision=revision, create_pr=create_pr)
        return str(getattr(commit, "commit_url", commit))

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: dict[str, str] | None = None,
                        **kwargs: Any) -> PeftModel:
        """Wrap ``model`` with the adapter saved in ``model_id`` (a folder written by ``save_pretrained`` in
        peftlab or peft, or a Hub repository). The adapter is frozen unless ``is_trainable=True``.
        ``low_cpu_mem_usage=True`` creates the adapter on the meta device and puts the checkpoint's tensors in
        place (no initialisation, no second copy). ``key_mapping`` (regex → replacement) renames checkpoint keys
        (without ``base_model.model.``) before loading. ``.bin`` checkpoints are read with
        ``torch.load(weights_only=True)`` (never a full unpickle), with a warning that safetensors is preferred.

        Explained in: book/configs.ipynb
        """
        if ephemeral_gpu_offload:
            raise ValueError("ephemeral_gpu_offload=True (DoRA on offloaded weights) is not implemented in peftlab; "
                             "load without it")
        folder = resolve_adapter_dir(model_id, subfolder=kwargs.get("subfolder"), revision=kwargs.get("revision"),
                                     filenames=(WEIGHTS_NAME,))
        if config is None:
            config = PeftConfig.from_pretrained(folder)
        config.inference_mode = not is_trainable
        tuner_for(config).prepare_load(config, folder, kwargs)  # e.g. where X-LoRA's experts are
        weights = _mapped(load_adapter_weights(folder, allow_pickle=kwargs.get("allow_pickle")), key_mapping)
        task = config.task_type
        peft_cls = MODEL_TYPE_TO_PEFT_MODEL.get(str(task), PeftModel) if cls is PeftModel else cls
        requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        peft_model = peft_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                              low_cpu_mem_usage=low_cpu_mem_usage)
        try:
            load_adapter_state_dict(peft_model, weights, adapter_name, config,
                                    ignore_mismatched_sizes=kwargs.get("ignore_mismatched_sizes", False))
        except ValueError:
            peft_model.unload()  # leave the caller's model as it was, trainable flags included
            for p, flag in requires_grad:
                p.requires_grad_(flag)
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: dict[str, str] | None = None, **kwargs: Any):
        """Add the adapter saved in ``model_id`` under ``adapter_name`` (not activated). Returns peft's load
        result: ``missing_keys`` (adapter tensors of ``adapter_name`` the checkpoint did not fill: none, since
        a checkpoint that misses some is refused) and ``unexpected_keys``.

        Explained in: book/configs.ipynb
        """
        if ephemeral_gpu_offload:
            raise ValueError("ephemeral_gpu_offload=True is not implemented in peftlab; load without it")
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; choose another adapter_name")
        folder = resolve_adapter_dir(model_id, subfolder=kwargs.get("subfolder"), revision=kwargs.get("revision"),
                                     filenames=(WEIGHTS_NAME,))
        config = PeftConfig.from_pretrained(folder)
        config.inference_mode = not is_trainable
        for init in ("pissa", "corda", "olora"):  # peft's warning: these change the base weights
            if any(getattr(c, "init_lora_weights", None) == init for c in (config, *self.peft_config.values())):
                name = {"pissa": "PiSSA", "corda": "CorDA", "olora": "OLoRA"}[init]
                warnings.warn(f"{name} changes the base weights of the model and should thus not be used with other "
                              f"adapters. Consider converting the {name} adapter into a normal LoRA adapter "
                              "(save_pretrained(..., path_initial_model_for_weight_conversion=...)).", UserWarning,
                              stacklevel=2)
                break
        weights = _mapped(load_adapter_weights(folder, allow_pickle=kwargs.get("allow_pickle"),
                                               device=torch_device or "cpu"), key_mapping)
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage,
                         autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            result = load_adapter_state_dict(self, weights, adapter_name, config,
                                             ignore_mismatched_sizes=kwargs.get("ignore_mismatched_sizes", False))
        except ValueError:
            self.base_model.remove_adapter_entirely(adapter_name)
            raise
        prefix = self.base_model.prefix
        result.missing_keys[:] = [k for k in result.missing_keys if prefix in k and adapter_name in k]
        if is_trainable:
            self.set_requires_grad(adapter_name)
        else:
            self.eval()
        return result


def _mapped(state: dict[str, torch.Tensor], key_mapping: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """peft's ``key_mapping``: regex replacements applied to checkpoint keys without ``base_model.model.``."""
    if not key_mapping:
        return state
    import re

    prefix = "base_model.model."
    out = {}
    for key, value in state.items():
        had = key.startswith(prefix)
        k = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            k, n = re.subn(pattern, replacement, k)
            if n:
                break
        out[(prefix if had else "") + k] = value
    return out


def add_model_card_tags(path: str, tags: Sequence[str]) -> None:
    """Add ``tags`` to the model card at ``path`` (push_to_hub's ``tags``)."""
    from huggingface_hub import ModelCard

    card = ModelCard(open(path).read())
    card.data.tags = sorted(set(card.data.tags or []) | set(tags))
    atomic_write_text(path, str(card))


def write_model_card(model: PeftModel, output_dir: str) -> None:
    """The model card peft writes (see :meth:`PeftModel.create_or_update_model_card`), atomically.

    Explained in: book/peft_differences.md
    """
    from huggingface_hub import ModelCard

    import peftlab

    path = os.path.join(output_dir, "README.md")
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else \
        "---\n{}\n---\n\n# Model Card\n\nAn adapter saved with peftlab, in PEFT's file format.\n"
    card = ModelCard(text)
    card.data["library_name"] = "peft"
    base = model.get_base_model()
    tags = set(getattr(base, "model_tags", None) or [])
    try:
        import transformers

        if isinstance(base, transformers.PreTrainedModel):
            tags.add("transformers")
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    config = model.peft_config.get(model.active_adapters[0]) if model.active_adapters else None
    if config is not None and str(config.peft_type) == "LORA":
        tags.add("lora")
    name = getattr(base, "name_or_path", None)
    if name:
        tags.add(f"base_model:adapter:{name}")
    if tags:
        card.data["tags"] = sorted(tags | set(card.data.tags or []))
    if not card.data.get("pipeline_tag") and isinstance(model, PeftModelForCausalLM):
        card.data["pipeline_tag"] = "text-generation"
    name_or_path = getattr(getattr(base, "config", None), "_name_or_path", None)
    if name_or_path:
        card.data["base_model"] = name_or_path
    lines = card.text.splitlines()
    heading, line = "### Framework versions", f"- peftlab {peftlab.__version__} (PEFT {PEFT_FORMAT_VERSION} file format)"
    if line not in lines:
        if heading in lines:
            lines.insert(lines.index(heading) + 2, line)
        else:
            lines.append(f"{heading}\n\n{line}")
    card.text = "\n".join(lines)
    atomic_write_text(path, str(card))


class PeftModelForCausalLM(PeftModel):
    """A causal language model with adapters; ``generate`` accepts ``adapter_names`` for mixed batches.

    Explained in: book/quickstart.ipynb
    """

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, adapter_names: Sequence[str] | None = None,
                **kwargs: Any) -> Any:
        return PeftModel.forward(self, adapter_names=adapter_names, **_drop_none(dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict, **kwargs)))

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        self._check_adapter_names(adapter_names, self._batch_size(args, kwargs))
        with mixed_batch(adapter_names):
            return self.base_model.generate(*args, **kwargs)  # the tuner's (X-LoRA's) or, by default, the model's

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModelForCausalLM):
    """An encoder-decoder model with adapters (T5, BART, mT0, ...).

    Explained in: book/quickstart.ipynb
    """

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, adapter_names: Sequence[str] | None = None,
                **kwargs: Any) -> Any:
        return PeftModel.forward(self, adapter_names=adapter_names, **_drop_none(dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds, labels=labels, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs)))


class PeftModelForSequenceClassification(PeftModel):
    """A sequence classifier with adapters; its head (``classifier`` or ``score``) trains and is saved too.

    Explained in: book/quickstart.ipynb
    """

    task_modules_to_save = ("classifier", "score")
    forward = PeftModelForCausalLM.forward  # same named inputs (Trainer reads them from the signature)


class PeftModelForTokenClassification(PeftModelForSequenceClassification):
    """A token classifier with adapters; its ``classifier``/``score`` head trains and is saved too."""


class PeftModelForQuestionAnswering(PeftModel):
    """An extractive QA model with adapters; its ``qa_outputs`` head trains and is saved too."""

    task_modules_to_save = ("qa_outputs",)


class PeftModelForFeatureExtraction(PeftModel):
    """An encoder producing features (embeddings) with adapters."""


def _drop_none(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


MODEL_TYPE_TO_PEFT_MODEL: dict[str, type[PeftModel]] = {
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}
