"""Capture-point names: every name a model records under is built and parsed here, nowhere else.

A capture point is one activation of one forward call, named like TransformerLens hooks:

    embed.hook_out                               [B, T, D]   token (+ shift) + position embeddings
    prelude.{l}.hook_resid_post                  [B, T, D]   after prelude layer l
    prelude.{l}.attn.hook_pattern                [B, H, T, T]  softmax probabilities (query, key)
    loop.hook_input                              [B, T, D]   e, what is injected each iteration
    loop.hook_initial_state                      [B, T, D]   s_0
    loop.{t}.hook_state_in                       [B, T, D]   iteration t's state after injection
    loop.{t}.blocks.{l}.hook_resid_post          [B, T, D]   after block layer l of iteration t
    loop.{t}.blocks.{l}.attn.hook_pattern        [B, H, T, T]
    loop.{t}.hook_state_out                      [B, T, D]   the state carried to iteration t + 1
    loop.{t}.hook_exit_gate                      [B, T]      Ouro's exit-gate logit after iteration t
    coda.{l}.hook_resid_post                     [B, T, D]
    coda.{l}.attn.hook_pattern                   [B, H, T, T]
    hook_final                                   [B, T, D]   after the final norm, before unembedding

Iterations ``t`` and layers ``l`` are 0-based. A model builds a layer's prefix with ``layer``
and records ``resid_post(prefix)`` / ``attn_pattern(prefix)``; readers use the named builders
(``block_resid``, ...) or ``parse``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

EMBED = "embed.hook_out"
INPUT = "loop.hook_input"
INITIAL_STATE = "loop.hook_initial_state"
FINAL = "hook_final"
PARTS = ("prelude", "loop", "coda")

# fnmatch patterns (as ``Capture`` takes them) for whole families of points
BLOCK_RESID_ALL = "loop.*.blocks.*.hook_resid_post"
BLOCK_PATTERN_ALL = "loop.*.blocks.*.attn.hook_pattern"


def layer(part: str, l: int, t: int | None = None) -> str:
    """A layer's prefix: ``prelude.{l}``, ``coda.{l}`` or (part "loop", iteration t) ``loop.{t}.blocks.{l}``."""
    if part == "loop":
        if t is None:
            raise ValueError("a block layer needs its iteration t")
        return f"loop.{int(t)}.blocks.{int(l)}"
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    return f"{part}.{int(l)}"


def resid_post(prefix: str) -> str:
    """The residual stream after the layer with this prefix."""
    return prefix + ".hook_resid_post"


def attn_pattern(prefix: str) -> str:
    """The attention probabilities of the layer with this prefix."""
    return prefix + ".attn.hook_pattern"


def block_resid(t: int, l: int) -> str:
    """``loop.{t}.blocks.{l}.hook_resid_post``: block layer l of iteration t."""
    return resid_post(layer("loop", l, t))


def block_pattern(t: int, l: int) -> str:
    """``loop.{t}.blocks.{l}.attn.hook_pattern``."""
    return attn_pattern(layer("loop", l, t))


def block_resid_of(t: int) -> str:
    """The fnmatch pattern of every block layer's state in iteration t."""
    return f"loop.{int(t)}.blocks.*.hook_resid_post"


def state_in(t: int) -> str:
    """``loop.{t}.hook_state_in``: iteration t's state after injection, before its first layer."""
    return f"loop.{int(t)}.hook_state_in"


def state_out(t: int) -> str:
    """``loop.{t}.hook_state_out``: the state iteration t hands to the next one."""
    return f"loop.{int(t)}.hook_state_out"


def exit_gate(t: int) -> str:
    """``loop.{t}.hook_exit_gate``: Ouro's exit-gate logit [B, T] after iteration t."""
    return f"loop.{int(t)}.hook_exit_gate"


def part_resid(part: str, l: int) -> str:
    """``prelude.{l}.hook_resid_post`` or ``coda.{l}.hook_resid_post``."""
    return resid_post(layer(part, l))


def part_pattern(part: str, l: int) -> str:
    """``prelude.{l}.attn.hook_pattern`` or ``coda.{l}.attn.hook_pattern``."""
    return attn_pattern(layer(part, l))


def is_pattern(name: str) -> bool:
    """Whether ``name`` is an attention-pattern capture point ([B, H, T, T], not [B, T, D])."""
    return name.endswith(".attn.hook_pattern")


@dataclass(frozen=True)
class Point:
    """A parsed capture-point name. part: "embed" | "prelude" | "loop" | "coda" | "final";
    iteration and layer are None where the name has none; hook: the last component."""

    part: str
    iteration: int | None
    layer: int | None
    hook: str


_PATTERNS = [
    (re.compile(r"loop\.(\d+)\.blocks\.(\d+)\.(hook_resid_post|attn\.hook_pattern)"), "loop"),
    (re.compile(r"loop\.(\d+)\.(hook_state_in|hook_state_out|hook_exit_gate)"), "loop-state"),
    (re.compile(r"(prelude|coda)\.(\d+)\.(hook_resid_post|attn\.hook_pattern)"), "part"),
]


def parse(name: str) -> Point:
    """The parts of a capture-point name; ValueError for a name this module does not build."""
    fixed = {EMBED: Point("embed", None, None, "hook_out"), INPUT: Point("loop", None, None, "hook_input"),
             INITIAL_STATE: Point("loop", None, None, "hook_initial_state"), FINAL: Point("final", None, None, "hook_final")}
    if name in fixed:
        return fixed[name]
    for rx, kind in _PATTERNS:
        m = rx.fullmatch(name)
        if not m:
            continue
        if kind == "loop":
            return Point("loop", int(m[1]), int(m[2]), m[3])
        if kind == "loop-state":
            return Point("loop", int(m[1]), None, m[2])
        return Point(m[1], None, int(m[2]), m[3])
    raise ValueError(f"{name!r} is not a loopscope capture-point name")
