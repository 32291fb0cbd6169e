"""Turn an HTTP request into a validated `ChatRequest`, or an `ApiError` saying what was wrong."""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from flask import Request

from omni import OmniEngine, Task, prompt_length

FORMATS = ("pcm", "wav", "wav-stream", "multipart", "sse", "ndjson")
ACCEPT_FORMATS = {  # media types a client may ask for instead of ?format=
    "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "multipart/x-mixed-replace": "multipart",
    "text/event-stream": "sse", "application/x-ndjson": "ndjson",
}
# max_tokens counts the prompt's positions too (the official meaning); max_new_tokens counts the answer's decode
# steps only (as the Realtime API's max_output_tokens does): a request gives one or neither.
NUMBER_FIELDS = ("stream_stride", "first_stride", "max_tokens", "max_new_tokens")
JSON_FIELDS = {"audio": str, "image": str, **{name: int for name in NUMBER_FIELDS}}
FILE_FIELDS = ("audio", "image")  # the parts of a multipart body that are files
QUERY_KEYS = ("format", "api_key", *NUMBER_FIELDS)  # api_key: read by the access check (security.py)
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
    unknown = sorted((set(req.form) - set(NUMBER_FIELDS)) | (set(req.files) - set(FILE_FIELDS)))
    if unknown:
        raise ApiError(400, f"unknown form field(s) {unknown}; accepted: files {list(FILE_FIELDS)}, fields "
                            f"{list(NUMBER_FIELDS)}")
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


def _query_options(req: Request) -> dict[str, int]:
    """The options in the query string, which any kind of body may take; an unknown key is an error."""
    unknown = sorted(set(req.args) - set(QUERY_KEYS))
    if unknown:
        raise ApiError(400, f"unknown query parameter(s) {unknown}; accepted: {list(QUERY_KEYS)}")
    return _numbers_from(req.args)


def _merge(body: dict[str, int], query: dict[str, int]) -> dict[str, int]:
    twice = sorted(set(body) & set(query))
    if twice:
        raise ApiError(400, f"{twice} given both in the query string and in the body: give each once")
    options = {**body, **query}
    if "max_tokens" in options and "max_new_tokens" in options:
        raise ApiError(400, "give max_tokens (prompt and answer) or max_new_tokens (the answer only), not both")
    return options


def engine_options(options: dict[str, int], engine: OmniEngine, samples, image: bool) -> dict[str, int]:
    """The request's options as the engine takes them: max_new_tokens becomes the max_tokens that leaves that
    many decode steps after this question's prompt (at most the model's limit)."""
    if "max_new_tokens" not in options:
        return options
    out = dict(options)
    steps = out.pop("max_new_tokens")
    if steps < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {steps}")
    limit = engine.config.block_size + 1
    out["max_tokens"] = min(limit, prompt_length(Task.A1A2, samples, None, image) + steps)
    return out


def parse_chat(req: Request) -> ChatRequest:
    """JSON (the official body), multipart/form-data (`-F audio=@q.wav`) or a raw audio body; the number
    options in the body or in the query string."""
    fmt = choose_format(req)
    query = _query_options(req)
    mime = req.mimetype
    if mime == "application/json":
        audio, image, options = _from_json(req)
    elif mime == "multipart/form-data":
        audio, image, options = _from_form(req)
    elif mime.startswith("audio/") or mime in ("application/octet-stream", "video/mp4", "video/webm", "video/ogg"):
        audio, image, options = req.get_data(cache=False), None, {}
    else:
        raise ApiError(415, f"unsupported Content-Type {mime or '(none)'}: send application/json "
                            "({\"audio\": base64}), multipart/form-data (audio=@file) or an audio/* body")
    if not audio:
        raise ApiError(400, "the audio is empty")
    return ChatRequest(audio, image, _merge(options, query), fmt)
