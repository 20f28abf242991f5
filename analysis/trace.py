"""The Trace: every state of every token at every layer of every iteration, and how to capture it.

``trace(model, prompt, iterations)`` runs one prompt once with a ``Capture`` local to the call
and returns an immutable ``Trace``. The Trace is the contract between capture, measurements,
the app and export; its arrays (shapes below) are numpy, states in float32.

A deep model's trace has iteration axis 1 and its L layers on the layer axis.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .checkpoint import LoadedModel
from .model import Capture, LoopedTransformer
from .tasks import solve_chain
from .tokenizer import CharTokenizer

TRACE_FORMAT = "loopscope-trace"
TRACE_VERSION = 1
LENS_TOP_K = 5

# name -> (axes, dtype, required); the npz keys are these names, plus "metadata" (a JSON string)
ARRAYS = {
    "tokens": (("token",), np.int64, True),
    "states": (("iteration", "layer", "token", "d_model"), np.float32, True),
    "attention": (("iteration", "layer", "head", "query", "key"), np.float32, False),
    "initial_state": (("token", "d_model"), np.float32, True),
    "injected": (("token", "d_model"), np.float32, True),
    "prelude_states": (("prelude_layer", "token", "d_model"), np.float32, True),
    "prelude_attention": (("prelude_layer", "head", "query", "key"), np.float32, False),
    "coda_states": (("coda_layer", "token", "d_model"), np.float32, True),
    "coda_attention": (("coda_layer", "head", "query", "key"), np.float32, False),
    "logits": (("token", "vocab"), np.float32, True),
    "lens_top_ids": (("iteration", "layer", "token", "k"), np.int64, True),
    "lens_top_probs": (("iteration", "layer", "token", "k"), np.float32, True),
    "lens_kl": (("iteration", "token"), np.float32, True),
    "answer_rank": (("iteration", "layer"), np.int64, False),
    "answer_prob": (("iteration", "layer"), np.float32, False),
    "fixed_point": (("layer", "token", "d_model"), np.float32, False),
}


class TraceFormatError(ValueError):
    """A file is not a loopscope trace this version can read; the message says why."""


@dataclass(frozen=True)
class Trace:
    """One prompt's run. Arrays (numpy; I iterations, L block layers, T tokens, D d_model,
    H heads, V vocabulary, K = top-k of the logit lens):

    tokens          [T]              token ids
    states          [I, L, T, D]     block state after each layer call (``loop.{t}.blocks.{l}.hook_resid_post``)
    attention       [I, L, H, T, T]  attention probabilities (query, key); None if not captured
    initial_state   [T, D]           s_0
    injected        [T, D]           e, the input each iteration receives (prelude output, normalised)
    prelude_states  [p, T, D], prelude_attention [p, H, T, T]
    coda_states     [c, T, D], coda_attention [c, H, T, T]
    logits          [T, V]           final next-token logits (equal to a plain forward's)
    lens_top_ids    [I, L, T, K], lens_top_probs [I, L, T, K]   logit lens of every block state
    lens_kl         [I, T]           KL(p_{t-1} || p_t) of the lens at the block's last layer, nats
                                     (NaN at t = 0): Huginn's early-exit signal
    answer_rank     [I, L]           rank (0 = top) of the answer token at the last position; None without answer
    answer_prob     [I, L]           its lens probability
    fixed_point     [L, T, D]        block states after ``metadata["fixed_point_iterations"]`` iterations (s*)

    prompt, token_labels (one readable label per token), answer (a string or None) and
    metadata (JSON-able: model name, checkpoint sha256, config, tokenizer chars, seed,
    iterations, trained iterations, is_deep, format and version).
    """

    prompt: str
    token_labels: tuple
    answer: str | None
    metadata: dict
    tokens: np.ndarray
    states: np.ndarray
    initial_state: np.ndarray
    injected: np.ndarray
    prelude_states: np.ndarray
    coda_states: np.ndarray
    logits: np.ndarray
    lens_top_ids: np.ndarray
    lens_top_probs: np.ndarray
    lens_kl: np.ndarray
    attention: np.ndarray | None = None
    prelude_attention: np.ndarray | None = None
    coda_attention: np.ndarray | None = None
    answer_rank: np.ndarray | None = None
    answer_prob: np.ndarray | None = None
    fixed_point: np.ndarray | None = None

    def __post_init__(self):
        if self.states.ndim != 4:
            raise ValueError(f"states must be [iteration, layer, token, d_model], got shape {self.states.shape}")
        I, L, T, D = self.states.shape
        sizes = {"iteration": I, "layer": L, "token": T, "d_model": D, "query": T, "key": T}
        for name, (axes, dtype, required) in ARRAYS.items():
            arr = getattr(self, name)
            if arr is None:
                if required:
                    raise ValueError(f"Trace.{name} is required")
                continue
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"Trace.{name} must be a numpy array")
            if arr.ndim != len(axes):
                raise ValueError(f"Trace.{name} must have axes {axes}, got shape {arr.shape}")
            for ax, n in zip(axes, arr.shape):
                if ax in sizes and sizes[ax] != n:
                    raise ValueError(f"Trace.{name} axis {ax} is {n}, expected {sizes[ax]} (states {self.states.shape})")
            arr.setflags(write=False)
        if len(self.token_labels) != T:
            raise ValueError(f"{len(self.token_labels)} token labels for {T} tokens")

    # sizes --------------------------------------------------------------
    @property
    def n_iterations(self) -> int:
        return self.states.shape[0]

    @property
    def n_layers(self) -> int:
        return self.states.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.states.shape[2]

    @property
    def is_deep(self) -> bool:
        return bool(self.metadata.get("is_deep"))

    @property
    def vocabulary(self) -> str:
        return self.metadata.get("tokenizer_chars", "")

    @property
    def has_nonfinite(self) -> bool:
        """True when any block state is NaN or infinite (shown as gaps, with a warning)."""
        return not bool(np.isfinite(self.states).all())

    def prediction(self) -> str:
        """The model's final greedy next token after the prompt."""
        i = int(np.nanargmax(self.logits[-1])) if np.isfinite(self.logits[-1]).any() else 0
        return self.vocabulary[i] if i < len(self.vocabulary) else str(i)

    def capture_names(self) -> list[str]:
        """The capture point names this trace holds, e.g. ``loop.3.blocks.1.hook_resid_post``."""
        names = [f"loop.{t}.blocks.{l}.hook_resid_post" for t in range(self.n_iterations) for l in range(self.n_layers)]
        if self.attention is not None:
            names += [f"loop.{t}.blocks.{l}.attn.hook_pattern" for t in range(self.n_iterations) for l in range(self.n_layers)]
        return names

    # files --------------------------------------------------------------
    def save(self, path) -> Path:
        """Write a ``.npz``: one key per array in ``ARRAYS`` (absent ones omitted), plus
        ``metadata``, a JSON string holding prompt, token_labels, answer and the metadata dict."""
        path = Path(path)
        meta = dict(self.metadata, prompt=self.prompt, token_labels=list(self.token_labels), answer=self.answer,
                    format=TRACE_FORMAT, format_version=TRACE_VERSION)
        arrays = {name: getattr(self, name) for name in ARRAYS if getattr(self, name) is not None}
        with open(path, "wb") as f:
            np.savez_compressed(f, metadata=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, source) -> "Trace":
        """Read a file written by ``save`` (a path or a binary file object); never unpickles.
        Raises TraceFormatError for anything else."""
        try:
            with np.load(source, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as exc:  # zip, header or pickle errors all mean the same to a user
            raise TraceFormatError(f"not a loopscope trace file (.npz): {exc}") from None
        if "metadata" not in data:
            raise TraceFormatError("not a loopscope trace: the file has no 'metadata' entry")
        try:
            meta = json.loads(str(data.pop("metadata")))
        except json.JSONDecodeError:
            raise TraceFormatError("trace metadata is not valid JSON") from None
        if meta.get("format") != TRACE_FORMAT:
            raise TraceFormatError(f"not a loopscope trace (format {meta.get('format')!r})")
        if meta.get("format_version") != TRACE_VERSION:
            raise TraceFormatError(f"trace format version {meta.get('format_version')!r} is not supported; "
                                   f"this loopscope reads version {TRACE_VERSION}")
        unknown = set(data) - set(ARRAYS)
        if unknown:
            raise TraceFormatError(f"unexpected arrays in trace: {sorted(unknown)}")
        try:
            prompt, labels, answer = meta.pop("prompt"), tuple(meta.pop("token_labels")), meta.pop("answer")
            meta.pop("format"), meta.pop("format_version")
            arrays = {k: v.astype(ARRAYS[k][1], copy=False) for k, v in data.items()}
            return cls(prompt=prompt, token_labels=labels, answer=answer, metadata=meta, **arrays)
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceFormatError(f"trace file is malformed: {exc}") from None


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().float().numpy()


def trace(model, prompt: str, iterations: int | None = None, seed: int = 0, answer: str | None = None,
          tokenizer: CharTokenizer | None = None, attention: bool = True,
          fixed_point_iterations: int | None = None, lens_top_k: int = LENS_TOP_K) -> Trace:
    """Run ``prompt`` through ``model`` (a LoadedModel, or a LoopedTransformer with ``tokenizer``)
    for ``iterations`` (default: the trained count) and capture everything.

    answer: the expected next token; for chain prompts it is found by solving the chain.
    fixed_point_iterations: also run this many iterations (e.g. 128) and keep the final block
    states as the approximate fixed point s*. Raises ValueError (TokenizerError included) for an
    empty or overlong prompt, unknown characters, or iterations out of range.
    """
    meta: dict = {}
    if isinstance(model, LoadedModel):
        tokenizer = model.tokenizer
        meta.update(model_name=model.name, checkpoint_sha256=model.sha256, card_trained=model.card.get("trained_iterations"))
        model = model.model
    if not isinstance(model, LoopedTransformer) or tokenizer is None:
        raise TypeError("trace needs a LoadedModel, or a LoopedTransformer and its tokenizer")
    cfg = model.cfg
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) > cfg.context_length:
        raise ValueError(f"the prompt has {len(prompt)} characters; this model reads at most {cfg.context_length}")
    ids = tokenizer.encode(prompt)
    r = model.check_iterations(iterations)
    if answer is None:
        solved = solve_chain(prompt) if set("=;?") <= set(tokenizer.chars) else None
        answer = solved[0] if solved else None
    if answer is not None and (len(answer) != 1 or answer not in tokenizer.index):
        raise ValueError(f"answer {answer!r} is not a single token of this model's vocabulary")

    names = ["embed.hook_out", "loop.hook_input", "loop.hook_initial_state", "prelude.*.hook_resid_post",
             "loop.*.blocks.*.hook_resid_post", "coda.*.hook_resid_post"]
    if attention:
        names += ["prelude.*.attn.hook_pattern", "loop.*.blocks.*.attn.hook_pattern",
                  "coda.*.attn.hook_pattern"]
    cap = Capture(names)
    x = torch.tensor([ids])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x, iterations=r, capture=cap, seed=seed)[0]
        st = cap.store
        k = cfg.n_block
        states = torch.stack([torch.stack([st[f"loop.{t}.blocks.{l}.hook_resid_post"][0] for l in range(k)])
                              for t in range(r)])  # [I, L, T, D]
        attn = None
        if attention:
            attn = torch.stack([torch.stack([st[f"loop.{t}.blocks.{l}.attn.hook_pattern"][0] for l in range(k)])
                                for t in range(r)])  # [I, L, H, T, T]

        def stack_part(part, n, hook):
            if n == 0:
                shape = (0, len(ids), cfg.d_model) if hook == "hook_resid_post" else (0, cfg.n_heads, len(ids), len(ids))
                return np.zeros(shape, np.float32)
            return _np(torch.stack([st[f"{part}.{l}.{hook}"][0] for l in range(n)]))

        lens_logp = model.logit_lens(states).log_softmax(-1)  # [I, L, T, V]
        top = lens_logp.topk(min(lens_top_k, cfg.vocab_size), dim=-1)
        last = lens_logp[:, -1]  # [I, T, V] block's last layer per iteration
        kl = torch.full((r, len(ids)), float("nan"))
        if r > 1:
            kl[1:] = (last[:-1].exp() * (last[:-1] - last[1:])).sum(-1)
        rank = prob = None
        if answer is not None:
            a = tokenizer.index[answer]
            final = lens_logp[:, :, -1]  # [I, L, V] at the last position
            rank = (final > final[..., a:a + 1]).sum(-1)
            prob = final[..., a].exp()
        fixed = None
        if fixed_point_iterations:
            n = model.check_iterations(fixed_point_iterations)
            cap2 = Capture([f"loop.{n - 1}.blocks.*.hook_resid_post"])
            model(x, iterations=n, capture=cap2, seed=seed)
            fixed = _np(torch.stack([cap2.store[f"loop.{n - 1}.blocks.{l}.hook_resid_post"][0] for l in range(k)]))
    model.train(was_training)

    meta.update(config=cfg.to_dict(), architecture=cfg.describe(), tokenizer_chars=tokenizer.chars, seed=seed,
                iterations=r, trained_iterations=cfg.iterations, is_deep=cfg.is_deep,
                fixed_point_iterations=fixed_point_iterations if fixed is not None else None,
                answer_hops=(solve_chain(prompt) or (None, None))[1])
    return Trace(
        prompt=prompt, token_labels=tuple(tokenizer.token_labels(prompt)), answer=answer, metadata=meta,
        tokens=np.asarray(ids, dtype=np.int64), states=_np(states),
        attention=None if attn is None else _np(attn),
        initial_state=_np(st["loop.hook_initial_state"][0]), injected=_np(st["loop.hook_input"][0]),
        prelude_states=stack_part("prelude", cfg.n_prelude, "hook_resid_post"),
        prelude_attention=stack_part("prelude", cfg.n_prelude, "attn.hook_pattern") if attention else None,
        coda_states=stack_part("coda", cfg.n_coda, "hook_resid_post"),
        coda_attention=stack_part("coda", cfg.n_coda, "attn.hook_pattern") if attention else None,
        logits=_np(logits), lens_top_ids=top.indices.numpy().astype(np.int64), lens_top_probs=_np(top.values.exp()),
        lens_kl=_np(kl), answer_rank=None if rank is None else rank.numpy().astype(np.int64),
        answer_prob=None if prob is None else _np(prob), fixed_point=fixed,
    )
