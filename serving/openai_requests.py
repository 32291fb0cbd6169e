"""The OpenAI audio routes' request bodies -> validated requests, or an `OpenAIError` naming the field.

What Mini-Omni cannot honour is refused by name rather than dropped in silence, except the few fields that
change nothing a client relies on (listed in `IGNORED_*`, and in docs/openai-api.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from flask import Request

from omni import Task
from .audio_encode import AUDIO_FORMATS
from .openai_errors import OpenAIError
from .parse import ApiError, _b64

# OpenAI's built-in voice names: every one is accepted, and all speak with the model's one voice.
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse", "marin",
          "cedar")
MAX_INPUT_CHARS = 4096  # /v1/audio/speech `input`, OpenAI's limit (the prompt must also fit the model's context)
SPEED_RANGE = (0.25, 4.0)
TRANSCRIPT_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
STREAMED_TRANSCRIPT_FORMATS = ("json", "text")
LANGUAGES = ("en", "english")  # Mini-Omni's ASR task hears English
TRANSCRIPTION_FIELDS = ("model", "response_format", "stream", "language", "prompt", "temperature",
                        "timestamp_granularities[]")
IGNORED_TRANSCRIPTION_FIELDS = ("prompt", "chunking_strategy")
CHAT_AUDIO_FORMATS = ("wav", "pcm16", "mp3", "opus", "aac", "flac")
STREAMED_CHAT_AUDIO_FORMATS = ("pcm16",)  # each chunk's audio on its own: raw samples
# Chat fields that change nothing the client relies on here; any other unsupported field is refused when set.
IGNORED_CHAT_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
                       "prompt_cache_key", "stream_options")
CHAT_FIELDS = ("model", "messages", "modalities", "audio", "stream", "max_tokens", "max_completion_tokens",
               "temperature", "top_p", "seed", "n")


@dataclass(frozen=True)
class Question:
    """One question for the engine: a task and its input, and the bounds and sampling the client chose."""

    task: Task
    audio: bytes | None = None  # an audio file's bytes
    text: str | None = None
    image: bytes | None = None
    max_new_tokens: int | None = None  # generated tokens at most (OpenAI's meaning of max_tokens)
    sampling: dict = field(default_factory=dict)  # GenerationConfig fields: temperature, top_k, top_p, seed
    param: str = "input"  # the request field that holds the question, named in errors about it


@dataclass(frozen=True)
class SpeechRequest:
    question: Question
    format: str
    sse: bool
    ignored: tuple[str, ...]  # given, accepted, not honoured (said in a response header)


@dataclass(frozen=True)
class TranscriptionRequest:
    question: Question
    format: str
    stream: bool


@dataclass(frozen=True)
class ChatRequest:
    question: Question
    audio_format: str | None  # None: a text answer
    stream: bool
    include_usage: bool
    unread_messages: int  # earlier messages the model does not read (it answers the last user message)


def json_body(req: Request) -> dict:
    if req.mimetype != "application/json":
        raise OpenAIError(415, f"unsupported Content-Type {req.mimetype or '(none)'}: send application/json")
    try:
        body = json.loads(req.get_data(cache=False))
    except RecursionError as e:
        raise OpenAIError(400, "request body is JSON nested too deeply") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise OpenAIError(400, f"request body is not valid JSON ({e})") from e
    if not isinstance(body, dict):
        raise OpenAIError(400, "the JSON body must be an object")
    return body


def typed(body: dict, name: str, kind: type | tuple[type, ...], default=None, required: bool = False):
    """`body[name]` if it has type `kind` (a bool is not a number here), else an error naming the field."""
    value = body.get(name)
    if value is None:
        if required:
            raise OpenAIError(400, f"'{name}' is required", name, "missing_required_parameter")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise OpenAIError(400, f"'{name}' must be {names}, got {type(value).__name__}", name, "invalid_type")
    return value


def check_model(given: str, served: str) -> None:
    if given != served:
        raise OpenAIError(404, f"the model {given!r} is not served here; this server runs {served!r}",
                          "model", "model_not_found")


def choice(value: str, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise OpenAIError(400, f"'{name}' must be one of {list(allowed)}, got {value!r}", name, "invalid_value")
    return value


def _voice(body: dict) -> str:
    voice = body.get("voice")
    if not isinstance(voice, str) or voice not in VOICES:
        raise OpenAIError(400, f"unknown voice {voice!r}: the model has one voice, which every OpenAI voice name "
                               f"({', '.join(VOICES)}) selects", "voice", "invalid_value")
    return voice


def parse_speech(req: Request, model: str) -> SpeechRequest:
    body = json_body(req)
    _refuse_unknown(body, ("model", "input", "voice", "response_format", "speed", "stream_format", "instructions"))
    check_model(typed(body, "model", str, required=True), model)
    text = typed(body, "input", str, required=True)
    if not text.strip():
        raise OpenAIError(400, "'input' is empty", "input", "invalid_value")
    if len(text) > MAX_INPUT_CHARS:
        raise OpenAIError(400, f"'input' is {len(text)} characters; at most {MAX_INPUT_CHARS}", "input",
                          "string_above_max_length")
    _voice(body)
    fmt = choice(typed(body, "response_format", str, "mp3"), AUDIO_FORMATS, "response_format")
    speed = typed(body, "speed", (int, float), 1.0)
    if not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
        raise OpenAIError(400, f"'speed' must be within {list(SPEED_RANGE)}, got {speed}", "speed", "invalid_value")
    sse = choice(typed(body, "stream_format", str, "audio"), ("audio", "sse"), "stream_format") == "sse"
    ignored = ("voice",) + (("speed",) if speed != 1.0 else ()) + (("instructions",) if body.get("instructions") else ())
    return SpeechRequest(Question(Task.T1A2, text=text), fmt, sse, ignored)


def parse_transcription(req: Request, model: str) -> TranscriptionRequest:
    if req.mimetype != "multipart/form-data":
        raise OpenAIError(415, f"unsupported Content-Type {req.mimetype or '(none)'}: send multipart/form-data "
                               "with the audio as 'file'")
    upload = req.files.get("file")
    if upload is None:
        raise OpenAIError(400, "'file' (the audio file) is required", "file", "missing_required_parameter")
    form = req.form
    _refuse_unknown(dict(form), TRANSCRIPTION_FIELDS + IGNORED_TRANSCRIPTION_FIELDS + ("include[]",))
    if not form.get("model"):
        raise OpenAIError(400, "'model' is required", "model", "missing_required_parameter")
    check_model(form["model"], model)
    fmt = choice(form.get("response_format", "json"), TRANSCRIPT_FORMATS, "response_format")
    stream = choice(form.get("stream", "false").lower(), ("true", "false"), "stream") == "true"
    if stream and fmt not in STREAMED_TRANSCRIPT_FORMATS:
        raise OpenAIError(400, f"a streamed transcription is sent as events; response_format {fmt!r} cannot be "
                               f"streamed (use {' or '.join(STREAMED_TRANSCRIPT_FORMATS)})", "response_format")
    language = form.get("language")
    if language is not None and language.lower() not in LANGUAGES:
        raise OpenAIError(400, f"Mini-Omni transcribes English only; 'language' {language!r} is not supported",
                          "language", "unsupported_language")
    if "word" in form.getlist("timestamp_granularities[]"):
        raise OpenAIError(400, "word timestamps are not available: the model's ASR task gives no timings",
                          "timestamp_granularities[]", "invalid_value")
    if form.getlist("include[]"):
        raise OpenAIError(400, "'include' (logprobs) is not available here", "include[]", "invalid_value")
    sampling = _sampling({"temperature": _form_number(form, "temperature")})
    audio = upload.read()
    if not audio:
        raise OpenAIError(400, "the audio file is empty", "file", "invalid_value")
    return TranscriptionRequest(Question(Task.ASR, audio=audio, sampling=sampling, param="file"), fmt, stream)


def _form_number(form, name: str) -> float | None:
    if form.get(name) in (None, ""):
        return None
    try:
        return float(form[name])
    except ValueError as e:
        raise OpenAIError(400, f"'{name}' must be a number, got {form[name]!r}", name, "invalid_type") from e


def _refuse_unknown(body: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise OpenAIError(400, f"unrecognized parameter(s) {unknown}; this route takes {sorted(known)}",
                          unknown[0], "unknown_parameter")


def _sampling(values: dict) -> dict:
    """OpenAI's sampling fields as `GenerationConfig` fields. A temperature above 0 samples from every token
    (the official default keeps the single likeliest one, so temperature alone would change nothing)."""
    options = {k: v for k, v in values.items() if v is not None}
    temperature = options.get("temperature")
    if temperature is not None and not 0 <= temperature <= 2:
        raise OpenAIError(400, f"'temperature' must be within [0, 2], got {temperature}", "temperature",
                          "invalid_value")
    if temperature or "top_p" in options:
        options["top_k"] = None
    return options


def decoded(value: str, name: str) -> bytes:
    """Base64 (or a base64 data URL) -> bytes, with the error in OpenAI's shape."""
    try:
        return _b64(value, name)
    except ApiError as e:
        raise OpenAIError(400, e.message, name, "invalid_value") from e


