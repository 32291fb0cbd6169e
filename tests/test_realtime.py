"""The realtime loop's parts on their own: resampler, segmenter, turn machine, echo guard, camera, devices."""
from __future__ import annotations

import io
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from voice.camera import CameraFeed, fit_frame
from voice.echo import EchoConfig, EchoGuard
from voice.loop import VoiceLoop
from voice.signal import FRAME_SAMPLES, FRAME_SECONDS, MIC_RATE, Resampler, energy
from utils.voice_sim import FakeCamera
from voice.replay import FakeSink, VirtualClock
from voice.turns import Action, Event, State, TurnMachine
from voice.vad import Segmenter, SileroVad, SpeechEvent, VadConfig
from tests.conftest import ROOT


def frames(n: int, value: float = 0.0) -> list[np.ndarray]:
    return [np.full(FRAME_SAMPLES, value, np.float32) for _ in range(n)]


def feed(segmenter: Segmenter, probs: list[float], start: int = 0) -> list:
    events = []
    for i, p in enumerate(probs):
        seg = segmenter.push(np.full(FRAME_SAMPLES, start + i, np.float32), p, (start + i) * FRAME_SECONDS)
        if seg is not None:
            events.append(seg)
    return events


def test_resampler_streams_in_pieces_and_keeps_a_tone():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(24000).astype(np.float32)
    pieces = Resampler(24000, 16000)
    joined = np.concatenate([pieces(x[i:i + 700]) for i in range(0, len(x), 700)])
    np.testing.assert_allclose(joined, Resampler(24000, 16000)(x), atol=1e-6)
    tone = np.sin(2 * np.pi * 1000 * np.arange(24000) / 24000).astype(np.float32)
    out = Resampler(24000, 16000)(tone)[4000:12000]
    assert len(Resampler(24000, 16000)(tone)) == 16000
    assert abs(np.sqrt(2 * np.mean(out ** 2)) - 1.0) < 0.01


def test_segmenter_needs_start_ms_and_keeps_the_preroll():
    config = VadConfig()
    assert (config.start_frames, config.end_frames, config.preroll_frames) == (7, 13, 9)
    seg = Segmenter(config)
    short = [0.0] * 10 + [0.9] * (config.start_frames - 1) + [0.0] * 20  # 192 ms: a cough
    assert feed(seg, short) == [] and seg.dropped_runs == 1
    seg = Segmenter(config)
    probs = [0.0] * 20 + [0.9] * 15 + [0.0] * config.end_frames
    onset, end = feed(seg, probs)
    assert onset.event is SpeechEvent.ONSET and onset.time == pytest.approx((20 + 6) * FRAME_SECONDS)
    assert onset.speech_start == pytest.approx(20 * FRAME_SECONDS)
    assert onset.audio[0] == 20 - config.preroll_frames, "the pre-roll's first frame"
    assert end.event is SpeechEvent.END
    assert len(end.audio) == (config.preroll_frames + 15 + config.end_frames) * FRAME_SAMPLES


def test_segmenter_hysteresis_and_length_cap():
    seg = Segmenter(VadConfig(max_utterance_s=1.0))
    events = feed(seg, [0.9] * 7 + [0.4] * 40)  # 0.4 is above threshold - margin: still speech
    assert [e.event for e in events] == [SpeechEvent.ONSET, SpeechEvent.END]
    assert len(events[1].audio) == math.ceil(1.0 / FRAME_SECONDS) * FRAME_SAMPLES  # the first frame reaching 1 s


@pytest.mark.parametrize("kwargs", [{"threshold": 1.5}, {"start_ms": -1}, {"max_utterance_s": 0.5}])
def test_vad_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        VadConfig(**kwargs)


def test_turn_machine_barge_in_and_pending_question():
    m = TurnMachine()
    assert m.handle(Event.END_OF_SPEECH) == [] and m.state is State.LISTENING
    assert m.handle(Event.ONSET) == [Action.TAKE_FRAME] and m.state is State.USER_SPEAKING
    assert m.handle(Event.END_OF_SPEECH) == [Action.ASK] and m.state is State.THINKING
    assert m.handle(Event.FIRST_AUDIO) == [] and m.state is State.SPEAKING
    assert m.handle(Event.ONSET) == [Action.STOP_PLAYBACK, Action.CANCEL, Action.TAKE_FRAME]
    assert m.state is State.INTERRUPTED
    assert m.handle(Event.END_OF_SPEECH) == [] and m.handle(Event.STOPPED) == [Action.ASK]
    assert m.state is State.THINKING
    assert m.handle(Event.FINISHED) == [] and m.state is State.LISTENING


