"""Turn an HTTP request into a validated `ChatRequest`, or an `ApiError` saying what was wrong."""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from flask import Request

FORMATS = ("pcm", "wav", "multipart", "sse", "ndjson")
ACCEPT_FORMATS = {  # media types a client may ask for instead of ?format=
    "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "multipart/x-mixed-replace": "multipart",
    "text/event-stream": "sse", "application/x-ndjson": "ndjson",
}
JSON_FIELDS = {"audio": str, "image": str, "stream_stride": int, "first_stride": int, "max_tokens": int}
NUMBER_FIELDS = ("stream_stride", "first_stride", "max_tokens")
WHITESPACE = re.compile(r"\s+")  # line breaks of MIME-style base64


class ApiError(Exception):
    """A client error: HTTP `status` with a JSON body `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class ChatRequest:
    audio: bytes  # the bytes of an audio file, any format ffmpeg reads
    image: bytes | None
    options: dict[str, int]  # stream_stride / max_tokens when given
    format: str


def _b64(value: str, field: str) -> bytes:
    """Standard base64, also wrapped in lines or behind a `data:...;base64,` prefix (a browser FileReader's)."""
    if value.startswith("data:"):
        header, sep, value = value.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, f"field '{field}' is a data URL without ';base64,'")
    try:
        return base64.b64decode(WHITESPACE.sub("", value), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"field '{field}' is not valid base64 ({e})") from e


def _from_json(req: Request) -> tuple[bytes, bytes | None, dict[str, int]]:
    try:
        body = json.loads(req.get_data(cache=False))
    except RecursionError as e:
        raise ApiError(400, "request body is JSON nested too deeply") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e})") from e
    if not isinstance(body, dict):
        raise ApiError(400, "JSON body must be an object like {\"audio\": \"<base64>\"}")
    unknown = sorted(set(body) - set(JSON_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}; accepted: {sorted(JSON_FIELDS)}")
    for field, kind in JSON_FIELDS.items():
        value = body.get(field)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ApiError(400, f"field '{field}' must be {kind.__name__}, got {type(value).__name__}")
    if body.get("audio") is None:
        raise ApiError(400, "field 'audio' (base64 of an audio file) is required")
    image = _b64(body["image"], "image") if body.get("image") is not None else None
    return _b64(body["audio"], "audio"), image, {k: body[k] for k in NUMBER_FIELDS if body.get(k) is not None}


def _numbers_from(values) -> dict[str, int]:
    out = {}
    for field in NUMBER_FIELDS:
        if field in values:
            try:
                out[field] = int(values[field])
            except ValueError as e:
                raise ApiError(400, f"'{field}' must be an integer, got {values[field]!r}") from e
    return out


def _from_form(req: Request) -> tuple[bytes, bytes | None, dict[str, int]]:
    upload = req.files.get("audio")
    if upload is None:
        raise ApiError(400, "multipart request needs a file part named 'audio'")
    image = req.files.get("image")
    return upload.read(), image.read() if image is not None else None, _numbers_from(req.form)


def choose_format(req: Request) -> str:
    fmt = req.args.get("format")
    if fmt is not None:
        if fmt not in FORMATS:
            raise ApiError(400, f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
        return fmt
    for media in req.accept_mimetypes.values():
        if media in ACCEPT_FORMATS:
            return ACCEPT_FORMATS[media]
    return "pcm"


def parse_chat(req: Request) -> ChatRequest:
    """JSON (the official body), multipart/form-data (`-F audio=@q.wav`) or a raw audio body."""
    fmt = choose_format(req)
    mime = req.mimetype
    if mime == "application/json":
        audio, image, options = _from_json(req)
    elif mime == "multipart/form-data":
        audio, image, options = _from_form(req)
    elif mime.startswith("audio/") or mime in ("application/octet-stream", "video/mp4", "video/webm", "video/ogg"):
        audio, image, options = req.get_data(cache=False), None, _numbers_from(req.args)
    else:
        raise ApiError(415, f"unsupported Content-Type {mime or '(none)'}: send application/json "
                            "({\"audio\": base64}), multipart/form-data (audio=@file) or an audio/* body")
    if not audio:
        raise ApiError(400, "the audio is empty")
    return ChatRequest(audio, image, options, fmt)
