"""`/v1/realtime`: the WebSocket transport of the Realtime sessions. It only moves frames.

The handshake is checked (access policy, engine ready, `--max-sessions`) and refused with a JSON body
saying why; then each text frame goes to the session's `receive()`, the engine's progress to `on_job()`,
and whatever they return goes out as text frames. Engine calls go through the service's admission, the
same FIFO and the same engine thread as `/chat`: a job is admitted before its engine call is set up.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from omni import INPUT_SAMPLE_RATE, GenerationConfig, OmniChunk, Task, prompt_length
from ..asgi import Receive, Scope, Send, send_json, wsgi_environ
from ..formats import Summary
from ..service import Admission, EngineService, Refused
from .jobs import SPECULATION_DROPPED, Job, JobChunk, JobEnd
from .protocol import BETA, GA
from .session import RealtimeSession

log = logging.getLogger("omni.realtime")

BETA_HEADER = "realtime=v1"  # OpenAI-Beta header value of the beta protocol
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"  # the same, as a WebSocket subprotocol (browsers)
SUBPROTOCOL = "realtime"
DEFAULT_MAX_SESSIONS = 4
SESSION_RETRY_AFTER_S = 5  # a refused handshake's Retry-After: sessions end at their clients' pace, not ours
DEFAULT_IDLE_TIMEOUT_S = 600.0  # a session with no client event and no engine job for this long is closed
INTERNAL_ERROR = 1011  # WebSocket close code: the server hit an unexpected condition
# Client frames read but not yet handled. Beyond it the session stops reading, so uvicorn stops reading the
# socket and the client's sends wait (TCP back-pressure) instead of the frames piling up in the server's memory.
MAX_FRAMES_AHEAD = 4
NORMAL_CLOSURE = 1000  # WebSocket close code of a session the server ends on purpose (idle)
# Bytes of events waiting for a client that does not read them (beyond what the socket buffers already hold).
# A client reading as it should never gets near it: a whole answer of 4096 steps is about 4 MB of audio deltas.
# Beyond it the session's answer is cancelled and the session closed, so nothing piles up in the server.
MAX_UNSENT_BYTES = 8 * 1024 * 1024
# Frames in an answer's first audio delta. The first chunk plays while the second is made, and the second
# waits for more steps than any later one (SNAC's whole look-ahead, omni/codec.py): with a first chunk of
# the usual 4 frames (341 ms) a client that plays on arrival ran dry 4-105 ms at 0.34 s into nearly every
# answer (fast mode, full-size model, AMD EPYC with AVX2, 2026-12-04). 6 frames start the audio 2 decode
# steps later and keep it ahead from there.
FIRST_CHUNK_FRAMES = 6
POLICY_VIOLATION = 1008  # WebSocket close code of a session closed for what its client did (not reading)
CLOSE_WAIT_S = 10.0  # how long a closing session waits for its last events and close frame to go out

# The access check: WSGI environ -> (HTTP status, reason) to refuse, or None. server.py plugs in the policy.
AccessCheck = Callable[[dict], "tuple[int, str] | None"]


def _allow_all(environ: dict) -> None:
    return None


@dataclass(frozen=True)
class _Closed:
    """The session ends: the client's side has gone (reason None), or the server ends it, saying why: with
    this close code, after the events still unsent (`flush`) or without them."""

    reason: str | None = None
    code: int = NORMAL_CLOSURE
    flush: bool = True


class ServiceRunner:
    """Runs one session's jobs in order on a thread of its own, through the service's admission."""

    def __init__(self, service: EngineService, post: Callable[[object], None]) -> None:
        self.service, self.post = service, post
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="realtime-job")

    def submit(self, job: Job) -> None:
        self.pool.submit(self._run, job)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: Job) -> None:
        try:
            self.post(self._answer(job))
        except Exception as e:  # reported to the client in-band; the session and the server go on
            log.exception("realtime job %s failed", job.key)
            self.post(JobEnd(job.key, "failed", f"{type(e).__name__}: {e}"))

    def _answer(self, job: Job) -> JobEnd:
        """Admitted first (as /chat is), then the engine's stream set up, then run when its turn comes."""
        prompt, max_tokens = self._budget(job)
        positions = self.service.engine.config.block_size
        if prompt > positions:  # named here, not as the engine's max_tokens the client never set
            return JobEnd(job.key, "failed", f"the question takes {prompt} positions; the model reads at most "
                                             f"{positions}: shorten it")
        try:
            turn = self.service.admit(conversation=False)  # the session was counted at its handshake
            chunks = turn.prepare(lambda: self._stream(job, max(max_tokens, prompt + 1)))
        except Refused as e:
            return JobEnd(job.key, "failed", e.message)
        except ValueError as e:
            return JobEnd(job.key, "failed", str(e))
        turn.record.input_seconds = round(job.audio.size / INPUT_SAMPLE_RATE, 3) if job.audio is not None else 0.0
        if not turn.wait(job.cancel.is_set):
            return JobEnd(job.key, "cancelled")
        return self._run_answer(job, turn, chunks, prompt, max_tokens)

    def _budget(self, job: Job) -> tuple[int, int]:
        """The prompt length of `job` and its max_tokens (which count the prompt too)."""
        engine = self.service.engine
        text_ids = engine.text_ids(job.text) if job.text is not None else None
        prompt = prompt_length(Task(job.task), job.audio, text_ids, job.image is not None)
        limit = engine.config.block_size + 1
        max_tokens = min(limit, prompt + job.max_output_tokens) if job.max_output_tokens else \
            GenerationConfig().max_tokens
        return prompt, max_tokens

    def _stream(self, job: Job, max_tokens: int) -> Iterator[OmniChunk]:
        """The engine's chunks for `job`, not yet started."""
        return self.service.engine.stream(
            job.audio, text=job.text, task=Task(job.task), image=job.image, cancel=job.cancel,
            sample_rate=INPUT_SAMPLE_RATE if job.audio is not None else None, max_tokens=max_tokens,
            first_stride=FIRST_CHUNK_FRAMES)

    def _run_answer(self, job: Job, turn: Admission, chunks: Iterator[OmniChunk], prompt: int,
                    max_tokens: int) -> JobEnd:
        steps, text, status, error = 0, "", "cancelled", None
        for event in turn.answer(chunks, job.cancel.is_set):
            if isinstance(event, OmniChunk):
                steps += len(event.steps)
                text += event.text
                if job.kind == "response":
                    self.post(JobChunk(job.key, event))
            elif isinstance(event, Summary):
                status, error = event.outcome, event.error
        status = "failed" if status == "error" else status
        # the engine has stopped: how many steps it ran past the cancel (a barge-in's or the client's)
        if job.cancel.steps_after is not None and job.cancel.reason != SPECULATION_DROPPED:
            self.service.metrics.realtime.cancel_steps(job.cancel.steps_after)
        return JobEnd(job.key, status, error, steps, prompt, hit_limit=steps >= max_tokens - prompt, text=text)


