"""Public entry point of a checkout: `from omni_engine import OmniEngine` (installed: `from omni import ...`)."""
from omni import (
    AUTO_MODE, DEFAULT_MODE, MODE_HELP, MODE_NAMES, AudioInputError, CheckpointDownloadError, CheckpointError,
    GenerationConfig, ImageInputError, OmniChunk, OmniEngine, OmniError, OmniResult, Overrides, Task,
)

__all__ = [
    "AUTO_MODE", "AudioInputError", "CheckpointDownloadError", "CheckpointError", "DEFAULT_MODE", "GenerationConfig",
    "ImageInputError", "MODE_HELP", "MODE_NAMES", "OmniChunk", "OmniEngine", "OmniError", "OmniResult", "Overrides",
    "Task",
]
