"""Run an audit: every prompt of a set, traced once, rows written chunk by chunk; resumable.

``run_audit(AuditConfig, progress=None, on_chunk=None) -> AuditResult``. Engines:

- ``inline``: in this process, one chunk after another;
- ``ray``: ``workers`` Ray actors, each loading the model(s) once; a local Ray is started
  (``num_cpus = workers``, no dashboard, a small object store) unless ``address`` joins a
  running cluster. Workers import this checkout's ``analysis`` (PYTHONPATH locally, uploaded as
  a ``py_modules`` package on a cluster; checkpoints travel through the object store there).

Only the driver writes: each finished chunk goes to ``parts/`` atomically (see ``tables``), the
manifest lists the finished prompt ids, and a rerun of the same command skips them, so a crash
or a killed worker loses nothing finished and duplicates nothing. When every prompt is done the
parts are merged into ``prompts.parquet``, ``tokens.parquet`` and ``layers.parquet``.
One cohesive module (about 400 lines): the driver, the worker and the progress line share the
chunk protocol above.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .prompts import PromptRecord, read_prompts
from .tables import TABLES, clean_partial, finished_ids, merge_parts, schemas, write_chunk, write_json_atomic

MANIFEST = "manifest.json"
WORKER_NAME = "loopscope-audit-worker-"
AUDIT_FORMAT = "loopscope-audit"
AUDIT_VERSION = 1
ENGINES = ("inline", "ray")
PACKAGE_DIR = Path(__file__).resolve().parent.parent          # analysis/
REPO_ROOT = PACKAGE_DIR.parent


class AuditError(ValueError):
    """An audit cannot start or continue; the message says why."""


@dataclass
class AuditConfig:
    """One audit. model/deep: checkpoint folders; prompts: a JSON-lines file; iterations: I;
    out: the output folder; engine: "inline" or "ray"; address: a Ray cluster to join (None:
    start a local Ray); workers: Ray actors; chunk_size: prompts per part file; threads: torch
    threads per worker (1 keeps numbers identical across engines); fixed_point_iterations:
    length of the s* run (0: none); object_store_mb: the local Ray's object store."""

    model: str
    prompts: str
    iterations: int
    out: str
    deep: str | None = None
    engine: str = "inline"
    address: str | None = None
    workers: int = 2
    chunk_size: int = 8
    seed: int = 0
    threads: int = 1
    fixed_point_iterations: int = 128
    object_store_mb: int = 80


@dataclass
class AuditResult:
    out: Path
    total: int
    done_before: int
    done_now: int
    rows: dict = field(default_factory=dict)
    seconds: float = 0.0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def software_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "numpy", "pyarrow", "pandas", "ray", "loopscope"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# ---------------------------------------------------------------- the worker (inline or a Ray actor)
class AuditWorker:
    """Loads the model(s) once and turns chunks of prompts into rows. ``model``/``deep`` are
    folders, or {file name: bytes} of a folder (shipped to a cluster node)."""

    def __init__(self, model, deep, iterations: int, seed: int, fixed_point_iterations: int, threads: int):
        import torch

        from ..models.native import load_checkpoint
        from .rows import RowSettings, rules_for

        torch.set_num_threads(max(1, int(threads)))
        self._tmp = []
        self.model = load_checkpoint(self._folder(model))
        self.deep = load_checkpoint(self._folder(deep)) if deep is not None else None
        self.settings = RowSettings(iterations=iterations, seed=seed, fixed_point_iterations=fixed_point_iterations)
        self.rules = rules_for(self.model)

    def _folder(self, src):
        if isinstance(src, dict):  # files of a checkpoint folder, materialised on this node
            d = tempfile.mkdtemp(prefix="loopscope-ckpt-")
            self._tmp.append(d)
            for name, data in src.items():
                Path(d, name).write_bytes(data)
            return d
        return src

    def ready(self) -> list[str]:
        return [r.name for r in self.rules]

    def run_chunk(self, items: list[tuple[int, PromptRecord]]) -> dict[str, list[dict]]:
        """Rows of the three tables for ``items`` ((prompt id, record) pairs)."""
        from .rows import error_row, prompt_rows

        out = {name: [] for name in TABLES}
        for pid, rec in items:
            try:
                rows = prompt_rows(self.model, self.deep, pid, rec, self.settings, self.rules)
            except ValueError as exc:  # the model cannot read this prompt: record why, keep going
                rows = {"prompts": [error_row(pid, rec, " ".join(str(exc).split()))]}
            for name in TABLES:
                out[name].extend(rows.get(name, []))
        return out


