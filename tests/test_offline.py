"""smoke and cpu never touch the network: the hub libraries are offline and nothing waits on a timeout.

A child process does what a chapter does first (profile set-up, transformers and datasets imports, a model
and tokenizer from a folder, an adapter config, the simulated GPU section's hub models) and counts every
socket connection it tries. It runs once with the network as it is and once with it unreachable (a network
namespace without interfaces when ``unshare -n`` works, and proxies pointing at a blackhole address either
way): no connection attempt, and the unreachable run takes no longer than the other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import socket, sys, time
tried = []
_connect = socket.socket.connect
def connect(self, address):
    tried.append(address)
    return _connect(self, address)
socket.socket.connect = connect
socket.socket.connect_ex = lambda self, address: (tried.append(address), _connect(self, address))[1]
start = time.perf_counter()
from peftlab.lab import profile
P = profile.setup(quiet=True)
import datasets, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from peftlab import PeftConfig, PeftModel
base = P.hub("facebook/opt-350m")          # simulated: a local folder
model = AutoModelForCausalLM.from_pretrained(base)
tok = AutoTokenizer.from_pretrained(base)
config = PeftConfig.from_pretrained(P.hub("ybelkada/opt-350m-lora"))
lora = PeftModel.from_pretrained(model, P.hub("ybelkada/opt-350m-lora"), allow_pickle=True)
ids = tok(["Hello, my name is"], return_tensors="pt")
lora.generate(**ids, max_new_tokens=4, do_sample=False)
try:                                       # a hub id: offline mode must refuse at once, not time out
    AutoTokenizer.from_pretrained("facebook/opt-350m")
except OSError:
    pass
import os
print("offline", os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
print("tried", len(tried), tried[:3])
print("seconds", time.perf_counter() - start)
"""

BLACKHOLE = "http://10.255.255.1:9"  # unroutable: a connection would hang until its timeout


def _run(unreachable: bool, profile: str = "smoke") -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    env.update(PYTHONPATH=str(ROOT), PEFTLAB_PROFILE=profile, PEFTLAB_GPU_SIM="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", CHILD]
    if unreachable:
        env.update(HTTP_PROXY=BLACKHOLE, HTTPS_PROXY=BLACKHOLE, http_proxy=BLACKHOLE, https_proxy=BLACKHOLE)
        if _can_unshare():
            cmd = ["unshare", "-n", *cmd]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return time.perf_counter() - start, done.stdout


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["smoke", "cpu"])
def test_no_network_and_no_wait_for_it(profile: str) -> None:
    t_net, out_net = _run(False, profile)
    t_off, out_off = _run(True, profile)
    for out in (out_net, out_off):
        assert "offline 1 1 1" in out, out
        assert "tried 0 " in out, f"the chapter set-up tried to connect: {out}"
    # the same work either way: an unreachable network costs nothing (no timeouts waited on)
    assert t_off <= 1.5 * t_net + 5.0, (t_net, t_off)
    print(f"{profile}: network {t_net:.1f}s, unreachable {t_off:.1f}s (unshare -n: {_can_unshare()})")


def test_user_choice_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftlab.lab import profile

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    profile.go_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "0" and os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_makefile_sets_offline_for_smoke_and_cpu() -> None:
    make = (ROOT / "Makefile").read_text()
    assert "OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1" in make
    assert "PEFTLAB_PROFILE=smoke PEFTLAB_GPU_SIM=1 $(OFFLINE)" in make
    assert "ifneq ($(filter smoke cpu,$(PEFTLAB_PROFILE)),)" in make
