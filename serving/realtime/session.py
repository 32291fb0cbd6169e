"""One OpenAI-Realtime session as a plain object: client events in, server events out. No sockets here.

The WebSocket route (`transport.py`) decodes frames, calls `receive()`, and sends what comes back; the
engine's progress comes back through `on_job()`. The session only dispatches: the input audio buffer
(`input.py`), the conversation's items (`conversation.py`) and the responses (`responses.py`) handle the
events, over one shared `Context`.

Client events handled: `session.update`, `input_audio_buffer.append` / `commit` / `clear`,
`conversation.item.create` (user `input_audio`, `input_text`, and `input_image` on a Mini-Omni2
checkpoint), `conversation.item.truncate`, `conversation.item.delete`, `conversation.item.retrieve`,
`response.create`, `response.cancel`.

Server events sent (beta names; GA connections get the GA names, e.g. `response.output_audio.delta`, and
`conversation.item.added` / `conversation.item.done` in place of `conversation.item.created`):
`session.created`, `session.updated`, `error`, `input_audio_buffer.speech_started` / `speech_stopped` /
`committed` / `cleared`, `conversation.item.created`, `conversation.item.truncated`,
`conversation.item.deleted`, `conversation.item.retrieved`,
`conversation.item.input_audio_transcription.completed` / `failed`, `response.created`,
`response.output_item.added`, `response.content_part.added`, `response.audio.delta`,
`response.audio_transcript.delta` (or `response.text.delta`), `response.audio.done`,
`response.audio_transcript.done` (or `response.text.done`), `response.content_part.done`,
`response.output_item.done`, `response.done` (status `completed`, `incomplete`, `cancelled` or `failed`,
with usage).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import numpy as np

from .context import Context
from .conversation import Conversation
from .input import InputBuffer
from .jobs import JobChunk, JobEnd, Metrics, Runner
from .protocol import BETA, GA, ProtocolError, update_session
from .responses import Responses

log = logging.getLogger("omni.realtime")


def _not_json(constant: str) -> float:
    """json.loads accepts NaN and Infinity; the protocol's JSON does not (a browser's JSON.parse throws on them)."""
    raise ValueError(f"{constant} is not a JSON value")


class RealtimeSession:
    """Events in, events out. `receive()` takes a client frame, `on_job()` the engine's progress."""

    def __init__(self, runner: Runner, *, dialect: str = GA, model: str = "mini-omni", can_see: bool = False,
                 vad: Callable[[np.ndarray], float] | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.perf_counter, speculative: bool = True) -> None:
        assert dialect in (BETA, GA), dialect
        self.ctx = Context(runner, dialect, model, can_see, metrics, clock, speculative=speculative)
        self.conversation = Conversation(self.ctx)
        self.responses = Responses(self.ctx, self.conversation)
        self.input = InputBuffer(self.ctx, self.conversation, self.responses, vad)
        self._handlers: dict[str, Callable[[dict], list[dict]]] = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self.input.append,
            "input_audio_buffer.commit": self.input.commit,
            "input_audio_buffer.clear": self.input.clear,
            "conversation.item.create": self.conversation.create,
            "conversation.item.truncate": self.conversation.truncate,
            "conversation.item.delete": self.conversation.delete,
            "conversation.item.retrieve": self.conversation.retrieve,
            "response.create": self.responses.create,
            "response.cancel": self.responses.cancel,
        }

    def start(self) -> list[dict]:
        return [self.ctx.event("session.created", session=self.ctx.session())]

    def receive(self, frame: str | bytes) -> list[dict]:
        """One WebSocket frame from the client."""
        if isinstance(frame, bytes):
            return [self.ctx.error("binary frames are not part of the protocol: send JSON text events",
                                   "invalid_frame")]
        try:
            event = json.loads(frame, parse_constant=_not_json)
        except RecursionError:  # the same bound as /chat's JSON (serving/parse.py)
            return [self.ctx.error("the event is nested too deeply (deeper than Python's recursion limit)",
                                   "invalid_json")]
        except ValueError as e:
            return [self.ctx.error(f"the frame is not valid JSON ({e})", "invalid_json")]
        if not isinstance(event, dict):
            return [self.ctx.error("an event must be a JSON object with a 'type'", "invalid_event")]
        return self.handle(event)

    def handle(self, event: dict) -> list[dict]:
        kind = event.get("type")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            return [self.ctx.error(f"unknown or unsupported event type {kind!r}; supported: {sorted(self._handlers)}",
                                   "invalid_value", "type", event)]
        try:
            return handler(event)
        except ProtocolError as e:
            return [self.ctx.error(e.message, e.code, e.param, event)]
        except Exception as e:  # the session's one guard: a malformed event no check named; the session goes on
            log.warning("%s: unexpected %s while handling the event", kind, type(e).__name__, exc_info=e)
            return [self.ctx.error(f"{kind}: a field has the wrong type or shape ({type(e).__name__}: {e})",
                                   "invalid_event", None, event)]

    def on_job(self, update: JobChunk | JobEnd) -> list[dict]:
        """The engine's progress on a job this session submitted."""
        response = self.responses.current
        if self.responses.hold(update):
            return []
        if response is not None and update.key == response.id:
            if isinstance(update, JobChunk):
                return self.responses.on_chunk(update.chunk)
            return self.responses.on_end(update)
        if isinstance(update, JobEnd):
            job = self.ctx.jobs.pop(update.key, None)
            if job is not None and job.kind == "transcription":
                return self.conversation.transcribed(update)
        return []

    def close(self) -> None:
        """The client left: stop whatever the engine does for this session (within one decode step)."""
        self.ctx.closed = True
        for job in self.ctx.jobs.values():
            job.cancel.set("client_disconnected")

    def _session_update(self, event: dict) -> list[dict]:
        old = self.ctx.config
        self.ctx.config = update_session(old, event.get("session"), self.ctx.dialect)
        if self.ctx.config.turn_detection != old.turn_detection:
            self.input.reset()
        return [self.ctx.event("session.updated", session=self.ctx.session())]