def test_turn_machine_stop_before_the_new_utterance_ends():
    m = TurnMachine()
    for event in (Event.ONSET, Event.END_OF_SPEECH, Event.ONSET):
        m.handle(event)
    assert m.handle(Event.STOPPED) == [] and m.state is State.USER_SPEAKING


def test_turn_machine_talking_on_while_the_old_answer_stops():
    m = TurnMachine()
    for event in (Event.ONSET, Event.END_OF_SPEECH, Event.ONSET, Event.END_OF_SPEECH):
        m.handle(event)
    assert m.handle(Event.ONSET) == [Action.TAKE_FRAME]  # already cancelled: no second cancel
    assert m.handle(Event.STOPPED) == [] and m.state is State.USER_SPEAKING  # the question is not complete yet
    assert m.handle(Event.END_OF_SPEECH) == [Action.ASK] and m.state is State.THINKING


def test_turn_machine_server_events():
    m = TurnMachine(barge_in=False)  # the Realtime client's interrupt_response: false
    assert m.handle(Event.ASKED) == [] and m.state is State.THINKING  # response.create, no spoken turn
    assert m.handle(Event.ONSET) == [Action.TAKE_FRAME] and m.state is State.INTERRUPTED  # the answer plays on
    assert m.handle(Event.END_OF_SPEECH) == [] and m.handle(Event.FINISHED) == [Action.ASK]
    assert m.handle(Event.STOPPED) == [] and m.state is State.LISTENING  # the client cancelled it
    assert m.handle(Event.ONSET) == [Action.TAKE_FRAME] and m.handle(Event.DROPPED) == []
    assert m.state is State.LISTENING  # the input buffer was cleared: no question
    m.handle(Event.ONSET)
    assert m.handle(Event.ASKED) == [] and m.state is State.INTERRUPTED  # an answer under the user's speech
    assert m.handle(Event.DROPPED) == [] and m.handle(Event.FINISHED) == [] and m.state is State.LISTENING


def test_echo_guard_removes_a_delayed_filtered_echo_and_passes_the_user():
    rng = np.random.default_rng(1)
    n = 30 * FRAME_SAMPLES
    played = rng.standard_normal(n).astype(np.float32) * 0.3
    delay = round(0.06 * MIC_RATE)
    echo = 0.5 * np.roll(played, delay) + 0.15 * np.roll(played, delay + 40)
    echo[:delay + 40] = 0
    user = np.zeros(n, np.float32)
    user[20 * FRAME_SAMPLES:] = rng.standard_normal(n - 20 * FRAME_SAMPLES) * 0.3
    guard = EchoGuard(EchoConfig())
    for k in range(30):
        span = slice(k * FRAME_SAMPLES, (k + 1) * FRAME_SAMPLES)
        check = guard.process((echo + user)[span].astype(np.float32), played[span])
        if 10 <= k < 20:
            assert check.residual_energy < 1e-4 * check.echo_energy and guard.gate(0.9, check) == 0.0
            assert check.delay_ms == pytest.approx(60.0)
        elif k >= 22:
            assert guard.gate(0.9, check) == 0.9
    quiet = EchoGuard(EchoConfig())
    frame = np.ones(FRAME_SAMPLES, np.float32)
    check = quiet.process(frame, np.zeros(FRAME_SAMPLES, np.float32))
    assert check.residual is frame and quiet.gate(0.7, check) == 0.7


def test_fit_frame_and_camera_feed():
    image = np.zeros((480, 640, 3), np.uint8)
    image[:, 80:560] = 200  # the centre square
    fitted = fit_frame(image)
    assert fitted.shape == (224, 224, 3) and (fitted[:, 2:-2] == 200).all()
    np.testing.assert_array_equal(fit_frame(fitted), fitted)  # already the model's input: unchanged
    with pytest.raises(ValueError, match="uint8"):
        fit_frame(np.zeros((4, 4), np.float32))
    feed_ = CameraFeed(FakeCamera(), interval_s=1.0)
    assert feed_.latest() is None
    for t in (0.0, 0.5, 0.99, 1.0, 1.5):
        feed_.tick(t)
    assert (feed_.latest().index, feed_.latest().time) == (1, 1.0)
    with pytest.raises(ValueError):
        CameraFeed(FakeCamera(), interval_s=0)


