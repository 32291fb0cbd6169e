"""Hostile clients of `/v1/realtime` on the real server process (tiny checkpoint, loopback): malformed events
get an `error` and the session goes on, frames sent are strict JSON, a pending turn whose question was deleted
is not answered, and no API key reaches the server's log."""
from __future__ import annotations

import base64
import copy
import json
import os
import random
import socket
import threading
import time

import numpy as np
import pytest

from tests.http_client import Server
from tests.test_realtime_api import LONG, b64, metric, question_pcm, silence

websockets_sync = pytest.importorskip("websockets.sync.client")
websockets_exceptions = pytest.importorskip("websockets.exceptions")

KEY = "guard-key-5f1c9e0a7b"
WRONG_KEY = "wrong-key-0d3a6b8e2c"
AUTH = {"Authorization": f"Bearer {KEY}"}
FUZZ_EVENTS = 150  # mutated events sent by the fuzz loop
FUZZ_SECONDS = 90  # its time bound: it stops early rather than run long on a loaded machine
RECV_TIMEOUT_S = 60  # a frame that does not come is a hang, not a slow answer
GA_ONLY = (  # valid GA client events, the fuzz loop's seeds
    {"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"],
                                           "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                                               "turn_detection": {"type": "server_vad"}},
                                                     "output": {"format": {"type": "audio/pcm", "rate": 24000}}},
                                           "max_output_tokens": 2}},
    {"type": "conversation.item.create",
     "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}},
    {"type": "response.create", "response": {"output_modalities": ["text"], "max_output_tokens": 2}},
    {"type": "response.cancel"},
    {"type": "input_audio_buffer.append", "audio": b64(silence(0.1))},
    {"type": "input_audio_buffer.commit"},
    {"type": "input_audio_buffer.clear"},
    {"type": "conversation.item.retrieve", "item_id": "item_1"},
    {"type": "conversation.item.delete", "item_id": "item_1"},
    {"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0, "audio_end_ms": 10},
)
HOSTILE_VALUES = (None, 0, -1, 1.5, 1e308, True, "", "x" * 1000, [], {}, [[]], [{}], {"a": {"b": []}}, ["audio", 7],
                  "inf", "audio")


def _refuse_constant(name: str) -> float:
    raise AssertionError(f"the server sent {name}, which is not JSON")


def strict(frame: str) -> dict:
    """A server frame parsed as a browser would: NaN and Infinity are errors."""
    return json.loads(frame, parse_constant=_refuse_constant)


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    srv = Server(tiny_ckpt, tmp_path_factory.mktemp("rt-guard-tmp"), "--api-key", KEY)
    yield srv
    srv.stop()


def open_ws(server: Server, dialect: str = "ga", query: str = ""):
    headers = {"Authorization": f"Bearer {KEY}"} if "api_key" not in query else {}
    if dialect == "beta":
        headers["OpenAI-Beta"] = "realtime=v1"
    url = f"ws://127.0.0.1:{server.port}/v1/realtime?model=mini-omni{query}"
    return websockets_sync.connect(url, additional_headers=headers, max_size=None)


def until(ws, predicate) -> list[dict]:
    """Frames up to and including the first that `predicate` accepts."""
    events = []
    while True:
        events.append(strict(ws.recv(timeout=RECV_TIMEOUT_S)))
        if predicate(events[-1]):
            return events


def is_error(event: dict, event_id: str | None = None) -> bool:
    return event["type"] == "error" and (event_id is None or event["error"]["event_id"] == event_id)


DEEP = 1000  # nesting levels of the report
MALFORMED = {  # dialect -> (frame, the field its error names, or None where the frame is not JSON)
    "ga": [
        (json.dumps({"type": "session.update", "session": {"output_modalities": [["audio"]]}}),
         "session.output_modalities"),
        (json.dumps({"type": "session.update", "session": {"output_modalities": [{"a": 1}]}}),
         "session.output_modalities"),
        (json.dumps({"type": "response.create", "response": {"output_modalities": [["audio"]]}}),
         "response.output_modalities"),
        (json.dumps({"type": "session.update", "session": {"audio": "pcm16"}}), "session.audio"),
        (json.dumps({"type": "session.update", "session": {"audio": {"input": 7}}}), "session.audio.input"),
        ('{"type": "session.update", "session": ' + "[" * DEEP + "]" * DEEP + "}", None),
        ('{"type": "session.update", "session": ' + "[" * 100 * DEEP + "]" * 100 * DEEP + "}", None),
        ('{"type": "response.cancel", "event_id": NaN}', None),
    ],
    "beta": [
        (json.dumps({"type": "session.update", "session": {"modalities": [["audio"]]}}), "session.modalities"),
        (json.dumps({"type": "response.create", "response": {"modalities": [{}]}}), "response.modalities"),
    ],
}


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_malformed_events_get_an_error_and_the_session_goes_on(server, dialect):
    with open_ws(server, dialect) as ws:
        assert strict(ws.recv())["type"] == "session.created"
        for frame, param in MALFORMED[dialect]:
            ws.send(frame)
            event = strict(ws.recv(timeout=RECV_TIMEOUT_S))
            assert is_error(event) and event["error"]["event_id"] is None, (frame[:80], event)
            if param is not None:
                assert event["error"]["param"] == param and param in event["error"]["message"], event
            ws.send(json.dumps({"type": "session.update", "session": {}, "event_id": "evt_ok"}))
            assert strict(ws.recv(timeout=RECV_TIMEOUT_S))["type"] == "session.updated"


@pytest.mark.parametrize("event_id", [7, 1.5, {"a": 1}, ["e"], "e" * 10_000])
def test_event_id_is_echoed_only_as_a_short_string(server, event_id):
    with open_ws(server) as ws:
        strict(ws.recv())
        ws.send(json.dumps({"type": "response.cancel", "event_id": event_id}))
        event = strict(ws.recv(timeout=RECV_TIMEOUT_S))
        assert is_error(event) and event["error"]["event_id"] is None
        ws.send(json.dumps({"type": "response.cancel", "event_id": "evt_1"}))
        assert strict(ws.recv(timeout=RECV_TIMEOUT_S))["error"]["event_id"] == "evt_1"


def _mutate(event: dict, rng: random.Random) -> dict:
    """`event` with one value somewhere in it replaced by a hostile one, or one key removed."""
    event = copy.deepcopy(event)
    node, key = event, None
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = rng.choice(keys)
        if not isinstance(node[key], (dict, list)) or rng.random() < 0.4:
            break
        node = node[key]
    if key is None:
        return event
    if isinstance(node, dict) and key != "type" and rng.random() < 0.2:
        del node[key]
    else:
        node[key] = rng.choice(HOSTILE_VALUES)
    return event


def test_fuzzed_events_never_end_the_session(server):
    rng = random.Random(27)
    deadline = time.monotonic() + FUZZ_SECONDS
    sent = 0
    with open_ws(server) as ws:
        strict(ws.recv())
        while sent < FUZZ_EVENTS and time.monotonic() < deadline:
            ws.send(json.dumps(_mutate(rng.choice(GA_ONLY), rng)))
            ping = f"ping_{sent}"  # answered in order: the session has handled the mutated event before it
            ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "none", "event_id": ping}))
            until(ws, lambda e: is_error(e, ping))
            sent += 1
    assert sent >= 20, sent


