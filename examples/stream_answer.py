"""Stream an answer and print when each chunk arrives, its size and its text.

    python examples/stream_answer.py --ckpt-dir checkpoint [--input q.wav] [--max-tokens N]
"""
import argparse
import time
from pathlib import Path

from omni import DEFAULT_MAX_TOKENS
from omni_engine import OmniEngine

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "samples" / "output1.wav"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt-dir", default="checkpoint")
    parser.add_argument("--input", default=str(SAMPLE))
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    args = parser.parse_args()

    engine = OmniEngine(args.ckpt_dir)
    start = time.perf_counter()
    for n, chunk in enumerate(engine.stream(args.input, max_tokens=args.max_tokens), 1):
        audio_ms = len(chunk.pcm) / 2 / engine.sample_rate * 1000
        print(f"chunk {n}: {time.perf_counter() - start:6.2f} s, {len(chunk.pcm):6d} bytes ({audio_ms:.0f} ms audio), "
              f"text {chunk.text!r}")


if __name__ == "__main__":
    main()
