"""Capturing a Trace: ``trace(model, prompt, ...)`` and the fixed-point continuation.

``trace`` runs one prompt once through any ``LoopedLM`` (``analysis.models.base``) with a capture
local to the call, then, by default, continues the same run to 128 iterations for the fixed point
s*, and returns an immutable ``analysis.trace.Trace``. Capturing never changes the numbers.
Every capture point it expects must be recorded by the model (CaptureError otherwise), so a model
whose capture names drift from ``analysis.names`` fails loudly instead of handing on garbage.
"""
from __future__ import annotations

import numbers
from functools import partial

import numpy as np
import torch

from . import names as capnames
from . import tasks
from .capture import BufferCapture, Capture
from .models.base import MAX_ITERATIONS, LoopedLM, check_iterations, run
from .models.native import LoadedModel
from .models.transformer import LoopedTransformer
from .plan import STORAGE_DTYPES, STORED_FIELDS
from .trace import Trace, _own, round_to_storage

LENS_TOP_K = 5
FIXED_POINT_ITERATIONS = 128  # s* comes from max(this, iterations) iterations unless told otherwise
MAX_SEED = 2**63 - 1  # seeds are integers in [0, MAX_SEED] (torch's generator wraps others around)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().float().numpy()


def fixed_point_count(fixed_point_iterations, r: int, deep: bool) -> int | None:
    """Iterations of the s* run: None (skip) for 0/False or a deep model; the default (None or
    True) is max(FIXED_POINT_ITERATIONS, r); an explicit n gives max(n, r)."""
    fp = fixed_point_iterations
    if deep or fp is False:
        return None
    if fp is None or fp is True:
        return max(FIXED_POINT_ITERATIONS, r)
    if not isinstance(fp, numbers.Integral) or fp < 0:
        raise ValueError(f"fixed_point_iterations must be an integer >= 0 (0: skip), got {fp!r}")
    if fp == 0:
        return None
    n = max(int(fp), r)
    if n > MAX_ITERATIONS:
        raise ValueError(f"fixed_point_iterations must be at most {MAX_ITERATIONS}, got {fp}")
    return n


def _continue(model: LoopedLM, s: torch.Tensor, e: torch.Tensor, r: int, n: int, on_step=None) -> np.ndarray:
    """Iterations r..n-1 from the carried state s [1, T, D] after r iterations: the block
    states [L, T, D] of iteration n-1 (s*), the same numbers as a plain n-iteration run.
    on_step(t) is called after each iteration t."""
    for t in range(r, n - 1):
        s = model.step(s, e, t)
        if on_step is not None:
            on_step(t)
    cap = Capture([capnames.block_resid_of(n - 1)])
    model.step(s, e, n - 1, cap)
    if on_step is not None:
        on_step(n - 1)
    k = model.spec.n_block
    missing = [capnames.block_resid(n - 1, l) for l in range(k) if capnames.block_resid(n - 1, l) not in cap.store]
    if missing:
        from .capture import CaptureError
        raise CaptureError(f"the model never recorded {missing[:3]} during the fixed-point run")
    return _np(torch.stack([cap.store[capnames.block_resid(n - 1, l)][0] for l in range(k)]))


def continue_to_fixed_point(model, tr: Trace, n: int, on_step=None) -> Trace:
    """``tr`` with s* = the block states after ``n`` iterations, continued from the trace's own
    last state (the carried state after its block's last layer) and injected input: the same
    numbers as ``trace(..., fixed_point_iterations=n)``. model: the LoopedLM (or LoadedModel)
    that made ``tr``. on_step(t): called after each iteration t run here. Raises ValueError for a
    deep trace or n below the trace's iterations."""
    import dataclasses

    net = model.model if isinstance(model, LoadedModel) else model
    if tr.is_deep:
        raise ValueError("a deep model has no fixed point s*")
    if not tr.is_complete:
        raise ValueError("continuing to s* needs a trace of every iteration, layer and position "
                         "(this one keeps part of its run: metadata['capture'])")
    r = tr.n_iterations
    if not isinstance(n, numbers.Integral) or not r <= n <= MAX_ITERATIONS:
        raise ValueError(f"n must be an integer from the trace's {r} iterations to {MAX_ITERATIONS}, got {n!r}")
    param = next(net.parameters())
    as_t = partial(torch.as_tensor, dtype=param.dtype, device=param.device)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            if n == r:
                fixed = np.array(tr.states[-1])
            else:
                s = net.carried_state(as_t(np.array(tr.states[-1, -1]))[None])
                fixed = _continue(net, s, as_t(np.array(tr.injected))[None], r, n, on_step)
    finally:
        net.train(was_training)
    return dataclasses.replace(tr, fixed_point=fixed, metadata=dict(tr.metadata, fixed_point_iterations=int(n)))


