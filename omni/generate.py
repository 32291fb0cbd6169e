"""The prefill / decode-step loop as an iterator of per-step tokens (docs/model.md §5, §6).

Two decoding policies cover every task:
- `SpeechDecoder` samples 7 audio tokens and a text token per step. With `batch=True` it is the
  official batch-of-two trick (A1A2): row 0 is the speech prompt, row 1 the text-only prompt;
  audio comes from row 0, text from row 1, and both rows are fed row 1's text. With
  `batch=False` it is the official single-row T1A2 helper.
- `TextDecoder` samples only the text token on one row (A1T2, ASR, T1T2) and stops on a sampled EOT.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .model import OmniLM
from .sampling import GenerationConfig, sample
from .tokens import (
    EOA, EOT, N_AUDIO_LAYERS, PAD_A, PAD_T, PADDED_AUDIO_VOCAB, PADDED_TEXT_VOCAB, STOP_LAYER, audio_id,
)


@dataclass(frozen=True)
class Step:
    """The tokens chosen at one position: 7 local audio ids (None for text-only tasks) and a text id."""

    audio: tuple[int, ...] | None
    text: int


def to_streams(steps: list[Step]) -> list[list[int]]:
    """Steps -> the official `list_output`: 7 audio layers (empty for text-only tasks), then text."""
    streams = [[s.audio[layer] for s in steps if s.audio is not None] for layer in range(N_AUDIO_LAYERS)]
    return streams + [[s.text for s in steps]]


class SpeechDecoder:
    """Audio + text out; stops when the last audio layer emits EOA; text is forced to pad after EOT."""

    def __init__(self, batch: bool, full_head: bool = False) -> None:
        self.batch_size = 2 if batch else 1
        # Which head part each row is read for; the official code computes "all" on every row.
        self.parts = ("all",) * self.batch_size if full_head or not batch else ("audio", "text")
        self.text_ended = False

    def advance(self, logits: list[torch.Tensor], cfg: GenerationConfig, first: bool,
                generator: torch.Generator | None = None) -> Step | None:
        """Per-row logits of the last position (parts as in `self.parts`) -> the next step, or None to stop."""
        audio_row, text_row = logits[0], logits[-1]
        if self.parts[0] == "all":
            audio_row = audio_row[PADDED_TEXT_VOCAB:]
        audio_logits = audio_row.view(N_AUDIO_LAYERS, PADDED_AUDIO_VOCAB)
        text_logits = text_row[:PADDED_TEXT_VOCAB].unsqueeze(0)
        audio = tuple(sample(audio_logits, cfg, generator).tolist())
        text = int(sample(text_logits, cfg, generator)[0])
        if first:  # the official loop applies no rule to the prefill token
            return Step(audio, text)
        if self.text_ended:
            text = PAD_T
        if audio[STOP_LAYER] == EOA:
            return None
        if text == EOT:
            self.text_ended = True
        return Step(audio, text)

    def feedback(self, step: Step, device: torch.device) -> torch.Tensor:
        """The next input `(B, 8, 1)`: own audio on row 0, pads on row 1, the text on every row."""
        rows = [[audio_id(a, layer) for layer, a in enumerate(step.audio)] + [step.text]]
        if self.batch_size == 2:
            rows.append([audio_id(PAD_A, layer) for layer in range(N_AUDIO_LAYERS)] + [step.text])
        return torch.tensor(rows, device=device).unsqueeze(-1)


class TextDecoder:
    """Text out on one row; the audio rows are fed pads; a sampled EOT ends it and is dropped."""

    batch_size = 1

    def __init__(self, full_head: bool = False) -> None:
        self.parts = ("all",) if full_head else ("text",)

    def advance(self, logits: list[torch.Tensor], cfg: GenerationConfig, first: bool,
                generator: torch.Generator | None = None) -> Step | None:
        text = int(sample(logits[0][:PADDED_TEXT_VOCAB].unsqueeze(0), cfg, generator)[0])
        if not first and text == EOT:
            return None
        return Step(None, text)

    def feedback(self, step: Step, device: torch.device) -> torch.Tensor:
        row = [audio_id(PAD_A, layer) for layer in range(N_AUDIO_LAYERS)] + [step.text]
        return torch.tensor([row], device=device).unsqueeze(-1)


def check_length(prompt_len: int, cfg: GenerationConfig, block_size: int) -> None:
    """The official limits: room for at least one token, and every position inside the cache."""
    if cfg.max_tokens <= prompt_len:
        raise ValueError(
            f"max_tokens {cfg.max_tokens} leaves no room to answer a prompt of {prompt_len} positions; "
            f"raise max_tokens (up to {block_size + 1}) or shorten the input"
        )
    if cfg.max_tokens - 1 > block_size:
        raise ValueError(f"max_tokens {cfg.max_tokens} exceeds the model's limit of {block_size + 1}")


def prefill(model: OmniLM, prompt: torch.Tensor, audio_features: torch.Tensor | None,
            parts: tuple[str, ...], image_features: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Run the prompt through the model; the last position's logits per row.

    The two rows of the batch-of-two prompt differ only in their last position, so (unless the
    official cost is wanted) the shared part runs once on row 0 and its cache is copied to row 1.
    """
    B, _, T = prompt.shape
    positions = torch.arange(T, device=prompt.device)
    shared = B == 2 and not model.full_span and torch.equal(prompt[0, :, :-1], prompt[1, :, :-1]) and all(
        f is None or torch.equal(f[0], f[1]) for f in (audio_features, image_features))
    if not shared:
        return model(prompt, positions, audio_features, parts, image_features)
    row0 = [f[:1] if f is not None else None for f in (audio_features, image_features)]
    model(prompt[:1, :, :-1], positions[:-1], row0[0], parts=(), image_features=row0[1])
    model.copy_cache_row(0, 1, T - 1)
    return model(prompt[:, :, -1:], positions[-1:], parts=parts)


