"""diffusers-style LoRA calls on a pipeline: ``load_lora_weights``, ``set_adapters(names, weights)``, ...

A diffusers pipeline is a bundle of models (``unet``, ``text_encoder``, ...). :class:`LoraLoaderMixin` gives
a pipeline class diffusers' LoRA methods; each component carries its adapters exactly as a model does with
:mod:`peftlab.integrations.transformers` (adapters injected in place, one tuner per component).

Files, as diffusers writes them: one ``pytorch_lora_weights.safetensors`` whose keys are the component's
name plus peft's key, ``unet.<module path>.lora_A.weight``, ``text_encoder.<module path>.lora_B.weight``, and
whose safetensors metadata holds each component's LoRA config under ``lora_adapter_metadata``
(``{"unet.r": 4, "unet.lora_alpha": 4, ...}``). Without that metadata the rank of every module is read from
the shape of its ``lora_A`` and ``lora_alpha = r``, as diffusers does. A peft adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) loads into the first component (the denoiser).

Weighted combination: ``set_adapters(["a", "b"], [w_a, w_b])`` activates both and scales each,
h = W₀x + Σ_i w_i · (α_i/r_i) · B_i A_i x, through every LoRA layer's ``set_scale``.

Explained in: book/integrations.ipynb
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from peftlab.config import CONFIG_NAME, PeftConfig
from peftlab.integrations import transformers as tf
from peftlab.tuners.lora import LoraConfig, LoraLayer
from peftlab.utils.io import SAFETENSORS_WEIGHTS_NAME, _atomic_replace, load_adapter_weights
from peftlab.utils.save_and_load import PEFT_PREFIX

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_WEIGHT_NAME_PICKLE = "pytorch_lora_weights.bin"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# older diffusers / kohya spellings of LoRA's two factors -> peft's
_FACTOR_ALIASES = {".lora.down.weight": ".lora_A.weight", ".lora.up.weight": ".lora_B.weight",
                   ".lora_down.weight": ".lora_A.weight", ".lora_up.weight": ".lora_B.weight"}
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_embedding_A", ".lora_embedding_B")


# ---------------------------------------------------------------------------------------------------
# Reading LoRA files
# ---------------------------------------------------------------------------------------------------
def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt") from None


def lora_state_dict(path_or_dict: str | os.PathLike | Mapping[str, torch.Tensor], weight_name: str | None = None,
                    allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], str]:
    """Read LoRA weights: ``(state_dict, configs by component, source)``.

    Accepts a state dict, a ``.safetensors`` file, a folder holding ``weight_name`` (default
    ``pytorch_lora_weights.safetensors``), or a peft adapter folder (its keys get the prefix ``"*."``,
    meaning "the first component"). Missing files raise ``FileNotFoundError`` naming what is there.

    Explained in: book/integrations.ipynb
    """
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), {}, "the given state dict"
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        present = sorted(os.listdir(path))
        if weight_name is not None:
            file = os.path.join(path, weight_name)
            if not os.path.isfile(file):
                raise FileNotFoundError(
                    f"weight_name={weight_name!r} is not in {path}; files there: {present or 'none'}"
                )
            path = file
        elif os.path.isfile(os.path.join(path, CONFIG_NAME)):  # a peft adapter folder
            config = PeftConfig.from_pretrained(path)
            weights = load_adapter_weights(path, allow_pickle=allow_pickle)
            state = {"*." + (k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in weights.items()}
            return state, {"*": config.to_dict()}, path
        elif os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):
            path = os.path.join(path, LORA_WEIGHT_NAME)
        elif os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME_PICKLE)) and allow_pickle:
            path = os.path.join(path, LORA_WEIGHT_NAME_PICKLE)
        else:
            raise FileNotFoundError(
                f"no LoRA weights in {path}: expected {LORA_WEIGHT_NAME} (diffusers) or {CONFIG_NAME} + "
                f"{SAFETENSORS_WEIGHTS_NAME} (peft), or pass weight_name=...; files there: {present or 'none'}"
            )
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file or folder {path!r} does not exist")
    if path.endswith(".safetensors"):
        state, metadata = _read_safetensors(path)
    elif allow_pickle:
        state, metadata = torch.load(path, map_location="cpu", weights_only=True), {}
    else:
        raise ValueError(f"{path} is not a .safetensors file; pickles can run code when loaded, so pass "
                         "allow_pickle=True only if you trust it")
    configs: dict[str, dict[str, Any]] = {}
    if LORA_ADAPTER_METADATA_KEY in metadata:
        for key, value in json.loads(metadata[LORA_ADAPTER_METADATA_KEY]).items():
            component, _, field_name = key.partition(".")
            configs.setdefault(component, {})[field_name] = value
    return state, configs, path


def _canonical_key(key: str) -> str:
    for old, new in _FACTOR_ALIASES.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def infer_lora_config(state_dict: Mapping[str, torch.Tensor]) -> LoraConfig:
    """A LoraConfig that fits LoRA tensors without a config: r from each ``lora_A``'s first dimension,
    ``lora_alpha = r`` (scaling 1), ``target_modules`` the module paths, ``rank_pattern`` where ranks differ.

    Explained in: book/integrations.ipynb
    """
    ranks: dict[str, int] = {}
    lora_bias = False
    for key, tensor in state_dict.items():
        if key.endswith(".lora_A.weight") or key.endswith(".lora_embedding_A"):
            module = key.rsplit(".", 2 if key.endswith(".weight") else 1)[0]
            ranks[module] = int(tensor.shape[0])
        elif key.endswith(".lora_B.bias"):
            lora_bias = True
    if not ranks:
        raise ValueError("no lora_A tensor found, so the LoRA rank cannot be read from the weights")
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))  # the most common rank
    pattern = {m: rk for m, rk in ranks.items() if rk != r}
    return LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern,
                      alpha_pattern=dict(pattern), lora_bias=lora_bias)


# ---------------------------------------------------------------------------------------------------
# The mixin
# ---------------------------------------------------------------------------------------------------
class LoraLoaderMixin:
    """diffusers' LoRA methods for a pipeline whose models are attributes named in ``_lora_loadable_modules``.

    Explained in: book/integrations.ipynb
    """

    #: attribute names of the pipeline's models that can carry LoRA, the denoiser first
    _lora_loadable_modules: tuple[str, ...] = ("unet", "text_encoder")

    # ---- bookkeeping ----------------------------------------------------------------------------
    def _lora_components(self) -> dict[str, nn.Module]:
        return {n: getattr(self, n) for n in self._lora_loadable_modules if getattr(self, n, None) is not None}

    def _adapter_weights(self) -> dict[str, float]:
        if "_lora_weights" not in self.__dict__:
            self.__dict__["_lora_weights"] = {}
        return self.__dict__["_lora_weights"]

    def _fused(self) -> bool:
        return bool(self.__dict__.get("_lora_fused"))

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Component name -> names of the adapters it holds.

        Explained in: book/integrations.ipynb
        """
        out = {}
        for name, module in self._lora_components().items():
            tuner = tf.get_tuner(module)
            if tuner is not None:
                out[name] = list(tuner.peft_config)
        return out

    def _all_adapters(self) -> list[str]:
        names: list[str] = []
        for adapters in self.get_list_adapters().values():
            names += [a for a in adapters if a not in names]
        return names

    def get_active_adapters(self) -> list[str]:
        """Adapters active in any component.

        Explained in: book/integrations.ipynb
        """
        names: list[str] = []
        for module in self._lora_components().values():
            tuner = tf.get_tuner(module)
            if tuner is not None:
                names += [a for a in tuner.active_adapters if a not in names]
        return names

    # ---- loading and saving ---------------------------------------------------------------------
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping[str, torch.Tensor],
                          adapter_name: str | None = None, weight_name: str | None = None,
                          allow_pickle: bool = False, **kwargs: Any) -> None:
        """Load LoRA weights into the pipeline's components under ``adapter_name`` and make it the active one.

        Every key must start with a component name (``unet.``, ``text_encoder.``) and name a module that exists;
        otherwise ``ValueError`` lists the offending keys and the pipeline is left as it was.

        Explained in: book/integrations.ipynb
        """
        if self._fused():
            raise ValueError("a LoRA is fused into the weights; call unfuse_lora() before loading another")
        existing = self._all_adapters()
        adapter_name = adapter_name or f"default_{len(existing)}"
        if adapter_name in existing:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded; choose another adapter_name")
        state, configs, source = lora_state_dict(pretrained_model_name_or_path_or_dict, weight_name, allow_pickle)
        if not state:
            raise ValueError(f"{source} holds no tensors")
        components = self._lora_components()
        first = next(iter(components))
        parts: dict[str, dict[str, torch.Tensor]] = {}
        stray, not_lora = [], []
        for key, tensor in state.items():
            component, _, rest = key.partition(".")
            component = first if component == "*" else component
            rest = _canonical_key(rest)
            if component not in components or not rest:
                stray.append(key)
            elif not rest.endswith(_LORA_SUFFIXES):
                not_lora.append(key)
            else:
                parts.setdefault(component, {})[rest] = tensor
        if stray:
            raise ValueError(
                f"{len(stray)} keys in {source} belong to no component of {type(self).__name__} (e.g. {stray[:3]}); "
                f"keys must start with one of {[c + '.' for c in components]}"
            )
        if not_lora:
            raise ValueError(f"{len(not_lora)} keys in {source} are not LoRA tensors (e.g. {not_lora[:3]}); "
                             f"expected names ending in {list(_LORA_SUFFIXES)}")
        done: list[nn.Module] = []
        try:
            for component, sd in parts.items():
                fields = configs.get(component) or configs.get("*" if component == first else "")
                if fields:
                    config = (PeftConfig if "peft_type" in fields else LoraConfig).from_dict(fields)
                else:
                    config = infer_lora_config(sd)
                module = components[component]
                config.inference_mode = True
                tf.load_adapter(module, adapter_name=adapter_name, adapter_state_dict=sd, peft_config=config)
                done.append(module)
        except ValueError as exc:
            for module in done:
                tf.delete_adapter(module, adapter_name)
            raise ValueError(f"could not load {source} into {type(self).__name__}: {exc}") from None
        self._adapter_weights()[adapter_name] = 1.0
        self.set_adapters(adapter_name)

    def save_lora_weights(self, save_directory: str | os.PathLike, adapter_name: str | None = None,
                          weight_name: str = LORA_WEIGHT_NAME) -> str:
        """Write one adapter of every component into a single diffusers-style file; returns its path.

        Keys are ``<component>.<peft key>``; the configs go into the metadata so that rank, α and targets
        come back exactly. The file is written under a temporary name and renamed.

        Explained in: book/integrations.ipynb
        """
        if adapter_name is None:
            active = self.get_active_adapters()
            if len(active) != 1:
                raise ValueError(f"{len(active)} adapters are active ({active}); pass adapter_name=...")
            adapter_name = active[0]
        state: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        for component, module in self._lora_components().items():
            tuner = tf.get_tuner(module)
            if tuner is None or adapter_name not in tuner.peft_config:
                continue
            for k, v in tf.get_adapter_state_dict(module, adapter_name).items():
                state[f"{component}.{k}"] = v.detach().to("cpu").contiguous().clone()
            for k, v in tuner.peft_config[adapter_name].to_dict().items():
                meta[f"{component}.{k}"] = v
        if not state:
            raise ValueError(f"no component holds an adapter named {adapter_name!r}; adapters: {self._all_adapters()}")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!s} is a file; pass a folder path")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, weight_name)
        metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}
        _atomic_replace(path, lambda tmp: save_file(state, tmp, metadata=metadata))
        return path

    # ---- which adapters run, and how strongly ---------------------------------------------------
    def set_adapters(self, adapter_names: str | Sequence[str],
                     adapter_weights: float | Sequence[float] | None = None) -> None:
        """Activate ``adapter_names`` with run-time weights: h = W₀x + Σ_i w_i·(α_i/r_i)·B_i A_i x.

        ``adapter_weights``: one number per adapter, one number for all, or ``None`` (all 1.0). A component
        that holds none of the named adapters runs without LoRA.

        Explained in: book/integrations.ipynb
        """
        if self._fused():
            raise ValueError("a LoRA is fused into the weights; call unfuse_lora() before set_adapters")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = [float(w) for w in adapter_weights]
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} adapter_weights; give one weight each")
        missing = [n for n in names if n not in self._all_adapters()]
        if missing:
            raise ValueError(f"adapter(s) {missing} are not loaded; loaded: {self._all_adapters()}")
        for module in self._lora_components().values():
            tuner = tf.get_tuner(module)
            if tuner is None:
                continue
            own = [n for n in names if n in tuner.peft_config]
            tuner.set_adapter(own)
            for _, layer in tuner.adapter_layers():
                for name, weight in zip(names, weights):
                    if isinstance(layer, LoraLayer):
                        layer.set_scale(name, weight)  # scaling = w · α/r
        self._adapter_weights().update(zip(names, weights))

    def disable_lora(self) -> None:
        """Run every component without its LoRAs (the base pipeline), until :meth:`enable_lora`.

        Explained in: book/integrations.ipynb
        """
        for module in self._lora_components().values():
            if tf.get_tuner(module) is not None:
                tf.disable_adapters(module)

    def enable_lora(self) -> None:
        """Switch the active LoRAs back on.

        Explained in: book/integrations.ipynb
        """
        for module in self._lora_components().values():
            if tf.get_tuner(module) is not None:
                tf.enable_adapters(module)

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Remove adapters from every component that holds them.

        Explained in: book/integrations.ipynb
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in self._all_adapters()]
        if missing:
            raise ValueError(f"adapter(s) {missing} are not loaded; loaded: {self._all_adapters()}")
        for module in self._lora_components().values():
            tuner = tf.get_tuner(module)
            own = [n for n in names if tuner is not None and n in tuner.peft_config]
            if own:
                tf.delete_adapter(module, own)
        for n in names:
            self._adapter_weights().pop(n, None)

    def unload_lora_weights(self) -> None:
        """Remove every LoRA (unfusing first), leaving the plain pipeline.

        Explained in: book/integrations.ipynb
        """
        if self._fused():
            self.unfuse_lora()
        self.delete_adapters(self._all_adapters())

    # ---- fusing ---------------------------------------------------------------------------------
    def fuse_lora(self, components: Sequence[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: Sequence[str] | None = None) -> None:
        """Merge the active (or named) LoRAs into the weights, each at ``lora_scale`` × its set_adapters weight:
        W ← W₀ + Σ_i s·w_i·(α_i/r_i)·B_i A_i. Inference then costs what the base costs; :meth:`unfuse_lora` undoes it.

        Explained in: book/integrations.ipynb
        """
        if self._fused():
            raise ValueError("LoRAs are already fused; call unfuse_lora() first")
        chosen = self._lora_components()
        if components is not None:
            unknown = [c for c in components if c not in chosen]
            if unknown:
                raise ValueError(f"unknown components {unknown}; components: {list(chosen)}")
            chosen = {c: chosen[c] for c in components}
        weights = self._adapter_weights()
        fused: list[str] = []
        try:
            for component, module in chosen.items():
                tuner = tf.get_tuner(module)
                if tuner is None:
                    continue
                names = [n for n in (adapter_names or tuner.active_adapters) if n in tuner.peft_config]
                for n in names:
                    weights.setdefault(n, 1.0)  # unfuse_lora restores this weight
                for _, layer in tuner.adapter_layers():
                    for n in names:
                        if isinstance(layer, LoraLayer):
                            layer.set_scale(n, weights[n] * lora_scale)
                fused.append(component)
                tuner.merge_adapter(names, safe_merge=safe_fusing)
        except ValueError:
            self.__dict__["_lora_fused"] = fused
            self.unfuse_lora()
            raise
        self.__dict__["_lora_fused"] = fused

    def unfuse_lora(self, components: Sequence[str] | None = None) -> None:
        """Take fused LoRAs back out of the weights and restore their set_adapters weights.

        Explained in: book/integrations.ipynb
        """
        fused = self.__dict__.get("_lora_fused") or []
        components = list(fused) if components is None else [c for c in components if c in fused]
        weights = self._adapter_weights()
        for component in components:
            tuner = tf.get_tuner(getattr(self, component))
            if tuner is None:
                continue
            tuner.unmerge_adapter()
            for _, layer in tuner.adapter_layers():
                for n, w in weights.items():
                    if isinstance(layer, LoraLayer):
                        layer.set_scale(n, w)
        self.__dict__["_lora_fused"] = [c for c in fused if c not in components]
