"""Adapter configurations and their JSON file, ``adapter_config.json``, in PEFT's format.

Every method's config is a dataclass deriving from :class:`PeftConfig`. A config written here loads in
``peft`` and a config written by ``peft`` loads here: keys we do not know are dropped with a warning
(as peft >= 0.14 does), and keys we know but do not implement are accepted at their default value and
refused, with the reason, at any other value.

Explained in: book/configs.ipynb
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftlab.utils.io import atomic_write_text, resolve_adapter_dir
from peftlab.utils.validation import check_field_types

CONFIG_NAME = "adapter_config.json"
# The peft release whose file format peftlab writes and is tested against.
PEFT_FORMAT_VERSION = "0.21.2"


class PeftType(str, enum.Enum):
    """The method an adapter uses (the ``peft_type`` key of ``adapter_config.json``)."""

    LORA = "LORA"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    BOFT = "BOFT"
    IA3 = "IA3"
    ADALORA = "ADALORA"
    XLORA = "XLORA"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"

    def __str__(self) -> str:
        return self.value


class TaskType(str, enum.Enum):
    """What the wrapped model does; picks the :class:`~peftlab.PeftModel` subclass."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


# peft_type -> config class; filled by each method's config module via ``register_config``.
_CONFIG_CLASSES: dict[str, type[PeftConfig]] = {}


def register_config(cls: type[PeftConfig]) -> type[PeftConfig]:
    """Class decorator: make ``PeftConfig.from_pretrained`` dispatch ``cls.PEFT_TYPE`` to ``cls``."""
    _CONFIG_CLASSES[cls.PEFT_TYPE] = cls
    return cls


def _json_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)  # peft writes sets in arbitrary order; we write them sorted
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


@dataclass
class PeftConfig:
    """Fields every adapter config shares.

    Explained in: book/configs.ipynb
    """

    PEFT_TYPE: ClassVar[str] = ""
    # Keys peft 0.21 knows for this method that peftlab does not implement: name -> the only accepted value.
    UNSUPPORTED_KEYS: ClassVar[dict[str, Any]] = {}

    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_type: str | PeftType | None = None
    task_type: str | TaskType | None = None
    inference_mode: bool = False
    auto_mapping: dict | None = None
    peft_version: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self)  # a wrong type or a NaN is refused here, naming the field, not deep in the model
        self.peft_type = self.PEFT_TYPE or self.peft_type
        if self.task_type is not None:
            try:
                self.task_type = TaskType(str(self.task_type))
            except ValueError:
                valid = ", ".join(t.value for t in TaskType)
                raise ValueError(f"task_type={self.task_type!r} is not a task type; valid: {valid}") from None

    # ---- dict and JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-able values (enums as strings, sets as sorted lists)."""
        return {f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (atomically)."""
        data = self.to_dict()
        data["peft_version"] = data.get("peft_version") or PEFT_FORMAT_VERSION
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build the config class named by ``data['peft_type']`` (or ``cls``) from a dict, tolerating unknown keys."""
        data = dict(data)
        target = cls
        if not cls.PEFT_TYPE:
            peft_type = data.get("peft_type")
            if peft_type is None:
                raise ValueError(
                    "adapter config has no 'peft_type' key, so its method is unknown; "
                    f"expected one of {sorted(_CONFIG_CLASSES)}"
                )
            peft_type = str(peft_type.value if isinstance(peft_type, enum.Enum) else peft_type)
            if peft_type not in _CONFIG_CLASSES:
                raise ValueError(
                    f"peft_type={peft_type!r} is not implemented in peftlab; implemented: {sorted(_CONFIG_CLASSES)}"
                )
            target = _CONFIG_CLASSES[peft_type]
        known = {f.name for f in dataclasses.fields(target)}
        data.pop("runtime_config", None)
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            warnings.warn(
                f"adapter config keys {unknown} are unknown to peftlab (written by a newer peft?) and were ignored",
                UserWarning,
                stacklevel=3,
            )
            for k in unknown:
                data.pop(k)
        return target(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PeftConfig:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); an adapter config is a JSON object") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a JSON {type(data).__name__}, but an adapter config is a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs: Any) -> PeftConfig:
        """Read ``adapter_config.json`` from a folder (or the Hub) and return the matching config class.

        Explained in: book/configs.ipynb
        """
        folder = resolve_adapter_dir(pretrained_model_name_or_path, subfolder=subfolder, filenames=(CONFIG_NAME,),
                                     **kwargs)
        path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(path):
            present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in {folder!s}; files there: {present or 'none'}. "
                "An adapter folder is what save_pretrained writes: adapter_config.json + adapter_model.safetensors"
            )
        return cls.from_json_file(path)

    # ---- validation helpers for method configs -----------------------------------------------------
    def _check_unsupported(self) -> None:
        for key, accepted in self.UNSUPPORTED_KEYS.items():
            value = getattr(self, key, accepted)
            if value != accepted and not (accepted is None and value in ({}, [], None)):
                raise ValueError(
                    f"{type(self).__name__}({key}={value!r}): peftlab does not implement {key!r}; "
                    f"leave it at {accepted!r}"
                )
