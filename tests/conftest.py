"""Shared fixtures: tiny random-init models built from configs; nothing is downloaded."""

import os
import signal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture
def default_sigint():
    """Ctrl-C handled as in a fresh process (Python's KeyboardInterrupt), for tests that send SIGINT: after a
    KeyboardInterrupt inside a fit, Lightning sets SIGINT to be ignored for the rest of the process (its graceful
    shutdown), which a later test in the same pytest process would otherwise inherit."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
