"""Open a real model from a local folder: ``load_folder(path)`` detects the family from
config.json's ``model_type`` and the weight names, checks the config against the safetensors
headers, reads the tokenizer, and only then loads the weights.

Supported:
    huginn_raven        Huginn-0125 (sandwich blocks) and the retrofitted-recurrence Llama / OLMo-2
                        checkpoints (told apart by weight names)            -> analysis.models.huginn
    ouro                Ouro-1.4B / 2.6B (and -Thinking)                    -> analysis.models.ouro
    any model_type transformers knows natively (llama, olmo2, qwen2, gpt2, …) as a deep model
                                                                           -> analysis.models.hf_deep
Python files in the folder (``modeling_*.py``, ``configuration_*.py``) are never imported;
pickle weights are refused. Every problem raises ModelFolderError naming the folder.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .folder import ModelFolderError, describe_contents, read_config, tensor_index, weight_files
from .hf_tokenizer import HFTokenizer

LOOPED_TYPES = {"huginn_raven": "huginn", "ouro": "ouro"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
SUPPORTED = ("huginn_raven (Huginn-0125; retrofitted Llama / OLMo-2 recurrence), ouro (Ouro-1.4B/2.6B), "
             "and causal LMs transformers supports natively (llama, olmo2, qwen2, gpt2, mistral, …) as deep models")


def parse_dtype(dtype) -> torch.dtype | None:
    """None (keep the stored dtype), a torch float dtype, or a name: float32, bfloat16, float16."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    if isinstance(dtype, str) and dtype.lower() in ("auto", "stored"):
        return None
    raise ValueError(f"dtype must be one of float32, bfloat16, float16 (or None for the stored dtype), got {dtype!r}")


def resolve_device(device) -> torch.device:
    """``"auto"`` -> a GPU when ``torch.cuda.is_available()``, else the CPU; ``"cpu"``, ``"cuda"``,
    ``"cuda:1"`` or a torch.device as given. ValueError for anything else or an absent GPU."""
    if isinstance(device, torch.device):
        dev = device
    elif device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but torch sees no GPU (use --device auto or cpu)")
    return dev


def _folder(path) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is not a folder")
    return folder


def detect_family(path) -> str:
    """"huginn" | "ouro" | "hf-deep" | "loopscope" for a folder; ModelFolderError naming the
    folder, what it holds and what is supported otherwise. Reads config.json and the safetensors
    headers only."""
    folder = _folder(path)
    cfg = read_config(folder)
    if cfg.get("format") == "loopscope-checkpoint":
        return "loopscope"
    mt = cfg.get("model_type")
    weight_files(folder)  # pickle-only and missing shards fail here, before anything else
    if mt in LOOPED_TYPES:
        return LOOPED_TYPES[mt]
    from .hf_deep import native_model_types

    if isinstance(mt, str) and mt in native_model_types():
        return "hf-deep"
    arch = cfg.get("architectures")
    remote = " (its auto_map points at Python files in the folder, which loopscope never runs)" if cfg.get("auto_map") else ""
    raise ModelFolderError(f"{folder}: model_type {mt!r}, architectures {arch!r}{remote} is not supported. "
                           f"Found: {describe_contents(folder)}. Supported: {SUPPORTED}.")


def python_files(folder) -> list[str]:
    """Python files in a checkpoint folder: listed so the user knows they were ignored, never imported."""
    return sorted(p.name for p in Path(folder).glob("*.py"))


def load_folder(path, dtype=None, device="cpu"):
    """Load the model in ``path`` (CPU by default, eval mode, no gradients) with its tokenizer.
    device: "cpu", "cuda", "cuda:N" or "auto" (a GPU when torch sees one, else the CPU).

    dtype: None keeps the stored dtype; "float32" / "bfloat16" / "float16" (or a torch dtype)
    converts. Returns a model implementing the LoopedLM protocol with ``spec``, ``tokenizer``
    (HFTokenizer), ``family``, ``name``, ``folder``, ``ignored_files`` and ``ignored_tensors``.
    Raises ModelFolderError (a ValueError) for an unsupported or broken folder; nothing is
    allocated before the config has been checked against the weight headers."""
    folder = _folder(path)
    dt = parse_dtype(dtype)
    device = resolve_device(device)
    family = detect_family(folder)
    if family == "loopscope":
        raise ModelFolderError(f"{folder} is a loopscope checkpoint; open it with analysis.load_checkpoint")
    cfg = read_config(folder)
    index = tensor_index(folder)
    chat = {"huginn": "huginn", "ouro": "ouro"}.get(family)
    tokenizer = HFTokenizer.from_folder(folder, chat_format=chat)
    if family == "huginn":
        from .huginn import load_huginn
        model = load_huginn(folder, cfg, index, dtype=dt, device=device)
    elif family == "ouro":
        from .ouro import load_ouro
        model = load_ouro(folder, cfg, index, dtype=dt, device=device)
    else:
        from .hf_deep import load_hf_deep
        model = load_hf_deep(folder, cfg, index, dtype=dt, device=device)
        model.ignored_tensors = []
    if tokenizer.vocab_size > model.spec.vocab_size:
        raise ModelFolderError(f"{folder}: tokenizer.json has {tokenizer.vocab_size} tokens but the model's "
                               f"vocabulary is {model.spec.vocab_size}")
    model.tokenizer = tokenizer
    model.name = folder.name
    model.folder = str(folder)
    model.ignored_files = python_files(folder)
    return model


