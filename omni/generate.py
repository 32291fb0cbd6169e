"""The prefill / decode-step loop as an iterator of per-step tokens (docs/model.md §5, §6).

Two decoding policies cover every task:
- `SpeechDecoder` samples 7 audio tokens and a text token per step. With `batch=True` it is the
  official batch-of-two trick (A1A2): row 0 is the speech prompt, row 1 the text-only prompt;
  audio comes from row 0, text from row 1, and both rows are fed row 1's text. With
  `batch=False` it is the official single-row T1A2 helper.
- `TextDecoder` samples only the text token on one row (A1T2, ASR, T1T2) and stops on a sampled EOT.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .model import OmniLM, Segment
from .sampling import GenerationConfig, sample
from .tokens import (
    EOA, EOT, N_AUDIO_LAYERS, PAD_A, PAD_T, PADDED_AUDIO_VOCAB, PADDED_TEXT_VOCAB, STOP_LAYER, audio_id,
)

# Prompt positions run per prefill chunk: a newcomer's prefill then delays the running requests'
# decode steps by about one step each. The chunking is fixed, so a request's numbers never depend on load.
PREFILL_CHUNK = 32


@dataclass(frozen=True)
class CostPlan:
    """How much work decoding a request does. Every plan gives the same tokens (they differ only by
    exact rewrites); the mode picks one at load (`omni.runtime`) and every request follows it."""

    full_head: bool = False  # every row multiplies the whole head, not only the part it is read for
    full_span: bool = False  # the cache is the model's whole length, and attention reads all of it (masked)
    whole_prefill: bool = False  # the prompt on every row in one piece, not chunked with the shared part run once

    def head_parts(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        """The head parts rows wanting `parts` are read for."""
        return ("all",) * len(parts) if self.full_head else parts

    def cache_length(self, cfg: GenerationConfig, block_size: int) -> int:
        """Positions a request's cache holds: all the model can take, or what `cfg.max_tokens` needs."""
        return block_size if self.full_span else cfg.max_tokens - 1


EXACT_COST = CostPlan()  # the exact and fast modes: only what the answer needs
OFFICIAL_COST = CostPlan(full_head=True, full_span=True, whole_prefill=True)  # the official implementation's work


@dataclass(frozen=True)
class Step:
    """The tokens chosen at one position: 7 local audio ids (None for text-only tasks) and a text id."""

    audio: tuple[int, ...] | None
    text: int


def to_streams(steps: list[Step]) -> list[list[int]]:
    """Steps -> the official `list_output`: 7 audio layers (empty for text-only tasks), then text."""
    streams = [[s.audio[layer] for s in steps if s.audio is not None] for layer in range(N_AUDIO_LAYERS)]
    return streams + [[s.text for s in steps]]


def _layer_offsets(device: torch.device) -> torch.Tensor:
    """`(8,)`: what turns 7 local audio ids and a text id into global embedding rows."""
    return torch.tensor([audio_id(0, layer) for layer in range(N_AUDIO_LAYERS)] + [0], device=device)


