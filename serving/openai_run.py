"""One question of an OpenAI route through the service: admitted, checked, waiting its turn, answered.

The same path as `POST /chat` takes (`EngineService.admit()` before any decoding, the turn's record, the
answer's events ending in a `Summary`), for every task, with OpenAI's meaning of `max_tokens`: tokens
generated, where the engine counts prompt and answer together.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from flask import Response, request

from omni import CHUNK_SECONDS, DEFAULT_MAX_TOKENS, INPUT_SAMPLE_RATE, OmniChunk, OmniEngine, load_audio, prompt_length
from .asgi import DISCONNECTED_KEY
from .formats import Event, Summary
from .openai_errors import OpenAIError
from .openai_requests import Question
from .service import Admission, EngineService, Record


@dataclass
class Running:
    """An admitted question whose turn has come: its events (read them once), and its token counts."""

    turn: Admission
    events: Iterator[Event]
    prompt_tokens: int
    budget: int  # generated tokens at most
    summary: Summary | None = None

    @property
    def record(self) -> Record:
        return self.turn.record

    def finish_reason(self) -> str:
        return "length" if self.record.steps >= self.budget else "stop"

    def usage(self) -> dict:
        steps = self.record.steps
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": steps,
                "total_tokens": self.prompt_tokens + steps}

    def chunks(self) -> Iterator[OmniChunk]:
        """The answer's chunks; the closing `Summary` is kept, and an answer that failed mid-way raises."""
        for event in self.events:
            if isinstance(event, Summary):
                self.summary = event
                if event.outcome == "error":
                    raise AnswerFailed(event.error or "the answer failed")
            else:
                yield event


class AnswerFailed(RuntimeError):
    """The engine failed after the response started (the record and the log hold the details)."""


def start(service: EngineService, question: Question, cancel: Callable[[], bool]) -> Running:
    """Admit `question`, check it with the engine, wait for its turn. The caller ends the turn (`turn.finish`)
    when its response closes; a bad question is an `OpenAIError` naming `question.param`."""
    turn = service.admit()
    opened: list[tuple[Iterator[OmniChunk], int, int]] = []
    try:
        chunks = turn.prepare(lambda: _open(service.engine, question, turn.record, cancel, opened))
    except ValueError as e:
        raise OpenAIError(400, str(e), question.param, "invalid_value") from e
    if not turn.wait(cancel):
        raise OpenAIError(499, "the client left while waiting")
    _, prompt, budget = opened[0]
    return Running(turn, turn.answer(chunks, cancel), prompt, budget)


def _open(engine: OmniEngine, q: Question, record: Record, cancel: Callable[[], bool],
          opened: list) -> Iterator[OmniChunk]:
    """The answer's chunks, not started yet (the engine's checks run now); `opened` gets its token counts."""
    samples = None
    if q.audio is not None:
        samples = load_audio(q.audio)  # AudioInputError (a ValueError): not audio, empty, silent
        seconds = samples.size / INPUT_SAMPLE_RATE
        if seconds > CHUNK_SECONDS:
            raise ValueError(f"the audio is {seconds:.1f} s long; the model hears at most {CHUNK_SECONDS} s")
        record.input_seconds = round(seconds, 3)
    text_ids = engine.text_ids(q.text) if q.text is not None else None
    prompt = prompt_length(q.task, samples, text_ids, q.image is not None)
    options = dict(q.sampling)
    limit = DEFAULT_MAX_TOKENS  # the engine's own bound: the model's context
    if q.max_new_tokens is not None:
        limit = options["max_tokens"] = min(prompt + q.max_new_tokens, DEFAULT_MAX_TOKENS)
    chunks = engine.stream(samples, text=q.text, task=q.task, image=q.image,
                           sample_rate=INPUT_SAMPLE_RATE if samples is not None else None, cancel=cancel, **options)
    opened.append((chunks, prompt, limit - prompt))
    return chunks


def _never() -> bool:
    return False


def disconnected_check() -> Callable[[], bool]:
    """The current request's hang-up test (true once its client has gone)."""
    return request.environ.get(DISCONNECTED_KEY, _never)


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def streamed(body: Iterator[bytes], running: Running, mimetype: str, headers: dict | None = None) -> Response:
    """A streamed response whose turn ends when the WSGI server closes it (also when the client left)."""
    response = Response(body, mimetype=mimetype, headers={"X-Request-Id": running.record.id,
                                                          "Cache-Control": "no-store", **(headers or {})})
    response.call_on_close(running.turn.finish)
    return response
