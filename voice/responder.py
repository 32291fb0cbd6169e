"""Runs `engine.stream()` off the loop's thread and hands its chunks back, tagged with their turn."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from omni import OmniChunk

from .ports import Engine
from .signal import MIC_RATE

ENGINE_TIMEOUT_S = 300.0  # lockstep waits at most this long for the engine's next chunk


@dataclass(frozen=True)
class AnswerEvent:
    turn: int
    chunk: OmniChunk | None  # None when the answer has ended
    wall: float  # time.perf_counter() when it happened (for latency and real-time factor)
    error: Exception | None = None


class Responder:
    """One generation at a time on a worker thread; `cancel()` ends the running one within a decode step."""

    def __init__(self, engine: Engine, **options: Any) -> None:
        self.engine = engine
        self.options = options  # GenerationConfig fields passed to every stream() call
        self.events: queue.Queue[AnswerEvent] = queue.Queue()
        self._cancel = threading.Event()
        self._worker: threading.Thread | None = None

    def ask(self, turn: int, audio: np.ndarray, image: np.ndarray | None) -> None:
        """Start answering `audio` (float32, 16 kHz), after the previous answer has stopped."""
        previous, self._cancel = self._worker, threading.Event()
        kwargs = dict(self.options, sample_rate=MIC_RATE, cancel=self._cancel)
        if image is not None:
            kwargs["image"] = image
        self._worker = threading.Thread(target=self._answer, args=(turn, audio, kwargs, previous),
                                        name=f"answer-{turn}", daemon=True)
        self._worker.start()

    def cancel(self) -> None:
        self._cancel.set()

    def poll(self, wait: bool = False) -> list[AnswerEvent]:
        """Events so far; with `wait`, block until there is at least one."""
        events = []
        if wait:
            try:
                events.append(self.events.get(timeout=ENGINE_TIMEOUT_S))
            except queue.Empty as e:
                raise RuntimeError(f"the engine produced nothing for {ENGINE_TIMEOUT_S:.0f} s") from e
        while not self.events.empty():
            events.append(self.events.get_nowait())
        return events

    def close(self) -> None:
        """Cancel and wait for the running answer."""
        self.cancel()
        if self._worker is not None:
            self._worker.join()

    def _answer(self, turn: int, audio: np.ndarray, kwargs: dict[str, Any],
                previous: threading.Thread | None) -> None:
        if previous is not None:
            previous.join()
        try:
            for chunk in self.engine.stream(audio, **kwargs):
                self.events.put(AnswerEvent(turn, chunk, time.perf_counter()))
        except Exception as e:  # noqa: BLE001 - handed to the loop, which reports it and ends the turn
            self.events.put(AnswerEvent(turn, None, time.perf_counter(), e))
            return
        self.events.put(AnswerEvent(turn, None, time.perf_counter()))