class SpeechDecoder:
    """Audio + text out; stops when the last audio layer emits EOA; text is forced to pad after EOT.

    The tokens stay on the device: one `.tolist()` per step is the step's only wait for the device.
    """

    def __init__(self, batch: bool, cost: CostPlan = EXACT_COST) -> None:
        self.batch_size = 2 if batch else 1
        # Which head part each row is read for; the single row is read for both.
        self.parts = cost.head_parts(("audio", "text") if batch else ("all",))
        self.text_ended = False
        self.last: torch.Tensor | None = None  # (8,) the last step's local ids, on the device

    def advance(self, logits: list[torch.Tensor], cfg: GenerationConfig, first: bool,
                generator: torch.Generator | None = None) -> Step | None:
        """Per-row logits of the last position (parts as in `self.parts`) -> the next step, or None to stop."""
        audio_row, text_row = logits[0], logits[-1]
        if self.parts[0] == "all":
            audio_row = audio_row[PADDED_TEXT_VOCAB:]
        audio = sample(audio_row.view(N_AUDIO_LAYERS, PADDED_AUDIO_VOCAB), cfg, generator)  # (7,)
        text = sample(text_row[:PADDED_TEXT_VOCAB].unsqueeze(0), cfg, generator)  # (1,)
        if self.text_ended and not first:
            text = torch.full_like(text, PAD_T)
        picked = torch.cat([audio, text])
        *audio_ids, text_id = picked.tolist()
        if first:  # the official loop applies no rule to the prefill token
            self.last = picked
            return Step(tuple(audio_ids), text_id)
        if audio_ids[STOP_LAYER] == EOA:
            return None
        if text_id == EOT:
            self.text_ended = True
        self.last = picked
        return Step(tuple(audio_ids), text_id)

    def next_input(self) -> torch.Tensor:
        """The next input `(B, 8, 1)` from the last step, built on the device: own audio on row 0,
        pads on row 1, the text on every row."""
        offsets = _layer_offsets(self.last.device)
        rows = [self.last + offsets]
        if self.batch_size == 2:
            pads = torch.full_like(self.last, PAD_A) + offsets
            rows.append(torch.cat([pads[:N_AUDIO_LAYERS], self.last[N_AUDIO_LAYERS:]]))
        return torch.stack(rows).unsqueeze(-1)

    def feedback(self, step: Step, device: torch.device) -> torch.Tensor:
        """The input `(B, 8, 1)` that follows a given step (teacher forcing)."""
        self.last = torch.tensor([*step.audio, step.text], device=device)
        return self.next_input()


class TextDecoder:
    """Text out on one row; the audio rows are fed pads; a sampled EOT ends it and is dropped."""

    batch_size = 1

    def __init__(self, cost: CostPlan = EXACT_COST) -> None:
        self.parts = cost.head_parts(("text",))
        self.last: torch.Tensor | None = None  # (1,) the last text id, on the device

    def advance(self, logits: list[torch.Tensor], cfg: GenerationConfig, first: bool,
                generator: torch.Generator | None = None) -> Step | None:
        picked = sample(logits[0][:PADDED_TEXT_VOCAB].unsqueeze(0), cfg, generator)  # (1,)
        text = int(picked[0])
        if not first and text == EOT:
            return None
        self.last = picked
        return Step(None, text)

    def next_input(self) -> torch.Tensor:
        offsets = _layer_offsets(self.last.device)
        pads = torch.full((N_AUDIO_LAYERS,), PAD_A, device=self.last.device) + offsets[:N_AUDIO_LAYERS]
        return torch.cat([pads, self.last]).view(1, -1, 1)

    def feedback(self, step: Step, device: torch.device) -> torch.Tensor:
        self.last = torch.tensor([step.text], device=device)
        return self.next_input()


def check_length(prompt_len: int, cfg: GenerationConfig, block_size: int) -> None:
    """The official limits: room for at least one token, and every position inside the cache."""
    if cfg.max_tokens <= prompt_len:
        raise ValueError(
            f"max_tokens {cfg.max_tokens} leaves no room to answer a prompt of {prompt_len} positions; "
            f"raise max_tokens (up to {block_size + 1}) or shorten the input"
        )
    if cfg.max_tokens - 1 > block_size:
        raise ValueError(f"max_tokens {cfg.max_tokens} exceeds the model's limit of {block_size + 1}")


