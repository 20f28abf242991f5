"""Model families: which family a checkpoint folder holds, and loading it.

``load(folder)`` detects the family and returns a ``LoadedModel`` whose ``model`` implements the
``LoopedLM`` protocol. Each family is one module in ``analysis.models`` with a ``detect(folder)``
and a ``load(folder)``; ``FAMILIES`` lists them in the order they are tried: ``native``
(loopscope's own checkpoints), then ``real`` (Huginn / retrofitted, Ouro and transformers-native
deep models, ``analysis.models.loading``), wrapped in a ``LoadedModel`` whose ``card`` holds the
family, parameter count and dtype, ``task`` is ``{"name": "text"}`` and ``sha256`` is the folder's
fingerprint (config + safetensors headers, not the weights' bytes).

``sample_checkpoints()`` lists the shipped checkpoints (``SAMPLE_DIR``, or ``$LOOPSCOPE_SAMPLE_DIR``).
"""
from __future__ import annotations

import os
from pathlib import Path

from . import native
from .native import CheckpointError, LoadedModel

SAMPLE_DIR = Path(__file__).resolve().parent.parent.parent / "sample_checkpoints"



def _is_real(folder) -> bool:
    from .loading import is_real_folder

    return is_real_folder(folder)


def _real_kind(folder) -> str | None:
    from .loading import declared_kind as real_kind

    return real_kind(folder)


def load_real(folder) -> LoadedModel:
    """A real model folder (``loading.load_folder``, stored dtype, CPU) as a ``LoadedModel``.
    Raises ModelFolderError (a ValueError) naming what is wrong."""
    from .folder import tensor_index
    from .loading import folder_fingerprint, load_folder

    folder = Path(folder).expanduser()
    net = load_folder(folder)
    index = tensor_index(folder)
    param = next(net.parameters())
    card = {"family": net.spec.family, "parameters": sum(p.numel() for p in net.parameters()),
            "dtype": str(param.dtype).replace("torch.", ""), "weights_bytes": sum(t.nbytes for t in index.values()),
            "ignored_files": list(getattr(net, "ignored_files", []))}
    return LoadedModel(model=net, tokenizer=net.tokenizer, config=getattr(net, "cfg", None), card=card,
                       task={"name": "text"}, name=folder.name, path=str(folder), sha256=folder_fingerprint(folder))


def is_real(loaded) -> bool:
    """Whether a LoadedModel (or a Trace's metadata family) is one of the real families, not loopscope's own."""
    return (loaded.spec.family if hasattr(loaded, "spec") else loaded) not in (None, "loopscope")


# family name -> (detect(folder) -> bool, load(folder) -> LoadedModel, kind(folder) -> "looped" | "deep" | None)
FAMILIES = {"native": (native.is_native, native.load_checkpoint, native.declared_kind),
            "real": (_is_real, load_real, _real_kind)}


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
    if family is None:  # the family's own loader names what is missing or wrong
        if _has_model_type(folder):
            return load_real(folder)
        return native.load_checkpoint(folder)
    return FAMILIES[family][1](folder)


def _has_model_type(folder: Path) -> bool:
    """config.json names a ``model_type`` (a transformers-style folder, not a loopscope checkpoint)."""
    import json

    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "model_type" in raw and raw.get("format") is None


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
