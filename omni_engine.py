"""Public entry point: `from omni_engine import OmniEngine`."""
from omni import (
    AUTO_MODE, DEFAULT_MODE, MODE_NAMES, AudioInputError, CheckpointDownloadError, CheckpointError, GenerationConfig,
    ImageInputError, OmniChunk, OmniEngine, OmniError, OmniResult, Overrides, Task,
)
from omni.auto import REALTIME_SHARE

# The --mode help of the entry points (inference.py, server.py, realtime_vad_player.py); the modes are defined
# in omni/runtime.py, auto in omni/auto.py. Each entry point adds its default.
MODE_HELP = ("auto: exact on a GPU, and on a CPU where a measured exact decode step plus its audio decoding "
             f"takes at most {round(REALTIME_SHARE * 100)}%% of the audio it makes, else fast (measured once per "
             "machine and cached); exact: fp32, the official tokens; fast: on CPU, int8 weights for the linear "
             "layers and the embedding, several times faster, tokens differ from exact (on a GPU fast is exact); baseline: the "
             "official tokens at the official cost (full head on both rows, attention over the whole cache), "
             "kept to measure speed-ups against")

__all__ = [
    "AUTO_MODE", "AudioInputError", "CheckpointDownloadError", "CheckpointError", "DEFAULT_MODE", "GenerationConfig",
    "ImageInputError", "MODE_HELP", "MODE_NAMES", "OmniChunk", "OmniEngine", "OmniError", "OmniResult", "Overrides",
    "Task",
]