def _choose_fields(patterns, attention: bool, r: int, spec) -> dict[str, list[str]]:
    """Optional Trace fields to capture -> their capture names. ``patterns`` (fnmatch patterns or a
    predicate, as in ``Capture``) must select all of a field's names or none of them."""
    k = spec.n_block
    fields = {"attention": [capnames.block_pattern(t, l) for t in range(r) for l in range(k)]}
    for part, n in (("prelude", spec.n_prelude), ("coda", spec.n_coda)):
        for field, build in (("states", capnames.part_resid), ("attention", capnames.part_pattern)):
            # an empty part is decided by its layer-0 name (nothing is recorded under it)
            fields[f"{part}_{field}"] = [build(part, l) for l in range(max(n, 1))]
    if not attention:
        fields = {f: v for f, v in fields.items() if not f.endswith("attention")}
    if patterns is None:
        return fields
    wants = Capture(patterns).wants
    chosen = {}
    for field, field_names in fields.items():
        hits = sum(map(wants, field_names))
        if hits == len(field_names):
            chosen[field] = field_names
        elif hits:
            raise ValueError(f"names select {hits} of the {len(field_names)} capture points of Trace.{field} "
                             f"(such as {field_names[0]!r}); a Trace holds all of a field or none of it")
    return chosen


