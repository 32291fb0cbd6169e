"""The voice loop: microphone frames in, spoken answers out, with barge-in. No device code here.

Each frame: echo guard -> Silero VAD -> segmenter -> turn machine -> actions; then the answer's chunks go
from the responder to the sink. The same `step()` runs on real devices and in the simulation.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from omni import DEFAULT_MAX_TOKENS, DEFAULT_STREAM_STRIDE

from .camera import CameraFeed, Snapshot, fit_frame
from .echo import EchoConfig, EchoGuard
from .ports import Clock, Engine, Sink, Source
from .responder import AnswerEvent, Responder
from .signal import FRAME_SAMPLES, FRAME_SECONDS, MIC_RATE, Resampler, pcm_to_float
from .turns import Action, Event, State, TurnMachine
from .vad import Segment, Segmenter, SileroVad, SpeechEvent, VadConfig

REFERENCE_SLACK_FRAMES = 8  # played audio kept beyond one frame before the oldest is dropped


@dataclass(frozen=True)
class LoopConfig:
    vad: VadConfig = field(default_factory=VadConfig)
    echo: EchoConfig = field(default_factory=EchoConfig)
    stream_stride: int = DEFAULT_STREAM_STRIDE
    max_tokens: int = DEFAULT_MAX_TOKENS
    # Wait for the engine whenever the sink would run dry: a simulation of an engine faster than real
    # time, so that runs on a virtual clock are deterministic. Off on real devices.
    lockstep: bool = False


@dataclass
class Turn:
    """What happened in one turn; times are on the loop's clock (s), wall times from time.perf_counter()."""

    index: int
    speech_start: float
    onset: float
    frame: Snapshot | None = None
    end_of_speech: float | None = None
    question: np.ndarray | None = None  # what was sent to the engine (float32, 16 kHz)
    asked_wall: float | None = None
    first_audio: float | None = None
    first_chunk_wall: float | None = None
    answered_wall: float | None = None
    audio_seconds: float = 0.0
    text: str = ""
    interrupted_at: float | None = None  # onset of the speech that stopped this answer
    stop_latency_ms: float | None = None  # from that onset until the output went silent
    error: Exception | None = None

    @property
    def first_audio_ms(self) -> float | None:
        """End of speech -> first audio out, on the loop's clock."""
        if self.first_audio is None or self.end_of_speech is None:
            return None
        return 1000.0 * (self.first_audio - self.end_of_speech)

    @property
    def engine_first_chunk_ms(self) -> float | None:
        if self.first_chunk_wall is None or self.asked_wall is None:
            return None
        return 1000.0 * (self.first_chunk_wall - self.asked_wall)

    @property
    def real_time_factor(self) -> float | None:
        """Generation wall time / seconds of audio generated."""
        if self.answered_wall is None or self.asked_wall is None or not self.audio_seconds:
            return None
        return (self.answered_wall - self.asked_wall) / self.audio_seconds