@torch.inference_mode()
def generate(model: OmniLM, prompt: torch.Tensor, decoder: SpeechDecoder | TextDecoder,
             cfg: GenerationConfig, audio_features: torch.Tensor | None = None,
             cancel: Callable[[], bool] = lambda: False,
             image_features: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> Iterator[Step]:
    """Yield one `Step` for the prefill and one per decode step until a stop rule fires.

    Args:
        prompt: `(B, 8, T)` global ids, B = `decoder.batch_size`.
        audio_features: `(B, L, whisper_dim)` injected at positions 1..L during the prefill.
        cancel: polled before every decode step; True ends the iteration at once.
        image_features: `(B, 50, vision_dim)` CLIP tokens of an image question (prefill only).
        generator: the request's own random generator for sampling (None: torch's global RNG).
    """
    B, _, T = prompt.shape
    assert B == decoder.batch_size, f"prompt batch {B} != decoder batch {decoder.batch_size}"
    check_length(T, cfg, model.config.block_size)
    device = prompt.device
    model.setup_cache(B, model.config.block_size if model.full_span else cfg.max_tokens - 1)
    logits = prefill(model, prompt, audio_features, decoder.parts, image_features)
    step = decoder.advance(logits, cfg, first=True, generator=generator)
    yield step
    input_pos = torch.tensor([T], device=device)
    for _ in range(cfg.max_tokens - T - 1):
        if cancel():
            return
        logits = model(decoder.feedback(step, device), input_pos, parts=decoder.parts)
        step = decoder.advance(logits, cfg, first=False, generator=generator)
        if step is None:
            return
        yield step
        input_pos += 1


@torch.inference_mode()
def teacher_forced_agreement(model: OmniLM, prompt: torch.Tensor, decoder: SpeechDecoder,
                             steps: list[Step], audio_features: torch.Tensor | None = None) -> list[float]:
    """Feed a reference answer's tokens and report, per stream, how often this model's greedy pick
    matches the reference's next token (8 fractions; text counted up to the reference's EOT)."""
    B, _, T = prompt.shape
    model.setup_cache(B, T + len(steps))
    cfg = GenerationConfig(top_k=1)
    hits, counts = [0] * (N_AUDIO_LAYERS + 1), [0] * (N_AUDIO_LAYERS + 1)
    logits = prefill(model, prompt, audio_features, decoder.parts)
    text_open = True
    for i, ref in enumerate(steps):
        if i:
            feed = decoder.feedback(steps[i - 1], prompt.device)
            logits = model(feed, torch.tensor([T + i - 1], device=prompt.device), parts=decoder.parts)
        picked = decoder.advance(logits, cfg, first=True)  # first=True: the raw greedy pick, no stop rules
        for layer in range(N_AUDIO_LAYERS):
            hits[layer] += picked.audio[layer] == ref.audio[layer]
            counts[layer] += 1
        if text_open:
            hits[-1] += picked.text == ref.text
            counts[-1] += 1
            text_open = ref.text != EOT
    return [h / max(c, 1) for h, c in zip(hits, counts)]