# ---------------------------------------------------------------- progress
class Progress:
    """Counts, rate and ETA; prints one updating line to ``stream`` (None: silent) and calls
    ``callback(done, total, rate, eta_seconds)`` if given (the app's progress bar)."""

    def __init__(self, total: int, done: int, stream=sys.stderr, callback=None):
        self.total, self.start_done, self.done = total, done, done
        self.t0 = time.perf_counter()
        self.stream, self.callback = stream, callback
        self._emit()

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return (self.done - self.start_done) / dt if dt > 0 else 0.0

    @property
    def eta(self) -> float | None:
        r = self.rate
        return (self.total - self.done) / r if r > 0 else None

    def line(self) -> str:
        eta = self.eta
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"audit: {self.done}/{self.total} prompts ({pct:.0f}%), {self.rate:.2f} prompts/s, "
                f"ETA {'?' if eta is None else f'{eta:.0f} s'}")

    def _emit(self):
        if self.stream is not None:
            tty = getattr(self.stream, "isatty", lambda: False)()
            self.stream.write(("\r" if tty else "") + self.line() + ("" if tty else "\n"))
            self.stream.flush()
        if self.callback is not None:
            self.callback(self.done, self.total, self.rate, self.eta)

    def restart_clock(self):
        """Measure the rate from now (called once the workers are ready, so start-up is not in the ETA)."""
        self.t0 = time.perf_counter()

    def update(self, n: int):
        self.done += n
        self._emit()

    def close(self):
        if self.stream is not None and getattr(self.stream, "isatty", lambda: False)():
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------- manifest and resume
def _identity(cfg: AuditConfig, model_sha: str, deep_sha: str | None, prompt_sha: str, rules: list[str]) -> dict:
    """What must match for a rerun to continue an existing audit folder."""
    return {"model_sha256": model_sha, "deep_sha256": deep_sha, "prompts_sha256": prompt_sha,
            "iterations": cfg.iterations, "seed": cfg.seed, "fixed_point_iterations": cfg.fixed_point_iterations,
            "rules": rules, "format_version": AUDIT_VERSION}


def read_manifest(out) -> dict | None:
    import json

    p = Path(out) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except ValueError:
        raise AuditError(f"{p} is not valid JSON") from None
    if not isinstance(m, dict) or m.get("format") != AUDIT_FORMAT:
        raise AuditError(f"{p} is not a loopscope audit manifest")
    return m


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    """Consecutive runs of at most ``size`` pending ids (a chunk never spans a finished id)."""
    out, cur = [], []
    for i in ids:
        if cur and (len(cur) == size or i != cur[-1] + 1):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _folder_files(path: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(path).iterdir() if p.is_file()}