def _lens(model: LoopedLM, states: torch.Tensor, K: int, answer_id: int | None):
    """The logit lens of every block state [r, k, T, D]: top-K ids and probabilities
    [r, k, T, K], the KL early-exit signal [r, T] (float64, NaN at t = 0) and the answer's rank
    and probability [r, k] at the last position (None without an answer)."""
    r, k, T, _ = states.shape
    top_ids = torch.empty((r, k, T, K), dtype=torch.int64)
    top_probs = torch.empty((r, k, T, K))
    V = model.spec.vocab_size
    final = torch.empty((r, k, V))                      # lens logits at the last position
    final_lse = torch.empty((r, k))
    kl = torch.full((r, T), float("nan"), dtype=torch.float64)
    prev = None                                   # lens log-probs of the previous iteration's last layer
    chunk = max(1, 1024 // (k * T))  # iterations per chunk: small temporaries, cache-sized
    for i in range(0, r, chunk):
        lens = model.logit_lens(states[i:i + chunk])       # [c, L, T, V] logits of every block state
        lse = lens.logsumexp(-1, keepdim=True)
        top = lens.topk(K, dim=-1)
        top_ids[i:i + chunk], top_probs[i:i + chunk] = top.indices, (top.values - lse).exp()
        final[i:i + chunk], final_lse[i:i + chunk] = lens[:, :, -1], lse[:, :, -1, 0]
        # KL in float64: near a fixed point it is tiny, a difference of close numbers
        cur = lens[:, -1].double().log_softmax(-1)        # [c, T, V]
        seq = cur if prev is None else torch.cat([prev[None], cur])
        kl[i + (prev is None):i + len(cur)] = (seq[:-1].exp() * (seq[:-1] - seq[1:])).sum(-1)
        prev = cur[-1]
    rank = prob = None
    if answer_id is not None:
        a = answer_id
        rank = (final > final[..., a:a + 1]).sum(-1)      # [I, L], ties ranked in the answer's favour
        prob = (final[..., a] - final_lse).exp()
    return top_ids, top_probs, kl, rank, prob


def trace(model, prompt: str, iterations: int | None = None, seed: int = 0, answer: str | None = None,
          tokenizer=None, attention: bool = True, fixed_point_iterations: int | None = None,
          lens_top_k: int = LENS_TOP_K, names=None, metadata: dict | None = None,
          store_dtype: str = "float32", on_step=None) -> Trace:
    """Run ``prompt`` through ``model`` (a LoadedModel, or a LoopedLM with its ``tokenizer``)
    for ``iterations`` (default: the trained schedule's mean) and capture everything asked for.

    answer: the expected next token; None asks ``analysis.tasks.expected_answer`` (a chain
    prompt's answer and hop count; free text has none).
    fixed_point_iterations: length of the run whose last block states are s* (``fixed_point``):
    default (None) max(128, iterations); an integer n gives max(n, iterations); 0 or False
    skips it (fixed_point None). The s* run continues from the traced run's last state, so it
    equals a plain forward of that length. A deep model has no s*.
    names: capture only these optional fields (fnmatch patterns or a predicate over capture
    names, as in ``Capture``): ``loop.*.blocks.*.attn.hook_pattern`` (attention),
    ``prelude.*.hook_resid_post`` / ``coda.*.hook_resid_post`` (prelude_states / coda_states),
    ``prelude.*.attn.hook_pattern`` / ``coda.*.attn.hook_pattern``; the others are None. A
    pattern that selects only part of a field raises ValueError. Block states, s_0, e, logits
    and the logit lens are always captured. Default None: everything. ``attention=False``
    drops the three attention fields whatever ``names`` says.
    metadata: extra entries merged over the computed metadata (JSON-able).
    Raises ValueError (TokenizerError included) for an empty or overlong prompt, unknown
    characters, iterations, seed or lens_top_k out of range; TypeError for a prompt that is not a
    string; CaptureError when the model does not record a capture point the Trace needs.
    seed: an integer in [0, MAX_SEED] (a bool, a float or a negative seed raises ValueError).
    lens_top_k: an integer >= 1 (capped at the vocabulary).
    store_dtype: "float32" (default) | "float16" | "bfloat16": the state and map fields are rounded
    to it and saved in it; the Trace then records ``metadata["capture"]`` (see ``analysis.plan``).
    on_step: called as ``on_step(t)`` after each iteration t (0-based) of the traced run, then of
    the s* run (progress, or a server letting other work go first); it does not change the numbers.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"the prompt must be a string, got {type(prompt).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to {MAX_SEED} (2**63 - 1), got {seed!r}")
    if isinstance(lens_top_k, bool) or not isinstance(lens_top_k, numbers.Integral) or lens_top_k < 1:
        raise ValueError(f"lens_top_k must be an integer >= 1, got {lens_top_k!r}")
    if store_dtype not in STORAGE_DTYPES:
        raise ValueError(f"store_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {store_dtype!r}")
    patterns = names  # the parameter; the module is capnames
    meta: dict = {}
    if isinstance(model, LoadedModel):
        tokenizer = model.tokenizer
        meta.update(model_name=model.name, checkpoint_sha256=model.sha256)
        model = model.model
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if not isinstance(model, LoopedLM) or tokenizer is None:
        raise TypeError("trace needs a LoadedModel, or a LoopedLM (such as a LoopedTransformer) and its tokenizer")
    spec = model.spec
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) > spec.context_length:
        raise ValueError(f"the prompt has {len(prompt)} characters; this model reads at most {spec.context_length}")
    ids = tokenizer.encode(prompt)
    r = check_iterations(spec, iterations)
    n_fixed = fixed_point_count(fixed_point_iterations, r, spec.is_deep)
    vocabulary = getattr(tokenizer, "chars", "")
    expected = tasks.expected_answer(prompt, vocabulary)
    if answer is None and expected is not None:
        answer = expected.answer
    answer_id = None
    if answer is not None:
        try:
            answer_ids = tokenizer.encode(answer) if isinstance(answer, str) and answer else []
        except ValueError:
            answer_ids = []
        if len(answer_ids) != 1:
            raise ValueError(f"answer {answer!r} is not a single token of this model's vocabulary")
        answer_id = answer_ids[0]

    k, T = spec.n_block, len(ids)
    chosen = _choose_fields(patterns, attention, r, spec)
    x = torch.tensor([ids])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            param = next(model.parameters())
            alloc = partial(torch.empty, dtype=param.dtype, device=param.device)
            H, D = spec.n_heads, spec.d_model
            states = alloc((r, k, T, D))
            slots = {capnames.block_resid(t, l): (states, (t, l)) for t in range(r) for l in range(k)}
            buffers = {}
            if "attention" in chosen:
                buffers["attention"] = alloc((r, k, H, T, T))
                slots.update({capnames.block_pattern(t, l): (buffers["attention"], (t, l))
                              for t in range(r) for l in range(k)})
            for part, n in (("prelude", spec.n_prelude), ("coda", spec.n_coda)):
                for field, build, shape in (("states", capnames.part_resid, (T, D)),
                                            ("attention", capnames.part_pattern, (H, T, T))):
                    if f"{part}_{field}" in chosen:
                        buf = buffers[f"{part}_{field}"] = alloc((n, *shape))
                        slots.update({build(part, l): (buf, (l,)) for l in range(n)})
            cap = BufferCapture(slots, keep={capnames.INPUT, capnames.INITIAL_STATE, capnames.state_out(r - 1)})
            logits = run(model, x, r, capture=cap, seed=seed, on_step=on_step)[0]
            cap.check_complete()
            st = cap.store
            K = min(lens_top_k, spec.vocab_size)
            top_ids, top_probs, kl, rank, prob = _lens(model, states, K, answer_id)
            fixed = None
            if n_fixed == r:
                fixed = _np(states[-1]).copy()
            elif n_fixed is not None:  # continue from s_r: the same numbers as a plain n-iteration run
                fixed = _continue(model, st[capnames.state_out(r - 1)], st[capnames.INPUT], r, n_fixed, on_step)
    finally:
        model.train(was_training)

    config = model.cfg.to_dict() if isinstance(model, LoopedTransformer) else spec.config_dict()
    meta.update(config=config, architecture=spec.describe(), tokenizer_chars=vocabulary, seed=int(seed),
                iterations=r, trained_iterations=spec.schedule.mean, trained_low=spec.schedule.low, trained_high=spec.schedule.high,
                is_deep=spec.is_deep, fixed_point_iterations=n_fixed,
                answer_hops=expected.hops if expected is not None else None)
    meta.update(metadata or {})
    arrays = dict(
        tokens=np.asarray(ids, dtype=np.int64), states=_np(states),
        initial_state=_np(st[capnames.INITIAL_STATE][0]), injected=_np(st[capnames.INPUT][0]),
        **{name: _np(buf) for name, buf in buffers.items()},
        logits=_np(logits), lens_top_ids=top_ids.numpy(), lens_top_probs=_np(top_probs),
        lens_kl=_np(kl), answer_rank=None if rank is None else rank.numpy().astype(np.int64),
        answer_prob=None if prob is None else _np(prob), fixed_point=fixed,
    )
    if store_dtype != "float32":
        arrays.update({f: round_to_storage(arrays[f], store_dtype) for f in STORED_FIELDS if arrays.get(f) is not None})
        meta["capture"] = dict(iterations=list(range(r)), layers=list(range(k)), positions=list(range(T)),
                               attention="attention" in chosen, attention_note=None, lens=True,
                               outside=any(f.startswith(("prelude", "coda")) for f in chosen),
                               storage_dtype=store_dtype, run_iterations=r, prompt_tokens=T)
        meta.update(metadata or {})
    # the arrays are new and held by no one else: the Trace adopts them without copying
    arrays = {name: None if a is None else _own(a) for name, a in arrays.items()}
    return Trace(prompt=prompt, token_labels=tuple(tokenizer.token_labels(prompt)), answer=answer, metadata=meta,
                 **arrays)
