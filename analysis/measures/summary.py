"""Headline numbers: each defined once, here, and read by the app's pages, the report and the CLI.

``headline(trace)`` gathers a trace's numbers (``Headline``); ``model_facts(model, trace)`` the
facts of a model's card (``ModelFacts``). Iterations in these numbers are counted the way the
pages show them: 1-based (iteration 1 is the state after the first pass); a deep model's layers
0-based.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..models.spec import TrainedSchedule
from .dynamics import contraction_rate, distance_to_fixed_point, fixed_point_spread, step_sizes
from .trajectories import class_counts, classify_trajectories


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def target_id(trace) -> int | None:
    """The answer's token id, or for free text the final prediction's (None if the logits are not finite)."""
    v = trace.vocabulary
    if trace.answer is not None and trace.answer in v:
        return v.index(trace.answer)
    last = trace.logits[-1]
    return int(np.nanargmax(last)) if np.isfinite(last).any() else None


def stable_iteration(trace) -> int | None:
    """First iteration (1-based) from which the logit lens's top-1 at the last position, at the
    block's last layer, stays the answer (the final prediction for free text); None if it is not
    the top-1 at the end. For a deep trace: the first layer (0-based) from which it stays."""
    target = target_id(trace)
    if target is None:
        return None
    top = trace.lens_top_ids[0, :, -1, 0] if trace.is_deep else trace.lens_top_ids[:, -1, -1, 0]
    hit = top == target
    if not hit[-1]:
        return None
    bad = np.nonzero(~hit)[0]
    first = int(bad[-1] + 1) if len(bad) else 0
    return first if trace.is_deep else first + 1


def median_contraction(trace, rate=None) -> float | None:
    """Median over tokens of the per-token contraction rate at the block's last layer
    (``contraction_rate(trace.states).rate[-1]``, finite values; None when there are none).
    ``rate``: that ContractionEstimate when already computed."""
    rate = contraction_rate(trace.states) if rate is None else rate
    last = np.asarray(rate.rate[-1], dtype=float)
    finite = last[np.isfinite(last)]
    return float(np.median(finite)) if finite.size else None


def trained_schedule(trace) -> TrainedSchedule:
    """The trained iteration schedule recorded in a trace's metadata (mean ``trained_iterations``,
    largest ``trained_high``; a trace without ``trained_high`` was trained at a fixed count)."""
    md = trace.metadata
    mean = int(md.get("trained_iterations") or trace.n_iterations)
    high = int(md.get("trained_high") or mean)
    low = int(md.get("trained_low") or mean)
    return TrainedSchedule(mean=mean, low=min(low, mean), high=max(mean, high),
                           distribution="fixed" if low == high == mean else "sampled")


def is_extrapolating(iterations: int, schedule: TrainedSchedule) -> bool:
    """True when ``iterations`` is past the largest count seen in training (``schedule.high``)."""
    return int(iterations) > schedule.high


@dataclass(frozen=True)
class Headline:
    """One trace's headline numbers (None where they do not apply).

    prediction / answer; final_answer_prob and final_answer_rank (0 = top) at the block's last
    layer of the last iteration; stable_from (``stable_iteration``); class_counts (looped only,
    tokens per trajectory class, default rule) and class_rule / class_description; final_step_median /
    final_step_max (relative step at the last iteration, last block layer, over tokens);
    contraction_median (``median_contraction``) and contraction_state (the whole last-layer
    state's rate), with the ContractionEstimate as ``contraction``; final_distance_median
    (relative distance to s* at the last iteration, last layer); fixed_point_spread_mean /
    fixed_point_spread_min (token mean and lowest of min_l cos(X*_0, X*_l)); schedule (trained)."""

    prediction: str
    answer: str | None
    final_answer_prob: float | None
    final_answer_rank: int | None
    stable_from: int | None
    schedule: TrainedSchedule
    class_counts: dict | None = None
    class_rule: str | None = None
    class_description: str | None = None
    final_step_median: float | None = None
    final_step_max: float | None = None
    contraction_median: float | None = None
    contraction_state: float | None = None
    contraction: object = None
    final_distance_median: float | None = None
    fixed_point_spread_mean: float | None = None
    fixed_point_spread_min: float | None = None


def headline(trace) -> Headline:
    """Every headline number of ``trace`` (see ``Headline``)."""
    kw = {}
    if not trace.is_deep:
        classes = classify_trajectories(trace.states)
        kw["class_counts"] = class_counts(classes)
        kw["class_rule"], kw["class_description"] = classes.attrs.get("rule"), classes.attrs.get("description")
        rate = contraction_rate(trace.states)
        kw["contraction"] = rate
        kw["contraction_median"] = median_contraction(trace, rate)
        kw["contraction_state"] = _finite_or_none(rate.state_rate)
        if trace.n_iterations > 1:
            last = step_sizes(trace.states)[-1, -1]
            if np.isfinite(last).any():
                kw["final_step_median"] = _finite_or_none(np.nanmedian(last))
                kw["final_step_max"] = _finite_or_none(np.nanmax(last))
        if trace.fixed_point is not None:
            dist = distance_to_fixed_point(trace.states, trace.fixed_point, relative=True)[-1, -1]
            spread = fixed_point_spread(trace.fixed_point)
            with np.errstate(all="ignore"):
                kw["final_distance_median"] = _finite_or_none(np.nanmedian(dist)) if np.isfinite(dist).any() else None
                kw["fixed_point_spread_min"] = _finite_or_none(np.nanmin(spread)) if np.isfinite(spread).any() else None
                kw["fixed_point_spread_mean"] = _finite_or_none(np.nanmean(spread)) if np.isfinite(spread).any() else None
    has_answer = trace.answer is not None and trace.answer_prob is not None
    return Headline(prediction=trace.prediction(), answer=trace.answer,
                    final_answer_prob=_finite_or_none(trace.answer_prob[-1, -1]) if has_answer else None,
                    final_answer_rank=int(trace.answer_rank[-1, -1]) if has_answer else None,
                    stable_from=stable_iteration(trace), schedule=trained_schedule(trace), **kw)


@dataclass(frozen=True)
class ModelFacts:
    """What a user needs to know about a model, from its card (or, for an uploaded trace without
    weights, its metadata). trained: the schedule; trained_label: "6 (2–18)" or "6";
    accuracy_trained_hops: mean held-out accuracy over the trained hops (lo, hi)."""

    name: str
    architecture: str | None
    kind: str
    parameters: int | None
    sha256: str | None
    path: str
    trained: TrainedSchedule | None
    training_steps: int | None = None
    accuracy_by_hops: dict | None = None
    trained_hops: tuple | None = None
    accuracy_trained_hops: float | None = None
    heldout_bits_per_char: float | None = None

    @property
    def trained_label(self) -> str | None:
        return None if self.trained is None else self.trained.describe()


def model_facts(model=None, trace=None) -> ModelFacts:
    """Facts of a LoadedModel (``model``), else of the model recorded in ``trace``'s metadata."""
    if model is None and trace is None:
        raise ValueError("model_facts needs a model or a trace")
    card = dict(model.card) if model is not None and isinstance(model.card, dict) else {}
    md = trace.metadata if trace is not None else {}
    if model is not None:
        spec = model.spec
        name, arch, kind, path, sha = model.name, spec.describe(), spec.kind, model.path, model.sha256
        params = card["parameters"] if "parameters" in card else model.model.num_parameters()
        schedule = spec.schedule
    else:
        name, arch = md.get("model_name", "unknown"), md.get("architecture")
        kind = "deep" if trace.is_deep else "looped"
        path, sha, params = "(trace only: weights not loaded)", md.get("checkpoint_sha256"), None
        config = dict(md.get("config") or {})
        if config and "family" not in config:  # a loopscope transformer's config: count (no model is built)
            from ..models.native import CheckpointError, count_parameters

            config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
            config.setdefault("kind", kind)
            try:
                params = count_parameters(config)
            except CheckpointError:  # a config outside the checked limits: the count is unknown
                params = None
        schedule = trained_schedule(trace)
    acc = card.get("accuracy_by_hops") or None
    hops = acc_mean = None
    if acc:
        hops = tuple(card.get("trained_hops") or (min(map(int, acc)), max(map(int, acc))))
        inside = [v for h, v in acc.items() if hops[0] <= int(h) <= hops[1]]
        acc_mean = sum(inside) / max(1, len(inside))
    return ModelFacts(name=name, architecture=arch, kind=kind, parameters=None if params is None else int(params),
                      sha256=sha, path=path, trained=schedule, training_steps=card.get("training_steps"),
                      accuracy_by_hops=acc, trained_hops=hops, accuracy_trained_hops=acc_mean,
                      heldout_bits_per_char=card.get("heldout_bits_per_char"))
