"""Load the engine, answer a spoken question, save the spoken answer (output/response.wav by default).

    python examples/answer_question.py --ckpt-dir checkpoint [--input q.wav] [--out output/response.wav]
"""
import argparse
from pathlib import Path

from omni import DEFAULT_MAX_TOKENS
from omni_engine import OmniEngine
from omni import write_wav

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "samples" / "output1.wav"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt-dir", default="checkpoint")
    parser.add_argument("--input", default=str(SAMPLE))
    parser.add_argument("--out", default="output/response.wav")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    args = parser.parse_args()

    engine = OmniEngine(args.ckpt_dir)
    result = engine.run(args.input, max_tokens=args.max_tokens)
    print("answer text:", result.text.strip())
    print("saved", write_wav(args.out, result.pcm, engine.sample_rate))


if __name__ == "__main__":
    main()
