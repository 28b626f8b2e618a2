"""peftlab.lab.cache: the cache folder, entry names, atomic writes, build-once under a lock.

The pinned hashes below are the names of entries that readers already have on disk: a change
to how keys are computed would silently orphan every cache (and retrain everything), so it
must be a deliberate edit here too.
"""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest
import torch
import torch.nn as nn

from peftlab.lab import cache as C
from peftlab.lab import digits as D
from peftlab.lab import lm


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv(C.ENV_CACHE, str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------ the folder


def test_cache_root_from_env_argument_and_default(root, tmp_path, monkeypatch):
    assert C.cache_root() == root and root.is_dir()
    assert C.cache_root(tmp_path / "other") == tmp_path / "other"  # the argument wins over the variable
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset in ("", "   "):  # empty or blank means "not set"
        monkeypatch.setenv(C.ENV_CACHE, unset)
        assert C.cache_root() == tmp_path / "home" / ".cache" / "peftlab"
    assert not [p for p in root.iterdir() if p.name.startswith(".write-test-")]  # the probe is removed
    assert D.cache_dir() == C.cache_root()


def test_unwritable_folder_says_which_and_what_to_do(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(C.ENV_CACHE, str(blocker / "cache"))
    with pytest.raises(C.LabCacheError, match=r"\$PEFTLAB_CACHE\) is not writable") as err:
        C.cache_root()
    assert str(blocker / "cache") in str(err.value) and "PEFTLAB_CACHE=/tmp/" in str(err.value)
    assert isinstance(err.value, OSError) and lm.LabCacheError is C.LabCacheError
    with pytest.raises(C.LabCacheError, match="from the cache_dir argument"):
        C.cache_root(blocker / "x")


# ------------------------------------------------------------------ entry names


def test_config_hash_is_pinned():
    h1 = {"format": 1, "harness": "H1", "seed": 0, "steps": 1500, "lr": 1e-3, "batch_size": 64, "hidden": 256}
    assert C.config_hash(h1) == "fcefd3ba9a8050fe"  # ~/.cache/peftlab/digits/h1-mlp-fcefd3ba9a8050fe.safetensors
    assert C.config_hash(dict(reversed(list(h1.items())))) == "fcefd3ba9a8050fe"  # key order does not matter
    assert C.config_hash(h1, length=12) == "fcefd3ba9a80"
    assert C.config_hash({**h1, "seed": 1}) != C.config_hash(h1)


def test_digits_entries_keep_their_names(root):
    small = {"harness": "H1", "seed": 0, "steps": 40, "lr": 1e-3, "batch_size": 64, "hidden": 16}
    D.pretrained_mlp(steps=40, hidden=16)
    expected = root / "digits" / f"h1-mlp-{C.config_hash({'format': D.FORMAT, **small})}.safetensors"
    assert [p.name for p in (root / "digits").glob("*.safetensors")] == [expected.name]
    lock = expected.parent / (expected.name + ".lock")
    assert lock.exists()


def test_lab_lm_key_is_unchanged():
    # the folder names the book's cache already holds for the smoke and cpu recipes
    assert lm.cache_key(lm.lab_config("smoke"), 0, "smoke") == "lab-lm-smoke-seed0-cd41bd6134de"
    assert lm.cache_key(lm.lab_config("cpu"), 0, "cpu") == "lab-lm-cpu-seed0-efbed61e8c77"


# ------------------------------------------------------------------ atomic writes


def test_atomic_path_file_and_folder(root):
    C.cache_root()
    final = root / "f.bin"
    with C.atomic_path(final, suffix=".bin") as tmp:
        assert tmp.parent == root and tmp.name.startswith(".tmp-f.bin-") and tmp.name.endswith(".bin")
        tmp.write_bytes(b"new")
        assert not final.exists()  # nothing at the final name until the block succeeds
    assert final.read_bytes() == b"new" and stat.S_IMODE(final.stat().st_mode) == 0o644
    with pytest.raises(RuntimeError):
        with C.atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert final.read_bytes() == b"new"  # the old entry survives a failed write

    folder = root / "model"
    folder.mkdir()
    (folder / "stale.txt").write_text("from an interrupted older run")
    with C.atomic_path(folder, folder=True) as tmp:
        (tmp / "weights").write_text("w")
    assert sorted(p.name for p in folder.iterdir()) == ["weights"]  # replaced, not merged
    with pytest.raises(KeyboardInterrupt):
        with C.atomic_path(root / "other", folder=True) as tmp:
            (tmp / "weights").write_text("w")
            raise KeyboardInterrupt
    assert not (root / "other").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


# ------------------------------------------------------------------ cached_module


class Counter:
    def __init__(self, value: float = 1.5, delay: float = 0.0):
        self.calls, self.value, self.delay = 0, value, delay

    def __call__(self):
        self.calls += 1
        time.sleep(self.delay)
        m = nn.Linear(3, 2)
        with torch.no_grad():
            m.weight.fill_(self.value)
        return m, {"loss": [2.0, 1.0], "calls": self.calls}


def test_cached_module_builds_once_then_loads(root):
    build = Counter()
    config = {"what": "a test", "n": 3}
    m1, info1 = C.cached_module("unit", "lin", config, build, lambda: nn.Linear(3, 2))
    m2, info2 = C.cached_module("unit", "lin", config, build, lambda: nn.Linear(3, 2))
    assert build.calls == 1 and info1 == info2 == {"loss": [2.0, 1.0], "calls": 1}
    assert m2 is not m1 and torch.equal(m2.weight, m1.weight) and float(m2.weight[0, 0].detach()) == 1.5
    path = C.entry_path("unit", "lin", config)
    assert path == root / "unit" / f"lin-{C.config_hash(config)}.safetensors" and path.exists()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["config"] == '{"n": 3, "what": "a test"}'  # the key can be recomputed from the file
    C.cached_module("unit", "lin", {**config, "n": 4}, build, lambda: nn.Linear(3, 2))
    assert build.calls == 2  # another configuration is another entry


def test_cached_module_rebuilds_unreadable_or_stale_entries(root):
    build = Counter()
    config = {"n": 1}
    C.cached_module("unit", "lin", config, build, lambda: nn.Linear(3, 2))
    path = C.entry_path("unit", "lin", config)
    path.write_bytes(b"not a safetensors file")
    C.cached_module("unit", "lin", config, build, lambda: nn.Linear(3, 2))
    assert build.calls == 2 and path.stat().st_size > 100
    # the module's shape changed without the config saying so: load fails, so it is built again
    m, _ = C.cached_module("unit", "lin", config, lambda: (nn.Linear(3, 4), {}), lambda: nn.Linear(3, 4))
    assert m.weight.shape == (4, 3)


def test_cached_module_failed_build_leaves_nothing(root):
    def broken():
        raise ValueError("training diverged")

    with pytest.raises(ValueError, match="diverged"):
        C.cached_module("unit", "lin", {"n": 2}, broken, lambda: nn.Linear(3, 2))
    assert not [p for p in (root / "unit").iterdir() if p.suffix == ".safetensors" or p.name.startswith(".tmp-")]


def test_parallel_callers_build_once(root):
    build = Counter(delay=0.2)  # widen the race window
    out = []

    def call():
        out.append(C.cached_module("unit", "lin", {"n": 5}, build, lambda: nn.Linear(3, 2)))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert build.calls == 1 and len(out) == 3
    assert all(torch.equal(m.weight, out[0][0].weight) for m, _ in out)


def test_file_lock_is_next_to_its_target(root):
    C.cache_root()
    target = root / "thing"
    with C.file_lock(target, timeout=1) as held:
        assert held.is_locked and os.path.exists(f"{target}.lock")
        with pytest.raises(Exception, match="lock"):  # filelock.Timeout: another holder waits
            C.file_lock(target, timeout=0.05).acquire()
