"""OpenAI's audio routes through the official `openai` SDK, against the real server process (tiny checkpoint)."""
import base64
import io
import json
import subprocess
import wave

import openai
import pytest

from tests.http_client import Server

TEXT = "hello there, how are you?"


@pytest.fixture(scope="module")
def server(stop_ckpt, tmp_path_factory):
    srv = Server(stop_ckpt, tmp_path_factory.mktemp("openai-tmp"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def sample_b64(sample_wav):
    return base64.b64encode(sample_wav.read_bytes()).decode()


@pytest.fixture(scope="module")
def spoken(stop_engine):
    return stop_engine.run(text=TEXT, task="T1A2")


def _samples(fmt: str, data: bytes) -> int:
    """Decoded length (24 kHz samples) of an encoded answer, by ffmpeg."""
    pcm = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", "pipe:0", "-f", "s16le", "-ar", "24000", "-ac", "1",
                          "pipe:1"], input=data, capture_output=True, check=True).stdout
    return len(pcm) // 2


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["mini-omni"] and models[0].owned_by == "gpt-omni"
    assert client.models.retrieve("mini-omni").id == "mini-omni"


def test_speech_pcm_and_wav_equal_the_engine(client, spoken):
    pcm = client.audio.speech.create(model="mini-omni", input=TEXT, voice="alloy", response_format="pcm")
    assert pcm.content == spoken.pcm and pcm.response.headers["X-Ignored-Parameters"] == "voice"
    wav = client.audio.speech.create(model="mini-omni", input=TEXT, voice="nova", response_format="wav")
    with wave.open(io.BytesIO(wav.content)) as w:
        assert w.getframerate() == 24000 and w.readframes(w.getnframes()) == spoken.pcm


def test_speech_streams_with_the_streaming_response(client, spoken):
    with client.audio.speech.with_streaming_response.create(model="mini-omni", input=TEXT, voice="alloy",
                                                            response_format="pcm") as response:
        pieces = list(response.iter_bytes(4096))
    assert len(pieces) > 1 and b"".join(pieces) == spoken.pcm


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac"])
def test_speech_compressed_formats_decode_to_the_answer_length(client, spoken, fmt):
    audio = client.audio.speech.create(model="mini-omni", input=TEXT, voice="alloy", response_format=fmt)
    expected = len(spoken.pcm) // 2
    assert abs(_samples(fmt, audio.content) - expected) < 0.05 * expected + 2048  # encoder padding


def test_speech_sse_events(client, spoken):
    with client.audio.speech.with_streaming_response.create(model="mini-omni", input=TEXT, voice="alloy",
                                                            response_format="pcm", stream_format="sse") as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"} and events[-1]["type"] == "speech.audio.done"
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == spoken.pcm
    assert events[-1]["usage"]["output_tokens"] == len(spoken.streams[7])


def test_transcription_formats(client, stop_engine, sample_wav):
    expected = stop_engine.run(sample_wav, task="ASR").text.strip()
    with sample_wav.open("rb") as f:
        assert client.audio.transcriptions.create(model="mini-omni", file=f).text == expected
    with sample_wav.open("rb") as f:
        verbose = client.audio.transcriptions.create(model="mini-omni", file=f, response_format="verbose_json")
    assert verbose.text == expected and verbose.duration > 1 and verbose.segments[0].end == verbose.duration
    for fmt, head in (("text", expected), ("srt", "1\n00:00:00,000 --> "), ("vtt", "WEBVTT\n\n00:00:00.000 --> ")):
        with sample_wav.open("rb") as f:
            assert client.audio.transcriptions.create(model="mini-omni", file=f, response_format=fmt).startswith(head)


def test_transcription_stream(client, stop_engine, sample_wav):
    expected = stop_engine.run(sample_wav, task="ASR").text
    with sample_wav.open("rb") as f:
        events = list(client.audio.transcriptions.create(model="mini-omni", file=f, stream=True))
    assert [e.type for e in events] == ["transcript.text.delta"] * (len(events) - 1) + ["transcript.text.done"]
    assert "".join(e.delta for e in events[:-1]) == expected and events[-1].text == expected.strip()


