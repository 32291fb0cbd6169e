"""Speculative turn ends: a spoken turn's answer starts at the first silence after speech, and is the same answer,
with the same events, as one started once the whole silence_duration_ms has passed.

First the session as a plain object (a fake runner and a fake VAD: which jobs start, which are dropped), then two
real servers, one with --no-speculative-turns, spoken to by the openai SDK with the same recorded audio.
"""
from __future__ import annotations

import base64

import numpy as np
import pytest

from omni_engine import OmniChunk
from serving.realtime.jobs import SPECULATION_DROPPED, JobChunk, JobEnd
from serving.realtime.session import RealtimeSession
from voice.signal import FRAME_SAMPLES
from voice.vad import Segmenter, VadConfig
from tests.http_client import Server
from tests.test_realtime_api import API_RATE, SHORT, connect, metric, question_pcm, silence, speak, until
from tests.test_realtime_session import FakeRunner, append, loud_is_speech, quiet, tone, types

PAUSE_S = 0.25  # a pause inside the question, shorter than the VAD's 500 ms of silence
SPOKEN_S = 1.1  # output3.wav's speech (its last 0.25 s are silence: with the pause they would end the turn)
CREATED = ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "conversation.item.created",
           "response.created", "response.output_item.added", "conversation.item.created",
           "response.content_part.added"]


def make(speculative: bool = True) -> tuple[RealtimeSession, FakeRunner]:
    runner = FakeRunner()
    session = RealtimeSession(runner, dialect="beta", vad=loud_is_speech, speculative=speculative)
    session.start()
    return session, runner


def test_the_answer_starts_at_the_first_silence_and_is_announced_when_the_turn_ends():
    session, runner = make()
    assert types(append(session, tone(1.0) + quiet(0.1))) == ["input_audio_buffer.speech_started"]
    (job,) = runner.jobs  # started at the first silent frame, unannounced
    assert session.on_job(JobChunk(job.key, OmniChunk(b"\1\0" * 480, "Hi"))) == []  # held
    events = append(session, quiet(1.0))
    assert types(events) == [*CREATED, "response.audio.delta", "response.audio_transcript.delta"]
    assert len(runner.jobs) == 1 and not job.cancel.is_set()
    assert events[3]["response"]["id"] == job.key == events[-1]["response_id"]
    question = session.conversation.items[events[1]["item_id"]]
    assert np.array_equal(question.audio, job.audio)  # the engine got exactly the committed audio
    out = session.on_job(JobEnd(job.key, "completed", steps=3, prompt_tokens=40))
    assert types(out)[-1] == "response.done" and out[-1]["response"]["status"] == "completed"


def test_without_speculation_the_same_audio_is_asked_once_the_silence_has_lasted():
    fast, fast_runner = make()
    slow, slow_runner = make(speculative=False)
    pcm = quiet(0.3) + tone(1.0) + quiet(0.1)
    append(fast, pcm)
    assert types(append(slow, pcm)) == ["input_audio_buffer.speech_started"] and slow_runner.jobs == []
    assert types(append(slow, quiet(1.0))) == types(append(fast, quiet(1.0))) == CREATED
    assert np.array_equal(slow_runner.jobs[0].audio, fast_runner.jobs[0].audio)


def test_speech_after_a_pause_drops_the_answer_without_a_word_to_the_client():
    session, runner = make()
    events = append(session, tone(1.0) + quiet(PAUSE_S))
    dropped = runner.jobs[0]
    events += append(session, tone(0.5))  # the speech goes on
    assert dropped.cancel.is_set() and dropped.cancel.reason == SPECULATION_DROPPED
    assert session.on_job(JobChunk(dropped.key, OmniChunk(b"\1\0" * 480, "no"))) == []
    assert session.on_job(JobEnd(dropped.key, "cancelled")) == []
    events += append(session, quiet(1.0))
    assert types(events) == ["input_audio_buffer.speech_started", *CREATED]
    used = runner.jobs[-1]
    assert len(runner.jobs) == 2 and not used.cancel.is_set() and dropped.key not in session.ctx.jobs
    assert np.array_equal(session.conversation.items[events[2]["item_id"]].audio, used.audio)


def test_the_segmenter_says_what_a_silence_would_commit_before_it_has_lasted():
    config = VadConfig()
    seg = Segmenter(config)
    events = [seg.push(np.full(FRAME_SAMPLES, i, np.float32), p, 0.0) for i, p in enumerate([0.9] * 10 + [0.0] * 3)]
    assert [e.event.value for e in events if e is not None] == ["onset"]
    assert np.array_equal(seg.spoken(), np.repeat(np.arange(11, dtype=np.float32), FRAME_SAMPLES))
    seg.push(np.zeros(FRAME_SAMPLES, np.float32), 0.9, 0.0)  # speech again: no pause now
    assert seg.spoken() is None
    end = [seg.push(np.zeros(FRAME_SAMPLES, np.float32), 0.0, 0.0) for _ in range(config.end_frames)][-1]
    assert end.spoken_samples == (10 + 3 + 1 + 1) * FRAME_SAMPLES  # up to the last silence's first frame
    assert len(end.audio) == end.spoken_samples + (config.end_frames - 1) * FRAME_SAMPLES


