"""Work written in units: a generator that yields between them, so a scheduler can interleave other work.

The Whisper encoder (a block per unit) and a request's setup (encoder, prefill chunks) are written this
way; the scheduler runs their units between decode steps, and `drain` runs them straight through.
"""
from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")
Units = Generator[None, None, T]


def drain(units: Units[T]) -> T:
    """Run work written in units to the end; its result."""
    while True:
        try:
            next(units)
        except StopIteration as done:
            return done.value
