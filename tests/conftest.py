"""Session-scoped tiny checkpoints and an isolated statecast store for every test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import factories  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture()
def one_thread():
    """Tiny tensors gain nothing from threads, and one thread keeps a test fast on a busy
    machine (no thread-pool barriers waiting on a descheduled worker)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("STATECAST_HOME", str(tmp_path_factory.mktemp("store")))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    """RwkvForCausalLM, safetensors, with a tokenizer."""
    return factories.hf_rwkv(tmp_path_factory.mktemp("hf") / "rwkv-tiny")


@pytest.fixture(scope="session")
def hf_bin_dir(tmp_path_factory) -> Path:
    return factories.hf_rwkv(tmp_path_factory.mktemp("hfbin") / "rwkv-tiny-bin", fmt="bin", seed=1)


@pytest.fixture(scope="session")
def hf_sharded_dir(tmp_path_factory) -> Path:
    return factories.hf_rwkv(tmp_path_factory.mktemp("hfshard") / "rwkv-tiny-sharded", seed=2, shard="60KB")


@pytest.fixture(scope="session")
def native_pth(tmp_path_factory) -> Path:
    return factories.native_rwkv4(tmp_path_factory.mktemp("native") / "rwkv4")


@pytest.fixture(scope="session")
def pulled_hf(hf_dir, tmp_path_factory) -> Path:
    """The HF fixture converted once (read-only for tests: copy before modifying)."""
    from statecast.convert.pull import pull

    return Path(pull(str(hf_dir), out=tmp_path_factory.mktemp("pulled") / "rwkv-tiny", progress=False)["path"])
