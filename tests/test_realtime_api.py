"""`/v1/realtime` on the real server process, spoken to by the `openai` SDK's realtime clients.

Speech is a real recorded question (data/samples), resampled to the protocol's 24 kHz and sent in 100 ms
chunks, then silence: the server's Silero VAD ends the turn. Tests wait on events, never on the clock; a
watchdog only closes a connection that would otherwise hang the run.
"""
from __future__ import annotations

import base64
import io
import json
import re
import threading
import wave
from contextlib import contextmanager

import numpy as np
import pytest

from omni.engine import prompt_length
from omni.tokens import Task
from serving.realtime.transport import FIRST_CHUNK_FRAMES
from voice.signal import Resampler, float_to_pcm, pcm_to_float
from tests.conftest import IMAGE, ROOT
from tests.http_client import Server

openai = pytest.importorskip("openai")
websockets_sync = pytest.importorskip("websockets.sync.client")

KEY = "test-key-0123456789"
SHORT = 60  # output tokens (decode steps) of a quick answer
LONG = 1500  # an answer long enough to interrupt
CHUNK_MS = 100
API_RATE, MODEL_RATE = 24000, 16000
WATCHDOG_S = 300  # closes a connection whose events stopped coming (a hang, not a timing check)
SAMPLES = ROOT / "data" / "samples"
GA_RENAMES = {"response.audio.delta": "response.output_audio.delta",
              "response.audio.done": "response.output_audio.done",
              "response.audio_transcript.delta": "response.output_audio_transcript.delta",
              "response.audio_transcript.done": "response.output_audio_transcript.done"}


def question_pcm(name: str = "output1.wav") -> bytes:
    """A recorded question as pcm16 24 kHz mono."""
    with wave.open(str(SAMPLES / name)) as w:
        assert (w.getframerate(), w.getnchannels()) == (MODEL_RATE, 1)
        pcm16k = w.readframes(w.getnframes())
    return float_to_pcm(Resampler(MODEL_RATE, API_RATE)(pcm_to_float(pcm16k)))


def silence(seconds: float) -> bytes:
    return b"\0\0" * int(seconds * API_RATE)


def heard(pcm24: bytes, start_ms: int | None = None, end_ms: int | None = None) -> np.ndarray:
    """What the server hears of `pcm24`: its 16 kHz resampling as pcm16, cut where the VAD put the turn."""
    samples = pcm_to_float(float_to_pcm(Resampler(API_RATE, MODEL_RATE)(pcm_to_float(pcm24))))
    per_ms = MODEL_RATE // 1000
    return samples[(start_ms or 0) * per_ms:(end_ms * per_ms if end_ms is not None else None)]


def wav_bytes(samples: np.ndarray) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(MODEL_RATE)
        w.writeframes(float_to_pcm(samples))
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def client_for(server: Server, key: str = "unused") -> "openai.OpenAI":
    base = f"127.0.0.1:{server.port}/v1"
    return openai.OpenAI(api_key=key, base_url=f"http://{base}", websocket_base_url=f"ws://{base}")


@contextmanager
def connect(server: Server, dialect: str = "beta", key: str = "unused", **options):
    client = client_for(server, key)
    realtime = client.beta.realtime if dialect == "beta" else client.realtime
    with realtime.connect(model="mini-omni", **options) as conn:
        watchdog = threading.Timer(WATCHDOG_S, conn.close)
        watchdog.start()
        try:
            yield conn
        finally:
            watchdog.cancel()


def speak(conn, pcm24: bytes) -> None:
    step = API_RATE * 2 * CHUNK_MS // 1000
    for i in range(0, len(pcm24), step):
        conn.input_audio_buffer.append(audio=b64(pcm24[i:i + step]))


def until(conn, *types: str) -> list:
    """Events up to and including the first of `types`."""
    events = []
    while True:
        events.append(conn.recv())
        if events[-1].type in types:
            return events


def names(events: list) -> list[str]:
    return [e.type for e in events if not e.type.endswith(".delta")]


