"""Soak a running server: N clients asking questions for M minutes (bounded), then a report.

    python -m utils.soak --url http://127.0.0.1:60808 --clients 4 --minutes 2 [--max-tokens 200] [--json out.json]

Reports requests, errors, time to first chunk (p50/p90/max), total time, seconds of answer audio
per wall second over all clients, each answer's real-time factor after its first chunk, the server's
decode step time by batch size and its resident memory over time (both from its /metrics).
Talks to loopback servers only.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from omni import OUTPUT_SAMPLE_RATE, PCM_SAMPLE_WIDTH

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "data" / "samples").glob("*.wav"))
RSS_PERIOD_S = 5.0
MAX_REQUESTS_PER_CLIENT = 10_000  # a hard bound besides the time limit
READ_BLOCK = 16384
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PCM_BYTES_PER_SECOND = OUTPUT_SAMPLE_RATE * PCM_SAMPLE_WIDTH  # the default /chat answer: int16 mono


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Soak:
    def __init__(self, host: str, port: int, max_tokens: int) -> None:
        self.host, self.port, self.max_tokens = host, port, max_tokens
        self.lock = threading.Lock()
        self.ttfc: list[float] = []
        self.totals: list[float] = []
        self.errors: list[str] = []
        self.rss: list[tuple[float, float]] = []
        self.audio_s: list[float] = []
        self.rtf: list[float] = []

    def ask(self, audio: bytes) -> None:
        start = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            body = json.dumps({"audio": base64.b64encode(audio).decode(), "max_tokens": self.max_tokens})
            conn.request("POST", "/chat", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
            first, size, first_size = None, 0, 0
            while block := resp.read(READ_BLOCK):
                if first is None:
                    first, first_size = time.perf_counter() - start, len(block)
                size += len(block)
            total = time.perf_counter() - start
            after_first_s = (size - first_size) / PCM_BYTES_PER_SECOND
            with self.lock:
                self.ttfc.append(first if first is not None else float("nan"))
                self.totals.append(total)
                self.audio_s.append(size / PCM_BYTES_PER_SECOND)
                if first is not None and after_first_s:
                    self.rtf.append((total - first) / after_first_s)
        except (OSError, RuntimeError, http.client.HTTPException) as e:
            with self.lock:
                self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            conn.close()

    def client(self, index: int, deadline: float) -> None:
        for n in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() >= deadline:
                return
            self.ask(SAMPLES[(index + n) % len(SAMPLES)].read_bytes())

    def metrics(self) -> dict[str, float]:
        """The server's /metrics samples, by name with labels."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request("GET", "/metrics")
            lines = conn.getresponse().read().decode().splitlines()
        finally:
            conn.close()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line and line[0] != "#"}

    def server_rss_mb(self) -> float:
        return self.metrics().get("process_resident_memory_bytes", float("nan")) / 2**20

    def step_ms_by_batch(self, before: dict[str, float]) -> dict[str, float]:
        """Mean decode step (ms) by batch size over the soak, from the server's counters."""
        after, out = self.metrics(), {}
        for key, steps in after.items():
            if key.startswith("omni_decode_steps_total{"):
                label = key[key.index("{"):]
                n = steps - before.get(key, 0.0)
                seconds = after[f"omni_decode_step_seconds_total{label}"] - before.get(f"omni_decode_step_seconds_total{label}", 0.0)
                if n:
                    out[label.split('"')[1]] = round(seconds / n * 1000, 1)
        return dict(sorted(out.items(), key=lambda kv: int(kv[0])))

    def watch_rss(self, stop: threading.Event, start: float) -> None:
        while True:
            self.rss.append((round(time.monotonic() - start, 1), round(self.server_rss_mb(), 1)))
            if stop.wait(RSS_PERIOD_S):
                return

    def run(self, clients: int, minutes: float) -> dict:
        before = self.metrics()
        start = time.monotonic()
        deadline = start + minutes * 60
        stop = threading.Event()
        watcher = threading.Thread(target=self.watch_rss, args=(stop, start))
        watcher.start()
        workers = [threading.Thread(target=self.client, args=(i, deadline)) for i in range(clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stop.set()
        watcher.join()
        wall = time.monotonic() - start
        return {
            "clients": clients, "minutes": minutes, "requests": len(self.totals) + len(self.errors),
            "errors": len(self.errors), "error_examples": self.errors[:5],
            "ttfc_p50_s": percentile(self.ttfc, 0.5), "ttfc_p90_s": percentile(self.ttfc, 0.9),
            "ttfc_max_s": max(self.ttfc, default=float("nan")),
            "total_p50_s": percentile(self.totals, 0.5), "total_mean_s": statistics.fmean(self.totals) if self.totals else float("nan"),
            "audio_per_wall_s": sum(self.audio_s) / wall, "rtf_p50": percentile(self.rtf, 0.5),
            "rtf_p90": percentile(self.rtf, 0.9), "step_ms_by_batch": self.step_ms_by_batch(before),
            "rss_mb_start": self.rss[0][1], "rss_mb_end": self.rss[-1][1], "rss_mb_max": max(r for _, r in self.rss),
            "rss_mb_over_time": self.rss,
        }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Soak a running mini-omni server on this machine.")
    p.add_argument("--url", default="http://127.0.0.1:60808")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--max-tokens", type=int, default=200, help="per request, to keep answers short")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    url = urlsplit(args.url)
    if url.hostname not in LOOPBACK:
        p.error("the soak talks to a server on this machine only (127.0.0.1 / localhost)")
    report = Soak(url.hostname, url.port or 80, args.max_tokens).run(args.clients, args.minutes)
    for key, value in report.items():
        if key != "rss_mb_over_time":
            print(f"{key:>14}: {value:.3f}" if isinstance(value, float) else f"{key:>14}: {value}")
    print(f"{'rss over time':>14}: " + ", ".join(f"{t:.0f}s={r:.0f}MB" for t, r in report["rss_mb_over_time"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
