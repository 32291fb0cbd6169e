"""Stream an answer and print when each chunk arrives, its size and its text."""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omni_engine import OmniEngine  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--ckpt-dir", default="checkpoint")
parser.add_argument("--input", default=str(ROOT / "data" / "samples" / "output1.wav"))
parser.add_argument("--max-tokens", type=int, default=2048)
args = parser.parse_args()

engine = OmniEngine(args.ckpt_dir)
start = time.perf_counter()
for n, chunk in enumerate(engine.stream(args.input, max_tokens=args.max_tokens), 1):
    audio_ms = len(chunk.pcm) / 2 / engine.sample_rate * 1000
    print(f"chunk {n}: {time.perf_counter() - start:6.2f} s, {len(chunk.pcm):6d} bytes ({audio_ms:.0f} ms audio), "
          f"text {chunk.text!r}")
