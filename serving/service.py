"""One engine behind a bounded FIFO queue, with metrics and a record of recent answers.

The service owns concurrency; the engine owns tensors. A request is admitted (or refused when the
queue is full), waits for its turn inside its response body, then streams the engine's chunks.
"""
from __future__ import annotations

import logging
import threading
import time
import secrets
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from omni import OUTPUT_SAMPLE_RATE, PCM_SAMPLE_WIDTH, OmniChunk, OmniEngine
from .formats import Event, Summary

log = logging.getLogger("omni.server")

TURN_POLL_S = 0.05  # how often a waiting request checks whether its client went away
RECORDS_KEPT = 256  # answers whose text stays retrievable at GET /requests/<id> (with the request's token)
TOKEN_BYTES = 16  # 128 random bits: the secret that lets only the asking client read its record
HIDDEN_FIELDS = ("finished", "started", "token")
TTFC_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
BYTES_PER_SECOND = OUTPUT_SAMPLE_RATE * PCM_SAMPLE_WIDTH
CANCEL_STEP_BUCKETS = (0, 1, 2, 4, 8, 16)


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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("omni_requests", "Requests by outcome", ["outcome"], registry=self.registry)
        self.ttfc = Histogram("omni_time_to_first_chunk_seconds", "Request start to first audio/text chunk",
                              buckets=TTFC_BUCKETS, registry=self.registry)
        self.rtf = Histogram("omni_real_time_factor", "Generation time / seconds of audio produced",
                             buckets=RTF_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("omni_queue_depth", "Requests waiting for the engine", registry=self.registry)
        self.in_flight = Gauge("omni_in_flight", "Requests being answered", registry=self.registry)
        self.queue_wait = Histogram("omni_queue_wait_seconds", "Admission to the start of the answer",
                                    buckets=TTFC_BUCKETS, registry=self.registry)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends
        self.realtime = RealtimeMetrics(self.registry)
        self.realtime_sessions = Gauge("omni_realtime_sessions", "Open /v1/realtime sessions", registry=self.registry)
        self.realtime_refused = Counter("omni_realtime_refused", "Refused /v1/realtime handshakes by HTTP status",
                                        ["status"], registry=self.registry)


    def watch(self, engine: OmniEngine) -> None:
        """Also report the engine's batching: requests decoding together, steps and step time by batch size."""
        self.registry.register(BatchCollector(engine))


class BatchCollector:
    """Reads the engine scheduler's counters at each scrape (prometheus_client's custom collector)."""

    def __init__(self, engine: OmniEngine) -> None:
        self.scheduler = engine.scheduler

    def collect(self) -> Iterator[Metric]:
        stats = self.scheduler.stats
        yield GaugeMetricFamily("omni_batch_requests", "Requests in the engine's batch (setting up or decoding)",
                                value=stats.active)
        yield GaugeMetricFamily("omni_max_batch", "Requests the engine decodes together at most (--max-batch)",
                                value=self.scheduler.max_batch)
        steps = CounterMetricFamily("omni_decode_steps", "Decode steps by batch size (requests in the step)",
                                    labels=["batch"])
        seconds = CounterMetricFamily("omni_decode_step_seconds", "Time in decode steps by batch size",
                                      labels=["batch"])
        for batch, n in sorted(stats.steps.items()):
            steps.add_metric([str(batch)], n)
            seconds.add_metric([str(batch)], stats.step_seconds[batch])
        yield steps
        yield seconds


class RealtimeMetrics:
    """What the Realtime sessions report: answers by outcome, latency, barge-ins, how fast cancels land."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.responses = Counter("omni_realtime_responses", "Realtime responses by final status", ["status"],
                                 registry=registry)
        self.first_audio_s = Histogram("omni_realtime_first_audio_seconds",
                                       "End of speech (server VAD) to the answer's first audio delta",
                                       buckets=TTFC_BUCKETS, registry=registry)
        self.barge_ins = Counter("omni_realtime_barge_ins", "Answers interrupted by the user's speech",
                                 registry=registry)
        self.truncations = Counter("omni_realtime_truncations", "Answers the client cut short where its listener "
                                   "stopped hearing them (conversation.item.truncate)", registry=registry)
        self.cancel_steps_h = Histogram("omni_realtime_cancel_steps",
                                        "Decode steps the engine started after a cancel (0: stopped at its next check)",
                                        buckets=CANCEL_STEP_BUCKETS, registry=registry)

    def response_done(self, status: str) -> None:
        self.responses.labels(status).inc()

    def first_audio(self, seconds: float) -> None:
        self.first_audio_s.observe(seconds)

    def barge_in(self) -> None:
        self.barge_ins.inc()

    def truncated(self) -> None:
        self.truncations.inc()

    def cancel_steps(self, steps: int) -> None:
        self.cancel_steps_h.observe(steps)


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

    def __init__(self, load: Callable[[], OmniEngine], max_queue: int) -> None:
        self._load = load
        self.engine: OmniEngine | None = None
        self.load_error: str | None = None
        self.queue = TurnQueue(max_queue)
        self.metrics = Metrics()
        self.records: OrderedDict[str, Record] = OrderedDict()
        self._records_lock = threading.Lock()
        # Every engine call runs on this one thread, whichever server thread serves the request: torch then
        # keeps one OpenMP pool (its products ran ~1.5x slower on a second thread), and the engine batches
        # the requests whichever of them this thread is waiting for.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    def start(self) -> Future:
        """Load and warm the engine in the background, on the engine's own thread."""
        return self._worker.submit(self._load_and_warm)

    def _load_and_warm(self) -> None:
        try:
            engine = self._load()
            engine.warmup()
            self.queue.set_max_running(engine.scheduler.max_batch)
            self.metrics.watch(engine)
            self.engine = engine
            log.info("ready: %s on %s (%s)", engine.family, engine.device, engine.dtype)
        except Exception as e:  # any load failure is reported by /health instead of killing the server
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("engine failed to load: %s", self.load_error)

    @property
    def status(self) -> str:
        return "ready" if self.engine else ("failed" if self.load_error else "loading")

    def new_record(self) -> Record:
        record = Record(uuid.uuid4().hex[:12])
        with self._records_lock:
            self.records[record.id] = record
            while len(self.records) > RECORDS_KEPT:
                self.records.popitem(last=False)
        return record

    def admit(self) -> tuple[object, Record] | None:
        """A queue ticket and a fresh record, or None when the queue is full. Time counts from here."""
        ticket = self.queue.enter()
        if ticket is None:
            return None
        self.metrics.in_flight.inc()
        self.metrics.queue_depth.set(self.queue.depth)
        return ticket, self.new_record()

    def wait_turn(self, ticket: object, record: Record, disconnected: Callable[[], bool]) -> bool:
        """Block until the engine is this request's; False (and the request closed) if the client left."""
        if not self.queue.wait_turn(ticket, disconnected):
            self.finish(ticket, record)
            return False
        record.outcome = "running"
        self.metrics.queue_wait.observe(time.perf_counter() - record.started)
        self.metrics.queue_depth.set(self.queue.depth)
        return True

    def answer(self, ticket: object, record: Record, chunks: Iterator[OmniChunk],
               disconnected: Callable[[], bool]) -> Iterator[Event]:
        """The events of one answer (the engine's `chunks`, started once the turn has come), then a `Summary`."""
        try:
            yield from self._generate(record, chunks, disconnected, record.started)
        finally:
            self.finish(ticket, record)

    def finish(self, ticket: object, record: Record) -> None:
        """Release the turn and account for the request; safe to call more than once.

        The WSGI server calls it when it closes the response, which also covers a body that was
        never started because the client left first.
        """
        with self._records_lock:
            if record.finished:
                return
            record.finished = True
        self.queue.leave(ticket)
        if record.outcome in ("running", "queued"):  # the body was dropped mid-way
            record.outcome = "cancelled"
        self.metrics.in_flight.dec()
        self.metrics.queue_depth.set(self.queue.depth)
        self.metrics.requests.labels(record.outcome).inc()
        ttfc = f"{record.first_chunk_s:.3f}s" if record.first_chunk_s is not None else "-"
        log.info("request %s input=%.2fs ttfc=%s chunks=%d steps=%d audio=%.2fs outcome=%s",
                 record.id, record.input_seconds, ttfc, record.chunks, record.steps, record.audio_seconds,
                 record.outcome)

    def _generate(self, record: Record, chunks: Iterator[OmniChunk], disconnected: Callable[[], bool],
                  start: float) -> Iterator[Event]:
        gen_start = time.perf_counter()
        try:
            while (chunk := self._worker.submit(next, chunks, None).result()) is not None:
                self._count(record, chunk, start)
                yield chunk
        except Exception as e:  # the response has started: report in-band and in the record
            record.outcome, record.error = "error", f"{type(e).__name__}: {e}"
            log.exception("request %s failed", record.id)
            yield Summary("error", record.text, record.steps, record.audio_seconds, record.error)
            return
        finally:
            self._worker.submit(chunks.close).result()  # the engine drops the request, also when the client left
        if disconnected():
            record.outcome = "cancelled"
            return
        record.outcome = "completed"
        if record.audio_seconds:
            self.metrics.rtf.observe((time.perf_counter() - gen_start) / record.audio_seconds)
        yield Summary("completed", record.text, record.steps, record.audio_seconds)

    def _count(self, record: Record, chunk: OmniChunk, start: float) -> None:
        if record.first_chunk_s is None:
            record.first_chunk_s = round(time.perf_counter() - start, 4)
            self.metrics.ttfc.observe(record.first_chunk_s)
        record.chunks += 1
        record.steps += len(chunk.steps)
        record.audio_seconds = round(record.audio_seconds + len(chunk.pcm) / BYTES_PER_SECOND, 4)
        record.text += chunk.text

    def reject(self, outcome: str) -> None:
        self.metrics.requests.labels(outcome).inc()

    def record_json(self, request_id: str, token: str) -> dict | None:
        """The record of a recent request, only for the client holding its token."""
        with self._records_lock:
            record = self.records.get(request_id)
        if record is None or not secrets.compare_digest(record.token.encode(), token.encode()):
            return None
        return {k: v for k, v in asdict(record).items() if k not in HIDDEN_FIELDS}
