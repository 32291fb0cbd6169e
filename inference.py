"""Answer a spoken (or written) question: `python inference.py --help`; the code is omni/cli.py.

The official class names stay importable from here: `from inference import OmniInference`.
"""
import sys

from omni.cli import main
from omni.official import OmniInference, OmniVisionInference

__all__ = ["OmniInference", "OmniVisionInference", "main"]

if __name__ == "__main__":
    sys.exit(main())
