"""Checkpoint folders: ``config.json`` + ``model.safetensors`` + ``card.json`` (+ ``README.md``).

Weights load with safetensors only, so opening a checkpoint never executes code from it.
``config.json`` = {"format": "loopscope-checkpoint", "version": 1, "model": LoopConfig fields,
"tokenizer": {"type": "char", "chars": ...}, "task": {...}}.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import LoopConfig, LoopedTransformer
from .tokenizer import CharTokenizer

FORMAT = "loopscope-checkpoint"
VERSION = 1
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_checkpoints"


class CheckpointError(ValueError):
    """A folder is not a loadable loopscope checkpoint; the message says what is wrong."""


@dataclass
class LoadedModel:
    """A model ready to run, with what a user needs to know about it."""

    model: LoopedTransformer
    tokenizer: CharTokenizer
    config: LoopConfig
    card: dict
    task: dict
    name: str        # folder name
    path: str
    sha256: str      # of model.safetensors, first 16 hex digits
    extra: dict = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def save_checkpoint(folder, model: LoopedTransformer, tokenizer: CharTokenizer, task: dict,
                    card: dict, readme: str = "") -> Path:
    """Write a checkpoint folder; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "version": VERSION, "model": model.cfg.to_dict(),
              "tokenizer": tokenizer.to_dict(), "task": task}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": FORMAT})
    (folder / "card.json").write_text(json.dumps(card, indent=2))
    if readme:
        (folder / "README.md").write_text(readme)
    return folder


def load_checkpoint(folder) -> LoadedModel:
    """Load a checkpoint folder (CPU, eval mode). Raises CheckpointError with a clear reason."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    missing = [p.name for p in (cfg_path, weights) if not p.is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a loopscope checkpoint: missing {', '.join(missing)}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} is not a loopscope config (no \"format\": \"{FORMAT}\"); "
                              "foreign checkpoints need a converter")
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{cfg_path} has format version {raw.get('version')!r}; this loopscope reads {VERSION}")
    try:
        config = LoopConfig.from_dict(raw["model"])
        tokenizer = CharTokenizer.from_dict(raw["tokenizer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path} has a bad model or tokenizer entry: {exc}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{cfg_path}: tokenizer has {tokenizer.vocab_size} characters, "
                              f"model expects {config.vocab_size}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} cannot be read as safetensors: {exc}") from None
    model = LoopedTransformer(config)
    expected = model.state_dict()
    if set(state) != set(expected):
        extra, lacking = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise CheckpointError(f"{weights} does not match its config: unexpected {extra[:5]}, missing {lacking[:5]}")
    bad = [k for k in state if state[k].shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{weights} does not match its config: wrong shapes for {bad[:5]}")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{weights} holds NaN or infinite weights in {nonfinite[:5]}")
    model.load_state_dict(state)
    model.eval()
    card = {}
    if (folder / "card.json").is_file():
        try:
            card = json.loads((folder / "card.json").read_text())
        except json.JSONDecodeError:
            card = {"warning": "card.json is not valid JSON"}
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, card=card, task=raw.get("task", {}),
                       name=folder.name, path=str(folder), sha256=file_sha256(weights))


def sample_checkpoints() -> dict[str, Path]:
    """The shipped checkpoints by folder name."""
    if not SAMPLE_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(SAMPLE_DIR.iterdir()) if (p / "config.json").is_file()}
