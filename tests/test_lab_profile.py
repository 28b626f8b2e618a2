"""Profiles: names, defaults, pick, setup."""

import random

import numpy as np
import pytest
import torch

from peftlab.lab import profile


def test_valid_names(monkeypatch):
    for name in ("smoke", "cpu"):
        monkeypatch.setenv("PEFTLAB_PROFILE", name)
        P = profile.current()
        assert P.name == name
        assert P.device == torch.device("cpu")


def test_name_is_case_insensitive(monkeypatch):
    monkeypatch.setenv("PEFTLAB_PROFILE", " Smoke ")
    assert profile.current().name == "smoke"


def test_default_without_env(monkeypatch):
    monkeypatch.delenv("PEFTLAB_PROFILE", raising=False)
    expected = "gpu" if torch.cuda.is_available() else "cpu"
    assert profile.current().name == expected


def test_unknown_name_lists_valid_ones(monkeypatch):
    monkeypatch.setenv("PEFTLAB_PROFILE", "turbo")
    with pytest.raises(ValueError, match="turbo") as err:
        profile.current()
    for name in profile.PROFILES:
        assert name in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="CUDA"):
        profile.get("gpu")


def test_pick():
    smoke = profile.Profile("smoke", torch.device("cpu"))
    cpu = profile.Profile("cpu", torch.device("cpu"))
    gpu = profile.Profile("gpu", torch.device("cpu"))  # device does not matter for pick
    assert smoke.pick(smoke=1, cpu=2, gpu=3) == 1
    assert cpu.pick(smoke=1, cpu=2, gpu=3) == 2
    assert gpu.pick(smoke=1, cpu=2, gpu=3) == 3
    assert gpu.pick(smoke=1, cpu=2) == 2  # gpu defaults to the cpu value
    assert gpu.pick(smoke=1, cpu=2, gpu=None) == 2


def test_setup_seeds_and_prints(monkeypatch, capsys):
    monkeypatch.setenv("PEFTLAB_PROFILE", "smoke")
    monkeypatch.delenv("PEFTLAB_THREADS", raising=False)
    P = profile.setup(seed=3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    profile.setup(seed=3)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b
    out = capsys.readouterr().out
    assert "smoke" in out and "cpu" in out and "torch" in out and "transformers" in out and "peftlab" in out
    assert P.name == "smoke"


def test_setup_threads(monkeypatch):
    monkeypatch.setenv("PEFTLAB_PROFILE", "smoke")
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("PEFTLAB_THREADS", "1")
        profile.setup(quiet=True)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.delenv("PEFTLAB_THREADS")
        profile.setup(quiet=True)  # smoke without PEFTLAB_THREADS: one thread
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("PEFTLAB_THREADS", "many")
        with pytest.raises(ValueError, match="PEFTLAB_THREADS"):
            profile.setup(quiet=True)
    finally:
        torch.set_num_threads(before)
