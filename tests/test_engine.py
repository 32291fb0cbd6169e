import threading
import wave

import numpy as np
import pytest
import torch

from omni.audio import SAMPLE_RATE, feature_frames, load_audio
from omni.generate import to_streams
from omni.tokens import EOA, EOT, PAD_T, STOP_LAYER
from omni_engine import OmniEngine

BYTES_PER_FRAME = 2048 * 2  # 2048 int16 samples


def prompt_len(wav) -> int:
    return feature_frames(load_audio(wav).size) + 3


def test_generate_is_the_joined_stream(engine, sample_wav):
    chunks = list(engine.stream(sample_wav, max_tokens=150))
    pcm = engine.generate(sample_wav, max_tokens=150)
    assert pcm == b"".join(c.pcm for c in chunks) and len(pcm) > 0
    wave = engine.generate(sample_wav, max_tokens=150, return_numpy=True)
    assert wave.dtype == np.float32 and np.abs(wave).max() <= 1.0
    np.testing.assert_array_equal(wave, np.frombuffer(pcm, "<i2") / np.float32(32768))


@pytest.mark.parametrize("stride", [4, 2])
def test_chunks_follow_the_official_schedule_plus_the_tail(engine, sample_wav, stride):
    T = prompt_len(sample_wav)
    chunks = list(engine.stream(sample_wav, max_tokens=T + 30, stream_stride=stride, joins="official"))
    steps = [len(c.steps) for c in chunks]
    assert steps[0] == 1 + stride + 6  # the prefill token, then stride + 6 decode steps (10 at stride 4)
    assert all(n == stride for n in steps[1:-1])
    assert all(len(c.pcm) == stride * BYTES_PER_FRAME for c in chunks[:-1])
    total_steps = sum(steps)
    assert total_steps == 30  # prefill + (max_tokens - T - 1) decode steps
    assert len(b"".join(c.pcm for c in chunks)) == (total_steps - 7) * BYTES_PER_FRAME  # tail included


def test_first_stride_shortens_the_wait_for_audio_only(engine, sample_wav):
    T = prompt_len(sample_wav)
    official = engine.run(sample_wav, max_tokens=T + 30)
    early = list(engine.stream(sample_wav, max_tokens=T + 30, first_stride=1, joins="official"))
    assert len(early[0].steps) == 1 + 6 + 1 and len(early[0].pcm) == BYTES_PER_FRAME
    assert to_streams([s for c in early for s in c.steps]) == official.streams  # the same tokens


def test_cancel_stops_within_one_step_and_leaves_no_state(engine, tiny_ckpt, sample_wav):
    calls = []
    original = engine.model.forward
    engine.model.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    stop = threading.Event()
    got = []
    try:
        for chunk in engine.stream(sample_wav, max_tokens=300, cancel=stop):
            got.append(chunk)
            if len(got) == 2:
                stop.set()
                at_cancel = len(calls)
    finally:
        del engine.model.forward
    assert len(got) == 2 and len(calls) - at_cancel <= 1
    after = engine.run(sample_wav, max_tokens=120)
    fresh = OmniEngine(tiny_ckpt, device="cpu").run(sample_wav, max_tokens=120)
    assert after.streams == fresh.streams and after.pcm == fresh.pcm


def test_a_callable_cancel_and_an_abandoned_stream(engine, sample_wav):
    assert list(engine.stream(sample_wav, max_tokens=200, cancel=lambda: True)) == []
    abandoned = engine.stream(sample_wav, max_tokens=200)
    next(abandoned)
    abandoned.close()  # releases the engine
    done = []
    worker = threading.Thread(target=lambda: done.append(engine.run(sample_wav, max_tokens=80)))
    worker.start()
    worker.join(timeout=120)
    assert done, "the engine stayed locked after an abandoned stream"


def test_answers_repeat_regardless_of_earlier_requests(engine, sample_wav):
    first = engine.run(sample_wav, max_tokens=100)
    engine.run(text="What is your name?", task="T1A2", max_tokens=40)
    assert engine.run(sample_wav, max_tokens=100) == first


def test_a_sampled_answer_repeats_under_its_seed_and_leaves_torch_rng_alone(engine, sample_wav):
    sampled = {"top_k": None, "temperature": 1.0, "max_tokens": 100}
    state = torch.get_rng_state()
    first = engine.run(sample_wav, seed=3, **sampled)
    torch.manual_seed(123)  # other work in the process draws from the global RNG
    torch.rand(10)
    assert engine.run(sample_wav, seed=3, **sampled) == first
    assert engine.run(sample_wav, seed=4, **sampled).streams != first.streams
    torch.manual_seed(123)
    torch.rand(10)
    expected = torch.get_rng_state()
    torch.manual_seed(123)
    torch.rand(10)
    engine.run(sample_wav, seed=3, **sampled)
    assert torch.equal(torch.get_rng_state(), expected)
    torch.set_rng_state(state)


