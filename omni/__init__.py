"""Mini-Omni inference core: importable without any web, UI or device library.

This is the surface the entry points, `serving/` and `voice/` use; the submodules are internals.
"""
from .audio import (
    CHUNK_SECONDS, OUTPUT_SAMPLE_RATE, PCM_SAMPLE_WIDTH, PCM_SCALE, SAMPLE_RATE as INPUT_SAMPLE_RATE, SAMPLES_DIR,
    load_audio, float_to_pcm, pcm_to_float, sweep_stale_temp_dirs, write_wav,
)
from .auto import MODE_HELP
from .checkpoint import FAMILIES, HUB_REPOS, snac_dir
from .codec import (
    LEVEL_OF_SLOT, N_LEVELS, SAMPLES_PER_FRAME, SECONDS_PER_FRAME, Frame, SnacCodec, frames_to_codes, frames_to_streams,
    streams_to_frames,
)
from .device import resolve_device
from .engine import DEFAULT_MAX_BATCH, OmniChunk, OmniEngine, OmniResult, prompt_length
from .errors import AudioInputError, CheckpointDownloadError, CheckpointError, ImageInputError, OmniError
from .generate import Step, to_streams
from .image import fit_image
from .runtime import AUTO_MODE, DEFAULT_MODE, MODE_NAMES
from .sampling import (
    DEFAULT_MAX_TOKENS, DEFAULT_STREAM_STRIDE, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, OFFICIAL_JOINS,
    GenerationConfig,
)
from .tokens import AUDIO_CODES, EOA, EOT, N_AUDIO_LAYERS, PAD_T, Task
from .tuning import Overrides

__all__ = [
    "AUDIO_CODES", "AUTO_MODE", "AudioInputError", "CHUNK_SECONDS", "CheckpointDownloadError", "CheckpointError",
    "DEFAULT_MAX_BATCH", "DEFAULT_MAX_TOKENS", "DEFAULT_MODE", "DEFAULT_STREAM_STRIDE", "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_K", "DEFAULT_TOP_P", "EOA", "EOT", "FAMILIES", "Frame", "GenerationConfig", "INPUT_SAMPLE_RATE",
    "ImageInputError", "LEVEL_OF_SLOT", "MODE_HELP", "MODE_NAMES", "N_AUDIO_LAYERS", "N_LEVELS", "OFFICIAL_JOINS",
    "OUTPUT_SAMPLE_RATE", "OmniChunk", "OmniEngine", "OmniError", "OmniResult", "Overrides", "PAD_T",
    "PCM_SAMPLE_WIDTH", "PCM_SCALE", "SAMPLES_DIR", "SAMPLES_PER_FRAME", "SECONDS_PER_FRAME", "SnacCodec", "Step", "Task",
    "fit_image", "float_to_pcm", "frames_to_codes", "frames_to_streams", "load_audio", "pcm_to_float",
    "prompt_length", "resolve_device", "snac_dir", "streams_to_frames", "sweep_stale_temp_dirs", "to_streams",
    "write_wav",
]
