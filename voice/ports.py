"""The small interfaces between the loop and the outside: the engine, a clock, an audio source and sink, a camera.

Real devices (`devices.py`) and the replay (`replay.py`) implement the same ones, so the loop cannot
tell them apart.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic clock."""


class Source(Protocol):
    def read(self) -> np.ndarray | None:
        """The next frame: FRAME_SAMPLES float32 samples at MIC_RATE, or None when the input has ended."""


class Sink(Protocol):
    sample_rate: int  # Hz of the PCM written

    def write(self, pcm: bytes, turn: int) -> None:
        """Queue int16 LE mono PCM of answer `turn` to play after what is queued."""

    def flush(self) -> float:
        """Drop everything queued and go silent; returns the seconds until the output actually is."""

    def buffered(self) -> float:
        """Seconds of audio queued and not yet played."""

    def take_played(self) -> np.ndarray:
        """float32 samples at `sample_rate` that went out since the last call (the echo reference)."""


class Camera(Protocol):
    def read(self) -> np.ndarray | None:
        """The current picture as an (H, W, 3) uint8 RGB array, or None if there is none."""


class Engine(Protocol):
    """What the loop uses of `OmniEngine` (and what the simulation's stand-ins provide)."""

    @property
    def sample_rate(self) -> int:
        """Hz of the answer's PCM."""

    @property
    def can_see(self) -> bool:
        """Whether `stream()` takes an `image=`."""

    def stream(self, audio: Any, **options: Any) -> Iterator[Any]:
        """Answer `audio` as a stream of `OmniChunk`s; `cancel=` ends it."""