def test_a_pending_turn_whose_question_was_deleted_is_not_answered(server):
    with open_ws(server, "beta") as ws:
        strict(ws.recv())
        ws.send(json.dumps({"type": "session.update", "session": {
            "turn_detection": {"type": "server_vad", "interrupt_response": False},
            "max_response_output_tokens": LONG}}))
        send_speech(ws, question_pcm() + silence(1.0))
        events = until(ws, lambda e: e["type"] == "response.audio.delta")
        first = events[-1]["response_id"]
        send_speech(ws, question_pcm("output2.wav") + silence(1.0))  # the new turn waits for the answer to end
        events += until(ws, lambda e: e["type"] == "input_audio_buffer.committed")
        committed = events[-1]["item_id"]
        users = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
        assert len(users) == 2  # the first turn's question, and the pending one
        for item_id in users:
            ws.send(json.dumps({"type": "conversation.item.delete", "item_id": item_id}))
        ws.send(json.dumps({"type": "response.cancel"}))
        events = until(ws, lambda e: e["type"] == "response.done")
        assert events[-1]["response"]["id"] == first and events[-1]["response"]["status"] == "cancelled"
        events = until(ws, is_error)
        assert events[-1]["error"]["code"] == "item_not_found" and committed in events[-1]["error"]["message"]
        ws.send(json.dumps({"type": "session.update", "session": {}}))
        events = until(ws, lambda e: e["type"] == "session.updated")
        assert "response.created" not in [e["type"] for e in events]  # no older message answered instead


def send_speech(ws, pcm24: bytes) -> None:
    step = 24000 * 2 // 10  # 100 ms of pcm16 per append
    for i in range(0, len(pcm24), step):
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(pcm24[i:i + step])}))


