"""Mini-Omni inference core: importable without any web, UI or device library."""
from .engine import OmniChunk, OmniEngine, OmniResult
from .errors import AudioInputError, CheckpointDownloadError, CheckpointError, ImageInputError, OmniError
from .sampling import GenerationConfig
from .tokens import Task

__all__ = [
    "AudioInputError", "CheckpointDownloadError", "CheckpointError", "GenerationConfig", "ImageInputError", "OmniChunk",
    "OmniEngine", "OmniError", "OmniResult", "Task",
]
