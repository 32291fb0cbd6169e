"""Public entry point: `from omni_engine import OmniEngine`."""
from omni import (
    AudioInputError, CheckpointDownloadError, CheckpointError, GenerationConfig, ImageInputError, OmniChunk, OmniEngine,
    OmniError, OmniResult, Task,
)

__all__ = [
    "AudioInputError", "CheckpointDownloadError", "CheckpointError", "GenerationConfig", "ImageInputError", "OmniChunk",
    "OmniEngine", "OmniError", "OmniResult", "Task",
]
