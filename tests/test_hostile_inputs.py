"""Hostile and broken inputs: fuzzed configs, unknown keys, pickles, corrupt files, adapters for another model.

* Every config class in the method registry (``peftlab.registry.methods()``: a new method registers one and is
  fuzzed here with no change, or with one ``MINIMAL_KWARGS`` entry when a field is required): hypothesis sets up to
  three fields to hostile or plausible values. The config either refuses with
  a ValueError/TypeError that names a config field, or it is valid: then it round-trips through
  ``adapter_config.json``, and ``get_peft_model`` on a tiny Llama either refuses the same way or gives a model
  whose outputs are finite (never an exception from deep inside torch, never NaN).
* Unknown keys in ``adapter_config.json`` load with a warning that names each of them.
* Loading never unpickles: ``.bin`` files are refused unless ``allow_pickle=True``, and then read with
  ``torch.load(weights_only=True)``, so a pickle that would run code is refused and runs nothing.
* Truncated or corrupt safetensors, an adapter made for another base model, tensors of a non-float dtype:
  a ValueError saying so, and the model untouched.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peftlab
from peftlab import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftlab import registry
from peftlab.lab.models import example_inputs, tiny_model

ROOT = Path(__file__).resolve().parent.parent
CONFIG_CLASSES = sorted({m.config_class for m in registry.methods()}, key=lambda c: c.__name__)
SETTINGS = settings(max_examples=int(os.environ.get("PEFTLAB_FUZZ_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# the base fields every config shares are bookkeeping, not method settings
SHARED = {f.name for f in dataclasses.fields(PeftConfig)}
MODULE_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
                "embed_tokens", "layers", "nope", "", ".*", "q_proj$", "model.layers.0.self_attn.q_proj"]
HOSTILE = [None, True, False, 0, -1, 1, 3, 2**40, -(2**40), 0.5, -0.5, 1.5, float("nan"), float("inf"),
           float("-inf"), "", "abc", "q_proj", "gaussian", "pissa", "ZERO", "\x00", "é" * 3, [], ["q_proj"],
           ["nope"], [1, 2], [-1], [None], {}, {"q_proj": 2}, {"q_proj": -3}, {"q_proj": "x"}, {"": 0.5},
           ("v_proj",), {"loftq_bits": 8}, {"loftq_bits": 4, "loftq_iter": 0}]


def _plausible(f: dataclasses.Field) -> st.SearchStrategy:
    """Values of the field's own kind, near its default."""
    default = f.default if f.default is not dataclasses.MISSING else None
    kind = type(default)
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(-2, 70)
    if kind is float:
        return st.floats(-2.0, 70.0, allow_nan=False)
    if kind is str:
        return st.text("abcdefgq_proj.*$", max_size=8)
    return st.one_of(st.none(), st.lists(st.sampled_from(MODULE_NAMES), max_size=3),
                     st.dictionaries(st.sampled_from(MODULE_NAMES), st.integers(-2, 16), max_size=2))


def _value(f: dataclasses.Field) -> st.SearchStrategy:
    return st.one_of(st.sampled_from(HOSTILE), _plausible(f))


def _names_a_field(message: str, cls: type) -> bool:
    return any(f.name in message for f in dataclasses.fields(cls))


def _fuzz_kwargs(cls: type) -> st.SearchStrategy:
    fields = [f for f in dataclasses.fields(cls) if f.name not in SHARED]
    return st.lists(st.sampled_from(fields), max_size=3, unique_by=lambda f: f.name).flatmap(
        lambda chosen: st.fixed_dictionaries({f.name: _value(f) for f in chosen}))


# a valid config for the classes whose required fields have no default (peft leaves them None)
MINIMAL_KWARGS = {"AdaptionPromptConfig": {"adapter_len": 2, "adapter_layers": 1, "target_modules": "self_attn"},
                  "AdaLoraConfig": {"total_step": 100}}
_TINY = {}


def _tiny():
    if "llama" not in _TINY:
        _TINY["llama"] = (tiny_model("llama"), example_inputs("llama"))
    import copy

    model, inputs = _TINY["llama"]
    return copy.deepcopy(model), inputs


