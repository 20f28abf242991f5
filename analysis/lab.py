"""The architecture lab: randomly initialised looped models for any norm layout × input
injection (the paper's Fig. 6). Does the block reach a stable (cyclic) fixed point, and does
it collapse, i.e. do all its layers end on one direction?

``run_lab(LabSettings(...))`` builds an untrained ``(0, k⊗r, 0)`` model from a seed, runs one
seeded random prompt for ``iterations`` and returns an ordinary ``Trace`` (its settings in
``trace.metadata["lab"]``), so every measurement and figure of the app applies to it.
``lab_verdict(trace)`` summarises it in four numbers.
"""
from __future__ import annotations

import random
import threading
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from .models.tokenizers import CharTokenizer
from .models.transformer import INITIAL_STATES, INJECTIONS, MAX_ITERATIONS, NORM_LAYOUTS, LoopConfig, LoopedTransformer
from .tasks import CHAIN_CHARS
from .trace import Trace
from .tracing import trace

INITS = ("small", "default")
MAX_STATE_VALUES = 64 * 2 ** 20  # I·L·T·D cap: 256 MB of float32 states per lab run
_BUILD_LOCK = threading.Lock()  # torch's global RNG is seeded to build a model; one build at a time


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value}")


@dataclass(frozen=True)
class LabSettings:
    """One lab run. ``norm_layout``: "pre" | "huginn" | "ouro"; ``injection``: "adapter" |
    "add" | "none"; ``initial_state``: "random" | "zeros" | "embed"; ``n_block`` k layers
    (1..48); ``d_model`` (8..1024, divisible by ``n_heads``); ``iterations`` r (1..1024);
    ``seed`` (weights, prompt and random initial state); ``init``: "small" (every weight
    N(0, 0.02²)) or "default" (PyTorch's default ``nn.Linear`` init, U(±1/√fan_in); embeddings
    keep N(0, 0.02²)); ``n_tokens`` prompt length (2..256). The MLP width is 2·d_model.
    Raises ValueError for bad values (and for runs whose states would exceed 256 MB).
    """

    norm_layout: str = "pre"
    injection: str = "adapter"
    initial_state: str = "random"
    n_block: int = 12
    d_model: int = 128
    n_heads: int = 4
    iterations: int = 128
    seed: int = 0
    init: str = "small"
    n_tokens: int = 32

    def __post_init__(self):
        for name, allowed in (("norm_layout", NORM_LAYOUTS), ("injection", INJECTIONS),
                              ("initial_state", INITIAL_STATES), ("init", INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        _check_int("n_block", self.n_block, 1, 48)
        _check_int("d_model", self.d_model, 8, 1024)
        _check_int("n_heads", self.n_heads, 1, 64)
        _check_int("iterations", self.iterations, 1, MAX_ITERATIONS)
        _check_int("seed", self.seed, 0, 2 ** 31 - 1)
        _check_int("n_tokens", self.n_tokens, 2, 256)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        size = self.iterations * self.n_block * self.n_tokens * self.d_model
        if size > MAX_STATE_VALUES:
            raise ValueError(f"this run would hold {size * 4 / 2 ** 20:.0f} MB of states "
                             f"(iterations × n_block × n_tokens × d_model × 4 bytes); the limit is "
                             f"{MAX_STATE_VALUES * 4 / 2 ** 20:.0f} MB")

    def to_dict(self) -> dict:
        return asdict(self)

    def config(self) -> LoopConfig:
        """The model config: ``(0, n_block⊗r, 0)``, context max(64, n_tokens), chain vocabulary."""
        return LoopConfig(vocab_size=len(CHAIN_CHARS), context_length=max(64, self.n_tokens),
                          d_model=self.d_model, n_heads=self.n_heads, d_mlp=2 * self.d_model,
                          n_prelude=0, n_block=self.n_block, n_coda=0, iterations=self.iterations,
                          norm_layout=self.norm_layout, injection=self.injection,
                          initial_state=self.initial_state)

    def prompt(self) -> str:
        """The run's prompt: ``n_tokens`` characters of the chain vocabulary drawn with ``seed``."""
        rng = random.Random(self.seed)
        return "".join(rng.choice(CHAIN_CHARS) for _ in range(self.n_tokens))


def build_lab_model(settings: LabSettings) -> LoopedTransformer:
    """The untrained model of ``settings``, reproducible from its seed (global torch RNG state
    is saved and restored around the build)."""
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = LoopedTransformer(settings.config())
        if settings.init == "default":
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
    return model.eval()


def run_lab(settings: LabSettings, progress=None, attention: bool = False) -> Trace:
    """Build the random-init model of ``settings`` and trace its prompt for
    ``settings.iterations`` iterations. Returns a Trace (states [r, k, n_tokens, d_model]) with
    ``metadata["lab"]`` = the settings dict and ``metadata["model_name"]`` a short label.

    progress: optional callable(fraction in [0, 1]): 0 at the start, 0.05 once the model is
    built, then after every iteration (a forward hook on the block's last layer of this run's
    own model, removed afterwards), and 1 at the end; non-decreasing.
    attention: also capture attention maps ([r, k, H, T, T] float32; off by default).
    """
    if not isinstance(settings, LabSettings):
        raise TypeError(f"run_lab needs LabSettings, got {type(settings).__name__}")
    if progress is not None:
        progress(0.0)
    model = build_lab_model(settings)
    handle = None
    if progress is not None:
        progress(0.05)
        done = [0]

        def after_iteration(module, inputs, output):
            done[0] += 1
            progress(min(1.0, 0.05 + 0.95 * done[0] / settings.iterations))

        handle = model.block[-1].register_forward_hook(after_iteration)
    label = (f"lab: {settings.norm_layout}-norm, injection {settings.injection}, "
             f"{settings.init} init, seed {settings.seed}")
    try:
        tr = trace(model, settings.prompt(), iterations=settings.iterations, seed=settings.seed,
                   tokenizer=CharTokenizer(CHAIN_CHARS), attention=attention, fixed_point_iterations=0,
                   metadata={"lab": settings.to_dict(), "model_name": label})
    finally:
        if handle is not None:
            handle.remove()
    if progress is not None:
        progress(1.0)
    return tr


def lab_verdict(trace: Trace, eps: float = 1e-3) -> dict:
    """Summarise a lab trace (any trace works) from its block states ``[I, L, T, D]``:

    final_step   median over tokens of ‖s_I − s_{I−1}‖ / ‖s_I‖ at the block's last layer
                 (relative, unitless; NaN with one iteration)
    converged    final_step < eps
    spread       min over tokens of min_l cos(X_{I,0}, X_{I,l}) over the last iteration's layers
                 (1 = all layers on one direction)
    collapsed    spread > 0.999 and the block has more than one layer
    norm_growth  median over tokens of ‖s_I‖ / ‖s_1‖ at the last layer
    finite       all states finite (NaN/inf states make the other numbers NaN or False)
    """
    s = np.asarray(trace.states, dtype=np.float64)
    I, L, T, D = s.shape
    finite = bool(np.isfinite(s).all())
    last = s[:, -1]  # [I, T, D]
    with np.errstate(invalid="ignore", divide="ignore"):
        if I > 1:
            step = np.linalg.norm(last[-1] - last[-2], axis=-1) / np.linalg.norm(last[-1], axis=-1)
            final_step = float(np.median(step))
        else:
            final_step = float("nan")
        X = s[-1]  # [L, T, D]
        n = np.linalg.norm(X, axis=-1)  # [L, T]
        cos = (X * X[:1]).sum(-1) / (n * n[:1])  # [L, T]
        spread = float(cos.min()) if np.isfinite(cos).all() else float("nan")
        growth = float(np.median(np.linalg.norm(last[-1], axis=-1) / np.linalg.norm(last[0], axis=-1)))
    return {
        "converged": bool(finite and final_step < eps),
        "final_step": final_step,
        "collapsed": bool(finite and L > 1 and spread > 0.999),
        "spread": spread,
        "norm_growth": growth,
        "finite": finite,
    }
