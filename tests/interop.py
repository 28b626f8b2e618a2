"""The shared harness of the interop tests: peftlab against peft (the oracle), in both directions.

Every ``tests/test_*_interop.py`` file repeats one scaffold: build the same tiny model in both libraries with
the same config, fill the adapter tensors with values seeded by their names (the names are the same in both
libraries, so both adapters are identical and non-trivial), compare the models and their outputs, save in one
library and load in the other, compare the files. That scaffold lives here, once; a method's file holds its
cases, its :class:`Interop` (the method's tensor prefixes, models and tolerances) and its own checks, above
all the places where peftlab deliberately differs from peft 0.21.2.

A case is ``(name, tiny model, config kwargs)`` or, for a file with several methods, ``(name, method, tiny
model, config kwargs)``. ``interop.case_tests(CASES, "test_same_files", ...)`` makes the standard tests of
:data:`STANDARD_TESTS` for a file, parametrised by case name::

    H = Interop("Lora", prefixes=("lora_",), atol=1e-6)
    globals().update(H.case_tests(CASES, "test_same_config_same_model", "test_same_files"))

The checks are methods (``H.check_same_model(case, ref, ours)``, ``H.check_merge_cycle(case)`` ...) that a
file's own tests call too. Each check compares peftlab with peft; none of them can pass on a wrong adapter.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import base_model, fill_trainable, output, quiet
from safetensors.torch import load_file
from torch import nn

import peftlab
from peftlab.lab.models import example_inputs

peft = pytest.importorskip("peft", reason="peft (the oracle) is not installed")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

from peftlab.tuners.base import AdapterLayer  # noqa: E402

LIBS = {"peft": peft, "peftlab": peftlab}
DIRECTIONS = ["peftlab->peft", "peft->peftlab"]
ADAPTERS = ("default", "second", "third")  # the names of a multi-adapter spec's adapters, in order


# ---------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_warnings(known: Sequence[str] = ()) -> Iterator[None]:
    """Fail on any warning other than the known FutureWarning/DeprecationWarning noise (an unknown config
    key, a missing or unexpected adapter key) and those matching a pattern of ``known``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    real = [w for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))
            and not any(re.search(pattern, str(w.message)) for pattern in known)]
    assert not real, [f"{w.category.__name__}: {w.message}" for w in real]


def count_line(pm) -> str:
    """What ``print_trainable_parameters`` prints."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pm.print_trainable_parameters()
    return buf.getvalue()


def read_files(folder) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of ``adapter_model.safetensors`` and the dict of ``adapter_config.json`` in ``folder``."""
    folder = Path(folder)
    return (load_file(str(folder / "adapter_model.safetensors")),
            json.loads((folder / "adapter_config.json").read_text()))


def as_comparable(config: dict[str, Any]) -> dict[str, Any]:
    """peft writes sets (target_modules, modules_to_save, ...) in arbitrary order: compare lists as sets
    (``layers_to_transform`` is a list, in order)."""
    return {k: (sorted(map(str, v)) if isinstance(v, list) and k != "layers_to_transform" else v)
            for k, v in config.items()}