FUZZ_LOG: dict[str, dict[str, int]] = {}


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_fuzzed_configs_refuse_clearly_or_work(cls: type, tmp_path_factory: pytest.TempPathFactory) -> None:
    log = FUZZ_LOG.setdefault(cls.__name__, {"tried": 0, "refused at config": 0, "refused at model": 0, "built": 0})

    @SETTINGS
    @given(kwargs=_fuzz_kwargs(cls))
    def check(kwargs: dict) -> None:
        log["tried"] += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                config = cls(**{**MINIMAL_KWARGS.get(cls.__name__, {}), **kwargs})
            except (ValueError, TypeError) as err:
                assert _names_a_field(str(err), cls), f"{cls.__name__}({kwargs!r}) refused without naming a field: {err}"
                log["refused at config"] += 1
                return
            # valid: the file round-trips
            folder = tmp_path_factory.mktemp("cfg")
            config.save_pretrained(folder)
            back = PeftConfig.from_pretrained(folder)
            want = {**config.to_dict(), "peft_version": back.peft_version}
            assert type(back) is cls and back.to_dict() == want, kwargs
            assert json.loads((folder / "adapter_config.json").read_text()) == back.to_dict()
            # and builds a working model, or refuses clearly
            model, inputs = _tiny()
            try:
                peft_model = get_peft_model(model, config)
            except (ValueError, TypeError) as err:
                assert _names_a_field(str(err), cls), f"get_peft_model with {kwargs!r}: {err}"
                log["refused at model"] += 1
                return
            with torch.no_grad():
                out = peft_model(**inputs).logits
            assert torch.isfinite(out).all(), f"{cls.__name__}({kwargs!r}) gives a model with non-finite outputs"
            log["built"] += 1

    check()
    print(f"{cls.__name__}: {log}")


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
@SETTINGS
@given(extra=st.dictionaries(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
                             st.one_of(st.none(), st.integers(), st.text(max_size=5), st.booleans()),
                             min_size=1, max_size=4))
def test_unknown_keys_load_with_a_warning_naming_them(cls: type, extra: dict, tmp_path_factory) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    extra = {k: v for k, v in extra.items() if k not in known | set(cls.FILE_DEFAULTS) and k != "runtime_config"}
    if not extra:
        return
    base = cls(**MINIMAL_KWARGS.get(cls.__name__, {"target_modules": ["q_proj"]} if "target_modules" in known
                                    else {})).to_dict()
    folder = tmp_path_factory.mktemp("future")
    (folder / "adapter_config.json").write_text(json.dumps({**base, **extra}))
    with pytest.warns(UserWarning) as caught:
        loaded = PeftConfig.from_pretrained(folder)
    message = " ".join(str(w.message) for w in caught)
    assert all(repr(k) in message for k in extra), (extra, message)
    assert type(loaded) is cls and loaded.to_dict() == base


# ---- pickles ---------------------------------------------------------------------------------------------------
class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _saved_lora(tmp_path: Path, safe: bool = True) -> tuple[Path, torch.Tensor]:
    model, inputs = _tiny()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder, safe_serialization=safe)
    with torch.no_grad():
        return folder, peft_model(**inputs).logits


def _untouched(model: torch.nn.Module) -> bool:
    return not any("lora_" in n for n, _ in model.named_parameters())


def test_pickled_adapter_loads_tensors_only_and_never_runs_code(tmp_path: Path) -> None:
    folder, out = _saved_lora(tmp_path, safe=False)
    model, inputs = _tiny()
    with pytest.raises(ValueError, match="allow_pickle=False"):  # refused when the caller says so
        PeftModel.from_pretrained(model, folder, allow_pickle=False)
    assert _untouched(model)
    with torch.no_grad(), pytest.warns(UserWarning, match="weights_only=True"):  # peft's default: tensors only
        assert torch.equal(PeftModel.from_pretrained(model, folder)(**inputs).logits, out)

    marker = tmp_path / "pwned.txt"
    with open(folder / "adapter_model.bin", "wb") as fh:
        pickle.dump({"base_model.model.x": _Exploit(str(marker))}, fh)
    model, _ = _tiny()
    with pytest.raises(ValueError, match="could not be read"):
        PeftModel.from_pretrained(model, folder, allow_pickle=True)
    assert not marker.exists() and _untouched(model)


