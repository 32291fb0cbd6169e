"""What the server reports at GET /metrics: requests, latency, the queue, the engine's batching and
the Realtime sessions, in one Prometheus registry."""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from omni import OmniEngine

TTFC_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
CANCEL_STEP_BUCKETS = (0, 1, 2, 4, 8, 16)


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
        """Also report the engine's mode, and its batching: requests decoding together, steps and step time by
        batch size."""
        Gauge("omni_mode", "The engine's mode (with --mode auto, the one it chose) as a label; always 1", ["mode"],
              registry=self.registry).labels(engine.mode).set(1)
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
        self.speculative_turns = Counter("omni_speculative_turns", "Answers started at the first silence after "
                                         "speech, by outcome: used (the turn ended there) or dropped (speech resumed)",
                                         ["outcome"], registry=registry)
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

    def speculative_turn(self, outcome: str) -> None:
        self.speculative_turns.labels(outcome).inc()

    def cancel_steps(self, steps: int) -> None:
        self.cancel_steps_h.observe(steps)
