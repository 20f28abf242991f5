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
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .base import MAX_ITERATIONS
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

# What load_checkpoint accepts, checked on config.json and the safetensors header before any model
# is built: integer config entries -> (least, most). Far above the sample models (d_model 128,
# a few layers), far below what would take a server's memory.
CONFIG_LIMITS = {"vocab_size": (1, 65536), "context_length": (1, 4096), "d_model": (1, 4096),
                 "n_heads": (1, 256), "d_mlp": (1, 16384), "n_prelude": (0, 64), "n_block": (1, 64),
                 "n_coda": (0, 64), "iterations": (1, MAX_ITERATIONS)}
MAX_PARAMETERS = 200_000_000        # 800 MB of float32 weights
MAX_HEADER_BYTES = 16 * 2**20       # the safetensors JSON header
WEIGHT_DTYPE = "F32"                # the only stored dtype loaded (no silent casts)
# card.json entries the app and report read -> a check of their type; a failing entry is dropped
# and named in card["warning"]
_CARD_CHECKS = {
    "parameters": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "training_steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "trained_iterations": lambda v: (_is_number(v) or isinstance(v, dict) and all(
        _is_number(v[k]) for k in ("max", "fixed", "mean", "min") if k in v)),
    "trained_hops": lambda v: (isinstance(v, list) and len(v) == 2
                               and all(isinstance(h, int) and not isinstance(h, bool) for h in v)),
    "accuracy_by_hops": lambda v: _is_hop_table(v),
    "shortcut_by_hops": lambda v: _is_hop_table(v),
    "heldout_bits_per_char": lambda v: _is_number(v),
    "heldout_next_char_accuracy": lambda v: _is_number(v),
}


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


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_hop_table(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and k.isdigit() and _is_number(x) for k, x in v.items())


def _checked_card(card) -> dict:
    """card.json as a dict whose known entries have the types readers expect; others are
    dropped and named in ``card["warning"]``."""
    if not isinstance(card, dict):
        return {"warning": f"card.json is a JSON {type(card).__name__}, not an object; it is ignored"}
    bad = [k for k, ok in _CARD_CHECKS.items() if k in card and not ok(card[k])]
    if bad:
        card = {k: v for k, v in card.items() if k not in bad}
        card["warning"] = f"card.json entries with an unexpected type are ignored: {', '.join(bad)}"
    return card


def _check_model_config(d, where) -> None:
    """CheckpointError unless config.json's "model" entry has sane types and sizes (before any use)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: \"model\" must be an object, got {type(d).__name__}")
    for key, (lo, hi) in CONFIG_LIMITS.items():
        if key not in d:
            continue
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise CheckpointError(f"{where}: model {key} must be an integer, got {v!r}")
        if not lo <= v <= hi:
            raise CheckpointError(f"{where}: model {key} = {v} is outside {lo}..{hi}")
    for key in ("initial_std", "init_std"):
        if key in d and not (_is_number(d[key]) and d[key] >= 0):
            raise CheckpointError(f"{where}: model {key} must be a finite number >= 0, got {d[key]!r}")
    for key in ("shift_offsets", "tied_shift_offsets"):
        v = d.get(key, [])
        if not isinstance(v, list) or len(v) > 16 or not all(
                isinstance(o, int) and not isinstance(o, bool) and 1 <= o <= 4096 for o in v):
            raise CheckpointError(f"{where}: model {key} must be a list of at most 16 integers in 1..4096, got {v!r}")
    for key in ("norm_layout", "injection", "initial_state", "kind"):
        if key in d and not isinstance(d[key], str):
            raise CheckpointError(f"{where}: model {key} must be a string, got {d[key]!r}")


def read_safetensors_header(path) -> dict:
    """The JSON header of a .safetensors file (name -> {"dtype", "shape", "data_offsets"}, plus
    "__metadata__"), read without loading any tensor; CheckpointError if it is not one."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} cannot be read as safetensors: file too short")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path} cannot be read as safetensors: header of {n:,} bytes "
                                  f"in a file of {size:,}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path} cannot be read as safetensors: bad header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} cannot be read as safetensors: the header is not an object")
    return header


def _check_weights_header(weights: Path, config: LoopConfig) -> None:
    """Compare the safetensors header (names, shapes, dtypes) with the model ``config`` describes
    (``expected_weight_shapes``, nothing allocated); CheckpointError if they differ."""
    header = read_safetensors_header(weights)
    header.pop("__metadata__", None)
    expected = expected_weight_shapes(config)
    n_params = sum(math.prod(s) for s in expected.values())
    if n_params > MAX_PARAMETERS:
        raise CheckpointError(f"{weights}: its config describes {n_params:,} parameters; loopscope loads at most "
                              f"{MAX_PARAMETERS:,}")
    if set(header) != set(expected):
        extra, lacking = sorted(set(header) - set(expected)), sorted(set(expected) - set(header))
        raise CheckpointError(f"{weights} does not match its config: unexpected {extra[:5]}, missing {lacking[:5]}")
    bad = [k for k, v in header.items() if not isinstance(v, dict) or list(v.get("shape", ())) != list(expected[k])]
    if bad:
        raise CheckpointError(f"{weights} does not match its config: wrong shapes for {bad[:5]} "
                              f"(e.g. {bad[0]}: stored {header[bad[0]].get('shape') if isinstance(header[bad[0]], dict) else '?'}, "
                              f"config needs {list(expected[bad[0]])})")
    dtypes = {k: v.get("dtype") for k, v in header.items() if v.get("dtype") != WEIGHT_DTYPE}
    if dtypes:
        k = sorted(dtypes)[0]
        raise CheckpointError(f"{weights} stores {dtypes[k]} weights ({k}{' and others' if len(dtypes) > 1 else ''}); "
                              f"loopscope loads float32 ({WEIGHT_DTYPE}) weights only, never converting them "
                              "silently: convert the checkpoint to float32 first")


