"""What the handlers of one session share: its settings, the engine jobs in flight, and how events are spelled."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .jobs import Job, Metrics, Runner
from .protocol import SessionConfig, event_name, render_session

MAX_EVENT_ID_CHARS = 512  # a client's event_id is echoed in its error only when it is a string this short
MAX_MESSAGE_CHARS = 1000  # an error's message is cut here: it may quote what the client sent


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass
class Context:
    runner: Runner
    dialect: str  # BETA or GA: how this connection spells its events and shapes
    model: str
    can_see: bool  # the checkpoint takes images (Mini-Omni2)
    metrics: Metrics | None = None
    clock: Callable[[], float] = time.perf_counter
    speculative: bool = True  # a spoken turn's answer starts at the first silence after speech (speculation.py)
    id: str = field(default_factory=lambda: new_id("sess"))
    conversation_id: str = field(default_factory=lambda: new_id("conv"))
    config: SessionConfig = field(default_factory=SessionConfig)
    jobs: dict[str, Job] = field(default_factory=dict)  # submitted and not finished
    closed: bool = False  # the client has left

    def event(self, name: str, **fields: Any) -> dict:
        """A server event; `name` in its beta spelling."""
        return {"type": event_name(name, self.dialect), "event_id": new_id("event"), **fields}

    def error(self, message: str, code: str, param: str | None = None, event: dict | None = None) -> dict:
        """An `error` event; the client's event_id is echoed only when the protocol's schema allows it (a string)."""
        client_event_id = event.get("event_id") if isinstance(event, dict) else None
        if not isinstance(client_event_id, str) or len(client_event_id) > MAX_EVENT_ID_CHARS:
            client_event_id = None
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "..."
        return self.event("error", error={"type": "invalid_request_error", "code": code, "message": message,
                                          "param": param, "event_id": client_event_id})

    def session(self) -> dict:
        return render_session(self.config, self.dialect, self.id, self.model)

    def submit(self, job: Job) -> None:
        self.jobs[job.key] = job
        self.runner.submit(job)