def test_fake_sink_flush_keeps_only_the_device_buffer():
    clock = VirtualClock()
    sink = FakeSink(clock, 24000)
    sink.write(np.zeros(24000, "<i2").tobytes(), turn=1)
    sink.advance(0.1)
    assert sink.buffered() == pytest.approx(0.9)
    assert sink.flush() == pytest.approx(0.02) and len(sink.take_played()) == 2400


def test_silero_hears_speech_not_silence(sample_wav):
    from utils.audio_io import read_wav
    speech, rate = read_wav(sample_wav)
    vad = SileroVad()
    probs = [vad(speech[i:i + FRAME_SAMPLES]) for i in range(0, len(speech) - FRAME_SAMPLES, FRAME_SAMPLES)]
    assert rate == MIC_RATE and max(probs) > 0.9
    vad.reset()
    assert vad(np.zeros(FRAME_SAMPLES, np.float32)) < 0.1
    with pytest.raises(ValueError, match="512"):
        vad(np.zeros(100, np.float32))


def test_loop_rejects_a_wrong_frame(engine):
    clock = VirtualClock()
    loop = VoiceLoop(engine, FakeSink(clock, engine.sample_rate), clock, vad=lambda f: 0.0, out=io.StringIO())
    with pytest.raises(ValueError, match="512"):
        loop.step(np.zeros(480, np.float32))
    loop.step(frames(1)[0])
    assert loop.state is State.LISTENING and energy(loop.reference) == 0.0


def test_devices_report_missing_hardware_clearly():
    devices = pytest.importorskip("voice.devices")
    try:
        listing = devices.list_devices()
    except devices.DeviceError as e:
        pytest.skip(f"device libraries not installed here: {e}")
    assert "audio devices" in listing and "cameras" in listing
    with pytest.raises(devices.DeviceError, match="--no-camera"):
        devices.OpenCvCamera(99)


def test_a_camera_is_opened_only_for_a_model_that_sees_and_is_optional():
    devices = pytest.importorskip("voice.devices")

    class Model:
        family = "mini-omni"
        can_see = False

    out = io.StringIO()
    assert devices.open_camera(99, Model(), 1.0, out) is None  # a v1 model: not even tried
    assert out.getvalue().count("cannot see") == 1
    Model.can_see, out = True, io.StringIO()
    assert devices.open_camera(99, Model(), 1.0, out) is None  # no camera 99 here: a notice, not an error
    assert out.getvalue().count("\n") == 1 and "could not be opened" in out.getvalue()
    assert devices.open_camera(None, Model(), 1.0, out) is None  # --no-camera


NULL_ALSA = "pcm.!default { type null }\nctl.!default { type hw card 0 }\n"  # ALSA devices that discard / give silence
DEVICE_SCRIPT = """
import sys, time
import numpy as np
from voice.devices import Microphone, Speaker
from voice.signal import FRAME_SAMPLES, float_to_pcm
speaker, mic = Speaker(24000), Microphone()
speaker.write(float_to_pcm(np.full(24000, 0.1, np.float32)), turn=1)
frame = mic.read()
for _ in range(500):  # the null device plays as fast as it is fed
    if speaker.buffered() == 0:
        break
    time.sleep(0.01)
played = speaker.take_played()
speaker.write(float_to_pcm(np.zeros(24000, np.float32)), turn=2)
stop_s = speaker.flush()
print(frame.shape == (FRAME_SAMPLES,), frame.dtype, speaker.buffered(), played.size >= 24000, stop_s > 0)
speaker.close()
mic.close()
"""


def test_speaker_and_microphone_open_on_alsa_null_devices(tmp_path):
    devices = pytest.importorskip("voice.devices")
    try:
        devices._sounddevice()
    except devices.DeviceError as e:
        pytest.skip(f"sounddevice or PortAudio not installed here: {e}")
    (tmp_path / ".asoundrc").write_text(NULL_ALSA)
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "float32", "0.0", "True", "True"]
