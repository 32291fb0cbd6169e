"""Benchmark `/v1/realtime` as users meet it: N sessions through the openai SDK, questions spoken in real time.

    python server.py --ckpt-dir /tmp/tiny &
    python -m utils.bench_realtime --port 60808 --sessions 1,2,3 --turns 10

Each count in `--sessions` runs in turn (the sessions of one count at once); a table compares them. The
server's settings that change these figures (its mode, whether its turns are speculative: `--no-speculative-turns`)
are read from its /health and printed with them.

Each session speaks a recorded question at real-time pace (100 ms chunks), then silence, and plays the
answer on a simulated speaker that starts at the first audio delta. Every other turn the next question is
spoken over the answer (barge-in). Reported, p50/p90 over all turns:
- end of speech -> first audio delta: from the last chunk of speech sent to the first audio delta received
  (this includes the server VAD's silence_duration_ms, which has to pass before the turn can end; a
  speculative server has started the answer at the first silence, so less of the rest follows it);
- barge-in -> cancelled: from `speech_started` of the interrupting question to `response.done` cancelled;
- underruns: answers whose audio did not stay ahead of playback (the speaker ran dry before the answer ended).
"""
from __future__ import annotations

import argparse
import base64
import json
import queue
import statistics
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omni import PCM_SAMPLE_WIDTH
from serving.realtime.wire import API_RATE
from utils.audio_io import read_wav
from voice.signal import Resampler, float_to_pcm

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "data" / "samples"

CHUNK_S = 0.1  # seconds of audio per append
TRAILING_SILENCE_S = 1.0  # silence after each question: the server VAD ends the turn within it
BARGE_IN_AFTER_S = 1.0  # seconds of the answer heard before speaking over it
EVENT_TIMEOUT_S = 300.0


def load_question(path: Path) -> bytes:
    samples, rate = read_wav(path)
    return float_to_pcm(Resampler(rate, API_RATE)(samples))


@dataclass
class TurnTiming:
    session: int
    index: int
    barge_in: bool
    first_audio_ms: float | None = None  # end of speech sent -> first audio delta received
    cancel_ms: float | None = None  # speech_started of the next question -> response.done cancelled
    underruns: int = 0  # times the simulated speaker ran dry before the answer ended
    stall_ms: float = 0.0
    stalls_at_s: list[float] = field(default_factory=list)  # where in the answer's audio each stall began
    audio_s: float = 0.0
    status: str = ""


@dataclass
class Listener:
    """Receives a connection's events on a thread, stamped with their arrival time."""

    conn: object
    events: "queue.Queue[tuple[float, object]]" = field(default_factory=queue.Queue)

    def start(self) -> "Listener":
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            while True:
                event = self.conn.recv()
                self.events.put((time.perf_counter(), event))
        except Exception:  # noqa: BLE001 - the connection closed: the session is over
            self.events.put((time.perf_counter(), None))

    def until(self, *types: str) -> list[tuple[float, object]]:
        out = []
        while True:
            stamp, event = self.events.get(timeout=EVENT_TIMEOUT_S)
            if event is None:
                raise RuntimeError("the connection closed")
            out.append((stamp, event))
            if event.type in types:
                return out


