"""``trace_model``: a Trace of any model behind the LoopedLM protocol (the real families loaded
by ``load_folder``), written against the protocol methods only (encode, initial_state, step,
decode, logit_lens, spec, tokenizer).

Differences from the chain models' ``trace``: tokens come from ``tokenizer.json``; the answer is
text mapped to its first token; a ``CapturePlan`` (``analysis.plan``) says which iterations,
layers, positions and fields are kept and in which precision; the cost is estimated first and a
trace over the memory budget is refused (TraceBudgetError) before anything runs. Captured values
go straight from the model (CPU or GPU, any dtype) into float32 NumPy buffers that become the
Trace's arrays (no second copy), rounded to the storage dtype on the way. The logit lens runs
in chunks sized for large vocabularies. Family extras: the initial state's distribution
(``initial_state_info``), Ouro's exit gate per step and token (``exit_gate`` in the metadata:
λ, p, the threshold rule's step), Huginn's own lens (ln_f → coda → ln_f → head) as top-k of the
state after every kept iteration at every kept position (``coda_lens_top_ids`` / ``_probs``).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .. import names as capnames
from ..capture import BufferCapture
from ..plan import CapturePlan, ResolvedPlan
from .loading import resolve_device
from ..trace import Trace, _own
from ..tracing import LENS_TOP_K, _np, fixed_point_count

LENS_CHUNK_BYTES = 64 << 20  # float32 lens logits computed at once
DEFAULT_MAX_BYTES = 8 << 30  # refuse traces whose arrays and largest temporaries would pass this
FLOPS_PER_SECOND = {"cpu": 2e10, "cuda": 1e14}  # per CPU thread / per GPU: a rough figure for the time estimate
_ROUND = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TraceBudgetError(ValueError):
    """A trace would need more memory than allowed; the message gives the estimate and how to cut it."""


def estimate_trace_bytes(spec, tokens: int, iterations: int, attention: bool = True,
                         plan: ResolvedPlan | None = None, fixed_point: bool = False) -> dict:
    """Bytes of one trace (all float32 in memory, whatever the storage dtype): kept block states
    I·L·P·D·4, attention (I·L (+ p + c)) ·H·T²·4, prelude/coda states (p + c)·P·D·4, s₀ and e,
    logits T·V·4 (the forward makes all of them), the largest lens chunk (about
    ``LENS_CHUNK_BYTES``, at least one position's row of P·V·4), s* L·P·D·4. ``plan``
    (resolved) gives I, L, P and the fields; without one, everything is kept (``attention`` as
    given). Returns a dict of parts and ``total``."""
    if plan is None:
        plan = CapturePlan(attention=bool(attention)).resolve(spec, tokens, iterations)
    I, L, P, T = len(plan.iterations), len(plan.layers), len(plan.positions), tokens
    D, H, V = spec.d_model, spec.n_heads, spec.vocab_size
    pc = (spec.n_prelude + spec.n_coda) if plan.outside else 0
    lens_rows = min(I * L, max(1, LENS_CHUNK_BYTES // (P * V * 4))) * P * V * 4   # one chunk of lens logits
    kl_rows = min(P, max(1, LENS_CHUNK_BYTES // (V * 8))) * V * 8 * 3                # two log-softmax tables + a product
    parts = {"states": I * L * P * D * 4,
             "attention": (I * L + pc) * H * T * T * 4 if plan.attention else 0,
             "prelude_coda_states": pc * P * D * 4,
             "initial_state_and_input": 2 * P * D * 4,
             "logits": T * V * 4,
             "lens_chunk": max(lens_rows, kl_rows) if plan.lens else 0,
             "fixed_point": L * P * D * 4 if fixed_point else 0}
    parts["total"] = sum(parts.values())
    return parts


def estimate_trace_cost(model, tokens: int, iterations: int, plan: ResolvedPlan, device=None,
                        threads: int | None = None, fixed_point_iterations: int | None = None) -> dict:
    """``estimate_trace_bytes`` plus a rough time: ``flops`` of the forward (2·params·T per layer
    call plus causal attention), the lens (2·D·V per kept state, twice per kept iteration for
    the KL, Huginn's coda once per kept iteration) and the s* continuation, and ``seconds`` at
    ``FLOPS_PER_SECOND`` (per CPU thread, or per GPU). Real speed varies several-fold with the
    machine and dtype (bfloat16 is slow on CPUs without native support)."""
    spec = model.spec
    est = estimate_trace_bytes(spec, tokens, iterations, plan=plan, fixed_point=fixed_point_iterations is not None)
    D, V, T, r = spec.d_model, spec.vocab_size, tokens, iterations
    p, k, c = spec.n_prelude, spec.n_block, spec.n_coda
    n_params = sum(t.numel() for t in model.parameters())
    per_layer = max(0, n_params - 2 * V * D) / max(1, p + k + c)
    calls = p + k * r + c + (k * max(0, (fixed_point_iterations or 0) - r))
    layer_flops = 2 * T * per_layer + 2 * T * T * D
    flops = calls * layer_flops + 2 * T * D * V
    if plan.lens:
        I, L, P = len(plan.iterations), len(plan.layers), len(plan.positions)
        flops += 2 * D * V * P * (I * L + 2 * I)
        if hasattr(model, "coda_hidden"):
            flops += I * (c * layer_flops + 2 * P * D * V)
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    rate = FLOPS_PER_SECOND["cuda"] if dev.type == "cuda" else FLOPS_PER_SECOND["cpu"] * (threads or torch.get_num_threads())
    return dict(est, flops=float(flops), seconds=float(flops / rate))


def format_bytes(n: float) -> str:
    """"3.2 GiB", "120.5 MiB" or "12.0 KiB"."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def budget_message(est: dict, max_bytes: int) -> str:
    """The TraceBudgetError message: the estimate, its largest part and how to cut it."""
    big = max((kk for kk in est if kk not in ("total", "flops", "seconds")), key=est.get)
    return (f"this trace needs about {format_bytes(est['total'])} (mostly {big}: {format_bytes(est[big])}), "
            f"over the memory budget of {format_bytes(max_bytes)}; keep fewer iterations (every n-th, or a "
            "list), layers or positions, use fewer tokens, turn attention off, or raise the budget")


class _PlanCapture(BufferCapture):
    """BufferCapture that keeps only the plan's positions of each state (token axis -2), rounds
    to the storage precision and copies into float32 CPU buffers; names in ``keep`` are also
    stored whole (on the model's device) even when they have a slot."""

    def __init__(self, slots: dict, keep: set, positions: torch.Tensor | None, round_to: torch.dtype | None):
        super().__init__(slots, keep)
        self.positions, self.round_to = positions, round_to

    def record(self, name: str, x: torch.Tensor) -> None:
        slot = self.slots.get(name)
        if slot is not None:
            v = x[0]
            if self.positions is not None and not capnames.is_pattern(name):
                v = v.index_select(-2, self.positions)
            if self.round_to is not None:
                v = v.to(self.round_to)
            slot[0][slot[1]].copy_(v)
            self.written.add(name)
        if name in self.keep:
            self.store[name] = x.detach()
            self.written.add(name)

    def check_complete(self) -> None:
        """CaptureError naming the slots and kept names never recorded (kept ones may have been taken out of ``store``)."""
        self.store, stored = {**self.store, **{n: None for n in self.keep & self.written}}, self.store
        try:
            super().check_complete()
        finally:
            self.store = stored


def _buffer(shape) -> tuple[np.ndarray, torch.Tensor]:
    """A float32 array and a tensor sharing its memory, its pages touched once here: torch's
    multi-threaded copies into never-touched pages fault them one by one under the kernel's
    lock (0.1-0.25 s for Ouro's 100 MB of states, 5 % of its forward); one write first costs 15 ms."""
    arr = np.empty(shape, dtype=np.float32)
    arr.fill(0.0)
    return arr, torch.from_numpy(arr)


def _topk_rows(logits_of, n_rows: int, P: int, V: int, K: int):
    """Top-K ids / probabilities [n_rows, P, K] of ``logits_of(i, j) -> [j - i, P, V]`` taken in chunks
    of rows, with each chunk's logsumexp [.., P]; also the last position's logits [n_rows, V] and lse."""
    per = max(1, LENS_CHUNK_BYTES // (P * V * 4))
    ids, probs = torch.empty((n_rows, P, K), dtype=torch.int64), torch.empty((n_rows, P, K))
    last, last_lse = torch.empty((n_rows, V)), torch.empty((n_rows,))
    for i in range(0, n_rows, per):
        j = min(n_rows, i + per)
        lens = logits_of(i, j).float()                          # [c, P, V]
        lse = lens.logsumexp(-1, keepdim=True)
        top = lens.topk(K, dim=-1)
        ids[i:j], probs[i:j] = top.indices.cpu(), (top.values - lse).exp().cpu()
        last[i:j], last_lse[i:j] = lens[:, -1].cpu(), lse[:, -1, 0].cpu()
    return ids, probs, last, last_lse


def _kl_positions(model, h_prev, h_cur) -> torch.Tensor:
    """KL(p_prev || p_cur) [P] (float64) of the logit lens of two last-layer states [P, D], in
    chunks of positions so no [P, V] float64 table is held whole."""
    P, V = h_cur.shape[0], model.spec.vocab_size
    per = max(1, LENS_CHUNK_BYTES // (V * 8))
    out = torch.empty(P, dtype=torch.float64)
    for i in range(0, P, per):
        a = model.logit_lens(h_prev[i:i + per]).double().log_softmax(-1)
        b = model.logit_lens(h_cur[i:i + per]).double().log_softmax(-1)
        out[i:i + per] = (a.exp() * (a - b)).sum(-1).cpu()
    return out


def preview(model, prompt: str, iterations: int | None = None, plan: CapturePlan | None = None,
            attention: bool | None = None, fixed_point_iterations: int | None = 0, add_special_tokens: bool = True,
            device=None, threads: int | None = None) -> dict:
    """What ``trace_model`` would do, without running: ``ids`` (the prompt's tokens), ``iterations``,
    ``plan`` (ResolvedPlan), ``fixed_point_iterations`` (None: no s*) and ``estimate``
    (``estimate_trace_cost``: bytes by part, ``total``, ``flops``, ``seconds``). Raises ValueError
    for an empty or overlong prompt, bad iterations or a plan index out of range."""
    spec, tok = model.spec, model.tokenizer
    if tok is None:
        raise TypeError("trace_model needs a model with a tokenizer (load it with load_folder)")
    if not prompt:
        raise ValueError("the prompt is empty")
    plan = CapturePlan() if plan is None else plan
    if not isinstance(plan, CapturePlan):
        raise TypeError(f"plan must be a CapturePlan, got {type(plan).__name__}")
    if attention is not None:
        plan = dataclasses.replace(plan, attention=bool(attention))
    ids = tok.encode(prompt, add_special_tokens=add_special_tokens)
    if len(ids) > spec.context_length:
        raise ValueError(f"the prompt has {len(ids)} tokens; this model reads at most {spec.context_length}")
    r = spec.trained_mean if iterations is None else iterations
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 1024:
        raise ValueError(f"iterations must be an integer between 1 and 1024, got {r!r}")
    if spec.is_deep and r != 1:
        raise ValueError("a deep model runs its layers once: iterations must be 1")
    n_fixed = fixed_point_count(fixed_point_iterations, r, spec.is_deep)
    rp = plan.resolve(spec, len(ids), r)
    est = estimate_trace_cost(model, len(ids), r, rp, device, threads, n_fixed)
    return dict(ids=ids, iterations=r, plan=rp, fixed_point_iterations=n_fixed, estimate=est)


def trace_model(model, prompt: str, iterations: int | None = None, seed: int = 0, answer: str | None = None,
                attention: bool | None = None, fixed_point_iterations: int | None = 0, lens_top_k: int = LENS_TOP_K,
                add_special_tokens: bool = True, metadata: dict | None = None,
                max_bytes: int | None = DEFAULT_MAX_BYTES, plan: CapturePlan | None = None, device=None) -> Trace:
    """Run ``prompt`` through a protocol model for ``iterations`` (default: the trained mean) and
    capture what ``plan`` asks (default ``CapturePlan()``: every iteration, layer and position,
    attention unless it passes ``ATTENTION_AUTO_MAX_BYTES``, the lens, prelude/coda, float32):
    block states, attention, prelude and coda states, s₀, e, the logits, the logit lens and, for
    Huginn, the coda lens. ``attention`` True/False overrides the plan's (None: the plan's).
    ``answer`` is text; its first token is tracked (at the last token, which a plan always keeps).
    fixed_point_iterations: 0 (default here: real models are large) skips s*; n gives max(n, r).
    max_bytes: refuse (TraceBudgetError) before running when ``estimate_trace_bytes`` passes it
    (None: no limit). device: None keeps the model where it is; "auto" | "cpu" | "cuda" moves it
    there first. ``metadata["capture"]`` records the resolved plan. Raises ValueError for an
    empty or overlong prompt, bad iterations, a plan index out of range or an empty answer."""
    pre = preview(model, prompt, iterations, plan, attention, fixed_point_iterations, add_special_tokens, device)
    spec, tok, ids, r, rp, est, n_fixed = (model.spec, model.tokenizer, pre["ids"], pre["iterations"], pre["plan"],
                                          pre["estimate"], pre["fixed_point_iterations"])
    if max_bytes is not None and est["total"] > max_bytes:
        raise TraceBudgetError(budget_message(est, max_bytes))
    answer_id = tok.answer_token(answer) if answer is not None else None
    if device is not None:
        dev = resolve_device(device)
        if next(model.parameters()).device != dev:
            model.to(dev)
    param = next(model.parameters())
    was_eager = getattr(model, "eager", False)
    if rp.attention:  # every iteration eager, so a partial plan's numbers equal a full trace's
        model.eager = True
    try:
        arrays, extra = _run(model, ids, r, seed, rp, answer_id, n_fixed, min(lens_top_k, spec.vocab_size), param)
    finally:
        model.eager = was_eager
    if hasattr(model, "initial_state_info"):
        extra["initial_state_info"] = model.initial_state_info()
    meta = dict(model_name=getattr(model, "name", None), architecture=spec.describe(), seed=int(seed), iterations=r,
                trained_iterations=spec.trained_mean, is_deep=spec.is_deep, fixed_point_iterations=n_fixed,
                family=spec.family, model_dtype=str(param.dtype).replace("torch.", ""), device=str(param.device),
                config=spec.config_dict(), capture=rp.to_metadata(), **extra)
    meta.update(metadata or {})
    arrays = {name: None if a is None else _own(a) for name, a in arrays.items()}
    labels = tok.token_labels(ids)
    return Trace(prompt=prompt, token_labels=tuple(labels[i] for i in rp.positions), answer=answer, metadata=meta,
                 **arrays)


def _run(model, ids, r, seed, rp: ResolvedPlan, answer_id, n_fixed, K, param):
    """The captured run of ``trace_model``: (arrays for the Trace, extra metadata)."""
    spec = model.spec
    p, k, c, T, D, H, V = spec.n_prelude, spec.n_block, spec.n_coda, len(ids), spec.d_model, spec.n_heads, spec.vocab_size
    its, layers, pos = rp.iterations, rp.layers, rp.positions
    I, L, P = len(its), len(layers), len(pos)
    dev = param.device
    pos_t = None if rp.all_positions else torch.tensor(pos, device=dev)
    round_to = _ROUND[rp.store_dtype]
    states, states_t = _buffer((I, L, P, D))
    slots = {capnames.block_resid(t, l): (states_t, (ti, li)) for ti, t in enumerate(its) for li, l in enumerate(layers)}
    out = {}
    if rp.attention:
        out["attention"], buf = _buffer((I, L, H, T, T))
        slots.update({capnames.block_pattern(t, l): (buf, (ti, li)) for ti, t in enumerate(its)
                      for li, l in enumerate(layers)})
    for part, n in (("prelude", p), ("coda", c)):
        if not (rp.outside and n):
            continue
        out[f"{part}_states"], buf = _buffer((n, P, D))
        slots.update({capnames.part_resid(part, l): (buf, (l,)) for l in range(n)})
        if rp.attention:
            out[f"{part}_attention"], buf = _buffer((n, H, T, T))
            slots.update({capnames.part_pattern(part, l): (buf, (l,)) for l in range(n)})
    fixed = fixed_slots = None
    if n_fixed is not None:  # s*: the kept layers and positions of iteration n_fixed - 1
        fixed, fixed_t = _buffer((L, P, D))
        fixed_slots = {capnames.block_resid(n_fixed - 1, l): (fixed_t, (li,)) for li, l in enumerate(layers)}
        if n_fixed == r and r - 1 not in its:  # the run's last iteration, recorded during the run
            slots.update(fixed_slots)
    last_layer = [capnames.block_resid(t, k - 1) for t in range(r)]
    keep = {capnames.INPUT, capnames.INITIAL_STATE} | (set(last_layer) if rp.lens else set())
    cap = _PlanCapture(slots, keep, pos_t, round_to)
    at = (lambda h: h[0] if pos_t is None else h[0].index_select(0, pos_t))  # noqa: E731  [1, T, D] -> [P, D]
    kept = set(its)
    extra, gates = {}, []
    kl = torch.full((I, P), float("nan"), dtype=torch.float64) if rp.lens else None
    coda = rp.lens and hasattr(model, "coda_hidden")
    if coda:
        coda_ids, coda_probs = torch.empty((I, P, K), dtype=torch.int64), torch.empty((I, P, K))
    with torch.no_grad():
        x = torch.tensor([ids], device=dev)
        e = model.encode(x, cap)
        s = model.initial_state(e, seed)
        cap.record(capnames.INITIAL_STATE, s)
        h_prev = None
        for t in range(r):
            s = model.step(s, e, t, cap)
            if hasattr(model, "gate_logit"):
                gates.append(model.gate_logit(s))
            if rp.lens:
                h = at(cap.store.pop(last_layer[t]))
                if t in kept:
                    ti = its.index(t)
                    if h_prev is not None:
                        kl[ti] = _kl_positions(model, h_prev, h)
                    if coda:
                        hid = at(model.coda_hidden(s))[None]
                        ci, cp, _, _ = _topk_rows(lambda i, j: model.unembed(hid[i:j]), 1, P, V, K)
                        coda_ids[ti], coda_probs[ti] = ci[0], cp[0]
                h_prev = h if t + 1 in kept else None
        logits = model.decode(s, cap)[0]
        cap.check_complete()
        st = cap.store
        out["logits"] = _np(logits if pos_t is None else logits.index_select(0, pos_t))
        del logits
        rank = prob = None
        if rp.lens:
            flat = states_t.view(I * L, P, D)
            top_ids, top_probs, last, last_lse = _topk_rows(
                lambda i, j: model.logit_lens(flat[i:j].to(device=dev, dtype=param.dtype)), I * L, P, V, K)
            if answer_id is not None:
                last, last_lse = last.view(I, L, V), last_lse.view(I, L)
                rank = (last > last[..., answer_id:answer_id + 1]).sum(-1)
                prob = (last[..., answer_id] - last_lse).exp()
            out.update(lens_top_ids=top_ids.view(I, L, P, K).numpy(), lens_top_probs=_np(top_probs.view(I, L, P, K)),
                       lens_kl=_np(kl))
            if coda:
                out.update(coda_lens_top_ids=coda_ids.numpy(), coda_lens_top_probs=_np(coda_probs))
        if n_fixed is not None and n_fixed > r:  # continue from s_r: the same numbers as a plain n-iteration run
            for t in range(r, n_fixed - 1):
                s = model.step(s, e, t)
            fcap = _PlanCapture(fixed_slots, set(), pos_t, round_to)
            model.step(s, e, n_fixed - 1, fcap)
            fcap.check_complete()
        if n_fixed == r and r - 1 in kept:
            fixed[:] = states[its.index(r - 1)]
        if n_fixed is not None:
            out["fixed_point"] = fixed
        if gates:
            g = model.exit_gate(gate_logits=torch.stack(gates))
            sel = list(pos)
            extra["exit_gate"] = {"lambda": g.lam[:, 0][:, sel].tolist(), "p": g.p[:, 0][:, sel].tolist(),
                                  "exit_step": g.exit_step[0][sel].tolist(), "threshold": g.threshold,
                                  "gate_dtype": str(g.gate_logits.dtype).replace("torch.", "")}
    out.update(tokens=np.asarray([ids[i] for i in pos], dtype=np.int64), states=states,
               initial_state=_np(at(st[capnames.INITIAL_STATE])), injected=_np(at(st[capnames.INPUT])),
               answer_rank=None if rank is None else rank.numpy().astype(np.int64),
               answer_prob=None if prob is None else _np(prob))
    return out, extra
