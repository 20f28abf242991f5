"""The command line on real-format model folders: inspect, trace (the .npz replays), clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from analysis.cli import main
from analysis.models.synthetic import write_huginn_folder, write_ouro_folder
from analysis.trace import Trace

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("LOOPSCOPE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "analysis", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_inspect_and_trace_huginn_folder(tmp_path, capsys):
    folder = write_huginn_folder(tmp_path / "huginn-tiny", variant="huginn", shards=2, freqs_cis=True)
    (folder / "modeling_raven.py").write_text("raise SystemExit('executed')\n")
    assert main(["inspect", str(folder)]) == 0
    shown = capsys.readouterr().out
    assert "huginn" in shown and "(1, 2⊗r, 1)" in shown and "modeling_raven.py" in shown
    out = tmp_path / "t.npz"
    r = run("trace", "--model", folder, "--prompt", "x = 3; y = x", "--iterations", 3, "--seed", 4, "--out", out)
    assert r.returncode == 0, r.stderr
    tr = Trace.load(out)
    assert tr.states.shape[:2] == (3, 2) and tr.metadata["seed"] == 4
    # an outside check replays the file: tokens + initial_state -> the same logits
    from analysis.models.loading import load_folder

    model = load_folder(folder)
    with torch.no_grad():
        logits = model(torch.from_numpy(tr.tokens.copy())[None], iterations=3,
                       input_states=torch.from_numpy(tr.initial_state.copy())[None])[0]
    np.testing.assert_allclose(tr.logits, logits.numpy(), atol=1e-5)


def test_cli_errors_on_bad_real_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOOPSCOPE_DEBUG", raising=False)
    folder = write_ouro_folder(tmp_path / "ouro", total_ut_steps=2)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, model_type="not_a_model")))
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "not supported" in err and len(err.strip().splitlines()) == 1
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "tokenizer.json").unlink()
    assert main(["trace", "--model", str(folder), "--prompt", "hi", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and len(err.strip().splitlines()) == 1
