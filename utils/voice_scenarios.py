"""Conversations simulated through the voice loop, shared by `tests/test_interrupt.py` and `utils/interrupt_demo.py`.

The questions are espeak-ng recordings from data/samples; the microphone also hears the answer that the
fake sink actually played, through a simulated echo path.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.audio_io import read_wav
from utils.voice_sim import FakeCamera, RecordingEngine, SpokenAnswerEngine
from voice.replay import ECHO_DELAY_S, EchoPath, FakeSink, ScriptedMic, VirtualClock, simulate
from voice.camera import CameraFeed
from voice.echo import EchoConfig
from voice.loop import LoopConfig, Turn, VoiceLoop
from voice.signal import MIC_RATE, energy

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
QUESTION_1, QUESTION_2 = "output1.wav", "output2.wav"
SPOKEN_ANSWER = ("output3.wav", "output4.wav", "output5.wav") * 2  # 9.4 s of what a trained model sounds like
COUGH = "cough.wav"  # a 110 ms breathy burst (espeak-ng "huh", cut and faded)
FIRST_QUESTION_S = 0.5  # when the first question starts (s)
BARGE_IN_S = 3.5  # when the second question starts: while the first answer plays (s)
QUIET_NOISES_S = (0.2, 0.6)  # a click, then a cough, while nothing plays (s)
NOISY_QUESTION_S = 1.5  # the question of the noise scenario starts after them (s)
NOISES_S = (4.0, 5.0)  # a cough, then a click, while its answer plays (s)
CLICK_S = 0.004  # length of the click
CLICK_LEVEL = 0.5  # its amplitude
MAX_TOKENS = 150  # prompt plus answer positions: about 5 s of answer to a 1.6 s question
ECHO_LEVELS_DB = (-6.0, -20.0)  # the answer heard back, relative to the played signal
ECHO_DELAYS_S = (0.03, 0.05, 0.08)  # speaker -> microphone delays tried with the spoken answer
MIC_NOISE_DB = -60.0  # the microphone's noise floor (dBFS RMS)
CAMERA_INTERVAL_S = 0.25  # shorter than a question, so the frame at onset differs from the one at its end
STOP_LIMIT_MS = 100.0  # barge-in must silence the answer this soon after the confirmed onset
VOICED_LEVEL = 0.05  # the first sample above this amplitude is where a question's voice begins
SYLLABLE_S = 0.1  # the part of a question checked for being intact
GUARD_OFF_DRAIN_S = 8.0  # without the guard the loop answers its own echo for ever: stop looking after this


def sample(name: str) -> np.ndarray:
    samples, rate = read_wav(SAMPLES / name)
    assert rate == MIC_RATE, f"{name}: {rate} Hz, the samples are {MIC_RATE} Hz"
    return samples


def click() -> np.ndarray:
    """A short rectangular click (not speech: any sound shorter than the start threshold must be ignored)."""
    return np.full(round(CLICK_S * MIC_RATE), CLICK_LEVEL, np.float32)


@dataclass
class Run:
    loop: VoiceLoop
    sink: FakeSink
    engine: RecordingEngine
    log: str
    settled: bool  # the loop was back to listening when the simulation ended

    @property
    def turns(self) -> list[Turn]:
        return self.loop.turns


def converse(engine: Any, script: list[tuple[float, np.ndarray]], *, echo_db: float | None = None,
             echo_delay_s: float = ECHO_DELAY_S,
             guard: bool = True, camera_interval_s: float | None = None, sees: bool = False,
             drain_s: float | None = None) -> Run:
    """Run `script` ((start s, 16 kHz samples) pairs) through the loop in lockstep on a virtual clock."""
    clock = VirtualClock()
    recorder = RecordingEngine(engine, pretend_sees=sees)
    sink = FakeSink(clock, recorder.sample_rate)
    mic = ScriptedMic(clock, sink, script, None if echo_db is None else EchoPath(echo_db, echo_delay_s), MIC_NOISE_DB)
    camera = None if camera_interval_s is None else CameraFeed(FakeCamera(), camera_interval_s)
    config = LoopConfig(echo=EchoConfig(enabled=guard), max_tokens=MAX_TOKENS, lockstep=True)
    out = io.StringIO()
    loop = VoiceLoop(recorder, sink, clock, config, camera=camera, out=out)
    try:
        settled = simulate(loop, mic, camera, **({} if drain_s is None else {"drain_s": drain_s}))
    finally:
        loop.close()
    return Run(loop, sink, recorder, out.getvalue(), settled)


def barge_in(engine: Any, echo_db: float | None = ECHO_LEVELS_DB[0]) -> Run:
    """A question, then a second one while the answer plays (its echo in the microphone)."""
    return converse(engine, [(FIRST_QUESTION_S, sample(QUESTION_1)), (BARGE_IN_S, sample(QUESTION_2))],
                    echo_db=echo_db)


def echo_only(engine: Any, echo_db: float, guard: bool = True, drain_s: float | None = None,
              delay_s: float = ECHO_DELAY_S) -> Run:
    """One question; the microphone hears nothing but the answer's echo while it plays."""
    return converse(engine, [(FIRST_QUESTION_S, sample(QUESTION_1))], echo_db=echo_db, echo_delay_s=delay_s,
                    guard=guard, drain_s=drain_s)


def noises(engine: Any) -> Run:
    """A click and a cough while nothing plays, a question, then a cough and a click while its answer plays."""
    cough, tick = sample(COUGH), click()
    script = [(QUIET_NOISES_S[0], tick), (QUIET_NOISES_S[1], cough), (NOISY_QUESTION_S, sample(QUESTION_1)),
              (NOISES_S[0], cough), (NOISES_S[1], tick)]
    return converse(engine, script, echo_db=ECHO_LEVELS_DB[1])