def test_no_api_key_in_the_server_log(server):
    with open_ws(server, query=f"&api_key={KEY}") as ws:
        assert strict(ws.recv())["type"] == "session.created"
    with pytest.raises(websockets_exceptions.InvalidStatus):
        with open_ws(server, query=f"&api_key={WRONG_KEY}"):
            pass
    assert server.request("GET", f"/health?api_key={KEY}")[0] == 200
    time.sleep(0.5)  # the server writes its log lines as it handles them; let the last ones land
    with open(server.log.name) as f:
        log = f.read()
    assert "/v1/realtime?" in log and "<redacted>" in log  # the handshakes were logged, their keys blanked
    assert KEY not in log and WRONG_KEY not in log


STALL_S = 0.2  # the longest a /health poll may wait while another client sends a huge text
POLL_S = 0.05


def test_a_huge_text_is_refused_without_stalling_other_clients(server):
    from serving.realtime.conversation import MAX_TEXT_CHARS
    slowest, stop = [0.0], threading.Event()

    def poll():
        while not stop.is_set():
            started = time.monotonic()
            assert server.get("/health")[0] == 200
            slowest[0] = max(slowest[0], time.monotonic() - started)
            time.sleep(POLL_S)
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with open_ws(server) as ws:
            strict(ws.recv())
            ws.send(json.dumps(text_item("a" * 6_000_000)))  # 6 MB, under the 8 MB frame limit
            event = strict(ws.recv(timeout=RECV_TIMEOUT_S))
            assert event["error"]["code"] == "text_too_long" and str(MAX_TEXT_CHARS) in event["error"]["message"]
            rng = random.Random(0)  # within the limit, but more positions than the model reads
            ws.send(json.dumps(text_item("".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(MAX_TEXT_CHARS)))))
            ws.send(json.dumps({"type": "response.create"}))
            done = until(ws, lambda e: e["type"] == "response.done")[-1]["response"]
            assert done["status"] == "failed" and "shorten it" in done["status_details"]["error"]["message"], done
    finally:
        stop.set()
        poller.join()
    assert slowest[0] < STALL_S, slowest[0]


def text_item(text: str) -> dict:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}


IDLE_S = 1.0  # the idle timeout of the test's server


@pytest.fixture(scope="module")
def idle_server(tiny_ckpt, tmp_path_factory):
    srv = Server(tiny_ckpt, tmp_path_factory.mktemp("rt-idle-tmp"), "--idle-timeout", str(IDLE_S),
                 "--max-sessions", "1")
    yield srv
    srv.stop()


def test_an_idle_session_is_closed_with_a_reason_and_its_slot_freed(idle_server):
    with websockets_sync.connect(f"ws://127.0.0.1:{idle_server.port}/v1/realtime") as ws:
        strict(ws.recv())
        opened = time.monotonic()
        for _ in range(3):  # events keep it open past the timeout
            time.sleep(IDLE_S / 2)
            ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            assert strict(ws.recv(timeout=RECV_TIMEOUT_S))["type"] == "input_audio_buffer.cleared"
        assert time.monotonic() - opened > IDLE_S
        quiet_since = time.monotonic()
        event = strict(ws.recv(timeout=RECV_TIMEOUT_S))  # then nothing: the server ends it
        assert time.monotonic() - quiet_since >= IDLE_S * 0.9
        assert event["error"]["code"] == "session_idle_timeout" and "--idle-timeout" in event["error"]["message"]
        with pytest.raises(websockets_exceptions.ConnectionClosedOK) as closed:
            ws.recv(timeout=RECV_TIMEOUT_S)
        assert closed.value.rcvd.code == 1000 and closed.value.rcvd.reason == "idle timeout"
    deadline = time.monotonic() + RECV_TIMEOUT_S
    while metric(idle_server, "omni_realtime_sessions") != 0:  # the slot is free for the next client
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_refused_session_is_told_when_to_retry(idle_server):
    from serving.realtime.transport import SESSION_RETRY_AFTER_S
    url = f"ws://127.0.0.1:{idle_server.port}/v1/realtime"
    with websockets_sync.connect(url) as ws:
        strict(ws.recv())
        with pytest.raises(websockets_exceptions.InvalidStatus) as refused:
            websockets_sync.connect(url)
    response = refused.value.response
    assert response.status_code == 503 and response.headers["Retry-After"] == str(SESSION_RETRY_AFTER_S)
    message = json.loads(response.body)["error"]
    assert "--max-sessions" in message and f"retry in {SESSION_RETRY_AFTER_S} s" in message


# A client that sends and never reads, spoken to over a bare socket: a WebSocket library would read for it.
SMALL_RCVBUF = 4096  # bytes: the client's socket buffers little, so the server's events back up quickly
APPEND_BYTES = 2 * 1024 * 1024  # pcm16 per append, the flood: 2 MB frames
RETRIEVES_PER_APPEND = 60  # each reads back an item of MAX_TEXT_CHARS: about 8 KB of events per 80 B frame
FLOOD_ROUNDS = 60
RSS_GROWTH_MB = 64  # the server's memory may grow this much at most while the flood runs