def metric(server: Server, name: str, headers: dict | None = None) -> float:
    text = server.request("GET", "/metrics", None, headers or {})[2].decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def chat_answer(server: Server, samples: np.ndarray, steps: int, image: bytes | None = None) -> tuple[bytes, str]:
    """The /chat answer to the same 16 kHz samples, bounded to the same number of decode steps, in the
    chunks a Realtime answer has (the first chunk's end is previewed, so its size shapes the bytes)."""
    prompt = prompt_length(Task.A1A2, samples, None, image is not None)
    fields = {"max_tokens": prompt + steps, "first_stride": FIRST_CHUNK_FRAMES}
    if image is not None:
        fields["image"] = b64(image)
    status, headers, body = server.chat(wav_bytes(samples), **fields)
    assert status == 200, body
    return body, server.record(headers)["text"]


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    srv = Server(tiny_ckpt, tmp_path_factory.mktemp("rt-server-tmp"))
    yield srv
    srv.stop()


@pytest.mark.parametrize("dialect", ["beta", "ga"])
def test_spoken_question_gets_the_chat_answer(server, dialect):
    pcm = question_pcm() + silence(1.0)
    with connect(server, dialect) as conn:
        assert conn.recv().type == "session.created"
        limit = {"max_response_output_tokens": SHORT} if dialect == "beta" else \
            {"type": "realtime", "max_output_tokens": SHORT}
        conn.session.update(session=limit)
        updated = until(conn, "session.updated")[-1]
        assert (updated.session.max_response_output_tokens if dialect == "beta"
                else updated.session.max_output_tokens) == SHORT
        speak(conn, pcm)
        events = until(conn, "response.done")
    user_item = ["conversation.item.created"] if dialect == "beta" else ["conversation.item.added",
                                                                         "conversation.item.done"]
    answer_item = ["conversation.item.created"] if dialect == "beta" else ["conversation.item.added"]
    done_names = ["response.audio.done", "response.audio_transcript.done"]
    expected = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                "input_audio_buffer.committed", *user_item, "response.created", "response.output_item.added",
                *answer_item, "response.content_part.added",
                *[GA_RENAMES.get(n, n) if dialect == "ga" else n for n in done_names],
                "response.content_part.done", "response.output_item.done",
                *(["conversation.item.done"] if dialect == "ga" else []), "response.done"]
    assert names(events) == expected
    audio_delta = "response.audio.delta" if dialect == "beta" else "response.output_audio.delta"
    text_delta = "response.audio_transcript.delta" if dialect == "beta" else "response.output_audio_transcript.delta"
    first_delta = next(i for i, e in enumerate(events) if e.type.endswith(".delta"))
    assert events[first_delta - 1].type == "response.content_part.added"  # deltas come inside the part
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == audio_delta)
    text = "".join(e.delta for e in events if e.type == text_delta)
    started, stopped = events[0], events[1]
    done = events[-1].response
    assert done.status == "incomplete" and done.status_details.reason == "max_output_tokens"
    assert done.usage.output_tokens == SHORT and done.output[0].content[0].transcript == text
    chat_pcm, chat_text = chat_answer(server, heard(pcm, started.audio_start_ms, stopped.audio_end_ms), SHORT)
    assert audio == chat_pcm and text == chat_text


def test_barge_in_cancels_within_one_decode_step_and_answers_the_new_question(server):
    steps_count, steps_0 = metric(server, "omni_realtime_cancel_steps_count"), \
        metric(server, 'omni_realtime_cancel_steps_bucket{le="1.0"}')
    barge_ins = metric(server, "omni_realtime_barge_ins_total")
    with connect(server, "beta") as conn:
        until(conn, "session.created")
        conn.session.update(session={"max_response_output_tokens": LONG})
        speak(conn, question_pcm() + silence(1.0))
        first = until(conn, "response.audio.delta")
        first_id = first[-1].response_id
        conn.session.update(session={"max_response_output_tokens": SHORT})  # for the next answer
        speak(conn, question_pcm("output2.wav") + silence(1.0))  # spoken over the answer
        until(conn, "input_audio_buffer.speech_started")
        events = until(conn, "response.done")
        cancelled = events[-1].response
        assert cancelled.id == first_id and cancelled.status == "cancelled"
        assert cancelled.status_details.reason == "turn_detected"
        assert cancelled.output[0].status == "incomplete"
        events += until(conn, "response.created")
        assert "input_audio_buffer.speech_stopped" in names(events)  # the new question's turn ended
        done_at = next(i for i, e in enumerate(events) if e.type == "response.done")
        assert not any(e.type == "response.audio.delta" and e.response_id == first_id for e in events[done_at:])
        second = until(conn, "response.done")[-1].response
        assert second.id != first_id and second.status in ("completed", "incomplete")
    assert metric(server, "omni_realtime_cancel_steps_count") == steps_count + 1
    # the engine stopped at its next decode-step check: at most the step in progress ran past speech_started
    assert metric(server, 'omni_realtime_cancel_steps_bucket{le="1.0"}') == steps_0 + 1
    assert metric(server, "omni_realtime_barge_ins_total") == barge_ins + 1


