"""Read a WAV file as float samples, for the developer tools and tests (writing one is `omni.write_wav`)."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from omni import PCM_SAMPLE_WIDTH
from voice.signal import pcm_to_float


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV file -> (float32 mono samples in [-1, 1), sample rate)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such WAV file: {path}")
    try:
        with wave.open(str(path), "rb") as f:
            if f.getsampwidth() != PCM_SAMPLE_WIDTH:
                raise ValueError(f"{path}: expected 16-bit PCM, got {8 * f.getsampwidth()}-bit samples")
            rate, channels = f.getframerate(), f.getnchannels()
            raw = f.readframes(f.getnframes())
    except wave.Error as e:
        raise ValueError(f"{path} is not a PCM WAV file: {e}") from e
    samples = pcm_to_float(raw)
    return samples.reshape(-1, channels).mean(axis=1), rate
