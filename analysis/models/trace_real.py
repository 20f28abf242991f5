"""``trace_model``: a Trace of any model behind the LoopedLM protocol (the real families loaded
by ``load_folder``), written against the protocol methods only (encode, initial_state, step,
decode, logit_lens, spec, tokenizer).

Differences from the chain models' ``trace``: tokens come from ``tokenizer.json``; the answer is
text mapped to its first token; the logit lens runs in chunks sized for large vocabularies;
states are captured in the model's dtype and stored as float32. Family extras go into the
metadata: the initial state's distribution (``initial_state_info``), Ouro's exit gate per step
and token (``exit_gate``: λ, p, the threshold rule's step), Huginn's own lens of the last position
per iteration (``coda_lens_top_ids``).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import names
from ..capture import BufferCapture, Capture
from ..trace import Trace, _own
from ..tracing import LENS_TOP_K, _np, fixed_point_count

LENS_CHUNK_BYTES = 64 << 20  # float32 lens logits computed at once
DEFAULT_MAX_BYTES = 8 << 30  # refuse traces whose captured arrays would pass this


class TraceBudgetError(ValueError):
    """A trace would need more memory than allowed; the message gives the estimate and how to cut it."""


def estimate_trace_bytes(spec, tokens: int, iterations: int, attention: bool = True, state_bytes: int = 4) -> dict:
    """Bytes the captured arrays of one trace take: block states r·k·T·D in the model's dtype
    (``state_bytes``) plus their float32 copy when that dtype is narrower, attention r·k·H·T²
    float32, prelude/coda states and maps, logits T·V, plus the largest lens chunk. Returns a
    dict of parts and ``total``."""
    r, k, T, D, H, V = iterations, spec.n_block, tokens, spec.d_model, spec.n_heads, spec.vocab_size
    pc = spec.n_prelude + spec.n_coda
    per_state = state_bytes + (4 if state_bytes != 4 else 0)
    parts = {"states": r * k * T * D * per_state,
             "attention": (r * k + pc) * H * T * T * 4 if attention else 0,
             "prelude_coda_states": pc * T * D * per_state,
             "logits": T * V * 4, "lens_chunk": min(r * k * T * V * 4, max(LENS_CHUNK_BYTES, T * V * 4))}
    parts["total"] = sum(parts.values())
    return parts


def _lens_chunks(model, states, K, answer_id):
    """Logit lens of states [r, k, T, D] in chunks of rows: top-k ids / probs [r, k, T, K],
    lens at the last position [r, k, V] (for the answer's rank) and its logsumexp [r, k]."""
    r, k, T, D = states.shape
    V = model.spec.vocab_size
    flat = states.reshape(r * k, T, D)
    per = max(1, LENS_CHUNK_BYTES // (T * V * 4))
    top_ids = torch.empty((r * k, T, K), dtype=torch.int64)
    top_probs = torch.empty((r * k, T, K))
    last = torch.empty((r * k, V)) if answer_id is not None else None
    last_lse = torch.empty((r * k,))
    for i in range(0, r * k, per):
        lens = model.logit_lens(flat[i:i + per]).float()          # [c, T, V]
        lse = lens.logsumexp(-1, keepdim=True)
        top = lens.topk(K, dim=-1)
        top_ids[i:i + per], top_probs[i:i + per] = top.indices.cpu(), (top.values - lse).exp().cpu()
        if last is not None:
            last[i:i + per] = lens[:, -1].cpu()
        last_lse[i:i + per] = lse[:, -1, 0].cpu()
    return (top_ids.view(r, k, T, K), top_probs.view(r, k, T, K),
            None if last is None else last.view(r, k, V), last_lse.view(r, k))


def _lens_kl(model, states):
    """KL(p_{t-1} || p_t) [r, T] (float64, NaN at t = 0) of the lens at the block's last layer."""
    r, T = states.shape[0], states.shape[2]
    kl = torch.full((r, T), float("nan"), dtype=torch.float64)
    prev = None
    for t in range(r):
        cur = model.logit_lens(states[t, -1]).double().log_softmax(-1).cpu()   # [T, V]
        if prev is not None:
            kl[t] = (prev.exp() * (prev - cur)).sum(-1)
        prev = cur
    return kl


def trace_model(model, prompt: str, iterations: int | None = None, seed: int = 0, answer: str | None = None,
                attention: bool = True, fixed_point_iterations: int | None = 0, lens_top_k: int = LENS_TOP_K,
                add_special_tokens: bool = True, metadata: dict | None = None,
                max_bytes: int | None = DEFAULT_MAX_BYTES) -> Trace:
    """Run ``prompt`` through a protocol model for ``iterations`` (default: the trained mean) and
    capture every block state, attention (unless ``attention=False``), prelude and coda states,
    s₀, e, the logits and the logit lens. ``answer`` is text; its first token is tracked.
    fixed_point_iterations: 0 (default here: real models are large) skips s*; n gives max(n, r).
    max_bytes: refuse (TraceBudgetError) before running when ``estimate_trace_bytes`` passes it
    (None: no limit). Raises ValueError for an empty or overlong prompt, bad iterations or an
    empty answer."""
    spec, tok = model.spec, model.tokenizer
    if tok is None:
        raise TypeError("trace_model needs a model with a tokenizer (load it with load_folder)")
    if not prompt:
        raise ValueError("the prompt is empty")
    ids = tok.encode(prompt, add_special_tokens=add_special_tokens)
    if len(ids) > spec.context_length:
        raise ValueError(f"the prompt has {len(ids)} tokens; this model reads at most {spec.context_length}")
    r = spec.trained_mean if iterations is None else iterations
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 1024:
        raise ValueError(f"iterations must be an integer between 1 and 1024, got {r!r}")
    if spec.is_deep and r != 1:
        raise ValueError("a deep model runs its layers once: iterations must be 1")
    n_fixed = fixed_point_count(fixed_point_iterations, r, spec.is_deep)
    answer_id = tok.answer_token(answer) if answer is not None else None
    param = next(model.parameters())
    est = estimate_trace_bytes(spec, len(ids), r, attention, param.element_size())
    if max_bytes is not None and est["total"] > max_bytes:
        big = max((kk for kk in est if kk != "total"), key=est.get)
        raise TraceBudgetError(f"this trace needs about {est['total'] / 2**30:.1f} GiB (mostly {big}: "
                               f"{est[big] / 2**30:.1f} GiB) over the budget of {max_bytes / 2**30:.1f} GiB; "
                               "use fewer tokens or iterations, or turn attention off")

    p, k, c, T, D, H = spec.n_prelude, spec.n_block, spec.n_coda, len(ids), spec.d_model, spec.n_heads
    alloc = lambda shape: torch.empty(shape, dtype=param.dtype, device=param.device)  # noqa: E731
    states = alloc((r, k, T, D))
    slots = {names.block_resid(t, l): (states, (t, l)) for t in range(r) for l in range(k)}
    buffers = {}
    parts = [("loop", r * k)] + [(nm, n) for nm, n in (("prelude", p), ("coda", c)) if n]
    for part, n in parts:
        if part != "loop":
            buf = buffers[f"{part}_states"] = alloc((n, T, D))
            slots.update({names.part_resid(part, l): (buf, (l,)) for l in range(n)})
        if attention:
            if part == "loop":
                buf = buffers["attention"] = torch.empty((r, k, H, T, T), device=param.device)
                slots.update({names.block_pattern(t, l): (buf, (t, l)) for t in range(r) for l in range(k)})
            else:
                buf = buffers[f"{part}_attention"] = torch.empty((n, H, T, T), device=param.device)
                slots.update({names.part_pattern(part, l): (buf, (l,)) for l in range(n)})
    keep = {names.INPUT, names.INITIAL_STATE} | {names.state_out(t) for t in range(r)}
    cap = BufferCapture(slots, keep)
    x = torch.tensor([ids], device=param.device)
    extra = {}
    with torch.no_grad():
        e = model.encode(x, cap)
        s = model.initial_state(e, seed)
        cap.record(names.INITIAL_STATE, s)
        for t in range(r):
            s = model.step(s, e, t, cap)
        logits = model.decode(s, cap)[0]
        top_ids, top_probs, last, last_lse = _lens_chunks(model, states, min(lens_top_k, spec.vocab_size), answer_id)
        kl = _lens_kl(model, states)
        rank = prob = None
        if answer_id is not None:
            rank = (last > last[..., answer_id:answer_id + 1]).sum(-1)
            prob = (last[..., answer_id] - last_lse).exp()
        fixed = None
        if n_fixed is not None:
            s2 = cap.store[names.state_out(r - 1)]
            for t in range(r, n_fixed - 1):
                s2 = model.step(s2, e, t)
            cap2 = Capture([names.block_resid_of(n_fixed - 1)])
            model.step(s2, e, n_fixed - 1, cap2)
            fixed = _np(torch.stack([cap2.store[names.block_resid(n_fixed - 1, l)][0] for l in range(k)]))
        outs = torch.stack([cap.store[names.state_out(t)] for t in range(r)])  # [r, 1, T, D]
        if hasattr(model, "exit_gate"):
            g = model.exit_gate(outs)
            extra["exit_gate"] = {"lambda": g.lam[:, 0].tolist(), "p": g.p[:, 0].tolist(),
                                  "exit_step": g.exit_step[0].tolist(), "threshold": g.threshold,
                                  "gate_dtype": str(g.gate_logits.dtype).replace("torch.", "")}
        if hasattr(model, "coda_lens"):
            extra["coda_lens_top_ids"] = [int(model.coda_lens(outs[t])[0, -1].argmax()) for t in range(r)]
    if hasattr(model, "initial_state_info"):
        extra["initial_state_info"] = model.initial_state_info()
    meta = dict(model_name=getattr(model, "name", None), architecture=spec.describe(), seed=int(seed), iterations=r,
                trained_iterations=spec.trained_mean, is_deep=spec.is_deep, fixed_point_iterations=n_fixed,
                family=spec.family, storage_dtype=str(param.dtype).replace("torch.", ""),
                config=spec.config_dict(), **extra)
    meta.update(metadata or {})
    arrays = dict(tokens=np.asarray(ids, dtype=np.int64), states=_np(states),
                  initial_state=_np(cap.store[names.INITIAL_STATE][0]), injected=_np(cap.store[names.INPUT][0]),
                  **{name: _np(buf) for name, buf in buffers.items()}, logits=_np(logits),
                  lens_top_ids=top_ids.numpy(), lens_top_probs=_np(top_probs), lens_kl=_np(kl),
                  answer_rank=None if rank is None else rank.numpy().astype(np.int64),
                  answer_prob=None if prob is None else _np(prob), fixed_point=fixed)
    arrays = {name: None if a is None else _own(a) for name, a in arrays.items()}
    return Trace(prompt=prompt, token_labels=tuple(tok.token_labels(ids)), answer=answer, metadata=meta, **arrays)
