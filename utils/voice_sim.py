"""Test doubles around the voice loop: a fake camera, an engine wrapper that records calls, and a recorded
voice standing in for a trained model's. The virtual clock, scripted microphone and sink are `voice/replay.py`.

A developer tool beside the runtime package `voice/`: used by the tests and by `utils/interrupt_demo.py`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from omni import OUTPUT_SAMPLE_RATE, OmniChunk
from voice.replay import STEP_S
from voice.signal import Resampler, float_to_pcm

ANSWER_CHUNK_S = 4 * STEP_S  # one engine chunk at stream_stride 4 (341 ms)


class FakeCamera:
    """A camera whose n-th picture is filled with the value n (mod 256), so a frame names itself."""

    def __init__(self, height: int = 48, width: int = 64) -> None:
        self.shape = (height, width, 3)
        self.reads = 0

    def read(self) -> np.ndarray:
        image = np.full(self.shape, self.reads % 256, np.uint8)
        self.reads += 1
        return image


class RecordingEngine:
    """The engine's interface around a real engine, recording what each `stream()` call was given.

    With `pretend_sees`, it tells the loop it can see and keeps the image to itself when the engine
    cannot: so the loop's camera hand-off is tested with a v1 checkpoint too.
    """

    def __init__(self, engine: Any, pretend_sees: bool = False) -> None:
        self.engine = engine
        self.pretend_sees = pretend_sees
        self.calls: list[dict[str, Any]] = []

    @property
    def can_see(self) -> bool:
        return self.pretend_sees or self.engine.can_see

    @property
    def sample_rate(self) -> int:
        return self.engine.sample_rate

    def stream(self, audio: Any, **kwargs: Any) -> Any:
        self.calls.append({"audio": audio, **kwargs})
        if not self.engine.can_see:
            kwargs.pop("image", None)
        return self.engine.stream(audio, **kwargs)


class SpokenAnswerEngine:
    """Stands in for a trained model's voice: streams a recorded spoken answer the way the engine does.

    The tiny random checkpoint speaks noise, which Silero does not take for speech, so its echo cannot
    show whether the guard works; a trained model speaks, and no trained weights can be had here. Same
    interface as the engine: chunks of one chunk-period of 24 kHz PCM, `cancel` checked before each.
    """

    can_see = False

    def __init__(self, speech: np.ndarray, sample_rate: int, chunk_s: float = ANSWER_CHUNK_S) -> None:
        self.pcm = float_to_pcm(Resampler(sample_rate, OUTPUT_SAMPLE_RATE)(speech))
        self.chunk_bytes = 2 * round(chunk_s * OUTPUT_SAMPLE_RATE)
        self.sample_rate = OUTPUT_SAMPLE_RATE

    def stream(self, audio: Any, *, cancel: Any, **options: Any) -> Any:
        for start in range(0, len(self.pcm), self.chunk_bytes):
            if cancel.is_set():
                return
            yield OmniChunk(self.pcm[start:start + self.chunk_bytes], "(spoken answer) " if start == 0 else "")
