"""kill -9 in the middle of a save: the previous folder still loads, and no partial file has a final name.

Three saves, each over a folder that already holds an older version: ``PeftModel.save_pretrained`` (an
adapter folder with a second adapter in a sub-folder), a merged model (``merge_and_unload`` then
``save_pretrained`` inside :func:`peftlab.utils.io.atomic_folder`) and ``python -m peftlab merge`` (the CLI's
``main``). Each runs in a forked child that SIGKILLs itself at one chosen point:

* before each file-system step the save takes (open for writing, rename, link, exchange, delete), and
* in the middle of each file write (half the bytes written, then the kill),

for every such point in turn (the count comes from a dry run), plus kills at random times from the parent
and one ``kill -9`` of a real ``python -m peftlab merge`` process. After every kill the final folder must
hold, byte for byte, either the whole old version or the whole new one, and load.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.utils.io import atomic_folder

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

FS_STEPS = [(os, "replace"), (os, "rename"), (os, "link"), (shutil, "rmtree"), (shutil, "copy2")]


# ---- fault injection in a forked child -----------------------------------------------------------------
def _instrument(kill_at: int, mid_write: bool, counter: list[int], kinds: list[str]) -> None:
    """Patch the file-system steps so that event number ``kill_at`` SIGKILLs this (child) process."""
    import safetensors.torch as st
    import transformers.modeling_utils as tmu

    import peftlab.utils.io as pio

    def event(write: Callable[[], None] | None = None) -> None:
        counter[0] += 1
        kinds.append("w" if write is not None else "s")
        if counter[0] == kill_at:
            if mid_write and write is not None:
                write()  # half a file under the name being written
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(mod, name):
        orig = getattr(mod, name)

        def step(*a, **k):
            event()
            return orig(*a, **k)

        setattr(mod, name, step)

    for mod, name in FS_STEPS:
        wrap(mod, name)
    orig_exchange = pio.exchange_paths

    def exchange(a, b):
        event()
        return orig_exchange(a, b)

    pio.exchange_paths = exchange

    def half(path, data: bytes) -> Callable[[], None]:
        def write() -> None:
            with orig_open(path, "wb") as fh:
                fh.write(data[: len(data) // 2])
        return write

    orig_save_file = st.save_file

    def save_file(tensors, filename, metadata=None):
        event(half(filename, st.save(tensors, metadata=metadata)))
        return orig_save_file(tensors, filename, metadata=metadata)

    pio.save_file = save_file
    tmu.safe_save_file = save_file
    orig_torch_save = torch.save

    def torch_save(obj, f, *a, **k):
        import io

        buf = io.BytesIO()
        orig_torch_save(obj, buf)
        event(half(f, buf.getvalue()) if isinstance(f, (str, os.PathLike)) else None)
        return orig_torch_save(obj, f, *a, **k)

    torch.save = torch_save
    orig_open = builtins.open

    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wxa") and isinstance(file, (str, os.PathLike)):
            fh = orig_open(file, mode, *a, **k)
            if counter[0] + 1 == kill_at and mid_write:
                real_write = fh.write

                def write(data):  # the kill lands in the middle of this file's first write
                    real_write(data[: max(1, len(data) // 2)])
                    fh.flush()
                    os.kill(os.getpid(), signal.SIGKILL)

                fh.write = write
                counter[0] += 1
                return fh
            event(lambda: None)  # a write: mid-write kills land in its first write call
            return fh
        return orig_open(file, mode, *a, **k)

    builtins.open = open_


def _in_child(save: Callable[[], None], kill_at: int, mid_write: bool) -> tuple[str, str]:
    """Fork; the child runs ``save`` with the fault armed. ('killed', '') or ('done', kinds of the events seen:
    's' a file-system step, 'w' a file write)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            counter, kinds = [0], []
            _instrument(kill_at, mid_write, counter, kinds)
            save()
            os.write(w, "".join(kinds).encode())
        except BaseException:  # noqa: BLE001 - report, never return into pytest
            import traceback

            traceback.print_exc()
            code = 3
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as fh:
        seen = fh.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return "killed", ""
    assert os.WEXITSTATUS(status) == 0, f"the save raised in the child (status {os.WEXITSTATUS(status)})"
    return "done", seen


