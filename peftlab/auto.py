"""``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)``: base model and adapter from one folder name.

The adapter config records ``base_model_name_or_path``; the auto class loads that base with the matching
transformers auto class (``AutoModelForCausalLM`` for a causal-LM adapter), then the adapter with
``PeftModel.from_pretrained``. A tokenizer saved beside the adapter is loaded too, and a base embedding
smaller than its vocabulary is resized to fit (as peft does).

Explained in: book/integrations.ipynb
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from peftlab.config import PeftConfig
from peftlab.mapping import MODEL_TYPE_TO_PEFT_MODEL
from peftlab.peft_model import (PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction,
                                PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM,
                                PeftModelForSequenceClassification, PeftModelForTokenClassification)
from peftlab.utils.io import resolve_adapter_dir

#: libraries an ``auto_mapping`` may import a base class from (importing runs that library's code)
DEFAULT_IMPORT_ALLOWLIST: tuple[str, ...] = ("transformers", "diffusers", "peftlab")
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


def _allowed(library: str, allowlist: tuple[str, ...] | list[str]) -> bool:
    return any(library == a or library.startswith(a + ".") for a in allowlist)


class _BaseAutoPeftModel:
    """Shared ``from_pretrained``; subclasses name the transformers auto class and the PeftModel class.

    Explained in: book/integrations.ipynb
    """

    _target_class: str | None = None  # name of a transformers auto class
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter_folder)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, revision: str | None = None,
                        import_allowlist: tuple[str, ...] | list[str] | None = None, **kwargs: Any) -> PeftModel:
        """Load the base model named in the adapter's config, then the adapter; ``kwargs`` go to the base's
        ``from_pretrained`` (e.g. ``torch_dtype``).

        Explained in: book/integrations.ipynb
        """
        folder = resolve_adapter_dir(pretrained_model_name_or_path, subfolder=kwargs.pop("subfolder", None),
                                     revision=revision)
        peft_config = config if config is not None else PeftConfig.from_pretrained(folder)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(
                f"the adapter config in {folder} has no base_model_name_or_path, so the base model is unknown; load "
                "the base yourself and call PeftModel.from_pretrained(base, folder)"
            )
        task = peft_config.task_type
        if cls._target_class is not None:
            if task is not None:
                expected = MODEL_TYPE_TO_PEFT_MODEL.get(str(task), PeftModel)
                if expected is not cls._target_peft_class:
                    raise ValueError(
                        f"the adapter in {folder} has task_type={str(task)!r} (a {expected.__name__}); "
                        f"{cls.__name__} loads {cls._target_peft_class.__name__}. Use the auto class for that task"
                    )
            import transformers

            target = getattr(transformers, cls._target_class)
        elif task is not None:
            raise ValueError(f"the adapter has task_type={str(task)!r}; use the auto class for that task, e.g. "
                             "AutoPeftModelForCausalLM for CAUSAL_LM")
        elif peft_config.auto_mapping:
            library = peft_config.auto_mapping["parent_library"]
            allow = DEFAULT_IMPORT_ALLOWLIST if import_allowlist is None else import_allowlist
            if not _allowed(library, allow):
                raise ValueError(f"auto_mapping asks to import {library!r}, which is not in the import allowlist "
                                 f"{list(allow)}; pass import_allowlist=[{library!r}] if you trust it")
            target = getattr(importlib.import_module(library), peft_config.auto_mapping["base_model_class"])
        else:
            raise ValueError("the adapter config has neither task_type nor auto_mapping, so the base model class "
                             "is unknown; load the base yourself and call PeftModel.from_pretrained(base, folder)")
        base = target.from_pretrained(base_path, revision=peft_config.revision, **kwargs)
        if os.path.isfile(os.path.join(folder, TOKENIZER_CONFIG_NAME)) and hasattr(base, "get_input_embeddings"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
            if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
                base.resize_token_embeddings(len(tokenizer))
        return cls._target_peft_class.from_pretrained(base, folder, adapter_name=adapter_name,
                                                      is_trainable=is_trainable, config=peft_config)


class AutoPeftModel(_BaseAutoPeftModel):
    """For adapters without a task type: the base class comes from the config's ``auto_mapping``.

    Explained in: book/integrations.ipynb
    """


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    """``AutoModelForCausalLM`` base + ``PeftModelForCausalLM``.

    Explained in: book/integrations.ipynb
    """

    _target_class = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    """``AutoModelForSeq2SeqLM`` base + ``PeftModelForSeq2SeqLM``.

    Explained in: book/integrations.ipynb
    """

    _target_class = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    """``AutoModelForSequenceClassification`` base + ``PeftModelForSequenceClassification``.

    Explained in: book/integrations.ipynb
    """

    _target_class = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    """``AutoModelForTokenClassification`` base + ``PeftModelForTokenClassification``.

    Explained in: book/integrations.ipynb
    """

    _target_class = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    """``AutoModelForQuestionAnswering`` base + ``PeftModelForQuestionAnswering``.

    Explained in: book/integrations.ipynb
    """

    _target_class = "AutoModelForQuestionAnswering"
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    """``AutoModel`` base + ``PeftModelForFeatureExtraction``.

    Explained in: book/integrations.ipynb
    """

    _target_class = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction


__all__ = ["AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM",
           "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
           "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction"]
