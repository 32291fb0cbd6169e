"""Continuous batching: every active request's model work in one loop, decode steps batched.

Each request is a `Job`: a setup generator (its encoder, prompt and prefill, in units that yield
between them) that returns a `Sequence`, then that sequence's decode steps. A turn of the loop runs
one unit of the oldest request still setting up, then one decode step of every request that is
decoding, all rows together (`decode_step`). A request joins the batch when its prefill ends and
leaves it the step it stops, is cancelled or is dropped by its consumer.

Barge-in: a cancelled request's exit runs before anything else. Every job's `interrupted` is read
at every boundary between units of work (before a setup unit, before a decode step, before each
request's step goes out to its audio decoder), so a cancel waits for at most the unit in progress,
and no unit is longer than about one decode step (the encoder runs in half blocks, the prefill in
chunks of PREFILL_CHUNK positions).

There is no scheduler thread: a thread waiting for its request's next piece runs turns for everyone
(`drive_until`) while the others wait for it to finish a turn. Measured on a 2-core CPU, torch's
OpenMP products ran ~1.5x slower on a second thread than on the thread that had already run them,
so a server keeps every turn on one thread of its own (`drive_elsewhere`, `run_turns`): the threads
serving its requests only wait, each woken by the turn that made its own piece, so no request waits
for another's piece (a cancel's exit, a chunk) to be handed over.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .generate import Sequence, Step, decode_step
from .model import OmniLM
from .units import Units

Setup = Units[Sequence]
DRIVER_WAIT_S = 0.05  # a waiting thread re-checks this often, besides being woken after every turn
# Weight of the newest decode step in the moving estimate of a frame's time (`BatchStats.frame_seconds`):
# about the last 20 steps, five SNAC chunks at stride 4, so the estimate follows load without jumping.
# Until there are that many, it is their plain mean (the warm-up answer's 12 steps fill it at start-up).
FRAME_EMA_WEIGHT = 0.05


@dataclass
class Job:
    """One request inside the scheduler.

    `on_step` gets each `Step` (first the prefill's); `on_end` is called once when the request has
    ended: with the exception that ended it, or None, and whether a cancel ended it. Both run on the
    driving thread. `cancel` is polled before every decode step; `interrupted`, a side-effect-free
    read of the same state (an Event's `is_set`), between every two units of work, even during the
    setup; when it is true, `cancel` is called once to confirm. `Scheduler.close` drops the job.
    """

    setup: Setup
    on_step: Callable[[Step], None]
    on_end: Callable[[BaseException | None, bool], None]
    cancel: Callable[[], bool] = lambda: False
    on_decode_time: Callable[[float], None] = lambda seconds: None
    interrupted: Callable[[], bool] = lambda: False
    sequence: Sequence | None = None
    closed: bool = False


@dataclass
class BatchStats:
    """Decode steps and their time by batch size (requests decoding together), admissions, and units
    of work run (setup units and decode steps: what a cancel may wait for)."""

    steps: dict[int, int] = field(default_factory=dict)
    step_seconds: dict[int, float] = field(default_factory=dict)
    queue_waits: int = 0  # requests admitted into the batch so far
    active: int = 0  # requests in the scheduler now (setting up or decoding)
    units: int = 0
    # by batch size, a moving estimate of the seconds one decode step and its requests' audio take:
    # the wall time in which each of them gets one more frame
    frame_seconds: dict[int, float] = field(default_factory=dict)
    frames: dict[int, int] = field(default_factory=dict)  # steps seen by batch size

    def step(self, batch: int, seconds: float) -> None:
        self.steps[batch] = self.steps.get(batch, 0) + 1
        self.step_seconds[batch] = self.step_seconds.get(batch, 0.0) + seconds

    def frame(self, batch: int, seconds: float) -> None:
        """Count one decode step of `batch` requests and their audio; the first at each batch size pays
        first-call costs (new shapes) and is left out of the estimate."""
        seen = self.frames[batch] = self.frames.get(batch, 0) + 1
        if seen == 1:
            return
        old = self.frame_seconds.get(batch, seconds)
        self.frame_seconds[batch] = old + max(FRAME_EMA_WEIGHT, 1 / (seen - 1)) * (seconds - old)


class Scheduler:
    """Runs up to `max_batch` requests at once on `model`; more wait in arrival order.

    `on_idle` runs (on the driving thread) whenever the last request has left.
    """

    def __init__(self, model: OmniLM, max_batch: int, on_idle: Callable[[], None] = lambda: None) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.model = model
        self.max_batch = max_batch
        self.on_idle = on_idle
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._driving = threading.Lock()  # held by the thread running a turn
        self._idle = True
        self._request_turns: Callable[[], None] | None = None  # set by `drive_elsewhere`

    def submit(self, job: Job) -> Job:
        with self._cond:
            self._waiting.append(job)
        return job

    def drive_elsewhere(self, request_turns: Callable[[], None]) -> None:
        """From now on turns run only in `run_turns`, on a thread the caller owns: a thread waiting for its
        request's piece calls `request_turns()`, which must see that thread running `run_turns` (started, or
        already running) and return at once, then waits for the turns."""
        self._request_turns = request_turns

    def run_turns(self) -> None:
        """Run turns, waking the waiting threads after each, until no request is in the loop."""
        while self.has_work():
            with self._driving:
                self._turn()
            with self._cond:
                self._cond.notify_all()

    def has_work(self) -> bool:
        with self._cond:
            return bool(self._waiting or self._active)

    def drive_until(self, ready: Callable[[], bool]) -> None:
        """Run turns on this thread until `ready()`; while another thread drives, wait for its turns.
        After `drive_elsewhere`, only wait (asking for turns)."""
        while self._request_turns is not None and not ready():
            self._request_turns()
            with self._cond:
                if not ready():
                    self._cond.wait(DRIVER_WAIT_S)
        while not ready():
            if self._driving.acquire(blocking=False):
                try:
                    if not ready():
                        self._turn()
                finally:
                    self._driving.release()
                    with self._cond:
                        self._cond.notify_all()
            else:
                with self._cond:
                    if not ready():
                        self._cond.wait(DRIVER_WAIT_S)

    def close(self, job: Job) -> None:
        """Drop `job` (its consumer is gone): now if no thread is driving, else at the driver's next turn."""
        job.closed = True
        if not self._driving.acquire(blocking=False):
            return
        try:
            self._admit()
            self._drop_stopped()
            self._check_idle()
        finally:
            self._driving.release()

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        """No request in the loop, and `on_idle` done."""
        return self._idle

    def _turn(self) -> None:
        try:
            if not self._admit():
                return
            self._drop_stopped()
            self._reap_cancelled()
            setting_up = [job for job in self._active if job.sequence is None]
            if setting_up:
                self._setup_unit(setting_up[0])
                self._reap_cancelled()
            decoding = [job for job in self._active if job.sequence is not None]
            if decoding:
                self._decode(decoding)
            self._check_idle()
        except Exception as e:  # noqa: BLE001 - a bug here must not leave consumers waiting forever
            self._fail_all(e)

    def _check_idle(self) -> None:
        if not self._idle and not self._active and not self._waiting:
            self.on_idle()
            self._idle = True

    def _admit(self) -> bool:
        """Move waiting jobs into the batch (closed ones leave at once); False when there is no work."""
        with self._cond:
            for job in [job for job in self._waiting if job.closed or _interrupted(job)]:
                self._waiting.remove(job)
                job.on_end(None, not job.closed)
            while self._waiting and len(self._active) < self.max_batch:
                self._active.append(self._waiting.popleft())
                self.stats.queue_waits += 1
            self.stats.active = len(self._active)
            if self._active:
                self._idle = False
            return bool(self._active)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            jobs, self._active = [*self._active, *self._waiting], []
            self._waiting.clear()
        for job in jobs:
            job.on_end(error, False)

    def _drop_stopped(self) -> None:
        for job in [job for job in self._active if job.closed]:
            self._end(job)

    def _reap_cancelled(self) -> None:
        """End every active job whose cancel has been set (its exit before any more work)."""
        for job in [job for job in self._active if job.interrupted()]:
            self._ended_by_cancel(job)

    def _ended_by_cancel(self, job: Job) -> bool:
        """Poll `job`'s cancel; end it if set (or if the cancel callable fails: that ends this job only)."""
        try:
            cancelled = job.cancel()
        except Exception as e:  # noqa: BLE001 - a broken cancel callable ends its own request only
            self._end(job, e)
            return True
        if cancelled:
            self._end(job, cancelled=True)
        return bool(cancelled)

    def _end(self, job: Job, error: BaseException | None = None, cancelled: bool = False) -> None:
        self._active.remove(job)
        job.setup.close()
        job.on_end(error, cancelled)

    def _emit(self, job: Job, step: Step) -> None:
        """Hand a step to its request (which may decode audio with it); end the request when it is done."""
        try:
            job.on_step(step)
        except Exception as e:  # noqa: BLE001 - its audio failed: this request ends, the others go on
            self._end(job, e)
            return
        if job.sequence.finished:
            self._end(job)

    def _setup_unit(self, job: Job) -> None:
        """One unit of a newcomer's setup; when it completes, the prefill's step goes out."""
        self.stats.units += 1
        try:
            next(job.setup)
            return
        except StopIteration as done:
            job.sequence = done.value
        except Exception as e:  # noqa: BLE001 - the request fails, the others go on
            self._end(job, e)
            return
        self._emit(job, job.sequence.first)

    def _decode(self, jobs: list[Job]) -> None:
        """Poll each job's cancel, then one step of those still going, all together."""
        going = [job for job in jobs if not self._ended_by_cancel(job)]
        if not going:
            return
        start = time.perf_counter()
        try:
            steps = decode_step(self.model, [job.sequence for job in going])
        except Exception as e:  # noqa: BLE001 - a failed step fails the requests in it
            for job in going:
                self._end(job, e)
            return
        seconds = time.perf_counter() - start
        self.stats.step(len(going), seconds)
        self.stats.units += 1
        for job, step in zip(going, steps):
            job.on_decode_time(seconds)
            self._reap_cancelled()  # a step's audio may take a while: a cancel meanwhile drops its step
            if job not in self._active:
                continue
            if step is None:
                self._end(job)
            else:
                self._emit(job, step)
        self.stats.frame(len(going), time.perf_counter() - start)


def _interrupted(job: Job) -> bool:
    """A waiting job's cancel, read without side effects; confirmed by its `cancel` like an active one's."""
    try:
        return job.interrupted() and job.cancel()
    except Exception:  # noqa: BLE001 - a broken cancel: the job runs and fails at its first poll, as before
        return False
