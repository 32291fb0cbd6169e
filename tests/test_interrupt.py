"""Barge-in, echo and camera behaviour of the realtime loop: conversations from espeak-ng recordings through
the real loop, Silero VAD and the tiny engine, on a virtual clock (see utils/voice_scenarios.py)."""
from __future__ import annotations

import numpy as np
import pytest

from utils import voice_scenarios as s
from voice.camera import fit_frame
from utils.voice_sim import SpokenAnswerEngine
from voice.turns import State


@pytest.fixture(scope="module")
def spoken() -> SpokenAnswerEngine:
    return s.spoken_answer_engine()


@pytest.fixture(scope="module")
def barged(engine):
    return s.barge_in(engine)


def test_barge_in_stops_playback_within_100_ms(barged):
    first, second = barged.turns
    assert barged.loop.barge_ins == 1 and first.interrupted_at == second.onset
    assert barged.sink.flushes == [second.onset], "the output is flushed in the frame that confirms the onset"
    assert first.first_audio < second.onset, "the second question must arrive while the first answer plays"
    assert s.stop_latency_ms(barged) <= s.STOP_LIMIT_MS
    assert first.stop_latency_ms <= s.STOP_LIMIT_MS
    assert s.played_after(barged, 1, second.onset + s.STOP_LIMIT_MS / 1000) == 0


def test_second_question_is_answered_with_its_first_syllable(barged):
    first, second = barged.turns
    assert [len(c["audio"]) for c in barged.engine.calls] == [len(first.question), len(second.question)]
    assert barged.engine.calls[1]["audio"] is second.question
    preroll_ms, snr_db = s.syllable_snr_db(barged, 2, s.sample(s.QUESTION_2), s.BARGE_IN_S)
    assert preroll_ms > 0, "the question sent must start before its voice does"
    assert snr_db > 10.0, f"the first {s.SYLLABLE_S * 1000:.0f} ms of voice reached the engine at {snr_db:.1f} dB SNR"
    assert second.audio_seconds > 0 and barged.sink.audio_of(2).size > 0
    assert barged.loop.state is State.LISTENING


@pytest.mark.parametrize("level_db", s.ECHO_LEVELS_DB)
def test_echo_of_the_answer_triggers_no_barge_in(engine, spoken, level_db):
    runs = [s.echo_only(engine, level_db)] + [s.echo_only(spoken, level_db, delay_s=d) for d in s.ECHO_DELAYS_S]
    for run in runs:
        assert run.settled and run.loop.barge_ins == 0 and len(run.turns) == 1, run.log
        assert run.turns[0].audio_seconds > 4.0, "the answer must have played for the echo to matter"


def test_without_the_guard_a_spoken_echo_interrupts_itself(spoken):
    run = s.echo_only(spoken, s.ECHO_LEVELS_DB[0], guard=False, drain_s=s.GUARD_OFF_DRAIN_S)
    assert run.loop.barge_ins > 0 and not run.settled


def test_spoken_barge_in_over_its_echo(spoken):
    run = s.barge_in(spoken)
    assert run.loop.barge_ins == 1 and s.stop_latency_ms(run) <= s.STOP_LIMIT_MS
    assert s.syllable_snr_db(run, 2, s.sample(s.QUESTION_2), s.BARGE_IN_S)[1] > 10.0


def test_cough_and_click_start_no_turn(engine):
    run = s.noises(engine)
    assert run.loop.barge_ins == 0 and len(run.turns) == 1, run.log
    assert run.turns[0].speech_start >= s.NOISY_QUESTION_S
    assert run.loop.segmenter.dropped_runs > 0, "Silero heard speech in the noises: the start threshold dropped it"


def test_camera_frame_reaches_the_engine_only_at_onset(engine):
    run = s.camera_turns(engine, sees=True)
    assert len(run.engine.calls) == len(run.turns) == 2
    for turn, call in zip(run.turns, run.engine.calls, strict=True):
        frame = turn.frame
        assert frame.time <= turn.onset < frame.time + s.CAMERA_INTERVAL_S, "the latest frame at onset"
        assert turn.end_of_speech - frame.time > s.CAMERA_INTERVAL_S, "not a frame from the end of speech"
        np.testing.assert_array_equal(call["image"], fit_frame(frame.image))
        assert call["image"].shape == (224, 224, 3) and call["image"][0, 0, 0] == frame.index % 256


def test_blind_engine_gets_no_image_and_one_notice(engine):
    run = s.camera_turns(engine, sees=False)
    assert all("image" not in call for call in run.engine.calls)
    assert run.log.count("cannot see") == 1


def test_camera_frame_reaches_a_seeing_engine(vision_engine):
    run = s.camera_turns(vision_engine, sees=False)
    assert vision_engine.can_see and len(run.engine.calls) == len(run.turns) == 2
    for turn, call in zip(run.turns, run.engine.calls, strict=True):
        np.testing.assert_array_equal(call["image"], fit_frame(turn.frame.image))
        assert turn.error is None and turn.audio_seconds > 0
    assert "cannot see" not in run.log
