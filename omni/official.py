"""The official `OmniInference` and `OmniVisionInference` interfaces over `OmniEngine`, for code written
against them (a checkout re-exports them as `inference.OmniInference`).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .audio import SAMPLES_DIR, write_wav
from .engine import OmniEngine
from .sampling import (
    DEFAULT_MAX_TOKENS, DEFAULT_STREAM_STRIDE, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, OFFICIAL_JOINS,
)
from .tokens import EOA, EOT, PAD_T

SAMPLE_QUESTION = str(SAMPLES_DIR / "output1.wav")  # the official warm-up's question and image
SAMPLE_IMAGE = str(SAMPLES_DIR / "image1.jpg")


class OmniInference:
    """The official `OmniInference` interface over `OmniEngine`, for code written against it: its chunks are
    decoded one by one (joins="official"), so it gives the official bytes.

    Unlike the official class, `device` defaults to "auto" (CUDA when available, else CPU).
    """

    def __init__(self, ckpt_dir: str = "./checkpoint", device: str = "auto") -> None:
        self.engine = OmniEngine(ckpt_dir, device=device)

    def warm_up(self, sample: str = SAMPLE_QUESTION) -> None:
        for _ in self.run_AT_batch_stream(sample):
            pass

    def run_AT_batch_stream(self, audio_path: str, stream_stride: int = DEFAULT_STREAM_STRIDE,
                            max_returned_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = DEFAULT_TEMPERATURE,
                            top_k: int = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P,
                            eos_id_a: int = EOA, eos_id_t: int = EOT) -> Iterator[bytes]:
        """Yield the spoken answer to `audio_path` as int16 LE 24 kHz PCM chunks (16,384 bytes at stride 4)."""
        if (eos_id_a, eos_id_t) != (EOA, EOT):
            raise ValueError(f"only the model's own stop ids are supported (eos_id_a={EOA}, eos_id_t={EOT})")
        for chunk in self.engine.stream(audio_path, stream_stride=stream_stride, max_tokens=max_returned_tokens,
                                        temperature=temperature, top_k=top_k, top_p=top_p, joins=OFFICIAL_JOINS):
            if chunk.pcm:
                yield chunk.pcm


class OmniVisionInference(OmniInference):
    """The official Mini-Omni2 `OmniVisionInference` interface: spoken questions about an image.

    As in the official v2 code, the streams yield `(pcm_bytes, text_delta)` and can save the answer.
    """

    def __init__(self, ckpt_dir: str = "./checkpoint", device: str = "auto") -> None:
        self.engine = OmniEngine(ckpt_dir, device=device, family="mini-omni2")

    def warm_up(self, audio_sample: str = SAMPLE_QUESTION, image_sample: str = SAMPLE_IMAGE) -> None:
        for _ in self.run_vision_AA_batch_stream(audio_sample, image_sample, warm_up=True):
            pass

    def run_AT_batch_stream(self, audio_path: str, stream_stride: int = DEFAULT_STREAM_STRIDE,
                            max_returned_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = DEFAULT_TEMPERATURE,
                            top_k: int = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P, eos_id_a: int = EOA,
                            eos_id_t: int = EOT, save_path: str | None = None) -> Iterator[tuple[bytes, str]]:
        """The spoken answer to `audio_path` as `(pcm, text_delta)` chunks; the whole answer to `save_path`."""
        yield from self._stream(audio_path, None, stream_stride, max_returned_tokens, temperature, top_k, top_p,
                                (eos_id_a, eos_id_t), save_path, False)

    def run_vision_AA_batch_stream(self, audio_path: str, image_path: str, stream_stride: int = DEFAULT_STREAM_STRIDE,
                                   max_returned_tokens: int = DEFAULT_MAX_TOKENS,
                                   temperature: float = DEFAULT_TEMPERATURE, top_k: int = DEFAULT_TOP_K,
                                   top_p: float = DEFAULT_TOP_P, eos_id_a: int = EOA, eos_id_t: int = EOT,
                                   pad_id: int = PAD_T, save_path: str | None = None,
                                   warm_up: bool = False) -> Iterator[tuple[bytes, str]]:
        """The spoken answer to a question about `image_path`, as `(pcm, text_delta)` chunks.

        `warm_up` stops after the first chunk, as the official warm-up does."""
        if pad_id != PAD_T:
            raise ValueError(f"only the model's own text pad id is supported (pad_id={PAD_T})")
        yield from self._stream(audio_path, image_path, stream_stride, max_returned_tokens, temperature, top_k, top_p,
                                (eos_id_a, eos_id_t), save_path, warm_up)

    def _stream(self, audio_path: str, image_path: str | None, stream_stride: int, max_tokens: int,
                temperature: float, top_k: int, top_p: float, stop_ids: tuple[int, int], save_path: str | None,
                first_only: bool) -> Iterator[tuple[bytes, str]]:
        if stop_ids != (EOA, EOT):
            raise ValueError(f"only the model's own stop ids are supported (eos_id_a={EOA}, eos_id_t={EOT})")
        pcm = []
        for chunk in self.engine.stream(audio_path, image=image_path, stream_stride=stream_stride,
                                        max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                        joins=OFFICIAL_JOINS):
            pcm.append(chunk.pcm)
            yield chunk.pcm, chunk.text
            if first_only and chunk.pcm:
                break
        if save_path is not None:
            write_wav(Path(save_path), b"".join(pcm), self.engine.sample_rate)
