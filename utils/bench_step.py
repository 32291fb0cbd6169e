"""What one decode step does besides reading weights: its torch operations, its kernel calls, its time.

    python -m utils.bench_step --ckpt-dir DIR [--mode fast] [--steps 40]

Loads the engine and, after a warm-up, runs `--steps` decode steps of a freshly prefilled A1A2 answer
four times: counting the torch operations dispatched (aten ops, through a TorchDispatchMode) and the calls
into this project's C kernels (`omni.rowkernels`); timing those calls; then timed
with nothing counting, in wall time and in CPU time. The step's time outside the kernels is its overhead
(Python, small torch operations, attention). A developer's tool: it reads the engine's internals on purpose.
"""
from __future__ import annotations

import argparse
import statistics
import time
import wave
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from omni import Task, rowkernels
from omni.generate import Sequence, decode_step
from omni.sampling import GenerationConfig
from omni_engine import OmniEngine

ROOT = Path(__file__).resolve().parent.parent
QUESTION = ROOT / "data" / "samples" / "output4.wav"


class CountOps(TorchDispatchMode):
    """Counts every aten operation dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class CountCalls:
    """Wraps the loaded kernels' entry points so every call is counted and timed (undone on exit)."""

    def __enter__(self) -> CountCalls:
        self.calls, self.seconds = 0, 0.0
        self.saved = dict(rowkernels._entries)

        def counted(entry):
            def call(*args):
                self.calls += 1
                start = time.perf_counter()
                entry(*args)
                self.seconds += time.perf_counter() - start
            return call

        for name, entry in self.saved.items():
            rowkernels._entries[name] = counted(entry)
        return self

    def __exit__(self, *exc) -> None:
        rowkernels._entries.update(self.saved)


def answer(engine: OmniEngine, samples, steps: int) -> Sequence:
    """A prefilled A1A2 answer with room for `steps` more decode steps."""
    inputs = engine.prepare(Task.A1A2, samples, None)
    cfg = GenerationConfig(max_tokens=inputs.prompt.size(-1) + 2 + steps)
    seq = Sequence(engine.model, inputs.prompt, inputs.decoder, cfg, inputs.audio_features, None,
                   engine.runtime.cost, torch.Generator().manual_seed(0))
    for _ in seq.prefill():
        pass
    return seq


def run_steps(engine: OmniEngine, seq: Sequence, steps: int, clock=time.perf_counter) -> list[float]:
    """Each step's time by `clock`: wall time, or `time.process_time` (the CPU time of this process's
    threads, which other work on a loaded machine inflates much less)."""
    times = []
    for _ in range(steps):
        start = clock()
        decode_step(engine.model, [seq])
        times.append(clock() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--mode", default="fast")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--top", type=int, default=12, help="the most frequent operations listed")
    args = parser.parse_args()
    with wave.open(str(QUESTION)) as w:
        samples = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    engine = OmniEngine(args.ckpt_dir, mode=args.mode)
    run_steps(engine, answer(engine, samples, args.steps), args.steps)  # warm
    seq = answer(engine, samples, args.steps)
    with CountOps() as ops, CountCalls() as calls:
        run_steps(engine, seq, args.steps)
    seq = answer(engine, samples, args.steps)
    with CountCalls() as kernels:
        counted = run_steps(engine, seq, args.steps)
    times = run_steps(engine, answer(engine, samples, args.steps), args.steps)
    cpu = run_steps(engine, answer(engine, samples, args.steps), args.steps, time.process_time)
    n = args.steps
    print(f"mode {engine.mode}, {n} steps of one A1A2 answer (2 rows)")
    print(f"per step: {sum(ops.ops.values()) / n:.0f} aten ops, {calls.calls / n:.0f} kernel calls, "
          f"step p50 {statistics.median(times) * 1000:.2f} ms, best {min(times) * 1000:.2f} ms, "
          f"CPU time p50 {statistics.median(cpu) * 1000:.2f} ms")
    print(f"while timing the kernels: step {sum(counted) / n * 1000:.2f} ms, of which "
          f"{kernels.seconds / n * 1000:.2f} ms in the kernels")
    for name, count in ops.ops.most_common(args.top):
        print(f"  {name:32s} {count / n:6.1f}")


if __name__ == "__main__":
    main()
