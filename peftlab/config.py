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
    # Keys peft writes for this method that are not fields here (AdaLoRA's config inherits every LoRA key):
    # name -> its default. A file may hold them at that value; they are written at it too.
    FILE_DEFAULTS: ClassVar[dict[str, Any]] = {}

    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_type: str | PeftType | None = None
    task_type: str | TaskType | None = None
    inference_mode: bool = False
    auto_mapping: dict | None = None
    peft_version: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self)  # a wrong type or a NaN is refused here, naming the field, not deep in the model
        peft_type = self.PEFT_TYPE or self.peft_type
        if peft_type is not None and not isinstance(peft_type, PeftType):
            try:
                peft_type = PeftType(str(peft_type))
            except ValueError:
                pass  # from_dict names the known methods; a plain PeftConfig may carry any string
        self.peft_type = peft_type
        if self.task_type is not None:
            try:
                self.task_type = TaskType(str(self.task_type))
            except ValueError:
                valid = ", ".join(t.value for t in TaskType)
                raise ValueError(f"task_type={self.task_type!r} is not a task type; valid: {valid}") from None

    # ---- dict and JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-able values (enums as strings, sets as sorted lists)."""
        data = {f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for k, v in self.FILE_DEFAULTS.items():
            data.setdefault(k, _json_value(v))
        return data

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
        from peftlab.registry import get_method

        data = dict(data)
        target = cls
        if not cls.PEFT_TYPE:
            target = get_method(data.get("peft_type")).config_class
        elif data.get("peft_type") not in (None, cls.PEFT_TYPE):
            raise ValueError(
                f"the adapter config is for peft_type={data['peft_type']!s}, not {cls.PEFT_TYPE}; load it with "
                f"PeftConfig.from_pretrained (which picks the method's config class) or {cls.__name__}'s sibling"
            )
        known = {f.name for f in dataclasses.fields(target)}
        data.pop("runtime_config", None)
        for k, default in target.FILE_DEFAULTS.items():
            if k in data and k not in known:
                value = data.pop(k)
                if value != default and not (default in ({}, None) and value in ({}, [], None)):
                    raise ValueError(f"{target.__name__}: {k}={value!r} in the adapter config; peftlab's "
                                     f"{target.PEFT_TYPE} does not implement {k!r}, only its default {default!r}")
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


def _sorted_list(value: Any) -> Any:
    """A list/tuple/set of names as a sorted list without repeats (peft writes sets); anything else unchanged."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted(set(value))
    return value


@dataclass
class TargetingConfig(PeftConfig):
    """The fields every per-layer method shares: which modules get an adapter, which are trained whole, biases.

    A method's config extends this with only its own fields. Its class variables say how the shared fields
    map onto its names: ``RANK_FIELD``/``ALPHA_FIELD`` (``r``/``lora_alpha`` for LoRA, ``r``/``alpha`` for
    LoHa), ``INIT_FIELD`` (``init_lora_weights``, ``init_weights``, ...), ``BIAS_MODES`` (LoRA's
    ``"lora_only"``, OFT's ``"oft_only"``), and ``ABSENT_FIELDS``: shared fields peft's config for this
    method does not have. Those are not written to ``adapter_config.json`` and must stay at their default
    (a value there would be lost on the way to peft).

    * ``target_modules``: a list (a module matches when its name equals an entry or ends with ``.entry``),
      a regex string (``re.fullmatch``), ``"all-linear"``, or ``None`` for the method's default for the
      model type; ``exclude_modules`` uses the same rules and wins;
    * ``layers_to_transform`` (+ ``layers_pattern``): keep only blocks with these indices;
    * ``rank_pattern`` / ``alpha_pattern``: per-module rank and α, keyed like ``target_modules`` entries
      or by regex;
    * ``modules_to_save``: modules trained whole and saved with the adapter (e.g. a classifier head);
    * ``bias``: ``"none"``, ``"all"`` (every bias of the model trains) or the method's ``"<method>_only"``
      (biases of the adapted layers train);
    * ``fan_in_fan_out``: the target stores its weight as (in, out) (GPT-2's ``Conv1D``); set per layer
      type automatically, with a warning, when it does not fit.

    Explained in: book/configs.ipynb
    """

    RANK_FIELD: ClassVar[str | None] = None
    ALPHA_FIELD: ClassVar[str | None] = None
    INIT_FIELD: ClassVar[str | None] = None
    BIAS_MODES: ClassVar[tuple[str, ...]] = ("none",)
    ABSENT_FIELDS: ClassVar[frozenset[str]] = frozenset()

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, Any] = field(default_factory=dict)
    alpha_pattern: dict[str, Any] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_unsupported()
        self._check_absent()
        self.target_modules = _sorted_list(self.target_modules)
        self.exclude_modules = _sorted_list(self.exclude_modules)
        if isinstance(self.modules_to_save, (tuple, set, frozenset)):
            self.modules_to_save = sorted(self.modules_to_save)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list)):
                raise TypeError(f"{name}={value!r}: give a list of module names or a regex string")
        if self.modules_to_save is not None and (
                not isinstance(self.modules_to_save, list) or not all(isinstance(m, str) for m in self.modules_to_save)):
            raise TypeError(f"modules_to_save={self.modules_to_save!r}: give a list of module names, e.g. ['classifier']")
        if self.bias not in self.BIAS_MODES:
            raise ValueError(f"bias={self.bias!r}; valid values: {', '.join(repr(b) for b in self.BIAS_MODES)}")
        for pattern_name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, pattern_name), dict):
                raise TypeError(f"{pattern_name}={getattr(self, pattern_name)!r}: give a dict of module name -> value")
        if self.RANK_FIELD is not None:
            self._check_rank(self.RANK_FIELD, getattr(self, self.RANK_FIELD))
        for key, rank in self.rank_pattern.items():
            self._check_rank(f"rank_pattern[{key!r}]", rank)
        self._check_layers()

    @staticmethod
    def _check_rank(name: str, rank: Any) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"{name}={rank!r}: the rank must be a positive integer (e.g. 8)")

    def _check_absent(self) -> None:
        defaults = {f.name: f for f in dataclasses.fields(TargetingConfig)}
        for name in self.ABSENT_FIELDS:
            f = defaults[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if getattr(self, name) != default:
                raise ValueError(
                    f"{type(self).__name__}({name}={getattr(self, name)!r}): {self.PEFT_TYPE} has no {name!r} option "
                    "(peft's config for this method has none, so the adapter would not load there as trained); leave "
                    "it unset" + (" and select blocks with a regex target_modules, e.g. r'.*\\.layers\\.(0|1)\\..*q_proj'"
                                  if name in ("layers_to_transform", "layers_pattern") else "")
                )

    def _check_layers(self) -> None:
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be combined with a regex target_modules string; use a list")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("layers_pattern cannot be combined with a regex target_modules string; use a list")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform (the block indices to adapt)")
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if isinstance(layers, int) else layers
            if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                      for i in items):
                raise ValueError(f"layers_to_transform={layers!r}: give a block index or a list of them, e.g. [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in self.ABSENT_FIELDS:
            data.pop(name, None)
        return data

    # ---- per-module values --------------------------------------------------------------------------------
    def rank_and_alpha(self, key: str) -> tuple[int | None, float | None]:
        """Rank and α for the module named ``key`` after ``rank_pattern`` and ``alpha_pattern``."""
        from peftlab.tuners.matching import get_pattern_key

        r = getattr(self, self.RANK_FIELD) if self.RANK_FIELD else None
        alpha = getattr(self, self.ALPHA_FIELD) if self.ALPHA_FIELD else None
        if self.rank_pattern:
            r = self.rank_pattern.get(get_pattern_key(self.rank_pattern, key), r)
        if self.alpha_pattern:
            alpha = self.alpha_pattern.get(get_pattern_key(self.alpha_pattern, key), alpha)
        return r, alpha

    @property
    def init_flag(self) -> Any:
        """The value of the method's initialisation field (``init_lora_weights``, ``init_weights``, ...)."""
        return getattr(self, self.INIT_FIELD) if self.INIT_FIELD else True
