"""The hands-free page's protocol client: `Conversation` fed event dicts (no socket), `RealtimeConnection`
against a scripted WebSocket server on loopback, and the relay's audio conversion."""
import base64
import json
import threading

import numpy as np
import pytest

from serving.realtime.wire import API_RATE
from webui.realtime_client import Conversation, RealtimeConnection, realtime_url, session_update


class FakePlayback:
    def __init__(self):
        self.pushed = bytearray()
        self.clears = 0

    def push(self, pcm: bytes) -> None:
        self.pushed += pcm

    def clear(self) -> None:
        self.clears += 1


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _delta(response_id: str, seconds: float) -> dict:
    pcm = np.full(int(seconds * API_RATE), 1000, dtype="<i2").tobytes()
    return {"type": "response.audio.delta", "response_id": response_id, "delta": base64.b64encode(pcm).decode()}


def _answer_start(response_id: str, item_id: str) -> list[dict]:
    return [{"type": "response.created", "response": {"id": response_id}},
            {"type": "response.output_item.added", "response_id": response_id, "item": {"id": item_id}}]


@pytest.fixture
def talk():
    playback, sent, clock = FakePlayback(), [], Clock()
    conversation = Conversation(playback, sent.append, take_frame=None, clock=clock)
    conversation.handle({"type": "session.created", "session": {}})
    return conversation, playback, sent, clock


def test_a_turn_from_speech_to_answer(talk):
    conversation, playback, sent, clock = talk
    assert conversation.view().state == "listening"
    conversation.handle({"type": "input_audio_buffer.speech_started", "audio_start_ms": 500})
    assert conversation.view().state == "hearing you"
    clock.t += 2
    conversation.handle({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 2300})
    assert conversation.view().state == "thinking"
    for event in _answer_start("r1", "i1"):
        conversation.handle(event)
    clock.t += 0.4
    conversation.handle(_delta("r1", 0.5))
    conversation.handle({"type": "response.audio_transcript.delta", "response_id": "r1", "delta": "Hello"})
    conversation.handle({"type": "response.output_audio_transcript.delta", "response_id": "r1", "delta": " there"})
    view = conversation.view()
    assert view.state == "speaking" and len(playback.pushed) == 0.5 * API_RATE * 2
    turn = view.turns[0]
    assert turn.question_s == pytest.approx(1.8) and turn.answer_text == "Hello there"
    assert turn.first_audio_ms == pytest.approx(400)
    conversation.handle({"type": "response.done", "response": {"id": "r1", "status": "completed"}})
    assert conversation.view().turns[0].status == "done"
    assert conversation.view().state == "speaking"  # the pushed half second is still playing
    clock.t += 0.6
    assert conversation.view().state == "listening"
    assert sent == []  # nothing to tell the server


def test_speaking_over_an_answer_silences_it_and_drops_its_tail(talk):
    conversation, playback, sent, clock = talk
    conversation.handle({"type": "input_audio_buffer.speech_started"})
    conversation.handle({"type": "input_audio_buffer.speech_stopped"})
    for event in _answer_start("r1", "i1"):
        conversation.handle(event)
    conversation.handle(_delta("r1", 3.0))
    clock.t += 1.0  # one of the three seconds has played
    conversation.handle({"type": "input_audio_buffer.speech_started"})
    assert playback.clears == 1
    assert sent == [{"type": "conversation.item.truncate", "item_id": "i1", "content_index": 0,
                     "audio_end_ms": 1000}]
    before = len(playback.pushed)
    conversation.handle(_delta("r1", 0.5))  # in flight when the server cancelled
    conversation.handle({"type": "response.audio_transcript.delta", "response_id": "r1", "delta": "late"})
    conversation.handle({"type": "response.done", "response": {"id": "r1", "status": "cancelled"}})
    assert len(playback.pushed) == before
    view = conversation.view()
    assert [t.status for t in view.turns] == ["interrupted", "hearing you"] and view.state == "hearing you"
    assert "late" not in view.turns[0].answer_text
    conversation.handle({"type": "input_audio_buffer.speech_stopped"})
    for event in _answer_start("r2", "i2"):
        conversation.handle(event)
    conversation.handle(_delta("r2", 0.2))
    assert len(playback.pushed) > before and conversation.view().turns[1].status == "speaking"


