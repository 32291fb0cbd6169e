"""What a request gives back: the chunks of a streamed answer, the whole answer, and where its time went."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .audio import pcm_to_float
from .generate import Step


@dataclass
class Timings:
    """Where one request's time went, in seconds, recorded by the engine as it answers."""

    audio_decode: float = 0.0
    queue_wait: float = 0.0  # submitted to the scheduler -> its first unit of work
    image_load: float = 0.0
    mel: float = 0.0
    encoder: float = 0.0
    clip: float = 0.0
    prefill: float = 0.0  # the prompt through the model and the first tokens sampled
    decode_steps: list[float] = field(default_factory=list)  # one model step and its sampling each
    snac: list[float] = field(default_factory=list)  # one audio chunk's decoding each


@dataclass(frozen=True)
class OmniChunk:
    """One piece of a streamed answer."""

    pcm: bytes  # int16 little-endian mono 24 kHz audio; b"" for text-only tasks
    text: str  # answer text added since the previous chunk
    steps: tuple[Step, ...] = ()  # the tokens decided since the previous chunk


@dataclass(frozen=True)
class OmniResult:
    """A whole answer: the joined chunks plus the token streams in the official order."""

    pcm: bytes
    text: str
    streams: list[list[int]] = field(default_factory=list)  # 0-6 audio layers (local ids), 7 text

    @property
    def wave(self) -> np.ndarray:
        return pcm_to_float(self.pcm)