def test_a1t2_is_the_text_half_of_a1a2(stop_engine, sample_wav):
    speech = stop_engine.run(sample_wav)
    text_only = stop_engine.run(sample_wav, task="A1T2")
    eot = speech.streams[7].index(EOT)
    assert text_only.streams[7] == speech.streams[7][:eot]  # A1T2 stops on EOT and drops it
    assert text_only.text == speech.text


def test_stop_rules(stop_engine, sample_wav):
    T = prompt_len(sample_wav)
    result = stop_engine.run(sample_wav)
    text = result.streams[7]
    assert len(text) < 2048 - T  # ended by EOA, not by the length limit
    assert EOA not in result.streams[STOP_LAYER]  # the EOA step is never appended
    eot = text.index(EOT)
    assert text.count(EOT) == 1 and all(t == PAD_T for t in text[eot + 1:])  # forced pads after EOT
    assert all(len(s) == len(text) for s in result.streams)
    assert len(result.pcm) == (len(text) - 7) * BYTES_PER_FRAME


@pytest.mark.parametrize("task, kwargs", [
    ("A1T2", {}), ("ASR", {}), ("T1T2", {"text": "What is your name?"}),
])
def test_text_tasks_answer_in_text_only(engine, sample_wav, task, kwargs):
    audio = None if kwargs else sample_wav
    result = engine.run(audio, task=task, max_tokens=200, **kwargs)
    assert result.pcm == b"" and all(s == [] for s in result.streams[:7])
    assert len(result.streams[7]) > 1 and isinstance(result.text, str) and result.text


def test_text_to_speech(engine):
    result = engine.run(text="How are you feeling today?", task="t1a2", max_tokens=60)
    assert len(result.pcm) == (len(result.streams[7]) - 7) * BYTES_PER_FRAME > 0


def test_array_input_with_its_rate(engine, sample_wav):
    wave = load_audio(sample_wav)
    assert engine.run(wave, sample_rate=SAMPLE_RATE, max_tokens=90) == engine.run(sample_wav, max_tokens=90)


@pytest.mark.parametrize("call, error, match", [
    (lambda e, w: e.run(w, task="T1T2"), ValueError, "text question"),
    (lambda e, w: e.run(text="hi", task="A1A2"), ValueError, "audio question"),
    (lambda e, w: e.run(w, text="hi", task="A1A2"), ValueError, "audio question"),
    (lambda e, w: e.run(w, task="A3B4"), ValueError, "unknown task"),
    (lambda e, w: e.run(w, max_tokens=20), ValueError, "max_tokens"),
    (lambda e, w: e.run(w, max_tokens=5000), ValueError, "max_tokens"),
    (lambda e, w: e.run(w, top_p=2.0), ValueError, "top_p"),
    (lambda e, w: e.run(w, cancel="stop"), TypeError, "cancel"),
    (lambda e, w: e.run(w, volume=3), TypeError, "volume"),
    (lambda e, w: e.run(text="", task="T1T2"), ValueError, "empty"),
])
def test_bad_requests_are_refused(engine, sample_wav, call, error, match):
    with pytest.raises(error, match=match):
        call(engine, sample_wav)
    assert engine.run(sample_wav, max_tokens=80).pcm  # and the engine keeps working


def test_warmup_and_properties(engine):
    engine.warmup()
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    assert engine.family == "mini-omni" and engine.sample_rate == 24000


def test_bfloat16_runs(tiny_ckpt, sample_wav):
    result = OmniEngine(tiny_ckpt, device="cpu", dtype="bfloat16").run(sample_wav, max_tokens=90)
    assert result.pcm and all(len(s) == len(result.streams[7]) for s in result.streams)


@pytest.mark.requires_cuda
def test_cuda_follows_the_same_schedule(tiny_ckpt, sample_wav):
    with wave.open(str(sample_wav)) as w:  # read without ffmpeg, which GPU hosts may lack
        samples = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    kwargs = dict(sample_rate=SAMPLE_RATE, max_tokens=150)
    gpu = OmniEngine(tiny_ckpt, device="cuda").run(samples, **kwargs)
    cpu = OmniEngine(tiny_ckpt, device="cpu").run(samples, **kwargs)
    assert len(gpu.pcm) == len(cpu.pcm)
    assert gpu.streams[7][:20] == cpu.streams[7][:20]


def test_a_text_question_is_tokenized_once(engine, monkeypatch):
    """The server counts a text question's tokens before admitting it, then the engine reads it again: one
    tokenization between them (a long text takes a while, holding the GIL)."""
    calls = []
    tokenizer = engine.tokenizer

    class Counting:
        def encode(self, text):
            calls.append(text)
            return tokenizer.encode(text)

        def __getattr__(self, name):  # decoding the answer's text, as before
            return getattr(tokenizer, name)

    monkeypatch.setattr(engine, "tokenizer", Counting())
    question = "how many times is this question read? " * 3
    ids = engine.text_ids(question)
    list(engine.stream(text=question, task="T1T2", max_tokens=len(ids) + 40))
    assert calls == [question]
