"""OpenAI's audio routes over the engine's own tasks, on the server's port and under its access policy:

- `GET /v1/models`: the loaded model and what it can do;
- `POST /v1/audio/speech`: text to speech (T1A2), as a file or streamed (`stream_format` audio or sse);
- `POST /v1/audio/transcriptions`: the model's ASR task (json, text, verbose_json, srt, vtt; or SSE events);
- `POST /v1/chat/completions` with audio (serving/openai_chat.py).

Every request is admitted by `EngineService.admit()` like `/chat`; errors come in OpenAI's shape.
"""
from __future__ import annotations

import base64
import time
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, jsonify, request

from .audio_encode import MIMETYPES, encode_audio
from .openai_chat import add_chat_completions
from .openai_errors import OpenAIError, install
from .openai_requests import parse_speech, parse_transcription
from .openai_run import AnswerFailed, Running, disconnected_check, sse, start, streamed
from .service import EngineService

OWNER = "gpt-omni"
LANGUAGE = "english"
IGNORED_HEADER = "X-Ignored-Parameters"  # parameters accepted but not honoured (the model has one voice...)


def register(app: Flask, service: EngineService) -> None:
    """Add the `/v1/` HTTP routes to the server's Flask app."""
    install(app)
    routes = Blueprint("openai", __name__, url_prefix="/v1")
    _add_models(routes, service)
    _add_speech(routes, service)
    _add_transcriptions(routes, service)
    add_chat_completions(routes, service)
    app.register_blueprint(routes)


def _add_models(routes: Blueprint, service: EngineService) -> None:
    def card() -> dict:
        service.check_ready()
        engine = service.engine
        return {"id": engine.family, "object": "model", "created": int(engine.ckpt_dir.stat().st_mtime),
                "owned_by": OWNER, "capabilities": {"speech": True, "transcription": True, "chat_audio": True,
                                                    "vision": engine.can_see}}

    @routes.get("/models")
    def models():
        return jsonify(object="list", data=[card()])

    @routes.get("/models/<path:model>")
    def model(model: str):
        info = card()
        if model != info["id"]:
            raise OpenAIError(404, f"the model {model!r} is not served here; this server runs {info['id']!r}",
                              "model", "model_not_found")
        return jsonify(info)


def _add_speech(routes: Blueprint, service: EngineService) -> None:
    @routes.post("/audio/speech")
    def speech():
        service.check_ready()
        try:
            req = parse_speech(request, service.engine.family)
        except OpenAIError:
            service.reject("bad_request")
            raise
        running = start(service, req.question, disconnected_check())
        # A WAV goes out whole, its header with the true sizes (what a saved file needs); the others stream.
        audio = encode_audio(req.format, (c.pcm for c in running.chunks() if c.pcm), whole=req.format == "wav")
        headers = {IGNORED_HEADER: ",".join(req.ignored)}
        if req.sse:
            return streamed(_speech_events(audio, running), running, "text/event-stream", headers)
        return streamed(audio, running, MIMETYPES[req.format], headers)


def _speech_events(audio: Iterator[bytes], running: Running) -> Iterator[bytes]:
    try:
        for data in audio:
            yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
    except AnswerFailed as e:
        yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": "answer_failed"}})
        return
    usage = running.usage()
    yield sse({"type": "speech.audio.done", "usage": {"input_tokens": usage["prompt_tokens"],
                                                       "output_tokens": usage["completion_tokens"],
                                                       "total_tokens": usage["total_tokens"]}})


def _add_transcriptions(routes: Blueprint, service: EngineService) -> None:
    @routes.post("/audio/transcriptions")
    def transcriptions():
        service.check_ready()
        try:
            req = parse_transcription(request, service.engine.family)
        except OpenAIError:
            service.reject("bad_request")
            raise
        running = start(service, req.question, disconnected_check())
        if req.stream:
            return streamed(_transcript_events(running), running, "text/event-stream")
        try:
            text = "".join(c.text for c in running.chunks())
        except AnswerFailed as e:
            raise OpenAIError(500, str(e), code="answer_failed") from e
        finally:
            running.turn.finish()
        text = text.strip()
        return _transcript(req.format, text, running.record.input_seconds, service.engine.tokenizer.encode(text).ids)


def _transcript_events(running: Running) -> Iterator[bytes]:
    text = ""
    try:
        for chunk in running.chunks():
            if chunk.text:
                text += chunk.text
                yield sse({"type": "transcript.text.delta", "delta": chunk.text})
    except AnswerFailed as e:
        yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": "answer_failed"}})
        return
    usage = running.usage()
    yield sse({"type": "transcript.text.done", "text": text.strip(), "usage": {
        "type": "tokens", "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"], "input_token_details": {"audio_tokens": usage["prompt_tokens"]}}})


def _transcript(fmt: str, text: str, seconds: float, tokens: list[int]) -> Response:
    """One transcript in `fmt`. The ASR task gives no timings: one segment, one cue, for the whole clip."""
    if fmt == "json":
        return jsonify(text=text, usage={"type": "duration", "seconds": seconds})
    if fmt == "verbose_json":
        return jsonify(task="transcribe", language=LANGUAGE, duration=seconds, text=text,
                       segments=[{"id": 0, "seek": 0, "start": 0.0, "end": seconds, "text": text,
                                  "tokens": tokens}],
                       usage={"type": "duration", "seconds": seconds})
    if fmt == "text":
        return Response(text + "\n", mimetype="text/plain")
    if fmt == "srt":
        return Response(f"1\n{_stamp(0, ',')} --> {_stamp(seconds, ',')}\n{text}\n\n", mimetype="text/plain")
    return Response(f"WEBVTT\n\n{_stamp(0, '.')} --> {_stamp(seconds, '.')}\n{text}\n\n", mimetype="text/vtt")


def _stamp(seconds: float, mark: str) -> str:
    ms = round(seconds * 1000)
    return time.strftime("%H:%M:%S", time.gmtime(ms // 1000)) + f"{mark}{ms % 1000:03d}"
