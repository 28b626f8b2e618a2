"""``peftlab.Trainer``: ``transformers.Trainer`` whose checkpoints hold the adapter, not the model.

``transformers.Trainer`` recognises only peft's own ``PeftModel`` (an ``isinstance`` test in its save and
resume code). To it a peftlab model is a plain ``nn.Module``, so each ``checkpoint-N/`` would hold the
whole ``state_dict()`` (frozen base included; safetensors refuses it when the model ties its input and
output embeddings) and ``resume_from_checkpoint`` would find no adapter. This subclass takes the same
arguments and changes three steps only:

* saving (``save_model`` and every checkpoint): ``model.save_pretrained(folder)``, i.e.
  ``adapter_model.safetensors`` + ``adapter_config.json`` (other adapters in sub-folders), written by the
  main process only; the optimizer, scheduler, RNG and trainer state are saved by ``transformers`` as usual;
* resuming (``train(resume_from_checkpoint=...)``): the saved tensors are copied into the model's existing
  adapters, then ``transformers`` restores the optimizer, scheduler and RNG and skips the batches already
  seen, so the run continues with the losses of an uninterrupted one;
* ``load_best_model_at_end``: the best checkpoint's adapter tensors are copied back the same way.

Under ``Trainer``'s own ``fsdp`` option (GPUs only) ``save_model`` writes the adapter from the state dict FSDP
gathers, and resuming copies it back into the sharded model: each FSDP2 parameter takes its own shards of the
saved tensors (``transformers.Trainer`` would keep the current adapter and only log a warning).

It also adds :class:`peftlab.PeftlabCallback`, so a method's per-step work (AdaLoRA's rank allocation after
every optimizer step) cannot be forgotten.

The model is a peftlab ``PeftModel`` or a model given adapters in place by peftlab's transformers-style API
(``enable_adapters_api(model).add_adapter(config)``, :mod:`peftlab.integrations`); any other model goes
through ``transformers.Trainer`` unchanged.

Explained in: book/distributed.ipynb
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import transformers
from torch import nn

from peftlab.config import CONFIG_NAME, PeftConfig
from peftlab.integrations.trainer import PeftlabCallback
from peftlab.integrations.transformers import get_tuner, save_adapter
from peftlab.peft_model import PeftModel, tuner_for
from peftlab.utils.io import SAFETENSORS_WEIGHTS_NAME, atomic_folder, atomic_save_tensors, load_adapter_weights
from peftlab.utils.save_and_load import adapter_state_items, load_adapter_state_dict

TRAINING_ARGS_NAME = "training_args.bin"  # the file transformers.Trainer writes next to a saved model


def adapter_configs(model: nn.Module) -> dict[str, Any]:
    """The adapters' configs of a ``PeftModel``, or of a model with adapters added in place (integrations)."""
    if isinstance(model, PeftModel):
        return model.peft_config
    tuner = get_tuner(model)
    if tuner is None:
        raise ValueError(f"{type(model).__name__} has no peftlab adapters")
    return tuner.peft_config


def adapter_folders(model: nn.Module, folder: str | os.PathLike) -> dict[str, str]:
    """Where ``save_pretrained(folder)`` puts each adapter: ``default`` in ``folder``, others in ``folder/<name>``.

    Explained in: book/distributed.ipynb
    """
    folder = os.fspath(folder)
    return {name: folder if name == "default" else os.path.join(folder, name) for name in adapter_configs(model)}


def has_adapter_files(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds an adapter's weights (``adapter_model.safetensors``)."""
    return os.path.isfile(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))


