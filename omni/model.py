"""The Mini-Omni language model: Qwen2-0.5B blocks over 8 averaged token streams (docs/model.md §2).

Only `nn.Module`s live here. Parameter names are litgpt's, so the official `lit_model.pth`
loads strictly. Token tensors are `[B, 8, T]` (streams 0-6 audio layers, 7 text).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .linear import DenseHead
from .tokens import AUDIO_FEATURE_START, IMAGE_AUDIO_FEATURE_START, IMAGE_FEATURE_START, N_AUDIO_LAYERS, N_STREAMS

class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 whatever the model dtype (litgpt's formula)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype != torch.float32:  # a conversion to the same dtype is still a call: a decode step has ~50 norms
            x = x.float()
        x = x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps)
        return (x if dtype == torch.float32 else x.to(dtype)) * self.weight


class SwiGLU(nn.Module):
    """`proj(silu(fc_1 x) * fc_2 x)`: the LLaMA MLP, also used for the whisper/vision adapters."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(d_in, d_hidden, bias=False)
        self.fc_2 = nn.Linear(d_in, d_hidden, bias=False)
        self.proj = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class KVCache(nn.Module):
    """One layer's preallocated keys and values, one KV head per query group: `(B, G, S, hs)`.

    Attention reads `span(end)` of it: the filled positions, or with `full_span` the whole
    preallocated length, as the official code does (masked; the same result at a higher cost).
    Without `full_span` the buffers are left unwritten (`torch.empty`): nothing past the filled span
    is ever read, so a request's memory grows with the positions it fills, not with `max_len`.
    """

    def __init__(self, batch_size: int, groups: int, max_len: int, head_size: int,
                 device: torch.device, dtype: torch.dtype, full_span: bool = False) -> None:
        super().__init__()
        shape = (batch_size, groups, max_len, head_size)
        alloc = torch.zeros if full_span else torch.empty  # masked positions must hold numbers, not NaN
        self.register_buffer("k", alloc(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", alloc(shape, device=device, dtype=dtype), persistent=False)
        self.full_span = full_span

    def span(self, end: int) -> int:
        """How many positions attention reads when positions `< end` are filled."""
        return self.k.size(2) if self.full_span else end

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k, v (B, G, T, hs)` of the first `B` rows at positions `start..start+T-1`; return
        those rows' keys and values over `span(start + T)`."""
        B, _, T, _ = k.shape
        if start + T > self.k.size(2):
            raise ValueError(f"positions {start}..{start + T - 1} do not fit a cache of {self.k.size(2)}")
        self.k[:B, :, start:start + T] = k
        self.v[:B, :, start:start + T] = v
        end = self.span(start + T)
        return self.k[:B, :, :end], self.v[:B, :, :end]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


class Cache(nn.ModuleList):
    """One request's KV cache: a `KVCache` per layer. Each request owns one, so requests of any
    length and position can share a decode step (`OmniLM.run` with one `Segment` per request)."""

    @property
    def rows(self) -> int:
        return self[0].k.size(0)

    @property
    def max_len(self) -> int:
        return self[0].k.size(2)

    def bytes_per_position(self) -> int:
        """Memory one more position costs this request (all rows and layers, keys and values)."""
        k = self[0].k
        return 2 * len(self) * k.size(0) * k.size(1) * k.size(3) * k.element_size()

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Give batch row `dst` the first `length` cached positions of row `src`."""
        for layer in self:
            layer.copy_row(src, dst, length)


@dataclass(frozen=True)
class Segment:
    """Batch rows `rows` belong to one request: its cache, and the position of its first column
    (`cache` None: causal attention over the given positions only, from position 0)."""

    rows: slice
    cache: Cache | None = None
    start: int = 0


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
    out = (x * cos) + (rotated * sin)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Grouped-query attention with litgpt's fused, group-interleaved QKV projection.

    The `qkv_size` outputs of `attn` are laid out `[group][q_0 .. q_{k-1}, key, value][head_size]`,
    so query head `h` belongs to group `h // q_per_kv`. A group's query heads attend as one
    sequence of `q_per_kv * T` queries over the group's own keys and values, read in place from
    the cache (no copy per query head).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn = nn.Linear(config.n_embd, config.qkv_size, bias=config.add_qkv_bias)
        self.proj = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=False)
        self.config = config

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                segments: list[tuple[slice, KVCache | None, int, torch.Tensor | None]]) -> torch.Tensor:
        """`x (B, T, C)`; `rope`: each row's cos/sin `(B, 1, 1, T, hs)` (or `(T, hs)`, shared); each
        segment's rows attend through their own cache layer from their own position,
        `(rows, cache, start, mask)` (mask None: every key the cache returns)."""
        c = self.config
        B, T, _ = x.shape
        qkv = self.attn(x).view(B, T, c.n_query_groups, c.q_per_kv + 2, c.head_size)
        qkv = qkv.permute(0, 2, 3, 1, 4)  # (B, G, q_per_kv + 2, T, hs)
        qk = apply_rope(qkv[:, :, :c.q_per_kv + 1], *rope)  # queries and key, every row at once
        v = qkv[:, :, c.q_per_kv + 1]
        ys = [self._attend(qk[rows], v[rows], cache, start, mask) for rows, cache, start, mask in segments]
        y = ys[0] if len(ys) == 1 else torch.cat(ys)  # (B, G, q_per_kv * T, hs), queries in (head, t) order
        return self.proj(y.reshape(B, c.n_head, T, c.head_size).transpose(1, 2).reshape(B, T, c.n_head * c.head_size))

    def _attend(self, qk: torch.Tensor, v: torch.Tensor, cache: KVCache | None, start: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        """One request's rows: roped `qk (b, G, q_per_kv + 1, T, hs)`, `v (b, G, T, hs)` -> `(b, G, q_per_kv * T, hs)`."""
        c = self.config
        b, G, _, T, hs = qk.shape
        q = qk[:, :, :c.q_per_kv].reshape(b, G, c.q_per_kv * T, hs)
        k = qk[:, :, c.q_per_kv]
        if cache is not None:
            k, v = cache.update(start, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(c.head_size))


def attention_mask(q_per_kv: int, start: int, T: int, span: int, device: torch.device) -> torch.Tensor | None:
    """Which of `span` keys each grouped query `(head, t)` at position `start + t` sees: `(q_per_kv * T, span)`,
    or None when that is every key (one new position over exactly the filled cache)."""
    if T == 1 and span == start + 1:
        return None
    positions = torch.arange(start, start + T, device=device)
    mask = torch.arange(span, device=device)[None, :] <= positions[:, None]  # (T, span)
    return mask.repeat(q_per_kv, 1)


class Block(nn.Module):
    """Pre-norm transformer block: `x += attn(norm_1 x)`, then `x += mlp(norm_2 x)`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config.n_embd, config.intermediate_size, config.n_embd)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], segments: list) -> torch.Tensor:
        x = self.attn(self.norm_1(x), rope, segments) + x
        return self.mlp(self.norm_2(x)) + x


class OmniLM(nn.Module):
    """Eight token streams in, final-normed hidden states out; `lm_head` turns them into logits.

    The linear layers, the head and the embedding are parts: built here as plain fp32 modules
    (the checkpoint's names and layout), replaced at load by the parts a runtime chooses
    (`omni.runtime`). The forward pass only calls them.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.whisper_adapter = SwiGLU(config.whisper_adapter_dim, config.intermediate_size, config.n_embd)
        if config.vision_adapter_dim:
            self.vision_adapter = SwiGLU(config.vision_adapter_dim, config.intermediate_size, config.n_embd)
        # initialised as an nn.Linear would be, so seeded random checkpoints keep their values
        self.lm_head = DenseHead(nn.Linear(config.n_embd, config.padded_vocab_size, bias=False).weight)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.tie_weights()
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def tie_weights(self) -> None:
        """Share one matrix for embedding and head; the embedding's values win (docs/model.md §1)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def new_cache(self, batch_size: int, max_len: int, full_span: bool = False) -> Cache:
        """A KV cache for one request: `batch_size` rows, `max_len` positions.

        `full_span`: attention reads the whole cache, masked (the official cost), not only the filled part.
        """
        if max_len > self.config.block_size:
            raise ValueError(f"max_len {max_len} exceeds the model's block size {self.config.block_size}")
        ref = self.transformer.ln_f.weight  # device and dtype of the activations
        c = self.config
        return Cache(KVCache(batch_size, c.n_query_groups, max_len, c.head_size, ref.device, ref.dtype, full_span)
                     for _ in range(c.n_layer))

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

    def forward(self, idx: torch.Tensor, start: int = 0, audio_features: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        """One request's rows.

        Args:
            idx: `(B, 8, T)` global token ids.
            start: the position of `idx[..., 0]`.
            audio_features: `(B, L, whisper_dim)` Whisper encoder output injected at positions 1..L.
            image_features: `(B, 50, vision_dim)` CLIP tokens of a Mini-Omni2 image question; they
                take positions 1..50 and move the audio features to 52..51+L.
            cache: the request's cache; the T positions go into it. None: causal over `idx` alone.
        Returns:
            `(B, T, C)` final-normed hidden states; `lm_head(h)` gives all logits and
            `lm_head.rows(h[:, -1], parts)` each row's part of them.
        """
        x = self.embed(idx, audio_features, image_features)
        return self.run(x, [Segment(slice(0, idx.size(0)), cache, start)])

    def run(self, x: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """Embedded inputs `x (B, T, C)` of several requests through the blocks: the linear layers
        see all rows at once (one read of the weights), attention each segment on its own.
        Returns `(B, T, C)` final-normed hidden states."""
        B, T, _ = x.shape
        cos, sin = self.rope()
        for seg in segments:
            if seg.cache is not None and seg.cache.rows < seg.rows.stop - seg.rows.start:
                raise ValueError(f"a cache of {seg.cache.rows} rows cannot hold rows {seg.rows}")
        if len({seg.start for seg in segments}) == 1:
            rope = cos[segments[0].start:segments[0].start + T], sin[segments[0].start:segments[0].start + T]
        else:  # each row its own positions
            rope = tuple(torch.cat([table[seg.start:seg.start + T].expand(seg.rows.stop - seg.rows.start, T, -1)
                                    for seg in segments]).view(B, 1, 1, T, -1) for table in (cos, sin))
        c = self.config
        cut = []
        for seg in segments:
            span = T if seg.cache is None else seg.cache[0].span(seg.start + T)
            offset = 0 if seg.cache is None else seg.start
            cut.append((seg.rows, seg.cache, seg.start, attention_mask(c.q_per_kv, offset, T, span, x.device)))
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, [(rows, None if cache is None else cache[i], start, mask)
                                for rows, cache, start, mask in cut])
        return self.transformer.ln_f(x)
