"""One OpenAI-Realtime session as a plain object: client events in, server events out. No sockets here.

The WebSocket route (`serving/realtime_ws.py`) decodes frames, calls `receive()`, and sends what comes
back; the engine's progress comes back through `on_job()`. Speech is segmented by the same Silero
segmenter as the desktop loop (`realtime.vad`).

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

What the model does with the conversation: each response answers the latest user message (its audio or
its text), with the latest `input_image` of the conversation when the checkpoint can see. Mini-Omni has no
multi-turn context, so earlier turns do not reach the model.
"""
from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from voice.signal import FRAME_SAMPLES, FRAME_SECONDS, MIC_RATE, Resampler, float_to_pcm, pcm_to_float
from voice.vad import MAX_UTTERANCE_S, Segment, Segmenter, SpeechEvent
from omni import OmniChunk
from .realtime_protocol import (
    API_RATE, BETA, GA, ProtocolError, SessionConfig, answer_part, event_name, render_response, render_session,
    response_options, update_session, usage,
)

SAMPLES_PER_MS = MIC_RATE // 1000  # 16 samples of the model's 16 kHz input per millisecond
MIN_COMMIT_MS = 100  # a commit needs at least this much audio (the protocol's rule)
MAX_BUFFER_S = MAX_UTTERANCE_S  # the model hears at most 30 s: the input buffer holds no more
MAX_TRANSCRIPT_TOKENS = 256  # decode steps of a transcription (30 s of speech is well under 150 words)
MAX_ITEMS = 256  # conversation items kept; older ones are forgotten (the model does not read them)
IMAGE_DATA_PREFIX = "data:"


