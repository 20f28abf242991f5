"""loopscope: capture and measure how looped (weight-tied) language models reason.

The library: models (``model``), checkpoints, tasks, capture (``trace`` -> ``Trace``),
measurements and projections. No Streamlit import anywhere in it.
"""
from .checkpoint import CheckpointError, LoadedModel, load_checkpoint, sample_checkpoints, save_checkpoint
from .model import Capture, LoopConfig, LoopedTransformer
from .tokenizer import CharTokenizer, TokenizerError
from .trace import Trace, TraceFormatError, trace

__all__ = ["Capture", "CharTokenizer", "CheckpointError", "LoadedModel", "LoopConfig", "LoopedTransformer",
           "TokenizerError", "Trace", "TraceFormatError", "load_checkpoint", "sample_checkpoints",
           "save_checkpoint", "trace"]
__version__ = "0.1.0"
