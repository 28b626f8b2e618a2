"""Bad input: each case raises a clear error (asserted on its key words) and changes nothing, neither
in the model (state dict, module classes, trainable flags, adapters) nor on disk (same files, same bytes)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import base_model, fill_method_tensors
from safetensors.torch import save_file
from torch import nn

import peftlab.utils.io as io
from peftlab import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftlab.lab.models import MLP, example_inputs


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def snapshot(model: nn.Module) -> dict:
    """Everything an error must leave alone."""
    snap = {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }
    if hasattr(model, "peft_config"):
        snap["adapters"] = sorted(model.peft_config)
        snap["active"] = model.active_adapter
    return snap


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k
    assert after.get("adapters") == before.get("adapters")
    assert after.get("active") == before.get("active")


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}



def mlp_peft(**kwargs) -> PeftModel:
    config = LoraConfig(**{"target_modules": ["lin0", "lin1"], **kwargs})
    model = get_peft_model(base_model("mlp"), config).eval()
    fill_method_tensors(model)
    return model


@pytest.fixture
def saved(tmp_path) -> Path:
    """An MLP adapter (non-trivial) saved by peftlab, and nothing else in the folder."""
    path = tmp_path / "saved"
    mlp_peft().save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,words", [
    (dict(r=0), ["r=0", "positive"]),
    (dict(r=-4), ["r=-4", "positive"]),
    (dict(r=2.5), ["r=2.5", "integer"]),
    (dict(rank_pattern={"lin0": 0}), ["rank_pattern", "positive"]),
    (dict(lora_dropout=-0.1), ["lora_dropout=-0.1", "[0, 1)"]),
    (dict(lora_dropout=1.0), ["lora_dropout=1.0", "[0, 1)"]),
    (dict(lora_dropout=1.5), ["lora_dropout=1.5", "[0, 1)"]),
    (dict(bias="some"), ["bias='some'", "'none'", "'all'", "'lora_only'"]),
    (dict(init_lora_weights="kaiming"), ["init_lora_weights='kaiming'", "True", "'gaussian'"]),
    (dict(use_qalora=True), ["use_qalora", "does not implement"]),
    (dict(eva_config={"rho": 2.0}), ["eva_config", "does not implement"]),
    (dict(layer_replication=[[0, 1]]), ["layer_replication", "does not implement"]),
    (dict(target_modules=r".*", layers_to_transform=[0]), ["layers_to_transform", "regex"]),
    (dict(target_modules=["q"], layers_pattern="layers"), ["layers_pattern", "layers_to_transform"]),
    (dict(task_type="TRANSLATION"), ["task_type='TRANSLATION'", "CAUSAL_LM"]),
])
def test_bad_config_values(kwargs, words):
    with pytest.raises(ValueError) as info:
        LoraConfig(**{"target_modules": ["lin0"], **kwargs})
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("key,value,words", [
    ("r", 0, ["r=0", "positive"]),
    ("lora_dropout", 1.0, ["lora_dropout", "[0, 1)"]),
    ("bias", "everything", ["bias='everything'", "'lora_only'"]),
    ("init_lora_weights", "eva", ["init_lora_weights='eva'", "not implemented"]),
    ("use_qalora", True, ["use_qalora", "does not implement"]),
])
def test_bad_config_file_refused_before_touching_model(saved, key, value, words):
    config = json.loads((saved / "adapter_config.json").read_text())
    config[key] = value
    (saved / "adapter_config.json").write_text(json.dumps(config))
    on_disk = folder_bytes(saved)
    model = base_model("mlp")
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(model, saved)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert_unchanged(model, before)
    assert folder_bytes(saved) == on_disk


def test_unknown_config_key_loads_with_a_warning(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["shiny_new_option"] = 3
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="shiny_new_option"):
        loaded = PeftModel.from_pretrained(base_model("mlp"), saved)
    x = example_inputs("mlp")
    torch.testing.assert_close(loaded(x), mlp_peft()(x), atol=0, rtol=0)
    with pytest.warns(UserWarning, match="shiny_new_option"):
        read = PeftConfig.from_pretrained(saved)
    assert not hasattr(read, "shiny_new_option")


def test_config_without_peft_type(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    del config["peft_type"]
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="peft_type"):
        PeftConfig.from_pretrained(saved)


def test_config_that_is_not_json(saved):
    (saved / "adapter_config.json").write_text("{not json")
    model = base_model("mlp")
    before = snapshot(model)
    with pytest.raises(ValueError, match="not valid JSON"):
        PeftModel.from_pretrained(model, saved)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------------
def test_targets_that_match_nothing_list_near_misses():
    model = base_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        get_peft_model(model, LoraConfig(target_modules=["q_prj", "v_projection"], task_type="CAUSAL_LM"))
    msg = str(info.value)
    assert "matched no module" in msg and "q_prj" in msg
    assert "q_proj" in msg and "v_proj" in msg  # the near misses
    assert_unchanged(model, before)


def test_regex_that_matches_nothing():
    model = base_model("mlp")
    before = snapshot(model)
    with pytest.raises(ValueError, match="matched no module") as info:
        get_peft_model(model, LoraConfig(target_modules=r"lin"))  # a regex must match the whole name
    assert "lin0" in str(info.value)
    assert "whole name" in str(info.value)
    assert_unchanged(model, before)


def test_layers_to_transform_that_match_nothing():
    model = base_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="layers_to_transform=\\[7\\]"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[7],
                                         layers_pattern="layers"))
    assert_unchanged(model, before)


def test_target_of_unsupported_type_leaves_model_unchanged():
    model = base_model("mlp")
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        get_peft_model(model, LoraConfig(target_modules=["lin0", "relu"]))
    assert "'relu'" in str(info.value) and "ReLU" in str(info.value) and "Linear" in str(info.value)
    assert_unchanged(model, before)  # lin0 was not wrapped either


def test_grouped_conv_rank_not_divisible_by_groups_is_refused():
    """peft's rule: LoRA on a grouped conv needs r divisible by groups (B keeps the groups apart)."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match="groups=2 and rank 3.*divisible by groups"):
        get_peft_model(model, LoraConfig(target_modules=["0"], r=3))
    assert_unchanged(model, before)


