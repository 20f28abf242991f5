"""Reading a Hugging Face style model folder safely: config.json, safetensors headers and tensors.

Nothing here imports or runs code from the folder: weights come from ``*.safetensors`` only
(single file or shards with ``model.safetensors.index.json``), pickle files (``.bin``, ``.pt``,
``.pth``, ``.ckpt``) are refused, and ``modeling_*.py`` files are never imported. Tensor names,
shapes and dtypes are read from the safetensors headers (a few kilobytes) so a folder can be
checked against its config before any weight is allocated.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype tag -> torch dtype
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class FolderConfig:
    """Base of a family's config dataclass: ``to_dict()`` for the Trace's metadata."""

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


class ModelFolderError(ValueError):
    """A folder cannot be opened as a model; the message names the folder, what was found and why."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it."""

    name: str
    shape: tuple
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def read_config(folder: Path) -> dict:
    """config.json of ``folder`` as a dict; ModelFolderError when absent or not a JSON object."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelFolderError(f"{folder}: no config.json (found: {describe_contents(folder)})")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ModelFolderError(f"{path} does not hold a JSON object")
    return cfg


def describe_contents(folder: Path, limit: int = 12) -> str:
    """A short listing of the files in ``folder`` for error messages."""
    try:
        names = sorted(p.name for p in Path(folder).iterdir())
    except OSError:
        return "nothing readable"
    if not names:
        return "an empty folder"
    more = f", … {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _read_header(path: Path) -> dict:
    """The JSON header of one safetensors file (without reading the data)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelFolderError(f"{path} is too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > min(size - 8, 100 << 20):
                raise ModelFolderError(f"{path} is not a safetensors file (header length {n} bytes)")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path} cannot be read as safetensors: {exc}") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{path} has a malformed safetensors header")
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            ok = 0 <= start <= end <= data_size and entry["dtype"] in _DTYPES
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelFolderError(f"{path}: tensor {name!r} has a bad header entry or lies past the end of the "
                                   f"file (truncated download?)")
    return header


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of ``folder``: the shards named by the index, else the single file(s).

    Raises ModelFolderError for a pickle-only folder, a missing shard or no weights at all."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
            files = sorted(set(wmap.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ModelFolderError(f"{index} is not a valid safetensors index: {exc}") from None
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ModelFolderError(f"{folder}: shard(s) {', '.join(missing)} named in {INDEX_NAME} are missing "
                                   f"(found: {describe_contents(folder)})")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelFolderError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:4])}); loopscope loads safetensors only, "
            "because unpickling can run arbitrary code. Convert them once with a tool you trust "
            "(e.g. save_pretrained(..., safe_serialization=True)) and point loopscope at the result.")
    raise ModelFolderError(f"{folder}: no *.safetensors weights (found: {describe_contents(folder)})")


def tensor_index(folder: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo for every tensor in the folder's safetensors files (headers only)."""
    out: dict[str, TensorInfo] = {}
    folder = Path(folder)
    index = folder / INDEX_NAME
    wmap = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    for path in weight_files(folder):
        for name, entry in _read_header(path).items():
            if name == "__metadata__":
                continue
            out[name] = TensorInfo(name, tuple(entry["shape"]), _DTYPES[entry["dtype"]], path)
    if wmap is not None:
        absent = sorted(set(wmap) - set(out))
        if absent:
            raise ModelFolderError(f"{folder}: {INDEX_NAME} names tensors that no shard holds: {absent[:5]}")
    return out


def check_shapes(folder: Path, index: dict[str, TensorInfo], expected: dict[str, tuple]) -> None:
    """Raise ModelFolderError unless every expected name exists with exactly the expected shape."""
    missing = [n for n in expected if n not in index]
    if missing:
        raise ModelFolderError(f"{folder}: weights missing for this config: {missing[:6]}"
                               + (f" (and {len(missing) - 6} more)" if len(missing) > 6 else ""))
    wrong = [f"{n} is {list(index[n].shape)}, config implies {list(s)}" for n, s in expected.items()
             if tuple(index[n].shape) != tuple(s)]
    if wrong:
        raise ModelFolderError(f"{folder}: tensor of the wrong shape: " + "; ".join(wrong[:4]))


def load_tensors(index: dict[str, TensorInfo], names, dtype: torch.dtype | None = None,
                 device="cpu") -> dict[str, torch.Tensor]:
    """Read ``names`` from their files (safetensors only), optionally cast to ``dtype``."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(index[n].file, []).append(n)
    out = {}
    for path, ns in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for n in ns:
                    t = f.get_tensor(n)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[n] = t.to(device)
        except Exception as exc:  # safetensors raises its own error types
            raise ModelFolderError(f"{path} cannot be read: {exc}") from None
    return out


def first(cfg: dict, *keys, default=None):
    """The first of ``keys`` present (not None) in ``cfg``."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def rope_settings(cfg: dict, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(theta, scaling) from either config schema: transformers 4 (``rope_theta``, ``rope_scaling``)
    or 5 (``rope_parameters: {rope_theta, rope_type, ...}``). ``scaling`` is None for plain RoPE,
    else a dict with ``rope_type`` (only "default" and "llama3" are supported; others raise)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", first(cfg, "rope_theta", "rope_base", default=default_theta))
        scaling = dict(params)
    else:
        theta = first(cfg, "rope_theta", "rope_base", default=default_theta)
        scaling = dict(cfg["rope_scaling"]) if isinstance(cfg.get("rope_scaling"), dict) else None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise ModelFolderError(f"RoPE scaling type {kind!r} is not supported (supported: default, llama3)")
        else:
            scaling["rope_type"] = "llama3"
    return float(theta), scaling
