"""An audit folder read back, and the numbers the report and the app page show.

``load_audit(folder) -> AuditData`` (manifest + the three tables as pandas DataFrames; a run in
progress reads its finished part files). ``summarize(data) -> dict`` (JSON-able):

- ``accuracy_by_iteration``: {"all": [acc after 1..I iterations], "<tag>": {"<value>": [...]}}
- ``deep_accuracy``: {"all": acc, "<tag>": {"<value>": acc}} (None without a deep model)
- ``class_counts`` / ``class_rates``: trajectory classes over all tokens
- ``exit_rules``: per rule: accuracy at exit, mean / median exit iteration (answer position),
  mean token exit, compute fraction (mean exit / I), saved (1 - fraction), FLOPs fraction
  (cost card at the mean prompt length), histogram (prompts exiting after 1..I iterations)
- ``cost``: the cost cards (looped at I and at its trained count, deep), accuracy against FLOPs
  per token for both, and the looped model's cost at the deep model's accuracy.
Accuracies count prompts with an answer that the model could read (``error`` empty).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..models.transformer import LoopConfig
from .cost import cost_at_accuracy, spec_from_config
from .run import AuditError, read_manifest
from .tables import PARTS, TABLES, schemas


@dataclass
class AuditData:
    folder: Path
    manifest: dict
    prompts: pd.DataFrame
    tokens: pd.DataFrame
    layers: pd.DataFrame

    @property
    def rules(self) -> list[str]:
        return list(self.manifest.get("rules") or [])

    @property
    def iterations(self) -> int:
        return int(self.manifest["identity"]["iterations"])


def load_audit(folder) -> AuditData:
    """Read an audit folder (merged tables when complete, else the finished parts).
    AuditError when the folder holds no audit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    if not folder.is_dir():
        raise AuditError(f"{folder} is not a folder")
    m = read_manifest(folder)
    if m is None:
        raise AuditError(f"{folder} holds no audit (no manifest.json)")
    sch = schemas(m.get("rules") or [])
    frames = {}
    for name in TABLES:
        if m.get("complete") and (folder / f"{name}.parquet").is_file():
            t = pq.read_table(folder / f"{name}.parquet")
        else:
            parts = sorted((folder / PARTS).glob("chunk-*"))
            ts = [pq.read_table(p / f"{name}.parquet", schema=sch[name]) for p in parts]
            t = pa.concat_tables(ts) if ts else sch[name].empty_table()
        frames[name] = t.to_pandas()
    frames["prompts"] = frames["prompts"].sort_values("prompt_id", kind="stable").reset_index(drop=True)
    return AuditData(folder, m, frames["prompts"], frames["tokens"], frames["layers"])