def test_grouped_conv_cannot_merge():
    """ΔW of a LoRA on a grouped conv connects every input channel, which no grouped weight holds: merging raises
    NotImplementedError as in peft (the forward works), and the weights stay as they were."""
    with pytest.warns(UserWarning, match="groups > 1. Merging is not supported"):
        model = get_peft_model(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), LoraConfig(target_modules=["0"], r=4))
    fill_method_tensors(model)
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        model.merge_adapter()
    assert_unchanged(model, before)


def test_second_adapter_matching_nothing_leaves_peft_model_unchanged():
    model = mlp_peft()
    before = snapshot(model)
    with pytest.raises(ValueError, match="matched no module"):
        model.add_adapter("other", LoraConfig(target_modules=["lin2"]))
    assert_unchanged(model, before)


def test_target_wrapped_by_modules_to_save_of_another_adapter():
    model = get_peft_model(base_model("mlp"), LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        model.add_adapter("other", LoraConfig(target_modules=["lin0", "lin1"]))
    assert "lin1" in str(info.value) and "modules_to_save" in str(info.value)
    assert_unchanged(model, before)


def test_modules_to_save_that_match_nothing():
    model = base_model("mlp")
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        get_peft_model(model, LoraConfig(target_modules=["lin0"], modules_to_save=["lin_head"]))
    assert "lin_head" in str(info.value) and "lin1" in str(info.value)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------------
# adapters by name
# ---------------------------------------------------------------------------------------------------
def test_duplicate_adapter_name_in_add_adapter():
    model = mlp_peft()
    before = snapshot(model)
    with pytest.raises(ValueError, match="'default' already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["lin0"], r=2))
    assert_unchanged(model, before)


def test_duplicate_adapter_name_in_load_adapter(saved):
    model = mlp_peft()
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], r=2))
    before = snapshot(model)
    on_disk = folder_bytes(saved)
    for name in ("default", "other"):
        with pytest.raises(ValueError, match=f"'{name}' already exists"):
            model.load_adapter(saved, adapter_name=name)
    assert_unchanged(model, before)
    assert folder_bytes(saved) == on_disk