class Sequence:
    """One request's decoding state: prompt, own KV cache, position, policy and random generator.

    `prefill()` runs the prompt in chunks and ends with the first `Step`; after that, `decode_step`
    advances any number of sequences together, each from its own position. Nothing in a sequence
    depends on the others it is batched with (per-row activation scales in fast mode, products in
    fixed-size row blocks in exact mode: `omni.linear.Products`).
    """

    def __init__(self, model: OmniLM, prompt: torch.Tensor, decoder: SpeechDecoder | TextDecoder,
                 cfg: GenerationConfig, audio_features: torch.Tensor | None = None,
                 image_features: torch.Tensor | None = None, cost: CostPlan = EXACT_COST,
                 generator: torch.Generator | None = None) -> None:
        B, _, T = prompt.shape
        assert B == decoder.batch_size, f"prompt batch {B} != decoder batch {decoder.batch_size}"
        # the caller has checked the request (`check_length`): here it is an invariant
        assert T < cfg.max_tokens <= model.config.block_size + 1, f"prompt {T}, max_tokens {cfg.max_tokens}"
        self.model, self.prompt, self.decoder, self.cfg = model, prompt, decoder, cfg
        self.features = (audio_features, image_features)
        self.cost = cost
        self.generator = generator
        self.cache = model.new_cache(B, cost.cache_length(cfg, model.config.block_size), full_span=cost.full_span)
        self.pos = T  # the position the next decode step fills
        self.first: Step | None = None  # the prefill's step, once `prefill()` has run

    @property
    def rows(self) -> int:
        return self.decoder.batch_size

    @property
    def finished(self) -> bool:
        """No room for another decode step (the official `max_returned_tokens`)."""
        return self.pos >= self.cfg.max_tokens - 1

    @torch.inference_mode()
    def prefill(self, chunk: int = PREFILL_CHUNK) -> Iterator[None]:
        """Run the prompt through the model, `chunk` positions at a time, yielding after each chunk
        (a scheduler runs other requests' decode steps in between); sets `self.first`.

        The two rows of the batch-of-two prompt differ only in their last position, so (unless the
        cost plan wants the whole prefill) the shared part runs on row 0 and its cache is copied to
        row 1. The whole prefill runs the prompt, both rows, in one piece, as the official code does.
        """
        model, prompt = self.model, self.prompt
        B, _, T = prompt.shape
        audio, image = self.features
        x = model.embed(prompt, audio, image)  # (B, T, C)
        whole = self.cost.whole_prefill
        shared = not whole and B == 2 and torch.equal(prompt[0, :, :-1], prompt[1, :, :-1]) and all(
            f is None or torch.equal(f[0], f[1]) for f in self.features)
        if whole:
            chunk = T
        body_rows = 1 if shared else B
        body_end = T - 1 if shared else T
        for start in range(0, body_end, chunk):
            end = min(start + chunk, body_end)
            h = model.run(x[:body_rows, start:end], [Segment(slice(0, body_rows), self.cache, start)])
            if end < T:
                yield
        if shared:
            self.cache.copy_row(0, 1, T - 1)
            h = model.run(x[:, T - 1:], [Segment(slice(0, B), self.cache, T - 1)])
        logits = model.lm_head.rows(h[:, -1], self.decoder.parts)
        self.first = self.decoder.advance(logits, self.cfg, first=True, generator=self.generator)


@torch.inference_mode()
def decode_step(model: OmniLM, sequences: list[Sequence]) -> list[Step | None]:
    """One decode step of every sequence at once: all their rows through the linear layers and the
    head together, attention per sequence. Returns each one's next `Step` (None: it stopped)."""
    assert all(not s.finished for s in sequences), "a finished sequence cannot take another step"
    idx = torch.cat([s.decoder.next_input() for s in sequences])  # (N, 8, 1)
    segments, row = [], 0
    for s in sequences:
        segments.append(Segment(slice(row, row + s.rows), s.cache, s.pos))
        row += s.rows
    h = model.run(model.embed(idx), segments)[:, -1]  # (N, C)
    logits = model.lm_head.rows(h, [part for s in sequences for part in s.decoder.parts])
    steps = []
    for s, seg in zip(sequences, segments):
        steps.append(s.decoder.advance(logits[seg.rows], s.cfg, first=False, generator=s.generator))
        s.pos += 1
    return steps
