"""The real server process on a loopback port, spoken to over HTTP the way its clients do."""
import base64
import io
import json
import threading
import time
import wave

import numpy as np
import pytest

from omni.audio import SAMPLE_RATE
from omni.auto import FORCED_REASON
from omni.codec import LOOKAHEAD_FRAMES
from tests.conftest import ROOT
from tests.http_client import Server

MAX = 120  # max_tokens for quick answers on the tiny checkpoint
LONG = 1200  # an answer long enough to interrupt


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    srv = Server(tiny_ckpt, tmp_path_factory.mktemp("server-tmp"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sample_bytes(sample_wav):
    return sample_wav.read_bytes()


@pytest.fixture(scope="module")
def expected(engine, sample_wav):
    return engine.run(sample_wav, max_tokens=MAX)


def read_chunks(resp, size=16384):
    chunks = []
    while block := resp.read(size):
        chunks.append(block)
    return chunks


def test_health(server):
    health = server.get_json("/health")
    assert health["status"] == "ready" and health["family"] == "mini-omni"
    assert health["device"] == "cpu" and health["dtype"] == "float32" and health["can_see"] is False
    assert health["mode"] == "exact" and health["mode_reason"] == FORCED_REASON  # the tests' server: --mode exact


def test_index_page_names_the_routes(server):
    status, headers, body = server.get("/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert all(route in page for route in ("/chat", 'href="/health"', 'href="/metrics"', "/requests/", ":7860"))
    assert "ready" in page


def test_official_request_streams_the_engines_answer(server, sample_bytes, expected):
    status, headers, body = server.chat(sample_bytes, max_tokens=MAX, stream_stride=4)
    assert status == 200 and headers["Transfer-Encoding"] == "chunked"
    assert headers["X-Sample-Rate"] == "24000" and headers["Content-Type"] == "application/octet-stream"
    assert body == expected.pcm
    record = server.record(headers)
    assert record["outcome"] == "completed" and record["text"] == expected.text
    assert record["steps"] == len(expected.streams[7])


def test_first_chunk_arrives_while_the_engine_is_still_generating(server, sample_bytes):
    conn, resp = server.open_chat(sample_bytes, max_tokens=LONG)
    first = resp.read(16384)
    headers = dict(resp.getheaders())
    running = server.record(headers)  # the engine's own step count, right now
    assert len(first) == 16384
    assert 11 <= running["steps"] < LONG - 70  # first chunk after 11 steps; far from the end
    resp.close()  # hang up: the server must stop this answer
    conn.close()
    deadline = time.monotonic() + 30
    while (record := server.record(headers))["outcome"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert record["outcome"] == "cancelled" and record["steps"] < LONG - 70
    assert server.get_json("/health")["busy"] is False
    assert server.chat(sample_bytes, max_tokens=MAX)[0] == 200  # the engine is free again


def test_wav_format_reads_with_the_wave_module(server, sample_bytes, expected):
    status, headers, body = server.chat(sample_bytes, path="/chat?format=wav", max_tokens=MAX)
    assert status == 200 and headers["Content-Type"] == "audio/wav"
    with wave.open(io.BytesIO(body)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.readframes(10**9) == expected.pcm
        assert w.getnframes() == len(expected.pcm) // 2  # a download's header has the true sizes
    assert int.from_bytes(body[4:8], "little") == len(body) - 8


def test_wav_stream_format_has_a_live_streams_header(server, sample_bytes, expected):
    status, headers, body = server.chat(sample_bytes, path="/chat?format=wav-stream", max_tokens=MAX)
    assert status == 200 and headers["Content-Type"] == "audio/wav" and headers["Transfer-Encoding"] == "chunked"
    assert body[4:8] == body[40:44] == b"\xff\xff\xff\xff" and body[44:] == expected.pcm


def test_multipart_v2_layout(server, sample_bytes, expected):
    status, headers, body = server.chat(sample_bytes, path="/chat?format=multipart", max_tokens=MAX)
    assert status == 200 and headers["Content-Type"] == "multipart/x-mixed-replace; boundary=frame"
    audio, text = b"", ""
    for part in body.split(b"\r\n--frame\r\n")[1:]:  # how the official v2 clients read it
        head, payload = part.split(b"\r\n\r\n", 1)
        if head == b"Content-Type: audio/wav":
            audio += payload
        else:
            assert head == b"Content-Type: text/plain"
            text += payload.decode()
    assert audio == expected.pcm and text == expected.text


@pytest.mark.parametrize("fmt", ["sse", "ndjson"])
def test_event_formats(server, sample_bytes, expected, fmt):
    status, headers, body = server.chat(sample_bytes, path=f"/chat?format={fmt}", max_tokens=MAX)
    assert status == 200
    if fmt == "sse":
        events = [json.loads(block.split("data: ", 1)[1]) for block in body.decode().split("\n\n") if block]
    else:
        events = [json.loads(line) for line in body.decode().splitlines()]
    chunks, done = events[:-1], events[-1]
    assert b"".join(base64.b64decode(c["audio"]) for c in chunks) == expected.pcm
    assert "".join(c["text"] for c in chunks) == expected.text == done["text"]
    assert done["done"] and done["outcome"] == "completed" and done["steps"] == len(expected.streams[7])


def test_accept_header_picks_the_format(server, sample_bytes):
    body = json.dumps({"audio": base64.b64encode(sample_bytes).decode(), "max_tokens": MAX})
    status, headers, _ = server.request("POST", "/chat", body.encode(),
                                        {"Content-Type": "application/json", "Accept": "text/event-stream"})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")


def test_multipart_upload_and_raw_body(server, sample_bytes, expected):
    boundary = "xYz"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"q.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + sample_bytes + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"max_tokens\"\r\n\r\n{MAX}"
            f"\r\n--{boundary}--\r\n").encode()
    status, _, body = server.request("POST", "/chat", form, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and body == expected.pcm
    status, _, body = server.request("POST", f"/chat?max_tokens={MAX}", sample_bytes, {"Content-Type": "audio/wav"})
    assert status == 200 and body == expected.pcm


def _wav(samples) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(np.asarray(samples, dtype="<i2").tobytes())
    return out.getvalue()


def _silence_wav(seconds: float) -> bytes:
    return _wav(np.zeros(int(seconds * SAMPLE_RATE)))


def _tone_wav(seconds: float) -> bytes:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return _wav(np.sin(2 * np.pi * 300 * t) * 8000)


def _json(**body):
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_REQUESTS = [
    ("malformed JSON", "POST", "/chat", b"{not json", {"Content-Type": "application/json"}, 400, "not valid JSON"),
    ("not an object", "POST", "/chat", *_json(), 400, "required"),
    ("bad base64", "POST", "/chat", *_json(audio="@@@"), 400, "base64"),
    ("not audio", "POST", "/chat", *_json(audio=_b64(b"hello, I am text")), 400, "could not decode"),
    ("empty audio", "POST", "/chat", *_json(audio=""), 400, "empty"),
    ("silent audio", "POST", "/chat", *_json(audio=_b64(_silence_wav(1))), 400, "silent"),
    ("over 30 s", "POST", "/chat", *_json(audio=_b64(_tone_wav(31))), 400, "30 s"),
    ("wrong field type", "POST", "/chat", *_json(audio=_b64(b"x"), max_tokens="many"), 400, "max_tokens"),
    ("bool as int", "POST", "/chat", *_json(audio=_b64(b"x"), stream_stride=True), 400, "stream_stride"),
    ("unknown field", "POST", "/chat", *_json(audio=_b64(b"x"), volume=11), 400, "unknown field"),
    ("image on a v1 model", "POST", "/chat", *_json(audio=_b64(_tone_wav(1)), image=_b64(b"x")), 400, "cannot see"),
    ("bad max_tokens", "POST", "/chat", *_json(audio=_b64(_tone_wav(1)), max_tokens=10), 400, "max_tokens"),
    ("bad stride", "POST", "/chat", *_json(audio=_b64(_tone_wav(1)), stream_stride=0), 400, "stream_stride"),
    ("unknown format", "POST", "/chat?format=mp5", *_json(audio=_b64(b"x")), 400, "unknown format"),
    ("bad query number", "POST", "/chat?max_tokens=lots", b"RIFF", {"Content-Type": "audio/wav"}, 400, "integer"),
    ("form without audio", "POST", "/chat", b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n",
     {"Content-Type": "multipart/form-data; boundary=b"}, 400, "audio"),
    ("content type", "POST", "/chat", b"hello", {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("wrong method", "GET", "/chat", None, {}, 405, "Method Not Allowed"),
    ("wrong route", "POST", "/talk", b"", {}, 404, "Not Found"),
    ("unknown request id", "GET", "/requests/nope", None, {}, 404, "no recent request"),
]


@pytest.mark.parametrize("name, method, path, body, headers, status, message", BAD_REQUESTS,
                         ids=[r[0] for r in BAD_REQUESTS])
def test_bad_input_gets_a_json_4xx(server, name, method, path, body, headers, status, message):
    got, resp_headers, data = server.request(method, path, body, headers)
    assert got == status and resp_headers["Content-Type"] == "application/json"
    assert message in json.loads(data)["error"]


def test_still_serving_with_no_temporary_files_left(server, sample_bytes, expected):
    assert server.chat(sample_bytes, max_tokens=MAX)[2] == expected.pcm
    left = [p.name for p in server.tmpdir.iterdir() if not p.name.startswith("torchinductor")]  # torch's own cache
    assert left == []


def test_four_concurrent_clients(server, engine):
    samples = sorted((ROOT / "data" / "samples").glob("*.wav"))[:4]
    wanted = {s.name: engine.run(s, max_tokens=MAX).pcm for s in samples}
    got = {}

    def ask(sample):
        got[sample.name] = server.chat(sample.read_bytes(), max_tokens=MAX)

    threads = [threading.Thread(target=ask, args=(s,)) for s in samples]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert {name: status for name, (status, _, _) in got.items()} == {s.name: 200 for s in samples}
    assert {name: body for name, (_, _, body) in got.items()} == wanted


def test_metrics(server):
    status, headers, body = server.get("/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for line in ('omni_requests_total{outcome="completed"}', 'omni_requests_total{outcome="bad_request"}',
                 "omni_time_to_first_chunk_seconds_bucket", "omni_real_time_factor_count", "omni_queue_depth",
                 "omni_in_flight", "process_resident_memory_bytes", "omni_queue_wait_seconds_count",
                 "omni_max_batch 2.0", "omni_batch_requests", 'omni_decode_steps_total{batch="1"}',
                 'omni_decode_step_seconds_total{batch="1"}', 'omni_mode{mode="exact"} 1.0'):
        assert line in text


def test_full_queue_answers_503(tiny_ckpt, tmp_path, sample_bytes):
    (tmp_path / "tmp").mkdir()
    srv = Server(tiny_ckpt, tmp_path / "tmp", "--max-queue", "1", "--max-batch", "1")
    try:
        running = srv.open_chat(sample_bytes, max_tokens=LONG)
        assert running[1].status == 200 and len(running[1].read(16384)) == 16384
        waiting = srv.connect()
        waiting.request("POST", "/chat", json.dumps({"audio": base64.b64encode(sample_bytes).decode()}),
                        {"Content-Type": "application/json"})
        deadline = time.monotonic() + 30
        while srv.get_json("/health")["queue_depth"] != 1:  # admitted, waiting for its turn
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, headers, body = srv.chat(sample_bytes, max_tokens=MAX)
        assert status == 503 and headers["Retry-After"] == "2" and "busy" in json.loads(body)["error"]
        running[1].close()
        running[0].close()
        waiting.close()
        deadline = time.monotonic() + 30
        while srv.get_json("/health")["busy"] or srv.get_json("/health")["queue_depth"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert srv.chat(sample_bytes, max_tokens=MAX)[0] == 200
    finally:
        srv.stop()


def test_health_while_loading_and_after_a_failed_load(engine, sample_bytes):
    from serving.app import create_app
    from serving.service import EngineService

    release = threading.Event()
    service = EngineService(lambda: release.wait(60) and engine, max_queue=1)
    client = create_app(service).test_client()
    loading = service.start()
    assert client.get("/health").status_code == 503 and client.get("/health").json["status"] == "loading"
    busy = client.post("/chat", json={"audio": base64.b64encode(sample_bytes).decode()})
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "2" and "loading" in busy.json["error"]
    assert "current" not in client.get("/health").json  # nothing about anyone's request
    release.set()
    loading.result(timeout=120)
    assert client.get("/health").json["status"] == "ready"

    def broken():
        raise FileNotFoundError("no checkpoint here")

    failed = EngineService(broken, max_queue=1)
    failed.start().result(timeout=30)
    failed_client = create_app(failed).test_client()
    health = failed_client.get("/health")
    assert health.status_code == 503 and health.json["status"] == "failed" and "no checkpoint" in health.json["error"]
    refused = failed_client.post("/chat", json={"audio": base64.b64encode(sample_bytes).decode()})
    assert refused.status_code == 503 and "Retry-After" not in refused.headers  # retrying will not help
    assert "failed to load" in refused.json["error"] and "restart" in refused.json["error"]


def test_the_http_threads_follow_what_the_service_admits(engine):
    import asyncio

    from serving.asgi import WsgiBridge
    from serving.service import EngineService

    def no_content(environ, start_response):
        start_response("204 No Content", [])
        return []

    service = EngineService(lambda: engine, max_queue=3)
    bridge = WsgiBridge(no_content, 1000, lambda: service.capacity + 1)
    assert bridge.size == 1 + 3 + 1  # while loading: one running request at most
    service.start().result(timeout=120)
    assert service.capacity == engine.scheduler.max_batch + 3

    async def get() -> list[dict]:
        messages = [{"type": "http.request", "body": b""}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await asyncio.sleep(60)  # the client stays until the bridge stops watching it
            return {"type": "http.disconnect"}

        sent = []

        async def send(message: dict) -> None:
            sent.append(message)
        await bridge({"type": "http", "path": "/", "headers": []}, receive, send)
        return sent

    assert asyncio.run(get())[0]["status"] == 204
    assert bridge.size == engine.scheduler.max_batch + 3 + 1


def test_first_stride_field(server, sample_bytes, expected):
    status, _, body = server.chat(sample_bytes, path="/chat?format=ndjson", max_tokens=MAX, first_stride=1)
    events = [json.loads(line) for line in body.decode().splitlines()]
    # the prefill token, 7 steps to the first frame, then the gapless decoder's look-ahead
    first_steps = 1 + 7 + LOOKAHEAD_FRAMES
    assert status == 200 and events[0]["steps"] == first_steps and len(base64.b64decode(events[0]["audio"])) == 4096
    # chunks are decoded one by one, so other boundaries give other samples: compare the length only
    assert len(b"".join(base64.b64decode(e["audio"]) for e in events[:-1])) == len(expected.pcm)


def test_capacity_is_the_largest_batch_within_real_time():
    from omni.auto import REALTIME_SHARE
    from omni.codec import SECONDS_PER_FRAME
    from serving.capacity import FixedFrameTimes, frame_seconds, realtime_capacity

    budget = REALTIME_SHARE * SECONDS_PER_FRAME
    assert realtime_capacity(FixedFrameTimes({}), 4) is None  # nothing measured yet: counts only
    assert realtime_capacity(FixedFrameTimes({1: 0.3 * budget, 2: 0.9 * budget, 3: 2 * budget}), 4) == 2
    assert realtime_capacity(FixedFrameTimes({1: 1.1 * budget}), 4) == 1  # one is always admitted
    assert realtime_capacity(FixedFrameTimes({1: 0.1 * budget}), 3) == 3  # never above max_batch
    assert frame_seconds({1: 1.0, 2: 1.5}, 4) == 2.5  # on the line through the two largest measured
    assert frame_seconds({1: 1.0}, 3) > 2.0  # one measured: a cautious growth per request


def capacity_table(*shares: float) -> str:
    """A MINI_OMNI_FRAME_SECONDS table: each batch size's frame time as a share of the real-time budget."""
    from omni.auto import REALTIME_SHARE
    from omni.codec import SECONDS_PER_FRAME

    return ",".join(f"{n}={share * REALTIME_SHARE * SECONDS_PER_FRAME}" for n, share in enumerate(shares, 1))


def capacity_server(tiny_ckpt, tmpdir, *extra: str) -> Server:
    """A server told (instead of measuring) that 2 answers at once keep real time and 3 do not."""
    from serving.capacity import FRAME_SECONDS_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FRAME_SECONDS_ENV, capacity_table(0.3, 0.9, 2.0))
        return Server(tiny_ckpt, tmpdir, "--max-batch", "3", *extra)


def wait_conversations(srv: Server, n: int) -> None:
    deadline = time.monotonic() + 30
    while srv.get_json("/health")["conversations"] != n:
        assert time.monotonic() < deadline, srv.get_json("/health")
        time.sleep(0.05)


def test_admission_by_real_time_capacity(tiny_ckpt, tmp_path, sample_bytes):
    """Two conversations fit: a third /chat gets 503 with Retry-After and the reason, as does a third
    Realtime handshake; when one ends, the next is admitted. The admitted answer goes on meanwhile."""
    websockets_sync = pytest.importorskip("websockets.sync.client")
    websockets_exceptions = pytest.importorskip("websockets.exceptions")
    (tmp_path / "tmp").mkdir()
    srv = capacity_server(tiny_ckpt, tmp_path / "tmp")
    try:
        health = srv.get_json("/health")
        assert health["realtime_capacity"] == 2 and health["max_batch"] == 3 and health["conversations"] == 0
        first = srv.open_chat(sample_bytes, max_tokens=LONG)
        assert first[1].status == 200 and len(first[1].read(16384)) == 16384
        with websockets_sync.connect(f"ws://127.0.0.1:{srv.port}/v1/realtime") as session:
            assert json.loads(session.recv())["type"] == "session.created"
            wait_conversations(srv, 2)
            status, headers, body = srv.chat(sample_bytes, max_tokens=MAX)
            assert status == 503 and headers["Retry-After"] == "2"
            assert "real-time capacity" in json.loads(body)["error"]
            with pytest.raises(websockets_exceptions.InvalidStatus) as refused:
                with websockets_sync.connect(f"ws://127.0.0.1:{srv.port}/v1/realtime"):
                    pass
            assert refused.value.response.status_code == 503
            assert "real-time capacity" in json.loads(refused.value.response.body)["error"]
        wait_conversations(srv, 1)  # the session has closed: room for one more
        assert srv.chat(sample_bytes, max_tokens=MAX)[0] == 200
        assert len(first[1].read(16384)) == 16384  # the first answer goes on
        first[0].close()
        metrics = srv.get("/metrics")[2].decode()
        assert 'omni_requests_total{outcome="over_capacity"} 1.0' in metrics
        assert "omni_realtime_capacity 2.0" in metrics and "omni_conversations 1.0" in metrics
    finally:
        srv.stop()


def test_realtime_admission_can_be_turned_off(tiny_ckpt, tmp_path, sample_bytes):
    (tmp_path / "tmp").mkdir()
    srv = capacity_server(tiny_ckpt, tmp_path / "tmp", "--no-realtime-admission")
    try:
        running = [srv.open_chat(sample_bytes, max_tokens=LONG) for _ in range(2)]
        for conn, resp in running:
            assert resp.status == 200 and len(resp.read(16384)) == 16384
        assert srv.chat(sample_bytes, max_tokens=MAX)[0] == 200  # the third, past capacity, admitted
        for conn, resp in running:
            conn.close()
    finally:
        srv.stop()