def expected_weight_shapes(config: LoopConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in ``LoopedTransformer(config).state_dict()``, worked out
    from the config alone (no model is built, nothing is allocated)."""
    D, V, M = config.d_model, config.vocab_size, config.d_mlp
    shapes = {"embed.tok.weight": (V, D), "embed.pos.weight": (config.context_length, D)}
    untied = [o for o in config.shift_offsets if o not in config.tied_shift_offsets]
    shapes.update({f"embed.shift.{i}.weight": (V + 1, D) for i in range(len(untied))})
    norms = ("n1", "n3") if config.norm_layout == "pre" else ("n1", "n3", "n2", "n4")
    for part, n in (("prelude", config.n_prelude), ("block", config.n_block), ("coda", config.n_coda)):
        for l in range(n):
            p = f"{part}.{l}."
            shapes.update({p + f"{norm}.weight": (D,) for norm in norms})
            shapes.update({p + "attn.qkv.weight": (3 * D, D), p + "attn.proj.weight": (D, D),
                           p + "mlp.up.weight": (M, D), p + "mlp.down.weight": (D, M)})
    if config.injection != "none":
        shapes["input_norm.weight"] = (D,)
    if config.injection == "adapter":
        shapes["adapter.weight"] = (D, 2 * D)
    if config.norm_layout == "ouro":
        shapes["pass_norm.weight"] = (D,)
    shapes.update({"final_norm.weight": (D,), "unembed.weight": (V, D)})
    return shapes


def count_parameters(config: LoopConfig | dict) -> int:
    """Parameters of the model a config describes, counted from ``expected_weight_shapes`` (no
    model is built); a dict is checked against ``CONFIG_LIMITS`` first (CheckpointError)."""
    if isinstance(config, dict):
        _check_model_config(config, "config")
        try:
            config = LoopConfig.from_dict(config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"config: {exc}") from None
    return sum(math.prod(s) for s in expected_weight_shapes(config).values())


def load_checkpoint(folder) -> LoadedModel:
    """Load a checkpoint folder (CPU, eval mode). Raises CheckpointError with a clear reason, and
    only that, for anything a folder can hold. config.json is checked against ``CONFIG_LIMITS``
    and the safetensors header (names, shapes, float32) before a model is built."""
    try:
        return _load_checkpoint(folder)
    except CheckpointError:
        raise
    except (ZeroDivisionError, TypeError, RecursionError, AttributeError, RuntimeError, ValueError,
            OverflowError, KeyError, IndexError, MemoryError, OSError) as exc:
        raise CheckpointError(f"{folder} is not a loadable loopscope checkpoint: {type(exc).__name__}: {exc}") from None


def _load_checkpoint(folder) -> LoadedModel:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    missing = [p.name for p in (cfg_path, weights) if not p.is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a loopscope checkpoint: missing {', '.join(missing)}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} is not a loopscope config (no \"format\": \"{FORMAT}\"); "
                              "foreign checkpoints need a converter")
    if type(raw.get("version")) is not int or raw.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{cfg_path} has format version {raw.get('version')!r}; this loopscope reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    _check_model_config(raw.get("model"), cfg_path)
    try:
        model_entry = dict(raw["model"])
        if raw["version"] == 1:
            model_entry.setdefault("kind", _legacy_kind(model_entry))
        config = LoopConfig.from_dict(model_entry)
        tokenizer = CharTokenizer.from_dict(raw["tokenizer"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{cfg_path} has a bad model or tokenizer entry: {exc}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{cfg_path}: tokenizer has {tokenizer.vocab_size} characters, "
                              f"model expects {config.vocab_size}")
    _check_weights_header(weights, config)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} cannot be read as safetensors: {exc}") from None
    card = {}
    if (folder / "card.json").is_file():
        try:
            card = _checked_card(json.loads((folder / "card.json").read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            card = {"warning": "card.json is not valid JSON"}
    schedule = TrainedSchedule.from_card(card.get("trained_iterations") if isinstance(card, dict) else None,
                                         config.iterations)
    if schedule.mean != config.iterations:  # the config decides; the card's schedule is named as ignored
        note = (f"trained_iterations mean {schedule.mean} differs from the config's iterations "
                f"{config.iterations}; the card's schedule is ignored")
        card = dict(card, warning=f"{card['warning']}; {note}" if card.get("warning") else note)
        schedule = TrainedSchedule.fixed(config.iterations)
    model = LoopedTransformer(config, schedule=schedule, tokenizer=tokenizer)
    expected = model.state_dict()
    if set(state) != set(expected):
        extra, lacking = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise CheckpointError(f"{weights} does not match its config: unexpected {extra[:5]}, missing {lacking[:5]}")
    bad = [k for k in state if state[k].shape != expected[k].shape or state[k].dtype != torch.float32]
    if bad:
        raise CheckpointError(f"{weights} does not match its config: wrong shapes or dtypes for {bad[:5]}")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{weights} holds NaN or infinite weights in {nonfinite[:5]}")
    model.load_state_dict(state)
    model.eval()
    task = raw.get("task", {})
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, card=card,
                       task=task if isinstance(task, dict) else {},
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
