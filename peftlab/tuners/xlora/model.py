"""X-LoRA: LoRA experts mixed per token and per layer by a gate that reads the model's own hidden states.

One forward is two passes of the base model:

1. the *scaling pass*: every expert weighted by ``scaling_pass_value`` (0: the plain base model), run without
   gradients, only for the last hidden state ``h`` (batch, seq, hidden);
2. the gate turns ``h`` into scalings ``λ`` (batch, seq, n_layers, n_experts) and the *real pass* runs with
   each LoRA layer ℓ computing ``W₀x + g · Σ_i λ[..., ℓ, i] · s_i B_i A_i x`` (g: ``global_scaling_weight``).

The experts are LoRA adapters loaded through the registry (``get_method("LORA")``), named ``"0"``, ``"1"``, …
as in peft; the scalings reach their layers through :class:`~peftlab.tuners.routing.TokenWeights`, so the
LoRA layers' math is their own. Both passes are started by a forward pre-hook on the wrapped model, so
``generate()`` (run without a KV cache, as in peft: the gate sees the whole sequence at every step) gets them too.

Explained in: book/xlora.ipynb
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftlab.config import PeftConfig
from peftlab.registry import get_method
from peftlab.tuners.base import BaseTuner
from peftlab.tuners.routing import _ROUTING, _TOKEN_WEIGHTS, TokenWeights
from peftlab.tuners.xlora.config import XLoraConfig
from peftlab.utils.io import (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, atomic_save_tensors, load_adapter_weights,
                              resolve_adapter_dir)

CLASSIFIER = "internal_xlora_classifier"  # peft's attribute name, so state-dict keys match


class XLoraClassifier(nn.Module):
    """The gate: hidden state (batch, seq, hidden) → scalings (batch, seq, n_layers, n_experts).

    ``layers`` is peft's layout: one ``nn.Linear`` (depth 1), or Linear → ReLU (→ Dropout) repeated, then the
    output Linear; the output has ``n_experts`` logits (broadcast to every layer) or ``n_experts · n_layers``
    (``layerwise_scalings``). A softmax over the experts (at ``softmax_temperature``) follows when
    ``enable_softmax``.

    Explained in: book/xlora.ipynb
    """

    def __init__(self, config: XLoraConfig, n_experts: int, n_layers: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.config, self.n_experts, self.n_layers = config, n_experts, n_layers
        kw = {"dtype": dtype, "device": device}
        layers: list[nn.Module] = []
        width = config.hidden_size
        for _ in range(config.xlora_depth - 1):
            layers += [nn.Linear(width, config.xlora_size, **kw), nn.ReLU()]
            if config.xlora_dropout_p > 0:
                layers.append(nn.Dropout(config.xlora_dropout_p))
            width = config.xlora_size
        out = n_experts * n_layers if config.layerwise_scalings else n_experts
        self.layers = nn.Sequential(*layers, nn.Linear(width, out, **kw))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, s = hidden.shape[:2]
        logits = self.layers(hidden.to(self.layers[0].weight.dtype))
        if not self.config.layerwise_scalings:  # the same scalings for every layer
            logits = logits.unsqueeze(2).expand(b, s, self.n_layers, self.n_experts)
        scalings = logits.reshape(b, s, self.n_layers, self.n_experts)
        if self.config.enable_softmax:
            scalings = torch.softmax(scalings / self.config.softmax_temperature, dim=-1)
        return scalings


def layer_scalings(scalings: torch.Tensor, config: XLoraConfig) -> torch.Tensor:
    """One layer's scalings (batch, seq, n_experts) after ``top_k_lora`` (zero all but the k largest per token)
    and ``enable_softmax_topk`` (a softmax over the kept ones), as peft applies them in each layer.

    Explained in: book/xlora.ipynb
    """
    if config.top_k_lora is not None:
        top = torch.topk(scalings, k=config.top_k_lora, dim=-1).indices
        mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, top, True)
        scalings = scalings * mask.to(scalings.dtype)
    if config.enable_softmax_topk:
        kept = scalings != 0
        soft = torch.softmax(scalings.masked_fill(~kept, float("-inf")), dim=-1)
        scalings = soft.masked_fill(~kept, 0.0)  # a token with nothing kept gets 0 (not NaN)
    return scalings


class _Scalings(TokenWeights):
    """Hands each expert layer its slice of the scalings, as per-token weights of its LoRA adapters."""

    def __init__(self, tuner: XLoraModel, scalings: torch.Tensor | None) -> None:
        self.tuner, self.scalings = tuner, scalings  # None: every expert weighted 0 (the base model)
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def weights_for(self, layer: object) -> dict[str, torch.Tensor] | None:
        index = self.tuner._layer_index.get(id(layer))
        if index is None:
            return None
        if self.scalings is None:
            return {}
        if index not in self._cache:
            cfg = self.tuner.xlora_config
            lam = layer_scalings(self.scalings[:, :, index, :], cfg) * cfg.global_scaling_weight
            self._cache[index] = {name: lam[..., i:i + 1] for i, name in enumerate(self.tuner.expert_names)}
        return self._cache[index]


class XLoraModel(BaseTuner):
    """LoRA experts (``self.lora_model``, a LoRA tuner from the registry) plus the gate
    (``internal_xlora_classifier``). State-dict names match peft's: ``base_model.lora_model.model.<path>
    .lora_A.<i>.weight`` for the experts, ``base_model.internal_xlora_classifier.layers.<j>.weight`` for the gate.

    Explained in: book/xlora.ipynb
    """

    def __init__(self, model: nn.Module, peft_config: dict[str, Any], adapter_name: str = "default") -> None:
        nn.Module.__init__(self)
        config: XLoraConfig = peft_config[adapter_name]
        self.peft_config = {adapter_name: config}
        self.active_adapter = adapter_name
        self.xlora_config = config
        names = list(config.adapters or {})
        if not names:
            raise ValueError("XLoraConfig.adapters is empty: X-LoRA needs at least one LoRA expert, e.g. "
                             "adapters={'math': 'path/to/lora_math', 'code': 'path/to/lora_code'}")
        if adapter_name in [str(i) for i in range(len(names))]:
            raise ValueError(f"adapter_name={adapter_name!r} is the name of an expert inside the model (experts are "
                             "'0', '1', ...); choose another, e.g. 'default'")
        if config.top_k_lora is not None and config.top_k_lora > len(names):
            raise ValueError(f"top_k_lora={config.top_k_lora} but there are {len(names)} experts; use at most "
                             f"{len(names)} (or None for all)")
        hidden = _hidden_size(model)
        if hidden is not None and hidden != config.hidden_size:
            raise ValueError(f"XLoraConfig(hidden_size={config.hidden_size}) but the base model's hidden size is "
                             f"{hidden}; pass hidden_size={hidden}")
        folders, configs = self._read_experts(config)
        lora = get_method("LORA")
        self._hooks: list[Any] = []
        try:
            self.lora_model = lora.tuner_class(model, {"0": configs[0]}, "0")
        except ValueError as exc:
            raise ValueError(f"expert {names[0]!r} ({folders[0]}) does not fit this model: {exc}") from None
        try:
            for i, cfg in enumerate(configs[1:], start=1):
                try:
                    self.lora_model.inject_adapter(str(i), cfg)
                except ValueError as exc:
                    raise ValueError(f"expert {names[i]!r} ({folders[i]}) does not fit this model: {exc}") from None
            layers = [layer for _, layer in self.lora_model.adapter_layers()]
            for key, layer in self.lora_model.adapter_layers():
                if isinstance(layer.get_base_layer(), (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    raise ValueError(f"expert layer {key} is a LoRA {type(layer.get_base_layer()).__name__}; X-LoRA "
                                     "mixes LoRA on linear and embedding layers (as peft's does for Linear, "
                                     "Embedding, Conv2d); leave convolutions out of the experts' target_modules")
            from peftlab.utils.save_and_load import load_adapter_state_dict

            for i, (folder, cfg) in enumerate(zip(folders, configs)):
                load_adapter_state_dict(self.model, load_adapter_weights(folder), str(i), cfg)
        except Exception:
            self.lora_model.unload()
            raise
        self.expert_names = [str(i) for i in range(len(names))]
        self.lora_model.set_adapter(self.expert_names)
        self._layer_index = {id(layer): i for i, layer in enumerate(layers)}
        p = next(model.parameters())
        self.internal_xlora_classifier = XLoraClassifier(config, len(names), len(layers), p.dtype, p.device)
        self._disabled = False
        self._in_scaling_pass = False
        self._contexts: list[Any] = []
        self._latest: torch.Tensor | None = None
        self._log: list[torch.Tensor] = []
        self._logging = False
        self._hooks = [model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                       model.register_forward_hook(self._post_forward, with_kwargs=True, always_call=True)]
        self._mark_trainable()

    # ---- experts ---------------------------------------------------------------------------------
    @staticmethod
    def _read_experts(config: XLoraConfig) -> tuple[list[str], list[Any]]:
        """(folder, LoRA config) of every expert, checked before the model changes."""
        root = getattr(config, "_saved_root", None)
        folders, configs = [], []
        for name, where in config.adapters.items():
            folder = None
            if root is not None and not os.path.isabs(str(where)):
                for cand in (os.path.join(root, str(where)), os.path.join(root, name)):
                    if os.path.isdir(cand):
                        folder = cand
                        break
            if folder is None:
                try:
                    folder = resolve_adapter_dir(str(where))
                except Exception as exc:  # a clear message naming the expert
                    raise ValueError(f"expert {name!r}: cannot find its LoRA folder {where!r} ({exc}); pass "
                                     "adapters={name: folder} to from_pretrained") from None
            cfg = PeftConfig.from_pretrained(folder)
            if str(cfg.peft_type) != "LORA":
                raise ValueError(f"expert {name!r} ({folder}) is a {cfg.peft_type} adapter; X-LoRA's experts are "
                                 "LoRA adapters")
            if cfg.use_dora or cfg.lora_bias:
                what = "use_dora=True" if cfg.use_dora else "lora_bias=True"
                raise ValueError(f"expert {name!r} has {what}; X-LoRA scales plain LoRA products s·B A x per token "
                                 "(peft refuses DoRA experts too); use an expert trained without it")
            if cfg.modules_to_save:
                raise ValueError(f"expert {name!r} trains whole modules ({cfg.modules_to_save}); those cannot be "
                                 "mixed per token. Use LoRA experts without modules_to_save")
            cfg = copy.copy(cfg)
            cfg.inference_mode = False
            folders.append(folder)
            configs.append(cfg)
        return folders, configs

    @property
    def model(self) -> nn.Module:  # the wrapped transformers model (inside the LoRA tuner, as in peft)
        return self.lora_model.model

    # ---- the two passes --------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._in_scaling_pass:
            return None
        if self._disabled:
            self._contexts.append(None)
            return None
        if _ROUTING.get() is not None:
            raise ValueError("X-LoRA cannot serve mixed batches (adapter_names=[...]); its gate picks the experts")
        kwargs = dict(kwargs)
        kwargs["use_cache"] = False  # the gate needs the whole sequence each time (as in peft)
        scaling_kwargs = {k: v for k, v in kwargs.items() if k not in ("labels", "output_attentions")}
        scaling_kwargs.update(output_hidden_states=True, return_dict=True)
        value = self.xlora_config.scaling_pass_value
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs["inputs_embeds"]
        dummy = None if value == 0 else torch.full((ref.shape[0], ref.shape[1], self.internal_xlora_classifier.n_layers,
                                                    len(self.expert_names)), float(value), device=ref.device)
        self._in_scaling_pass = True
        token = _TOKEN_WEIGHTS.set(_Scalings(self, dummy))
        try:
            with torch.no_grad():
                out = module(*args, **scaling_kwargs)
        finally:
            _TOKEN_WEIGHTS.reset(token)
            self._in_scaling_pass = False
        scalings = self.internal_xlora_classifier(out.hidden_states[-1])
        self._latest = scalings
        if self._logging:
            self._log.append(scalings.detach())
        self._contexts.append(_TOKEN_WEIGHTS.set(_Scalings(self, scalings)))
        return args, kwargs

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._in_scaling_pass or not self._contexts:
            return None
        token = self._contexts.pop()
        if token is not None:
            _TOKEN_WEIGHTS.reset(token)
        return None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` without a KV cache: each step reruns both passes over the whole sequence (as peft's)."""
        kwargs["use_cache"] = False
        return self.model.generate(*args, **kwargs)

    # ---- scalings --------------------------------------------------------------------------------
    def get_latest_scalings(self) -> torch.Tensor | None:
        """The last forward's scalings, (batch, seq, n_layers, n_experts), before top-k; None before any forward."""
        return self._latest

    def enable_scalings_logging(self) -> None:
        """Keep every forward's scalings (detached) in a log."""
        self._logging = True

    def disable_scalings_logging(self) -> None:
        """Stop logging, keeping the log."""
        self._logging = False

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A copy of the log (the list; the tensors are shared), each (batch, seq, n_layers, n_experts)."""
        return list(self._log)

    def clear_scalings_log(self) -> None:
        self._log.clear()

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log grouped by sequence length: seq_len → (positions in the log, tensors)."""
        buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for i, s in enumerate(self._log):
            pos, ts = buckets.setdefault(s.shape[1], ([], []))
            pos.append(i)
            ts.append(s)
        return buckets

    def flush_log_scalings(self, path: str | os.PathLike) -> None:
        """Write the log to ``path`` (a safetensors file, entries ``"0"``, ``"1"``, … in order) and clear it;
        :func:`load_scalings_log` reads it back."""
        if not self._log:
            raise ValueError("the scalings log is empty; call enable_scalings_logging() and run the model first")
        atomic_save_tensors({str(i): s.cpu().contiguous() for i, s in enumerate(self._log)}, os.fspath(path), True)
        self._log.clear()

    def set_topk_lora(self, value: int | None) -> None:
        """Keep only the ``value`` largest scalings per token and layer (None: all experts)."""
        n = len(self.expert_names)
        if value is not None and not 1 <= value <= n:
            raise ValueError(f"top_k_lora={value}: choose between 1 and the number of experts ({n}), or None")
        self.xlora_config.top_k_lora = value

    def set_global_scaling_weight(self, weight: float) -> None:
        """Multiply every expert's output by ``weight`` (stored in the config, as peft does)."""
        self.xlora_config.global_scaling_weight = float(weight)

    def get_global_scaling_weight(self) -> float:
        return self.xlora_config.global_scaling_weight

    def set_scaling_pass_value(self, value: float | None) -> None:
        """The experts' weight in the scaling pass; None: 1 / n_experts."""
        self.xlora_config.scaling_pass_value = 1 / len(self.expert_names) if value is None else float(value)

    # ---- adapters: one X-LoRA per model ----------------------------------------------------------
    def _mark_trainable(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        train = not self.xlora_config.inference_mode
        for p in self.internal_xlora_classifier.parameters():
            p.requires_grad_(train)
        if train and self.xlora_config.use_trainable_adapters:
            for _, layer in self.adapter_layers():
                for attr in layer.adapter_layer_names:
                    for entry in getattr(layer, attr).values():
                        entry.requires_grad_(True)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != [self.active_adapter]:
            raise ValueError(f"an X-LoRA model has one adapter, {self.active_adapter!r}; its experts are chosen by "
                             "the gate (set_topk_lora, or a single-expert LoRA model for one expert)")
        self._mark_trainable()

    def inject_adapter(self, adapter_name: str, config: Any, low_cpu_mem_usage: bool = False,
                       state_dict: dict[str, torch.Tensor] | None = None) -> None:
        raise ValueError("an X-LoRA model holds one X-LoRA adapter; list every expert in XLoraConfig.adapters")

    def delete_adapter(self, adapter_name: str) -> None:
        raise ValueError("an X-LoRA adapter cannot be deleted; unload() returns the base model")

    def enable_adapter_layers(self) -> None:
        self._disabled = False
        self.lora_model.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        self._disabled = True
        self.lora_model.disable_adapter_layers()

    def unload(self) -> nn.Module:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.lora_model.unload()

    # ---- files -----------------------------------------------------------------------------------
    @staticmethod
    def _find(model: nn.Module) -> tuple[str, XLoraModel]:
        for path, module in model.named_modules():
            if isinstance(module, XLoraModel):
                return path, module
        raise ValueError("no X-LoRA model inside this model")

    @classmethod
    def state_dict_for_save(cls, model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str,
                            config: Any) -> dict[str, torch.Tensor]:
        """The gate's tensors, every one of them, under peft's names (``base_model.internal_xlora_classifier.…``)."""
        path, tuner = cls._find(model)
        prefix = f"{path}.{CLASSIFIER}." if path else f"{CLASSIFIER}."
        return {prefix + k: t.detach() for k, t in tuner.internal_xlora_classifier.state_dict().items()}

    @classmethod
    def state_dict_for_load(cls, model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str,
                            config: Any) -> dict[str, torch.Tensor]:
        """Copy the gate's tensors in (shapes checked first); return the rest (which the caller then refuses).

        A folder written by peft 0.21.2 lacks the gate tensors whose names contain an expert index (its saving
        filters names with ``.0.``, ``.1.``, … out); they keep their fresh initialisation, with a warning."""
        _, tuner = cls._find(model)
        own = tuner.internal_xlora_classifier.state_dict(keep_vars=True)
        mine = {}
        rest = {}
        for k, t in state.items():
            _, sep, sub = k.partition(f"{CLASSIFIER}.")
            (mine if sep else rest)[sub if sep else k] = t
        bad = [(k, tuple(t.shape), tuple(own[k].shape)) for k, t in mine.items() if k in own and t.shape != own[k].shape]
        unknown = sorted(k for k in mine if k not in own)
        if bad or unknown:
            raise ValueError(f"the X-LoRA gate in the checkpoint does not fit this model: shapes {bad[:3]}, unknown "
                             f"{unknown[:3]}. Was it saved with other experts, layers or xlora_depth/xlora_size?")
        missing = sorted(k for k in own if k not in mine)
        if missing:
            warnings.warn(f"the checkpoint lacks the X-LoRA gate tensors {missing}; they keep their fresh "
                          "initialisation. peft 0.21.2 drops gate tensors whose names contain an expert index "
                          "(e.g. layers.0.weight) when it saves; peftlab saves all of them", UserWarning, stacklevel=4)
        with torch.no_grad():
            for k, t in mine.items():
                own[k].copy_(t.to(device=own[k].device, dtype=own[k].dtype))
        return rest

    def save_companions(self, folder: str, adapter_name: str, safe_serialization: bool) -> None:
        """Each expert as a LoRA folder ``<folder>/<expert name>`` (the layout peft reads from the Hub)."""
        from peftlab.utils.save_and_load import adapter_state_items

        for i, name in enumerate(self.xlora_config.adapters):
            cfg = copy.copy(self.lora_model.peft_config[str(i)])
            cfg.inference_mode = True
            sub = os.path.join(folder, name)
            os.makedirs(sub, exist_ok=True)
            state = {"base_model.model." + disk: t.detach() for _, disk, t in adapter_state_items(self.model, str(i))}
            weights = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
            atomic_save_tensors(state, os.path.join(sub, weights), safe_serialization)
            cfg.save_pretrained(sub)
        cfg = PeftConfig.from_pretrained(folder)  # the saved config points at those subfolders
        cfg.adapters = {name: name for name in self.xlora_config.adapters}
        cfg.save_pretrained(folder)

    @classmethod
    def prepare_load(cls, config: Any, folder: str, kwargs: dict[str, Any]) -> None:
        """Experts are looked up as ``adapters=`` given by the caller (as in peft), else in ``folder/<name>``
        (peftlab's layout), else at the paths the config records (a folder saved by peft)."""
        if "adapters" in kwargs:
            config.adapters = dict(kwargs["adapters"])
        else:
            config._saved_root = folder


def load_scalings_log(path: str | os.PathLike) -> list[torch.Tensor]:
    """The tensors :meth:`XLoraModel.flush_log_scalings` wrote, in order.

    Explained in: book/xlora.ipynb
    """
    from safetensors.torch import load_file

    data = load_file(os.fspath(path))
    return [data[str(i)] for i in range(len(data))]


def _hidden_size(model: nn.Module) -> int | None:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if size is None:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        size = getattr(emb, "embedding_dim", None)
    return size