class Speaker:
    """A simulated speaker: plays deltas back to back from the first one; counts when it runs dry."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.queued_s = 0.0
        self.underruns = 0
        self.stall_s = 0.0
        self.stalls_at: list[float] = []  # seconds of the answer's audio played when each stall began

    def push(self, stamp: float, seconds: float) -> None:
        if self.start is None:
            self.start = stamp
        played_until = self.start + self.queued_s + self.stall_s
        if stamp > played_until:  # the audio so far had finished playing before this delta came
            self.underruns += 1
            self.stalls_at.append(round(self.queued_s, 2))
            self.stall_s += stamp - played_until
        self.queued_s += seconds

    def ends_at(self) -> float:
        return (self.start or time.perf_counter()) + self.queued_s + self.stall_s


def speak(conn, pcm: bytes, real_time: bool = True) -> float:
    """Append `pcm` in 100 ms chunks at real-time pace; returns when the last chunk went out."""
    step = int(API_RATE * CHUNK_S) * PCM_SAMPLE_WIDTH
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, len(pcm), step)):
        if real_time:
            time.sleep(max(0.0, t0 + i * CHUNK_S - time.perf_counter()))
        conn.input_audio_buffer.append(audio=base64.b64encode(pcm[start:start + step]).decode())
    return time.perf_counter()


def play_out(listener: Listener, first: tuple[float, object], turn: TurnTiming) -> None:
    """Play the answer on a simulated speaker until `response.done`; wait until it has played."""
    speaker = Speaker()
    speaker.push(first[0], len(base64.b64decode(first[1].delta)) / (PCM_SAMPLE_WIDTH * API_RATE))
    done = listener.until("response.done")
    for stamp, event in done:
        if event.type == "response.audio.delta":
            speaker.push(stamp, len(base64.b64decode(event.delta)) / (PCM_SAMPLE_WIDTH * API_RATE))
    turn.status = done[-1][1].response.status
    turn.underruns, turn.stall_ms, turn.audio_s = speaker.underruns, round(1000 * speaker.stall_s, 1), \
        round(speaker.queued_s, 2)
    turn.stalls_at_s = speaker.stalls_at
    time.sleep(max(0.0, speaker.ends_at() - time.perf_counter()))  # the user listens to the end


def run_session(index: int, args: argparse.Namespace, questions: list[bytes], out: list[TurnTiming],
                refused: list[dict]) -> None:
    """One session's turns into `out`; a session the server refuses at the handshake (over its real-time
    capacity, or --max-sessions) into `refused`, with the server's reason."""
    from websockets.exceptions import InvalidStatus

    try:
        _session(index, args, questions, out)
    except InvalidStatus as e:
        refused.append({"session": index, "status": e.response.status_code,
                        "reason": json.loads(e.response.body or b"{}").get("error", "")})


def _session(index: int, args: argparse.Namespace, questions: list[bytes], out: list[TurnTiming]) -> None:
    from openai import OpenAI

    base = f"127.0.0.1:{args.port}/v1"
    client = OpenAI(api_key=args.api_key or "unused", base_url=f"http://{base}", websocket_base_url=f"ws://{base}")
    silence = bytes(PCM_SAMPLE_WIDTH * int(TRAILING_SILENCE_S * API_RATE))
    with client.beta.realtime.connect(model="mini-omni") as conn:
        listener = Listener(conn).start()
        listener.until("session.created")
        conn.session.update(session={"max_response_output_tokens": args.max_output_tokens,
                                     "turn_detection": {"type": "server_vad", "silence_duration_ms": args.silence_ms}})
        listener.until("session.updated")
        spoken_end: list[float] = []  # when the interrupting question's speech ended (set by its sender)
        for t in range(args.turns):
            turn = TurnTiming(index, t + 1, barge_in=t % 2 == 0 and t + 1 < args.turns)
            if spoken_end:  # this question was spoken over the previous answer
                speech_end = spoken_end.pop()
            else:
                speech_end = speak(conn, questions[(index + t) % len(questions)])
                speak(conn, silence)
            first = listener.until("response.audio.delta")[-1]
            turn.first_audio_ms = round(1000 * (first[0] - speech_end), 1)
            if turn.barge_in:  # hear a second of the answer, then talk over it
                time.sleep(BARGE_IN_AFTER_S)
                question = questions[(index + t + 1) % len(questions)]
                sender = threading.Thread(target=lambda q=question: (spoken_end.append(speak(conn, q)),
                                                                     speak(conn, silence)))
                sender.start()
                started = listener.until("input_audio_buffer.speech_started")[-1]
                done = listener.until("response.done")[-1]
                turn.cancel_ms = round(1000 * (done[0] - started[0]), 1)
                turn.status = done[1].response.status
                sender.join()
            else:
                play_out(listener, first, turn)
            out.append(turn)


