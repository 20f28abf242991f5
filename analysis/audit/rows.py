"""One prompt -> its rows of the three audit tables (prompts, tokens, layers).

``prompt_rows(models, prompt_id, record, settings)`` traces the prompt once at the audit's
iteration count (``analysis.trace.trace``, no attention), reads every per-iteration signal it
needs from that Trace and the model's own decoder, replays the exit rules, and returns plain
row dicts; the Trace is dropped when it returns, so memory does not grow with the set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from ..models.native import LoadedModel
from ..measures._numeric import norm as _norm
from ..measures.dynamics import cosine_steps, distance_to_fixed_point, step_sizes
from ..measures.trajectories import classify_trajectories
from ..tracing import trace
from .cost import spec_from_config
from .exits import ExitRule, ExitSignals, default_rules, replay
from .prompts import PromptRecord

CONVERGE_EPS = 1e-3  # a token has converged once its relative step stays below this


@dataclass(frozen=True)
class RowSettings:
    """What every prompt of an audit shares. iterations: I; seed: initial-state seed;
    fixed_point_iterations: length of the s* run (0: none, distances are NaN)."""

    iterations: int
    seed: int = 0
    fixed_point_iterations: int = 128


def has_gate(model: LoadedModel) -> bool:
    """Whether the model exposes an exit gate (Ouro's ``early_exit_gate``)."""
    return getattr(model.model, "early_exit_gate", None) is not None


def rules_for(model: LoadedModel) -> list[ExitRule]:
    return default_rules(has_gate(model))


@torch.no_grad()
def iteration_outputs(model: LoadedModel, states: np.ndarray, answer_id: int | None, chunk: int = 8):
    """The model's own output after each iteration, from a Trace's block states [I, L, T, D]:
    the last layer's state (through Ouro's pass norm) run through the coda, final norm and
    unembedding, i.e. the logits a forward of t + 1 iterations returns.

    Returns (kl [I, T], entropy [I, T], argmax [I, T], answer_prob [I] or None, gate [I, T] or
    None), float64 nats; gate: the exit-gate logits ``early_exit_gate(s_t)`` of a model that has
    one (Ouro), read from the state passed to the next iteration. The vocabulary axis is never
    kept for more than ``chunk`` iterations at once."""
    net = model.model
    gate_fn = getattr(net, "early_exit_gate", None)
    param = next(net.parameters())
    I, _, T, _ = states.shape
    kl = np.full((I, T), np.nan)
    ent = np.empty((I, T))
    arg = np.empty((I, T), dtype=np.int64)
    prob = np.empty(I) if answer_id is not None else None
    gate = np.empty((I, T)) if gate_fn is not None else None
    prev = None
    for i in range(0, I, chunk):
        s = torch.as_tensor(np.array(states[i:i + chunk, -1]), dtype=param.dtype, device=param.device)
        if not net.cfg.is_deep:
            s = net.carried_state(s)
        if gate is not None:
            gate[i:i + len(s)] = gate_fn(s)[..., 0].double().cpu().numpy()
        logp = net.decode(s).double().log_softmax(-1)              # [c, T, V]
        p = logp.exp()
        ent[i:i + len(s)] = (-(p * logp).sum(-1)).cpu().numpy()
        arg[i:i + len(s)] = logp.argmax(-1).cpu().numpy()
        if prob is not None:
            prob[i:i + len(s)] = p[:, -1, answer_id].cpu().numpy()
        seq = logp if prev is None else torch.cat([prev[None], logp])
        k = (seq[:-1].exp() * (seq[:-1] - seq[1:])).sum(-1).cpu().numpy()
        kl[i + (prev is None):i + len(s)] = k
        prev = logp[-1]
    return kl, ent, arg, prob, gate


def _convergence_iteration(rel: np.ndarray, eps: float) -> np.ndarray:
    """rel [I, T] relative steps (NaN at 0) -> per token the 1-based iteration from which every
    later step is < eps (-1 if the last step is not)."""
    I, T = rel.shape
    small = np.nan_to_num(rel, nan=np.inf) < eps
    small[0] = True  # iteration 1 has no step; a token whose steps are all small converged at 1
    out = np.full(T, -1, dtype=np.int64)
    for tok in range(T):
        if not small[-1, tok] or I < 2:
            continue
        bad = np.flatnonzero(~small[:, tok])
        out[tok] = (bad[-1] + 2) if len(bad) else 1
    return out


def _tags_json(tags: dict) -> str:
    return json.dumps(tags or {}, sort_keys=True)


def error_row(prompt_id: int, rec: PromptRecord, message: str) -> dict:
    """The prompts-table row of a prompt the model cannot read (too long, unknown characters)."""
    return {"prompt_id": prompt_id, "line": rec.line, "prompt": rec.prompt, "answer": rec.answer,
            "tags": _tags_json(rec.tags), "error": message}


def prompt_rows(model: LoadedModel, deep: LoadedModel | None, prompt_id: int, rec: PromptRecord,
                settings: RowSettings, rules: list[ExitRule]) -> dict[str, list[dict]]:
    """Rows for one prompt: {"prompts": [1 row], "tokens": [T rows], "layers": [I·L (+ L_deep) rows]}.

    prompts row: prompt_id, line, prompt, answer, tags (JSON), n_tokens, iterations,
    prediction (after I iterations), correct, correct_by_iteration (list[bool], None without an
    answer), prediction_by_iteration (list[str]), answer_prob_by_iteration, deep_prediction,
    deep_correct, flops_full (matrix FLOPs of the forward over the prompt at I iterations, see
    ``cost``), and per rule ``exit[NAME]`` (1-based iterations used at the answer position),
    ``correct[NAME]`` (answer correct at that exit), ``flops[NAME]`` (the forward's FLOPs when
    stopped there), ``token_exit[NAME]`` (mean over tokens), error (None). Correctness compares the greedy next
    token with the answer's first token (always wrong when that token is not in the vocabulary).
    tokens rows: prompt_id, token, label, class, period, tail_step, straightness,
    convergence_iteration (1-based, -1 never), final_step (relative step at the last
    iteration), distance_to_fixed_point (||s_I - s*|| / ||s*|| at the block's last layer, NaN
    without s*), and ``exit[NAME]`` per rule (1-based; -1 where not defined).
    layers rows: prompt_id, model ("looped"/"deep"), iteration (1-based), layer, norm,
    step_size, cosine_step, distance_to_fixed_point (means over tokens; relative distance),
    answer_prob, answer_rank (logit lens at the last position; NaN without an answer).
    Raises ValueError (tokenizer, length) for a prompt the model cannot read.
    """
    tok = model.tokenizer
    spec = spec_from_config(model.config)
    answer = rec.answer
    answer_tok = None
    if answer is not None:
        answer_tok = answer[0] if answer[0] in tok.index else None
    tr = trace(model, rec.prompt, iterations=settings.iterations, seed=settings.seed, answer=answer_tok,
               attention=False, fixed_point_iterations=settings.fixed_point_iterations or 0)
    if answer is None and tr.answer is not None:  # a chain prompt solved by the tracer
        answer, answer_tok = tr.answer, tr.answer
    a_id = tok.index[answer_tok] if answer_tok is not None else None
    lens_answer = a_id is not None and tr.answer == answer_tok  # the trace's answer_rank/prob are ours
    states = tr.states
    I, L, T, _ = states.shape
    kl, ent, arg, aprob, gate = iteration_outputs(model, states, a_id)
    last = states[:, -1]
    latent = step_sizes(last)
    cosine = cosine_steps(last)
    if a_id is not None:
        correct = arg[:, -1] == a_id
    else:  # no answer (None), or one this model cannot write (never right)
        correct = None if answer is None else np.zeros(I, dtype=bool)
    sig = ExitSignals(kl=kl, entropy=ent, argmax=arg, latent=latent, cosine=cosine, correct=correct, gate=gate)
    exits = {r.name: replay(r, sig) for r in rules}

    chars = tok.chars
    preds = [chars[i] for i in arg[:, -1]]
    row = {"prompt_id": prompt_id, "line": rec.line, "prompt": rec.prompt, "answer": answer,
           "tags": _tags_json(rec.tags), "n_tokens": T, "iterations": I,
           "prediction": preds[-1], "correct": None if correct is None else bool(correct[-1]),
           "correct_by_iteration": None if correct is None else [bool(c) for c in correct],
           "prediction_by_iteration": preds,
           "answer_prob_by_iteration": None if aprob is None else [float(p) for p in aprob],
           "deep_prediction": None, "deep_correct": None, "flops_full": spec.forward_flops(I, T), "error": None}
    for name, ex in exits.items():
        e = int(ex[-1])
        row[f"exit[{name}]"] = e + 1 if e >= 0 else None
        row[f"flops[{name}]"] = spec.forward_flops(e + 1, T) if e >= 0 else None
        row[f"correct[{name}]"] = None if (correct is None or e < 0) else bool(correct[e])
        valid = ex[ex >= 0]
        row[f"token_exit[{name}]"] = float(valid.mean() + 1) if len(valid) else None

    dist = None
    if tr.fixed_point is not None:
        dist = distance_to_fixed_point(states, tr.fixed_point, relative=True)  # [I, L, T]
    cls = classify_trajectories(states)
    conv = _convergence_iteration(latent, CONVERGE_EPS)
    labels = tr.token_labels
    tokens = []
    for t in range(T):
        r = {"prompt_id": prompt_id, "token": t, "label": labels[t], "class": str(cls["class"][t]),
             "period": int(cls["period"][t]), "tail_step": float(cls["tail_step"][t]),
             "straightness": float(cls["straightness"][t]), "convergence_iteration": int(conv[t]),
             "final_step": float(latent[-1, t]) if I > 1 else float("nan"),
             "distance_to_fixed_point": float(dist[-1, -1, t]) if dist is not None else float("nan")}
        for name, ex in exits.items():
            r[f"exit[{name}]"] = int(ex[t]) + 1 if ex[t] >= 0 else -1
        tokens.append(r)

    norms = _norm(states)                              # [I, L, T]
    steps = step_sizes(states)
    cos = cosine_steps(states)
    layers = []
    with np.errstate(invalid="ignore"):
        for i in range(I):
            for l in range(L):
                layers.append({"prompt_id": prompt_id, "model": "looped", "iteration": i + 1, "layer": l,
                               "norm": float(norms[i, l].mean()),
                               "step_size": float(np.mean(steps[i, l])) if i else float("nan"),
                               "cosine_step": float(np.mean(cos[i, l])) if i else float("nan"),
                               "distance_to_fixed_point": float(dist[i, l].mean()) if dist is not None else float("nan"),
                               "answer_prob": float(tr.answer_prob[i, l]) if lens_answer else float("nan"),
                               "answer_rank": float(tr.answer_rank[i, l]) if lens_answer else float("nan")})
    del tr
    if deep is not None:
        deep_tok = answer[0] if answer is not None and answer[0] in deep.tokenizer.index else None
        dtr = trace(deep, rec.prompt, iterations=1, seed=settings.seed, answer=deep_tok, attention=False,
                    fixed_point_iterations=0)
        dpred = dtr.prediction()
        row["deep_prediction"] = dpred
        row["deep_correct"] = None if answer is None else (deep_tok is not None and dpred == deep_tok)
        deep_lens = deep_tok is not None and dtr.answer == deep_tok
        dn = _norm(dtr.states)
        for l in range(dtr.n_layers):
            layers.append({"prompt_id": prompt_id, "model": "deep", "iteration": 1, "layer": l,
                           "norm": float(dn[0, l].mean()), "step_size": float("nan"), "cosine_step": float("nan"),
                           "distance_to_fixed_point": float("nan"),
                           "answer_prob": float(dtr.answer_prob[0, l]) if deep_lens else float("nan"),
                           "answer_rank": float(dtr.answer_rank[0, l]) if deep_lens else float("nan")})
    return {"prompts": [row], "tokens": tokens, "layers": layers}
