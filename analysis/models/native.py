"""loopscope's own checkpoint folders: ``config.json`` + ``model.safetensors`` + ``card.json``
(+ ``README.md``).

Weights load with safetensors only, so opening a checkpoint never executes code from it.
``config.json`` = {"format": "loopscope-checkpoint", "version": 2, "model": LoopConfig fields
(``kind`` included), "tokenizer": {"type": "char", "chars": ...}, "task": {...}}. Version 1 files
were written before ``kind`` was declared; for them alone it is read off the one layout that
``LoopConfig.deep`` wrote (``_legacy_kind``). The card's ``trained_iterations`` entry becomes the
model's ``TrainedSchedule``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .spec import ModelSpec, TrainedSchedule
from .tokenizers import CharTokenizer
from .transformer import LoopConfig, LoopedTransformer

FORMAT = "loopscope-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)


def _legacy_kind(model: dict) -> str:
    """``kind`` of a version-1 config (written before it was declared): "deep" exactly for the
    layout ``LoopConfig.deep`` produced (one iteration, no prelude, coda or injection)."""
    deep = (model.get("iterations") == 1 and model.get("n_prelude") == 0 and model.get("n_coda") == 0
            and model.get("injection") == "none")
    return "deep" if deep else "looped"


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

    @property
    def spec(self) -> ModelSpec:
        """The model's declared ModelSpec (kind, p/k/c, trained schedule)."""
        return self.model.spec


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
    if raw.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{cfg_path} has format version {raw.get('version')!r}; this loopscope reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    try:
        model_entry = dict(raw["model"])
        if raw["version"] == 1:
            model_entry.setdefault("kind", _legacy_kind(model_entry))
        config = LoopConfig.from_dict(model_entry)
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
    card = {}
    if (folder / "card.json").is_file():
        try:
            card = json.loads((folder / "card.json").read_text())
        except json.JSONDecodeError:
            card = {"warning": "card.json is not valid JSON"}
    schedule = TrainedSchedule.from_card(card.get("trained_iterations") if isinstance(card, dict) else None,
                                         config.iterations)
    if schedule.mean != config.iterations:
        raise CheckpointError(f"{folder / 'card.json'}: trained_iterations mean {schedule.mean} differs from the "
                              f"config's iterations {config.iterations}")
    model = LoopedTransformer(config, schedule=schedule, tokenizer=tokenizer)
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
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, card=card, task=raw.get("task", {}),
                       name=folder.name, path=str(folder), sha256=file_sha256(weights))


def is_native(folder: Path) -> bool:
    """True when ``folder/config.json`` declares the loopscope checkpoint format."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("format") == FORMAT


def declared_kind(folder: Path) -> str | None:
    """"looped" or "deep" as ``folder/config.json`` declares it (version 1: ``_legacy_kind``),
    without loading weights; None when the file is not a readable loopscope config."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
        model = raw["model"]
        return model.get("kind") or (_legacy_kind(model) if raw.get("version") == 1 else None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