class RealtimeEndpoint:
    """The ASGI route of `/v1/realtime`."""

    def __init__(self, service: EngineService, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 access: AccessCheck = _allow_all, vad_factory: Callable[[], Callable] | None = None,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> None:
        self.service, self.max_sessions, self.access = service, max_sessions, access
        self.idle_timeout_s = idle_timeout_s
        self.vad_factory = vad_factory or _silero
        self.open = 0
        self._lock = threading.Lock()
        service.open_sessions = lambda: self.open

    def refusal(self, scope: Scope) -> tuple[int, str] | None:
        """Why this handshake is refused, or None."""
        refused = self.access(wsgi_environ(scope, b""))
        if refused is not None:
            return refused
        if self.service.engine is None:
            return 503, f"the model is {self.service.status}; retry when GET /health says ready"
        if self.open >= self.max_sessions:
            return 503, (f"too many open realtime sessions ({self.max_sessions}, --max-sessions): close one or "
                         f"retry in {SESSION_RETRY_AFTER_S} s (Retry-After)")
        return (503, over) if (over := self.service.over_capacity()) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        refused = self.refusal(scope)
        if refused is not None:
            self.service.metrics.realtime_refused.labels(str(refused[0])).inc()
            retry = {"Retry-After": str(SESSION_RETRY_AFTER_S)} if refused[0] == 503 else None
            await send_json(send, refused[0], {"error": refused[1]}, kind="websocket", extra_headers=retry)
            return
        with self._lock:
            self.open += 1
        self.service.metrics.realtime_sessions.set(self.open)
        outbox = Outbox(send)
        try:
            closing = await self._serve(scope, receive, send, outbox)
        except BaseException:  # the server is shutting down: nothing more goes out
            outbox.cancel()
            raise
        finally:  # the slot is free once the session's work has stopped, before its last frames go out
            with self._lock:
                self.open -= 1
            self.service.metrics.realtime_sessions.set(self.open)
        await outbox.close(closing)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, outbox: Outbox) -> _Closed:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        beta = headers.get("openai-beta", "").replace(" ", "") == BETA_HEADER or BETA_SUBPROTOCOL in offered
        accept = {"type": "websocket.accept"}
        if offered:
            accept["subprotocol"] = SUBPROTOCOL if SUBPROTOCOL in offered else offered[0]
        await send(accept)
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        runner = ServiceRunner(self.service, lambda update: loop.call_soon_threadsafe(inbox.put_nowait, update))
        engine = self.service.engine
        session = RealtimeSession(runner, dialect=BETA if beta else GA, model=engine.family, can_see=engine.can_see,
                                  vad=self.vad_factory(), metrics=self.service.metrics.realtime,
                                  speculative=self.service.speculative_turns)
        ahead = asyncio.Semaphore(MAX_FRAMES_AHEAD)
        reader = asyncio.create_task(self._read(receive, inbox, ahead))
        try:
            return await self._pump(session, inbox, ahead, outbox)
        except Exception:  # a bug in the server, not in the client's events (the session answers those)
            log.exception("realtime session %s failed", session.ctx.id)
            return _Closed("internal server error", INTERNAL_ERROR, flush=False)
        finally:
            session.close()  # the engine stops this session's answer within one decode step
            runner.close()
            reader.cancel()

    async def _pump(self, session: RealtimeSession, inbox: asyncio.Queue, ahead: asyncio.Semaphore,
                    outbox: Outbox) -> _Closed:
        """Client frames and the engine's progress into the session, its events out, until the session ends:
        the client leaves, stops reading what the session sends, or idles past the timeout."""
        outbox.put(session.start())
        while not isinstance(item := await self._next(session, inbox), _Closed):
            if isinstance(item, (str, bytes)):
                events = session.receive(item)
                ahead.release()  # handled: the reader may take the next frame
            else:
                events = session.on_job(item)
            if not outbox.put(events):
                log.warning("realtime session %s closed: its client does not read (%d bytes unsent)",
                            session.ctx.id, outbox.bytes)
                return _Closed(f"client not reading: over {MAX_UNSENT_BYTES} bytes unsent (MAX_UNSENT_BYTES)",
                               POLICY_VIOLATION, flush=False)
        if item.reason is not None:  # idle: the client hears why first
            outbox.put([session.ctx.error(item.reason, "session_idle_timeout")])
            return _Closed("idle timeout", NORMAL_CLOSURE)
        return item

    async def _next(self, session: RealtimeSession, inbox: asyncio.Queue) -> object:
        """The next client frame or engine update; a _Closed with a reason once the session has idled too long
        (nothing from the client and no engine job of its own for --idle-timeout seconds)."""
        while True:
            try:
                return await asyncio.wait_for(inbox.get(), self.idle_timeout_s)
            except asyncio.TimeoutError:
                if not session.ctx.jobs:  # a job waiting its turn in the engine's queue is not idleness
                    return _Closed(f"no event for {self.idle_timeout_s:g} s (--idle-timeout): the session is "
                                   "closed; open a new one")

    @staticmethod
    async def _read(receive: Receive, inbox: asyncio.Queue, ahead: asyncio.Semaphore) -> None:
        while True:
            await ahead.acquire()
            message = await receive()
            if message["type"] == "websocket.disconnect":
                inbox.put_nowait(_Closed())
                return
            inbox.put_nowait(message["text"] if message.get("text") is not None else message.get("bytes", b""))