# ---- what a folder holds -----------------------------------------------------------------------------------
def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_after_kill(final: Path, versions: dict[str, dict[str, str]], load: Callable[[Path], str]) -> str:
    """The folder is one whole version (byte for byte) and loads as that version; stray entries are hidden temps."""
    assert final.is_dir(), f"{final} is gone"
    now = _digest(final)
    match = [name for name, digest in versions.items() if digest == now]
    assert match, f"{final} holds a mix or a partial file: {sorted(now)}"
    assert load(final) == match[0]
    strays = [p.name for p in final.parent.iterdir() if p != final and not p.name.startswith(".tmp-")]
    assert not strays, strays
    return match[0]


def _sweep(final: Path, reset: Callable[[], None], save: Callable[[], None],
           versions: dict[str, dict[str, str]], load: Callable[[Path], str]) -> dict[str, int]:
    """Kill at every event, before it and (for writes) in the middle; returns counts for the report."""
    reset()
    status, kinds = _in_child(save, kill_at=10**9, mid_write=False)  # dry run: list the events
    assert status == "done" and "w" in kinds
    assert _check_after_kill(final, versions, load) == "new"
    seen = {"old": 0, "new": 0}
    points = [(k, False) for k in range(1, len(kinds) + 1)] + [(k, True) for k, c in enumerate(kinds, 1) if c == "w"]
    for k, mid in points:
        reset()
        status, _ = _in_child(save, k, mid)
        assert status == "killed"
        seen[_check_after_kill(final, versions, load)] += 1
        for p in final.parent.glob(".tmp-*"):  # leftovers of the killed save: hidden, and removable
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return {"steps": kinds.count("s"), "writes": kinds.count("w"), "kills": len(points), **seen}


