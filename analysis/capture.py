"""Recording a forward call's activations: ``Capture`` and the buffer capture ``trace()`` uses.

Models call ``capture.record(name, x)`` at every capture point (names from ``analysis.names``);
``wants(name)`` lets them skip work for points nobody asked for. Recording never changes the
computation.
"""
from __future__ import annotations

import fnmatch

import torch


class CaptureError(RuntimeError):
    """A capture did not receive every activation it was built for: the model and the capture
    disagree on capture-point names (the message lists the missing ones)."""


class Capture:
    """Records named activations of one forward call.

    ``names``: None records everything; otherwise an fnmatch pattern or a list of them
    (``"loop.*.blocks.*.hook_resid_post"``) or a predicate ``name -> bool``.
    Recorded tensors are detached; ``store`` maps name -> tensor. Recording never changes the
    computation: a captured forward returns exactly (bitwise) a plain forward's logits.
    """

    def __init__(self, names=None):
        self.names = [names] if isinstance(names, str) else names
        self.store: dict[str, torch.Tensor] = {}

    def wants(self, name: str) -> bool:
        """True when ``name`` is to be recorded."""
        if self.names is None:
            return True
        if callable(self.names):
            return bool(self.names(name))
        return any(fnmatch.fnmatchcase(name, p) for p in self.names)

    def record(self, name: str, x: torch.Tensor) -> None:
        """Keep ``x`` (detached) under ``name`` if wanted."""
        if self.wants(name):
            self.store[name] = x.detach()


def record(capture: Capture | None, name: str, x: torch.Tensor) -> None:
    """``capture.record(name, x)`` when there is a capture."""
    if capture is not None:
        capture.record(name, x)


class BufferCapture(Capture):
    """Copies each wanted activation [1, ...] straight into its slot of a preallocated buffer
    (``slots``: name -> (buffer, index)), so nothing is stacked afterwards; names in ``keep``
    are stored as usual. ``check_complete()`` raises CaptureError unless every slot and every
    kept name was written exactly as built: buffers start uninitialised, so an unwritten slot
    would otherwise pass garbage on as data."""

    def __init__(self, slots: dict, keep: set):
        super().__init__(None)
        self.slots, self.keep = slots, set(keep)
        self.written: set[str] = set()

    def wants(self, name: str) -> bool:
        return name in self.slots or name in self.keep

    def record(self, name: str, x: torch.Tensor) -> None:
        slot = self.slots.get(name)
        if slot is not None:
            slot[0][slot[1]] = x[0]
            self.written.add(name)
        elif name in self.keep:
            self.store[name] = x.detach()

    def check_complete(self) -> None:
        """Raise CaptureError naming the capture points that were expected but never recorded."""
        missing = sorted((set(self.slots) - self.written) | (self.keep - set(self.store)))
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CaptureError(f"the model never recorded {len(missing)} expected capture point(s): "
                               f"{', '.join(missing[:5])}{more}; its capture names do not match analysis.names")
