"""Whisper's audio encoder, loaded from an openai-whisper checkpoint file such as `small.pt`.

Only the encoder is needed, so the project carries these ~60 lines instead of openai-whisper
(which pulls triton, ~1 GB). Parameter names match openai-whisper's `encoder.*` keys and the
op order matches its forward, so features equal the official ones.
"""
from __future__ import annotations

import math
from collections.abc import Generator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CheckpointError
from .units import drain

ENCODER_PREFIX = "encoder."
MLP_RATIO = 4


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> torch.Tensor:
    """Whisper's fixed positional embedding `(length, channels)`; checkpoints store it too."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class SelfAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, -1).permute(0, 2, 1, 3)  # (B, nh, T, hs)
                   for proj in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.permute(0, 2, 1, 3).flatten(start_dim=2))


class RowChunks(nn.Module):
    """A position-wise module applied to `rows` positions at a time: `(B, T, C)` -> `(B, T, C')`.

    The same numbers wherever each row's result depends on that row alone (fast mode's int8 MLP),
    while the wide hidden layer of a chunk stays in cache and its transient memory shrinks T/rows-fold.
    """

    def __init__(self, module: nn.Module, rows: int) -> None:
        super().__init__()
        self.module = module
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.module(x[:, i:i + self.rows]) for i in range(0, x.size(1), self.rows)], dim=1)


class EncoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = SelfAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, n_state * MLP_RATIO), nn.GELU(),
                                 nn.Linear(n_state * MLP_RATIO, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.attend(x))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The block's first half, its own unit of work (`WhisperEncoder.stages`)."""
        return x + self.attn(self.attn_ln(x))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.mlp_ln(x))


class WhisperEncoder(nn.Module):
    """Log-mel `(B, n_mels, 2n)` -> fp32 features `(B, n, n_state)`; Whisper (and the exact mode) uses n = 1500.

    It computes in the dtype of its weights: fp32 (exact), or bf16 where fast mode chose it.
    """

    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList(EncoderBlock(n_state, n_head) for _ in range(n_layer))
        self.ln_post = nn.LayerNorm(n_state)

    @property
    def n_state(self) -> int:
        return self.ln_post.weight.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return drain(self.stages(mel))

    def stages(self, mel: torch.Tensor) -> Generator[None, None, torch.Tensor]:
        """`forward` in units, yielding after each convolution and each half of a block (a scheduler
        runs other requests' decode steps and cancels in between: a unit stays near one decode step's
        time on 30 s of audio); returns the features."""
        x = F.gelu(self.conv1(mel.to(self.dtype)))
        yield
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)  # (B, n_ctx, n_state); n_ctx = 1500 for 30 s
        assert x.size(1) <= self.positional_embedding.size(0), f"mel gives {tuple(x.shape)}, more than 30 s"
        x = x + self.positional_embedding[: x.size(1)]
        for block in self.blocks:
            yield
            x = block.attend(x)
            yield
            x = block.feed_forward(x)
        return self.ln_post(x).float()


def _read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The model dimensions and the encoder's (memory-mapped) tensors of an openai-whisper file."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        dims = ckpt["dims"]
        state = {k[len(ENCODER_PREFIX):]: v for k, v in ckpt["model_state_dict"].items() if k.startswith(ENCODER_PREFIX)}
    except (OSError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not an openai-whisper checkpoint ({e})") from e
    return dims, state


def encoder_shape(path: str | Path) -> dict[str, int]:
    """The encoder's `n_audio_*` dimensions (ctx, state, head, layer), without loading its weights."""
    return {k: v for k, v in _read(path)[0].items() if k.startswith("n_audio_")}


def load_whisper_encoder(path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> WhisperEncoder:
    """Load the encoder half of an openai-whisper file, in fp32 (the file's fp16 values, upcast) or `dtype`.

    openai-whisper loads its fp16 file into an fp32 model the same way, so the numbers agree. Each
    tensor is converted straight from the file, so no fp32 copy exists on the way to bf16.
    """
    dims, state = _read(path)
    with torch.device("meta"):
        encoder = WhisperEncoder(dims["n_mels"], dims["n_audio_ctx"], dims["n_audio_state"],
                                 dims["n_audio_head"], dims["n_audio_layer"])
    expected = set(encoder.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(f"{path}: whisper encoder keys differ (missing {missing[:5]}, unexpected {extra[:5]})")
    encoder.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return encoder.to(device).eval()
