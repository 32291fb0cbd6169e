"""The pages' client of `server.py`'s `/v1/realtime` (the OpenAI Realtime protocol, beta flavour).

Two parts, kept apart so the protocol is testable without a socket:
- `Conversation`: events in (decoded dicts), playback and events out. It keeps the turns (question, answer
  text, latency, outcome), stops playback the moment the server hears the user start speaking (barge-in),
  drops audio of the answer it interrupted and tells the server how much of it was heard
  (`conversation.item.truncate`).
- `RealtimeConnection`: the WebSocket, with one thread that sends and one that receives.

Audio is pcm16, mono, 24 kHz both ways (the protocol's default, `API_RATE`). Event names of the GA protocol
(`response.output_audio.delta`, ...) are read as their beta names, through the server's own table
(`serving/realtime/protocol.py`).
"""
from __future__ import annotations

import base64
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from serving.realtime.wire import API_RATE, PCM16_WIDTH, beta_name

BETA_HEADERS = {"OpenAI-Beta": "realtime=v1"}
CONNECT_TIMEOUT_S = 5
STATES = ("connecting", "listening", "hearing you", "thinking", "speaking", "closed")


def realtime_url(server_url: str) -> str:
    """`http://host:port` (where `python server.py` listens) -> `ws://host:port/v1/realtime`."""
    url = server_url.rstrip("/")
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if url.startswith(http):
            return ws + url[len(http):] + "/v1/realtime"
    raise ValueError(f"server URL {server_url!r} must start with http:// or https://")


def session_update(max_tokens: int | None = None, silence_ms: int | None = None,
                   transcribe: bool = False) -> dict:
    """The page's session: speech in and out, server VAD ending turns, the server's defaults otherwise.
    `max_tokens` bounds the answer alone (the protocol's meaning), as the pages' --max-new-tokens does."""
    vad = {"type": "server_vad", "create_response": True}
    if silence_ms is not None:
        vad["silence_duration_ms"] = silence_ms
    session = {"modalities": ["audio", "text"], "input_audio_format": "pcm16", "output_audio_format": "pcm16",
               "turn_detection": vad}
    if max_tokens is not None:
        session["max_response_output_tokens"] = max_tokens
    if transcribe:
        session["input_audio_transcription"] = {"model": "mini-omni"}  # the model's own ASR
    return {"type": "session.update", "session": session}


def append_event(pcm: bytes) -> dict:
    """pcm16 mono 24 kHz bytes for the server's input buffer."""
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}


def image_event(jpeg: bytes) -> dict:
    """A user message holding one picture: a Mini-Omni2 server answers the next question about it."""
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": url}]}}


def truncate_event(item_id: str, audio_end_ms: int) -> dict:
    return {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
            "audio_end_ms": audio_end_ms}


class Playback(Protocol):
    """Where answer audio goes: streamlit-webrtc's `PcmAudioSource` has exactly these two methods."""

    def push(self, pcm: bytes) -> None: ...

    def clear(self) -> None: ...


@dataclass(frozen=True)
class TurnView:
    """One question and its answer, as the page shows them."""

    question_s: float | None = None  # seconds of speech the server heard
    question_text: str = ""  # the server's transcription of it, when asked for
    image: bool = False  # the server took a camera frame for the question
    answer_text: str = ""
    answer_s: float = 0.0  # seconds of answer audio received
    first_audio_ms: float | None = None  # end of speech (the VAD's turn end less its silence) -> first answer audio
    vad_ms: int = 0  # of that, the server VAD's wait for silence
    status: str = "hearing you"  # hearing you | thinking | speaking | done | interrupted | failed
    error: str = ""


@dataclass(frozen=True)
class View:
    """What the page draws: the state line, the turns, the last problem."""

    state: str
    turns: tuple[TurnView, ...]
    error: str = ""


@dataclass
class _Answer:
    """Bookkeeping for the answer being received (not shown)."""

    response_id: str | None = None
    item_id: str | None = None
    pushed_s: float = 0.0  # audio pushed to playback
    play_until: float = 0.0  # monotonic time when what was pushed will have played
    muted: set[str] = field(default_factory=set)  # responses whose audio the page no longer plays


