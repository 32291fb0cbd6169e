"""A recording as the microphone: the loop's outside world in software, on a virtual clock.

A virtual clock, a scripted microphone that hears the speaker's echo and a sink that plays on the clock: the
voice command's `--input-file` (answer_file) and the tests' simulations (utils/voice_sim.py) drive the real
loop with them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from omni import OUTPUT_SAMPLE_RATE, SAMPLES_PER_FRAME, load_audio, write_wav

from .camera import CameraFeed
from .loop import LoopConfig, VoiceLoop
from .signal import FRAME_SAMPLES, FRAME_SECONDS, MIC_RATE, Resampler, db_to_gain, float_to_pcm, pcm_to_float
from .turns import State

DEVICE_BUFFER_S = 0.02  # audio already handed to the simulated output device: a flush cannot recall it
ECHO_DELAY_S = 0.05  # speaker -> microphone delay of the simulated echo path
REFLECTION_DELAY_S = 0.0025  # one early reflection behind the direct echo
REFLECTION_DB = -10.0  # its level relative to the direct echo
STEP_S = SAMPLES_PER_FRAME / OUTPUT_SAMPLE_RATE  # audio per decode step (85.3 ms)
DRAIN_S = 120.0  # virtual seconds the simulation keeps running after the script for the last answer


class VirtualClock:
    def __init__(self) -> None:
        self.time = 0.0

    def now(self) -> float:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += seconds


@dataclass
class Played:
    time: float  # virtual time the first sample went out (s)
    turn: int
    samples: np.ndarray  # float32 at the sink's rate


class FakeSink:
    """Plays queued PCM in real time on the virtual clock; remembers what went out and when."""

    def __init__(self, clock: VirtualClock, sample_rate: int, device_buffer_s: float = DEVICE_BUFFER_S) -> None:
        self.clock, self.sample_rate = clock, sample_rate
        self.device_buffer = round(device_buffer_s * sample_rate)
        self.queue: list[tuple[int, np.ndarray]] = []
        self.log: list[Played] = []
        self.flushes: list[float] = []
        self._unread: list[np.ndarray] = []

    def write(self, pcm: bytes, turn: int) -> None:
        self.queue.append((turn, pcm_to_float(pcm)))

    def buffered(self) -> float:
        return sum(len(s) for _, s in self.queue) / self.sample_rate

    def flush(self) -> float:
        """Keep only what the device already holds; return how long that still plays."""
        self.flushes.append(self.clock.now())
        kept, room = [], self.device_buffer
        for turn, samples in self.queue:
            if room <= 0:
                break
            kept.append((turn, samples[:room]))
            room -= len(samples[:room])
        self.queue = kept
        return self.buffered()

    def take_played(self) -> np.ndarray:
        out = np.concatenate(self._unread) if self._unread else np.zeros(0, np.float32)
        self._unread = []
        return out

    def advance(self, seconds: float) -> np.ndarray:
        """Play `seconds` of audio from the virtual clock's current time; returns it (silence padded)."""
        need = round(seconds * self.sample_rate)
        out, start = np.zeros(need, np.float32), self.clock.now()
        filled = 0
        while self.queue and filled < need:
            turn, samples = self.queue[0]
            take = samples[:need - filled]
            out[filled:filled + len(take)] = take
            self.log.append(Played(start + filled / self.sample_rate, turn, take))
            filled += len(take)
            if len(take) == len(samples):
                self.queue.pop(0)
            else:
                self.queue[0] = (turn, samples[len(take):])
        self._unread.append(out[:filled])
        return out

    def audio_of(self, turn: int) -> np.ndarray:
        pieces = [p.samples for p in self.log if p.turn == turn]
        return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)

    def last_played(self, turn: int) -> float | None:
        """Virtual time just after the last sample of `turn` went out."""
        ends = [p.time + len(p.samples) / self.sample_rate for p in self.log if p.turn == turn]
        return max(ends) if ends else None


@dataclass(frozen=True)
class EchoPath:
    """How the speaker reaches the microphone: a delay, a level and one reflection (levels: dB of the played signal)."""

    level_db: float
    delay_s: float = ECHO_DELAY_S
    reflection_db: float = REFLECTION_DB
    reflection_delay_s: float = REFLECTION_DELAY_S