class VoiceLoop:
    """Listens, answers and yields the floor. `step()` takes one microphone frame that ended at `clock.now()`."""

    def __init__(self, engine: Engine, sink: Sink, clock: Clock, config: LoopConfig | None = None,
                 camera: CameraFeed | None = None, vad: Callable[[np.ndarray], float] | None = None,
                 out: TextIO = sys.stdout) -> None:
        self.config = config or LoopConfig()
        self.engine, self.sink, self.clock, self.camera, self.out = engine, sink, clock, camera, out
        self.vad = vad or SileroVad()
        self.guard = EchoGuard(self.config.echo)
        self.segmenter = Segmenter(self.config.vad)
        self.machine = TurnMachine()
        self.responder = Responder(engine, stream_stride=self.config.stream_stride,
                                   max_tokens=self.config.max_tokens)
        self.to_mic = Resampler(sink.sample_rate, MIC_RATE)
        self.reference = np.zeros(0, np.float32)
        self.turns: list[Turn] = []
        self.answering: Turn | None = None  # the turn whose answer is generated or played
        self.answer_done = False
        self.barge_ins = 0
        self._noticed: set[str] = set()
        self._mid_line = False  # a transcript is being printed on the current line

    @property
    def state(self) -> State:
        return self.machine.state

    def run(self, source: Source) -> list[Turn]:
        """Step through `source` until it ends."""
        while (frame := source.read()) is not None:
            self.step(frame)
        return self.turns

    def close(self) -> None:
        self.responder.close()

    def step(self, frame: np.ndarray) -> None:
        if frame.shape != (FRAME_SAMPLES,):
            raise ValueError(f"the loop reads frames of {FRAME_SAMPLES} samples at {MIC_RATE} Hz, got {frame.shape}")
        check = self.guard.process(frame, self._reference())
        prob = self.guard.gate(self.vad(check.residual), check)
        segment = self.segmenter.push(check.residual, prob, self.clock.now())
        if segment is not None:
            self._on_segment(segment)
        self._pump()

    def _reference(self) -> np.ndarray:
        """The played audio of this frame's span, at the microphone rate."""
        played = self.to_mic(self.sink.take_played())
        self.reference = np.concatenate([self.reference, played])[-REFERENCE_SLACK_FRAMES * FRAME_SAMPLES:]
        head = self.reference[:FRAME_SAMPLES]
        self.reference = self.reference[len(head):]
        return np.pad(head, (0, FRAME_SAMPLES - len(head)))

    def _on_segment(self, segment: Segment) -> None:
        if segment.event is SpeechEvent.ONSET:
            self.turns.append(Turn(len(self.turns) + 1, segment.speech_start, segment.time))
            self._say(f"[turn {len(self.turns)}] speech from {segment.speech_start:.2f} s, "
                      f"onset at {segment.time:.2f} s")
            self._act(self.machine.handle(Event.ONSET))
        else:
            turn = self.turns[-1]
            turn.end_of_speech, turn.question = segment.time, segment.audio
            self._act(self.machine.handle(Event.END_OF_SPEECH))

    def _act(self, actions: list[Action]) -> None:
        for action in actions:
            if action is Action.STOP_PLAYBACK:
                self._stop_playback()
            elif action is Action.CANCEL:
                self.responder.cancel()
            elif action is Action.TAKE_FRAME:
                self.turns[-1].frame = self.camera.latest() if self.camera is not None else None
            elif action is Action.ASK:
                self._ask(self.turns[-1])

    def _stop_playback(self) -> None:
        """Barge-in: silence the output now; chunks still coming for the old answer are dropped."""
        interrupted, onset = self.answering, self.turns[-1].onset
        interrupted.interrupted_at = onset
        interrupted.stop_latency_ms = 1000.0 * self.sink.flush()
        self.barge_ins += 1
        self._say(f"[turn {interrupted.index}] barge-in at {onset:.2f} s: "
                  f"playback stopped in {interrupted.stop_latency_ms:.0f} ms")

    def _ask(self, turn: Turn) -> None:
        self.answering, self.answer_done = turn, False
        start = turn.end_of_speech - len(turn.question) / MIC_RATE
        self._say(f"[turn {turn.index}] end of speech confirmed at {turn.end_of_speech:.2f} s: asking with the "
                  f"audio from {start:.2f} s to {turn.end_of_speech:.2f} s (pre-roll included)")
        turn.asked_wall = time.perf_counter()
        self.responder.ask(turn.index, turn.question, self._image(turn))

    def _image(self, turn: Turn) -> np.ndarray | None:
        if self.camera is None:  # --no-camera, or whoever opened the devices already said why there is none
            return None
        if not self.engine.can_see:
            self._notice("blind", "this checkpoint cannot see (Mini-Omni v1): questions go without an image")
        elif turn.frame is None:
            self._notice("frame", "no camera frame yet: this question goes without an image")
        else:
            return fit_frame(turn.frame.image)
        return None

    def _pump(self) -> None:
        """Move the answer's chunks to the sink; finish the turn when it has played out."""
        while True:
            wait = self.config.lockstep and self._needs_engine()
            for event in self.responder.poll(wait=wait):
                self._on_answer(event)
            if not wait:
                break
        if self.state is State.INTERRUPTED and self.answer_done:
            self._report(self.answering)
            self._act(self.machine.handle(Event.STOPPED))
        if self.state in (State.THINKING, State.SPEAKING) and self.answer_done and self.sink.buffered() == 0:
            self._report(self.answering)
            self._act(self.machine.handle(Event.FINISHED))

    def _needs_engine(self) -> bool:
        """Whether the loop is waiting on the engine: for the stop of a cancelled answer, or for audio to play."""
        if self.answering is None or self.answer_done:
            return False
        if self.state is State.INTERRUPTED:
            return True
        return self.state in (State.THINKING, State.SPEAKING) and self.sink.buffered() < FRAME_SECONDS

    def _on_answer(self, event: AnswerEvent) -> None:
        turn = self.answering
        assert turn is not None and event.turn == turn.index, (event.turn, turn)
        if event.chunk is None:
            self.answer_done, turn.answered_wall, turn.error = True, event.wall, event.error
            if event.error is not None:
                self._say(f"[turn {turn.index}] engine error: {event.error}")
        elif turn.interrupted_at is None:
            self._play(turn, event)

    def _play(self, turn: Turn, event: AnswerEvent) -> None:
        chunk = event.chunk
        if chunk.text:
            if not turn.text:
                self.out.write(f"[turn {turn.index}] answer: ")
            turn.text += chunk.text
            self.out.write(chunk.text)
            self.out.flush()
            self._mid_line = True
        if not chunk.pcm:
            return
        self.sink.write(chunk.pcm, turn.index)
        turn.audio_seconds += len(pcm_to_float(chunk.pcm)) / self.sink.sample_rate
        if turn.first_audio is None:
            turn.first_audio, turn.first_chunk_wall = self.clock.now(), event.wall
            self._act(self.machine.handle(Event.FIRST_AUDIO))

    def _report(self, turn: Turn) -> None:
        parts = [f"[turn {turn.index}]"]
        if turn.first_audio_ms is not None and self.config.lockstep:
            parts.append(f"end of speech -> first audio {turn.engine_first_chunk_ms:.0f} ms "
                         f"(the engine's wall time: the virtual clock waits for it),")
        elif turn.first_audio_ms is not None:
            parts.append(f"end of speech -> first audio {turn.first_audio_ms:.0f} ms "
                         f"(engine's first chunk after {turn.engine_first_chunk_ms:.0f} ms),")
        if turn.real_time_factor is not None:
            parts.append(f"real-time factor {turn.real_time_factor:.2f},")
        parts.append(f"{turn.audio_seconds:.2f} s of audio")
        self._say(" ".join(parts))

    def _notice(self, key: str, message: str) -> None:
        if key not in self._noticed:
            self._noticed.add(key)
            self._say(f"note: {message}")

    def _say(self, line: str) -> None:
        """Print a whole line, after ending a transcript line that is still streaming."""
        self.out.write(("\n" if self._mid_line else "") + line + "\n")
        self._mid_line = False
        self.out.flush()