def raw_ws(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    sock.settimeout(RECV_TIMEOUT_S)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Authorization: Bearer {KEY}\r\n\r\n").encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # byte by byte: the first event's bytes stay in the socket
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def client_frame(event: dict) -> bytes:
    """A masked text frame, as RFC 6455 asks of clients."""
    data = np.frombuffer(json.dumps(event).encode(), np.uint8)
    mask = np.frombuffer(os.urandom(4), np.uint8)
    n = len(data)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 1 << 16 else \
        bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return bytes([0x81]) + size + mask.tobytes() + (data ^ np.resize(mask, n)).tobytes()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        assert part, "the server closed the connection without a close frame"
        data += part
    return data


def server_frames(sock: socket.socket):
    """(opcode, payload) of each frame the server sends (unmasked)."""
    while True:
        first, second = recv_exact(sock, 2)
        n = second & 0x7F
        n = int.from_bytes(recv_exact(sock, 2 if n == 126 else 8), "big") if n >= 126 else n
        yield first & 0x0F, recv_exact(sock, n)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's memory from /proc")
def test_a_client_that_does_not_read_is_closed_with_a_reason(server):
    from serving.realtime.conversation import MAX_TEXT_CHARS
    from serving.realtime.transport import POLICY_VIOLATION
    sock = raw_ws(server.port)
    setup = [{"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}},
             {"type": "conversation.item.create", "item": {"id": "big", **text_item("a" * MAX_TEXT_CHARS)["item"]}}]
    for event in setup:
        sock.sendall(client_frame(event))
    append = client_frame({"type": "input_audio_buffer.append", "audio": b64(bytes(APPEND_BYTES))})
    retrieves = client_frame({"type": "conversation.item.retrieve", "item_id": "big"}) * RETRIEVES_PER_APPEND
    before, peak, stop = rss_mb(server.proc.pid), [0.0], threading.Event()

    def flood():
        for _ in range(FLOOD_ROUNDS):
            if stop.is_set():
                return
            try:
                sock.sendall(append + retrieves)
            except OSError:  # the server stopped reading: the flood is over
                return
    flooder = threading.Thread(target=flood)
    flooder.start()
    deadline = time.monotonic() + RECV_TIMEOUT_S
    while metric(server, "omni_realtime_sessions", AUTH) != 0:  # the server gives the session up, unread
        peak[0] = max(peak[0], rss_mb(server.proc.pid))
        assert time.monotonic() < deadline, "the session of a client that does not read was never closed"
        time.sleep(0.05)
    stop.set()
    for opcode, payload in server_frames(sock):  # now read: what had gone out, then the close frame
        if opcode == 8:
            break
    flooder.join()
    sock.close()
    code, reason = int.from_bytes(payload[:2], "big"), payload[2:].decode()
    assert code == POLICY_VIOLATION and "not reading" in reason and "MAX_UNSENT_BYTES" in reason, (code, reason)
    assert peak[0] - before < RSS_GROWTH_MB, (before, peak[0])


def test_the_oldest_audio_is_dropped_past_the_session_bound_and_its_item_stays_listed(monkeypatch):
    from serving.realtime import conversation
    from serving.realtime.protocol import ProtocolError
    from serving.realtime.session import RealtimeSession
    from tests.test_realtime_session import FakeRunner, tone
    session = RealtimeSession(FakeRunner())
    one = 16000 * 4  # bytes kept of 1 s of audio: float32 at 16 kHz
    monkeypatch.setattr(conversation, "MAX_KEPT_BYTES", 3 * one)
    ids = [f"item_{i}" for i in range(5)]
    for item_id in ids:
        session.handle({"type": "conversation.item.create", "item": {
            "id": item_id, "type": "message", "role": "user",
            "content": [{"type": "input_audio", "audio": b64(tone(1.0))}]}})
    items = session.conversation.items
    assert list(items) == ids  # every item still listed
    assert [items[i].audio is None for i in ids] == [True, True, False, False, False]
    assert sum(item.kept_bytes for item in items.values()) <= 3 * one
    retrieved = session.handle({"type": "conversation.item.retrieve", "item_id": ids[0]})[0]
    assert retrieved["item"]["id"] == ids[0] and retrieved["item"]["content"][0]["type"] == "input_audio"
    with pytest.raises(ProtocolError, match="MAX_KEPT_BYTES") as dropped:
        session.conversation.question(ids[0])
    assert dropped.value.code == "item_audio_dropped"
    assert session.conversation.question()[0].id == ids[-1]  # the newest is answered as before
