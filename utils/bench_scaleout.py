"""Benchmark `/chat` through Ray Serve's proxy (serving/ray_app.py) against `python server.py`, on loopback.

    python -m utils.bench_scaleout --ckpt-dir /work/fullckpt/full --setups direct,1,2 --json scaleout.json

Needs the `ray` extra for the replica setups. Each setup in `--setups` runs in turn: `direct` is `python
server.py` (its own process, `--threads` torch threads), a number is that many replicas of one Ray Serve
deployment (`num_cpus` = `--threads` each, so `OMP_NUM_THREADS` is the same) behind Ray's proxy. Every
server runs the same flags (`--mode`, the default `max_batch` and `max_queue`, and admission by those counts
only, as `--no-realtime-admission`: the real-time check would make the capacity follow the measured decode step,
which a loaded machine moves; `--realtime-admission` keeps it). For each setup:
- one at a time (`--sequential` answers): first chunk (request sent -> first audio bytes) and the gap between
  chunks (median over the answer's reads), p50 over the answers: the proxy's cost per request and per chunk;
- a burst of `--overload` x the setup's capacity at once (capacity: each server's `max_batch + max_queue`):
  answered, refused (503), other outcomes, answers per minute (answered over the burst's wall time) and the
  answered ones' first chunk p50 and max (their queueing).
Every answer is `--answer-tokens` decode steps long (a random checkpoint rarely stops early), each bounded by
`--timeout`.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import urllib3

from omni import DEFAULT_MAX_BATCH
from serving.stack import DEFAULT_MAX_QUEUE

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "samples" / "output1.wav"
READY_TIMEOUT_S = 600.0  # a full-size checkpoint loads (and fast mode quantizes) in a minute or two
POLL_S = 0.5


@dataclass
class Answer:
    status: int
    first_chunk_s: float | None = None
    gaps_s: tuple[float, ...] = ()
    error: str = ""


@dataclass
class Figures:
    setup: str
    capacity: int
    first_chunk_p50_s: float
    gap_p50_ms: float
    burst: int
    answered: int
    refused_503: int
    other: int
    answers_per_min: float
    burst_first_chunk_p50_s: float | None
    burst_first_chunk_max_s: float | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(port: int, body: bytes, timeout_s: float) -> Answer:
    """One streamed `/chat` answer, timed: its first audio chunk, then the gaps between chunks (each HTTP
    chunk whole, as the server wrote it)."""
    conn = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=1, retries=False, timeout=timeout_s)
    start = time.monotonic()
    try:
        resp = conn.urlopen("POST", "/chat", body=body, headers={"Content-Type": "application/json"},
                            preload_content=False)
        if resp.status != 200:
            resp.drain_conn()
            return Answer(resp.status)
        arrivals = [time.monotonic() for chunk in resp.read_chunked() if chunk]
        gaps = tuple(b - a for a, b in zip(arrivals, arrivals[1:]))
        return Answer(200, arrivals[0] - start if arrivals else None, gaps)
    except urllib3.exceptions.HTTPError as e:
        return Answer(0, error=f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def burst(port: int, body: bytes, count: int, timeout_s: float) -> tuple[list[Answer], float]:
    """`count` answers asked at once; their outcomes and the wall time until the last one ended."""
    answers: list[Answer] = []
    threads = [threading.Thread(target=lambda: answers.append(ask(port, body, timeout_s))) for _ in range(count)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    return answers, time.monotonic() - start


def measure(setup: str, port: int, servers: int, args: argparse.Namespace) -> Figures:
    body = json.dumps({"audio": base64.b64encode(SAMPLE.read_bytes()).decode(),
                       "max_new_tokens": args.answer_tokens}).encode()
    ask(port, body, args.timeout)  # warm-up: the first answer pays one-off costs
    one = [ask(port, body, args.timeout) for _ in range(args.sequential)]
    done = [a for a in one if a.status == 200 and a.first_chunk_s is not None]
    if not done:
        raise RuntimeError(f"{setup}: no answer one at a time: {[a.status or a.error for a in one]}")
    capacity = servers * (DEFAULT_MAX_BATCH["cpu"] + DEFAULT_MAX_QUEUE)
    answers, wall_s = burst(port, body, args.overload * capacity, args.timeout)
    answered = [a.first_chunk_s for a in answers if a.status == 200 and a.first_chunk_s is not None]
    refused = sum(a.status == 503 for a in answers)
    figures = Figures(setup, capacity, statistics.median(a.first_chunk_s for a in done),
                      1000 * statistics.median(g for a in done for g in a.gaps_s), len(answers), len(answered),
                      refused, len(answers) - len(answered) - refused, 60 * len(answered) / wall_s,
                      statistics.median(answered) if answered else None, max(answered) if answered else None)
    print(f"measured {asdict(figures)}", flush=True)  # each setup as it ends: a long run shows its progress
    return figures


def wait_ready(port: int, alive) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited during start-up")
        try:
            if urllib3.request("GET", f"http://127.0.0.1:{port}/health", retries=False, timeout=10).status == 200:
                return
        except urllib3.exceptions.HTTPError:
            pass
        time.sleep(POLL_S)
    raise TimeoutError(f"not ready after {READY_TIMEOUT_S} s")


def run_direct(args: argparse.Namespace) -> Figures:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, str(ROOT / "server.py"), "--ckpt-dir", args.ckpt_dir, "--port", str(port),
               "--device", "cpu", "--mode", args.mode]
    command += [] if args.realtime_admission else ["--no-realtime-admission"]
    args.log_dir.mkdir(parents=True, exist_ok=True)
    with open(args.log_dir / "direct.log", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(port, lambda: proc.poll() is None)
            return measure("direct", port, 1, args)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def run_replicas(counts: list[int], args: argparse.Namespace) -> list[Figures]:
    """Each count of replicas in turn on one local Ray (the deployment rescaled in place)."""
    import ray
    from ray import serve

    from serving.ray_app import build_app

    ray.init(num_cpus=args.threads * max(counts), include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        figures = []
        for count in counts:
            serve.run(build_app({"ckpt_dir": args.ckpt_dir, "device": "cpu", "mode": args.mode,
                                 "realtime_admission": args.realtime_admission, "num_replicas": count,
                                 "num_cpus": args.threads}), name="bench", route_prefix="/")
            figures.append(measure(f"{count} replica{'s' * (count > 1)}", port, count, args))
        return figures
    finally:
        serve.shutdown()
        ray.shutdown()


def table(figures: list[Figures]) -> str:
    def s(v):
        return "-" if v is None else f"{v:.2f}"
    rows = ["| setup | first chunk p50 | gap p50 | burst (capacity) | answered | 503 | other | answers/min "
            "| burst first chunk p50 / max |", "|---|---|---|---|---|---|---|---|---|"]
    for f in figures:
        rows.append(f"| {f.setup} | {f.first_chunk_p50_s:.2f} s | {f.gap_p50_ms:.0f} ms | {f.burst} ({f.capacity}) "
                    f"| {f.answered} | {f.refused_503} | {f.other} | {f.answers_per_min:.1f} "
                    f"| {s(f.burst_first_chunk_p50_s)} / {s(f.burst_first_chunk_max_s)} s |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--setups", default="direct,1,2", help="comma-separated: direct and/or replica counts")
    p.add_argument("--mode", default="fast")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per server")
    p.add_argument("--realtime-admission", action="store_true", help="admit as the server's default does")
    p.add_argument("--answer-tokens", type=int, default=60, help="every answer's max_new_tokens (decode steps)")
    p.add_argument("--sequential", type=int, default=4, help="answers asked one at a time")
    p.add_argument("--overload", type=int, default=2, help="the burst, in multiples of the capacity")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds any one answer may take")
    p.add_argument("--log-dir", type=Path, default=Path("."), help="where the direct server's log goes")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    setups = args.setups.split(",")
    started = time.monotonic()
    figures = [run_direct(args)] if "direct" in setups else []
    counts = [int(s) for s in setups if s != "direct"]
    if counts:
        figures += run_replicas(counts, args)
    print(table(figures))
    print(f"({time.monotonic() - started:.0f} s in all; answers of {args.answer_tokens} tokens, mode {args.mode}, "
          f"{args.threads} threads per server)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "figures": [asdict(f) for f in figures]}, indent=1))


if __name__ == "__main__":
    main()