@dataclass
class ScriptedMic:
    """A microphone in a simulated room: scripted utterances plus the sink's echo, one frame per `read()`.

    Each read plays one frame's worth of the sink, advances the clock and returns what the microphone heard.
    """

    clock: VirtualClock
    sink: FakeSink
    script: list[tuple[float, np.ndarray]]  # (start time s, float32 16 kHz samples)
    echo: EchoPath | None = None
    noise_db: float | None = None  # a constant noise floor (dBFS RMS), None for digital silence
    seed: int = 0
    _resample: Resampler = field(init=False)
    _echo_line: np.ndarray = field(init=False)
    _rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self._resample = Resampler(self.sink.sample_rate, MIC_RATE)
        tail = 0 if self.echo is None else round((self.echo.delay_s + self.echo.reflection_delay_s) * MIC_RATE)
        self._echo_line = np.zeros(tail + FRAME_SAMPLES, np.float32)
        self._rng = np.random.default_rng(self.seed)

    @property
    def end(self) -> float:
        """When the last scripted utterance is over (s)."""
        return max((t + len(s) / MIC_RATE for t, s in self.script), default=0.0)

    def read(self) -> np.ndarray | None:
        played = self._resample(self.sink.advance(FRAME_SECONDS))
        frame = self._speech(self.clock.now()) + self._echoed(played)
        if self.noise_db is not None:
            frame += db_to_gain(self.noise_db) * self._rng.standard_normal(FRAME_SAMPLES).astype(np.float32)
        self.clock.advance(FRAME_SECONDS)
        return frame.astype(np.float32)

    def _speech(self, start: float) -> np.ndarray:
        frame = np.zeros(FRAME_SAMPLES, np.float32)
        first = round(start * MIC_RATE)
        for t, samples in self.script:
            offset = round(t * MIC_RATE) - first
            lo, hi = max(0, offset), min(FRAME_SAMPLES, offset + len(samples))
            if lo < hi:
                frame[lo:hi] += samples[lo - offset:hi - offset]
        return frame

    def _echoed(self, played: np.ndarray) -> np.ndarray:
        if self.echo is None:
            return np.zeros(FRAME_SAMPLES, np.float32)
        self._echo_line = np.concatenate([self._echo_line[FRAME_SAMPLES:], played])
        def tap(delay_s: float) -> np.ndarray:
            start = len(self._echo_line) - FRAME_SAMPLES - round(delay_s * MIC_RATE)
            return self._echo_line[start:start + FRAME_SAMPLES]
        direct = tap(self.echo.delay_s)
        reflected = tap(self.echo.delay_s + self.echo.reflection_delay_s) * db_to_gain(self.echo.reflection_db)
        return db_to_gain(self.echo.level_db) * (direct + reflected)


def simulate(loop: VoiceLoop, mic: ScriptedMic, camera: CameraFeed | None = None, drain_s: float = DRAIN_S) -> bool:
    """Run the loop over the script, then on until the last answer has played.

    Returns False if the loop was still busy `drain_s` after the script ended (it is then left there).
    """
    deadline = mic.end + drain_s
    clock = mic.clock
    while clock.now() < mic.end or loop.state is not State.LISTENING or loop.segmenter.speaking:
        if clock.now() >= deadline:
            return False
        if camera is not None:
            camera.tick(clock.now())
        loop.step(mic.read())
    return True


def answer_file(engine: Any, path: str | Path, config: LoopConfig, out_dir: str | Path,
                camera: CameraFeed | None = None, out: TextIO = sys.stdout) -> list[Path]:
    """Feed a recording through the loop as if spoken into the microphone; write each answer as it was played.

    Returns the WAV files written, `out_dir/turnN.wav` (24 kHz), one per answered turn.
    """
    samples = load_audio(path)
    clock = VirtualClock()
    sink = FakeSink(clock, engine.sample_rate)
    loop = VoiceLoop(engine, sink, clock, replace(config, lockstep=True), camera=camera, out=out)
    longest_answer_s = config.max_tokens * STEP_S  # nothing can interrupt the last answer: wait for all of it
    try:
        settled = simulate(loop, ScriptedMic(clock, sink, [(0.0, samples)]), camera, longest_answer_s + DRAIN_S)
    finally:
        loop.close()
    if not settled:
        raise RuntimeError(f"the loop was still {loop.state.value} {longest_answer_s + DRAIN_S:.0f} s after "
                           f"{path} ended")
    if not loop.turns:
        out.write(f"no speech found in {path} (VAD threshold {config.vad.threshold})\n")
    written = []
    for turn in loop.turns:
        audio = sink.audio_of(turn.index)
        if audio.size:
            written.append(write_wav(Path(out_dir) / f"turn{turn.index}.wav", float_to_pcm(audio), sink.sample_rate))
    return written
