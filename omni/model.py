"""The Mini-Omni language model: Qwen2-0.5B blocks over 8 averaged token streams (docs/model.md §2).

Only `nn.Module`s live here. Parameter names are litgpt's, so the official `lit_model.pth`
loads strictly. Token tensors are `[B, 8, T]` (streams 0-6 audio layers, 7 text).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .tokens import (AUDIO_FEATURE_START, IMAGE_AUDIO_FEATURE_START, IMAGE_FEATURE_START, N_AUDIO_LAYERS, N_STREAMS,
                     PADDED_TEXT_VOCAB, PADDED_VOCAB)

HEAD_PARTS = {"text": slice(0, PADDED_TEXT_VOCAB), "audio": slice(PADDED_TEXT_VOCAB, PADDED_VOCAB),
              "all": slice(0, PADDED_VOCAB)}
SKINNY_ROWS = 8  # up to this many rows, multiply as W @ x.T: MKL streams W ~4x faster than for x @ W.T


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, computed as `W @ x.T` for the few rows of a decode step on CPU.

    There `x @ W.T` runs far below memory bandwidth (for one row as for two), while `W @ x.T` with
    at least two columns reads W at full speed; a single row is therefore doubled. The results
    differ from `F.linear` only in float rounding order (about 1e-6 relative).
    """
    rows = x.reshape(-1, x.size(-1))
    n = rows.size(0)
    if x.device.type != "cpu" or n > SKINNY_ROWS:
        return F.linear(x, weight, bias)
    cols = rows.t() if n > 1 else rows.expand(2, -1).t()
    # contiguous: a transposed result would pass its strides on and send the next product down a slow path
    out = torch.mm(weight, cols).t()[:n].contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.size(0))


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a Linear through `linear`; other layers (e.g. int8 ones) are simply called."""
    if type(layer) is nn.Linear:
        return linear(x, layer.weight, layer.bias)
    return layer(x)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 whatever the model dtype (litgpt's formula)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps)
        return x.to(dtype) * self.weight


class SwiGLU(nn.Module):
    """`proj(silu(fc_1 x) * fc_2 x)`: the LLaMA MLP, also used for the whisper/vision adapters."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(d_in, d_hidden, bias=False)
        self.fc_2 = nn.Linear(d_in, d_hidden, bias=False)
        self.proj = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.proj, F.silu(project(self.fc_1, x)) * project(self.fc_2, x))


class KVCache(nn.Module):
    """Preallocated keys and values, one KV head per query group: `(B, G, S, hs)`."""

    def __init__(self, batch_size: int, groups: int, max_len: int, head_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (batch_size, groups, max_len, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k, v` of the first `B` rows at `input_pos`; return those rows up to position `end`."""
        B = k.size(0)
        self.k[:B].index_copy_(2, input_pos, k)
        self.v[:B].index_copy_(2, input_pos, v)
        return self.k[:B, :, :end], self.v[:B, :, :end]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


def build_rope(seq_len: int, n_elem: int, base: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `(seq_len, n_elem)`, built with litgpt's exact op order (fp32)."""
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, device=device).float() / n_elem))
    positions = torch.arange(seq_len, device=device) / 1
    angles = torch.outer(positions, theta).repeat(1, 2)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE over the last dim of `x: (B, nh, T, hs)`."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return ((x * cos) + (rotated * sin)).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Grouped-query attention with litgpt's fused, group-interleaved QKV projection.

    The `qkv_size` outputs of `attn` are laid out `[group][q_0 .. q_{k-1}, key, value][head_size]`,
    so query head `h` belongs to group `h // q_per_kv`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn = nn.Linear(config.n_embd, config.qkv_size, bias=config.add_qkv_bias)
        self.proj = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=False)
        self.config = config
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None, end: int) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        qkv = project(self.attn, x).view(B, T, c.n_query_groups, c.q_per_kv + 2, c.head_size)
        qkv = qkv.permute(0, 2, 3, 1, 4)  # (B, G, q_per_kv + 2, T, hs)
        q, k, v = qkv.split((c.q_per_kv, 1, 1), dim=2)
        q = apply_rope(q.reshape(B, c.n_head, T, c.head_size), cos, sin)  # (B, nh, T, hs)
        k = apply_rope(k.reshape(B, c.n_query_groups, T, c.head_size), cos, sin)  # (B, G, T, hs)
        v = v.reshape(B, c.n_query_groups, T, c.head_size)
        mask = None
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("call setup_cache() first")
            k, v = self.kv_cache.update(input_pos, k, v, end)
            mask = torch.arange(end, device=x.device)[None, :] <= input_pos[:, None]  # (T, S)
        k = k.repeat_interleave(c.q_per_kv, dim=1)  # (B, nh, S, hs)
        v = v.repeat_interleave(c.q_per_kv, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(c.head_size), is_causal=mask is None
        )
        return project(self.proj, y.transpose(1, 2).reshape(B, T, c.n_head * c.head_size))


