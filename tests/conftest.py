"""Shared test setup: one CPU thread, quiet known warnings, and cached tiny base models.

The machine running the suite is shared, so every test process uses one thread. Tiny models are built
once per (name, seed) and handed out as deep copies (building Llama's config the first time is slow).
"""

from __future__ import annotations

import copy
import os
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Known noise: peft 0.21.2 on transformers 5.x emits a FutureWarning on every call.
warnings.filterwarnings("ignore", category=FutureWarning)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning")
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning")


_BASE_CACHE: dict[tuple[str, int], torch.nn.Module] = {}


def base_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A fresh copy of tiny model ``name`` built under ``seed`` (built once, then deep-copied)."""
    from peftlab.lab.models import tiny_model

    key = (name, seed)
    if key not in _BASE_CACHE:
        _BASE_CACHE[key] = tiny_model(name, seed)
    return copy.deepcopy(_BASE_CACHE[key])


@pytest.fixture
def make_base():
    """``make_base(name, seed=0)`` -> a fresh tiny model (see :func:`base_model`)."""
    return base_model


@pytest.fixture
def adapter_dir(tmp_path):
    """An empty folder for one test's adapter files."""
    path = tmp_path / "adapter"
    path.mkdir()
    return path
