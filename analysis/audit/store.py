"""Where the app may open and write audits, and links from an audit row to the single-prompt pages.

The app opens audit folders only under ``allowed_roots()``: the folders listed in
``$LOOPSCOPE_AUDIT_ROOTS`` (separated by ``os.pathsep``), else ``<repo>/audits`` and
``<temp>/loopscope-audits`` (where the app's own small audits go).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from urllib.parse import urlencode

from .run import MANIFEST, REPO_ROOT, AuditError

APP_AUDITS = Path(tempfile.gettempdir()) / "loopscope-audits"


def allowed_roots() -> list[Path]:
    env = os.environ.get("LOOPSCOPE_AUDIT_ROOTS")
    roots = [Path(p).expanduser() for p in env.split(os.pathsep) if p] if env else [REPO_ROOT / "audits", APP_AUDITS]
    return [r.resolve() for r in roots]


def check_allowed(folder) -> Path:
    """The resolved folder if it lies under an allowed root and holds an audit manifest;
    AuditError (a message for the user) otherwise."""
    text = str(folder).strip()
    if not text:
        raise AuditError("enter an audit folder")
    p = Path(text).expanduser()
    if not p.is_absolute():
        raise AuditError(f"{text!r} is not an absolute path")
    p = p.resolve()
    roots = allowed_roots()
    if not any(p == r or r in p.parents for r in roots):
        raise AuditError(f"{p} is outside the folders audits may be opened from: {', '.join(map(str, roots))} "
                         "(set LOOPSCOPE_AUDIT_ROOTS to add one)")
    if not (p / MANIFEST).is_file():
        raise AuditError(f"{p} holds no audit (no {MANIFEST})")
    return p


def find_audits() -> list[Path]:
    """Audit folders directly under the allowed roots (newest first)."""
    found = []
    for r in allowed_roots():
        if r.is_dir():
            found += [p for p in r.iterdir() if (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: (p / MANIFEST).stat().st_mtime, reverse=True)


def app_audit_folder(settings: dict) -> Path:
    """Where the app writes a small audit with these settings (the same settings continue it)."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return APP_AUDITS / f"audit-{key}"


def prompt_link(manifest: dict, prompt: str, sample_dir: Path | None = None, page: str = "overview",
                max_iterations: int = 256) -> str:
    """A relative URL opening ``prompt`` in a single-prompt page with the audit's models,
    iterations and seed (the app's URL parameters looped, deep, prompt, iterations, seed)."""
    def name(path):
        if not path:
            return "none"
        p = Path(path)
        if sample_dir is not None and p.parent.resolve() == Path(sample_dir).resolve():
            return p.name
        return str(p)

    ident = manifest.get("identity", {})
    q = {"looped": name(manifest.get("model", {}).get("path")), "deep": name((manifest.get("deep") or {}).get("path")),
         "prompt": prompt, "iterations": str(min(int(ident.get("iterations", 1)), max_iterations)),
         "seed": str(ident.get("seed", 0))}
    return f"{page}?{urlencode(q)}"
