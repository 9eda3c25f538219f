"""Shared fixtures. Tiny models are session-scoped (building one takes ~0.1 s, but
importing TransformerLens takes seconds); the embedded real model is loaded
once for the tests marked ``real``."""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # unit tests must never reach the network
os.environ.setdefault("MECHBIAS_STORE_KEY", "mechbias-tests")  # job stores of tests: no key file in $HOME
torch.set_num_threads(int(os.environ.get("MECHBIAS_THREADS", min(2, os.cpu_count() or 1))))


_SUPPORT = pytest.StashKey[dict]()


@pytest.fixture
def support(request):
    """``support(family, method, path)`` records which path a passing family test ran; with
    ``MECHBIAS_SUPPORT_OUT`` set, the session writes the records there as JSON (the documentation's support
    matrix is rendered from them by ``analyses/support_matrix.py``)."""
    table = request.config.stash.setdefault(_SUPPORT, {})

    def record(family: str, method: str, path: str) -> None:
        table.setdefault(family, {})[method] = path

    return record


def pytest_sessionfinish(session):
    out = os.environ.get("MECHBIAS_SUPPORT_OUT")
    if out and _SUPPORT in session.config.stash:
        Path(out).write_text(json.dumps(session.config.stash[_SUPPORT], indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def tiny():
    """A 2-layer random Llama (Hugging Face backed: KV cache, same adapter as the real model)."""
    from mechbias.core.testing import tiny_model

    return tiny_model(arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_native():
    """A 2-layer TransformerLens-native model built with TransformerBridge.boot_native."""
    from mechbias.core.testing import tiny_model

    return tiny_model(arch="native", seed=0)


@pytest.fixture(scope="session")
def real():
    """The embedded SmolLM2-135M-Instruct."""
    from mechbias.core.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def planted_tiny():
    """A tiny Llama with a planted race bias (shared / finance-only / commerce-only neurons)."""
    from mechbias.groundtruth.staged import tiny_planted_model

    return tiny_planted_model(seed=0)