class Conversation:
    """The page's side of a realtime session: feed it server events with `handle()`; read it with `view()`.

    Thread-safe: events come on the connection's thread, `view()` is called from the page's script.
    """

    def __init__(self, playback: Playback, send: Callable[[dict], None],
                 take_frame: Callable[[], bytes | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.playback = playback
        self.send = send
        self.take_frame = take_frame
        self.clock = clock
        self._lock = threading.Lock()
        self._turns: list[TurnView] = []
        self._answer = _Answer()
        self._speech_stopped_at: float | None = None  # when the speech stopped: the VAD's turn end less its silence
        self._silence_ms = 0  # the session's VAD silence (session.created / updated)
        self._speech_started_ms: int | None = None  # where the server heard the turn start, in its input audio
        self._state = "connecting"
        self._error = ""

    def view(self) -> View:
        with self._lock:
            state = self._state
            if state == "listening" and self.clock() < self._answer.play_until:
                state = "speaking"  # the answer is generated, but still playing
            return View(state, tuple(self._turns), self._error)

    def closed(self, reason: str = "") -> None:
        with self._lock:
            self._state = "closed"
            self._error = reason or self._error

    def handle(self, event: dict) -> None:
        kind = beta_name(event.get("type", ""))
        handler = getattr(self, "_on_" + kind.replace(".", "_"), None)
        if handler is not None:
            with self._lock:
                handler(event)

    # ---- one method per event the page acts on (called under the lock) ----

    def _on_session_created(self, event: dict) -> None:
        self._state = "listening"
        self._on_session_updated(event)

    def _on_session_updated(self, event: dict) -> None:
        session = event.get("session", {})
        vad = session.get("turn_detection") or session.get("audio", {}).get("input", {}).get("turn_detection")
        self._silence_ms = (vad or {}).get("silence_duration_ms", 0)

    def _on_error(self, event: dict) -> None:
        self._error = event.get("error", {}).get("message", "the server reported an error")

    def _on_input_audio_buffer_speech_started(self, event: dict) -> None:
        answering = self._turns and self._turns[-1].status in ("thinking", "speaking")
        if answering or self.clock() < self._answer.play_until:
            self._barge_in()
        if self.take_frame is not None:
            frame = self.take_frame()
            if frame is not None:
                self.send(image_event(frame))  # the server answers this question about the latest picture
        self._turns.append(TurnView())
        self._speech_stopped_at = None
        self._speech_started_ms = event.get("audio_start_ms")
        self._state = "hearing you"

    def _barge_in(self) -> None:
        """The user speaks over the answer: silence it now; the server cancels the response itself."""
        self.playback.clear()
        answer = self._answer
        unplayed_s = max(0.0, answer.play_until - self.clock())
        answer.play_until = 0.0
        if answer.response_id is not None:
            answer.muted.add(answer.response_id)
        if answer.item_id is not None:
            self.send(truncate_event(answer.item_id, int(1000 * max(0.0, answer.pushed_s - unplayed_s))))
        if self._turns and self._turns[-1].status in ("thinking", "speaking", "done"):
            self._turns[-1] = replace(self._turns[-1], status="interrupted")

    def _on_input_audio_buffer_speech_stopped(self, event: dict) -> None:
        self._speech_stopped_at = self.clock() - self._silence_ms / 1000
        self._update(status="thinking", vad_ms=self._silence_ms)
        self._state = "thinking"
        start = event.get("audio_start_ms", self._speech_started_ms)
        if start is not None and "audio_end_ms" in event:
            self._update(question_s=(event["audio_end_ms"] - start) / 1000)

    def _on_conversation_item_created(self, event: dict) -> None:
        content = event.get("item", {}).get("content") or []
        if any(part.get("type") == "input_image" for part in content):
            self._update(image=True)  # the server took the camera frame

    def _on_conversation_item_input_audio_transcription_completed(self, event: dict) -> None:
        self._update(question_text=event.get("transcript", ""))

    def _on_response_created(self, event: dict) -> None:
        self._answer = _Answer(response_id=event.get("response", {}).get("id"), muted=self._answer.muted)
        if not self._turns:  # a response the page did not see a question for (e.g. a text message)
            self._turns.append(TurnView(status="thinking"))
        self._state = "thinking"

    def _on_response_output_item_added(self, event: dict) -> None:
        if not self._is_muted(event):
            self._answer.item_id = event.get("item", {}).get("id")

    def _on_response_audio_delta(self, event: dict) -> None:
        if self._is_muted(event):
            return  # the tail of an answer the user spoke over
        pcm = base64.b64decode(event.get("delta", ""))
        self.playback.push(pcm)
        now, seconds = self.clock(), len(pcm) / PCM16_WIDTH / API_RATE
        answer = self._answer
        answer.pushed_s += seconds
        answer.play_until = max(now, answer.play_until) + seconds
        turn = self._turns[-1]
        if turn.first_audio_ms is None and self._speech_stopped_at is not None:
            self._update(first_audio_ms=1000 * (now - self._speech_stopped_at))
        self._update(status="speaking", answer_s=answer.pushed_s)
        self._state = "speaking"

    def _on_response_audio_transcript_delta(self, event: dict) -> None:
        if not self._is_muted(event):
            self._update(answer_text=self._turns[-1].answer_text + event.get("delta", ""))

    _on_response_text_delta = _on_response_audio_transcript_delta

    def _on_response_done(self, event: dict) -> None:
        response = event.get("response", {})
        if response.get("id") in self._answer.muted:
            return  # the interrupted answer's end: its turn already says so
        status = response.get("status")
        if status == "failed":
            reason = (response.get("status_details") or {}).get("error", {}).get("message", "the answer failed")
            self._update(status="failed", error=reason)
        else:
            self._update(status="interrupted" if status == "cancelled" else "done")
        if self._state in ("thinking", "speaking"):
            self._state = "listening"

    def _is_muted(self, event: dict) -> bool:
        return event.get("response_id") in self._answer.muted

    def _update(self, **fields) -> None:
        if self._turns:
            self._turns[-1] = replace(self._turns[-1], **fields)


def refusal_text(e: Exception, url: str) -> str:
    """Why the WebSocket did not open, for the person using the page."""
    from websockets.exceptions import InvalidStatus

    if isinstance(e, InvalidStatus):
        resp = e.response
        body = resp.body.decode(errors="replace").strip() if resp.body else ""
        try:
            body = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            pass
        return f"The server refused the conversation (HTTP {resp.status_code}): {body or resp.reason_phrase}"
    if isinstance(e, (ConnectionError, TimeoutError, OSError)):
        return f"Cannot reach {url}: is `python server.py` running?"
    return f"The conversation with {url} failed: {e}"


class RealtimeConnection:
    """One `/v1/realtime` WebSocket. `send()` never blocks (a queue and a sender thread); every event
    received goes to `on_event`; `on_closed(reason)` is called once, when the connection ends."""

    def __init__(self, url: str, on_event: Callable[[dict], None], on_closed: Callable[[str], None],
                 headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.on_event = on_event
        self.on_closed = on_closed
        self.headers = {**BETA_HEADERS, **(headers or {})}
        self._outbox: queue.Queue[dict | None] = queue.Queue()
        self._closing = threading.Event()
        self._receiver = threading.Thread(target=self._receive, name="realtime-receive", daemon=True)
        self._receiver.start()

    def send(self, event: dict) -> None:
        self._outbox.put(event)

    def close(self) -> None:
        self._closing.set()
        self._outbox.put(None)

    def _receive(self) -> None:
        from websockets.exceptions import ConnectionClosed, WebSocketException
        from websockets.sync.client import connect

        reason = ""
        try:
            # proxy=None: the server is reached directly, whatever the environment's proxy settings say
            with connect(self.url, additional_headers=self.headers, open_timeout=CONNECT_TIMEOUT_S, proxy=None,
                         max_size=None) as ws:
                threading.Thread(target=self._send_loop, args=(ws,), name="realtime-send", daemon=True).start()
                for message in ws:
                    if isinstance(message, str):
                        self.on_event(json.loads(message))
                if not self._closing.is_set():
                    reason = f"The server ended the conversation ({ws.close_reason or 'no reason given'})."
        except ConnectionClosed as e:
            reason = "" if self._closing.is_set() else f"The server closed the conversation ({e})."
        except (WebSocketException, OSError, ValueError) as e:  # refused, unreachable, or not JSON
            reason = refusal_text(e, self.url)
        finally:
            self._outbox.put(None)
            self.on_closed(reason)

    def _send_loop(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        while (event := self._outbox.get()) is not None:
            try:
                ws.send(json.dumps(event))
            except ConnectionClosed:
                return
        ws.close()