def _f(x):
    """float or None (JSON has no NaN)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _acc_curve(df: pd.DataFrame, I: int) -> list:
    rows = [c for c in df["correct_by_iteration"] if c is not None and len(c) == I]
    if not rows:
        return [None] * I
    return [_f(v) for v in np.asarray(rows, dtype=float).mean(axis=0)]


def tag_table(prompts: pd.DataFrame) -> pd.DataFrame:
    """The ``tags`` JSON column expanded into one column per tag key (values as strings)."""
    tags = [json.loads(t) if isinstance(t, str) and t else {} for t in prompts["tags"]]
    return pd.DataFrame([{k: str(v) for k, v in d.items()} for d in tags], index=prompts.index)


def _value_key(v: str):
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


def summarize(data: AuditData) -> dict:
    """The audit's numbers (see the module docstring)."""
    I = data.iterations
    p = data.prompts
    ok = p[p["error"].isna()] if len(p) else p
    scored = ok[ok["correct"].notna()] if len(ok) else ok
    tags = tag_table(scored) if len(scored) else pd.DataFrame()
    out: dict = {"folder": str(data.folder), "model": data.manifest.get("model", {}).get("name"),
                 "deep": (data.manifest.get("deep") or {}).get("path"), "iterations": I,
                 "prompts_total": int(data.manifest.get("prompts", {}).get("count", len(p))),
                 "prompts_done": int(len(p)), "prompts_with_errors": int(len(p) - len(ok)),
                 "prompts_scored": int(len(scored)), "complete": bool(data.manifest.get("complete"))}
    # accuracy by iteration, overall and per tag value
    acc = {"all": _acc_curve(scored, I)}
    deep_acc = {"all": _f(scored["deep_correct"].astype(float).mean()) if len(scored) and scored["deep_correct"].notna().any() else None}
    for key in tags.columns if len(tags) else []:
        acc[key], deep_acc[key] = {}, {}
        for v in sorted(tags[key].dropna().unique(), key=_value_key):
            sub = scored[tags[key] == v]
            acc[key][v] = _acc_curve(sub, I)
            deep_acc[key][v] = _f(sub["deep_correct"].astype(float).mean()) if sub["deep_correct"].notna().any() else None
    out["accuracy_by_iteration"] = acc
    out["deep_accuracy"] = deep_acc if deep_acc["all"] is not None else None
    # trajectory classes
    from ..measures.trajectories import TRAJECTORY_CLASSES
    counts = data.tokens["class"].value_counts() if len(data.tokens) else {}
    n_tok = int(len(data.tokens))
    out["class_counts"] = {c: int(counts.get(c, 0)) for c in TRAJECTORY_CLASSES}
    out["class_rates"] = {c: (out["class_counts"][c] / n_tok if n_tok else None) for c in TRAJECTORY_CLASSES}
    out["tokens"] = n_tok
    # cost cards
    T = int(round(ok["n_tokens"].mean())) if len(ok) else 1
    spec = spec_from_config(LoopConfig.from_dict(data.manifest["model"]["config"]))
    deep_spec = None
    if data.manifest.get("deep"):
        deep_spec = spec_from_config(LoopConfig.from_dict(data.manifest["deep"]["config"]))
    full_flops = spec.flops_per_token(I, T)
    rules = []
    for name in data.rules:
        col = f"exit[{name}]"
        ex = scored[col].dropna().astype(float) if len(scored) else pd.Series(dtype=float)
        cor = scored[f"correct[{name}]"].dropna().astype(float) if len(scored) else pd.Series(dtype=float)
        mean_exit = _f(ex.mean()) if len(ex) else None
        hist = [int((ex == i).sum()) for i in range(1, I + 1)]
        rules.append({"rule": name, "accuracy": _f(cor.mean()) if len(cor) else None,
                      "mean_exit": mean_exit, "median_exit": _f(ex.median()) if len(ex) else None,
                      "token_mean_exit": _f(ok[f"token_exit[{name}]"].astype(float).mean()) if len(ok) else None,
                      "compute_fraction": None if mean_exit is None else mean_exit / I,
                      "saved": None if mean_exit is None else 1 - mean_exit / I,
                      "flops_fraction": None if mean_exit is None else spec.flops_per_token(mean_exit, T) / full_flops,
                      "histogram": hist})
    out["exit_rules"] = rules
    trained = int(data.manifest["model"]["config"].get("iterations", 1))
    cost = {"tokens": T, "looped": spec.card(I, T), "looped_trained": spec.card(trained, T),
            "accuracy_vs_flops": {"looped": [{"iterations": r, "flops_per_token": spec.flops_per_token(r, T),
                                              "accuracy": acc["all"][r - 1]} for r in range(1, I + 1)]}}
    if deep_spec is not None:
        cost["deep"] = deep_spec.card(1, T)
        cost["accuracy_vs_flops"]["deep"] = [{"iterations": 1, "flops_per_token": deep_spec.flops_per_token(1, T),
                                              "accuracy": deep_acc["all"]}]
        if deep_acc["all"] is not None:
            curve = {r: (acc["all"][r - 1] if acc["all"][r - 1] is not None else float("nan")) for r in range(1, I + 1)}
            cost["at_deep_accuracy"] = cost_at_accuracy(curve, deep_acc["all"], spec, deep_spec, T)
    out["cost"] = cost
    return out