def server_settings(args: argparse.Namespace) -> dict:
    """What the server's /health says of the settings these figures depend on."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    request = urllib.request.Request(f"http://127.0.0.1:{args.port}/health", headers=headers)
    with urllib.request.urlopen(request, timeout=EVENT_TIMEOUT_S) as response:
        health = json.loads(response.read())
    return {name: health.get(name) for name in ("mode", "speculative_turns")}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 1)


def summarize(turns: list[TurnTiming]) -> dict:
    first = [t.first_audio_ms for t in turns if t.first_audio_ms is not None]
    cancel = [t.cancel_ms for t in turns if t.cancel_ms is not None]
    played = [t for t in turns if not t.barge_in]
    return {
        "turns": len(turns),
        "first_audio_ms": {"p50": percentile(first, 50), "p90": percentile(first, 90), "n": len(first)},
        "barge_in_to_cancelled_ms": {"p50": percentile(cancel, 50), "p90": percentile(cancel, 90), "n": len(cancel)},
        "answers_played": len(played),
        "answers_with_underrun": sum(t.underruns > 0 for t in played),
        "underruns": sum(t.underruns for t in played),
        "stall_ms_total": round(sum(t.stall_ms for t in played), 1),
    }


def run_count(sessions: int, args: argparse.Namespace, questions: list[bytes]) -> tuple[dict, list[TurnTiming]]:
    """`sessions` sessions at once: their summary (with the sessions refused at the handshake) and turns."""
    turns: list[TurnTiming] = []
    refused: list[dict] = []
    threads = [threading.Thread(target=run_session, args=(i, args, questions, turns, refused))
               for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = {"sessions": sessions, "silence_ms": args.silence_ms, **server_settings(args), **summarize(turns),
               "sessions_refused": sorted(refused, key=lambda r: r["session"])}
    for r in summary["sessions_refused"]:
        print(f"session {r['session']} refused at the handshake: {r['status']} {r['reason']}")
    for t in sorted(turns, key=lambda t: (t.session, t.index)):
        print(f"session {t.session} turn {t.index:2d}: first audio {t.first_audio_ms:7.0f} ms"
              + (f", barge-in -> cancelled {t.cancel_ms:5.0f} ms" if t.cancel_ms is not None else
                 f", {t.audio_s:5.2f} s played, underruns {t.underruns} ({t.stall_ms:.0f} ms"
                 + (f", at {', '.join(f'{s:.2f}' for s in t.stalls_at_s)} s of its audio" if t.stalls_at_s else "")
                 + ")") + f"  [{t.status}]")
    return summary, turns


def print_table(summaries: list[dict]) -> None:
    print(f"\nmode {summaries[0]['mode']}, speculative turns {summaries[0]['speculative_turns']}, "
          f"VAD silence {summaries[0]['silence_ms']} ms")
    print("sessions  refused  first audio p50/p90 (ms)  barge-in p90 (ms)  answers with underrun  stalls (ms)")
    for s in summaries:
        first, cancel = s["first_audio_ms"], s["barge_in_to_cancelled_ms"]
        print(f"{s['sessions']:8d}  {len(s['sessions_refused']):7d}  {first['p50']!s:>11}/{first['p90']!s:<12} "
              f"{cancel['p90']!s:>17}  {s['answers_with_underrun']:>10} of {s['answers_played']:<8}"
              f"{s['stall_ms_total']:>12}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=60808)
    p.add_argument("--api-key", default=None)
    p.add_argument("--sessions", type=lambda v: [int(n) for n in v.split(",")], default=[1],
                   help="sessions at once; a list (1,2,3) runs each count in turn")
    p.add_argument("--turns", type=int, default=10, help="questions per session (every other one interrupts)")
    p.add_argument("--max-output-tokens", type=int, default=150, help="decode steps per answer (150 = ~12 s)")
    p.add_argument("--silence-ms", type=int, default=500, help="server VAD silence_duration_ms")
    p.add_argument("--samples", nargs="+", type=Path,
                   default=sorted(SAMPLES_DIR.glob("output*.wav")))
    p.add_argument("--json", type=Path, help="also write the turns and the summaries here")
    args = p.parse_args(argv)
    questions = [load_question(path) for path in args.samples]
    runs = [run_count(n, args, questions) for n in args.sessions]
    summaries = [summary for summary, _ in runs]
    print(json.dumps(summaries, indent=2))
    print_table(summaries)
    if args.json:
        args.json.write_text(json.dumps([{"summary": summary, "turns": [asdict(t) for t in turns]}
                                         for summary, turns in runs], indent=2))


if __name__ == "__main__":
    main()
