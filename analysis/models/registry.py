"""Model families: which family a checkpoint folder holds, and loading it.

``load(folder)`` detects the family and returns a ``LoadedModel`` whose ``model`` implements the
``LoopedLM`` protocol. Each family is one module in ``analysis.models`` with a ``detect(folder)``
and a ``load(folder)``; ``FAMILIES`` lists them in the order they are tried. Today: ``native``
(loopscope's own checkpoints).

``sample_checkpoints()`` lists the shipped checkpoints (``SAMPLE_DIR``, or ``$LOOPSCOPE_SAMPLE_DIR``).
"""
from __future__ import annotations

import os
from pathlib import Path

from . import native
from .native import CheckpointError, LoadedModel

SAMPLE_DIR = Path(__file__).resolve().parent.parent.parent / "sample_checkpoints"

# family name -> (detect(folder) -> bool, load(folder) -> LoadedModel, kind(folder) -> "looped" | "deep" | None)
FAMILIES = {"native": (native.is_native, native.load_checkpoint, native.declared_kind)}


def family_of(folder) -> str | None:
    """The name of the first family whose ``detect`` accepts ``folder``; None when none does."""
    folder = Path(folder).expanduser()
    return next((name for name, (detect, _, _) in FAMILIES.items() if detect(folder)), None)


def load(folder) -> LoadedModel:
    """Load a checkpoint folder of any known family (CPU, eval mode). Raises CheckpointError
    with a clear reason (not a folder, no known family, or the family's own checks)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    family = family_of(folder)
    if family is None:  # the native loader names what is missing or wrong
        return native.load_checkpoint(folder)
    return FAMILIES[family][1](folder)


def declared_kind(folder) -> str | None:
    """"looped" or "deep" as a folder's files declare it (no weights loaded); None if unknown."""
    family = family_of(folder)
    return FAMILIES[family][2](Path(folder).expanduser()) if family else None


def sample_dir() -> Path:
    """Where the sample checkpoints are: ``$LOOPSCOPE_SAMPLE_DIR``, else ``SAMPLE_DIR``."""
    return Path(os.environ.get("LOOPSCOPE_SAMPLE_DIR") or SAMPLE_DIR).expanduser()


def sample_checkpoints(root=None) -> dict[str, Path]:
    """Checkpoint folders (with a config.json) under ``root`` (default ``sample_dir()``), by name."""
    root = Path(root) if root is not None else sample_dir()
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.json").is_file()}
