"""Load the engine, answer a bundled spoken question, save the spoken answer to response.wav."""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omni_engine import OmniEngine  # noqa: E402
from utils.audio_io import write_wav  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--ckpt-dir", default="checkpoint")
parser.add_argument("--input", default=str(ROOT / "data" / "samples" / "output1.wav"))
parser.add_argument("--max-tokens", type=int, default=2048)
args = parser.parse_args()

engine = OmniEngine(args.ckpt_dir)
result = engine.run(args.input, max_tokens=args.max_tokens)
print("answer text:", result.text.strip())
print("saved", write_wav("response.wav", result.pcm, engine.sample_rate))
