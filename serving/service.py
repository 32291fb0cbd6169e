"""The server's one admission point: a bounded FIFO queue in front of the engine, the engine's one
thread, and a record of recent answers.

The service owns concurrency; the engine owns tensors. Every request, from `POST /chat` or from a
`/v1/realtime` session, is admitted here (or refused with `Refused`: the engine is not loaded, or the
queue is full) before it makes any engine call, waits for its turn, then streams the engine's chunks:

    turn = service.admit()                                 # Refused: not ready, or the queue is full
    chunks = turn.prepare(lambda: engine.stream(...))      # the engine's checks; ValueError: a bad request
    if turn.wait(cancel):                                  # False: the client left while waiting
        for event in turn.answer(chunks, cancel): ...      # OmniChunks, then a Summary; the turn ends

Up to the engine's `max_batch` requests run at once (its scheduler decodes them in one batch), at most
`max_queue` wait behind them. Where this machine keeps fewer than `max_batch` answers in real time
(`serving.capacity`), a conversation beyond that capacity (a `/chat` request, a new Realtime session) is
refused instead, so that the ones admitted never stutter. Only running requests call into the engine, so the scheduler's own
waiting line only ever holds a request for the moment between its submission and the next turn.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from prometheus_client import Gauge

from omni import OUTPUT_SAMPLE_RATE, PCM_SAMPLE_WIDTH, OmniChunk, OmniEngine
from .capacity import FixedFrameTimes, FrameTimes, LiveFrameTimes, describe, realtime_capacity
from .formats import Event, Summary
from .metrics import Metrics

log = logging.getLogger("omni.server")

TURN_POLL_S = 0.05  # how often a waiting request checks whether its client went away
RECORDS_KEPT = 256  # answers whose text stays retrievable at GET /requests/<id> (with the request's token)
TOKEN_BYTES = 16  # 128 random bits: the secret that lets only the asking client read its record
HIDDEN_FIELDS = ("finished", "started", "token")
BYTES_PER_SECOND = OUTPUT_SAMPLE_RATE * PCM_SAMPLE_WIDTH


class TurnQueue:
    """FIFO turns for one engine: up to `max_running` requests run at once (the engine decodes them
    in one batch), and at most `max_waiting` wait behind them."""

    def __init__(self, max_waiting: int, max_running: int = 1) -> None:
        self.max_waiting = max_waiting
        self.max_running = max_running
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._running: set[object] = set()

    def enter(self) -> object | None:
        """A ticket, or None when the queue is full."""
        with self._cond:
            if len(self._waiting) >= self.max_waiting + max(0, self.max_running - len(self._running)):
                return None
            ticket = object()
            self._waiting.append(ticket)
            return ticket

    def wait_turn(self, ticket: object, cancel: Callable[[], bool]) -> bool:
        """Block until `ticket` runs; False (and the ticket given up) if `cancel()` turns true first."""
        with self._cond:
            while not (len(self._running) < self.max_running and self._waiting[0] is ticket):
                if cancel():
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
                    return False
                self._cond.wait(TURN_POLL_S)
            self._running.add(self._waiting.popleft())
            self._cond.notify_all()
            return True

    def leave(self, ticket: object) -> None:
        with self._cond:
            if ticket in self._running:
                self._running.remove(ticket)
            elif ticket in self._waiting:
                self._waiting.remove(ticket)
            self._cond.notify_all()

    def set_max_running(self, n: int) -> None:
        with self._cond:
            self.max_running = n
            self._cond.notify_all()

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def busy(self) -> bool:
        return bool(self._running)


class Refused(Exception):
    """The service cannot take a request now (already counted in the metrics); `retry` says whether
    asking again later can help (not after a failed load)."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retry = retry


@dataclass
class Record:
    id: str  # names the request in logs and in its client's X-Request-Id header
    token: str = field(default_factory=lambda: secrets.token_urlsafe(TOKEN_BYTES), repr=False)
    outcome: str = "queued"
    input_seconds: float = 0.0
    first_chunk_s: float | None = None
    chunks: int = 0
    steps: int = 0
    audio_seconds: float = 0.0
    text: str = ""
    error: str | None = None
    finished: bool = False
    started: float = field(default_factory=time.perf_counter, repr=False)


