"""The Realtime session as a plain object: events in, events out, with a fake engine runner and a fake VAD."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from omni_engine import OmniChunk
from serving.realtime.protocol import BETA, GA
from serving.realtime.jobs import JobChunk, JobEnd
from serving.realtime.session import RealtimeSession

RATE = 24000


class FakeRunner:
    def __init__(self) -> None:
        self.jobs = []

    def submit(self, job) -> None:
        self.jobs.append(job)


def loud_is_speech(frame: np.ndarray) -> float:
    return 0.9 if float(np.abs(frame).max()) > 0.05 else 0.0


def tone(seconds: float) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()


def quiet(seconds: float) -> bytes:
    return b"\0\0" * int(seconds * RATE)


def append(session: RealtimeSession, pcm: bytes) -> list[dict]:
    return session.handle({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


@pytest.fixture
def runner():
    return FakeRunner()


def make(runner, dialect=BETA) -> RealtimeSession:
    session = RealtimeSession(runner, dialect=dialect, vad=loud_is_speech)
    session.start()
    return session


def test_session_created_in_both_dialects(runner):
    beta = RealtimeSession(runner, dialect=BETA).start()[0]["session"]
    ga = RealtimeSession(runner, dialect=GA).start()[0]["session"]
    assert beta["input_audio_format"] == "pcm16" and beta["turn_detection"]["type"] == "server_vad"
    assert ga["type"] == "realtime" and ga["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert ga["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 500
    json.dumps([beta, ga])  # plain JSON


def test_vad_turn_asks_the_engine_and_streams_the_answer(runner):
    session = make(runner)
    events = append(session, quiet(0.5) + tone(1.0) + quiet(1.0))
    assert types(events)[:4] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                 "input_audio_buffer.committed", "conversation.item.created"]
    assert types(events)[4:] == ["response.created", "response.output_item.added", "conversation.item.created",
                                 "response.content_part.added"]
    start, stop = events[0]["audio_start_ms"], events[1]["audio_end_ms"]
    assert 100 <= start <= 500 and 1500 <= stop <= 2500  # pre-roll before the tone, silence after it
    job = runner.jobs[-1]
    assert job.task == "A1A2" and job.audio.size == (stop - start) * 16 and job.max_output_tokens is None
    out = session.on_job(JobChunk(job.key, OmniChunk(b"\1\0" * 480, "Hi")))
    assert types(out) == ["response.audio.delta", "response.audio_transcript.delta"]
    out = session.on_job(JobEnd(job.key, "completed", steps=12, prompt_tokens=40))
    assert types(out) == ["response.audio.done", "response.audio_transcript.done", "response.content_part.done",
                          "response.output_item.done", "response.done"]
    done = out[-1]["response"]
    assert done["status"] == "completed" and done["usage"]["output_tokens"] == 12
    assert done["output"][0]["content"] == [{"type": "audio", "transcript": "Hi"}]


def test_barge_in_cancels_and_answers_the_new_turn_once_the_old_one_stopped(runner):
    session = make(runner)
    append(session, tone(1.0) + quiet(1.0))
    first = runner.jobs[-1]
    events = append(session, tone(1.0) + quiet(1.0))
    assert types(events)[0] == "input_audio_buffer.speech_started" and first.cancel.is_set()
    assert first.cancel.reason == "turn_detected" and len(runner.jobs) == 1  # the new answer waits
    assert session.on_job(JobChunk(first.key, OmniChunk(b"\0\0", "late"))) == []  # nothing after the cancel
    out = session.on_job(JobEnd(first.key, "cancelled", steps=30, prompt_tokens=40))
    assert out[types(out).index("response.done")]["response"]["status"] == "cancelled"
    assert types(out)[-4:] == ["response.created", "response.output_item.added", "conversation.item.created",
                               "response.content_part.added"]
    assert len(runner.jobs) == 2 and not runner.jobs[1].cancel.is_set()


def test_without_interrupt_response_the_answer_plays_on_and_the_new_turn_follows(runner):
    session = make(runner)
    session.handle({"type": "session.update", "session": {"turn_detection": {"interrupt_response": False}}})
    append(session, tone(1.0) + quiet(1.0))
    first = runner.jobs[-1]
    events = append(session, tone(1.0) + quiet(1.0))
    assert "input_audio_buffer.speech_started" in types(events) and not first.cancel.is_set()
    assert len(runner.jobs) == 1  # the new turn waits for the floor
    out = session.on_job(JobEnd(first.key, "completed", steps=5, prompt_tokens=40))
    assert out[types(out).index("response.done")]["response"]["status"] == "completed"
    assert "response.created" in types(out) and len(runner.jobs) == 2


def test_without_create_response_a_turn_is_only_committed(runner):
    session = make(runner)
    session.handle({"type": "session.update", "session": {"turn_detection": {"create_response": False}}})
    events = append(session, tone(1.0) + quiet(1.0))
    assert types(events) == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                             "input_audio_buffer.committed", "conversation.item.created"] and runner.jobs == []
    session.handle({"type": "response.create"})
    assert runner.jobs[-1].task == "A1A2"


def test_cancel_flag_counts_steps_past_the_cancel():
    from serving.realtime.jobs import CancelFlag
    flag = CancelFlag()
    assert not flag() and not flag()  # two decode steps start
    flag.set("client_cancelled")
    assert flag() and flag.steps_after == 0 and flag.reason == "client_cancelled"


def test_manual_mode_text_and_modalities(runner):
    session = make(runner, GA)
    session.handle({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"],
                                                          "audio": {"input": {"turn_detection": None}}}})
    assert append(session, tone(1.0)) == []  # no VAD events
    assert types(session.handle({"type": "input_audio_buffer.commit"})) == [
        "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
    session.handle({"type": "response.create"})
    assert runner.jobs[-1].task == "A1T2"
    out = session.on_job(JobChunk(runner.jobs[-1].key, OmniChunk(b"", "Hello")))
    assert types(out) == ["response.output_text.delta"]
    session.on_job(JobEnd(runner.jobs[-1].key, "completed", steps=3, prompt_tokens=9))
    session.handle({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "What is your name?"}]}})
    session.handle({"type": "response.create", "response": {"output_modalities": ["audio"], "max_output_tokens": 7}})
    assert (runner.jobs[-1].task, runner.jobs[-1].text, runner.jobs[-1].max_output_tokens) == \
        ("T1A2", "What is your name?", 7)


@pytest.mark.parametrize("event, code", [
    ({"type": "session.update", "session": {"input_audio_format": "g711_alaw"}}, "unsupported_audio_format"),
    ({"type": "response.create", "response": {"modalities": ["video"]}}, "invalid_value"),
    ({"type": "response.create", "response": {"max_response_output_tokens": 0}}, "invalid_value"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "assistant", "content": []}},
     "invalid_value"),
])
def test_bad_events(runner, event, code):
    session = make(runner)
    out = session.handle({**event, "event_id": "evt_1"})
    assert types(out) == ["error"] and out[0]["error"]["code"] == code and out[0]["error"]["event_id"] == "evt_1"


MALFORMED = [  # (dialect, event, the field the error names)
    (BETA, {"type": "session.update", "session": {"modalities": [["audio"]]}}, "session.modalities"),
    (GA, {"type": "session.update", "session": {"output_modalities": [{"a": 1}]}}, "session.output_modalities"),
    (GA, {"type": "response.create", "response": {"output_modalities": [["audio"]]}}, "response.output_modalities"),
    (BETA, {"type": "response.create", "response": {"modalities": [{}]}}, "response.modalities"),
    (GA, {"type": "session.update", "session": {"audio": "pcm16"}}, "session.audio"),
    (GA, {"type": "session.update", "session": {"audio": {"input": 7}}}, "session.audio.input"),
    (GA, {"type": "session.update", "session": {"audio": {"output": [1]}}}, "session.audio.output"),
]


@pytest.mark.parametrize("dialect, event, param", MALFORMED)
def test_malformed_fields_get_an_error_naming_them(runner, dialect, event, param):
    session = make(runner, dialect)
    out = session.receive(json.dumps({**event, "event_id": "evt_7"}))
    assert types(out) == ["error"] and out[0]["error"]["param"] == param, out
    assert param in out[0]["error"]["message"] and out[0]["error"]["event_id"] == "evt_7"
    assert types(session.receive(json.dumps({"type": "session.update", "session": {}}))) == ["session.updated"]


def test_deep_nesting_and_nan_get_an_error(runner):
    session = make(runner)
    deep = '{"type": "session.update", "session": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert [e["error"]["code"] for e in session.receive(deep)] == ["invalid_json"]
    out = session.receive('{"type": "response.cancel", "event_id": NaN}')
    assert out[0]["error"]["code"] == "invalid_json" and "NaN" in out[0]["error"]["message"]
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize("event_id", [1.5, 7, {"a": 1}, ["x"], None, "e" * 513])
def test_only_a_short_string_event_id_is_echoed(runner, event_id):
    out = make(runner).handle({"type": "response.cancel", "event_id": event_id})
    assert out[0]["error"]["code"] == "response_cancel_not_active" and out[0]["error"]["event_id"] is None


def test_an_unexpected_exception_in_a_handler_is_an_error_and_the_session_goes_on(runner, monkeypatch):
    session = make(runner)

    def broken(event):
        raise AttributeError("'int' object has no attribute 'get'")
    monkeypatch.setitem(session._handlers, "conversation.item.retrieve", broken)
    out = session.handle({"type": "conversation.item.retrieve", "event_id": "evt_9"})
    assert out[0]["error"]["code"] == "invalid_event" and "AttributeError" in out[0]["error"]["message"]
    assert out[0]["error"]["event_id"] == "evt_9"
    assert types(session.handle({"type": "input_audio_buffer.clear"})) == ["input_audio_buffer.cleared"]


def test_error_messages_are_bounded(runner):
    out = make(runner).handle({"type": "x" * 100_000})
    assert len(out[0]["error"]["message"]) < 2000


@pytest.mark.parametrize("keep_older", [False, True])
def test_a_pending_turn_whose_question_was_deleted_is_not_answered(runner, keep_older):
    session = make(runner)
    append(session, tone(1.0) + quiet(1.0))
    first = runner.jobs[-1]
    events = append(session, tone(1.0) + quiet(1.0))  # barge-in; the new turn waits as pending
    assert first.cancel.is_set() and len(runner.jobs) == 1
    pending = next(e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed")
    users = [i.id for i in session.conversation.items.values() if i.role == "user"]
    # an older user message left in place must not be answered in the pending turn's stead
    for item_id in [pending] if keep_older else users:
        assert types(session.handle({"type": "conversation.item.delete", "item_id": item_id})) == \
            ["conversation.item.deleted"]
    out = session.on_job(JobEnd(first.key, "cancelled", steps=3, prompt_tokens=40))
    assert out[types(out).index("response.done")]["response"]["status"] == "cancelled"
    assert types(out)[-1] == "error" and out[-1]["error"]["code"] == "item_not_found", out[-1]
    assert pending in out[-1]["error"]["message"]
    assert len(runner.jobs) == 1 and session.responses.current is None  # nothing else answered
    append(session, tone(1.0) + quiet(1.0))  # the session goes on: the next turn is answered
    assert len(runner.jobs) == 2 and runner.jobs[-1].task == "A1A2"


def test_a_text_over_max_text_chars_is_refused_before_tokenizing(runner):
    from serving.realtime.conversation import MAX_TEXT_CHARS
    session = make(runner)
    parts = [{"type": "input_text", "text": "a" * (MAX_TEXT_CHARS // 2 + 1)}] * 2  # the message's total counts
    out = session.handle({"type": "conversation.item.create",
                          "item": {"type": "message", "role": "user", "content": parts}})
    assert out[0]["error"]["code"] == "text_too_long" and "MAX_TEXT_CHARS" in out[0]["error"]["message"]
    assert session.conversation.items == {} and runner.jobs == []
