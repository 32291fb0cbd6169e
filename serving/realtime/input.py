"""The input audio buffer: pcm16 24 kHz from the client -> 16 kHz frames -> speech segments (the server VAD,
the Silero segmenter of `voice/`), or kept whole for the client's own commit when turn detection is off.

A confirmed onset and a finished utterance go to the turn machine (`responses.py`); the utterance itself
becomes a user item of the conversation. It ends with the first frame of the silence that ended it: the rest of
`silence_duration_ms` is only waited for, so the committed audio is known when that silence begins, and the
turn's answer may start then (`speculation.py`), on exactly the audio the item will hold.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from voice.signal import FRAME_SAMPLES, FRAME_SECONDS, MIC_RATE, Resampler, float_to_pcm, pcm_to_float
from voice.vad import MAX_UTTERANCE_S, Segment, Segmenter, SpeechEvent
from .context import Context, new_id
from .protocol import API_RATE, ProtocolError, decode_b64

SAMPLES_PER_MS = MIC_RATE // 1000  # 16 samples of the model's 16 kHz input per millisecond
MIN_COMMIT_MS = 100  # a commit needs at least this much audio (the protocol's rule)
MAX_BUFFER_S = MAX_UTTERANCE_S  # the model hears at most 30 s: the input buffer holds no more


def to_model_rate(pcm: bytes, resampler: Resampler | None = None) -> np.ndarray:
    """pcm16 24 kHz -> float32 16 kHz, via int16, so the model hears exactly what /chat would."""
    resampler = resampler or Resampler(API_RATE, MIC_RATE)
    return pcm_to_float(float_to_pcm(resampler(pcm_to_float(pcm))))


class InputAudio:
    """pcm16 24 kHz in, float32 16 kHz frames out; the resampler's state carries over between appends."""

    def __init__(self) -> None:
        self.resampler = Resampler(API_RATE, MIC_RATE)
        self.rest = np.zeros(0, np.float32)
        self.frames_done = 0  # whole frames handed out since the session started

    def push(self, pcm: bytes) -> list[np.ndarray]:
        self.rest = np.concatenate([self.rest, to_model_rate(pcm, self.resampler)])
        n = len(self.rest) // FRAME_SAMPLES
        frames = [self.rest[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES] for i in range(n)]
        self.rest = self.rest[n * FRAME_SAMPLES:]
        return frames

    def take_rest(self) -> np.ndarray:
        """The samples not yet making a whole frame (a manual commit takes them too)."""
        rest, self.rest = self.rest, np.zeros(0, np.float32)
        return rest


class Items(Protocol):
    def add_audio(self, item_id: str, audio: np.ndarray) -> list[dict]: ...


class Turns(Protocol):
    def speech_started(self) -> list[dict]: ...
    def speech_stopped(self, item_id: str, speech_end: float) -> list[dict]: ...
    def speech_dropped(self) -> None: ...
    def speech_paused(self, spoken: np.ndarray) -> None: ...
    def speech_resumed(self) -> None: ...


class InputBuffer:
    """Handlers of the `input_audio_buffer.*` client events."""

    def __init__(self, ctx: Context, items: Items, turns: Turns, vad: Callable[[np.ndarray], float] | None) -> None:
        self.ctx, self.items, self.turns, self.vad = ctx, items, turns, vad
        self.audio = InputAudio()
        self.manual: list[np.ndarray] = []  # buffered input without turn detection
        self.segmenter = self._new_segmenter()
        self.speech_item_id: str | None = None  # the user item the current speech will become

    def _new_segmenter(self) -> Segmenter | None:
        td = self.ctx.config.turn_detection
        return Segmenter(td.vad_config()) if td is not None else None

    def reset(self) -> None:
        """Drop what is buffered, and the speech heard so far (the turn it began ends without a question)."""
        self.manual.clear()
        self.audio.take_rest()
        self.segmenter = self._new_segmenter()
        self.speech_item_id = None
        self.turns.speech_dropped()
        if self.vad is not None and hasattr(self.vad, "reset"):
            self.vad.reset()

    def append(self, event: dict) -> list[dict]:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ProtocolError(f"input_audio_buffer.append needs 'audio': base64 of pcm16 {API_RATE // 1000} kHz "
                                "mono", "missing_required_parameter", "audio")
        pcm = decode_b64(audio, "audio")
        if len(pcm) % 2:
            raise ProtocolError("'audio' must hold whole 16-bit samples (an even number of bytes)", param="audio")
        if self.segmenter is None:
            buffered = sum(map(len, self.manual)) + len(self.audio.rest)
            if (buffered + len(pcm) // 2 * MIC_RATE / API_RATE) / MIC_RATE > MAX_BUFFER_S:
                raise ProtocolError(f"the input audio buffer would exceed {MAX_BUFFER_S:.0f} s (the most the model "
                                    "hears): commit or clear it first", "input_audio_buffer_full", "audio")
            self.manual.extend(self.audio.push(pcm))
            return []
        out = []
        for frame in self.audio.push(pcm):
            index = self.audio.frames_done
            self.audio.frames_done += 1
            segment = self.segmenter.push(frame, self.vad(frame), index * FRAME_SECONDS)
            if segment is not None:
                out += self._on_segment(segment, (index + 1) * FRAME_SAMPLES)
            elif self.segmenter.speaking:
                self._follow_silence()
        return out

    def _follow_silence(self) -> None:
        """The first silent frame after speech may end the turn: what it would commit is known now, so its
        answer may start (unannounced); speech before the silence lasts drops that answer."""
        if self.segmenter.pause_at is None:
            self.turns.speech_resumed()
        elif self.segmenter.silent_frames == 1:
            self.turns.speech_paused(self.segmenter.spoken())

    def _on_segment(self, segment: Segment, end_sample: int) -> list[dict]:
        if segment.event is SpeechEvent.ONSET:
            self.speech_item_id = new_id("item")
            start_ms = (end_sample - len(segment.audio)) // SAMPLES_PER_MS
            started = self.ctx.event("input_audio_buffer.speech_started", audio_start_ms=start_ms,
                                     item_id=self.speech_item_id)
            return [started, *self.turns.speech_started()]
        item_id, self.speech_item_id = self.speech_item_id or new_id("item"), None
        spoken = segment.audio[:segment.spoken_samples]
        end_ms = (end_sample - len(segment.audio) + len(spoken)) // SAMPLES_PER_MS  # the end of what is committed
        out = [self.ctx.event("input_audio_buffer.speech_stopped", audio_end_ms=end_ms, item_id=item_id)]
        out += self.items.add_audio(item_id, spoken)
        return out + self.turns.speech_stopped(item_id, self.ctx.clock())

    def commit(self, event: dict) -> list[dict]:
        if self.segmenter is not None and self.segmenter.speaking:  # commit the speech heard so far
            audio = np.concatenate(self.segmenter.utterance)
            item_id = self.speech_item_id or new_id("item")
            self.reset()
        else:
            audio = np.concatenate([*self.manual, self.audio.take_rest()]) if self.segmenter is None else \
                np.zeros(0, np.float32)
            item_id = new_id("item")
        if len(audio) < MIN_COMMIT_MS * SAMPLES_PER_MS:
            raise ProtocolError(f"the input audio buffer holds {len(audio) // SAMPLES_PER_MS} ms of audio; a commit "
                                f"needs at least {MIN_COMMIT_MS} ms", "input_audio_buffer_commit_empty")
        self.manual.clear()
        return self.items.add_audio(item_id, audio)

    def clear(self, event: dict) -> list[dict]:
        self.reset()
        return [self.ctx.event("input_audio_buffer.cleared")]
