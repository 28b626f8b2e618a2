"""The one adapter mechanism every method plugs into.

Two pieces:

* :class:`AdapterLayer` wraps one frozen layer (``base_layer``) and holds any number of *named* adapters
  for it. It owns everything that is the same for all methods: the record of which adapters it holds
  (``_adapters``, kept by ``update_layer`` and ``delete_adapter``), which are active, enabling and
  disabling, merging into and unmerging out of the base weight, deleting, and mixed batches (each row of
  a batch through its own adapter). It also knows the wrapped layer's sizes (``in_features``,
  ``out_features``, ``fan_in_fan_out`` for GPT-2's ``Conv1D``) and the dtype new adapter tensors get.
  A method subclass adds only its math: ``update_layer`` (create one adapter's tensors, then
  ``_record_adapter``), ``adapter_forward``, and either ``get_delta_weight`` (additive methods:
  W' = W + ΔW) or ``merged_weights``/``unmerged_weights`` (multiplicative ones: W' = W R, W = W' Rᵀ).
* :class:`BaseTuner` walks a model, finds the target modules, wraps them, marks only adapter tensors as
  trainable, and merges or unloads everything at the end. A method subclass fills in hooks, nothing else:
  ``default_target_modules`` (per ``model_type``), ``is_target`` (a config's own matching rule),
  ``layer_dispatch`` (module types → layer class),
  ``layer_kwargs`` (a config → one layer's arguments), ``check_layer`` (method-specific refusals),
  ``filter_targets`` (e.g. keep only the top blocks), ``state_dict_for_save``/``state_dict_for_load``
  (renames, tensors cut to or resized from a saved rank), ``convert_for_save``. Whether a method merges
  and serves mixed batches is in its registry entry (:mod:`peftlab.registry`); ``merge_adapter`` and
  ``merge_and_unload`` refuse with a clear error for one that cannot.

Every method's config extends :class:`peftlab.config.TargetingConfig` (targets, excluded modules, layer
selection, rank/α patterns, modules_to_save, bias, fan_in_fan_out) with only its own fields.

Adapters that are not a per-layer weight update plug in at two places, decided here so their methods only
fill them in:

* LLaMA-Adapter (adaption prompts) is still an :class:`AdapterLayer`: its ``base_layer`` is a whole
  attention module (``self_attn``), ``layer_dispatch`` names the attention classes it supports,
  ``is_target`` reads peft's ``target_modules="self_attn"`` as a module-name suffix, ``filter_targets``
  keeps the top ``adapter_layers`` blocks, ``adapter_forward`` adds the gated attention over the prompt to
  the module's output, and its registry entry says ``supports_merge=False``. Targeting,
  several named adapters, enable/disable, delete, trainable marking and the file format (``adaption_prompt``
  and ``adaption_gate`` per layer) come from this module unchanged.
* X-LoRA is a tuner around LoRA layers: ``XLoraModel`` (a :class:`BaseTuner`) loads the experts as LoRA
  adapters through the registry (``get_method("LORA")``, never by importing the LoRA package), adds its
  classifier as a trainable module of its own, and runs the two passes (a scaling pass, then the real pass)
  from a forward pre-hook on the wrapped model, so ``generate()`` gets them too. The per-token, per-expert
  scalings reach the LoRA layers the way mixed batches reach them: a context variable
  (:class:`~peftlab.tuners.routing.TokenWeights`, set around the second pass) that
  :meth:`AdapterLayer.forward` reads; the layer then computes ``base(x) + Σ_a w_a · Δ_a(x)`` from its
  method's ``adapter_delta`` (:meth:`AdapterLayer.weighted_forward`), so the layers' own math is unchanged.

State-dict names, saving and loading live in :mod:`peftlab.utils.save_and_load` and work from the
structure built here (``adapter_layer_names``), not from substrings of parameter names.

Explained in: book/lora.ipynb
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn.modules.module import (_global_backward_hooks, _global_backward_pre_hooks, _global_forward_hooks,
                                     _global_forward_pre_hooks)
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from peftlab.tuners import matching
from peftlab.tuners.modules_to_save import ModulesToSaveWrapper
from peftlab.tuners.routing import _ROUTING, _TOKEN_WEIGHTS, BASE_ADAPTER, Routing, mixed_batch  # noqa: F401

# ---------------------------------------------------------------------------------------------------
# What every method needs to know about the layer it wraps
# ---------------------------------------------------------------------------------------------------
def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a layer an adapter may wrap: ``nn.Linear``/4-bit ``Linear4bit`` (in_features,
    out_features), transformers' ``Conv1D`` (weight stored (in, out)), ``nn.Conv1d/2d/3d`` (channels),
    ``nn.Embedding`` (num_embeddings, embedding_dim), ``nn.MultiheadAttention`` (embed_dim, embed_dim)."""
    if isinstance(layer, Conv1D):
        n_in, n_out = layer.weight.shape  # GPT-2 stores W as (in, out)
        return n_in, n_out
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return layer.in_channels, layer.out_channels
    if isinstance(layer, nn.MultiheadAttention):
        return layer.embed_dim, layer.embed_dim
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        n_out, n_in = weight.shape
        return n_in, n_out
    raise ValueError(f"cannot tell the input and output sizes of a {type(layer).__name__}; adapters wrap nn.Linear, "
                     "Conv1D, nn.Conv1d/2d/3d, nn.Embedding and layers with in_features/out_features")


_ON_META = contextvars.ContextVar("peftlab_adapters_on_meta", default=False)


@contextlib.contextmanager
def adapters_on_meta(enabled: bool = True) -> Iterator[None]:
    """Within this block new adapter tensors are created on the meta device (``low_cpu_mem_usage=True``):
    no memory and no initialisation until a checkpoint is loaded into them."""
    token = _ON_META.set(bool(enabled) or _ON_META.get())
    try:
        yield
    finally:
        _ON_META.reset(token)


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device`` in bytes (0 when unknown): a method refuses an adapter larger than this before
    allocating it, instead of failing deep inside torch."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return 0


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype new adapter tensors get: float32 on a half-precision base (peft's ``autocast_adapter_dtype``),
    else the base weight's own dtype."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def fusable(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether a method's fused training node may run: ``x`` and every tensor share one dtype, autocast is off
    and no ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, …) or forward-mode AD is active. Under
    autocast (bf16 on a GPU) the output, hence its gradient, is bf16 while the saved weights stay float32, so the
    layers take their generic path there (autograd handles the mixed dtypes); under a transform (per-sample
    gradients, as in differentially private training) the generic path's operators are what torch.func can
    transform."""
    return (all(t.dtype == x.dtype for t in tensors) and not torch.is_autocast_enabled(x.device.type)
            and not func_transform_active())


def func_transform_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jacrev, …) is running, or forward-mode AD
    (``torch.autograd.forward_ad.dual_level``): the fused autograd nodes have rules for neither (no vmap rule,
    no jvp), so a layer takes its generic path then."""
    return torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0