class Outbox:
    """Events on their way to the client. A writer task sends them in order, so the session never waits on a
    slow socket; `put()` says when more than MAX_UNSENT_BYTES wait (the client does not read them)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.frames: deque[str] = deque()
        self.bytes = 0  # of the frames not yet taken by the socket (JSON is ASCII: one byte a character)
        self.ready = asyncio.Event()  # there are frames to send
        self.idle = asyncio.Event()  # nothing more will be sent: all went out, or the socket has closed
        self.idle.set()
        self.writer = asyncio.create_task(self._write())

    def put(self, events: list[dict]) -> bool:
        """Queue `events`; False once the unsent bytes pass the bound."""
        for event in events:
            text = json.dumps(event, allow_nan=False)  # a frame a browser's JSON.parse reads, or a server bug
            self.frames.append(text)
            self.bytes += len(text)
        if self.frames:
            self.idle.clear()
            self.ready.set()
        return self.bytes <= MAX_UNSENT_BYTES

    async def _write(self) -> None:
        try:
            while True:
                await self.ready.wait()
                self.ready.clear()
                while self.frames:
                    await self.send({"type": "websocket.send", "text": self.frames[0]})
                    self.bytes -= len(self.frames.popleft())
                self.idle.set()
        except (OSError, RuntimeError):  # the socket closed under us (uvicorn raises ClientDisconnected)
            self.idle.set()

    async def close(self, closing: _Closed) -> None:
        """Send what waits (unless the client is not reading it), then the close frame, within CLOSE_WAIT_S;
        nothing more when the client has gone."""
        if closing.reason is None:
            self.cancel()
            return

        async def finish() -> None:
            if closing.flush:
                await self.idle.wait()
            self.cancel()
            await self.send({"type": "websocket.close", "code": closing.code, "reason": closing.reason})
        try:
            await asyncio.wait_for(finish(), CLOSE_WAIT_S)
        except (OSError, RuntimeError, asyncio.TimeoutError):  # closed already, or a client that reads nothing
            pass

    def cancel(self) -> None:
        self.writer.cancel()
        self.frames.clear()


def _silero():
    from voice.vad import SileroVad  # onnxruntime is loaded when the first session opens, not at import
    return SileroVad()
