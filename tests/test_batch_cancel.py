"""Barge-in under load: a cancel is honoured at the next boundary between units of work, whatever else runs
(and the scheduler's frame-time estimate, which admission by capacity reads).

Latency is counted in the scheduler's units (setup units and decode steps, `BatchStats.units`), not in
wall-clock time: a cancel set in the middle of a unit must end its request before the next unit starts.
The requests are driven on the test's thread through a scheduler of their own, so every count is exact.
"""
import threading

import numpy as np
import pytest

from omni.audio import SAMPLE_RATE, load_audio
from omni.batch import Job, Scheduler
from omni.generate import PREFILL_CHUNK
from omni.results import Timings
from omni.sampling import GenerationConfig
from omni.tokens import Task

LONG_AUDIO_S = 25  # a long question: its setup is the encoder and ~40 prefill chunks
MAX_TOKENS = 1400  # room for the long prompt and a few hundred decode steps
MAX_TURNS = 5000  # bound on every driving loop


class Request:
    """A job built the way `OmniEngine.stream` builds one, recording what reaches its consumer."""

    def __init__(self, engine, scheduler: Scheduler, task: Task, samples=None, text=None, in_unit=lambda n: None):
        self.scheduler, self.cancel = scheduler, threading.Event()
        self.steps, self.ended, self.setup_units = [], None, 0
        self.units_at_cancel = self.units_at_end = None
        self.in_unit = in_unit  # runs in the middle of each setup unit, with its number
        text_ids = engine.tokenizer.encode(text).ids if text else None
        setup = engine._setup(task, samples, text_ids, None, GenerationConfig(max_tokens=MAX_TOKENS),
                              Timings(), 0.0)
        self.job = Job(self._counted(setup), self.steps.append, self._end, self.cancel.is_set,
                       interrupted=self.cancel.is_set)

    def _counted(self, setup):
        """`setup`, counting its units."""
        while True:
            self.setup_units += 1
            self.in_unit(self.setup_units)
            try:
                next(setup)
            except StopIteration as done:
                return done.value
            yield

    def cancel_now(self) -> None:
        self.units_at_cancel = self.scheduler.stats.units  # the unit in progress is already counted
        self.cancel.set()

    def _end(self, error, cancelled) -> None:
        self.ended = ("cancelled" if cancelled else "done") if error is None else error
        self.units_at_end = self.scheduler.stats.units


def drive(scheduler: Scheduler, ready) -> None:
    for _ in range(MAX_TURNS):
        if ready():
            return
        scheduler._turn()
    raise AssertionError("not ready within MAX_TURNS turns")