def manual_turn(conn, pcm: bytes) -> list:
    conn.session.update(session={"turn_detection": None})
    assert until(conn, "session.updated")[-1].session.turn_detection is None
    speak(conn, pcm)
    conn.input_audio_buffer.commit()
    return until(conn, "conversation.item.created")


def test_manual_commit_then_response_create(server):
    pcm = question_pcm()
    with connect(server, "beta") as conn:
        until(conn, "session.created")
        events = manual_turn(conn, pcm)
        assert names(events)[-2:] == ["input_audio_buffer.committed", "conversation.item.created"]
        assert "input_audio_buffer.speech_started" not in names(events)  # no VAD
        conn.response.create(response={"max_response_output_tokens": SHORT})
        events = until(conn, "response.done")
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.audio.delta")
    assert events[-1].response.status == "incomplete"
    assert audio == chat_answer(server, heard(pcm), SHORT)[0]  # the whole buffer, as sent


def test_response_cancel(server):
    with connect(server, "ga") as conn:
        until(conn, "session.created")
        conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        until(conn, "session.updated")
        speak(conn, question_pcm())
        conn.input_audio_buffer.commit()
        conn.response.create(response={"max_output_tokens": LONG})
        until(conn, "response.output_audio.delta")
        conn.response.cancel()
        events = until(conn, "response.done")
        done = events[-1].response
        assert done.status == "cancelled" and done.status_details.reason == "client_cancelled"
        assert "response.output_audio.done" in names(events)
        conn.response.create(response={"max_output_tokens": 8})  # the session goes on
        assert until(conn, "response.done")[-1].response.status in ("completed", "incomplete")


@pytest.mark.parametrize("modalities, delta", [(["text"], "response.text.delta"),
                                               (["text", "audio"], "response.audio.delta")])
def test_text_message(server, modalities, delta):
    with connect(server, "beta") as conn:
        until(conn, "session.created")
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "What is your name?"}]})
        created = until(conn, "conversation.item.created")[-1]
        assert created.item.content[0].type == "input_text"
        conn.response.create(response={"modalities": modalities, "max_response_output_tokens": 24})
        events = until(conn, "response.done")
    assert any(e.type == delta for e in events)
    done = events[-1].response
    assert done.status in ("completed", "incomplete") and done.usage.input_token_details.text_tokens > 0
    if modalities == ["text"]:
        text = "".join(e.delta for e in events if e.type == "response.text.delta")
        assert done.output[0].content[0].text == text and "response.audio.delta" not in names(events)


def test_input_audio_transcription_uses_the_model(server, engine):
    pcm = question_pcm()
    with connect(server, "beta") as conn:
        until(conn, "session.created")
        conn.session.update(session={"input_audio_transcription": {"model": "whisper-1"}, "turn_detection": None})
        assert until(conn, "session.updated")[-1].session.input_audio_transcription is not None
        speak(conn, pcm)
        conn.input_audio_buffer.commit()
        item_id = until(conn, "conversation.item.created")[-1].item.id
        done = until(conn, "conversation.item.input_audio_transcription.completed")[-1]
    assert done.item_id == item_id
    assert done.transcript == engine.run(heard(pcm), sample_rate=MODEL_RATE, task="ASR",
                                         max_tokens=prompt_length(Task.ASR, heard(pcm), None) + 256).text.strip()


