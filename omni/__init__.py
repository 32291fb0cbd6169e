"""Mini-Omni inference core: importable without any web, UI or device library.

This is the surface the entry points, `serving/` and `realtime/` use; the submodules are internals.
"""
from .audio import (
    CHUNK_SECONDS, OUTPUT_SAMPLE_RATE, PCM_SAMPLE_WIDTH, PCM_SCALE, SAMPLE_RATE as INPUT_SAMPLE_RATE, load_audio,
    sweep_stale_temp_dirs,
)
from .codec import SAMPLES_PER_FRAME
from .engine import DEFAULT_MAX_BATCH, OmniChunk, OmniEngine, OmniResult, prompt_length
from .errors import AudioInputError, CheckpointDownloadError, CheckpointError, ImageInputError, OmniError
from .image import fit_image
from .sampling import DEFAULT_MAX_TOKENS, DEFAULT_STREAM_STRIDE, GenerationConfig
from .tokens import Task

__all__ = [
    "AudioInputError", "CHUNK_SECONDS", "CheckpointDownloadError", "CheckpointError", "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_STREAM_STRIDE", "GenerationConfig", "INPUT_SAMPLE_RATE", "ImageInputError", "OUTPUT_SAMPLE_RATE",
    "OmniChunk", "OmniEngine", "OmniError", "OmniResult", "PCM_SAMPLE_WIDTH", "PCM_SCALE", "SAMPLES_PER_FRAME", "Task",
    "fit_image", "load_audio", "prompt_length", "sweep_stale_temp_dirs",
]
