"""Shared fixtures. Keep this file small; append new fixtures at the end."""
import os
from pathlib import Path

import pytest
import torch

from analysis.models.transformer import LoopConfig, LoopedTransformer
from analysis.tasks import CHAIN_CHARS
from analysis.models.tokenizers import CharTokenizer

if "OMP_NUM_THREADS" not in os.environ:
    # One intra-op thread unless OMP_NUM_THREADS says otherwise: these models are tiny, and with
    # 2 threads on a busy 2-core machine (training running beside) a small lab run measured
    # 2.5-5 s instead of 0.04 s (OpenMP threads waiting on each other).
    torch.set_num_threads(1)
# the app warms UMAP's compiled code in a background thread when a server starts; tests that need
# UMAP compile it themselves (test_bounds checks the warm-up), the others should not pay for it
os.environ.setdefault("LOOPSCOPE_WARM_UMAP", "0")


@pytest.fixture
def tiny_model():
    """A seeded (1, 2⊗r, 1) looped chain model, d 32, 2 heads (fresh per test)."""
    torch.manual_seed(0)
    return LoopedTransformer(LoopConfig(vocab_size=len(CHAIN_CHARS), d_model=32, n_heads=2, d_mlp=64)).eval()


@pytest.fixture
def chain_tokenizer():
    """CharTokenizer over the chain vocabulary."""
    return CharTokenizer(CHAIN_CHARS)


@pytest.fixture
def sample_dir():
    """The repository's sample_checkpoints folder (it may be empty while models train)."""
    return Path(__file__).parents[1] / "sample_checkpoints"


@pytest.fixture(scope="module")
def real_samples():
    """App tests run on the shipped checkpoints: unset LOOPSCOPE_SAMPLE_DIR for the module."""
    folder = Path(__file__).parents[1] / "sample_checkpoints"
    assert (folder / "chain-looped" / "config.json").is_file(), "sample_checkpoints/chain-looped is missing"
    old = os.environ.pop("LOOPSCOPE_SAMPLE_DIR", None)
    yield folder
    if old is not None:
        os.environ["LOOPSCOPE_SAMPLE_DIR"] = old