def test_two_sessions_at_once(server):
    results = {}

    def talk(name):
        with connect(server, "ga") as conn:
            until(conn, "session.created")
            conn.session.update(session={"type": "realtime", "max_output_tokens": SHORT})
            speak(conn, question_pcm(name) + silence(1.0))
            events = until(conn, "response.done")
            results[name] = (events[-1].response.status,
                             sum(len(e.delta) for e in events if e.type == "response.output_audio.delta"))

    threads = [threading.Thread(target=talk, args=(n,)) for n in ("output1.wav", "output3.wav")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {n: (status, size > 0) for n, (status, size) in results.items()} == \
        {"output1.wav": ("incomplete", True), "output3.wav": ("incomplete", True)}


BAD_EVENTS = [  # (frame, error code, words in the message)
    ("{not json", "invalid_json", "not valid JSON"),
    ("[1, 2]", "invalid_event", "JSON object"),
    (json.dumps({"type": "response.explode"}), "invalid_value", "response.explode"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "@@@"}), "invalid_base64", "base64"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": b64(b"\1\2\3")}), "invalid_value", "16-bit"),
    (json.dumps({"type": "input_audio_buffer.append"}), "missing_required_parameter", "audio"),
    (b"\0\1binary", "invalid_frame", "binary"),
    (json.dumps({"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}}),
     "unsupported_audio_format", "pcm16"),
    (json.dumps({"type": "session.update", "session": {"turn_detection": {"threshold": 7}}}), "invalid_value",
     "threshold"),
    (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty", "100 ms"),
    (json.dumps({"type": "response.cancel"}), "response_cancel_not_active", "no response"),
    (json.dumps({"type": "response.create"}), "no_user_message", "no user message"),
    (json.dumps({"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0, "audio_end_ms": 0}),
     "item_not_found", "nope"),
    (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/jpeg;base64,AAAA"}]}}), "image_input_not_supported",
     "cannot see"),
]


def test_bad_events_get_an_error_and_the_session_stays_open(server):
    url = f"ws://127.0.0.1:{server.port}/v1/realtime?model=mini-omni"
    with websockets_sync.connect(url, additional_headers={"OpenAI-Beta": "realtime=v1"}, max_size=None) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        for frame, code, words in BAD_EVENTS:
            ws.send(frame)
            event = json.loads(ws.recv())
            assert (event["type"], event["error"]["code"]) == ("error", code), frame
            assert words in event["error"]["message"], event
        ws.send(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
        assert json.loads(ws.recv())["type"] == "session.updated"
        too_much = b64(silence(31.0))  # beyond the 30 s the input buffer holds
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": too_much, "event_id": "evt_big"}))
        event = json.loads(ws.recv())
        assert event["error"]["code"] == "input_audio_buffer_full" and event["error"]["event_id"] == "evt_big"
        ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert json.loads(ws.recv())["type"] == "input_audio_buffer.cleared"


def test_disconnect_mid_response_frees_the_engine(server):
    cancels = metric(server, "omni_realtime_cancel_steps_count")
    stopped_at_once = metric(server, 'omni_realtime_cancel_steps_bucket{le="1.0"}')
    with connect(server, "beta") as conn:
        until(conn, "session.created")
        manual_turn(conn, question_pcm())
        conn.response.create(response={"max_response_output_tokens": LONG})
        until(conn, "response.audio.delta")
    with connect(server, "beta") as conn:  # the engine's FIFO: this answer runs once the other one stopped
        until(conn, "session.created")
        manual_turn(conn, question_pcm())
        conn.response.create(response={"max_response_output_tokens": 8})
        assert until(conn, "response.done")[-1].response.status in ("completed", "incomplete")
    assert metric(server, "omni_realtime_cancel_steps_count") == cancels + 1
    assert metric(server, 'omni_realtime_cancel_steps_bucket{le="1.0"}') == stopped_at_once + 1


def test_metrics_count_sessions_and_responses(server):
    with connect(server, "beta") as conn:
        until(conn, "session.created")
        assert metric(server, "omni_realtime_sessions") >= 1
    text = server.get("/metrics")[2].decode()
    for name in ("omni_realtime_responses_total{status=", "omni_realtime_first_audio_seconds_count",
                 "omni_realtime_barge_ins_total", "omni_realtime_cancel_steps_count"):
        assert name in text


@pytest.fixture(scope="module")
def guarded_server(tiny_ckpt, tmp_path_factory):
    srv = Server(tiny_ckpt, tmp_path_factory.mktemp("rt-guarded-tmp"), "--api-key", KEY, "--max-sessions", "1")
    yield srv
    srv.stop()


def refusal(excinfo) -> tuple[int, str]:
    response = excinfo.value.response
    return response.status_code, json.loads(response.body)["error"]


def test_api_key_and_session_limit(guarded_server):
    websockets_exceptions = pytest.importorskip("websockets.exceptions")
    with pytest.raises(websockets_exceptions.InvalidStatus) as wrong:
        with connect(guarded_server, "ga", key="wrong-key"):
            pass
    status, message = refusal(wrong)
    assert status == 401 and "API key" in message
    url = f"ws://127.0.0.1:{guarded_server.port}/v1/realtime?api_key={KEY}"  # how a browser passes it
    with websockets_sync.connect(url) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        with pytest.raises(websockets_exceptions.InvalidStatus) as full:
            with connect(guarded_server, "ga", key=KEY):
                pass
        status, message = refusal(full)
        assert status == 503 and "--max-sessions" in message
    with connect(guarded_server, "beta", key=KEY) as conn:  # the slot is free again
        assert conn.recv().type == "session.created"


def test_foreign_origin_is_refused(server):
    websockets_exceptions = pytest.importorskip("websockets.exceptions")
    with pytest.raises(websockets_exceptions.InvalidStatus) as refused:
        with connect(server, "ga", extra_headers={"Origin": "https://evil.example"}):
            pass
    status, message = refusal(refused)
    assert status == 403 and "origin" in message
    with connect(server, "ga", extra_headers={"Origin": f"http://127.0.0.1:{server.port}"}) as conn:
        assert conn.recv().type == "session.created"  # the project's own pages (loopback origins) may


@pytest.fixture(scope="module")
def vision_server(vision_ckpt, tmp_path_factory):
    srv = Server(vision_ckpt, tmp_path_factory.mktemp("rt-vision-tmp"))
    yield srv
    srv.stop()


def test_image_message_on_mini_omni2(vision_server):
    pcm, image = question_pcm(), IMAGE.read_bytes()
    with connect(vision_server, "ga") as conn:
        until(conn, "session.created")
        conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/jpeg;base64," + b64(image)},
            {"type": "input_audio", "audio": b64(pcm)}]})
        added = until(conn, "conversation.item.done")[-1]
        assert [c.type for c in added.item.content] == ["input_audio", "input_image"]
        conn.response.create(response={"max_output_tokens": SHORT})
        events = until(conn, "response.done")
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
    assert events[-1].response.status in ("completed", "incomplete") and audio
    assert audio == chat_answer(vision_server, heard(pcm), SHORT, image)[0]


def test_an_image_too_large_to_decode_fails_its_answer_and_the_session_goes_on(vision_server):
    """A PNG whose header claims 144 MP (its data is one pixel): refused from the header, after admission,
    as the answer's failure naming the bound; the session goes on, and once the client deletes that message
    (later turns are asked about the latest image) it answers again."""
    from tests.test_hostile import _png_claiming
    pcm = question_pcm()
    with connect(vision_server, "ga") as conn:
        until(conn, "session.created")
        conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64," + b64(_png_claiming(12_000, 12_000))},
            {"type": "input_audio", "audio": b64(pcm)}]})
        image_item = until(conn, "conversation.item.done")[-1].item.id
        conn.response.create(response={"max_output_tokens": SHORT})
        failed = until(conn, "response.done")[-1].response
        assert failed.status == "failed" and "MAX_DECODED_PIXELS" in failed.status_details.error.message
        conn.conversation.item.delete(item_id=image_item)
        until(conn, "conversation.item.deleted")
        conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_audio", "audio": b64(pcm)}]})
        until(conn, "conversation.item.done")
        conn.response.create(response={"max_output_tokens": SHORT})
        done = until(conn, "response.done")[-1].response
    assert done.status in ("completed", "incomplete")