@pytest.mark.parametrize("name", ["", "a.b", "__base__"])
def test_unusable_adapter_names(name):
    model = mlp_peft()
    before = snapshot(model)
    with pytest.raises(ValueError, match="not usable"):
        model.add_adapter(name, LoraConfig(target_modules=["lin0"]))
    assert_unchanged(model, before)


def test_deleting_the_active_adapter():
    """peft's semantics: the active adapter is deleted and the first remaining one (by name) becomes active, with a
    warning saying so."""
    model = mlp_peft()
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], r=2))
    with pytest.warns(UserWarning, match="Adapter default was active which is now deleted. Setting active adapter to "
                                         "other"):
        model.delete_adapter("default")
    assert list(model.peft_config) == ["other"] and model.active_adapter == "other"
    assert not [k for k in model.state_dict() if "default" in k.split(".")]


def test_deleting_the_only_adapter():
    """peft's semantics: deleting the last adapter leaves no active adapter; the layers stay wrapped and compute
    the base model exactly (unload() gives the plain model back)."""
    model = mlp_peft()
    x = torch.randn(3, 10)
    base = base_model("mlp")
    model.delete_adapter("default")
    assert model.peft_config == {} and model.active_adapters == []
    assert torch.equal(model(x), base(x))
    assert type(model.unload().lin0) is nn.Linear


def test_deleting_an_unknown_adapter():
    model = mlp_peft()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no adapter named 'ghost'.*default"):
        model.delete_adapter("ghost")
    assert_unchanged(model, before)


def test_deleting_a_merged_adapter():
    model = mlp_peft()
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], r=2))
    model.merge_adapter(["other"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="merged.*unmerge_adapter"):
        model.delete_adapter("other")
    assert_unchanged(model, before)


def test_set_adapter_unknown():
    model = mlp_peft()
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        model.set_adapter("ghost")
    assert "'ghost'" in str(info.value) and "default" in str(info.value)
    assert_unchanged(model, before)


def test_adapter_names_unknown():
    model = mlp_peft()
    before = snapshot(model)
    x = example_inputs("mlp", batch=2)
    with pytest.raises(ValueError) as info:
        model(x, adapter_names=["default", "ghost"])
    assert "ghost" in str(info.value) and "__base__" in str(info.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("names", [["default"], ["default", "__base__", "default"]])
def test_adapter_names_of_the_wrong_length(names):
    model = mlp_peft()
    before = snapshot(model)
    x = example_inputs("mlp", batch=2)
    with pytest.raises(ValueError) as info:
        model(x, adapter_names=names)
    assert f"{len(names)} entries" in str(info.value) and "2 rows" in str(info.value)
    assert_unchanged(model, before)


def test_adapter_names_as_a_string():
    model = mlp_peft()
    with pytest.raises(TypeError, match="one adapter name per row"):
        model(example_inputs("mlp", batch=2), adapter_names="default")


def test_adapter_names_with_a_merged_adapter():
    model = mlp_peft()
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], r=2))
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        model(example_inputs("mlp", batch=2), adapter_names=["default", "other"])


def test_merge_unknown_adapter():
    model = mlp_peft()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no adapter named 'ghost'"):
        model.merge_adapter(["ghost"])
    assert_unchanged(model, before)