def run_audit(cfg: AuditConfig, progress_stream=sys.stderr, progress_callback=None, on_chunk=None) -> AuditResult:
    """Run (or continue) the audit ``cfg`` describes; see the module docstring.

    on_chunk(ids): called after each chunk is written (tests use it to stop a run halfway).
    Raises AuditError for bad settings, a folder holding a different audit, or a failed worker
    (finished chunks stay; rerun to continue); PromptSetError for a malformed prompt file;
    CheckpointError for a model folder that does not load."""
    from ..models.native import load_checkpoint
    from .rows import rules_for

    if cfg.engine not in ENGINES:
        raise AuditError(f"engine must be one of {ENGINES}, got {cfg.engine!r}")
    if cfg.iterations < 1:
        raise AuditError(f"iterations must be at least 1, got {cfg.iterations}")
    if cfg.chunk_size < 1 or cfg.workers < 1:
        raise AuditError("chunk_size and workers must be at least 1")
    prompts_path = Path(cfg.prompts)
    if not prompts_path.is_file():
        raise AuditError(f"prompt file {prompts_path} does not exist")
    records = read_prompts(prompts_path)
    # the driver loads the model once too: it checks the folder early and names the rules
    loaded = load_checkpoint(cfg.model)
    if loaded.config.is_deep:
        raise AuditError(f"{cfg.model} is a deep model; pass it as --deep and a looped model as --model")
    loaded.model.check_iterations(cfg.iterations)
    rule_names = [r.name for r in rules_for(loaded)]
    deep_sha = None
    if cfg.deep:
        deep_loaded = load_checkpoint(cfg.deep)
        deep_sha = deep_loaded.sha256
        deep_cfg = deep_loaded.config.to_dict()
        del deep_loaded
    schema = schemas(rule_names)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ident = _identity(cfg, loaded.sha256, deep_sha, _sha256(prompts_path), rule_names)
    old = read_manifest(out)
    if old is not None and old.get("identity") != ident:
        diff = sorted(k for k in ident if (old.get("identity") or {}).get(k) != ident[k])
        raise AuditError(f"{out} holds a different audit (differs in {', '.join(diff)}); choose another --out folder")
    clean_partial(out)
    done = finished_ids(out)
    bad = [i for i in done if not 0 <= i < len(records)]
    if bad:
        raise AuditError(f"{out} has parts for prompt ids {bad[:5]} outside the prompt set")
    total = len(records)
    pending = [i for i in range(total) if i not in done]
    manifest = {
        "format": AUDIT_FORMAT, "version": AUDIT_VERSION, "identity": ident,
        "settings": {k: v for k, v in asdict(cfg).items()},
        "model": {"path": str(Path(cfg.model).resolve()), "name": loaded.name, "sha256": loaded.sha256,
                  "weights_sha256_full": _sha256(Path(cfg.model) / "model.safetensors"),
                  "config": loaded.config.to_dict(), "card_accuracy_by_hops": loaded.card.get("accuracy_by_hops")},
        "deep": None if not cfg.deep else {"path": str(Path(cfg.deep).resolve()), "sha256": deep_sha,
                                           "config": deep_cfg},
        "prompts": {"path": str(prompts_path.resolve()), "sha256": ident["prompts_sha256"], "count": total},
        "rules": rule_names, "software": software_versions(),
        "tables": list(TABLES), "done_ids": sorted(done), "complete": False, "rows": None,
        "runs": (old or {}).get("runs", []),
    }
    del loaded
    write_json_atomic(out / MANIFEST, manifest)

    t0 = time.perf_counter()
    prog = Progress(total, len(done), progress_stream, progress_callback)
    chunks = _chunks(pending, cfg.chunk_size)
    done_now = 0

    def finish_chunk(ids, rows):
        nonlocal done_now
        write_chunk(out, ids, rows, schema)
        done.update({i: "" for i in ids})
        done_now += len(ids)
        manifest["done_ids"] = sorted(done)
        write_json_atomic(out / MANIFEST, manifest)
        prog.update(len(ids))
        if on_chunk is not None:
            on_chunk(ids)

    try:
        if chunks:
            if cfg.engine == "inline":
                _run_inline(cfg, records, chunks, finish_chunk, prog.restart_clock)
            else:
                _run_ray(cfg, records, chunks, finish_chunk, prog.restart_clock, rule_names)
    finally:
        prog.close()
        manifest["runs"].append({"engine": cfg.engine, "workers": cfg.workers if cfg.engine == "ray" else 1,
                                 "prompts": done_now, "seconds": round(time.perf_counter() - t0, 3),
                                 "finished": len(done) == total})
        write_json_atomic(out / MANIFEST, manifest)

    rows = merge_parts(out, schema)
    manifest.update(complete=True, rows=rows)
    write_json_atomic(out / MANIFEST, manifest)
    return AuditResult(out=out, total=total, done_before=total - len(pending), done_now=done_now, rows=rows,
                       seconds=time.perf_counter() - t0)