class Block(nn.Module):
    """Pre-norm transformer block: `x += attn(norm_1 x)`, then `x += mlp(norm_2 x)`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config.n_embd, config.intermediate_size, config.n_embd)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None, end: int) -> torch.Tensor:
        x = self.attn(self.norm_1(x), cos, sin, input_pos, end) + x
        return self.mlp(self.norm_2(x)) + x


class OmniLM(nn.Module):
    """Eight token streams in, one shared head out: logits `(B, T, 181120)` for all streams."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.whisper_adapter = SwiGLU(config.whisper_adapter_dim, config.intermediate_size, config.n_embd)
        if config.vision_adapter_dim:
            self.vision_adapter = SwiGLU(config.vision_adapter_dim, config.intermediate_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.tie_weights()
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.full_span = False  # attend over the whole cache (the official cost; for the baseline benchmark)
        self.quantized_head: nn.ModuleDict | None = None

    def tie_weights(self) -> None:
        """Share one matrix for embedding and head; the embedding's values win (docs/model.md §1)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def setup_cache(self, batch_size: int, max_len: int) -> None:
        """Allocate KV caches for `max_len` positions; a no-op if the current ones fit."""
        if max_len > self.config.block_size:
            raise ValueError(f"max_len {max_len} exceeds the model's block size {self.config.block_size}")
        cache = self.transformer.h[0].attn.kv_cache
        if cache is not None and cache.k.size(0) == batch_size and cache.k.size(2) >= max_len:
            return
        ref = self.transformer.ln_f.weight  # device and dtype of the activations
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_query_groups, max_len,
                                          self.config.head_size, ref.device, ref.dtype)

    def copy_cache_row(self, src: int, dst: int, length: int) -> None:
        """Give batch row `dst` the first `length` cached positions of row `src`."""
        for block in self.transformer.h:
            block.attn.kv_cache.copy_row(src, dst, length)

    def clear_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.transformer.ln_f.weight.device
        if self._rope is None or self._rope[0].device != device:
            self._rope = build_rope(self.config.block_size, self.config.head_size, self.config.rope_base, device)
        return self._rope

    def embed(self, idx: torch.Tensor, audio_features: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the 8 stream embeddings, `(B, 8, T)` ids -> `(B, T, C)`.

        Injected features replace the audio-stream embeddings; the text stream keeps its own.
        `audio_features (B, L, whisper_dim)` go to positions 1..L, or, next to `image_features
        (B, 50, vision_dim)` at 1..50, to 52..51+L (the official layout, docs/model.md §2, §8).
        """
        emb = self.transformer.wte(idx)  # (B, 8, T, C)
        audio_start = AUDIO_FEATURE_START
        if image_features is not None:
            feats = self.vision_adapter(image_features.to(emb.dtype))  # (B, 50, C)
            emb[:, :N_AUDIO_LAYERS, IMAGE_FEATURE_START:IMAGE_FEATURE_START + feats.size(1)] = feats[:, None]
            audio_start = IMAGE_AUDIO_FEATURE_START
        if audio_features is not None:
            feats = self.whisper_adapter(audio_features.to(emb.dtype))  # (B, L, C)
            emb[:, :N_AUDIO_LAYERS, audio_start:audio_start + feats.size(1)] = feats[:, None]
        x = emb[:, 0]
        for stream in range(1, N_STREAMS):  # summed in order, as the official code does
            x = x + emb[:, stream]
        return x / N_STREAMS

    def head(self, x: torch.Tensor, part: str) -> torch.Tensor:
        """Logits of one vocabulary part, `x (..., C)` -> `(..., width)`.

        The head is 181,120 x 896, bigger than several blocks; a batch row that is read only for its
        audio (or text) logits needs only that slice, which halves the head's work at batch 2.
        """
        if self.quantized_head is not None:
            if part == "all":
                return torch.cat([self.quantized_head["text"](x), self.quantized_head["audio"](x)], dim=-1)
            return self.quantized_head[part](x)
        return linear(x, self.lm_head.weight[HEAD_PARTS[part]])

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None,
                audio_features: torch.Tensor | None = None, parts: Sequence[str] | None = None,
                image_features: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Args:
            idx: `(B, 8, T)` global token ids.
            input_pos: `(T,)` positions to write into the KV cache; None runs without a cache.
            audio_features: `(B, L, whisper_dim)` Whisper encoder output injected at positions 1..L.
            parts: per batch row, the vocabulary part it is read for ("text", "audio" or "all");
                `()` computes no logits (to fill the cache only).
            image_features: `(B, 50, vision_dim)` CLIP tokens of a Mini-Omni2 image question; they
                take positions 1..50 and move the audio features to 52..51+L.
        Returns:
            without `parts`, logits `(B, T, padded_vocab_size)` for every position; with them, one
            `(width,)` tensor per row: that row's part of the last position's logits.
        """
        T = idx.size(-1)
        cos, sin = self.rope()
        if input_pos is None:
            cos, sin, end = cos[:T], sin[:T], T
        else:
            cos, sin = cos.index_select(0, input_pos), sin.index_select(0, input_pos)
            # the official code attends over the whole preallocated cache; only the filled part matters
            end = self.transformer.h[0].attn.kv_cache.k.size(2) if self.full_span else int(input_pos[-1]) + 1
        x = self.embed(idx, audio_features, image_features)
        for block in self.transformer.h:
            x = block(x, cos, sin, input_pos, end)
        if parts is None:
            return self.head(self.transformer.ln_f(x), "all")
        x = self.transformer.ln_f(x[:, -1])  # (B, C)
        return [self.head(x[row:row + 1], part)[0] for row, part in enumerate(parts)]