class EngineService:
    """Loads the engine in the background; admits requests in arrival order, as many at once as the
    engine batches (`--max-batch`), with a bounded queue behind them."""

    def __init__(self, load: Callable[[], OmniEngine], max_queue: int, realtime_admission: bool = True,
                 speculative_turns: bool = True) -> None:
        """`realtime_admission` False: admit by the counts only (--max-batch, --max-queue, --max-sessions).
        `speculative_turns` False: a Realtime turn's answer starts only once its silence has lasted."""
        self._load = load
        self.realtime_admission = realtime_admission
        self.speculative_turns = speculative_turns
        self.frame_times: FrameTimes | None = FixedFrameTimes.from_env()  # else the engine's, once loaded
        self.open_sessions: Callable[[], int] = lambda: 0  # Realtime sessions open (its endpoint says)
        self._chats = 0  # /chat requests admitted and not finished
        self._counting = threading.Lock()  # a capacity check and the count it lets in are one step
        self.engine: OmniEngine | None = None
        self.load_error: str | None = None
        self.queue = TurnQueue(max_queue)
        self.metrics = Metrics()
        self.records: OrderedDict[str, Record] = OrderedDict()
        self._records_lock = threading.Lock()
        # The engine's work (its load, then the batch's turns) runs on this one thread, whichever server
        # thread serves a request: torch then keeps one OpenMP pool (its products ran ~1.5x slower on a
        # second thread). The request threads wait for their pieces (omni.batch: `drive_elsewhere`).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._turning = False  # the engine thread is running the batch's turns
        self._turning_lock = threading.Lock()

    def start(self) -> Future:
        """Load and warm the engine in the background, on the engine's own thread."""
        return self._worker.submit(self._load_and_warm)

    def _load_and_warm(self) -> None:
        try:
            engine = self._load()
            engine.warmup()
            self.queue.set_max_running(engine.scheduler.max_batch)
            self.frame_times = self.frame_times or LiveFrameTimes(engine.scheduler.stats)
            self.metrics.watch(engine)
            self._watch_capacity()
            engine.scheduler.drive_elsewhere(self._request_turns)
            self.engine = engine
            log.info("ready: %s on %s (%s), %s mode: %s", engine.family, engine.device, engine.dtype, engine.mode,
                     engine.mode_reason)
        except Exception as e:  # any load failure is reported by /health instead of killing the server
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("engine failed to load: %s", self.load_error)

    @property
    def status(self) -> str:
        return "ready" if self.engine else ("failed" if self.load_error else "loading")

    @property
    def capacity(self) -> int:
        """Requests admitted at most at once, running and waiting (the running ones: the engine's batch)."""
        return self.queue.max_running + self.queue.max_waiting

    def _watch_capacity(self) -> None:
        registry = self.metrics.registry
        Gauge("omni_realtime_capacity", "Answers this machine speaks at once in real time (-1: not measured yet)",
              registry=registry).set_function(lambda: -1 if self.realtime_capacity is None else self.realtime_capacity)
        Gauge("omni_conversations", "Open Realtime sessions and /chat requests in flight",
              registry=registry).set_function(lambda: self.conversations)

    @property
    def realtime_capacity(self) -> int | None:
        """Answers this machine speaks at once in real time (up to max_batch); None: not known yet."""
        if self.engine is None or self.frame_times is None:
            return None
        return realtime_capacity(self.frame_times, self.engine.scheduler.max_batch)

    @property
    def conversations(self) -> int:
        """Open Realtime sessions and /chat requests in flight."""
        return self.open_sessions() + self._chats

    def over_capacity(self) -> str | None:
        """Why one more conversation would push everyone past real time, or None (also when turned off)."""
        capacity = self.realtime_capacity
        if (not self.realtime_admission or capacity is None or capacity >= self.engine.scheduler.max_batch
                or self.conversations < capacity):
            return None
        return (f"at real-time capacity: {self.conversations} conversations already; "
                f"{describe(self.frame_times, capacity)}; retry when one ends")

    def check_ready(self) -> None:
        """Refuse (and count) a request while the engine is not loaded."""
        if self.engine is not None:
            return
        self.reject("not_ready")
        if self.load_error:
            raise Refused(f"the model failed to load ({self.load_error}); fix the checkpoint and "
                                       "restart the server", retry=False)
        raise Refused(f"the model is {self.status}")

    def admit(self, conversation: bool = True) -> Admission:
        """A place in the queue and a fresh record, or `Refused`. The request's time counts from here.
        `conversation` False: a turn of an admitted Realtime session (counted at its handshake)."""
        self.check_ready()
        with self._counting:
            over = self.over_capacity() if conversation else None
            ticket = None if over else self.queue.enter()
            if ticket is not None:
                self._chats += conversation
        if over:
            self.reject("over_capacity")
            raise Refused(over)
        if ticket is None:
            self.reject("busy")
            raise Refused(f"the server is busy ({self.queue.max_waiting} requests already waiting)")
        self.metrics.in_flight.inc()
        self.metrics.queue_depth.set(self.queue.depth)
        return Admission(self, ticket, self._new_record(), conversation)

    def _request_turns(self) -> None:
        """See the engine's thread running the batch's turns (start them there unless they run)."""
        with self._turning_lock:
            if self._turning:
                return
            self._turning = True
        self._worker.submit(self._run_turns)

    def _run_turns(self) -> None:
        """The batch's turns until it is empty; a request that joins meanwhile is seen before it stops."""
        scheduler = self.engine.scheduler
        try:
            while True:
                scheduler.run_turns()
                with self._turning_lock:
                    if not scheduler.has_work():
                        self._turning = False
                        return
        except BaseException:
            with self._turning_lock:
                self._turning = False
            raise

    def reject(self, outcome: str) -> None:
        self.metrics.requests.labels(outcome).inc()

    def record_json(self, request_id: str, token: str) -> dict | None:
        """The record of a recent request, only for the client holding its token."""
        with self._records_lock:
            record = self.records.get(request_id)
        if record is None or not secrets.compare_digest(record.token.encode(), token.encode()):
            return None
        return {k: v for k, v in asdict(record).items() if k not in HIDDEN_FIELDS}

    def _new_record(self) -> Record:
        record = Record(uuid.uuid4().hex[:12])
        with self._records_lock:
            self.records[record.id] = record
            while len(self.records) > RECORDS_KEPT:
                self.records.popitem(last=False)
        return record


