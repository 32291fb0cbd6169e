"""What a session asks of the engine, and what comes back: the seam between the socket-free session and the
transport that runs engine calls (`transport.ServiceRunner`; the tests' fake runner)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from omni import OmniChunk

SPECULATION_DROPPED = "speculation_dropped"  # the cancel reason of an answer started at a pause the speech went on


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
    def speculative_turn(self, outcome: str) -> None: ...