class CancelFlag:
    """The cancel callable of `engine.stream()`, which polls it before every decode step.

    It counts the steps started before and after the cancel, so the server can report how many decode
    steps ran past a barge-in (0 or 1: the step in progress when it came).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.steps = 0  # decode steps the engine has started
        self.steps_at_cancel: int | None = None
        self.noticed = False  # the engine polled the flag after it was set, and stopped
        self.reason: str | None = None

    def __call__(self) -> bool:
        if self._event.is_set():
            self.noticed = True
            return True
        self.steps += 1
        return False

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason, self.steps_at_cancel = reason, self.steps
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def steps_after(self) -> int | None:
        """Decode steps started after the cancel was asked (None if the engine did not see it running)."""
        if not self.noticed or self.steps_at_cancel is None:
            return None
        return self.steps - self.steps_at_cancel


@dataclass
class Job:
    """One engine call the session asks for: an answer, or a transcription of a user item."""

    key: str  # the response id or the transcribed item's id
    kind: str  # "response" | "transcription"
    task: str  # A1A2, A1T2, T1A2, T1T2 or ASR
    audio: np.ndarray | None = None  # float32 16 kHz
    text: str | None = None
    image: bytes | None = None
    max_output_tokens: int | None = None  # decode steps; None: the engine's limit
    cancel: CancelFlag = field(default_factory=CancelFlag)


@dataclass(frozen=True)
class JobChunk:
    key: str
    chunk: OmniChunk


@dataclass(frozen=True)
class JobEnd:
    key: str
    status: str  # completed | cancelled | failed
    error: str | None = None
    steps: int = 0  # decode steps of the answer (prefill included)
    prompt_tokens: int = 0
    hit_limit: bool = False  # stopped by max_output_tokens
    text: str = ""


class Runner(Protocol):
    """What the session needs of the engine: run jobs one after another, report through `on_job()`."""

    def submit(self, job: Job) -> None: ...


class Metrics(Protocol):
    def response_done(self, status: str) -> None: ...
    def first_audio(self, seconds: float) -> None: ...
    def barge_in(self) -> None: ...
    def truncated(self) -> None: ...


@dataclass
class Item:
    id: str
    role: str  # user | assistant
    kind: str  # audio | text | image | answer
    audio: np.ndarray | None = None  # float32 16 kHz, user audio
    text: str = ""  # user text, or the transcript of user audio
    image: bytes | None = None
    speaks: bool = True  # answers: audio (+ transcript) or text
    status: str = "completed"
    audio_ms: int = 0  # answers: milliseconds of audio sent


@dataclass
class Response:
    id: str
    item: Item
    speaks: bool
    max_output_tokens: int | None
    job: Job
    audio_in: bool
    speech_end: float | None = None  # clock time of the end of speech that asked it (server VAD)
    first_audio: float | None = None


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class InputAudio:
    """pcm16 24 kHz in, float32 16 kHz frames out (via int16, so the model hears exactly what /chat would)."""

    def __init__(self) -> None:
        self.resampler = Resampler(API_RATE, MIC_RATE)
        self.rest = np.zeros(0, np.float32)
        self.frames_done = 0  # whole frames handed out since the session started

    def push(self, pcm: bytes) -> list[np.ndarray]:
        samples = pcm_to_float(float_to_pcm(self.resampler(pcm_to_float(pcm))))
        self.rest = np.concatenate([self.rest, samples])
        n = len(self.rest) // FRAME_SAMPLES
        frames = [self.rest[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES] for i in range(n)]
        self.rest = self.rest[n * FRAME_SAMPLES:]
        return frames

    def take_rest(self) -> np.ndarray:
        """The samples not yet making a whole frame (a manual commit takes them too)."""
        rest, self.rest = self.rest, np.zeros(0, np.float32)
        return rest


class RealtimeSession:
    """Events in, events out. `receive()` takes a client frame, `on_job()` the engine's progress."""

    def __init__(self, runner: Runner, *, dialect: str = GA, model: str = "mini-omni", can_see: bool = False,
                 vad: Callable[[np.ndarray], float] | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        assert dialect in (BETA, GA), dialect
        self.runner, self.dialect, self.model, self.can_see = runner, dialect, model, can_see
        self.vad, self.metrics, self.clock = vad, metrics, clock
        self.id = _new_id("sess")
        self.conversation_id = _new_id("conv")
        self.config = SessionConfig()
        self.items: dict[str, Item] = {}
        self.input = InputAudio()
        self.manual: list[np.ndarray] = []  # buffered input without turn detection
        self.segmenter = self._new_segmenter()
        self.speech_item_id: str | None = None  # the user item the current speech will become
        self.response: Response | None = None
        self.answer_pending = False  # a turn ended while the previous answer was still stopping
        self.pending_speech_end: float | None = None
        self.jobs: dict[str, Job] = {}  # submitted and not finished
        self.closed = False
        self._handlers: dict[str, Callable[[dict], list[dict]]] = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._item_create,
            "conversation.item.truncate": self._item_truncate,
            "conversation.item.delete": self._item_delete,
            "conversation.item.retrieve": self._item_retrieve,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
        }

    # -- entry points -------------------------------------------------------------------------------------

    def start(self) -> list[dict]:
        return [self._event("session.created", session=self._session())]

    def receive(self, frame: str | bytes) -> list[dict]:
        """One WebSocket frame from the client."""
        if isinstance(frame, bytes):
            return [self._error("binary frames are not part of the protocol: send JSON text events", "invalid_frame")]
        try:
            event = json.loads(frame)
        except ValueError as e:
            return [self._error(f"the frame is not valid JSON ({e})", "invalid_json")]
        if not isinstance(event, dict):
            return [self._error("an event must be a JSON object with a 'type'", "invalid_event")]
        return self.handle(event)

    def handle(self, event: dict) -> list[dict]:
        kind = event.get("type")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            return [self._error(f"unknown or unsupported event type {kind!r}; supported: {sorted(self._handlers)}",
                                "invalid_value", "type", event)]
        try:
            return handler(event)
        except ProtocolError as e:
            return [self._error(e.message, e.code, e.param, event)]

    def on_job(self, update: JobChunk | JobEnd) -> list[dict]:
        """The engine's progress on a job this session submitted."""
        response = self.response
        if response is not None and update.key == response.id:
            if isinstance(update, JobChunk):
                return self._answer_chunk(response, update.chunk)
            return self._answer_end(response, update)
        if isinstance(update, JobEnd):
            job = self.jobs.pop(update.key, None)
            if job is not None and job.kind == "transcription":
                return self._transcribed(update)
        return []

    def close(self) -> None:
        """The client left: stop whatever the engine does for this session (within one decode step)."""
        self.closed = True
        for job in self.jobs.values():
            job.cancel.set("client_disconnected")

    # -- session and input audio -----------------------------------------------------------------------------

    def _session(self) -> dict:
        return render_session(self.config, self.dialect, self.id, self.model)

    def _session_update(self, event: dict) -> list[dict]:
        old = self.config
        self.config = update_session(self.config, event.get("session"), self.dialect)
        if self.config.turn_detection != old.turn_detection:
            self._reset_input()
        return [self._event("session.updated", session=self._session())]

    def _new_segmenter(self) -> Segmenter | None:
        td = self.config.turn_detection
        return Segmenter(td.vad_config()) if td is not None else None

    def _reset_input(self) -> None:
        self.manual.clear()
        self.input.take_rest()
        self.segmenter = self._new_segmenter()
        self.speech_item_id = None
        if self.vad is not None and hasattr(self.vad, "reset"):
            self.vad.reset()

    def _append(self, event: dict) -> list[dict]:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ProtocolError("input_audio_buffer.append needs 'audio': base64 of pcm16 24 kHz mono",
                                "missing_required_parameter", "audio")
        pcm = _b64(audio, "audio")
        if len(pcm) % 2:
            raise ProtocolError("'audio' must hold whole 16-bit samples (an even number of bytes)", param="audio")
        if self.segmenter is None:
            buffered = sum(map(len, self.manual)) + len(self.input.rest)
            if (buffered + len(pcm) // 2 * MIC_RATE / API_RATE) / MIC_RATE > MAX_BUFFER_S:
                raise ProtocolError(f"the input audio buffer would exceed {MAX_BUFFER_S:.0f} s (the most the model "
                                    "hears): commit or clear it first", "input_audio_buffer_full", "audio")
            self.manual.extend(self.input.push(pcm))
            return []
        out = []
        for frame in self.input.push(pcm):
            index = self.input.frames_done
            self.input.frames_done += 1
            segment = self.segmenter.push(frame, self.vad(frame), index * FRAME_SECONDS)
            if segment is not None:
                out += self._on_segment(segment, (index + 1) * FRAME_SAMPLES)
        return out

    def _on_segment(self, segment: Segment, end_sample: int) -> list[dict]:
        if segment.event is SpeechEvent.ONSET:
            self.speech_item_id = _new_id("item")
            start_ms = (end_sample - len(segment.audio)) // SAMPLES_PER_MS
            out = [self._event("input_audio_buffer.speech_started", audio_start_ms=start_ms,
                               item_id=self.speech_item_id)]
            if self.response is not None and self.config.turn_detection.interrupt_response:
                if self.metrics:
                    self.metrics.barge_in()
                out += self._cancel_response("turn_detected")
            return out
        item_id, self.speech_item_id = self.speech_item_id or _new_id("item"), None
        out = [self._event("input_audio_buffer.speech_stopped", audio_end_ms=end_sample // SAMPLES_PER_MS,
                           item_id=item_id)]
        out += self._commit_audio(segment.audio, item_id)
        if self.config.turn_detection.create_response:
            out += self._auto_respond(self.clock())
        return out

    def _commit(self, event: dict) -> list[dict]:
        if self.segmenter is not None and self.segmenter.speaking:  # commit the speech heard so far
            audio = np.concatenate(self.segmenter.utterance)
            item_id = self.speech_item_id or _new_id("item")
            self._reset_input()
        else:
            audio = np.concatenate([*self.manual, self.input.take_rest()]) if self.segmenter is None else \
                np.zeros(0, np.float32)
            item_id = _new_id("item")
        if len(audio) < MIN_COMMIT_MS * SAMPLES_PER_MS:
            raise ProtocolError(f"the input audio buffer holds {len(audio) // SAMPLES_PER_MS} ms of audio; a commit "
                                f"needs at least {MIN_COMMIT_MS} ms", "input_audio_buffer_commit_empty")
        self.manual.clear()
        return self._commit_audio(audio, item_id)

    def _commit_audio(self, audio: np.ndarray, item_id: str) -> list[dict]:
        previous = self._last_item_id()
        out = [self._event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)]
        out += self._add_item(Item(item_id, "user", "audio", audio=audio))
        return out

    def _clear(self, event: dict) -> list[dict]:
        self._reset_input()
        return [self._event("input_audio_buffer.cleared")]

    # -- conversation items ------------------------------------------------------------------------------------

    def _add_item(self, item: Item) -> list[dict]:
        previous = self._last_item_id()
        self.items[item.id] = item
        while len(self.items) > MAX_ITEMS:
            self.items.pop(next(iter(self.items)))
        out = self._item_added(item, previous)
        if item.kind == "audio" and self.config.transcribe:
            self._submit(Job(item.id, "transcription", "ASR", audio=item.audio,
                             max_output_tokens=MAX_TRANSCRIPT_TOKENS))
        return out

    def _item_added(self, item: Item, previous: str | None) -> list[dict]:
        if self.dialect == GA:
            added = self._event("conversation.item.added", previous_item_id=previous, item=self._render_item(item))
            if item.role == "assistant":  # its conversation.item.done comes with response.output_item.done
                return [added]
            return [added, self._event("conversation.item.done", previous_item_id=previous,
                                       item=self._render_item(item))]
        return [self._event("conversation.item.created", previous_item_id=previous, item=self._render_item(item))]

    def _last_item_id(self) -> str | None:
        return next(reversed(self.items), None)

    def _render_item(self, item: Item) -> dict:
        if item.role == "assistant":
            content = [answer_part(item.speaks, self.dialect, item.text, in_item=True)] if item.status != "new" else []
        else:  # audio and image data are not sent back (as the protocol does with audio)
            content = [{"type": "input_audio", "transcript": item.text or None}] if item.kind == "audio" else \
                [{"type": "input_text", "text": item.text}] if item.text else []
            content += [{"type": "input_image"}] if item.image is not None else []
        status = "in_progress" if item.status == "new" else item.status
        return {"id": item.id, "object": "realtime.item", "type": "message", "status": status, "role": item.role,
                "content": content}

    def _item_create(self, event: dict) -> list[dict]:
        item = event.get("item")
        if not isinstance(item, dict):
            raise ProtocolError("conversation.item.create needs an 'item' object", "missing_required_parameter", "item")
        if item.get("type", "message") != "message" or item.get("role") not in ("user", "system"):
            raise ProtocolError("only user messages are accepted (type 'message', role 'user'); this model has no "
                                "tools or instructions", param="item.role")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise ProtocolError("a message needs 'content': a list of parts", "missing_required_parameter",
                                "item.content")
        parts = [self._user_part(p, f"item.content[{i}]") for i, p in enumerate(content)]
        item_id = item.get("id") if isinstance(item.get("id"), str) and item["id"] else _new_id("item")
        if item_id in self.items:
            raise ProtocolError(f"an item with id {item_id!r} already exists", "item_already_exists", "item.id")
        merged = Item(item_id, item["role"], "text")  # a system message is kept, not read: no instructions
        for kind, value in parts:
            if kind == "audio":
                merged.kind, merged.audio = "audio", value
            elif kind == "text":
                merged.text = (merged.text + " " + value).strip()
            else:
                merged.image = value
        if merged.audio is None and not merged.text:
            merged.kind = "image"
        return self._add_item(merged)

    def _user_part(self, part: Any, param: str) -> tuple[str, Any]:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_text" and isinstance(part.get("text"), str):
            return "text", part["text"]
        if kind == "input_audio" and isinstance(part.get("audio"), str):
            pcm = _b64(part["audio"], f"{param}.audio")
            if len(pcm) % 2 or len(pcm) // 2 > MAX_BUFFER_S * API_RATE:
                raise ProtocolError(f"{param}.audio must be pcm16 24 kHz mono of at most {MAX_BUFFER_S:.0f} s",
                                    param=f"{param}.audio")
            resampler = Resampler(API_RATE, MIC_RATE)
            return "audio", pcm_to_float(float_to_pcm(resampler(pcm_to_float(pcm))))
        if kind == "input_image":
            if not self.can_see:
                raise ProtocolError("this checkpoint cannot see (Mini-Omni v1): image parts need a Mini-Omni2 "
                                    "checkpoint", "image_input_not_supported", param)
            url = part.get("image_url")
            if not isinstance(url, str) or not url.startswith(IMAGE_DATA_PREFIX) or ";base64," not in url:
                raise ProtocolError(f"{param}.image_url must be a data URL: data:image/jpeg;base64,...",
                                    param=f"{param}.image_url")
            return "image", _b64(url.split(";base64,", 1)[1], f"{param}.image_url")
        raise ProtocolError(f"{param} must be an input_text part with 'text', an input_audio part with 'audio' "
                            f"or an input_image part with 'image_url'", param=param)

    def _item_truncate(self, event: dict) -> list[dict]:
        item = self._find(event.get("item_id"))
        ms = event.get("audio_end_ms")
        if item.role != "assistant" or not item.speaks:
            raise ProtocolError("only assistant audio can be truncated", param="item_id")
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
            raise ProtocolError("audio_end_ms must be an integer >= 0", param="audio_end_ms")
        if ms > item.audio_ms:
            raise ProtocolError(f"audio_end_ms {ms} is beyond the item's {item.audio_ms} ms of audio",
                                param="audio_end_ms")
        item.audio_ms = ms
        if self.metrics:
            self.metrics.truncated()
        return [self._event("conversation.item.truncated", item_id=item.id,
                            content_index=event.get("content_index", 0), audio_end_ms=ms)]

    def _item_delete(self, event: dict) -> list[dict]:
        item = self._find(event.get("item_id"))
        del self.items[item.id]
        return [self._event("conversation.item.deleted", item_id=item.id)]

    def _item_retrieve(self, event: dict) -> list[dict]:
        item = self._find(event.get("item_id"))
        return [self._event("conversation.item.retrieved", item=self._render_item(item))]

    def _find(self, item_id: Any) -> Item:
        if not isinstance(item_id, str) or item_id not in self.items:
            raise ProtocolError(f"no item with id {item_id!r} in the conversation", "item_not_found", "item_id")
        return self.items[item_id]

    # -- responses ------------------------------------------------------------------------------------------------

    def _response_create(self, event: dict) -> list[dict]:
        if self.response is not None:
            raise ProtocolError(f"response {self.response.id} is still in progress: wait for its response.done or "
                                "cancel it", "conversation_already_has_active_response")
        speaks, limit = response_options(self.config, event.get("response"), self.dialect)
        return self._start_response(speaks, limit, None)

    def _auto_respond(self, speech_end: float) -> list[dict]:
        if self.response is not None:  # the interrupted answer is still stopping: answer once it has
            self.answer_pending, self.pending_speech_end = True, speech_end
            return []
        return self._start_response(self.config.speaks, self.config.max_output_tokens, speech_end)

    def _question(self) -> tuple[Item, bytes | None]:
        question = next((i for i in reversed(self.items.values()) if i.role == "user" and i.kind in ("audio", "text")),
                        None)
        if question is None:
            raise ProtocolError("there is no user message to answer: commit audio or create a message first",
                                "no_user_message")
        image = next((i.image for i in reversed(self.items.values()) if i.image is not None), None)
        return question, image

    def _start_response(self, speaks: bool, limit: int | None, speech_end: float | None) -> list[dict]:
        question, image = self._question()
        audio_in = question.kind == "audio"
        task = ("A1" if audio_in else "T1") + ("A2" if speaks else "T2")
        response_id = _new_id("resp")
        job = Job(response_id, "response", task, audio=question.audio if audio_in else None,
                  text=None if audio_in else question.text, image=image if audio_in else None, max_output_tokens=limit)
        item = Item(_new_id("item"), "assistant", "answer", speaks=speaks, status="new")
        self.response = Response(response_id, item, speaks, limit, job, audio_in, speech_end)
        created = self._event("response.created", response=self._render_response("in_progress"))
        previous = self._last_item_id()
        self.items[item.id] = item
        out = [created, self._event("response.output_item.added", response_id=response_id, output_index=0,
                                    item=self._render_item(item))]
        out += self._item_added(item, previous)
        item.status = "in_progress"
        out.append(self._part_event("response.content_part.added", part=answer_part(speaks, self.dialect)))
        self._submit(job)
        return out

    def _render_response(self, status: str, details: dict | None = None, usage_: dict | None = None) -> dict:
        r = self.response
        output = [self._render_item(r.item)] if status != "in_progress" else []
        return render_response(self.dialect, r.id, status, r.speaks, r.max_output_tokens, output, details, usage_,
                               self.conversation_id)

    def _part_event(self, name: str, **fields: Any) -> dict:
        r = self.response
        return self._event(name, response_id=r.id, item_id=r.item.id, output_index=0, content_index=0, **fields)

    def _answer_chunk(self, response: Response, chunk: OmniChunk) -> list[dict]:
        if response.job.cancel.is_set():  # the client no longer wants it: say nothing more
            return []
        out = []
        if chunk.pcm and response.speaks:
            if response.first_audio is None:
                response.first_audio = self.clock()
                if response.speech_end is not None and self.metrics:
                    self.metrics.first_audio(response.first_audio - response.speech_end)
            response.item.audio_ms += len(chunk.pcm) * 1000 // (2 * API_RATE)
            out.append(self._part_event("response.audio.delta", delta=base64.b64encode(chunk.pcm).decode()))
        if chunk.text:
            response.item.text += chunk.text
            name = "response.audio_transcript.delta" if response.speaks else "response.text.delta"
            out.append(self._part_event(name, delta=chunk.text))
        return out

    def _answer_end(self, response: Response, end: JobEnd) -> list[dict]:
        self.jobs.pop(response.id, None)
        flag = response.job.cancel
        status, details = end.status, None
        if flag.is_set():
            status, details = "cancelled", {"type": "cancelled", "reason": flag.reason}
        elif status == "failed":
            details = {"type": "failed", "error": {"type": "server_error", "code": "engine_error",
                                                   "message": end.error}}
        elif end.hit_limit:
            status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        item = response.item
        item.status = "completed" if status == "completed" else "incomplete"
        done = "response.audio.done" if response.speaks else "response.text.done"
        text_done = ("response.audio_transcript.done", {"transcript": item.text}) if response.speaks else None
        out = [self._part_event(done) if response.speaks else self._part_event(done, text=item.text)]
        if text_done:
            out.append(self._part_event(text_done[0], **text_done[1]))
        out.append(self._part_event("response.content_part.done",
                                    part=answer_part(response.speaks, self.dialect, item.text)))
        out.append(self._event("response.output_item.done", response_id=response.id, output_index=0,
                               item=self._render_item(item)))
        if self.dialect == GA:
            out.append(self._event("conversation.item.done", previous_item_id=None, item=self._render_item(item)))
        used = usage(end.prompt_tokens, end.steps, response.audio_in, response.speaks) if end.prompt_tokens else None
        out.append(self._event("response.done", response=self._render_response(status, details, used)))
        if self.metrics:
            self.metrics.response_done(status)
        self.response = None
        if self.answer_pending and not self.closed:
            self.answer_pending = False
            out += self._start_response(self.config.speaks, self.config.max_output_tokens, self.pending_speech_end)
        return out

    def _response_cancel(self, event: dict) -> list[dict]:
        if self.response is None or event.get("response_id") not in (None, self.response.id):
            raise ProtocolError("there is no response in progress to cancel", "response_cancel_not_active")
        return self._cancel_response("client_cancelled")

    def _cancel_response(self, reason: str) -> list[dict]:
        """Ask the engine to stop; `response.done` follows once it has (within one decode step)."""
        self.response.job.cancel.set(reason)
        self.answer_pending = False
        return []

    def _transcribed(self, end: JobEnd) -> list[dict]:
        item = self.items.get(end.key)
        if end.status != "completed":
            if end.status == "cancelled":
                return []
            return [self._event("conversation.item.input_audio_transcription.failed", item_id=end.key,
                                content_index=0, error={"type": "transcription_error", "code": "engine_error",
                                                        "message": end.error})]
        if item is not None:
            item.text = end.text.strip()
        seconds = round(len(item.audio) / MIC_RATE, 3) if item is not None and item.audio is not None else 0.0
        return [self._event("conversation.item.input_audio_transcription.completed", item_id=end.key,
                            content_index=0, transcript=end.text.strip(),
                            usage={"type": "duration", "seconds": seconds})]

    def _submit(self, job: Job) -> None:
        self.jobs[job.key] = job
        self.runner.submit(job)

    # -- events -------------------------------------------------------------------------------------------------

    def _event(self, name: str, **fields: Any) -> dict:
        return {"type": event_name(name, self.dialect), "event_id": _new_id("event"), **fields}

    def _error(self, message: str, code: str, param: str | None = None, event: dict | None = None) -> dict:
        client_event_id = event.get("event_id") if isinstance(event, dict) else None
        return self._event("error", error={"type": "invalid_request_error", "code": code, "message": message,
                                           "param": param, "event_id": client_event_id})


def _b64(value: str, param: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(f"{param} is not valid base64 ({e})", "invalid_base64", param) from e
