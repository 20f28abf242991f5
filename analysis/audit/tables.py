"""Schemas of the audit's Parquet tables and atomic part-file writing.

An audit folder holds ``parts/chunk-<first>-<last>/`` (one folder per finished chunk of
prompts, each with ``prompts.parquet``, ``tokens.parquet``, ``layers.parquet``), the merged
``prompts.parquet``, ``tokens.parquet``, ``layers.parquet`` once the run is complete, and
``manifest.json``. A chunk is written into a hidden temporary folder and renamed into place
(an atomic rename on one file system), so a chunk is either fully there or absent.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TABLES = ("prompts", "tokens", "layers")
PARTS = "parts"


def schemas(rule_names: list[str]) -> dict[str, pa.Schema]:
    """The three tables' schemas for an audit replaying ``rule_names``."""
    f64, i64, s, b = pa.float64(), pa.int64(), pa.string(), pa.bool_()
    prompts = [("prompt_id", i64), ("line", i64), ("prompt", s), ("answer", s), ("tags", s), ("n_tokens", i64),
               ("iterations", i64), ("prediction", s), ("correct", b), ("correct_by_iteration", pa.list_(b)),
               ("prediction_by_iteration", pa.list_(s)), ("answer_prob_by_iteration", pa.list_(f64)),
               ("deep_prediction", s), ("deep_correct", b), ("flops_full", f64)]
    for n in rule_names:
        prompts += [(f"exit[{n}]", i64), (f"correct[{n}]", b), (f"flops[{n}]", f64), (f"token_exit[{n}]", f64)]
    prompts.append(("error", s))
    tokens = [("prompt_id", i64), ("token", i64), ("label", s), ("class", s), ("period", i64), ("tail_step", f64),
              ("straightness", f64), ("convergence_iteration", i64), ("final_step", f64),
              ("distance_to_fixed_point", f64)] + [(f"exit[{n}]", i64) for n in rule_names]
    layers = [("prompt_id", i64), ("model", s), ("iteration", i64), ("layer", i64), ("norm", f64),
              ("step_size", f64), ("cosine_step", f64), ("distance_to_fixed_point", f64), ("answer_prob", f64),
              ("answer_rank", f64)]
    return {"prompts": pa.schema(prompts), "tokens": pa.schema(tokens), "layers": pa.schema(layers)}


def chunk_name(ids: list[int]) -> str:
    return f"chunk-{min(ids):07d}-{max(ids):07d}"


def write_chunk(out: Path, ids: list[int], rows: dict[str, list[dict]], schema: dict[str, pa.Schema]) -> Path:
    """Write one finished chunk atomically (temporary folder, then rename); returns its folder.
    Every row must belong to ``ids``; the prompts table must have exactly one row per id."""
    got = sorted(r["prompt_id"] for r in rows["prompts"])
    if got != sorted(ids):
        raise RuntimeError(f"chunk rows cover prompts {got}, expected {sorted(ids)}")
    parts = out / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    tmp = parts / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    for name in TABLES:
        table = pa.Table.from_pylist(rows.get(name, []), schema=schema[name])
        pq.write_table(table, tmp / f"{name}.parquet")
    final = parts / chunk_name(ids)
    (tmp / "ids.json").write_text(json.dumps(sorted(ids)))
    os.rename(tmp, final)  # atomic; fails if the folder exists (a chunk is never written twice)
    return final


def clean_partial(out: Path) -> None:
    """Remove temporary chunk folders a killed run left behind."""
    parts = out / PARTS
    if parts.is_dir():
        for p in parts.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def finished_ids(out: Path) -> dict[int, str]:
    """prompt id -> chunk folder name, for every chunk on disk. RuntimeError if two chunks claim
    one prompt (which the writer never does)."""
    done: dict[int, str] = {}
    parts = out / PARTS
    if not parts.is_dir():
        return done
    for p in sorted(parts.iterdir()):
        if not p.name.startswith("chunk-") or not (p / "ids.json").is_file():
            continue
        for i in json.loads((p / "ids.json").read_text()):
            if i in done:
                raise RuntimeError(f"prompt {i} is in both {done[i]} and {p.name}")
            done[i] = p.name
    return done


def merge_parts(out: Path, schema: dict[str, pa.Schema]) -> dict[str, int]:
    """Concatenate every chunk's tables, sorted by prompt id (and within a prompt in row order),
    into ``<out>/<table>.parquet`` (written atomically); returns rows per table."""
    parts = sorted((out / PARTS).glob("chunk-*"))
    counts = {}
    for name in TABLES:
        tables = [pq.read_table(p / f"{name}.parquet", schema=schema[name]) for p in parts]
        t = pa.concat_tables(tables) if tables else schema[name].empty_table()
        t = t.append_column("_row", pa.array(range(len(t)), pa.int64()))
        t = t.sort_by([("prompt_id", "ascending"), ("_row", "ascending")]).drop_columns(["_row"])
        # order within a prompt is the order written; chunks are sorted by first id, rows by id
        tmp = out / f".{name}.parquet.tmp"
        pq.write_table(t, tmp)
        os.replace(tmp, out / f"{name}.parquet")
        counts[name] = len(t)
    return counts


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