def tree(root: Path) -> list[str]:
    """The files below ``root`` (sub-folders included), without the model card."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != "README.md")


def tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The adapter layers of a model (peft's or peftlab's), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AdapterLayer))}


def adapted_names(pm) -> set[str]:
    return set(tuner_layers(pm.get_base_model()))


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def assert_same_tensors(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], dtype: bool = False) -> None:
    """The same names and shapes, and equal values (and dtypes with ``dtype``)."""
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    for k in ref:
        assert not dtype or ours[k].dtype == ref[k].dtype, k
        assert torch.equal(ours[k], ref[k]), k


def run_each(pm, x, adapters: Sequence[str]) -> dict[str, torch.Tensor]:
    """The output with each adapter active in turn; the first is active again afterwards."""
    outs = {}
    with quiet():
        for adapter in adapters:
            pm.set_adapter(adapter)
            outs[adapter] = output(pm, x)
        pm.set_adapter(adapters[0])
    return outs


def loss_of(out) -> torch.Tensor:
    """A loss that every output has: the mean square of the main output tensor."""
    if not isinstance(out, torch.Tensor):
        out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return out.float().pow(2).mean()


# ---------------------------------------------------------------------------------------------------
# one method's harness
# ---------------------------------------------------------------------------------------------------
@dataclass
class Interop:
    """What the shared checks need to know of a method (``method`` names the config: ``f"{method}Config"``).

    ``extra_models`` maps a model name to (module class, input shape without the batch) for the file's own
    toy models (built under seed 0, inputs drawn from seed 0); other names are the lab's tiny models.
    Tolerances: ``atol`` for outputs, ``weight_atol`` for merged/unmerged/unloaded weights, ``delta_tol``
    (atol, rtol) for ΔW, ``merged_atol`` for the merged output against the unmerged one, ``identity_atol``
    for a freshly initialised adapter against the base model, ``disabled_atol`` for the disabled outputs
    after a merge and an unmerge (exact where unmerging subtracts what merging added). ``init_key`` is the config field that turns
    the identity initialisation off.
    """

    method: str
    prefixes: tuple[str, ...]
    atol: float = 1e-5
    weight_atol: float = 1e-6
    unmerge_atol: float | None = None  # default: weight_atol
    delta_tol: tuple[float, float] = (1e-7, 0.0)
    merged_atol: float = 1e-5
    identity_atol: float = 0.0
    disabled_atol: float = 0.0  # disabled outputs after a merge and an unmerge
    init_key: str = "init_weights"
    file_markers: dict[str, str] = field(default_factory=dict)  # method -> a part of some tensor name in its file
    known_warnings: tuple[str, ...] = ()  # patterns of warnings a library gives when it loads this method
    seed: int = 7
    extra_models: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = field(default_factory=dict)

    # -- cases, models, inputs -------------------------------------------------------------------------
    def parts(self, case) -> tuple[str, str, str, Any]:
        """(name, method, model, kwargs) of a case with or without its method."""
        if len(case) == 4:
            return case
        name, model, kwargs = case
        return name, self.method, model, kwargs

    def config(self, lib: str, method: str, kwargs: dict[str, Any]):
        return getattr(LIBS[lib], f"{method}Config")(**kwargs)

    def make_model(self, name: str) -> nn.Module:
        if name in self.extra_models:
            torch.manual_seed(0)
            return self.extra_models[name][0]()
        return base_model(name)

    def inputs(self, name: str, batch: int = 2):
        if name in self.extra_models:
            shape = self.extra_models[name][1]
            return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
        return example_inputs(name, batch=batch)

    def fill(self, model: nn.Module, adapter: str = "default") -> None:
        """Every trainable tensor and every tensor of ``adapter``: values seeded by its name."""
        fill_trainable(model, adapter, prefixes=self.prefixes)

    def adapter_params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every adapter tensor (all adapters, modules_to_save copies included) and every trainable one."""
        prefixes = (*self.prefixes, "modules_to_save")
        return {n: p for n, p in model.named_parameters()
                if p.requires_grad or any(s.startswith(prefixes) for s in n.split("."))}

    def build(self, lib: str, case, fill: bool = True, base: nn.Module | None = None, **override: Any):
        """The case's model in ``lib`` (``override`` changes config fields), drawn under ``self.seed`` after
        the base model is built, filled unless ``fill=False``, in eval mode."""
        _, method, model, kwargs = self.parts(case)
        base = self.make_model(model) if base is None else base
        torch.manual_seed(self.seed)  # after building the base, which may come from a cache (no draws) or not
        with quiet():  # fan_in_fan_out fix-ups and the like warn in both libraries
            pm = LIBS[lib].get_peft_model(base, self.config(lib, method, {**kwargs, **override}))
        if fill:
            self.fill(pm)
        return pm.eval()

    def pair(self, cache: dict, case):
        """(peft model, peftlab model) for a case, built once per test module (tests must not change them)."""
        name = case[0]
        if name not in cache:
            cache[name] = (self.build("peft", case), self.build("peftlab", case))
        return cache[name]

    def load(self, lib: str, model: str, folder, **kwargs: Any):
        """``PeftModel.from_pretrained`` of ``lib`` on a fresh base model."""
        return LIBS[lib].PeftModel.from_pretrained(self.make_model(model), folder, **kwargs)

    # -- one model, both libraries ----------------------------------------------------------------------
    def check_fresh(self, case, **override: Any) -> None:
        """Under one seed both libraries create the same tensors (same shapes, same draws, same zeros) and
        print the same count line; a default initialisation is the identity."""
        _, _, model, kwargs = self.parts(case)
        ref, ours = self.build("peft", case, fill=False, **override), self.build("peftlab", case, fill=False, **override)
        assert_same_tensors(self.adapter_params(ours), self.adapter_params(ref))
        assert count_line(ours) == count_line(ref)
        assert count_line(ours).startswith("trainable params: ")
        x = self.inputs(model)
        torch.testing.assert_close(output(ours, x), output(ref, x), atol=self.atol, rtol=0)
        if kwargs.get(self.init_key, True) is not False:  # the case's own initialisation: the identity
            fresh = self.build("peftlab", case, fill=False) if override else ours
            torch.testing.assert_close(output(fresh, x), output(self.make_model(model), x),
                                       atol=self.identity_atol, rtol=0)

    def check_same_model(self, case, ref, ours) -> None:
        """The same model class, adapted modules, trainable tensors, counts, state-dict keys and outputs."""
        model = self.parts(case)[2]
        assert type(ours).__name__ == type(ref).__name__
        assert adapted_names(ours) == adapted_names(ref)
        assert trainable_names(ours) == trainable_names(ref)
        assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
        assert count_line(ours) == count_line(ref)
        assert set(ours.state_dict()) == set(ref.state_dict())
        x = self.inputs(model)
        torch.testing.assert_close(output(ours, x), output(ref, x), atol=self.atol, rtol=0)

    def check_merge_cycle(self, case, delta: bool = True, unload: bool = True) -> None:
        """Layer by layer the same ΔW (with ``delta``), then: merged, the same base weights and biases and the
        same outputs, equal to the unmerged ones; unmerged, the same weights again; disabled, the same
        outputs; ``merge_and_unload`` (with ``unload``), the same plain model."""
        model = self.parts(case)[2]
        ref, ours = self.build("peft", case), self.build("peftlab", case)
        x = self.inputs(model)
        unmerged = output(ref, x)
        torch.testing.assert_close(output(ours, x), unmerged, atol=self.atol, rtol=0)
        ref_layers, our_layers = tuner_layers(ref.get_base_model()), tuner_layers(ours.get_base_model())
        assert ref_layers.keys() == our_layers.keys()
        if delta:
            for key, layer in our_layers.items():
                ref_layer = ref_layers[key]
                assert layer.scaling["default"] == pytest.approx(ref_layer.scaling["default"], rel=1e-12), key
                assert layer.r["default"] == ref_layer.r["default"], key
                with torch.no_grad():
                    torch.testing.assert_close(layer.get_delta_weight("default"), ref_layer.get_delta_weight("default"),
                                               atol=self.delta_tol[0], rtol=self.delta_tol[1], msg=key)

        def same_base_weights(atol: float) -> None:
            for key, layer in our_layers.items():
                for what in ("weight", "bias"):
                    got = getattr(layer.get_base_layer(), what, None)
                    want = getattr(ref_layers[key].get_base_layer(), what, None)
                    if want is not None or got is not None:
                        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=f"{key}.{what}")

        with quiet():
            ref.merge_adapter()
        ours.merge_adapter()
        same_base_weights(self.weight_atol)
        torch.testing.assert_close(output(ours, x), output(ref, x), atol=self.atol, rtol=0)
        torch.testing.assert_close(output(ours, x), unmerged, atol=self.merged_atol, rtol=0)
        with quiet():
            ref.unmerge_adapter()
        ours.unmerge_adapter()
        same_base_weights(self.weight_atol if self.unmerge_atol is None else self.unmerge_atol)
        with quiet():
            with ref.disable_adapter():
                ref_disabled = output(ref, x)
            with ours.disable_adapter():
                our_disabled = output(ours, x)
        torch.testing.assert_close(our_disabled, ref_disabled, atol=self.disabled_atol, rtol=0)
        if unload:
            with quiet():
                ref_plain, our_plain = ref.merge_and_unload(), ours.merge_and_unload()
            assert {n: type(m) for n, m in our_plain.named_modules()} == \
                {n: type(m) for n, m in ref_plain.named_modules()}
            ref_sd, our_sd = ref_plain.state_dict(), our_plain.state_dict()
            assert our_sd.keys() == ref_sd.keys()
            for k in ref_sd:
                torch.testing.assert_close(our_sd[k], ref_sd[k], atol=self.weight_atol, rtol=0, msg=k)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def check_loads_in_other(self, case, src, dst: str, folder: Path, resave: bool = True):
        """``src`` saved, then loaded by library ``dst`` without warnings: the same model class and config
        class, outputs and adapter tensors (every one arrives); with ``resave`` the loaded model saves the
        same file again (whole embedding matrices included, as peft writes them). Returns the loaded model."""
        model = self.parts(case)[2]
        with quiet():  # save_embedding_layers="auto" warns when an embedding is a target, in both libraries
            src.save_pretrained(folder)
        with no_warnings(self.known_warnings):  # no unknown config keys, no missing or unexpected adapter keys
            loaded = self.load(dst, model, folder)
        assert type(loaded).__name__ == type(src).__name__
        assert type(loaded.peft_config["default"]).__name__ == type(src.peft_config["default"]).__name__
        x = self.inputs(model)
        torch.testing.assert_close(output(loaded, x), output(src, x), atol=self.atol, rtol=0)
        loaded_params = dict(loaded.named_parameters())
        for n, p in self.adapter_params(src).items():
            torch.testing.assert_close(loaded_params[n], p, atol=0, rtol=0, msg=n)
        if resave:
            with quiet():
                loaded.save_pretrained(folder / "again")
            first, second = read_files(folder)[0], read_files(folder / "again")[0]
            assert first.keys() == second.keys()
            assert all(torch.equal(first[k], second[k]) for k in first)
        return loaded

    def check_same_files(self, case, ref, ours, folder: Path) -> None:
        """Both save: the same file names (the model card included), the same tensors (names, shapes, dtypes,
        values; one name holding the method's ``file_markers`` entry), the same config keys and values; each
        library reads the other's config without complaint, to the same values."""
        method = self.parts(case)[1]
        marker = self.file_markers.get(method)
        with quiet():
            ref.save_pretrained(folder / "peft")
            ours.save_pretrained(folder / "peftlab")
        assert sorted(p.name for p in (folder / "peftlab").iterdir()) == \
            sorted(p.name for p in (folder / "peft").iterdir())
        ref_tensors, ref_config = read_files(folder / "peft")
        our_tensors, our_config = read_files(folder / "peftlab")
        assert marker is None or any(marker in k for k in our_tensors), marker
        assert_same_tensors(our_tensors, ref_tensors, dtype=True)
        assert our_config.keys() == ref_config.keys()
        assert as_comparable(our_config) == as_comparable(ref_config)
        with no_warnings(self.known_warnings):
            ref_read = peft.PeftConfig.from_pretrained(str(folder / "peftlab"))
            our_read = peftlab.PeftConfig.from_pretrained(folder / "peft")
        assert type(ref_read).__name__ == type(our_read).__name__ == f"{method}Config"
        assert as_comparable(json.loads(json.dumps(our_read.to_dict()))) == as_comparable(our_config)

    def check_loading_for_training(self, case, ours, folder: Path) -> None:
        """``is_trainable=True``: the same tensors train in both libraries and the count lines agree; loaded
        for inference, nothing trains (in peft too, unless base biases train: see LoRA's
        ``test_divergence_inference_load_freezes_biases``)."""
        _, _, model, kwargs = self.parts(case)
        ours.save_pretrained(folder)
        with quiet():
            ref_loaded = self.load("peft", model, folder, is_trainable=True)
        our_loaded = self.load("peftlab", model, folder, is_trainable=True)
        assert trainable_names(our_loaded) == trainable_names(ref_loaded) == trainable_names(ours)
        assert count_line(our_loaded) == count_line(ref_loaded)
        assert not trainable_names(self.load("peftlab", model, folder))
        if kwargs.get("bias", "none") == "none":
            with quiet():
                assert not trainable_names(self.load("peft", model, folder))

    # -- training ------------------------------------------------------------------------------------------
    def check_training_steps(self, case, steps: int = 3, lr: float = 0.5) -> None:
        """SGD steps from the same filled adapter give the same tensors in both libraries; dropout (rank,
        module, the adapter's own) draws from torch's generator in the same order in both."""
        model = self.parts(case)[2]
        x = self.inputs(model, batch=3)
        trained = {}
        for lib in LIBS:
            pm = self.build(lib, case).train()
            if model == "mlp":
                pm.get_base_model().drop.p = 0.0  # the toy MLP's own dropout is not the adapter's
            opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=lr)
            torch.manual_seed(123)
            for _ in range(steps):
                loss_of(pm(**x) if isinstance(x, dict) else pm(x)).backward()
                opt.step()
                opt.zero_grad()
            trained[lib] = self.adapter_params(pm)
        assert trained["peftlab"].keys() == trained["peft"].keys()
        for k in trained["peft"]:
            torch.testing.assert_close(trained["peftlab"][k], trained["peft"][k], atol=2e-5, rtol=1e-4, msg=k)

    # -- several adapters ----------------------------------------------------------------------------------
    def build_multi(self, lib: str, spec):
        """A model with the adapters of ``spec`` = ``(name, [method,] model, [kwargs, ...])`` (named
        ``default``, ``second``, ``third``), each filled with values seeded by its names."""
        name, method, model, configs = self.parts(spec)
        pm = self.build(lib, (name, method, model, configs[0]))
        for adapter, kwargs in zip(ADAPTERS[1:], configs[1:]):
            with quiet():
                pm.add_adapter(adapter, self.config(lib, method, kwargs))
            self.fill(pm, adapter)
        return pm.eval()

    def check_several_adapters_both_ways(self, spec, direction: str, folder: Path, mixed: str | None) -> None:
        """Saved with several adapters (the others in sub-folders), loaded by the other library without
        warnings: each adapter gives the same outputs (and they differ from each other). ``mixed``: a mixed
        batch (``adapter_names``) in peftlab gives each row its adapter's output ("peftlab"), and the same
        mixed outputs in peft ("both")."""
        src, dst = direction.split("->")
        model, n = self.parts(spec)[2], len(self.parts(spec)[3])
        adapters = ADAPTERS[:n]
        saver = self.build_multi(src, spec)
        x = self.inputs(model, batch=4)
        expected = run_each(saver, x, adapters)
        for a in adapters[1:]:
            assert not torch.allclose(expected[adapters[0]], expected[a]), a
        with quiet():
            saver.save_pretrained(folder)
        assert (folder / "adapter_config.json").is_file()
        for sub in adapters[1:]:
            assert (folder / sub / "adapter_model.safetensors").is_file()
        with no_warnings(self.known_warnings):
            loaded = self.load(dst, model, folder)
            loaded.load_adapter(folder / adapters[1], adapter_name=adapters[1])  # a sub-folder's path, or
            for sub in adapters[2:]:
                loaded.load_adapter(str(folder), adapter_name=sub, subfolder=sub)  # the folder and a sub-folder
        got = run_each(loaded, x, adapters)
        for adapter in expected:
            torch.testing.assert_close(got[adapter], expected[adapter], atol=self.atol, rtol=0, msg=adapter)
        if mixed is None:
            return
        names = [adapters[-1], "__base__", adapters[0], adapters[1]]
        ours = loaded if dst == "peftlab" else saver
        mixed_ours = output(ours, x, adapter_names=names)
        with ours.disable_adapter():
            base = output(ours, x)
        for row, adapter in enumerate(names):
            want = base[row] if adapter == "__base__" else expected[adapter][row]
            torch.testing.assert_close(mixed_ours[row], want, atol=self.atol, rtol=0, msg=f"row {row}")
        if mixed == "both":
            theirs = saver if dst == "peftlab" else loaded
            with quiet():
                mixed_theirs = output(theirs, x, adapter_names=names)
            torch.testing.assert_close(mixed_ours, mixed_theirs, atol=self.atol, rtol=0)

    def check_several_adapters_same_folders(self, spec, folder: Path) -> None:
        """Both save several adapters (all, and one selected): the same folder trees and the same files."""
        ref, ours = self.build_multi("peft", spec), self.build_multi("peftlab", spec)
        for lib, pm in (("peft", ref), ("peftlab", ours)):
            with quiet():
                pm.save_pretrained(folder / lib)
                pm.save_pretrained(folder / f"{lib}-sel", selected_adapters=["second"])
        assert tree(folder / "peftlab") == tree(folder / "peft")
        assert tree(folder / "peftlab-sel") == tree(folder / "peft-sel")
        for sub in ("", *ADAPTERS[1:len(self.parts(spec)[3])]):
            ref_t, ref_c = read_files(folder / "peft" / sub)
            our_t, our_c = read_files(folder / "peftlab" / sub)
            assert our_t.keys() == ref_t.keys()
            assert all(torch.equal(our_t[k], ref_t[k]) for k in ref_t)
            assert as_comparable(our_c) == as_comparable(ref_c)

    # -- the standard tests ------------------------------------------------------------------------------
    def case_tests(self, cases: Sequence, *names: str) -> dict[str, Callable]:
        """Test functions named ``names`` (keys of :data:`STANDARD_TESTS`), parametrised by ``cases`` (ids:
        the case names), for a test module's namespace: ``globals().update(H.case_tests(CASES, ...))``."""
        tests = {}
        for name in names:
            body = STANDARD_TESTS[name]

            def test(case, pair_cache, tmp_path, body=body):
                body(self, case, pair_cache, tmp_path)

            test.__name__ = test.__qualname__ = name
            test.__doc__ = body.__doc__
            tests[name] = pytest.mark.parametrize("case", list(cases), ids=[c[0] for c in cases])(test)
        return tests


