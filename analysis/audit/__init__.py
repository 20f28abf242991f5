"""Prompt-set audits: many prompts through a looped model (and a deep partner), one trace each,
summarised into Parquet tables; exit rules replayed after the fact; a cost card.

Modules: ``prompts`` (JSON-lines sets and generators), ``exits`` (exit-rule replay),
``rows`` (one prompt -> table rows), ``tables`` (schemas, atomic part files), ``run``
(engines, resume, progress), ``cost`` (the cost card), ``summary`` (numbers of an audit
folder), ``report`` (the HTML report; its figures are ``analysis.viz.audit``'s).
"""
import importlib

_EXPORTS = {"CostSpec": "cost", "spec_from_config": "cost", "ExitRule": "exits", "ExitSignals": "exits",
            "default_rules": "exits", "replay": "exits", "PromptRecord": "prompts", "PromptSetError": "prompts",
            "arithmetic_prompts": "prompts", "chain_prompts": "prompts", "read_prompts": "prompts",
            "write_prompts": "prompts", "AuditConfig": "run", "AuditError": "run", "AuditResult": "run",
            "run_audit": "run"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):  # imported on first use: ``python -m analysis trace`` need not load pyarrow
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
