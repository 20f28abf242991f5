"""Measures over Traces: dynamics, attention, stages, correspondence, projections; ``tables``
(tidy frames) and ``summary`` (headline numbers)."""
