"""Models: the ``LoopedLM`` protocol (``base``), the declared ``ModelSpec`` (``spec``), loopscope's
own transformer (``components``, ``transformer``), tokenizers, its checkpoint format (``native``)
and the family registry (``registry``: detect a folder's family and load it)."""
from .base import MAX_ITERATIONS, LoopedLM, Tokenizer
from .spec import ModelSpec, TrainedSchedule

__all__ = ["MAX_ITERATIONS", "LoopedLM", "ModelSpec", "Tokenizer", "TrainedSchedule"]