def parse_chat(req: Request, model: str, can_see: bool) -> ChatRequest:
    body = json_body(req)
    _refuse_unsupported(body)
    check_model(typed(body, "model", str, required=True), model)
    if typed(body, "n", int, 1) != 1:
        raise OpenAIError(400, "'n' must be 1: the model gives one answer", "n", "invalid_value")
    modalities = typed(body, "modalities", list, ["text"])
    if not modalities or not set(modalities) <= {"text", "audio"} or "text" not in modalities:
        raise OpenAIError(400, f"'modalities' must be [\"text\"] or [\"text\", \"audio\"], got {modalities}",
                          "modalities", "invalid_value")
    stream = typed(body, "stream", bool, False)
    audio_format = _audio_output(body, stream) if "audio" in modalities else None
    messages = typed(body, "messages", list, required=True)
    audio, text, image, param = _last_user_message(messages)
    if image is not None and audio is None:
        raise OpenAIError(400, "an image goes with a spoken question (input_audio), as the model's image task "
                               "takes it", param, "invalid_value")
    if image is not None and not can_see:
        raise OpenAIError(400, f"the model {model!r} cannot see: image questions need a Mini-Omni2 checkpoint",
                          param, "invalid_value")
    task = {(True, True): Task.A1A2, (True, False): Task.A1T2, (False, True): Task.T1A2,
            (False, False): Task.T1T2}[(audio is not None, audio_format is not None)]
    question = Question(task, audio, text, image, _max_new_tokens(body), _sampling(
        {k: typed(body, k, kind) for k, kind in (("temperature", (int, float)), ("top_p", (int, float)),
                                                 ("seed", int))}), param)
    options = typed(body, "stream_options", dict, {})
    return ChatRequest(question, audio_format, stream, bool(options.get("include_usage")), len(messages) - 1)


