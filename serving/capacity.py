"""Admission by real-time capacity: how many conversations this machine can speak at once in real time.

Each decode step gives every request decoding in it one frame of audio (SECONDS_PER_FRAME of playing
time). With n requests decoding together, a step and their audio take `frame_seconds(n)`; all n keep real
time while that stays within REALTIME_SHARE of a frame (the rest is margin for a newcomer's encoder and
prefill, which run between the steps, and for whatever else the machine does). The capacity is the
largest such n, up to the engine's `max_batch`; one more conversation is refused rather than admitted to
make everyone's audio stutter.

The frame times come from a `FrameTimes`: live, the scheduler's moving estimate per batch size
(`omni.batch.BatchStats.frame_seconds`, first filled by the warm-up answer at start-up), or a fixed table
(`MINI_OMNI_FRAME_SECONDS`: figures measured elsewhere, or a test's).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

from omni.auto import REALTIME_SHARE
from omni.codec import SECONDS_PER_FRAME

FRAME_SECONDS_ENV = "MINI_OMNI_FRAME_SECONDS"  # "1=0.031,2=0.040": seconds per frame by requests decoding
# Growth of a step's time per extra request where only smaller batches were measured: exact mode's step
# of 2 requests cost 1.62x one on the AMD EPYC (fast mode 1.25x); the larger keeps the guess on the safe side.
ASSUMED_GROWTH = 0.62


class FrameTimes(Protocol):
    def measured(self) -> Mapping[int, float]:
        """Seconds per frame (a decode step and its audio) by requests decoding together, as known now."""


class LiveFrameTimes:
    """The scheduler's own moving estimate (a `BatchStats`)."""

    def __init__(self, stats) -> None:
        self.stats = stats

    def measured(self) -> Mapping[int, float]:
        return dict(self.stats.frame_seconds)


class FixedFrameTimes:
    def __init__(self, table: Mapping[int, float]) -> None:
        self.table = dict(table)

    def measured(self) -> Mapping[int, float]:
        return self.table

    @classmethod
    def from_env(cls) -> FixedFrameTimes | None:
        """The table `MINI_OMNI_FRAME_SECONDS` sets, or None; a malformed one is a start-up error."""
        text = os.environ.get(FRAME_SECONDS_ENV, "").strip()
        if not text:
            return None
        try:
            table = {int(n): float(s) for n, s in (item.split("=") for item in text.split(","))}
        except ValueError as e:
            raise ValueError(f"{FRAME_SECONDS_ENV}={text!r}: expected 'requests=seconds,...', "
                             f"e.g. '1=0.03,2=0.04'") from e
        if not table or min(table) < 1 or min(table.values()) <= 0:
            raise ValueError(f"{FRAME_SECONDS_ENV}={text!r}: request counts from 1, seconds above 0")
        return cls(table)


def frame_seconds(measured: Mapping[int, float], n: int) -> float | None:
    """Seconds per frame with `n` requests decoding: measured, else extrapolated on the line through the
    two largest measured batch sizes below n (one measured: ASSUMED_GROWTH per extra request); None if
    nothing is measured yet."""
    if n in measured:
        return measured[n]
    below = sorted(k for k in measured if k < n)
    if not below:
        above = [k for k in measured if k > n]
        return measured[min(above)] if above else None
    top = below[-1]
    if len(below) > 1:
        per_request = max(0.0, (measured[top] - measured[below[-2]]) / (top - below[-2]))
    else:
        per_request = measured[top] * ASSUMED_GROWTH / top
    return measured[top] + per_request * (n - top)


def realtime_capacity(times: FrameTimes, max_batch: int) -> int | None:
    """Conversations that keep real time together, up to `max_batch`; None: not measured. At least one:
    where not even one keeps real time (a loaded or slow machine), refusing it would help nobody."""
    measured = times.measured()
    if not measured:
        return None
    budget = REALTIME_SHARE * SECONDS_PER_FRAME
    fits = [n for n in range(1, max_batch + 1) if frame_seconds(measured, n) <= budget]
    return max(fits, default=1)


def describe(times: FrameTimes, capacity: int) -> str:
    """Why the capacity is what it is, for a refusal's message."""
    seconds = frame_seconds(times.measured(), capacity + 1)
    return (f"{capacity + 1} answers at once would take {seconds * 1e3:.0f} ms per {SECONDS_PER_FRAME * 1e3:.0f} ms "
            f"frame of audio (at most {REALTIME_SHARE:.0%} keeps real time)")