def load_adapters_from_checkpoint(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Copy the adapter tensors saved in ``folder`` into ``model``'s adapters of the same names; returns the
    names loaded. Every adapter of the model must be there (a checkpoint holds all of them): a clear error
    otherwise, before any tensor is copied.

    Explained in: book/distributed.ipynb
    """
    folders = adapter_folders(model, folder)
    missing = [f"{name} ({path})" for name, path in folders.items() if not has_adapter_files(path)]
    if missing:
        raise ValueError(f"checkpoint {os.fspath(folder)!s} has no adapter weights for {', '.join(missing)}; "
                         f"pass a checkpoint-N folder written by peftlab.Trainer (adapter_model.safetensors)")
    weights = {name: load_adapter_weights(path) for name, path in folders.items()}  # safetensors only
    configs = dict(adapter_configs(model))
    for name, path in folders.items():  # the config saved with the tensors describes them (AdaLoRA: which
        if os.path.isfile(os.path.join(path, CONFIG_NAME)):  # triplets each module kept at that step)
            configs[name] = PeftConfig.from_pretrained(path)
    for name, state in weights.items():  # each call checks every tensor before copying any
        load_adapter_state_dict(model, state, name, configs[name])
    return list(weights)


def adapter_state_from(model: PeftModel, state_dict: dict[str, torch.Tensor],
                       adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter ``adapter_name`` (on-disk names) read from a full ``state_dict`` of ``model`` (in-memory
    names), e.g. the one FSDP or DeepSpeed gather for ``save_model`` while the parameters themselves are sharded.

    Explained in: book/distributed.ipynb
    """
    config = adapter_configs(model)[adapter_name]
    items = adapter_state_items(model, adapter_name, config)
    missing = [mem for mem, _, _ in items if mem not in state_dict]
    if missing:
        raise ValueError(f"the state dict lacks {len(missing)} tensors of adapter {adapter_name!r} (e.g. {missing[:2]}); "
                         "pass the model's full state dict (FSDP: StateDictType.FULL_STATE_DICT)")
    state = {disk: state_dict[mem].detach().cpu() for mem, disk, _ in items}
    return tuner_for(config).state_dict_for_save(model, state, adapter_name, config)


def save_adapter_states(model: PeftModel, states: dict[str, dict[str, torch.Tensor]],
                        folder: str | os.PathLike) -> None:
    """Write adapters given as tensors (``{adapter name: on-disk state}``) where ``model.save_pretrained(folder)``
    would put them, with their configs: for a model whose parameters are sharded, whose tensors were gathered
    first. Call it on one process only.

    Explained in: book/distributed.ipynb
    """
    with atomic_folder(folder, keep_existing=True) as stage:
        for name, state in states.items():
            target = adapter_folders(model, stage)[name]
            config = copy.copy(adapter_configs(model)[name])
            config.inference_mode = True
            os.makedirs(target, exist_ok=True)
            atomic_save_tensors(state, os.path.join(target, SAFETENSORS_WEIGHTS_NAME), True)
            config.save_pretrained(target)


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` for peftlab models: checkpoints and ``save_model`` hold the adapter only.

    Same arguments as ``transformers.Trainer``. ``checkpoint-N/`` holds ``adapter_model.safetensors`` and
    ``adapter_config.json`` (plus ``optimizer.pt``, ``scheduler.pt``, the RNG and trainer state);
    ``resume_from_checkpoint`` and ``load_best_model_at_end`` copy the saved adapter back into the model.

    Explained in: book/distributed.ipynb
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # a method's per-step work (AdaLoRA's rank allocation) runs without being asked for
        if not any(isinstance(c, PeftlabCallback) for c in self.callback_handler.callbacks):
            self.add_callback(PeftlabCallback())

    def peftlab_model(self, model: nn.Module | None = None) -> nn.Module | None:
        """The model with peftlab adapters inside ``model`` (default: the trainer's), unwrapped from
        DDP/accelerate: a ``PeftModel``, or a model with adapters added in place; ``None`` otherwise."""
        model = self.model if model is None else model
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        return unwrapped if isinstance(unwrapped, PeftModel) or get_tuner(unwrapped) is not None else None

    # ---- saving ---------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.peftlab_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:  # only the main process writes (a shared file system is assumed)
            return
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is None and not isinstance(model, PeftModel):  # adapters added in place: one folder each
            for name, folder in adapter_folders(model, output_dir).items():
                save_adapter(model, folder, name)
        elif state_dict is None:
            model.save_pretrained(output_dir)  # safetensors (transformers 5 has no pickle option left)
        else:  # gathered by FSDP/DeepSpeed: the model's own parameters may be shards
            save_adapter_states(model, {name: adapter_state_from(model, state_dict, name)
                                        for name in adapter_configs(model)}, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    # ---- resuming -------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        peft_model = self.peftlab_model(model)
        if peft_model is None or self._engine_loads(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapters_from_checkpoint(peft_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        peft_model = self.peftlab_model()
        if peft_model is None or self._engine_loads(self.state.best_model_checkpoint):
            return super()._load_best_model()
        load_adapters_from_checkpoint(peft_model, self.state.best_model_checkpoint)

    def _engine_loads(self, folder: str | os.PathLike) -> bool:
        """Whether transformers' own loader restores this checkpoint: DeepSpeed's (its engine saved the module
        state) and FSDP's when FSDP wrote its model files (``pytorch_model_fsdp*``). An adapter-only checkpoint
        under FSDP is copied in by peftlab: transformers' FSDP path would keep the current adapter, logging only
        a warning. FSDP2's parameters (``DTensor``) each take their shards of the saved tensors."""
        if self.is_deepspeed_enabled:
            return True
        if not self.is_fsdp_enabled:
            return False
        return os.path.isdir(folder) and any("pytorch_model_fsdp" in f for f in os.listdir(folder))


__all__ = ["Trainer", "load_adapters_from_checkpoint", "adapter_folders", "has_adapter_files", "adapter_state_from",
           "save_adapter_states"]
