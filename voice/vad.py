"""Voice activity: Silero VAD per frame, and a segmenter that turns frame probabilities into turns."""
from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass
from enum import Enum
from math import ceil

import numpy as np

from .signal import FRAME_SAMPLES, FRAME_SECONDS, MIC_RATE

SPEECH_THRESHOLD = 0.5  # Silero probability at or above which a frame is speech
SILENCE_MARGIN = 0.15  # a speaking run ends below threshold - margin (Silero's own hysteresis)
START_MS = 200  # speech must last this long before it starts a turn
END_MS = 400  # this much silence ends a turn
PREROLL_MS = 300  # audio kept from before the onset, so the first syllable is not lost
MAX_UTTERANCE_S = 30.0  # the engine reads at most 30 s: a longer turn is ended there


@dataclass(frozen=True)
class VadConfig:
    threshold: float = SPEECH_THRESHOLD
    start_ms: int = START_MS
    end_ms: int = END_MS
    preroll_ms: int = PREROLL_MS
    max_utterance_s: float = MAX_UTTERANCE_S

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"VAD threshold must be in (0, 1), got {self.threshold}")
        for name in ("start_ms", "end_ms", "preroll_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_utterance_s <= (self.start_ms + self.end_ms) / 1000:
            raise ValueError(f"max_utterance_s={self.max_utterance_s} leaves no room for start_ms + end_ms")

    @property
    def start_frames(self) -> int:
        """Frames of speech that make at least start_ms."""
        return max(1, ceil(self.start_ms / 1000 / FRAME_SECONDS))

    @property
    def end_frames(self) -> int:
        return max(1, ceil(self.end_ms / 1000 / FRAME_SECONDS))

    @property
    def preroll_frames(self) -> int:
        return round(self.preroll_ms / 1000 / FRAME_SECONDS)


class SileroVad:
    """Silero VAD (the ONNX model file shipped in the `silero-vad` package): speech probability per 32 ms frame.

    The ONNX model runs in onnxruntime on one thread of its own. The TorchScript variant shares torch's
    thread pool with the engine, and on two busy cores one 32 ms frame then took 30-50 ms.
    """

    def __init__(self) -> None:
        import torch
        threads = torch.get_num_threads()
        try:
            from silero_vad import load_silero_vad
            with warnings.catch_warnings():  # silero-vad 6.2.3's loader finds its file with a deprecated call
                warnings.simplefilter("ignore", DeprecationWarning)
                model = load_silero_vad(onnx=True)  # the package's ONNX model, on onnxruntime's CPU provider
        except ImportError as e:
            raise RuntimeError("Silero VAD needs: pip install silero-vad==6.2.3 onnxruntime==1.31.1") from e
        finally:
            torch.set_num_threads(threads)  # importing silero_vad sets 1 thread for the whole process
        self._torch = torch
        self.model = model

    def __call__(self, frame: np.ndarray) -> float:
        if frame.shape != (FRAME_SAMPLES,):
            raise ValueError(f"Silero reads frames of {FRAME_SAMPLES} samples at {MIC_RATE} Hz, got {frame.shape}")
        return float(self.model(self._torch.from_numpy(np.ascontiguousarray(frame, np.float32)), MIC_RATE))

    def reset(self) -> None:
        self.model.reset_states()


class SpeechEvent(Enum):
    ONSET = "onset"  # speech has lasted start_ms: a turn starts
    END = "end"  # end_ms of silence after speech (or the length cap): the utterance is complete


@dataclass(frozen=True)
class Segment:
    """What the segmenter reports; `audio` is the utterance so far, pre-roll included."""

    event: SpeechEvent
    time: float  # clock time of the frame that decided it (s)
    speech_start: float  # clock time the speech run began (s)
    audio: np.ndarray  # float32 16 kHz
    # END: samples of `audio` up to the first frame of the silence that ended it (all of it when the length cap
    # did). The rest is silence heard only to be sure the turn is over; None: all of `audio` is the utterance.
    spoken_samples: int | None = None


class Segmenter:
    """Frames + speech probabilities -> ONSET / END events with named thresholds and a pre-roll.

    A run of speech frames shorter than start_ms (a cough, a click) is dropped; its frames stay in the
    pre-roll, so a run that does pass keeps its first syllable.
    """

    def __init__(self, config: VadConfig) -> None:
        self.config = config
        self.preroll: deque[np.ndarray] = deque(maxlen=config.preroll_frames)
        self.run: list[np.ndarray] = []  # frames of the speech run not yet confirmed
        self.utterance: list[np.ndarray] | None = None  # frames of the confirmed turn
        self.run_start = 0.0
        self.silent_frames = 0
        self.pause_at: int | None = None  # utterance frames up to the first quiet frame of the silence now running
        self.dropped_runs = 0  # speech runs shorter than start_ms (coughs, clicks), for reports

    @property
    def speaking(self) -> bool:
        return self.utterance is not None

    def push(self, frame: np.ndarray, prob: float, now: float) -> Segment | None:
        """Feed one frame that started at clock time `now`."""
        is_speech = prob >= self.config.threshold
        if self.utterance is None:
            return self._listen(frame, is_speech, now)
        return self._follow(frame, prob, now)

    def _listen(self, frame: np.ndarray, is_speech: bool, now: float) -> Segment | None:
        if not is_speech:
            self._drop_run()
            self.preroll.append(frame)
            return None
        if not self.run:
            self.run_start = now
        self.run.append(frame)
        if len(self.run) < self.config.start_frames:
            return None
        self.utterance = [*self.preroll, *self.run]
        self.preroll.clear()
        self.run, self.silent_frames = [], 0
        return Segment(SpeechEvent.ONSET, now, self.run_start, np.concatenate(self.utterance))

    def _follow(self, frame: np.ndarray, prob: float, now: float) -> Segment | None:
        self.utterance.append(frame)
        quiet = prob < self.config.threshold - SILENCE_MARGIN
        self.silent_frames = self.silent_frames + 1 if quiet else 0
        if self.silent_frames == 1:
            self.pause_at = len(self.utterance)
        elif not quiet:
            self.pause_at = None
        too_long = len(self.utterance) * FRAME_SECONDS >= self.config.max_utterance_s
        if self.silent_frames < self.config.end_frames and not too_long:
            return None
        audio = np.concatenate(self.utterance)
        spoken = (self.pause_at or len(self.utterance)) * FRAME_SAMPLES
        self.utterance, self.silent_frames, self.pause_at = None, 0, None
        return Segment(SpeechEvent.END, now, self.run_start, audio, spoken)

    def spoken(self) -> np.ndarray | None:
        """While a silence runs after speech: the utterance up to its first frame, which is what END reports as
        spoken if this silence lasts (known now, before the turn is over); None while speech goes on."""
        return np.concatenate(self.utterance[:self.pause_at]) if self.speaking and self.pause_at else None

    def _drop_run(self) -> None:
        self.dropped_runs += bool(self.run)
        self.preroll.extend(self.run)
        self.run = []
