"""The server as a Ray Serve application (serving/ray_app.py) on a real local Ray cluster on loopback: two
replicas of the tiny checkpoint behind Ray's proxy, spoken to by the same clients as the server.

Ray starts once for the module (it takes half a minute on two cores); the module is skipped when the
`ray` extra is not installed (`pip install .[ray]`). Tests wait on events and bounded polls of Ray's state.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import re
import threading
import time
import urllib.request

import pytest
import torch

from omni.engine import prompt_length
from omni.tokens import Task
from serving.realtime.transport import FIRST_CHUNK_FRAMES
from tests.conftest import ROOT
from tests.http_client import Server, free_port
from tests.test_realtime_api import connect, heard, question_pcm, silence, speak, until, wav_bytes

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install .[ray])")
serve = pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install .[ray])")
websockets_sync = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosedError  # noqa: E402
from serving.ray_app import (PROXY_CALLBACK, PROXY_CALLBACK_ENV, REPLICA_HEADER, REPLICA_LOST_CODE,  # noqa: E402
                             REPLICA_LOST_REASON, build_app)

KEY = "ray-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX = 120  # max_tokens of a quick answer (as tests/test_server.py)
LONG = 1200  # an answer long enough to kill its replica in the middle
SHORT = 60  # output tokens of a quick Realtime answer
REPLICAS = 2
# Ray sets a replica's OMP_NUM_THREADS (torch's threads) to its num_cpus: as many as this test process uses, so the
# replicas' sums run in the same order and their answers equal the engine fixture's to the bit.
CPUS = torch.get_num_threads()
STATE_TIMEOUT_S = 240  # Ray's own state changes (a replica restarted, a failed one given up): bounded polls
POLL_S = 0.5
METRICS_TIMEOUT_S = 60  # Ray's metrics agent exports what replicas report every few seconds
REPLICA = REPLICA_HEADER.decode()


class Proxy(Server):
    """The proxy's address, with the test server's client methods (no process of its own)."""

    def __init__(self, port: int) -> None:
        self.port, self.tls = port, None


def poll(what: str, check, timeout_s: float = STATE_TIMEOUT_S):
    """`check()`'s first truthy result, polled; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster (loopback, logical CPUs for two replicas), Serve's proxy on a free port with the
    application's proxy middleware (read from the environment Ray starts in)."""
    metrics_port = free_port()
    os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK
    ray.init(num_cpus=CPUS * (REPLICAS + 1), include_dashboard=False, _metrics_export_port=metrics_port,
             logging_level="warning", runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port, metrics_port
    serve.shutdown()
    ray.shutdown()
    os.environ.pop(PROXY_CALLBACK_ENV)


@pytest.fixture(scope="module")
def proxy(cluster, tiny_ckpt):
    port, _ = cluster
    serve.run(build_app({"ckpt_dir": str(tiny_ckpt), "device": "cpu", "mode": "exact", "api_key": KEY,
                         "num_replicas": REPLICAS, "num_cpus": CPUS}), name="omni", route_prefix="/")
    return Proxy(port)


@pytest.fixture(scope="module")
def sample_bytes(sample_wav):
    return sample_wav.read_bytes()


def chat(proxy: Proxy, audio: bytes, max_tokens: int = MAX, headers: dict | None = None, **fields):
    body = json.dumps({"audio": base64.b64encode(audio).decode(), "max_tokens": max_tokens, **fields}).encode()
    return proxy.request("POST", "/chat", body, {"Content-Type": "application/json", **AUTH, **(headers or {})})


def running_replicas() -> int:
    app = serve.status().applications.get("omni")
    if app is None:
        return 0
    return app.deployments["mini-omni"].replica_states.get("RUNNING", 0)


def test_health_chat_and_security_through_the_proxy(proxy, sample_bytes, engine, sample_wav):
    status, headers, body = proxy.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ready" and headers[REPLICA]
    status, headers, body = chat(proxy, sample_bytes)
    assert status == 200 and body == engine.run(sample_wav, max_tokens=MAX).pcm
    status, headers, body = proxy.request("POST", "/chat", b"{}", {"Content-Type": "application/json"})
    assert status == 401 and "API key" in json.loads(body)["error"]
    status, _, body = chat(proxy, sample_bytes, headers={"Origin": "https://evil.example"})
    assert status == 403 and "origin" in json.loads(body)["error"]
    status, _, body = proxy.request("GET", "/metrics", None, AUTH)
    assert status == 200 and b"omni_requests_total" in body


def test_concurrent_requests_land_on_both_replicas_and_each_reports_its_metrics(proxy, cluster, sample_bytes):
    answers: list[tuple] = []
    threads = [threading.Thread(target=lambda: answers.append(chat(proxy, sample_bytes))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=STATE_TIMEOUT_S)
    assert [status for status, _, _ in answers] == [200] * 4
    assert len({body for _, _, body in answers}) == 1
    served = {headers[REPLICA] for _, headers, _ in answers}
    assert len(served) == REPLICAS
    _, metrics_port = cluster

    def per_replica() -> dict[str, float] | None:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
        found = {}
        for line in text.splitlines():
            if line.startswith("ray_omni_requests_total{") and 'outcome="completed"' in line:
                replica = re.search(r'replica="([^"]+)"', line).group(1)
                found[replica] = float(line.rsplit(" ", 1)[1])
        return found if len(found) == REPLICAS and sum(found.values()) >= len(answers) else None

    counts = poll("each replica's request count in Ray's metrics", per_replica, METRICS_TIMEOUT_S)
    assert all(n >= 1 for n in counts.values())


def test_realtime_session_through_the_proxy(proxy):
    pcm = question_pcm() + silence(1.0)
    with connect(proxy, "beta", key=KEY) as conn:
        assert conn.recv().type == "session.created"
        conn.session.update(session={"max_response_output_tokens": SHORT})
        speak(conn, pcm)
        events = until(conn, "response.done")
        assert events[-1].response.usage.output_tokens == SHORT
        conn.session.update(session={"max_response_output_tokens": LONG})
        speak(conn, pcm)
        first = until(conn, "response.audio.delta")[-1].response_id
        speak(conn, question_pcm("output2.wav") + silence(1.0))  # barge-in: spoken over the answer
        cancelled = until(conn, "response.done")[-1].response
        assert cancelled.id == first and cancelled.status == "cancelled"
        assert cancelled.status_details.reason == "turn_detected"
    started = next(e for e in events if e.type == "input_audio_buffer.speech_started")
    stopped = next(e for e in events if e.type == "input_audio_buffer.speech_stopped")
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.audio.delta")
    samples = heard(pcm, started.audio_start_ms, stopped.audio_end_ms)
    status, _, body = chat(proxy, wav_bytes(samples), prompt_length(Task.A1A2, samples, None, False) + SHORT,
                           first_stride=FIRST_CHUNK_FRAMES)  # the chunks of a Realtime answer
    assert status == 200 and audio == body


def test_a_replica_killed_mid_answer(proxy, sample_bytes, sample_wav, engine):
    conn = proxy.connect()
    body = json.dumps({"audio": base64.b64encode(sample_bytes).decode(), "max_tokens": LONG})
    conn.request("POST", "/chat", body=body, headers={"Content-Type": "application/json", **AUTH})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read1(4096)  # the answer is streaming
    victim = resp.getheader(REPLICA)
    ray.kill(ray.get_actor(victim, namespace="serve"))
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        while resp.read(65536):
            pass
    conn.close()
    wanted = engine.run(sample_wav, max_tokens=MAX).pcm
    status, headers, answer = chat(proxy, sample_bytes)  # the survivor answers
    assert status == 200 and answer == wanted and headers[REPLICA] != victim
    poll("two running replicas again", lambda: running_replicas() == REPLICAS)
    assert chat(proxy, sample_bytes)[0] == 200


def test_a_realtime_session_whose_replica_is_killed_is_closed_with_a_reason(proxy, sample_bytes):
    with connect(proxy, "beta", key=KEY) as conn:
        assert conn.recv().type == "session.created"
        victim = conn._connection.response.headers[REPLICA]  # the SDK's websockets connection: the handshake
        conn.session.update(session={"max_response_output_tokens": LONG})
        speak(conn, question_pcm() + silence(1.0))
        until(conn, "response.audio.delta")  # the answer is streaming
        ray.kill(ray.get_actor(victim, namespace="serve"))
        with pytest.raises(ConnectionClosedError) as closed:
            until(conn, "response.done")
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (REPLICA_LOST_CODE, REPLICA_LOST_REASON)
    status, headers, _ = chat(proxy, sample_bytes)  # the survivor answers
    assert status == 200 and headers[REPLICA] != victim
    poll("two running replicas again", lambda: running_replicas() == REPLICAS)


def test_a_replica_whose_checkpoint_fails_is_unhealthy(cluster, tmp_path):
    empty = tmp_path / "no-checkpoint"
    empty.mkdir()
    serve._run(build_app({"ckpt_dir": str(empty), "device": "cpu", "num_replicas": 1, "num_cpus": 1}),
               _blocking=False, name="broken", route_prefix="/broken")
    try:
        def failed():
            app = serve.status().applications.get("broken")
            return app if app is not None and app.status == "DEPLOY_FAILED" else None

        app = poll("the broken application to fail", failed)
        message = app.deployments["mini-omni"].message  # Ray's reason names check_health's
        assert "the engine is failed" in message and "lacks model_config.yaml" in message
        assert Proxy(cluster[0]).get("/broken/health")[0] != 200  # not routed to
    finally:
        serve.delete("broken")
