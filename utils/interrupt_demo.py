"""Simulate conversations through the real loop and engine, and print the barge-in and echo figures.

    python -m utils.interrupt_demo [--ckpt-dir DIR] [--device cpu]

Without --ckpt-dir a tiny random checkpoint is made in a temporary directory (as the tests do). The same
scenarios run in `tests/test_interrupt.py`; see utils/voice_scenarios.py.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

TINY_SEED = 0  # the tests' tiny checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Barge-in and echo-guard report on a simulated conversation.")
    p.add_argument("--ckpt-dir", help="checkpoint directory (default: a tiny random one, made for this run)")
    p.add_argument("--device", default="cpu", help="engine device")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from omni_engine import OmniEngine
    from utils.voice_scenarios import report
    from utils.make_checkpoint import make_checkpoint

    with tempfile.TemporaryDirectory(prefix="omni-interrupt-") as tmp:
        ckpt = args.ckpt_dir or make_checkpoint(Path(tmp) / "tiny", "tiny", seed=TINY_SEED)
        print(report(OmniEngine(ckpt, device=args.device)))


if __name__ == "__main__":
    main()
