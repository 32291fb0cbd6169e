"""WAV file helpers for the entry points (the engine itself decodes input with ffmpeg)."""
from __future__ import annotations

import wave
from pathlib import Path

PCM_SAMPLE_WIDTH = 2  # bytes per int16 sample


def write_wav(path: str | Path, pcm: bytes, sample_rate: int) -> Path:
    """Write int16 LE mono PCM bytes as a playable WAV file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(PCM_SAMPLE_WIDTH)
        out.setframerate(sample_rate)
        out.writeframes(pcm)
    return path
