"""The OpenAI Realtime protocol's shapes, in its two dialects: beta (`OpenAI-Beta: realtime=v1`) and GA.

The session logic works on one neutral `SessionConfig` and beta event names; this module parses what a
client sends in either dialect into that config, and renders sessions, items, responses and event names
the way the connection's dialect spells them. The one table of event names that differ between the
dialects is here, read by the server and by the page's client (`webui/realtime_client.py`) alike. Pure
functions and frozen dataclasses: no I/O.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, replace
from typing import Any

from omni import OUTPUT_SAMPLE_RATE
from voice.vad import START_MS, VadConfig
from .wire import API_RATE, GA_NAMES

BETA, GA = "beta", "ga"
assert API_RATE == OUTPUT_SAMPLE_RATE, "the model's PCM goes out as it is: it must be at the protocol's rate"
PCM16 = "pcm16"  # the beta name of that format
GA_PCM = {"type": "audio/pcm", "rate": API_RATE}  # its GA name
FORMAT_ERROR = (f"only pcm16 audio is supported: 16-bit little-endian PCM, {API_RATE // 1000} kHz, mono "
                f"(beta: \"pcm16\"; GA: {{\"type\": \"audio/pcm\", \"rate\": {API_RATE}}})")
VOICE = "mini-omni"  # the model has one voice; a requested voice is accepted and reported as this
MAX_OUTPUT_LIMIT = 4096  # the protocol's upper bound for max_output_tokens


class ProtocolError(ValueError):
    """A client event the session refuses: sent back as an `error` event; the session stays open."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclass(frozen=True)
class TurnDetection:
    """`server_vad` settings, mapped onto the Silero segmenter of `voice/`."""

    threshold: float = 0.5  # Silero speech probability
    prefix_padding_ms: int = 300  # audio kept from before the speech (the segmenter's pre-roll)
    silence_duration_ms: int = 500  # silence that ends the turn
    create_response: bool = True  # answer when the turn ends
    interrupt_response: bool = True  # speech during an answer cancels it (barge-in)

    def vad_config(self) -> VadConfig:
        return VadConfig(threshold=self.threshold, start_ms=START_MS, end_ms=self.silence_duration_ms,
                         preroll_ms=self.prefix_padding_ms)

    def render(self, dialect: str) -> dict[str, Any]:
        out = {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
               "silence_duration_ms": self.silence_duration_ms, "create_response": self.create_response,
               "interrupt_response": self.interrupt_response}
        return {**out, "idle_timeout_ms": None} if dialect == GA else out


@dataclass(frozen=True)
class SessionConfig:
    """What is in effect for a session; fields the model cannot honour are not kept."""

    speaks: bool = True  # audio answers (with their transcript); False: text answers
    turn_detection: TurnDetection | None = TurnDetection()  # None: the client commits and asks itself
    transcribe: bool = False  # transcribe user audio with the model's ASR task
    max_output_tokens: int | None = None  # decode steps per answer; None is the protocol's "inf"


def _check_format(value: Any, param: str) -> None:
    ok = value == PCM16 or (isinstance(value, dict) and value.get("type") == "audio/pcm"
                            and value.get("rate", API_RATE) == API_RATE)
    if not ok:
        raise ProtocolError(f"unsupported audio format {value!r} for {param}: {FORMAT_ERROR}",
                            "unsupported_audio_format", param)


def _max_tokens(value: Any, param: str) -> int | None:
    if value == "inf" or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OUTPUT_LIMIT:
        raise ProtocolError(f"{param} must be an integer in [1, {MAX_OUTPUT_LIMIT}] or \"inf\", got {value!r}",
                            param=param)
    return value


def _modalities(value: Any, param: str) -> bool:
    """Whether the answer is spoken: any list with "audio" (beta ["text", "audio"], GA ["audio"])."""
    if not isinstance(value, list) or not value or not all(v in ("text", "audio") for v in value):
        raise ProtocolError(f"{param} must be [\"audio\"], [\"text\"] or [\"text\", \"audio\"], got {value!r}",
                            param=param)
    return "audio" in value


