"""loopscope: capture and measure how looped (weight-tied) language models reason.

The library, complete without the app: ``models`` (the LoopedLM protocol, ModelSpec, the
transformer, checkpoints, the family registry), ``names`` and ``capture`` (capture points),
``trace`` (the Trace contract) and ``tracing`` (``trace()``), ``measures``, ``tasks``, ``viz``
(plotly figures), ``report`` (the HTML report), ``export``, ``lab``, ``cli`` and ``training``.
No Streamlit import anywhere in it.
"""
from .capture import Capture, CaptureError
from .models.native import CheckpointError, LoadedModel, load_checkpoint, save_checkpoint
from .models.registry import sample_checkpoints
from .models.spec import ModelSpec, TrainedSchedule
from .models.tokenizers import CharTokenizer, TokenizerError
from .models.transformer import LoopConfig, LoopedTransformer
from .trace import Trace, TraceFormatError
from .tracing import trace

__all__ = ["Capture", "CaptureError", "CharTokenizer", "CheckpointError", "LoadedModel", "LoopConfig",
           "LoopedTransformer", "ModelSpec", "TokenizerError", "Trace", "TraceFormatError", "TrainedSchedule",
           "load_checkpoint", "sample_checkpoints", "save_checkpoint", "trace"]
__version__ = "0.1.0"