def _audio_message(sample_b64: str) -> list[dict]:
    return [{"role": "system", "content": "You are helpful."},
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": sample_b64, "format": "wav"}}]}]


def test_chat_audio_in_audio_out(client, stop_engine, sample_wav, sample_b64):
    full = stop_engine.run(sample_wav, task="A1A2")
    response = client.chat.completions.with_raw_response.create(
        model="mini-omni", modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"},
        messages=_audio_message(sample_b64))
    assert response.headers["X-Unread-Messages"] == "1"
    completion = response.parse()
    audio = completion.choices[0].message.audio
    assert base64.b64decode(audio.data) == full.pcm and audio.transcript == full.text
    assert completion.choices[0].message.content is None and completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == len(full.streams[7])


def test_chat_stream_audio_and_text(client, stop_engine, sample_wav, sample_b64):
    full = stop_engine.run(sample_wav, task="A1A2")
    stream = client.chat.completions.create(
        model="mini-omni", modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"},
        messages=_audio_message(sample_b64), stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    audio = [c.choices[0].delta.audio for c in chunks if c.choices and c.choices[0].delta.audio]
    assert b"".join(base64.b64decode(a.data) for a in audio if a.data) == full.pcm
    assert "".join(a.transcript or "" for a in audio) == full.text
    assert chunks[-1].usage.completion_tokens == len(full.streams[7])


def test_chat_text_questions_and_max_tokens(client, stop_engine):
    written = stop_engine.run(text=TEXT, task="T1T2")
    completion = client.chat.completions.create(model="mini-omni", messages=[{"role": "user", "content": TEXT}])
    assert completion.choices[0].message.content == written.text
    bounded = client.chat.completions.create(model="mini-omni", messages=[{"role": "user", "content": TEXT}],
                                             max_tokens=5)
    assert bounded.usage.completion_tokens <= 5 and bounded.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="mini-omni", stream=True,
                                                 messages=[{"role": "user", "content": TEXT}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == written.text


def _wav_b64(seconds: float, level: float) -> str:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        n = int(seconds * 16000)
        w.writeframes(b"".join(int(level * 8000 * ((i // 20) % 2 * 2 - 1)).to_bytes(2, "little", signed=True)
                               for i in range(n)))
    return base64.b64encode(out.getvalue()).decode()


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _heard(b64: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}


SPEAK = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
SPEECH_ERRORS = [
    ("unknown model", {"model": "tts-1"}, openai.NotFoundError, "model", "not served here"),
    ("unknown voice", {"voice": "robot"}, openai.BadRequestError, "voice", "unknown voice"),
    ("unknown format", {"response_format": "ogg"}, openai.BadRequestError, "response_format", "must be one of"),
    ("speed out of range", {"speed": 9.0}, openai.BadRequestError, "speed", "speed"),
    ("empty input", {"input": "  "}, openai.BadRequestError, "input", "empty"),
    ("input too long", {"input": "a" * 4097}, openai.BadRequestError, "input", "at most 4096"),
    ("unknown field", {"extra_body": {"volume": 11}}, openai.BadRequestError, "volume", "unrecognized"),
]


@pytest.mark.parametrize("name, change, error, param, message", SPEECH_ERRORS, ids=[e[0] for e in SPEECH_ERRORS])
def test_speech_errors(client, name, change, error, param, message):
    args = {"model": "mini-omni", "input": TEXT, "voice": "alloy", **change}
    with pytest.raises(error) as caught:
        client.audio.speech.create(**args)
    assert caught.value.param == param and message in caught.value.message
    assert caught.value.type == "invalid_request_error"


TRANSCRIPTION_ERRORS = [
    ("not audio", {"file": ("q.wav", b"hello, I am text")}, "file", "could not decode"),
    ("silent audio", {"file": ("q.wav", base64.b64decode(_wav_b64(1, 0)))}, "file", "silent"),
    ("over 30 s", {"file": ("q.wav", base64.b64decode(_wav_b64(31, 1)))}, "file", "30 s"),
    ("language", {"language": "de"}, "language", "English only"),
    ("streamed srt", {"stream": True, "response_format": "srt"}, "response_format", "cannot be streamed"),
    ("word timestamps", {"response_format": "verbose_json", "timestamp_granularities": ["word"]},
     "timestamp_granularities[]", "no timings"),
]


@pytest.mark.parametrize("name, change, param, message", TRANSCRIPTION_ERRORS, ids=[e[0] for e in TRANSCRIPTION_ERRORS])
def test_transcription_errors(client, sample_wav, name, change, param, message):
    args = {"model": "mini-omni", "file": ("q.wav", sample_wav.read_bytes()), **change}
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(**args)
    assert caught.value.param == param and message in caught.value.message


CHAT_ERRORS = [
    ("unknown model", {"model": "gpt-4o-audio-preview"}, "model", "not served here"),
    ("last message not the user's", {"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0]",
     "last message"),
    ("audio and text together", {"messages": _user(_heard("AAAA"), {"type": "text", "text": "and?"})},
     "messages[0].content", "not both"),
    ("bad base64", {"messages": _user(_heard("@@@"))}, "messages[0].content[0].input_audio.data", "base64"),
    ("not audio", {"messages": _user(_heard(base64.b64encode(b"hello, I am text").decode()))}, "messages[0].content",
     "could not decode"),
    ("image on a v1 model", {"messages": _user(_heard("AAAA"), {"type": "image_url", "image_url": {
        "url": "data:image/png;base64,AAAA"}})}, "messages[0].content", "cannot see"),
    ("image from a URL", {"messages": _user(_heard("AAAA"), {"type": "image_url", "image_url": {
        "url": "https://example.org/cat.png"}})}, "messages[0].content[1].image_url.url", "does not fetch"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ("two answers", {"n": 2}, "n", "'n' must be 1"),
    ("streamed mp3", {**SPEAK, "audio": {"voice": "alloy", "format": "mp3"}, "stream": True}, "audio.format",
     "pcm16"),
    ("audio modality without text", {"modalities": ["audio"], "audio": SPEAK["audio"]}, "modalities", "modalities"),
    ("audio output without settings", {"modalities": ["text", "audio"]}, "audio", "required"),
    ("unknown voice", {**SPEAK, "audio": {"voice": "robot", "format": "wav"}}, "voice", "unknown voice"),
    ("zero max_tokens", {"max_tokens": 0}, "max_tokens", "at least 1"),
]


@pytest.mark.parametrize("name, change, param, message", CHAT_ERRORS, ids=[e[0] for e in CHAT_ERRORS])
def test_chat_errors(client, name, change, param, message):
    args = {"model": "mini-omni", "messages": [{"role": "user", "content": TEXT}], **change}
    error = openai.NotFoundError if name == "unknown model" else openai.BadRequestError
    with pytest.raises(error) as caught:
        client.chat.completions.create(**args)
    assert caught.value.param == param and message in caught.value.message


def test_unknown_route_and_method_in_openais_shape(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.get("/audio/translations", cast_to=object)
    assert caught.value.type == "invalid_request_error" and "Not Found" in caught.value.message
    with pytest.raises(openai.APIStatusError) as caught:
        client.get("/audio/speech", cast_to=object)
    assert caught.value.status_code == 405 and caught.value.code == "method_not_allowed"


@pytest.fixture(scope="module")
def guarded(stop_ckpt, tmp_path_factory):
    srv = Server(stop_ckpt, tmp_path_factory.mktemp("openai-guarded"), "--api-key", "secret",
                 "--max-bytes", "100000")
    yield srv
    srv.stop()


def test_security_applies_with_openais_shape(guarded, sample_wav):
    base = f"http://127.0.0.1:{guarded.port}/v1"
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    assert caught.value.code == "invalid_api_key" and "API key" in caught.value.message
    with pytest.raises(openai.PermissionDeniedError) as caught:
        openai.OpenAI(base_url=base, api_key="secret", max_retries=0,
                      default_headers={"Origin": "https://evil.example"}).models.list()
    assert "origin" in caught.value.message
    client = openai.OpenAI(base_url=base, api_key="secret", max_retries=0)
    assert client.models.list().data[0].id == "mini-omni"
    with pytest.raises(openai.APIStatusError) as caught:  # the bridge's own refusal, before Flask runs
        client.audio.transcriptions.create(model="mini-omni", file=("q.wav", b"\0" * 200_000))
    assert caught.value.status_code == 413 and caught.value.code == "request_too_large"
    assert "100000" in caught.value.message and caught.value.type == "invalid_request_error"
