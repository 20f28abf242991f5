"""The self-contained HTML report of one prompt through a looped and a deep model, built from the
headline numbers (``analysis.measures.summary``) and the figure builders (``analysis.viz``).

``build_report``, ``report_numbers`` and ``software_versions`` live in ``sections``; the
``report`` subcommand in ``command``. They load on first use, so that ``python -m analysis``
starts without plotly.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"NUMBERS_ID": "sections", "build_report": "sections", "report_numbers": "sections",
            "software_versions": "sections", "add_parser": "command", "report_for_checkpoints": "command"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'analysis.report' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
