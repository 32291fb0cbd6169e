"""Public entry point: `from omni_engine import OmniEngine`."""
from omni import (
    DEFAULT_MODE, MODE_NAMES, AudioInputError, CheckpointDownloadError, CheckpointError, GenerationConfig,
    ImageInputError, OmniChunk, OmniEngine, OmniError, OmniResult, Overrides, Task,
)

# The --mode help of the entry points (inference.py, server.py); the modes are defined in omni/runtime.py.
MODE_HELP = ("exact (default): fp32, the official tokens; fast: on CPU, int8 weights for the linear layers and the "
             "embedding, several times faster, tokens differ from exact (on a GPU fast is exact); baseline: the "
             "official tokens at the official cost (full head on both rows, attention over the whole cache), "
             "kept to measure speed-ups against")

__all__ = [
    "AudioInputError", "CheckpointDownloadError", "CheckpointError", "DEFAULT_MODE", "GenerationConfig",
    "ImageInputError", "MODE_HELP", "MODE_NAMES", "OmniChunk", "OmniEngine", "OmniError", "OmniResult", "Overrides",
    "Task",
]