def camera_turns(engine: Any, sees: bool = True) -> Run:
    """The barge-in conversation with a fake camera refreshing every CAMERA_INTERVAL_S."""
    return converse(engine, [(FIRST_QUESTION_S, sample(QUESTION_1)), (BARGE_IN_S, sample(QUESTION_2))],
                    camera_interval_s=CAMERA_INTERVAL_S, sees=sees)


def stop_latency_ms(run: Run, interrupted: int = 1) -> float:
    """From the confirmed onset of the interrupting turn until the last sample of answer `interrupted` went out."""
    onset = run.turns[interrupted].onset
    return 1000.0 * (run.sink.last_played(interrupted) - onset)


def played_after(run: Run, turn: int, time: float) -> int:
    """Samples of answer `turn` that went out after `time`."""
    return sum(len(p.samples) for p in run.sink.log if p.turn == turn and p.time >= time)


def syllable_snr_db(run: Run, turn: int, question: np.ndarray, start_s: float) -> tuple[float, float]:
    """How intact the start of a question reached the engine.

    Returns (pre-roll ms before its first voiced sample, SNR in dB of the first SYLLABLE_S of voice as sent
    to the engine against the recording).
    """
    record = run.turns[turn - 1]
    sent_start = record.end_of_speech - len(record.question) / MIC_RATE
    voiced = start_s + int(np.argmax(np.abs(question) > VOICED_LEVEL)) / MIC_RATE
    at = round((voiced - sent_start) * MIC_RATE)
    n = round(SYLLABLE_S * MIC_RATE)
    sent = record.question[at:at + n]
    truth = question[round((voiced - start_s) * MIC_RATE):][:n]
    snr = 10.0 * np.log10(energy(truth) / max(energy(sent - truth), 1e-12))
    return 1000.0 * (voiced - sent_start), float(snr)


def spoken_answer_engine() -> SpokenAnswerEngine:
    return SpokenAnswerEngine(np.concatenate([sample(name) for name in SPOKEN_ANSWER]), MIC_RATE)


def report(engine: Any, guard_off_drain_s: float = GUARD_OFF_DRAIN_S) -> str:
    """Run every scenario and describe what was measured, one line per figure."""
    spoken = spoken_answer_engine()
    lines = ["barge-in (second question over the first answer, its echo at -6 dB):"]
    for name, answering in (("tiny engine", engine), ("spoken answer", spoken)):
        run = barge_in(answering)
        lines.append(f"  {name}: {_barge_in_line(run)}")
    lines.append("false barge-ins from the answer's own echo (plus a -10 dB reflection 2.5 ms later):")
    for name, answering, delays in (("tiny engine", engine, (ECHO_DELAY_S,)), ("spoken answer", spoken, ECHO_DELAYS_S)):
        for level in ECHO_LEVELS_DB:
            for delay in delays:
                run = echo_only(answering, level, delay_s=delay)
                lines.append(f"  {name}, {level:+.0f} dB, {delay * 1000:.0f} ms: {run.loop.barge_ins} in "
                             f"{run.turns[0].audio_seconds:.1f} s of answer")
        off = echo_only(answering, ECHO_LEVELS_DB[0], guard=False, drain_s=guard_off_drain_s)
        lines.append(f"  {name}, {ECHO_LEVELS_DB[0]:+.0f} dB, guard off: {off.loop.barge_ins} "
                     f"(within {guard_off_drain_s:.0f} s after the question)")
    run = noises(engine)
    lines.append(f"cough ({len(sample(COUGH)) / MIC_RATE * 1000:.0f} ms) and click ({CLICK_S * 1000:.0f} ms), "
                 f"each once while silent and once over the answer: {run.loop.barge_ins} barge-ins, "
                 f"{len(run.turns) - 1} extra turns, {run.loop.segmenter.dropped_runs} short speech runs dropped")
    lines.append("per answered turn (tiny engine on this CPU; in lockstep the virtual clock waits for the engine, "
                 "so end of speech -> first audio is the engine's wall time to its first chunk):")
    for turn in run.turns + barge_in(engine).turns:
        lines.append(f"  end of speech -> first audio {turn.engine_first_chunk_ms:.0f} ms, "
                     f"real-time factor {turn.real_time_factor:.2f} ({turn.audio_seconds:.1f} s of audio)")
    cam = camera_turns(engine)
    frames = ", ".join(f"turn {t.index}: frame #{t.frame.index} grabbed at {t.frame.time:.2f} s for onset "
                       f"{t.onset:.2f} s" for t in cam.turns)
    lines.append(f"camera (every {CAMERA_INTERVAL_S} s): {frames}; images sent: {len(cam.engine.calls)}")
    return "\n".join(lines)


def _barge_in_line(run: Run) -> str:
    first, second = run.turns[:2]
    preroll_ms, snr_db = syllable_snr_db(run, 2, sample(QUESTION_2), BARGE_IN_S)
    late = played_after(run, 1, second.onset + STOP_LIMIT_MS / 1000)
    return (f"onset confirmed at {second.onset:.2f} s, playback silent {stop_latency_ms(run):.0f} ms later "
            f"(sink reported {first.stop_latency_ms:.0f} ms), {late} samples of the first answer after "
            f"{STOP_LIMIT_MS:.0f} ms; second question sent from {preroll_ms:.0f} ms before its voice, "
            f"first {SYLLABLE_S * 1000:.0f} ms at {snr_db:.0f} dB SNR")
