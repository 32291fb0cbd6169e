"""`POST /v1/chat/completions` with audio, over the engine's four question tasks.

The last message is the question (Mini-Omni's prompt holds one question, no history): its `input_audio`
part is heard (A1A2 with `modalities: ["text", "audio"]`, else A1T2; an `image_url` part goes with it on a
Mini-Omni2 checkpoint), or its text is read (T1A2 / T1T2). The earlier messages are not read; the
`X-Unread-Messages` header says how many there were. The answer comes as OpenAI's audio models send it:
`message.audio` (`data`, `transcript`, `id`, `expires_at`), or streamed chunks whose `delta.audio` carries
`data` (pcm16) and `transcript` pieces.
"""
from __future__ import annotations

import base64
import time
from collections.abc import Iterator

from flask import Blueprint, jsonify, request

from .audio_encode import encode_audio
from .openai_errors import OpenAIError
from .openai_requests import ChatRequest, parse_chat
from .openai_run import AnswerFailed, Running, disconnected_check, sse, start, streamed
from .service import EngineService

UNREAD_HEADER = "X-Unread-Messages"  # messages before the question, which the model does not read
ENCODINGS = {"pcm16": "pcm"}  # chat's name for a format -> the speech route's, where they differ


def add_chat_completions(routes: Blueprint, service: EngineService) -> None:
    @routes.post("/chat/completions")
    def chat_completions():
        service.check_ready()
        engine = service.engine
        try:
            req = parse_chat(request, engine.family, engine.can_see)
        except OpenAIError:
            service.reject("bad_request")
            raise
        running = start(service, req.question, disconnected_check())
        head = {"id": f"chatcmpl-{running.record.id}", "created": int(time.time()), "model": engine.family}
        headers = {UNREAD_HEADER: str(req.unread_messages)}
        if req.stream:
            return streamed((sse(event) for event in _chunks(req, running, head)), running, "text/event-stream",
                            headers)
        try:
            body = _completion(req, running, head)
        except AnswerFailed as e:
            raise OpenAIError(500, str(e), code="answer_failed") from e
        finally:
            running.turn.finish()
        response = jsonify(body)
        response.headers.update({"X-Request-Id": running.record.id, **headers})
        return response


def _audio_id(head: dict) -> str:
    return "audio_" + head["id"].removeprefix("chatcmpl-")


def _completion(req: ChatRequest, running: Running, head: dict) -> dict:
    chunks = list(running.chunks())
    text = "".join(c.text for c in chunks)
    message = {"role": "assistant", "content": text, "refusal": None}
    if req.audio_format is not None:
        fmt = ENCODINGS.get(req.audio_format, req.audio_format)
        data = b"".join(encode_audio(fmt, (c.pcm for c in chunks if c.pcm), whole=True))
        # Nothing is kept for later turns (they are not read), so the audio "expires" as it is sent.
        message.update(content=None, audio={"id": _audio_id(head), "data": base64.b64encode(data).decode(),
                                            "expires_at": head["created"], "transcript": text})
    return {**head, "object": "chat.completion", "usage": running.usage(),
            "choices": [{"index": 0, "message": message, "finish_reason": running.finish_reason(), "logprobs": None}]}


def _chunks(req: ChatRequest, running: Running, head: dict) -> Iterator[dict | str]:
    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    speaks = req.audio_format is not None
    audio_id = _audio_id(head)
    yield chunk({"role": "assistant", "content": None if speaks else ""})
    try:
        for piece in running.chunks():
            if not speaks:
                if piece.text:
                    yield chunk({"content": piece.text})
                continue
            audio = {"id": audio_id}
            if piece.pcm:
                audio["data"] = base64.b64encode(piece.pcm).decode()
            if piece.text:
                audio["transcript"] = piece.text
            if len(audio) > 1:
                yield chunk({"audio": audio})
    except AnswerFailed as e:
        yield {"error": {"message": str(e), "type": "server_error", "param": None, "code": "answer_failed"}}
        return
    if speaks:
        yield chunk({"audio": {"id": audio_id, "expires_at": head["created"]}})
    yield chunk({}, running.finish_reason())
    if req.include_usage:
        yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": running.usage()}
    yield "[DONE]"
