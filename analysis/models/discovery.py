"""Which checkpoints the app offers: every supported model folder under the model roots.

Roots: the sample checkpoints (``registry.sample_dir()``, always first) and the folders named in
``$LOOPSCOPE_MODEL_DIRS`` (``os.pathsep``-separated). A model is a folder directly under a root,
or the root itself. Each is described cheaply, from ``config.json`` and the safetensors headers
(no model is built): family, kind, parameters, bytes and dtype. Folders that hold something
else are listed in ``Discovery.skipped`` with the reason.

    discover(roots=None) -> Discovery(models: {name: ModelEntry}, skipped: {path: reason})
    model_roots() -> [Path];  inside_roots(path, roots) -> bool
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import native, registry
from .folder import ModelFolderError, tensor_index

ROOTS_ENV = "LOOPSCOPE_MODEL_DIRS"
FAMILY_NAMES = {"loopscope": "loopscope", "huginn": "Huginn", "ouro": "Ouro", "hf-deep": "transformers"}


@dataclass(frozen=True)
class ModelEntry:
    """One checkpoint folder as the pickers show it. family: "loopscope" | "huginn" | "ouro" |
    "hf-deep"; kind: "looped" | "deep"; parameters: count from the headers; bytes: the weights'
    bytes on disk; dtype: the weights' float dtype(s), e.g. "bfloat16"."""

    name: str
    path: Path
    family: str
    kind: str
    parameters: int
    bytes: int
    dtype: str

    def label(self) -> str:
        """``name · family · 1.2 M`` (a picker option: short enough for the sidebar)."""
        return f"{self.name} · {FAMILY_NAMES.get(self.family, self.family)} · {compact(self.parameters)}"

    def details(self) -> str:
        """``Ouro · 1.2 M parameters · bfloat16 · 2.3 GiB`` (the caption under a picker)."""
        size = f"{self.bytes / 2**30:.2f} GiB" if self.bytes >= 2**28 else f"{self.bytes / 2**20:.1f} MiB"
        return f"{FAMILY_NAMES.get(self.family, self.family)} · {self.parameters:,} parameters · {self.dtype} · {size}"


@dataclass
class Discovery:
    """models: name -> ModelEntry (sample checkpoints first); skipped: folder -> why it is not offered."""

    models: dict[str, ModelEntry] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def compact(n: int) -> str:
    """A parameter count as 812, 35.2 k, 1.87 M or 1.41 B."""
    for div, unit in ((1e9, " B"), (1e6, " M"), (1e3, " k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def model_roots(env: str | None = None) -> list[Path]:
    """The sample directory, then each folder of ``$LOOPSCOPE_MODEL_DIRS`` (or ``env``), resolved,
    without repeats; empty entries are skipped."""
    raw = os.environ.get(ROOTS_ENV, "") if env is None else env
    roots = [registry.sample_dir().expanduser().resolve()]
    for part in raw.split(os.pathsep):
        if part.strip():
            p = Path(part.strip()).expanduser().resolve()
            if p not in roots:
                roots.append(p)
    return roots


def inside_roots(path, roots=None) -> bool:
    """Whether ``path`` is a root or lies under one (symbolic links resolved first)."""
    try:
        p = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    return any(p == r or r in p.parents for r in (model_roots() if roots is None else roots))


def describe_folder(path) -> ModelEntry:
    """The picker entry of one folder, from config.json and the safetensors headers. Raises
    ModelFolderError / CheckpointError (both ValueError) naming what is wrong."""
    from .loading import declared_kind, detect_family

    folder = Path(path)
    family = detect_family(folder)
    index = tensor_index(folder)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in index.values() if t.dtype.is_floating_point})
    nbytes = sum(t.nbytes for t in index.values())
    params = sum(t.nbytes // torch.empty((), dtype=t.dtype).element_size() for t in index.values())
    if family == "loopscope":
        kind = native.declared_kind(folder)
        try:
            params = native.count_parameters(json.loads((folder / "config.json").read_text())["model"])
        except (native.CheckpointError, KeyError, TypeError, ValueError):
            pass  # the header count stands; loading names the problem
    else:
        kind = declared_kind(folder)
        params = _real_parameters(folder, family, index, params)
    if kind not in ("looped", "deep"):
        raise ModelFolderError(f"{folder}: does not declare whether it is looped or deep")
    return ModelEntry(name=folder.name, path=folder, family=family, kind=kind, parameters=int(params),
                      bytes=int(nbytes), dtype="/".join(dtypes) or "?")


def _real_parameters(folder: Path, family: str, index: dict, header_count: int) -> int:
    """Parameters of the model a real folder builds, without building it: the shapes its config
    needs (Huginn, Ouro: a duplicate ``lm_head`` of tied embeddings and a stray ``freqs_cis`` are
    not parameters), else every tensor but a tied ``lm_head``."""
    import math

    from .folder import read_config

    cfg = read_config(folder)
    if family in ("huginn", "ouro"):
        if family == "huginn":
            from .huginn import HuginnConfig as Cfg
        else:
            from .ouro import OuroConfig as Cfg
        return sum(math.prod(shape) for shape in Cfg.from_folder(cfg, index, folder).expected_shapes().values())
    if cfg.get("tie_word_embeddings", True) and "lm_head.weight" in index:
        info = index["lm_head.weight"]
        return header_count - math.prod(info.shape)
    return header_count


def _candidates(root: Path) -> list[Path]:
    if (root / "config.json").is_file():
        return [root]
    try:
        return [p for p in sorted(root.iterdir()) if p.is_dir() and (p / "config.json").is_file()]
    except OSError:
        return []


def discover(roots=None, describe=describe_folder) -> Discovery:
    """Every supported checkpoint under ``roots`` (default ``model_roots()``). Names are folder
    names; a name met again under a later root becomes ``root-name/folder-name``. ``describe``:
    the per-folder function (the app passes a cached one)."""
    out = Discovery()
    for root in (model_roots() if roots is None else [Path(r) for r in roots]):
        if not root.is_dir():
            out.skipped[str(root)] = "not a folder"
            continue
        for folder in _candidates(root):
            try:
                entry = describe(folder)
            except (ValueError, OSError) as exc:  # ModelFolderError, CheckpointError, unreadable files
                out.skipped[str(folder)] = str(exc)
                continue
            name = entry.name if entry.name not in out.models else f"{root.name}/{entry.name}"
            if name in out.models:
                out.skipped[str(folder)] = f"another model is already listed as {name!r}"
                continue
            out.models[name] = ModelEntry(**{**entry.__dict__, "name": name})
    return out