def test_speech_over_a_speculative_answer_still_cancels_it():
    session, runner = make()
    append(session, tone(1.0) + quiet(1.0))
    (answer,) = runner.jobs
    session.on_job(JobChunk(answer.key, OmniChunk(b"\1\0" * 480, "Hi")))
    assert types(append(session, tone(0.5)))[0] == "input_audio_buffer.speech_started"
    assert answer.cancel.reason == "turn_detected"
    out = session.on_job(JobEnd(answer.key, "cancelled", steps=4, prompt_tokens=40))
    assert out[-1]["type"] == "response.done" and out[-1]["response"]["status"] == "cancelled"


def test_a_client_response_create_or_clear_drops_the_speculation():
    session, runner = make()
    append(session, tone(1.0) + quiet(0.1))
    session.handle({"type": "input_audio_buffer.clear"})
    assert runner.jobs[0].cancel.reason == SPECULATION_DROPPED
    session.handle({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "Hello?"}]}})
    append(session, tone(1.0) + quiet(0.1))
    session.handle({"type": "response.create"})
    assert runner.jobs[1].cancel.reason == SPECULATION_DROPPED and runner.jobs[2].task == "T1A2"


# -- real servers ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tiny_ckpt, tmp_path_factory):
    """(speculative, not speculative): the same checkpoint, exact mode."""
    on = Server(tiny_ckpt, tmp_path_factory.mktemp("spec-on-tmp"))
    off = Server(tiny_ckpt, tmp_path_factory.mktemp("spec-off-tmp"), "--no-speculative-turns")
    yield on, off
    on.stop()
    off.stop()


def spoken_answer(server: Server, pcm: bytes) -> tuple[list, bytes, str]:
    """A spoken turn's events up to its response.done, its audio and its transcript."""
    with connect(server, "beta") as conn:
        until(conn, "session.created")
        conn.session.update(session={"max_response_output_tokens": SHORT})
        until(conn, "session.updated")
        speak(conn, pcm)
        events = until(conn, "response.done")
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.audio.delta")
    text = "".join(e.delta for e in events if e.type == "response.audio_transcript.delta")
    return events, audio, text


def speculative_turns(server: Server) -> tuple[float, float]:
    return (metric(server, 'omni_speculative_turns_total{outcome="used"}'),
            metric(server, 'omni_speculative_turns_total{outcome="dropped"}'))


def test_health_says_whether_turns_are_speculative(servers):
    on, off = servers
    assert on.get_json("/health")["speculative_turns"] is True
    assert off.get_json("/health")["speculative_turns"] is False


def test_a_speculative_turn_gives_the_answer_of_a_patient_one(servers):
    on, off = servers
    pcm = question_pcm() + silence(1.0)
    used = speculative_turns(on)[0]
    events, audio, text = spoken_answer(on, pcm)
    assert speculative_turns(on)[0] == used + 1 and speculative_turns(off) == (0, 0)
    slow_events, slow_audio, slow_text = spoken_answer(off, pcm)
    names = [e.type for e in events if not e.type.endswith(".delta")]
    assert names == [e.type for e in slow_events if not e.type.endswith(".delta")]
    assert audio and audio == slow_audio and text == slow_text
    assert events[1].audio_end_ms == slow_events[1].audio_end_ms  # the same audio committed


def test_a_pause_shorter_than_the_silence_gives_one_answer_to_the_whole_question(servers):
    on, off = servers
    first = question_pcm("output3.wav")[:int(SPOKEN_S * API_RATE) * 2]
    pcm = first + silence(PAUSE_S) + question_pcm("output2.wav") + silence(1.0)
    (used, dropped), cancelled = speculative_turns(on), metric(on, 'omni_requests_total{outcome="cancelled"}')
    events, audio, text = spoken_answer(on, pcm)
    now_used, now_dropped = speculative_turns(on)
    assert now_used == used + 1 and now_dropped >= dropped + 1  # at least the pause's answer was dropped
    # every dropped answer's engine job ended cancelled and gave its place back, before the turn's answer ran
    assert metric(on, 'omni_requests_total{outcome="cancelled"}') == cancelled + now_dropped - dropped
    health = on.get_json("/health")
    assert (health["running"], health["queue_depth"]) == (0, 0)
    kinds = [e.type for e in events]
    assert kinds.count("input_audio_buffer.speech_started") == kinds.count("response.created") == 1
    response_id = next(e.response.id for e in events if e.type == "response.created")
    assert {e.response_id for e in events if hasattr(e, "response_id")} == {response_id}  # nothing stray
    _, slow_audio, slow_text = spoken_answer(off, pcm)
    assert audio and audio == slow_audio and text == slow_text
