"""``python -m peftlab merge`` and ``merge-models`` on real files.

Adapter folders are written by peft (adapter ``a``) and by peftlab (adapter ``b``); the command merges
them without a base model, and the result must equal ``add_weighted_adapter(..., seed=0)`` on a model
holding both, load in peft and in peftlab, and give the same outputs. Errors must name the problem.
Most calls run in-process (``peftlab.cli.main``); a few run ``python -m peftlab`` as a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import base_model, fill_method_tensors, output, quiet
from safetensors.torch import load_file, save_file

import peftlab
from peftlab import merging
from peftlab.cli import main
from peftlab.lab.models import example_inputs
from peftlab.merging.lora import COMBINATION_TYPES

peft = pytest.importorskip("peft", reason="peft (the oracle) is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = {"a": dict(target_modules=["lin0", "lin1"], r=2, lora_alpha=8),
       "b": dict(target_modules=["lin0", "lin1"], r=2, lora_alpha=3)}
WEIGHTS = [0.8, -0.5]




def save_adapter(lib, name: str, folder, model: str = "mlp", **overrides) -> str:
    with quiet():
        pm = lib.get_peft_model(base_model(model), lib.LoraConfig(**{**CFG[name], **overrides}), adapter_name=name)
    fill_method_tensors(pm)
    pm.save_pretrained(str(folder), selected_adapters=[name])
    path = os.path.join(str(folder), name) if name != "default" else str(folder)
    assert os.path.isfile(os.path.join(path, "adapter_config.json"))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": save_adapter(peft, "a", root / "peft"), "b": save_adapter(peftlab, "b", root / "peftlab")}


def reference(folders, combination_type: str, weights=WEIGHTS, **kw):
    """peftlab model with both folders loaded, merged in memory with the same arguments."""
    with quiet():
        pm = peftlab.PeftModel.from_pretrained(base_model("mlp"), folders["a"], adapter_name="a")
        pm.load_adapter(folders["b"], adapter_name="b")
        pm.add_weighted_adapter(["a", "b"], weights, "merged", combination_type=combination_type, seed=0, **kw)
    return pm


def run_cli(*args: str) -> int:
    return main(list(args))



# ---------------------------------------------------------------------------------------------------
# merge: equal to add_weighted_adapter, loads in both libraries
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("combination_type", COMBINATION_TYPES)
def test_merge_equals_add_weighted_adapter(folders, tmp_path, combination_type):
    density = None if combination_type in ("svd", "linear", "cat") else 0.6
    extra = ["--density", str(density)] if density else []
    out = tmp_path / "merged"
    assert run_cli("merge", "--adapters", folders["a"], folders["b"], "--weights", *map(str, WEIGHTS),
                   "--method", combination_type, *extra, "--out", str(out)) == 0
    ref = reference(folders, combination_type, density=density)
    ref.save_pretrained(tmp_path / "ref", selected_adapters=["merged"])
    got, want = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "ref" / "merged" /
                                                                          "adapter_model.safetensors")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-7, rtol=1e-6)
    cfg_got = json.loads((out / "adapter_config.json").read_text())
    cfg_want = json.loads((tmp_path / "ref" / "merged" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "peft_type"):
        assert cfg_got[key] == cfg_want[key], key
    # the merged folder loads in both libraries and computes what the in-memory merge computes
    ref.set_adapter("merged")
    x = example_inputs("mlp")
    for lib in (peft, peftlab):
        with quiet():
            loaded = lib.PeftModel.from_pretrained(base_model("mlp"), str(out))
        torch.testing.assert_close(output(loaded, x), output(ref, x), atol=1e-6, rtol=1e-6)


def test_merge_subprocess_and_help(folders, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "peftlab", "--help"], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0 and "merge" in proc.stdout and "merge-models" in proc.stdout
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "peftlab", "merge", "--adapters", folders["a"], folders["b"],
                           "--weights", "1", "-0.5", "--method", "dare_ties", "--density", "0.5", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "Merging (dare_ties)" in proc.stderr  # the progress bar
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    proc = subprocess.run([sys.executable, "-m", "peftlab", "merge", "--adapters", folders["a"], "--method",
                           "average", "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2 and "invalid choice: 'average'" in proc.stderr and "ties_svd" in proc.stderr


def test_default_weights_are_one_and_seed_changes_dare(folders, tmp_path):
    assert run_cli("merge", "--adapters", folders["a"], folders["b"], "--method", "cat", "--out",
                   str(tmp_path / "one")) == 0
    ref = reference(folders, "cat", weights=[1.0, 1.0])
    layer = ref.base_model.model.lin0
    got = load_file(tmp_path / "one" / "adapter_model.safetensors")
    torch.testing.assert_close(got["base_model.model.lin0.lora_A.weight"], layer.lora_A["merged"].weight)
    outs = []
    for seed in ("0", "1"):
        folder = tmp_path / f"dare{seed}"
        run_cli("merge", "--adapters", folders["a"], folders["b"], "--method", "dare_linear", "--density", "0.5",
                "--seed", seed, "--out", str(folder))
        outs.append(load_file(folder / "adapter_model.safetensors")["base_model.model.lin0.lora_A.weight"])
    assert not torch.equal(outs[0], outs[1])


def test_different_targets_need_the_flag(tmp_path, capsys):
    a = save_adapter(peft, "a", tmp_path / "peft")
    c = save_adapter(peftlab, "b", tmp_path / "c", target_modules=["lin0"])
    assert run_cli("merge", "--adapters", a, c, "--method", "linear", "--out", str(tmp_path / "m")) == 1
    assert "adapt different modules" in capsys.readouterr().err
    assert run_cli("merge", "--adapters", a, c, "--method", "linear", "--allow-different-targets",
                   "--out", str(tmp_path / "m")) == 0
    with quiet():
        pm = peftlab.PeftModel.from_pretrained(base_model("mlp"), a, adapter_name="a")
        pm.load_adapter(c, adapter_name="b")
        pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "merged", combination_type="linear")
    got = load_file(tmp_path / "m" / "adapter_model.safetensors")
    torch.testing.assert_close(got["base_model.model.lin1.lora_B.weight"],
                               pm.base_model.model.lin1.lora_B["merged"].weight)


# ---------------------------------------------------------------------------------------------------
# merge: errors
# ---------------------------------------------------------------------------------------------------
def _edit_config(folder, **changes) -> None:
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as fh:
        cfg = json.load(fh)
    cfg.update(changes)
    with open(path, "w") as fh:
        json.dump(cfg, fh)


def test_merge_errors(folders, tmp_path, capsys):
    def fails(*args, match):
        assert run_cli("merge", *args) == 1
        err = capsys.readouterr().err
        assert match in err, err

    out = str(tmp_path / "out")
    named = shutil.copytree(folders["a"], tmp_path / "named")
    _edit_config(named, base_model_name_or_path="lab/mlp")
    other_base = shutil.copytree(folders["b"], tmp_path / "other_base")
    _edit_config(other_base, base_model_name_or_path="someone/another-model")
    fails("--adapters", str(named), str(other_base), "--method", "cat", "--out", out,
          match="different base models")
    assert not os.path.exists(out)

    wrong_shape = shutil.copytree(folders["b"], tmp_path / "wrong_shape")
    tensors = load_file(wrong_shape / "adapter_model.safetensors")
    tensors["base_model.model.lin0.lora_A.weight"] = torch.zeros(2, 11)
    save_file(tensors, str(wrong_shape / "adapter_model.safetensors"))
    fails("--adapters", folders["a"], str(wrong_shape), "--method", "svd", "--out", out, match="different shapes")

    fails("--adapters", folders["a"], str(tmp_path / "nowhere"), "--method", "cat", "--out", out,
          match="does not exist")
    fails("--adapters", folders["a"], os.path.dirname(folders["b"]), "--method", "cat", "--out", out,
          match="sub-folders ['b'] are adapters")
    no_weights = shutil.copytree(folders["b"], tmp_path / "no_weights")
    os.remove(no_weights / "adapter_model.safetensors")
    fails("--adapters", folders["a"], str(no_weights), "--method", "cat", "--out", out,
          match="no adapter_model.safetensors")
    torch.save({}, no_weights / "adapter_model.bin")
    fails("--adapters", folders["a"], str(no_weights), "--method", "cat", "--out", out, match="pickle")

    fails("--adapters", folders["a"], folders["b"], "--weights", "1", "2", "3", "--method", "cat", "--out", out,
          match="2 adapters and 3 weights")
    fails("--adapters", folders["a"], folders["b"], "--method", "ties", "--out", out, match="needs density")
    fails("--adapters", folders["a"], folders["b"], "--method", "ties", "--density", "1.5", "--out", out,
          match=r"outside (0, 1]")

    dora = shutil.copytree(folders["b"], tmp_path / "dora")
    _edit_config(dora, use_dora=True)
    fails("--adapters", folders["a"], str(dora), "--method", "cat", "--out", out, match="use_dora")

    mts = shutil.copytree(folders["b"], tmp_path / "mts")
    tensors = load_file(mts / "adapter_model.safetensors")
    tensors["base_model.model.lin1.weight"] = torch.zeros(2, 20)
    save_file(tensors, str(mts / "adapter_model.safetensors"))
    fails("--adapters", folders["a"], str(mts), "--method", "cat", "--out", out, match="not LoRA factors")

    with pytest.raises(SystemExit) as exc:
        run_cli("merge", "--adapters", folders["a"], "--method", "average", "--out", out)
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_out_dir_needs_force(folders, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["merge", "--adapters", folders["a"], folders["b"], "--method", "svd", "--out", str(out)]
    assert run_cli(*args) == 1
    assert "--force" in capsys.readouterr().err
    assert (out / "notes.txt").exists()
    assert run_cli(*args, "--force") == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folders left


# ---------------------------------------------------------------------------------------------------
# merge-models: full-model checkpoints
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = base_model("mlp")
    pre = {k: v.clone() for k, v in base.state_dict().items()}
    save_file(pre, str(root / "base.safetensors"))
    paths = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        if i == 0:  # a folder holding model.safetensors, as save_pretrained writes it
            (root / "ft0").mkdir()
            save_file(ft, str(root / "ft0" / "model.safetensors"))
            paths.append(str(root / "ft0"))
        else:
            save_file(ft, str(root / f"ft{i}.safetensors"))
            paths.append(str(root / f"ft{i}.safetensors"))
    return root, pre, paths


@pytest.mark.parametrize("method, extra", [("task_arithmetic", []), ("ties", ["--density", "0.3"]),
                                           ("dare_ties", ["--density", "0.5"]), ("dare_linear", ["--density", "0.5"]),
                                           ("magnitude_prune", ["--density", "0.5"])])
def test_merge_models(checkpoints, tmp_path, method, extra):
    root, pre, paths = checkpoints
    out = tmp_path / "merged.safetensors"
    assert run_cli("merge-models", "--models", *paths, "--base", str(root / "base.safetensors"), "--method", method,
                   "--weights", "1", "0.5", "-0.2", "--lambda", "0.7", *extra, "--out", str(out)) == 0
    got = load_file(out)
    density = float(extra[1]) if extra else None
    fts = [merging.files.load_checkpoint(p) for p in paths]
    want = merging.merge_state_dicts(pre, fts, [1, 0.5, -0.2], method, density, scaling=0.7, seed=0)
    assert set(got) == set(pre)
    for k in pre:
        torch.testing.assert_close(got[k], want[k])
    model = base_model("mlp")
    model.load_state_dict(got)  # a loadable checkpoint of the same architecture


def test_merge_models_subprocess_and_errors(checkpoints, tmp_path, capsys):
    root, pre, paths = checkpoints
    out = tmp_path / "m.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "peftlab", "merge-models", "--models", *paths, "--base",
                           str(root / "base.safetensors"), "--method", "ties", "--density", "0.2", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    want = merging.merge_state_dicts(pre, [merging.files.load_checkpoint(p) for p in paths], None, "ties", 0.2)
    got = load_file(out)
    assert all(torch.allclose(got[k], want[k]) for k in pre)

    def fails(*args, match):
        assert run_cli("merge-models", *args) == 1
        err = capsys.readouterr().err
        assert match in err, err

    base = str(root / "base.safetensors")
    fails("--models", *paths, "--base", base, "--method", "ties", "--density", "0.2", "--out", str(out),
          match="--force")
    fails("--models", *paths, "--base", base, "--method", "ties", "--out", str(tmp_path / "n.safetensors"),
          match="needs --density")
    fails("--models", *paths, "--base", base, "--method", "task_arithmetic", "--weights", "1",
          "--out", str(tmp_path / "n.safetensors"), match="3 models and 1 weights")
    short = {k: v for k, v in pre.items() if k != "lin1.bias"}
    save_file(short, str(tmp_path / "short.safetensors"))
    fails("--models", paths[0], str(tmp_path / "short.safetensors"), "--base", base, "--method", "task_arithmetic",
          "--out", str(tmp_path / "n.safetensors"), match="do not hold the same tensors")
    torch.save(pre, tmp_path / "pickled.bin")
    fails("--models", str(tmp_path / "pickled.bin"), "--base", base, "--method", "task_arithmetic",
          "--out", str(tmp_path / "n.safetensors"), match="not a .safetensors file")
    fails("--models", str(tmp_path / "missing.safetensors"), "--base", base, "--method", "task_arithmetic",
          "--out", str(tmp_path / "n.safetensors"), match="does not exist")
    assert not (tmp_path / "n.safetensors").exists()