@pytest.fixture
def long_audio(sample_wav):
    samples = load_audio(sample_wav)
    return np.tile(samples, LONG_AUDIO_S * SAMPLE_RATE // samples.size + 1)[:LONG_AUDIO_S * SAMPLE_RATE]


@pytest.fixture
def scheduler(engine):
    return Scheduler(engine.model, max_batch=2)


@pytest.mark.parametrize("at_unit", [2, 5, 20, 40])  # the mel, the encoder, early and late prefill chunks
def test_a_decoding_request_cancelled_while_another_sets_up_stops_at_the_next_unit(engine, scheduler,
                                                                                 long_audio, at_unit):
    talking = Request(engine, scheduler, Task.T1A2, text="Tell me a long story.")
    scheduler.submit(talking.job)
    drive(scheduler, lambda: len(talking.steps) >= 3)
    newcomer = Request(engine, scheduler, Task.A1A2, samples=long_audio,
                       in_unit=lambda n: n == at_unit and talking.cancel_now())
    scheduler.submit(newcomer.job)
    drive(scheduler, lambda: talking.ended is not None)
    assert talking.ended == "cancelled"
    assert talking.units_at_end == talking.units_at_cancel  # no unit started between the cancel and the exit
    assert newcomer.setup_units == at_unit  # the newcomer's unit in progress finished; the exit came next
    steps_at_cancel = len(talking.steps)
    drive(scheduler, lambda: newcomer.job.sequence is not None and len(newcomer.steps) >= 2)
    assert len(talking.steps) == steps_at_cancel  # nothing reached the cancelled request afterwards


def test_a_long_setup_has_many_units(engine, scheduler, long_audio):
    """The encoder runs in half blocks and the prefill in chunks: the setup is many short units."""
    newcomer = Request(engine, scheduler, Task.A1A2, samples=long_audio)
    scheduler.submit(newcomer.job)
    drive(scheduler, lambda: newcomer.job.sequence is not None)
    blocks = len(engine.whisper.blocks)
    chunks = LONG_AUDIO_S * 50 // PREFILL_CHUNK  # 50 Whisper frames a second
    assert newcomer.setup_units >= 2 + 2 * blocks + chunks


@pytest.mark.parametrize("at_unit", [1, 3, 30])
def test_a_request_cancelled_during_its_own_setup_leaves_at_the_next_unit(engine, scheduler, long_audio, at_unit):
    talking = Request(engine, scheduler, Task.T1A2, text="Tell me a long story.")
    scheduler.submit(talking.job)
    drive(scheduler, lambda: len(talking.steps) >= 2)
    newcomer = Request(engine, scheduler, Task.A1A2, samples=long_audio)
    newcomer.in_unit = lambda n: n == at_unit and newcomer.cancel_now()
    scheduler.submit(newcomer.job)
    drive(scheduler, lambda: newcomer.ended is not None)
    assert newcomer.ended == "cancelled" and newcomer.setup_units == at_unit and not newcomer.steps
    assert newcomer.units_at_end == newcomer.units_at_cancel
    before = len(talking.steps)
    drive(scheduler, lambda: len(talking.steps) >= before + 3)  # the other one goes on
    assert talking.ended is None


def test_a_cancel_during_another_requests_audio_drops_its_step(engine, scheduler):
    """Set while the first request's step goes out (its audio is decoded there), the second's cancel ends
    it before its own step of that decode step reaches it."""
    first = Request(engine, scheduler, Task.T1A2, text="Tell me a long story.")
    second = Request(engine, scheduler, Task.T1A2, text="And another one.")
    scheduler.submit(first.job)
    scheduler.submit(second.job)
    drive(scheduler, lambda: len(first.steps) >= 4 and len(second.steps) >= 4)
    first.job.on_step = lambda step: (first.steps.append(step), second.cancel_now())
    steps_before = len(second.steps)
    drive(scheduler, lambda: second.ended is not None)
    assert second.ended == "cancelled" and len(second.steps) == steps_before
    assert second.units_at_end == second.units_at_cancel


def test_a_waiting_request_cancelled_leaves_without_running(engine, long_audio):
    scheduler = Scheduler(engine.model, max_batch=1)
    talking = Request(engine, scheduler, Task.T1A2, text="Tell me a long story.")
    waiting = Request(engine, scheduler, Task.A1A2, samples=long_audio)
    scheduler.submit(talking.job)
    scheduler.submit(waiting.job)
    drive(scheduler, lambda: len(talking.steps) >= 2)
    waiting.cancel_now()
    drive(scheduler, lambda: waiting.ended is not None)
    assert waiting.ended == "cancelled" and waiting.setup_units == 0


def test_the_frame_time_estimate_leaves_out_the_first_step_then_follows_the_load():
    from omni.batch import FRAME_EMA_WEIGHT, BatchStats

    stats = BatchStats()
    stats.frame(1, 10.0)  # first-call costs
    assert 1 not in stats.frame_seconds
    for seconds in (1.0, 3.0):
        stats.frame(1, seconds)
    assert stats.frame_seconds[1] == 2.0  # the mean at first
    for _ in range(round(1 / FRAME_EMA_WEIGHT) * 4):
        stats.frame(1, 5.0)
    assert 4.9 < stats.frame_seconds[1] < 5.0


def test_a_served_request_is_not_held_behind_another_requests_setup(tiny_ckpt, sample_wav, long_audio):
    """Through the server's service, where all engine work runs on one thread: a decoding answer cancelled
    while another request's long setup runs ends within a unit or two of the cancel, and its consumer gets
    that end at once (it is not handed over only after the other request's first piece)."""
    from omni_engine import OmniEngine
    from serving.service import EngineService

    service = EngineService(lambda: OmniEngine(tiny_ckpt, device="cpu", max_batch=2), max_queue=2,
                            realtime_admission=False)
    service.start().result()
    scheduler, never = service.engine.scheduler, (lambda: False)
    cancel_a, cancel_b = threading.Event(), threading.Event()
    a = service.admit()
    a_chunks = a.prepare(lambda: service.engine.stream(load_audio(sample_wav), sample_rate=SAMPLE_RATE,
                                                       cancel=cancel_a, max_tokens=MAX_TOKENS))
    assert a.wait(never)
    a_events = a.answer(a_chunks, cancel_a.is_set)
    next(a_events)  # a is decoding
    b = service.admit()
    b_chunks = b.prepare(lambda: service.engine.stream(long_audio, sample_rate=SAMPLE_RATE, cancel=cancel_b,
                                                       max_tokens=MAX_TOKENS))
    assert b.wait(never)
    b_thread = threading.Thread(target=lambda: list(b.answer(b_chunks, cancel_b.is_set)))
    b_thread.start()
    try:
        for _ in range(MAX_TURNS):  # until b's setup is under way (a few units in)
            if scheduler.stats.units >= 3 and any(job.sequence is None for job in scheduler._active):
                break
            next(a_events)
        else:
            raise AssertionError("b's setup never started")
        units_at_cancel = scheduler.stats.units
        cancel_a.set()
        list(a_events)  # a's remaining pieces and its end, as its consumer sees them
        assert scheduler.stats.units - units_at_cancel <= 2
        assert any(job.sequence is None for job in scheduler._active)  # b is still setting up
    finally:
        cancel_b.set()
        b_thread.join(timeout=120)
    assert not b_thread.is_alive()
