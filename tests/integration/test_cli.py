"""The command line, run as a user would (``python -m analysis ...`` in a subprocess)."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis.models.native import save_checkpoint
from analysis.models.transformer import LoopConfig, LoopedTransformer
from analysis.tasks import CHAIN_CHARS
from analysis.models.tokenizers import CharTokenizer
from analysis.trace import Trace

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("LOOPSCOPE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "analysis", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    tok = CharTokenizer(CHAIN_CHARS)
    model = LoopedTransformer(LoopConfig(vocab_size=tok.vocab_size, d_model=16, n_heads=2, d_mlp=32,
                                         context_length=32))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, tok, task={"name": "chain"},
                           card={"note": "random init, for tests"})


def test_trace_then_metrics(checkpoint, tmp_path):
    npz, csv = tmp_path / "t.npz", tmp_path / "m.csv"
    r = run("trace", "--model", checkpoint, "--prompt", "a=7;b=a;?b=", "--iterations", 4, "--seed", 1,
            "--fixed-point-iterations", 16, "--out", npz)
    assert r.returncode == 0, r.stderr
    tr = Trace.load(npz)
    assert tr.states.shape[:3] == (4, 2, 11) and tr.fixed_point is not None and tr.metadata["seed"] == 1
    r = run("metrics", npz, "--out", csv)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(csv)
    assert len(df) == 4 * 2 * 11
    for col in ("token", "token_label", "iteration", "layer", "depth", "relative_depth", "norm", "step_size",
                "cosine_step", "distance_to_fixed_point", "lens_top1", "lens_top1_prob", "answer_prob", "answer_rank"):
        assert col in df.columns


def test_errors_are_one_line_exit_2(checkpoint, tmp_path):
    r = run("trace", "--model", checkpoint, "--prompt", "a=7;B=a;?b=", "--iterations", 2, "--out", tmp_path / "x.npz")
    assert r.returncode == 2
    assert "'B'" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("trace", "--model", tmp_path / "nope", "--prompt", "a=1;?a=", "--out", tmp_path / "x.npz")
    assert r.returncode == 2 and "not a folder" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    r = run("metrics", tmp_path / "junk.npz", "--out", tmp_path / "m.csv")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("metrics")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