def _turn_detection(value: Any, current: TurnDetection | None, param: str) -> TurnDetection | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(f"{param} must be an object or null, got {value!r}", param=param)
    if value.get("type", "server_vad") not in ("server_vad", "semantic_vad"):  # semantic_vad runs as server_vad
        raise ProtocolError(f"{param}.type must be server_vad or semantic_vad, got {value.get('type')!r}",
                            param=f"{param}.type")
    td = current or TurnDetection()
    threshold = value.get("threshold", td.threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise ProtocolError(f"{param}.threshold must be a number in (0, 1), got {threshold!r}",
                            param=f"{param}.threshold")
    fields = {}
    for name in ("prefix_padding_ms", "silence_duration_ms"):
        v = value.get(name, getattr(td, name))
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 10_000:
            raise ProtocolError(f"{param}.{name} must be an integer of milliseconds in [0, 10000], got {v!r}",
                                param=f"{param}.{name}")
        fields[name] = v
    for name in ("create_response", "interrupt_response"):
        v = value.get(name, getattr(td, name))
        if not isinstance(v, bool):
            raise ProtocolError(f"{param}.{name} must be true or false, got {v!r}", param=f"{param}.{name}")
        fields[name] = v
    return replace(td, threshold=float(threshold), **fields)


def _object(value: Any, param: str) -> dict:
    """An optional object field: absent or null is empty; anything else but an object is refused, naming it."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{param} must be an object, got {type(value).__name__}", param=param)
    return value


def update_session(config: SessionConfig, session: Any, dialect: str) -> SessionConfig:
    """`session.update`'s `session` object applied to `config`; ProtocolError names a bad field."""
    if not isinstance(session, dict):
        raise ProtocolError("session.update needs a 'session' object", "missing_required_parameter", "session")
    if dialect == GA:
        return _update_ga(config, session)
    new = config
    for name in ("input_audio_format", "output_audio_format"):
        if name in session:
            _check_format(session[name], f"session.{name}")
    if "modalities" in session:
        new = replace(new, speaks=_modalities(session["modalities"], "session.modalities"))
    if "turn_detection" in session:
        new = replace(new, turn_detection=_turn_detection(session["turn_detection"], new.turn_detection,
                                                          "session.turn_detection"))
    if "input_audio_transcription" in session:
        new = replace(new, transcribe=session["input_audio_transcription"] is not None)
    if "max_response_output_tokens" in session:
        new = replace(new, max_output_tokens=_max_tokens(session["max_response_output_tokens"],
                                                         "session.max_response_output_tokens"))
    return new


def _update_ga(config: SessionConfig, session: dict) -> SessionConfig:
    if session.get("type", "realtime") != "realtime":
        raise ProtocolError(f"only realtime sessions are served, not {session.get('type')!r}", param="session.type")
    new = config
    audio = _object(session.get("audio"), "session.audio")
    audio_in = _object(audio.get("input"), "session.audio.input")
    audio_out = _object(audio.get("output"), "session.audio.output")
    for part, param in ((audio_in, "session.audio.input.format"), (audio_out, "session.audio.output.format")):
        if "format" in part:
            _check_format(part["format"], param)
    if "output_modalities" in session:
        new = replace(new, speaks=_modalities(session["output_modalities"], "session.output_modalities"))
    if "turn_detection" in audio_in:
        new = replace(new, turn_detection=_turn_detection(audio_in["turn_detection"], new.turn_detection,
                                                          "session.audio.input.turn_detection"))
    if "transcription" in audio_in:
        new = replace(new, transcribe=audio_in["transcription"] is not None)
    if "max_output_tokens" in session:
        new = replace(new, max_output_tokens=_max_tokens(session["max_output_tokens"], "session.max_output_tokens"))
    return new


def response_options(config: SessionConfig, response: Any, dialect: str) -> tuple[bool, int | None]:
    """(speaks, max output tokens) of a `response.create`, its overrides applied to the session's."""
    if response is None:
        return config.speaks, config.max_output_tokens
    if not isinstance(response, dict):
        raise ProtocolError("response.create's 'response' must be an object", param="response")
    modalities, limit = ("output_modalities", "max_output_tokens") if dialect == GA else \
        ("modalities", "max_response_output_tokens")
    speaks = _modalities(response[modalities], f"response.{modalities}") if modalities in response else config.speaks
    max_tokens = _max_tokens(response[limit], f"response.{limit}") if limit in response else config.max_output_tokens
    return speaks, max_tokens


def event_name(name: str, dialect: str) -> str:
    """A server event's name (beta spelling) as `dialect` spells it."""
    return GA_NAMES.get(name, name) if dialect == GA else name


def decode_b64(value: str, param: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(f"{param} is not valid base64 ({e})", "invalid_base64", param) from e


def render_session(config: SessionConfig, dialect: str, session_id: str, model: str) -> dict[str, Any]:
    td = config.turn_detection.render(dialect) if config.turn_detection else None
    transcription = {"model": model} if config.transcribe else None
    limit = config.max_output_tokens if config.max_output_tokens is not None else "inf"
    if dialect == GA:
        return {
            "type": "realtime", "object": "realtime.session", "id": session_id, "model": model,
            "output_modalities": ["audio"] if config.speaks else ["text"], "instructions": "",
            "audio": {"input": {"format": dict(GA_PCM), "transcription": transcription, "noise_reduction": None,
                                "turn_detection": td},
                      "output": {"format": dict(GA_PCM), "voice": VOICE, "speed": 1.0}},
            "tools": [], "tool_choice": "auto", "max_output_tokens": limit, "tracing": None, "prompt": None,
        }
    return {
        "id": session_id, "object": "realtime.session", "model": model,
        "modalities": ["text", "audio"] if config.speaks else ["text"], "instructions": "", "voice": VOICE,
        "input_audio_format": PCM16, "output_audio_format": PCM16, "input_audio_transcription": transcription,
        "turn_detection": td, "tools": [], "tool_choice": "auto", "max_response_output_tokens": limit,
        "input_audio_noise_reduction": None, "speed": 1.0, "tracing": None,
    }


def answer_part(speaks: bool, dialect: str, text: str = "", in_item: bool = False) -> dict[str, Any]:
    """An answer's content part: in events `audio`/`text`; inside a GA item `output_audio`/`output_text`."""
    kind = "audio" if speaks else "text"
    if in_item and dialect == GA:
        kind = f"output_{kind}"
    return {"type": kind, "transcript": text} if speaks else {"type": kind, "text": text}


def render_response(dialect: str, response_id: str, status: str, speaks: bool, max_output_tokens: int | None,
                    output: list[dict], status_details: dict | None = None, usage: dict | None = None,
                    conversation_id: str | None = None) -> dict[str, Any]:
    common = {"object": "realtime.response", "id": response_id, "status": status, "status_details": status_details,
              "output": output, "conversation_id": conversation_id, "usage": usage, "metadata": None,
              "max_output_tokens": max_output_tokens if max_output_tokens is not None else "inf"}
    if dialect == GA:
        return {**common, "output_modalities": ["audio"] if speaks else ["text"],
                "audio": {"output": {"format": dict(GA_PCM), "voice": VOICE}}}
    return {**common, "modalities": ["text", "audio"] if speaks else ["text"], "voice": VOICE,
            "output_audio_format": PCM16}


def usage(prompt_tokens: int, steps: int, audio_in: bool, speaks: bool) -> dict[str, Any]:
    """Tokens of one answer: the prompt's positions in, one token per decode step and stream out."""
    return {"total_tokens": prompt_tokens + steps, "input_tokens": prompt_tokens, "output_tokens": steps,
            "input_token_details": {"audio_tokens": prompt_tokens if audio_in else 0,
                                    "text_tokens": 0 if audio_in else prompt_tokens, "cached_tokens": 0},
            "output_token_details": {"audio_tokens": steps if speaks else 0, "text_tokens": steps}}
