"""Decoding options and pure sampling functions (docs/model.md §5)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The official defaults: top_k=1 makes decoding greedy, so temperature then has no effect.
DEFAULT_TEMPERATURE = 0.9
DEFAULT_TOP_K = 1
DEFAULT_TOP_P = 1.0
# Prompt plus generated positions, the official `max_returned_tokens`.
DEFAULT_MAX_TOKENS = 2048
# Decode steps per streamed audio chunk; each step is one SNAC frame (85.3 ms of audio).
DEFAULT_STREAM_STRIDE = 4
# How the chunks of an answer's audio join: "gapless" streams one decode of the whole answer
# (omni/snac_stream.py); "official" decodes each chunk on its own, as the official code does.
GAPLESS_JOINS, OFFICIAL_JOINS = "gapless", "official"
JOINS = (GAPLESS_JOINS, OFFICIAL_JOINS)


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode one request. Validated here and nowhere else."""

    temperature: float = DEFAULT_TEMPERATURE  # logits are divided by this before softmax; 0 = greedy
    top_k: int | None = DEFAULT_TOP_K  # keep the k most likely tokens; None keeps all
    top_p: float = DEFAULT_TOP_P  # nucleus sampling mass; 1.0 disables it
    max_tokens: int = DEFAULT_MAX_TOKENS  # prompt + generated positions (official max_returned_tokens)
    stream_stride: int = DEFAULT_STREAM_STRIDE  # SNAC frames per streamed chunk
    first_stride: int | None = None  # frames in the first chunk; smaller starts audio sooner (None = stream_stride, as official)
    seed: int | None = 0  # seeds this request's own generators so answers repeat; None draws from torch's global RNG
    joins: str = GAPLESS_JOINS  # "gapless": no clicks between chunks; "official": each chunk alone (official bytes)

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 2:
            raise ValueError(f"max_tokens must be an int >= 2, got {self.max_tokens!r}")
        if not isinstance(self.stream_stride, int) or self.stream_stride < 1:
            raise ValueError(f"stream_stride must be an int >= 1, got {self.stream_stride!r}")
        if self.first_stride is not None and (not isinstance(self.first_stride, int) or self.first_stride < 1):
            raise ValueError(f"first_stride must be an int >= 1 or None, got {self.first_stride!r}")
        if self.joins not in JOINS:
            raise ValueError(f"joins must be one of {JOINS}, got {self.joins!r}")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask the least likely tokens whose cumulative probability stays within `1 - top_p`."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False  # always keep the most likely token
    return logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))


def sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of `logits (N, V)`; returns `(N,)` ids.

    Same order as the official sampler: top-k, then temperature, then top-p, then multinomial.
    With top_k=1 the official sampler's multinomial has one candidate, so argmax is identical.
    `generator` (on the logits' device) scopes the randomness to one request; None uses torch's global RNG.
    """
    if cfg.greedy:
        return logits.argmax(dim=-1)
    if cfg.top_k is not None:
        values, idx = torch.topk(logits, min(cfg.top_k, logits.size(-1)), dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, idx, values)
    logits = logits / cfg.temperature
    if cfg.top_p < 1.0:
        logits = _top_p_filter(logits, cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