def test_the_camera_frame_goes_at_speech_start():
    sent = []
    conversation = Conversation(FakePlayback(), sent.append, take_frame=lambda: b"\xff\xd8jpeg")
    conversation.handle({"type": "input_audio_buffer.speech_started"})
    (event,) = sent
    assert event["type"] == "conversation.item.create"
    (part,) = event["item"]["content"]
    assert part["type"] == "input_image" and part["image_url"].startswith("data:image/jpeg;base64,")
    assert not conversation.view().turns[0].image  # not until the server has it
    conversation.handle({"type": "conversation.item.created", "item": {"content": [{"type": "input_image"}]}})
    assert conversation.view().turns[0].image


def test_errors_and_failures_are_shown(talk):
    conversation, *_ = talk
    conversation.handle({"type": "error", "error": {"message": "bad thing"}})
    assert conversation.view().error == "bad thing"
    conversation.handle({"type": "input_audio_buffer.speech_started"})
    conversation.handle({"type": "response.created", "response": {"id": "r"}})
    conversation.handle({"type": "response.done", "response": {
        "id": "r", "status": "failed", "status_details": {"error": {"message": "engine died"}}}})
    assert conversation.view().turns[0].status == "failed" and conversation.view().turns[0].error == "engine died"
    conversation.closed("gone")
    assert conversation.view().state == "closed" and conversation.view().error == "gone"


def test_urls_and_session():
    assert realtime_url("http://127.0.0.1:60808/") == "ws://127.0.0.1:60808/v1/realtime"
    assert realtime_url("https://h") == "wss://h/v1/realtime"
    with pytest.raises(ValueError, match="http"):
        realtime_url("ftp://h")
    session = session_update(max_tokens=99, silence_ms=300)["session"]
    assert session["input_audio_format"] == session["output_audio_format"] == "pcm16"
    assert session["turn_detection"]["silence_duration_ms"] == 300 and session["max_response_output_tokens"] == 99


# ---- transport --------------------------------------------------------------------------------------------

@pytest.fixture
def fake_server():
    """A WebSocket server on loopback: records the handshake headers and events, answers with a script."""
    from websockets.sync.server import serve

    seen = {"headers": None, "events": []}

    def handler(ws):
        seen["headers"] = ws.request.headers
        ws.send(json.dumps({"type": "session.created", "session": {}}))
        for message in ws:
            event = json.loads(message)
            seen["events"].append(event)
            if event["type"] == "input_audio_buffer.append":
                ws.send(json.dumps({"type": "input_audio_buffer.speech_started"}))

    with serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}/v1/realtime", seen
        server.shutdown()


def test_connection_sends_and_receives(fake_server):
    url, seen = fake_server
    received, closed = [], threading.Event()
    speech = threading.Event()

    def on_event(event):
        received.append(event)
        if event["type"] == "input_audio_buffer.speech_started":
            speech.set()

    connection = RealtimeConnection(url, on_event, lambda reason: closed.set())
    connection.send(session_update())
    connection.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0\0").decode()})
    assert speech.wait(10)
    connection.close()
    assert closed.wait(10)
    assert seen["headers"]["OpenAI-Beta"] == "realtime=v1"
    assert [e["type"] for e in seen["events"]] == ["session.update", "input_audio_buffer.append"]
    assert received[0]["type"] == "session.created"


def test_connection_says_why_it_could_not_open():
    from tests.http_client import free_port

    reasons = []
    done = threading.Event()
    RealtimeConnection(f"ws://127.0.0.1:{free_port()}/v1/realtime", lambda e: None,
                       lambda reason: (reasons.append(reason), done.set()))
    assert done.wait(10)
    assert "Cannot reach" in reasons[0]


def test_relay_resamples_the_microphone_to_24khz_mono():
    av = pytest.importorskip("av")
    from webui.live import Relay

    sent = []
    relay = Relay("ws://unused", session_update(), camera=False)
    relay._connection = type("C", (), {"send": staticmethod(sent.append)})()
    relay._resampler = av.AudioResampler(format="s16", layout="mono", rate=API_RATE)
    t = np.arange(960 * 10) / 48000
    tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
    for i in range(10):  # 200 ms of 48 kHz stereo in 20 ms frames, as Chromium sends them
        frame = av.AudioFrame.from_ndarray(np.repeat(tone[i * 960:(i + 1) * 960], 2)[None, :], format="s16",
                                           layout="stereo")
        frame.sample_rate = 48000
        relay.on_audio(frame)
    pcm = b"".join(base64.b64decode(e["audio"]) for e in sent)
    samples = np.frombuffer(pcm, dtype="<i2")
    assert abs(samples.size - 0.2 * API_RATE) <= 64  # the resampler holds back a few samples
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * API_RATE / samples.size - 440) < 10