# ---- 1. PeftModel.save_pretrained ---------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def _adapter_model(seed: int) -> PeftModel:
    model = get_peft_model(_mlp(), LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


X = torch.randn(4, 32, generator=torch.Generator().manual_seed(9))


def test_kill_during_adapter_save_pretrained(tmp_path: Path) -> None:
    final = tmp_path / "work" / "adapter"
    old, new = _adapter_model(1), _adapter_model(2)
    outputs = {}
    for name, m in (("old", old), ("new", new)):
        ref = tmp_path / f"ref-{name}"
        m.save_pretrained(ref)
        with torch.no_grad():
            outputs[name] = m(X)
    versions = {name: _digest(tmp_path / f"ref-{name}") for name in ("old", "new")}

    def reset() -> None:
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(tmp_path / "ref-old", final)

    def load(folder: Path) -> str:
        loaded = PeftModel.from_pretrained(_mlp(), folder)
        loaded.load_adapter(folder / "second", adapter_name="second")
        with torch.no_grad():
            out = loaded(X)
        return next(n for n, o in outputs.items() if torch.equal(o, out))

    counts = _sweep(final, reset, lambda: new.save_pretrained(final), versions, load)
    print("adapter save_pretrained:", counts)
    assert counts["old"] > 0 and counts["new"] > 0  # the kill points span the save


# ---- 2. a merged model: merge_and_unload + save_pretrained -----------------------------------------------------
def _merged(seed: int) -> nn.Module:
    from peftlab.lab.models import tiny_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.merge_and_unload()


def test_kill_during_merged_model_save(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    final = tmp_path / "work" / "merged"
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    models = {"old": _merged(1), "new": _merged(2)}
    outputs = {}
    for name, m in models.items():
        m.save_pretrained(tmp_path / f"ref-{name}")
        with torch.no_grad():
            outputs[name] = m.eval()(ids).logits
    versions = {name: _digest(tmp_path / f"ref-{name}") for name in models}

    def reset() -> None:
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(tmp_path / "ref-old", final)

    def load(folder: Path) -> str:
        with torch.no_grad():
            out = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
        return next(n for n, o in outputs.items() if torch.equal(o, out))

    def save() -> None:
        with atomic_folder(final) as tmp:
            models["new"].save_pretrained(tmp)

    counts = _sweep(final, reset, save, versions, load)
    print("merged model save:", counts)

    # the control: transformers' own save_pretrained writes in place, and a kill leaves a broken folder
    reset()
    status, _ = _in_child(lambda: models["new"].save_pretrained(final), kill_at=1, mid_write=True)
    assert status == "killed"
    assert _digest(final) not in versions.values()


# ---- 3. python -m peftlab merge --------------------------------------------------------------------------------
def _adapter_dirs(tmp_path: Path) -> list[Path]:
    dirs = []
    for seed in (1, 2, 3):
        m = get_peft_model(_mlp(), LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g))
        m.save_pretrained(tmp_path / f"a{seed}")
        dirs.append(tmp_path / f"a{seed}")
    return dirs


def test_kill_during_cli_merge(tmp_path: Path) -> None:
    from peftlab.cli import main

    a1, a2, a3 = (str(d) for d in _adapter_dirs(tmp_path))
    final = tmp_path / "work" / "merged"
    args = {"old": ["merge", "--adapters", a1, a2, "--method", "linear"],
            "new": ["merge", "--adapters", a1, a2, a3, "--method", "ties", "--density", "0.5"]}
    for name, a in args.items():
        assert main([*a, "--out", str(tmp_path / f"ref-{name}")]) == 0
    versions = {name: _digest(tmp_path / f"ref-{name}") for name in args}

    def reset() -> None:
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(tmp_path / "ref-old", final)

    def load(folder: Path) -> str:
        loaded = PeftModel.from_pretrained(_mlp(), folder)
        with torch.no_grad():
            out = loaded(X)
        for name in versions:
            with torch.no_grad():
                if torch.equal(PeftModel.from_pretrained(_mlp(), tmp_path / f"ref-{name}")(X), out):
                    return name
        raise AssertionError("loads, but as neither version")

    def save() -> None:
        assert main([*args["new"], "--out", str(final), "--force"]) == 0

    counts = _sweep(final, reset, save, versions, load)
    print("python -m peftlab merge:", counts)

    # and a real process, killed with SIGKILL from outside at random moments of its last 40 % (the save is at
    # the end of a run that mostly imports)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "peftlab", *args["new"], "--out", str(final), "--force"]
    reset()
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    full = time.perf_counter() - start
    rng = random.Random(0)
    outcomes = []
    for _ in range(4):
        reset()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.6, 1.0) * full)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcomes.append(_check_after_kill(final, versions, load))
    print(f"python -m peftlab merge ({full:.1f}s), killed from outside:", outcomes)


def test_kill_at_random_times_during_repeated_adapter_saves(tmp_path: Path) -> None:
    """The parent SIGKILLs a child that saves two versions alternately, at random times."""
    final = tmp_path / "work" / "adapter"
    models = {"a": _adapter_model(1), "b": _adapter_model(2)}
    for name, m in models.items():
        m.save_pretrained(tmp_path / f"ref-{name}")
    versions = {name: _digest(tmp_path / f"ref-{name}") for name in models}
    shutil.copytree(tmp_path / "ref-a", final)

    def load(folder: Path) -> str:
        loaded = PeftModel.from_pretrained(_mlp(), folder)
        with torch.no_grad():
            out = loaded(X)
            return next(n for n, m in models.items() if torch.equal(m(X), out))

    rng = random.Random(1)
    seen = []
    for _ in range(20):
        pid = os.fork()
        if pid == 0:
            try:
                while True:
                    for name in ("b", "a"):
                        models[name].save_pretrained(final)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.append(_check_after_kill(final, versions, load))
    print("random kills:", {v: seen.count(v) for v in versions})
