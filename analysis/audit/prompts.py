"""Prompt sets: JSON lines ``{"prompt": str, "answer": str (optional), "tags": {...} (optional)}``.

``read_prompts(path)`` parses a file and reports every malformed line with its line number
(``PromptSetError``); ``chain_prompts`` and ``arithmetic_prompts`` generate seeded sets;
``write_prompts`` writes one record per line.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..tasks import N_STATEMENTS, make_chain


class PromptSetError(ValueError):
    """A prompt file cannot be used; ``problems`` lists ``(line number, reason)`` pairs."""

    def __init__(self, message: str, problems: list[tuple[int, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a set. line: its 1-based line in the file (0 when generated)."""

    prompt: str
    answer: str | None = None
    tags: dict = field(default_factory=dict)
    line: int = 0

    def to_json(self) -> str:
        d = {"prompt": self.prompt}
        if self.answer is not None:
            d["answer"] = self.answer
        if self.tags:
            d["tags"] = self.tags
        return json.dumps(d, sort_keys=True)


def _check(obj, lineno: int) -> PromptRecord:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"prompt", "answer", "tags"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} (allowed: prompt, answer, tags)")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError('"prompt" must be a non-empty string')
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        else:
            raise ValueError('"answer" must be a string (or a number)')
    if answer == "":
        raise ValueError('"answer" must not be empty (leave it out instead)')
    tags = obj.get("tags", {})
    if tags is None:
        tags = {}
    if not isinstance(tags, dict) or not all(isinstance(v, (str, int, float, bool)) for v in tags.values()):
        raise ValueError('"tags" must be an object of strings or numbers')
    return PromptRecord(prompt, answer, dict(tags), lineno)


def parse_prompts(text: str) -> list[PromptRecord]:
    """Records from JSON-lines text (blank lines skipped). Raises PromptSetError naming every bad
    line (``line 3: ...``) when any line is malformed, or when there is no prompt at all."""
    records, problems = [], []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            records.append(_check(json.loads(raw), lineno))
        except (ValueError, RecursionError) as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            problems.append((lineno, f"not valid JSON: {msg}" if isinstance(exc, json.JSONDecodeError) else msg))
    if problems:
        shown = "; ".join(f"line {n}: {why}" for n, why in problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise PromptSetError(f"{len(problems)} malformed line(s): {shown}{more}", problems)
    if not records:
        raise PromptSetError("the prompt set is empty")
    return records


def read_prompts(path) -> list[PromptRecord]:
    """Records of a JSON-lines file (see ``parse_prompts``); PromptSetError if unreadable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptSetError(f"cannot read prompt file {path}: {exc}") from None
    return parse_prompts(text)


def write_prompts(records, path) -> Path:
    """Write records (PromptRecord) as JSON lines; returns the path."""
    path = Path(path)
    path.write_text("".join(r.to_json() + "\n" for r in records), encoding="utf-8")
    return path


def parse_range(text: str) -> tuple[int, int]:
    """``"1-6"`` -> (1, 6); ``"3"`` -> (3, 3). ValueError for anything else."""
    lo, sep, hi = str(text).partition("-")
    try:
        a, b = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise ValueError(f"expected a number or a range like 1-6, got {text!r}") from None
    if a < 1 or b < a:
        raise ValueError(f"bad range {text!r}: need 1 <= low <= high")
    return a, b


def chain_prompts(hops: tuple[int, int] = (1, 6), n: int = 200, seed: int = 0,
                  n_statements: int = N_STATEMENTS) -> list[PromptRecord]:
    """``n`` chain prompts (``analysis.tasks.make_chain`` with ``n_statements`` statements), hop
    counts cycling through the inclusive range so each count gets n / (number of counts)
    prompts; tags ``{"hops": h}``."""
    lo, hi = hops
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        h = lo + i % (hi - lo + 1)
        ex = make_chain(rng, h, n_statements)
        out.append(PromptRecord(ex.prompt, ex.answer, {"hops": h}))
    return out


# (template, operation); {a} {b} are numbers, {x} a name, {o} an object (plural)
_NAMES = ["Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal", "Ida", "Jo"]
_OBJECTS = ["pens", "cups", "eggs", "cats", "hats", "books", "keys", "apples"]
_TEMPLATES = [
    ("{x} has {a} {o} and gets {b} more. Total: ", "add"),
    ("{x} had {a} {o} and lost {b}. Left: ", "sub"),
    ("{x} has {a} bags of {b} {o}. Total: ", "mul"),
    ("{a} {o} plus {b} {o} makes ", "add"),
    ("{x} ate {b} of {a} {o}. Left: ", "sub"),
]


def arithmetic_prompts(n: int = 100, seed: int = 0, max_answer: int = 9) -> list[PromptRecord]:
    """``n`` templated word problems (add, subtract, multiply) whose answers are whole numbers
    in 0..``max_answer`` (default single digits, so the answer is one token for character and
    most subword tokenizers); each prompt is at most 64 characters and ends where the answer
    goes. Tags: ``{"op": "add"|"sub"|"mul", "template": i}``. Seeded."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if max_answer < 1:
        raise ValueError("max_answer must be at least 1")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ti = i % len(_TEMPLATES)
        template, op = _TEMPLATES[ti]
        while True:
            if op == "add":
                c = rng.randint(2, max_answer)
                a = rng.randint(1, c - 1)
                b = c - a
            elif op == "sub":
                a = rng.randint(2, max(2, max_answer + 1))
                b = rng.randint(1, a - 1)
                c = a - b
            else:
                a, b = rng.randint(1, 9), rng.randint(1, 9)
                c = a * b
            if 0 <= c <= max_answer:
                break
        text = template.format(x=rng.choice(_NAMES), o=rng.choice(_OBJECTS), a=a, b=b)
        out.append(PromptRecord(text, str(c), {"op": op, "template": ti}))
    return out