def test_safe_merge_refuses_non_finite_and_leaves_weights():
    model = mlp_peft()
    with torch.no_grad():
        model.base_model.model.lin1.lora_B["default"].weight[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_and_unload(safe_merge=True)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------
class WideMLP(MLP):
    """The MLP with a 24-wide hidden layer: the same module names, other shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 24)
        self.lin1 = nn.Linear(24, 2)


def test_adapter_with_other_shapes(saved):
    model = WideMLP().eval()
    before = snapshot(model)
    on_disk = folder_bytes(saved)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(model, saved)
    msg = str(info.value)
    assert "base_model.model.lin0.lora_B.weight" in msg and "(20, 8)" in msg and "(24, 8)" in msg
    assert "base_model.model.lin1.lora_A.weight" in msg and "(8, 20)" in msg and "(8, 24)" in msg
    assert_unchanged(model, before)
    assert folder_bytes(saved) == on_disk


def test_load_adapter_with_other_shapes_leaves_peft_model_unchanged(saved):
    model = get_peft_model(WideMLP().eval(), LoraConfig(target_modules=["lin0"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="other shapes"):
        model.load_adapter(saved, adapter_name="other")
    assert_unchanged(model, before)


def test_adapter_for_another_architecture(saved, tmp_path):
    # an MLP adapter into a Conv1d model that also has a lin0, and a Llama adapter into OPT
    model = base_model("conv1d")
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(model, saved)
    assert "lin1" in str(info.value)  # the target that does not exist here
    assert_unchanged(model, before)
    llama_dir = tmp_path / "llama"
    get_peft_model(base_model("llama"), LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
                   ).save_pretrained(llama_dir)
    opt = base_model("opt")
    before = snapshot(opt)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(opt, llama_dir)
    msg = str(info.value)
    assert "belong to no module" in msg and "model.layers.0.self_attn.q_proj" in msg
    assert "another base model" in msg
    assert_unchanged(opt, before)


def test_missing_config_file(saved):
    (saved / "adapter_config.json").unlink()
    on_disk = folder_bytes(saved)
    model = base_model("mlp")
    before = snapshot(model)
    with pytest.raises(FileNotFoundError) as info:
        PeftModel.from_pretrained(model, saved)
    assert "adapter_config.json" in str(info.value) and "adapter_model.safetensors" in str(info.value)
    assert_unchanged(model, before)
    assert folder_bytes(saved) == on_disk


def test_missing_folder(tmp_path):
    model = base_model("mlp")
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PeftModel.from_pretrained(model, tmp_path / "nowhere")
    assert_unchanged(model, before)


def test_missing_weights_file(saved):
    (saved / "adapter_model.safetensors").unlink()
    on_disk = folder_bytes(saved)
    model = base_model("mlp")
    before = snapshot(model)
    with pytest.raises(FileNotFoundError) as info:
        PeftModel.from_pretrained(model, saved)
    assert "no adapter weights" in str(info.value) and "adapter_config.json" in str(info.value)
    assert_unchanged(model, before)
    assert folder_bytes(saved) == on_disk


def test_missing_tensor_in_weights_file(saved):
    tensors = io.load_file(str(saved / "adapter_model.safetensors"))
    del tensors["base_model.model.lin1.lora_B.weight"]
    save_file(tensors, str(saved / "adapter_model.safetensors"))
    model = base_model("mlp")
    before = snapshot(model)
    with pytest.raises(ValueError, match="missing from the checkpoint.*lin1.lora_B.weight"):
        PeftModel.from_pretrained(model, saved)
    assert_unchanged(model, before)


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_safetensors(saved, keep):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    on_disk = folder_bytes(saved)
    model = base_model("mlp")
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(model, saved)
    assert "adapter_model.safetensors" in str(info.value) and "corrupt" in str(info.value)
    assert_unchanged(model, before)
    assert folder_bytes(saved) == on_disk
    peft_model = mlp_peft()
    before = snapshot(peft_model)
    with pytest.raises(ValueError, match="corrupt"):
        peft_model.load_adapter(saved, adapter_name="other")
    assert_unchanged(peft_model, before)


def test_pickle_only_adapter_loads_tensors_only_with_a_warning(tmp_path):
    """As peft: a ``.bin`` adapter is read with torch.load(weights_only=True) (never a full unpickle), with a
    warning that safetensors is preferred; allow_pickle=True reads it without the warning, allow_pickle=False
    refuses it and leaves everything unchanged."""
    source = mlp_peft()
    source.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    on_disk = folder_bytes(tmp_path)
    model = base_model("mlp")
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(model, tmp_path, allow_pickle=False)
    assert "pickle" in str(info.value) and "allow_pickle=False" in str(info.value)
    assert_unchanged(model, before)
    assert folder_bytes(tmp_path) == on_disk
    x = example_inputs("mlp")
    with pytest.warns(UserWarning, match=r"weights_only=True.*adapter_model.safetensors is the preferred"):
        loaded = PeftModel.from_pretrained(base_model("mlp"), tmp_path)
    torch.testing.assert_close(loaded(x), source(x), atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = PeftModel.from_pretrained(model, tmp_path, allow_pickle=True)
    torch.testing.assert_close(loaded(x), source(x), atol=0, rtol=0)


def test_save_into_a_file_path(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    with pytest.raises(ValueError, match="is a file"):
        mlp_peft().save_pretrained(target)
    assert target.read_text() == "keep me"


def test_save_unknown_selected_adapter(tmp_path):
    with pytest.raises(ValueError, match="ghost"):
        mlp_peft().save_pretrained(tmp_path / "out", selected_adapters=["ghost"])
    assert not (tmp_path / "out").exists()


def _no_temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith(".tmp-") or ".tmp" in p.name]


def test_interrupted_weights_write_keeps_the_old_files(saved, monkeypatch):
    old = folder_bytes(saved)
    model = mlp_peft(lora_alpha=3)  # other tensors and config than the saved one
    with torch.no_grad():
        model.base_model.model.lin0.lora_A["default"].weight.add_(1.0)

    def broken_writer(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")  # some bytes land, then the "disk fills up"
        raise OSError("No space left on device")

    monkeypatch.setattr(io, "save_file", broken_writer)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(saved)
    assert folder_bytes(saved) == old
    assert not _no_temp_files(saved)
    monkeypatch.undo()
    loaded = PeftModel.from_pretrained(base_model("mlp"), saved)  # the old adapter still loads
    x = example_inputs("mlp")
    torch.testing.assert_close(loaded(x), mlp_peft()(x), atol=0, rtol=0)


def test_interrupted_pickle_write_keeps_the_old_files(tmp_path, monkeypatch):
    mlp_peft().save_pretrained(tmp_path, safe_serialization=False)
    old = folder_bytes(tmp_path)

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(io.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        mlp_peft(r=2).save_pretrained(tmp_path, safe_serialization=False)
    monkeypatch.undo()
    assert folder_bytes(tmp_path) == old
    assert not _no_temp_files(tmp_path)


def test_config_that_cannot_be_written_leaves_the_old_adapter(saved):
    """A config value JSON cannot hold (here a tensor in alpha_pattern) fails the save before any file is
    replaced, so the folder never pairs new weights with an old config."""
    old = folder_bytes(saved)
    model = mlp_peft()
    with torch.no_grad():  # other weights than the saved ones
        model.base_model.model.lin0.lora_A["default"].weight.add_(1.0)
    model.peft_config["default"].alpha_pattern = {"lin0": torch.tensor(2.0)}
    with pytest.raises(TypeError, match="JSON serializable"):
        model.save_pretrained(saved)
    assert folder_bytes(saved) == old
    assert not _no_temp_files(saved)


def test_interrupted_save_of_several_adapters_leaves_no_temp_files(tmp_path, monkeypatch):
    model = mlp_peft()
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], r=2))
    calls = []
    real = io.save_file

    def fail_second(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk gone")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(io, "save_file", fail_second)
    with pytest.raises(OSError, match="disk gone"):
        model.save_pretrained(tmp_path)
    assert not _no_temp_files(tmp_path)
    assert not (tmp_path / "other" / "adapter_model.safetensors").exists()
    shutil.rmtree(tmp_path)


def test_from_pretrained_of_peft_file_with_extra_unknown_tensor(saved):
    tensors = io.load_file(str(saved / "adapter_model.safetensors"))
    tensors["base_model.model.lin7.lora_A.weight"] = torch.zeros(8, 10)
    save_file(tensors, str(saved / "adapter_model.safetensors"))
    model = base_model("mlp")
    before = snapshot(model)
    with pytest.raises(ValueError, match="belong to no module.*lin7"):
        PeftModel.from_pretrained(model, saved)
    assert_unchanged(model, before)


def test_warnings_are_not_errors_for_bias_disable():
    model = mlp_peft(bias="all")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with model.disable_adapter():
            pass
    assert any("bias='all'" in str(w.message) for w in caught)


@pytest.mark.parametrize("name", ["double", "train", "keys", "forward"])
def test_adapter_name_that_is_a_module_attribute(name):
    """torch refuses ModuleDict keys named like its own attributes; peftlab says so before changing anything."""
    from peftlab.lab.models import tiny_model

    model = tiny_model("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="attribute or method"):
        get_peft_model(model, LoraConfig(target_modules=["lin0"]), adapter_name=name)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in k for k in after)