def test_every_torch_load_in_the_library_is_weights_only() -> None:
    for path in (ROOT / "peftlab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("weights_only") == "True", f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"


# ---- corrupt files ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, bytes, torch.Tensor]:
    folder, out = _saved_lora(tmp_path_factory.mktemp("good"))
    return folder, (folder / "adapter_model.safetensors").read_bytes(), out


@SETTINGS
@given(cut=st.floats(0.0, 0.999))
def test_truncated_safetensors_is_refused_and_the_model_untouched(saved, tmp_path_factory, cut: float) -> None:
    folder, data, _ = saved
    broken = tmp_path_factory.mktemp("cut")
    (broken / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(data[: int(cut * len(data))])
    model, _ = _tiny()
    with pytest.raises(ValueError, match="not a readable safetensors file|does not fit"):
        PeftModel.from_pretrained(model, broken)
    assert _untouched(model)


@SETTINGS
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4))
def test_corrupt_safetensors_header_is_refused_or_loads_whole(saved, tmp_path_factory, flips) -> None:
    """Bytes flipped in the header (its JSON and length): a ValueError and the model untouched, or a clean load.
    (Flips in the tensor data are undetectable: safetensors has no checksum.)"""
    folder, data, _ = saved
    header_end = 8 + int.from_bytes(data[:8], "little")
    buf = bytearray(data)
    for pos, xor in flips:
        buf[pos % header_end] ^= xor
    broken = tmp_path_factory.mktemp("flip")
    (broken / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(bytes(buf))
    model, inputs = _tiny()
    try:
        loaded = PeftModel.from_pretrained(model, broken)
    except ValueError:
        assert _untouched(model)
        return
    with torch.no_grad():  # loaded whole (names, shapes and dtypes were checked): it runs
        assert loaded(**inputs).logits.shape[-1] == model.config.vocab_size


def test_adapter_for_another_base_model_is_refused_naming_both(tmp_path: Path) -> None:
    folder, _ = _saved_lora(tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "facebook/opt-350m"
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="does not fit") as err:
        PeftModel.from_pretrained(wider, folder)
    assert "facebook/opt-350m" in str(err.value) and "left unchanged" in str(err.value)
    assert _untouched(wider)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.uint8])
def test_non_float_adapter_tensors_are_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    folder, _ = _saved_lora(tmp_path)
    state = load_file(folder / "adapter_model.safetensors")
    key = next(iter(state))
    state[key] = state[key].to(dtype)
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    model, _ = _tiny()
    with pytest.raises(ValueError, match="dtype") as err:
        PeftModel.from_pretrained(model, folder)
    assert key in str(err.value) and _untouched(model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_load_cast_to_the_model(tmp_path: Path, dtype: torch.dtype) -> None:
    """peft saves in the adapter's dtype and casts on load; so does peftlab (a float16 adapter on a float32 model)."""
    from safetensors.torch import load_file, save_file

    folder, out = _saved_lora(tmp_path)
    state = {k: v.to(dtype) for k, v in load_file(folder / "adapter_model.safetensors").items()}
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    model, inputs = _tiny()
    loaded = PeftModel.from_pretrained(model, folder)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, out, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("r", [2**40, 2**34])
def test_an_absurd_rank_is_refused_before_anything_is_allocated(r: int) -> None:
    """Found by the cpu-profile fuzz run: r=2**40 used to reach torch's allocator (a RuntimeError for 512 TB)."""
    model, _ = _tiny()
    with pytest.raises(ValueError, match=rf"r={r} for .*: A and B would need .* GiB, more than .* use r <= "):
        get_peft_model(model, LoraConfig(r=r, target_modules=["q_proj"]))
    assert _untouched(model)