def _run_inline(cfg, records, chunks, finish_chunk, ready):
    import torch

    threads = torch.get_num_threads()
    try:
        worker = AuditWorker(cfg.model, cfg.deep, cfg.iterations, cfg.seed, cfg.fixed_point_iterations, cfg.threads)
        ready()
        for ids in chunks:
            finish_chunk(ids, worker.run_chunk([(i, records[i]) for i in ids]))
    finally:
        torch.set_num_threads(threads)


def ray_init_kwargs(cfg: AuditConfig) -> dict:
    """``ray.init`` arguments: a local Ray sized by ``workers`` (no dashboard, small object
    store, this checkout on PYTHONPATH), or ``address`` with this checkout's ``analysis``
    package uploaded (``py_modules``)."""
    if cfg.address:
        return {"address": cfg.address, "runtime_env": {"py_modules": [str(PACKAGE_DIR)]}}
    path = os.pathsep.join([str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return {"num_cpus": cfg.workers, "include_dashboard": False, "object_store_memory": cfg.object_store_mb * 1024 * 1024,
            "runtime_env": {"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": str(cfg.threads)}},
            "log_to_driver": True, "configure_logging": False}


def _run_ray(cfg, records, chunks, finish_chunk, ready, rule_names):
    try:
        import ray
        from ray.exceptions import RayError
    except ImportError:
        raise AuditError("the ray engine needs the 'ray' package (pip install ray); or use --engine inline") from None
    started = False
    if not ray.is_initialized():
        try:
            ray.init(**ray_init_kwargs(cfg))
        except Exception as exc:  # ray raises plain Exception/ConnectionError when a node cannot start
            raise AuditError(f"Ray could not start{' or connect to ' + cfg.address if cfg.address else ''}: "
                             f"{' '.join(str(exc).split())[:300]}; try again, or use --engine inline") from None
        started = True
    try:
        model, deep = cfg.model, cfg.deep
        if cfg.address:  # other machines may not see this file system: ship the folders' files
            model = ray.put(_folder_files(cfg.model))
            deep = ray.put(_folder_files(cfg.deep)) if cfg.deep else None
        Actor = ray.remote(num_cpus=1, max_restarts=1, max_task_retries=1)(AuditWorker)
        # named (in this driver's own namespace) so a test can kill one as if it crashed
        actors = [Actor.options(name=f"{WORKER_NAME}{i}").remote(model, deep, cfg.iterations, cfg.seed,
                                                                 cfg.fixed_point_iterations, cfg.threads)
                  for i in range(min(cfg.workers, len(chunks)))]
        names = ray.get([a.ready.remote() for a in actors])
        if any(n != rule_names for n in names):
            raise AuditError("a Ray worker runs different loopscope code (its exit rules differ); "
                             "check the cluster's environment")
        ready()
        queue = list(chunks)
        running = {}
        for a in actors:  # two chunks in flight per actor keeps it busy while the driver writes
            for _ in range(2):
                if queue:
                    ids = queue.pop(0)
                    running[a.run_chunk.remote([(i, records[i]) for i in ids])] = (a, ids)
        while running:
            finished, _ = ray.wait(list(running), num_returns=1)
            ref = finished[0]
            a, ids = running.pop(ref)
            try:
                rows = ray.get(ref)
            except RayError as exc:
                raise AuditError(f"a Ray worker failed on prompts {ids[0]}-{ids[-1]}: "
                                 f"{' '.join(str(exc).split())[:300]}; finished chunks are kept, rerun to continue") from None
            finish_chunk(ids, rows)
            if queue:
                nxt = queue.pop(0)
                running[a.run_chunk.remote([(i, records[i]) for i in nxt])] = (a, nxt)
        for a in actors:
            ray.kill(a)
    finally:
        if started:
            ray.shutdown()