def _refuse_unsupported(body: dict) -> None:
    """A field Mini-Omni cannot honour (tools, response_format, logprobs, stop...) is refused when it is set
    to anything but its 'off' value; the ignored ones are listed in `IGNORED_CHAT_FIELDS`."""
    for name, value in body.items():
        if name in CHAT_FIELDS or name in IGNORED_CHAT_FIELDS or value in (None, False, 0, [], {}):
            continue
        if name == "response_format" and value == {"type": "text"}:
            continue
        raise OpenAIError(400, f"'{name}' is not supported by Mini-Omni (it answers one spoken or written "
                               f"question with speech and text)", name, "unsupported_parameter")


def _audio_output(body: dict, stream: bool) -> str:
    audio = typed(body, "audio", dict, required=True)
    _voice(audio)
    fmt = choice(typed(audio, "format", str, required=True), CHAT_AUDIO_FORMATS, "audio.format")
    if stream and fmt not in STREAMED_CHAT_AUDIO_FORMATS:
        raise OpenAIError(400, f"a streamed answer's audio comes as {STREAMED_CHAT_AUDIO_FORMATS[0]} (got "
                               f"{fmt!r}); ask for it, or do not stream", "audio.format", "invalid_value")
    return fmt


def _max_new_tokens(body: dict) -> int | None:
    bounds = [typed(body, name, int) for name in ("max_completion_tokens", "max_tokens")]
    for name, bound in zip(("max_completion_tokens", "max_tokens"), bounds):
        if bound is not None and bound < 1:
            raise OpenAIError(400, f"'{name}' must be at least 1, got {bound}", name, "invalid_value")
    given = [b for b in bounds if b is not None]
    return min(given) if given else None


def _last_user_message(messages: list) -> tuple[bytes | None, str | None, bytes | None, str]:
    """The question: the last message, which must be the user's. Mini-Omni's prompt holds one question and
    no history, so the earlier messages are not read (the response says how many in a header)."""
    if not messages:
        raise OpenAIError(400, "'messages' is empty", "messages", "invalid_value")
    at = f"messages[{len(messages) - 1}]"
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        raise OpenAIError(400, f"the last message must be the user's question (Mini-Omni answers it alone); "
                               f"{at} is not", at, "invalid_value")
    content = last.get("content")
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list) and content:
        parts = content
    else:
        raise OpenAIError(400, f"{at}.content must be a string or a list of parts", f"{at}.content", "invalid_type")
    return _read_parts(parts, f"{at}.content")


def _read_parts(parts: list, at: str) -> tuple[bytes | None, str | None, bytes | None, str]:
    audio = image = None
    texts = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"{at}[{i}]"
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "input_audio" and isinstance(part.get("input_audio"), dict) and audio is None:
            audio = decoded(typed(part["input_audio"], "data", str, required=True), f"{where}.input_audio.data")
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) and image is None:
            image = _image(typed(part["image_url"], "url", str, required=True), f"{where}.image_url.url")
        else:
            raise OpenAIError(400, f"{where} must be one text, input_audio or image_url part (one audio and one "
                                   f"image at most)", where, "invalid_value")
    text = " ".join(t for t in texts if t.strip()) or None
    if audio is not None and text is not None:
        raise OpenAIError(400, "Mini-Omni hears a spoken question or reads a written one, not both in one "
                               "message: send the input_audio part alone", at, "invalid_value")
    if audio is None and text is None:
        raise OpenAIError(400, "the question is empty: send a text or an input_audio part", at, "invalid_value")
    return audio, text, image, at


def _image(url: str, at: str) -> bytes:
    if not url.startswith("data:"):
        raise OpenAIError(400, "the server does not fetch images from URLs: send the image as a base64 data URL "
                               "(data:image/jpeg;base64,...)", at, "invalid_value")
    return decoded(url, at)