def inspect_folder(path) -> dict:
    """What a folder holds, from config.json, the safetensors headers and tokenizer.json, without
    loading any weight: family, architecture ``(p, k⊗r, c)``, parameters, dtypes, bytes,
    tokenizer size, trained iterations, ignored Python files."""
    folder = _folder(path)
    family = detect_family(folder)
    cfg = read_config(folder)
    index = tensor_index(folder)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in index.values()})
    info = {"folder": str(folder), "family": family, "model_type": cfg.get("model_type"),
            "tensors": len(index), "parameters": sum(t.nbytes // max(1, torch.empty((), dtype=t.dtype).element_size())
                                                      for t in index.values()),
            "bytes": sum(t.nbytes for t in index.values()), "dtypes": dtypes,
            "ignored_files": python_files(folder)}
    if family == "huginn":
        from .huginn import HuginnConfig
        c = HuginnConfig.from_folder(cfg, index, folder)
        info.update(variant=c.variant, architecture=f"({c.n_prelude}, {c.n_block}⊗r, {c.n_coda})",
                    d_model=c.d_model, heads=f"{c.n_heads} (kv {c.n_kv_heads}) × {c.head_dim}",
                    vocab_size=c.vocab_size, trained_iterations=f"mean {c.mean_recurrence}",
                    initial_state=f"truncated normal σ {c.init_std * c.embed_scale:.4g}, cut ±{3 * c.init_std * c.embed_scale:.4g}")
    elif family == "ouro":
        from .ouro import OuroConfig
        c = OuroConfig.from_folder(cfg, index, folder)
        info.update(architecture=f"(0, {c.n_layers}⊗r, 0)", d_model=c.d_model,
                    heads=f"{c.n_heads} (kv {c.n_kv_heads}) × {c.head_dim}", vocab_size=c.vocab_size,
                    trained_iterations=f"fixed {c.total_ut_steps}", initial_state="embeddings",
                    exit_threshold=c.early_exit_threshold)
    elif family == "hf-deep":
        L = cfg.get("num_hidden_layers", cfg.get("n_layer"))
        info.update(architecture=f"({L}, -, -)", d_model=cfg.get("hidden_size", cfg.get("n_embd")),
                    vocab_size=cfg.get("vocab_size"), trained_iterations="1 (deep)")
    try:
        info["tokenizer"] = f"tokenizer.json, {HFTokenizer.from_folder(folder).vocab_size} tokens"
    except ModelFolderError as exc:
        info["tokenizer"] = f"missing: {exc}"
    return info


def is_real_folder(path) -> bool:
    """True when ``path`` holds a model this module loads (Huginn, Ouro or a transformers-native
    causal LM); False for anything else, including loopscope's own checkpoints. Never raises."""
    try:
        return detect_family(path) in ("huginn", "ouro", "hf-deep")
    except (ModelFolderError, OSError, ValueError):
        return False


def declared_kind(path) -> str | None:
    """"looped" (Huginn, retrofitted, Ouro) or "deep" (transformers-native) from config.json alone;
    None when the folder is not a real model folder."""
    try:
        cfg = read_config(Path(path).expanduser())
    except ModelFolderError:
        return None
    mt = cfg.get("model_type")
    if mt in LOOPED_TYPES:
        return "looped"
    if cfg.get("format") == "loopscope-checkpoint" or not isinstance(mt, str):
        return None
    from .hf_deep import native_model_types

    return "deep" if mt in native_model_types() else None


def folder_fingerprint(path) -> str:
    """A cheap identity of a model folder (16 hex digits): sha256 over config.json, the safetensors
    headers' names/shapes/dtypes and the files' sizes, not over gigabytes of weights."""
    import hashlib

    folder = Path(path).expanduser()
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for name, info in sorted(tensor_index(folder).items()):
        h.update(f"{name}:{list(info.shape)}:{info.dtype}:{info.file.stat().st_size}".encode())
    return h.hexdigest()[:16]