#: below this |s| :func:`divide_by_scale` does not divide by s (a product with s may have left float32's normal range)
DIVIDE_FLOOR = 1e-18


def divide_by_scale(numerator: torch.Tensor, scale: torch.Tensor,
                    direct: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """numerator / scale, entry by entry, for the gradient of a learned scale s read off a scaled activation
    (Σ_t g ⊙ (s ⊙ z) / s = Σ_t g ⊙ z, which spares keeping z); where |s| < :data:`DIVIDE_FLOOR` (s = 0 loses z
    altogether) the entries come from ``direct(idx)``, which computes them from z for those indices only.
    Deciding reads one number back from the device."""
    if float(scale.abs().amin()) >= DIVIDE_FLOOR:  # the common case: no entry near 0 (NaN takes the long way)
        return numerator / scale
    tiny = scale.abs() < DIVIDE_FLOOR
    out = numerator / torch.where(tiny, 1.0, scale)
    if bool(tiny.any()):
        idx = tiny.nonzero().squeeze(1)
        out[idx] = direct(idx)
    return out


def watched_by_hooks(module: nn.Module) -> bool:
    """Whether a hook watches ``module``'s call (forward or backward, its own or a global one). A fused path that
    computes the module's product without calling it would skip them, so such a layer takes its generic path."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _global_forward_hooks or _global_forward_pre_hooks
                or _global_backward_hooks or _global_backward_pre_hooks)


def hookless_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a plain ``nn.Linear`` that no hook watches, so that ``F.linear`` with them is exactly its
    call, without nn.Module's call path; None otherwise."""
    if type(module) is not nn.Linear or watched_by_hooks(module):
        return None
    params = module._parameters
    return params["weight"], params["bias"]


def linear_output(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x Wᵀ + b for x (…, in) and W (out, in), written into a fresh (…, out) tensor: returns it and its
    (tokens, out) form, to add more into. What a custom autograd node returns must not be a view made inside it
    (PyTorch then refuses any in-place change of the layer's output, such as an ``nn.ReLU(inplace=True)`` after
    it, which a frozen ``nn.Linear`` allows), and ``F.linear`` on a batch of sequences with a bias, or a 2-D
    product reshaped, is such a view."""
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    flat = out.view(-1, weight.shape[0])
    x2 = x.reshape(-1, x.shape[-1])
    if bias is None:
        torch.mm(x2, weight.t(), out=flat)
    else:
        torch.addmm(bias, x2, weight.t(), out=flat)
    return out, flat


def second_order_grads(reference: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | None],
                       needs: Sequence[bool], g: torch.Tensor) -> list[torch.Tensor | None]:
    """A fused node's gradients when its backward runs with ``create_graph=True`` (grad mode is on inside a backward
    only then): those of the node's plain formula ``reference(*inputs)`` against ``g``, recorded, so that a second
    derivative (a gradient penalty, a Hessian-vector product) is autograd's. The hand-written backward gives the
    same first derivative, but its products on saved intermediates do not record how that derivative depends on
    the inputs. ``inputs`` are the node's own inputs as saved (so they carry their history); ``needs`` is
    ``ctx.needs_input_grad`` for them."""
    wanted = [t for t, n in zip(inputs, needs) if n and t is not None]
    if not wanted:
        return [None] * len(inputs)
    with torch.enable_grad():
        got = iter(torch.autograd.grad(reference(*inputs), wanted, g, create_graph=True, allow_unused=True))
    return [next(got) if n and t is not None else None for t, n in zip(inputs, needs)]


def keep_output(ctx: Any, out: torch.Tensor) -> None:
    """Let a custom autograd node read its own output ``out`` in its backward (to spare keeping a second copy of
    it), without making the backward fail when something after the layer changes ``out`` in place
    (``nn.ReLU(inplace=True)``, ``h += …``): saved with ``save_for_backward``, such a change raises in the
    backward, while a frozen ``nn.Linear``, which never reads its output, trains on. Kept here with its version
    counter (a detached alias shares it), the node learns of the change from :func:`kept_output` and computes
    what it needed another way."""
    ctx.kept_output = (out.detach(), out._version)


def kept_output(ctx: Any) -> torch.Tensor | None:
    """The output :func:`keep_output` kept, or None if it was changed in place since the forward."""
    out, version = ctx.kept_output
    return out if out._version == version else None


# ---------------------------------------------------------------------------------------------------
# Adapter layers
# ---------------------------------------------------------------------------------------------------
class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus named adapters; the base of every method's layer.

    Subclasses set ``adapter_layer_names`` (the ``nn.ModuleDict``/``nn.ParameterDict`` attributes holding
    trainable adapter tensors, keyed by adapter name) and ``other_param_names`` (plain per-adapter dicts such
    as ``r`` or ``scaling``), and implement ``update_layer``, ``adapter_forward`` and ``get_delta_weight``.

    Explained in: book/lora.ipynb
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    #: True when the stored base weight is (in, out) rather than (out, in) (GPT-2's Conv1D).
    fan_in_fan_out: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        # The adapters this layer holds, in the order they were added (a dict used as an ordered set). Kept by
        # update_layer (through _record_adapter) and delete_adapter; forward, merge, delete and save read it,
        # never a container: a method may keep one adapter in different containers than another (LoKr's full
        # lokr_w1 or its factors lokr_w1_a/lokr_w1_b).
        self._adapters: dict[str, None] = {}
        self._active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._warned_merged: set[str] = set()  # merged adapters a training forward has warned about
        self.disable_adapters = False
        inner = self.get_base_layer()
        self.fan_in_fan_out = isinstance(inner, Conv1D)
        try:
            self.in_features, self.out_features = layer_features(inner)
        except ValueError:  # a model-level adapter (e.g. around an attention block) has no single in/out
            self.in_features = self.out_features = None
        # values derived from the frozen base weight (e.g. DoRA's row norms); cleared when it is rewritten
        self._base_cache: dict[str, Any] = {}

    # ---- bookkeeping ----------------------------------------------------------------------------
    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        return self._base_weight()

    def _new_tensor_kwargs(self) -> dict[str, Any]:
        """device and dtype for a new adapter tensor (float32 on a half-precision base)."""
        w = self.weight
        return {"device": torch.device("meta") if _ON_META.get() else w.device, "dtype": adapter_dtype(w)}

    # ---- the base weight, whatever its storage ---------------------------------------------------
    def _base_weight(self) -> torch.Tensor:
        """The base layer's weight as a dense tensor, laid out as stored ((in, out) when fan_in_fan_out).

        A base that stores its weight in another format (a quantised layer) provides ``dequantize_weight()``.
        """
        base = self.get_base_layer()
        dequantize = getattr(base, "dequantize_weight", None)
        return dequantize() if callable(dequantize) else base.weight

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        """Store a new base weight (through the base's ``set_weight_()`` when it has one, e.g. re-quantising)."""
        base = self.get_base_layer()
        setter = getattr(base, "set_weight_", None)
        if callable(setter):
            setter(weight)
        else:
            base.weight.data = weight
        self._base_cache.clear()

    def _base_bias(self) -> torch.Tensor | None:
        """The bias merging folds into (:attr:`bias`'s data; None when there is none)."""
        bias = self.bias
        return bias.data if isinstance(bias, torch.Tensor) else None

    def _set_base_bias(self, bias: torch.Tensor) -> None:
        """Store a new base bias (a frozen parameter when the base had none)."""
        base = self.get_base_layer()
        if getattr(base, "bias", None) is None:
            base.bias = nn.Parameter(bias, requires_grad=False)
        else:
            base.bias.data = bias

    def _replace_base_layer(self, new_base: nn.Module) -> None:
        """Put ``new_base`` in place of the innermost base layer."""
        layer = self
        while isinstance(layer.base_layer, AdapterLayer):
            layer = layer.base_layer
        layer.base_layer = new_base
        self._base_cache.clear()

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def adapter_names(self) -> list[str]:
        """Adapters this layer holds (in the order they were added)."""
        return list(self._adapters)

    def _record_adapter(self, adapter_name: str) -> None:
        """Note that ``adapter_name`` now lives in this layer; a method's ``update_layer`` ends with this call."""
        self._adapters[adapter_name] = None

    def adapter_tensors(self, adapter_name: str) -> list[tuple[str, nn.Module | nn.Parameter]]:
        """(container name, entry) for every trainable container that holds ``adapter_name``."""
        out = []
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                out.append((attr, container[adapter_name]))
        return out

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def set_adapter(self, adapter_names: str | Sequence[str], trainable: bool = True) -> None:
        """Make ``adapter_names`` the active adapters; they train (unless ``trainable=False``), others freeze."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            for name, entry in container.items():
                entry.requires_grad_(trainable and name in names)
        self._active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        """Switch all adapters of this layer on or off (off: the layer computes ``base_layer(x)`` exactly)."""
        if not enabled and self.merged:
            self.unmerge()
        self.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove every tensor and setting of ``adapter_name`` from this layer."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weight; unmerge it before deleting")
        for attr in (*self.adapter_layer_names, *self.other_param_names):
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self._adapters.pop(adapter_name, None)
        if adapter_name in self._active_adapters:
            remaining = [n for n in self._active_adapters if n != adapter_name]
            if not remaining and self._adapters:  # peft's choice: the first remaining adapter by name
                remaining = [sorted(self._adapters)[0]]
            self.set_adapter(remaining)

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """Multiply the adapter's output by ``scale`` at run time (a weighted combination of adapters)."""
        raise NotImplementedError(f"{type(self).__name__} has no run-time scale")

    # ---- method hooks ---------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, **kwargs: Any) -> None:
        """Create the tensors of ``adapter_name`` in this layer; ends with ``self._record_adapter(adapter_name)``."""
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor, adapters: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base_layer(x)`` changed by ``adapters`` (each present in this layer), unmerged."""
        raise NotImplementedError

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW of one adapter, shaped like the base weight (for additive methods)."""
        raise NotImplementedError

    def adapter_delta(self, x: torch.Tensor, adapter_name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        """What ``adapter_name`` adds to ``base_layer(x)``. Generic: the adapter's output minus the base's; a method
        whose adapter is additive (LoRA: s·B A x) overrides it with the product alone."""
        return self.adapter_forward(x, [adapter_name], *args, **kwargs) - self.base_layer(x, *args, **kwargs)

    def weighted_forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor], *args: Any,
                         **kwargs: Any) -> torch.Tensor:
        """``base(x) + Σ_a w_a · Δ_a(x)`` with per-token weights ``w_a`` (broadcast against the output), for the
        adapters of ``weights`` this layer holds (a context set by :func:`peftlab.tuners.routing.token_weights`)."""
        result = self.base_layer(x, *args, **kwargs)
        own = self._adapters
        for name, w in weights.items():
            if name in own:
                delta = self.adapter_delta(x, name, *args, **kwargs)
                result = result + (delta * w.to(delta.dtype)).to(result.dtype)
        return result

    def merged_weights(self, adapter_name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """(W', b') with the adapter folded in. Additive methods: W' = W + ΔW. Computed in float32."""
        delta = self.get_delta_weight(adapter_name)
        return (weight.float() + delta.float()).to(weight.dtype), bias

    def unmerged_weights(self, adapter_name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """Inverse of :meth:`merged_weights`: W = W' − ΔW."""
        delta = self.get_delta_weight(adapter_name)
        return (weight.float() - delta.float()).to(weight.dtype), bias

    # ---- merge and unmerge ----------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Fold adapters into the base weight (in place); they stay in the layer so ``unmerge`` can undo it.

        ``safe_merge`` computes the result on a copy first and refuses it if it holds NaN or inf. A merge the layer
        refuses (:meth:`check_mergeable`) raises before anything changes.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names takes a list of adapter names, not the string {adapter_names!r}")
        self.check_mergeable(names)
        if self.merged:  # peft's warnings when merging again
            more = [n for n in names if n not in self.merged_adapters]
            if more:
                warnings.warn(f"Already following adapters were merged {','.join(self.merged_adapters)}. You are now "
                              f"additionally merging {','.join(more)}.", UserWarning, stacklevel=3)
            else:
                warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=3)
        for name in names:
            if name in self.merged_adapters or name not in self.adapter_names:
                continue
            with torch.no_grad():
                new_w, new_b = self.merged_weights(name, self._base_weight().data, self._base_bias())
            if safe_merge:
                self._refuse_non_finite(name, new_w, new_b)
            self._set_base_weight(new_w)
            if new_b is not None:
                self._set_base_bias(new_b)
            self.merged_adapters.append(name)

    def check_mergeable(self, adapter_names: Sequence[str] | None = None) -> None:
        """Raise if this layer cannot merge ``adapter_names`` at all (a method hook, reading no weights). The refusal
        lives here, not in :meth:`merged_weights` (the math): :meth:`merge` calls it before changing anything, and
        the model calls it on every layer before merging any (:meth:`BaseTuner._refuse_unmergeable`), so a refusal
        leaves the model as it was. Default: every adapter merges."""

    def check_merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Raise if merging ``adapter_names`` would put NaN or inf into the base weights; changes nothing."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        bias = self._base_bias()
        for name in names:
            if name not in self.merged_adapters and name in self.adapter_names:
                with torch.no_grad():
                    self._refuse_non_finite(name, *self.merged_weights(name, self._base_weight().data, bias))

    def _refuse_non_finite(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(
                f"merging adapter {name!r} would put NaN or inf into {type(self.get_base_layer()).__name__} "
                "weights; the base was left unchanged. Check the adapter for diverged values, or keep it unmerged"
            )

    def unmerge(self) -> None:
        """Take merged adapters back out of the base weight, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                new_w, new_b = self.unmerged_weights(name, self._base_weight().data, self._base_bias())
            self._set_base_weight(new_w)
            if new_b is not None:
                self._set_base_bias(new_b)

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        weighting = _TOKEN_WEIGHTS.get()
        if weighting is not None:
            weights = weighting.weights_for(self)
            if weights is not None:
                if self.merged:
                    raise ValueError("per-token adapter weights need unmerged adapters; call unmerge_adapter() first")
                return self.weighted_forward(x, weights, *args, **kwargs)
        routing = _ROUTING.get()
        if routing is not None:
            if self.merged:
                raise ValueError(
                    "mixed-adapter batches need unmerged adapters; call unmerge_adapter() first"
                )
            return self.mixed_batch_forward(x, routing, *args, **kwargs)
        own = self._adapters
        active = self._active_adapters
        if self.merged_adapters:  # the merged ones are in the base weight; the active others act on top
            merged = self.merged_adapters
            adapters = [a for a in active if a in own and a not in merged]
            if self.training and torch.is_grad_enabled():
                self._warn_if_training_merged([a for a in active if a in merged])
        elif len(active) == 1:  # the common case, without building a list
            adapters = active if active[0] in own else []
        else:
            adapters = [a for a in active if a in own]
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        return self.adapter_forward(x, adapters, *args, **kwargs)

    def _warn_if_training_merged(self, names: Sequence[str]) -> None:
        """A merged adapter is a constant inside the base weight: its tensors get no gradient. Say so when one that
        is set to train runs a training forward (once per layer and adapter)."""
        for name in names:
            trains = any(p.requires_grad for _, entry in self.adapter_tensors(name)
                         for p in ([entry] if isinstance(entry, nn.Parameter) else entry.parameters()))
            if trains and name not in self._warned_merged:
                self._warned_merged.add(name)
                warnings.warn(f"adapter {name!r} is merged into the base weight of {type(self.get_base_layer()).__name__}, "
                              "so its tensors receive no gradient in this training step; call unmerge_adapter() "
                              "before training it", UserWarning, stacklevel=3)

    def mixed_batch_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row ``i`` of ``x`` through the adapter named for it (generic: one ``adapter_forward`` per group)."""
        result = self.base_layer(x, *args, **kwargs)
        own = self._adapters
        for name, rows in routing.groups(x.shape[0], x.device).items():
            if name == BASE_ADAPTER or name not in own:
                continue
            part = self.adapter_forward(x.index_select(0, rows), [name], *args, **kwargs)
            result = result.index_copy(0, rows, part.to(result.dtype))
        return result

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self._active_adapters}, merged={self.merged_adapters}"

    #: what ``repr`` puts before the class name (peft prints ``lora.Linear(...)``); default: the method's package
    repr_prefix: ClassVar[str | None] = None

    def __repr__(self) -> str:
        prefix = self.repr_prefix
        if prefix is None:
            parts = type(self).__module__.split(".")
            prefix = parts[parts.index("tuners") + 1] if "tuners" in parts[:-1] else ""
        rep = super().__repr__()
        return f"{prefix}.{rep}" if prefix else rep


# ---------------------------------------------------------------------------------------------------
# The tuner: injection into a model and whole-model operations
# ---------------------------------------------------------------------------------------------------
def _is_quantized(module: nn.Module) -> bool:
    """A base layer that stores its weight in another format: it can dequantise itself into a dense layer."""
    return callable(getattr(module, "dequantize_module", None))


def get_submodule_parent(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    parent_name, _, child = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, getattr(parent, child), child


def step_hooks(model: nn.Module) -> list[Any]:
    """``on_optimizer_step`` of every tuner inside ``model`` whose method overrides it (AdaLoRA): a
    :class:`~peftlab.PeftModel`'s ``base_model``, or a tuner kept by the transformers-style API.

    Explained in: book/adalora.ipynb
    """
    tuners = [m for m in model.modules() if isinstance(m, BaseTuner)]
    kept = getattr(model, "__dict__", {}).get("_peftlab_tuner")  # peftlab.integrations.transformers
    if isinstance(kept, BaseTuner) and kept not in tuners:
        tuners.append(kept)
    return [t.on_optimizer_step for t in tuners if type(t).on_optimizer_step is not BaseTuner.on_optimizer_step]


# Task heads the task models add to modules_to_save; a model may have one of them and not the other.
OPTIONAL_MODULES_TO_SAVE = ("classifier", "score", "qa_outputs")


class BaseTuner(nn.Module):
    """Injects one method's adapter layers into ``model`` and operates on all of them at once.

    The wrapped model is ``self.model``; inside a :class:`~peftlab.PeftModel` this gives PEFT's state-dict
    names ``base_model.model.<module path>...``.

    Explained in: book/lora.ipynb
    """

    #: the registry entry (peftlab.registry.MethodSpec), set by ``register_method``
    method: ClassVar[Any] = None
    #: default ``target_modules`` per transformers ``model_type`` (used when a config leaves them None)
    default_target_modules: ClassVar[dict[str, list[str]]] = {}
    #: (module types, layer class) pairs, tried in order: the first whose types match wraps a target
    layer_dispatch: ClassVar[tuple[tuple[tuple[type, ...], type[AdapterLayer]], ...]] = ()

    #: the start of the method's adapter tensor names (``"lora_"``), from its registry entry (peft's ``prefix``)
    prefix: ClassVar[str] = ""
    #: after ``delete_adapter``, put back the plain module of a layer no adapter uses any more (peft does for
    #: adaption prompts); False keeps the emptied layer, which computes its base layer (peft's LoRA & co)
    unwrap_emptied_layers: ClassVar[bool] = False

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, Any] = {}
        self.active_adapter: str | list[str] = adapter_name
        config = peft_config if not isinstance(peft_config, dict) else peft_config[adapter_name]
        self.inject_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ---- forwarding -----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- method hooks: which layers, with which arguments ---------------------------------------
    @property
    def method_name(self) -> str:
        return self.method.peft_type if self.method is not None else type(self).__name__

    def layer_class_for(self, target: nn.Module) -> type[AdapterLayer] | None:
        """The layer class that wraps ``target`` (from ``layer_dispatch``), or None if the method cannot."""
        for types, layer_cls in self.layer_dispatch:
            if isinstance(target, types):
                return layer_cls
        return None

    def check_target(self, config: Any, target: nn.Module, key: str) -> None:
        """Raise a clear error when ``target`` cannot carry this method (called before anything changes)."""
        if self.layer_class_for(target) is None:
            kinds = ", ".join(dict.fromkeys(t.__name__ for types, _ in self.layer_dispatch for t in types))
            raise ValueError(
                f"target module {key!r} is a {type(target).__name__}; {self.method_name} supports {kinds}. Narrow "
                "target_modules (or add it to exclude_modules)"
            )
        self.check_layer(config, target, key)

    def check_layer(self, config: Any, target: nn.Module, key: str) -> None:
        """Method-specific checks of a supported target (shapes, options that need a layer kind)."""

    def layer_kwargs(self, config: Any, key: str, target: nn.Module) -> dict[str, Any]:
        """The arguments of ``update_layer`` for the module named ``key`` (after rank/alpha patterns)."""
        raise NotImplementedError

    def create_new_module(self, config: Any, adapter_name: str, target: nn.Module, key: str) -> AdapterLayer:
        """Wrap ``target`` with the layer class ``layer_dispatch`` names for it."""
        self._fix_fan_in_fan_out(config, target, key)
        return self.layer_class_for(target)(target, adapter_name, **self.layer_kwargs(config, key, target))

    def update_existing(self, config: Any, adapter_name: str, target: AdapterLayer, key: str) -> None:
        """Add ``adapter_name`` to a layer that already carries adapters of this method."""
        if not isinstance(target, tuple(cls for _, cls in self.layer_dispatch)):
            raise ValueError(f"{key} already carries a {type(target).__name__} adapter; a {self.method_name} "
                             "adapter cannot be added to it")
        target.update_layer(adapter_name, **self.layer_kwargs(config, key, target.get_base_layer()))

    @staticmethod
    def _fix_fan_in_fan_out(config: Any, target: nn.Module, key: str) -> None:
        """GPT-2's Conv1D stores W as (in, out): the config's fan_in_fan_out must say so (peft's fix-up)."""
        if "fan_in_fan_out" in getattr(config, "ABSENT_FIELDS", ()) or not hasattr(config, "fan_in_fan_out"):
            return
        if isinstance(target, Conv1D) and not config.fan_in_fan_out:
            warnings.warn(f"{key} is a Conv1D (weight stored in × out): setting fan_in_fan_out=True",
                          UserWarning, stacklevel=5)
            config.fan_in_fan_out = True
        elif isinstance(target, nn.Linear) and config.fan_in_fan_out:
            warnings.warn(f"{key} is an nn.Linear (weight stored out × in): setting fan_in_fan_out=False",
                          UserWarning, stacklevel=5)
            config.fan_in_fan_out = False

    def is_target(self, config: Any, key: str) -> bool:
        """Whether the module named ``key`` matches ``config``'s targets (default: peft's ``target_modules``
        rules in :mod:`peftlab.tuners.matching`). A method whose config names its targets otherwise overrides
        it: LLaMA-Adapter's ``target_modules="self_attn"`` is a module-name suffix, not a regex."""
        return matching.check_target_module_exists(config, key)

    def filter_targets(self, config: Any, keys: list[str]) -> list[str]:
        """The matched module names this method adapts (default: all; LLaMA-Adapter keeps the top layers)."""
        return keys

    # ---- method hook: per training step --------------------------------------------------------
    def on_optimizer_step(self, global_step: int) -> None:
        """Work a method does after every optimizer step, before the gradients are cleared (AdaLoRA's rank
        allocation). :func:`step_hooks` finds the tuners that override it; the lab's training loop and
        ``peftlab.PeftlabCallback`` (a ``transformers.TrainerCallback``) call them. Default: nothing."""

    # ---- method hooks: files --------------------------------------------------------------------
    @classmethod
    def state_dict_for_save(cls, model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str,
                            config: Any) -> dict[str, torch.Tensor]:
        """The adapter's tensors (on-disk names) as the file should hold them: a method renames, cuts tensors
        to a kept rank or records what it did in ``config`` here (AdaLoRA). Default: unchanged."""
        return state

    @classmethod
    def state_dict_for_load(cls, model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str,
                            config: Any) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors ready to be copied in: old names mapped to new ones, the model's layers
        resized to a saved rank (AdaLoRA), tensors the method never loads dropped. Default: unchanged."""
        return state

    def save_companions(self, folder: str, adapter_name: str, safe_serialization: bool) -> None:
        """Write files an adapter needs besides its own tensors and config into ``folder`` (X-LoRA: its
        experts, one LoRA folder each). Default: nothing."""

    @classmethod
    def prepare_load(cls, config: Any, folder: str, kwargs: dict[str, Any]) -> None:
        """Before ``from_pretrained`` builds the tuner: note in ``config`` what it needs from the saved folder or
        the caller's keyword arguments (X-LoRA: where its experts are). Default: nothing."""

    @classmethod
    def convert_for_save(cls, state: dict[str, torch.Tensor], config: Any, initial_dir: Any,
                         ) -> tuple[dict[str, torch.Tensor], Any]:
        """``save_pretrained(path_initial_model_for_weight_conversion=...)``: a method whose initialisation
        changed the base weight writes an adapter for the unchanged base (LoRA's PiSSA/OLoRA)."""
        raise ValueError(f"path_initial_model_for_weight_conversion converts LoRA adapters initialised with PiSSA or "
                         f"OLoRA; a {cls.method.peft_type if cls.method else cls.__name__} adapter has nothing to "
                         "convert. Save without it")

    # ---- merging --------------------------------------------------------------------------------
    def _require_merge(self, what: str) -> None:
        if self.method is not None and not self.method.supports_merge:
            raise ValueError(
                f"{what}: {self.method_name} adapters have no weight form to merge into the base model; keep the "
                "adapter unmerged (disable_adapter() gives the base model, unload() removes the adapter layers)"
            )

    # ---- injection ------------------------------------------------------------------------------
    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):
                yield name, module

    def _candidate_names(self) -> list[str]:
        """Names of modules that may be targets: everything except the insides of adapter layers and
        ``modules_to_save`` wrappers (an adapter layer itself is a candidate: it takes more adapters)."""
        inner: set[str] = set()
        for name, module in self.model.named_modules():
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                inner.update(f"{name}.{sub}" if name else sub for sub, _ in module.named_modules() if sub)
        return [n for n, _ in self.model.named_modules() if n and n not in inner]

    def _prepare_config(self, config: Any) -> Any:
        if getattr(config, "target_modules", "unset") is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            if model_type not in self.default_target_modules:
                raise ValueError(
                    f"target_modules=None, and {self.method_name} has no default for model_type={model_type!r}; name "
                    "the modules to adapt, e.g. target_modules=['q_proj', 'v_proj'] or target_modules='all-linear'"
                )
            config.target_modules = list(self.default_target_modules[model_type])
        targets = getattr(config, "target_modules", None)
        if isinstance(targets, str) and targets.lower() == matching.ALL_LINEAR:
            candidates = set(self._candidate_names())
            linear = {n for n in matching.linear_module_names(self.model, config.task_type) if n in candidates}
            # layers already wrapped by an earlier adapter are linear layers too
            head = matching.output_head_names(self.model, config.task_type)
            linear |= {n for n, m in self.adapter_layers() if n in candidates and n not in head
                       and isinstance(m.get_base_layer(), matching.LINEAR_TYPES)}
            config.target_modules = sorted(linear)
            if not config.target_modules:
                raise ValueError("target_modules='all-linear' found no nn.Linear or Conv1D layer in this model")
        return config

    def inject_adapter(self, adapter_name: str, config: Any, low_cpu_mem_usage: bool = False,
                       state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Wrap every target module with this method's layer (or add ``adapter_name`` to an existing one).

        Validates first: when nothing matches, or a target cannot carry the method, the model is unchanged.
        ``low_cpu_mem_usage=True`` creates the adapter's tensors on the meta device (no memory, no
        initialisation): loading a checkpoint then puts the real tensors in place (peft's option).
        ``state_dict`` (a checkpoint's tensors, on-disk names): adapt exactly the modules it has tensors for,
        whatever ``target_modules`` says (peft's option for checkpoints without a usable config).
        """
        with adapters_on_meta(low_cpu_mem_usage):
            self._inject_adapter(adapter_name, config, self._targets_in(state_dict))

    def _targets_in(self, state_dict: dict[str, torch.Tensor] | None) -> set[str] | None:
        """Module names that hold this method's tensors in ``state_dict`` (None when no state_dict)."""
        if state_dict is None:
            return None
        marker = f".{self.prefix}" if self.prefix else None
        names = set()
        for key in state_dict:
            key = key.removeprefix("base_model.model.")
            if marker and marker in f".{key}":
                names.add(f".{key}".split(marker, 1)[0][1:])
        return names

    def _inject_adapter(self, adapter_name: str, config: Any, only: set[str] | None = None) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; choose another adapter_name")
        if not adapter_name or "." in adapter_name or adapter_name == BASE_ADAPTER:
            raise ValueError(
                f"adapter_name={adapter_name!r} is not usable: it must be non-empty, contain no '.', and not be "
                f"{BASE_ADAPTER!r}"
            )
        if hasattr(nn.ModuleDict(), adapter_name) or hasattr(nn.ParameterDict(), adapter_name):
            # adapters are keys of ModuleDicts, which refuse names of their own attributes
            raise ValueError(
                f"adapter_name={adapter_name!r} is the name of a torch.nn.Module attribute or method and cannot "
                f"key an adapter; choose another name, e.g. {adapter_name + '_adapter'!r}"
            )
        config = self._prepare_config(config)
        names = self._candidate_names()
        if only is not None:  # the modules a state_dict has tensors for
            keys = [k for k in names if k in only]
        else:
            keys = self.filter_targets(config, [k for k in names if self.is_target(config, k)])
        wrapper_keys = {k for k, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
        wrapped = [k for k in keys if k in wrapper_keys]
        if wrapped:  # peft refuses these too; skipping them silently would drop a requested target
            raise ValueError(
                f"target_modules={config.target_modules!r} matches {wrapped}, which another adapter trains whole "
                "as modules_to_save; a module cannot also carry an adapter. Leave it out of target_modules (or "
                "add it to exclude_modules)"
            )
        if not keys:
            spec = config.target_modules
            hint = matching.near_misses(spec, names)
            extra = ""
            if getattr(config, "layers_to_transform", None) is not None:
                extra = f" with layers_to_transform={config.layers_to_transform}"
            raise ValueError(
                f"target_modules={spec!r}{extra} matched no module of {type(self.model).__name__}; "
                f"modules that look close: {hint}. A list entry matches a full name or a name's last dotted "
                "parts; a string is a regex that must match the whole name"
            )
        own_layers = tuple(cls for _, cls in self.layer_dispatch)
        for key in keys:
            _, target, _ = get_submodule_parent(self.model, key)
            if not isinstance(target, AdapterLayer):
                self.check_target(config, target, key)
            elif isinstance(target, own_layers):  # one more adapter in a wrapped layer: the same checks
                self.check_layer(config, target.get_base_layer(), key)
            else:
                raise ValueError(f"{key} already carries a {type(target).__name__} adapter; a {self.method_name} "
                                 "adapter cannot be added to it (leave it out of target_modules)")
        for m in config.modules_to_save or ():  # also before anything changes
            self._modules_to_save_keys(m, required=m not in OPTIONAL_MODULES_TO_SAVE)
        for key in keys:
            parent, target, child = get_submodule_parent(self.model, key)
            if isinstance(target, AdapterLayer):
                self.update_existing(config, adapter_name, target, key)
            else:
                new = self.create_new_module(config, adapter_name, target, key)
                setattr(parent, child, new)
        for m in config.modules_to_save or ():
            self._wrap_modules_to_save(m, adapter_name, required=m not in OPTIONAL_MODULES_TO_SAVE)
        self.peft_config[adapter_name] = config
        self._warn_tied_weights()
        # A new adapter is active only when it is the first one (peft's behaviour).
        if len(self.peft_config) == 1:
            self.set_adapter(adapter_name)
        else:
            self._mark_trainable()

    def _warn_tied_weights(self) -> None:
        """peft's warning when a transformers model ties its input and output embeddings and one of them is
        adapted or trained whole (modules_to_save): the two copies stop being one weight."""
        config = getattr(self.model, "config", None)
        if not getattr(config, "tie_word_embeddings", False) or not hasattr(self.model, "get_input_embeddings"):
            return
        try:
            tied = [self.model.get_input_embeddings(), self.model.get_output_embeddings()]
        except (AttributeError, NotImplementedError):
            return
        tied = [m for m in tied if m is not None]
        if any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in tied):
            warnings.warn("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but "
                          "`ensure_weight_tying` is not set to True. This can lead to complications, for example when "
                          "merging the adapter or converting your model to formats other than safetensors.",
                          UserWarning, stacklevel=3)

    def _modules_to_save_keys(self, name: str, required: bool = True) -> list[str]:
        """Full names of the modules a ``modules_to_save`` entry means (exact name or dotted suffix)."""
        keys = [key for key, _ in self.model.named_modules()
                if key and (key == name or key.endswith("." + name))
                and not any(p in key.split(".") for p in ("modules_to_save", "original_module"))]
        if not keys and required:
            names = [n for n, _ in self.model.named_modules() if n]
            raise ValueError(
                f"modules_to_save entry {name!r} matched no module; modules that look close: "
                f"{matching.near_misses([name], names)}"
            )
        return keys

    def _wrap_modules_to_save(self, name: str, adapter_name: str, required: bool = True) -> None:
        for key in self._modules_to_save_keys(name, required):
            parent, module, child = get_submodule_parent(self.model, key)
            if isinstance(module, ModulesToSaveWrapper):
                module.add(adapter_name)
            else:
                setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))

    # ---- adapters -------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        a = self.active_adapter
        return [a] if isinstance(a, str) else list(a)

    def _mark_trainable(self) -> None:
        """Freeze everything, then unfreeze the active adapters (unless their config says inference_mode)
        and the biases that ``bias`` asks for."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        active = self.active_adapters
        trainable = not any(self.peft_config[a].inference_mode for a in active if a in self.peft_config)
        for _, layer in self.adapter_layers():
            layer.set_adapter(active, trainable=trainable)  # a layer skips names it does not hold
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.set_adapter([a for a in active if a in module.modules_to_save], trainable=trainable)
        if not trainable:
            return
        for a in active:
            bias = getattr(self.peft_config.get(a), "bias", "none")
            if bias == "all":
                for n, p in self.model.named_parameters():
                    is_bias = n == "bias" or n.endswith(".bias")  # peft's rule (not in_proj_bias)
                    if is_bias and ".modules_to_save." not in f".{n}" and "original_module" not in n:
                        p.requires_grad_(True)
            elif bias.endswith("_only"):  # the method's own mode ("lora_only", "oft_only", ...): adapted layers
                for _, layer in self.adapter_layers():
                    base_bias = getattr(layer.get_base_layer(), "bias", None)  # an Embedding has none
                    if a in layer.adapter_names and isinstance(base_bias, torch.Tensor):
                        base_bias.requires_grad_(True)

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate one adapter (or several: their effects add up) in every layer; they train unless
        ``inference_mode=True`` (or their config says inference_mode)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"no adapter named {n!r}; adapters: {sorted(self.peft_config)}")
        for _, layer in self.adapter_layers():
            if layer.merged:
                warnings.warn("adapters are merged; unmerging them before switching", UserWarning, stacklevel=2)
                layer.unmerge()
        self.active_adapter = names[0] if isinstance(adapter_name, str) else names
        self._mark_trainable()
        if inference_mode:
            self.set_requires_grad(names, requires_grad=False)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters' tensors (and their modules_to_save copies) on or off, leaving
        which adapters are active unchanged (peft's ``set_requires_grad``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = sorted(set(names) - set(self.peft_config))
        if unknown:
            raise ValueError(f"no adapter named {unknown[0]!r}; adapters: {sorted(self.peft_config)}")
        for _, layer in self.adapter_layers():
            for name in names:
                for _, entry in layer.adapter_tensors(name):
                    entry.requires_grad_(requires_grad)
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                for name in names:
                    if name in module.modules_to_save:
                        module.modules_to_save[name].requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` from every layer and wrapper, and its config."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        merged = [k for k, layer in self.adapter_layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(
                f"adapter {adapter_name!r} is merged into {len(merged)} layers (e.g. {merged[0]}); call "
                "unmerge_adapter() before deleting it"
            )
        del self.peft_config[adapter_name]
        # As in peft, the layers stay wrapped (with no adapter left a layer computes its base layer); unload()
        # gives the plain model back.
        was_active = adapter_name in self.active_adapters
        for key, layer in list(self.adapter_layers())[::-1]:
            layer.delete_adapter(adapter_name)
            if self.unwrap_emptied_layers and not layer.adapter_names:
                parent, _, child = get_submodule_parent(self.model, key)
                setattr(parent, child, layer.base_layer)
        for key, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                module.delete(adapter_name)
                if not module.modules_to_save:
                    parent, _, child = get_submodule_parent(self.model, key)
                    setattr(parent, child, module.original_module)
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [sorted(self.peft_config)[0]]
            if was_active:
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                              f"{remaining[0]}.", UserWarning, stacklevel=2)
        if remaining:
            self.active_adapter = remaining[0] if len(remaining) == 1 else remaining
            self.set_adapter(self.active_adapter)
        else:
            self.active_adapter = []
            for _, layer in self.adapter_layers():
                layer.set_adapter([])

    def remove_adapter_entirely(self, adapter_name: str) -> None:
        """Undo adding ``adapter_name`` (a load that failed): delete it without the active-adapter warning and put
        back the plain layers it alone had wrapped, so the model is as before the add."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.delete_adapter(adapter_name)
        for key, layer in list(self.adapter_layers())[::-1]:
            if not layer.adapter_names:
                parent, _, child = get_submodule_parent(self.model, key)
                setattr(parent, child, layer.base_layer)

    def enable_adapter_layers(self) -> None:
        for _, layer in self.adapter_layers():
            layer.enable_adapters(True)
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        for a in self.active_adapters:
            if getattr(self.peft_config.get(a), "bias", "none") != "none":
                warnings.warn(
                    f"adapter {a!r} trains biases (bias={self.peft_config[a].bias!r}); disabling adapters does not "
                    "undo those changes, so outputs differ from the base model",
                    UserWarning, stacklevel=2,
                )
        for _, layer in self.adapter_layers():
            layer.enable_adapters(False)
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.enable_adapters(False)

    # ---- merge and unload -----------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the (active or named) adapters into the base weights, keeping them for ``unmerge_adapter``."""
        self._require_merge("merge_adapter()")
        for n in adapter_names or ():
            if n not in self.peft_config:
                raise ValueError(f"no adapter named {n!r}; adapters: {sorted(self.peft_config)}")
        self._refuse_unmergeable(adapter_names)
        if safe_merge:  # check every layer before changing any, so a refusal leaves all weights as they were
            for _, layer in self.adapter_layers():
                layer.check_merge(adapter_names)
        if any(_is_quantized(layer.get_base_layer()) for _, layer in self.adapter_layers()):
            warnings.warn(
                "merging into a quantised base layer re-quantises W + ΔW, so the merged model differs from the "
                "unmerged one by the quantisation error (and unmerging does not restore the base exactly); "
                "merge_and_unload() merges exactly into a dequantised nn.Linear", UserWarning, stacklevel=2,
            )
        for _, layer in self.adapter_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def _refuse_unmergeable(self, adapter_names: Sequence[str] | None) -> None:
        """Every layer's :meth:`AdapterLayer.check_mergeable` before any layer changes, for ``merge_adapter`` and
        ``merge_and_unload``: it reads no weights, so a refusal comes before any 4-bit base is dequantised and leaves
        the whole model as it was."""
        for _, layer in self.adapter_layers():
            layer.check_mergeable(adapter_names)

    def _unload(self, merge: bool, progressbar: bool = False, safe_merge: bool = False,
                adapter_names: Sequence[str] | None = None, requantize: bool = False) -> nn.Module:
        layers = list(self.adapter_layers())
        quantized: dict[int, nn.Module] = {}  # id(layer) -> its quantised base, merged into a dense copy
        if merge:  # merge everything first, so a refusal or a safe_merge failure leaves the model as it was
            self._refuse_unmergeable(adapter_names)
            for _, layer in layers:
                base = layer.get_base_layer()
                wanted = layer.active_adapters if adapter_names is None else adapter_names
                merging = set(wanted) & set(layer.adapter_names)
                if _is_quantized(base) and merging and not layer.merged:
                    quantized[id(layer)] = base
                    layer._replace_base_layer(base.dequantize_module())
            done: list[AdapterLayer] = []
            try:
                if safe_merge:
                    for _, layer in layers:
                        layer.check_merge(adapter_names)
                for _, layer in layers:
                    layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                    done.append(layer)
            except ValueError:
                for layer in done:
                    layer.unmerge()
                for _, layer in layers:
                    if id(layer) in quantized:
                        layer._replace_base_layer(quantized[id(layer)])
                raise
        # innermost first: a layer may hold another one inside its base (LoRA on nn.MultiheadAttention's out_proj)
        for key, layer in tqdm(layers[::-1], disable=not progressbar,
                               desc="Unloading" + (" and merging" if merge else "")):
            parent, _, child = get_submodule_parent(self.model, key)
            new = layer.get_base_layer()
            if requantize and id(layer) in quantized:
                new = quantized[id(layer)].requantize(new)
            setattr(parent, child, new)
        for key, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent, _, child = get_submodule_parent(self.model, key)
                setattr(parent, child, module.active_module() if merge else module.original_module)
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None, requantize: bool = False) -> nn.Module:
        """Merge the adapters into the base weights and return the plain model, without adapter layers.

        A quantised base layer (e.g. :class:`~peftlab.quantization.Linear4bit`) is dequantised and merged
        exactly, W' = deq(Q) + ΔW, into an ``nn.Linear`` in its compute dtype. ``requantize=True`` stores
        quant(W') instead: 4-bit memory again, at the price of a fresh quantisation error on W' (for NF4 about
        9 % of each weight's norm on Gaussian weights, larger than most adapters' ΔW).
        """
        self._require_merge("merge_and_unload()")
        self._warn_tied_weights()
        return self._unload(True, progressbar, safe_merge, adapter_names, requantize)

    def unload(self) -> nn.Module:
        """Return the plain base model with every adapter layer removed (nothing merged)."""
        return self._unload(False)