class Admission:
    """One admitted request, from admission until `finish()`: its place in the queue and its record."""

    def __init__(self, service: EngineService, ticket: object, record: Record, conversation: bool = True) -> None:
        self.service, self.ticket, self.record, self.conversation = service, ticket, record, conversation
        self._ending = threading.Lock()  # the response's close and the answer's end may race to finish

    def prepare(self, stream: Callable[[], Iterator[OmniChunk]]) -> Iterator[OmniChunk]:
        """`stream()`: the engine's checks of this request, returning its chunks (not started yet).

        If it raises, the turn ends first: a `ValueError` (a bad request) as "bad_request", anything
        else as "error"; the exception goes on to the caller.
        """
        try:
            return stream()
        except Exception as e:
            self.finish("bad_request" if isinstance(e, ValueError) else "error")
            raise

    def wait(self, disconnected: Callable[[], bool]) -> bool:
        """Block until the engine is this request's; False (and the turn ended) if the client left."""
        service = self.service
        if not service.queue.wait_turn(self.ticket, disconnected):
            self.finish()
            return False
        self.record.outcome = "running"
        service.metrics.queue_wait.observe(time.perf_counter() - self.record.started)
        service.metrics.queue_depth.set(service.queue.depth)
        return True

    def answer(self, chunks: Iterator[OmniChunk], disconnected: Callable[[], bool]) -> Iterator[Event]:
        """The events of one answer (the engine's `chunks`, started once the turn has come), then a `Summary`."""
        try:
            yield from self._generate(chunks, disconnected)
        finally:
            self.finish()

    def finish(self, outcome: str | None = None) -> None:
        """Release the place in the queue and account for the request; safe to call more than once.

        The WSGI server calls it when it closes the response, which also covers a body that was
        never started because the client left first.
        """
        service, record = self.service, self.record
        with self._ending:
            if record.finished:
                return
            record.finished = True
        service.queue.leave(self.ticket)
        with service._counting:
            service._chats -= self.conversation
        if outcome is not None:
            record.outcome = outcome
        elif record.outcome in ("running", "queued"):  # the body was dropped mid-way
            record.outcome = "cancelled"
        service.metrics.in_flight.dec()
        service.metrics.queue_depth.set(service.queue.depth)
        service.metrics.requests.labels(record.outcome).inc()
        ttfc = f"{record.first_chunk_s:.3f}s" if record.first_chunk_s is not None else "-"
        log.info("request %s input=%.2fs ttfc=%s chunks=%d steps=%d audio=%.2fs outcome=%s",
                 record.id, record.input_seconds, ttfc, record.chunks, record.steps, record.audio_seconds,
                 record.outcome)

    def _generate(self, chunks: Iterator[OmniChunk], disconnected: Callable[[], bool]) -> Iterator[Event]:
        record, service = self.record, self.service
        gen_start = time.perf_counter()
        try:
            while (chunk := next(chunks, None)) is not None:  # the engine's thread makes it
                self._count(chunk)
                yield chunk
        except Exception as e:  # the response has started: report in-band and in the record
            record.outcome, record.error = "error", f"{type(e).__name__}: {e}"
            log.exception("request %s failed", record.id)
            yield Summary("error", record.text, record.steps, record.audio_seconds, record.error)
            return
        finally:
            chunks.close()  # the engine drops the request, also when the client left
        if disconnected():
            record.outcome = "cancelled"
            return
        record.outcome = "completed"
        if record.audio_seconds:
            service.metrics.rtf.observe((time.perf_counter() - gen_start) / record.audio_seconds)
        yield Summary("completed", record.text, record.steps, record.audio_seconds)

    def _count(self, chunk: OmniChunk) -> None:
        record = self.record
        if record.first_chunk_s is None:
            record.first_chunk_s = round(time.perf_counter() - record.started, 4)
            self.service.metrics.ttfc.observe(record.first_chunk_s)
        record.chunks += 1
        record.steps += len(chunk.steps)
        record.audio_seconds = round(record.audio_seconds + len(chunk.pcm) / BYTES_PER_SECOND, 4)
        record.text += chunk.text