# The standard per-case tests: (harness, case, module-scoped cache of built pairs, tmp_path).
def _fresh(h: Interop, case, pairs, tmp_path) -> None:
    """Under one seed both libraries create the same tensors, print the same count line, start as the identity."""
    h.check_fresh(case)


def _same_model(h: Interop, case, pairs, tmp_path) -> None:
    """Same model, same config: the same modules, trainable tensors, counts and outputs."""
    h.check_same_model(case, *h.pair(pairs, case))


def _layer_numerics(h: Interop, case, pairs, tmp_path) -> None:
    """The same ΔW per layer, merged weights and merged/unmerged/disabled outputs, and unloaded model."""
    h.check_merge_cycle(case)


def _peftlab_saves(h: Interop, case, pairs, tmp_path) -> None:
    """peftlab saves, peft loads (no warnings): the same outputs and tensors."""
    h.check_loads_in_other(case, h.pair(pairs, case)[1], "peft", tmp_path, resave=False)


def _peft_saves(h: Interop, case, pairs, tmp_path) -> None:
    """peft saves, peftlab loads (no warnings): the same outputs and tensors, and the same file saved again."""
    h.check_loads_in_other(case, h.pair(pairs, case)[0], "peftlab", tmp_path)


def _same_files(h: Interop, case, pairs, tmp_path) -> None:
    """Both libraries write the same files: tensors, config keys and values."""
    h.check_same_files(case, *h.pair(pairs, case), tmp_path)


def _loading_for_training(h: Interop, case, pairs, tmp_path) -> None:
    """``is_trainable=True``: the same tensors train in both libraries, and the count lines agree."""
    h.check_loading_for_training(case, h.pair(pairs, case)[1], tmp_path)


def _training_steps(h: Interop, case, pairs, tmp_path) -> None:
    """Three SGD steps from the same filled adapter: the same tensors in both libraries."""
    h.check_training_steps(case)


STANDARD_TESTS: dict[str, Callable] = {
    "test_fresh_adapter_is_the_same": _fresh,
    "test_same_config_same_model": _same_model,
    "test_layer_numerics": _layer_numerics,
    "test_peftlab_saves_peft_loads": _peftlab_saves,
    "test_peft_saves_peftlab_loads": _peft_saves,
    "test_same_files": _same_files,
    "test_loading_for_training_trains_the_same_tensors": _loading_for_training,
    "test_training_steps_match": _training_steps,
}
