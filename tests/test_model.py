import math

import pytest
import torch
import torch.nn.functional as F

from omni.config import ModelConfig
from omni.model import OmniLM, Segment, attention_mask

TINY = ModelConfig(n_embd=64, n_layer=2, n_head=4, n_query_groups=2, head_size=16, intermediate_size=96,
                   whisper_adapter_dim=32)


def official_keys(n_layer: int) -> set[str]:
    """The litgpt key set written out from docs/model.md §1, independent of our module tree."""
    keys = {f"whisper_adapter.{m}.weight" for m in ("fc_1", "fc_2", "proj")}
    keys |= {"lm_head.weight", "transformer.wte.weight", "transformer.ln_f.weight"}
    for i in range(n_layer):
        keys |= {f"transformer.h.{i}.{name}" for name in (
            "norm_1.weight", "attn.attn.weight", "attn.attn.bias", "attn.proj.weight", "norm_2.weight",
            "mlp.fc_1.weight", "mlp.fc_2.weight", "mlp.proj.weight")}
    return keys


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = OmniLM(TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def test_state_dict_has_the_official_keys(model):
    assert set(model.state_dict()) == official_keys(TINY.n_layer)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_full_size_shapes():
    with torch.device("meta"):
        m = OmniLM(ModelConfig())
    sd = m.state_dict()
    assert sd["transformer.h.0.attn.attn.weight"].shape == (1152, 896)
    assert sd["transformer.h.0.attn.attn.bias"].shape == (1152,)
    assert sd["whisper_adapter.fc_1.weight"].shape == (4864, 768)
    assert sd["lm_head.weight"].shape == (181120, 896)
    assert set(sd) == official_keys(24)


def reference_attention(attn, x):
    """Grouped-query attention from de-interleaved q/k/v matrices, written independently:
    the fused rows are [group][q_0..q_{k-1}, k, v][head_size] (docs/model.md §2)."""
    c = attn.config
    W, b = attn.attn.weight, attn.attn.bias
    per_group = (c.q_per_kv + 2) * c.head_size
    q_rows, k_rows, v_rows = [], [], []
    for g in range(c.n_query_groups):
        base = g * per_group
        for s in range(c.q_per_kv):
            q_rows.append(torch.arange(base + s * c.head_size, base + (s + 1) * c.head_size))
        k_rows.append(torch.arange(base + c.q_per_kv * c.head_size, base + (c.q_per_kv + 1) * c.head_size))
        v_rows.append(torch.arange(base + (c.q_per_kv + 1) * c.head_size, base + per_group))
    T = x.size(1)
    inv_freq = 1.0 / (c.rope_base ** (torch.arange(0, c.head_size, 2, dtype=torch.float64) / c.head_size))
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()

    def rope(t):
        h = t.size(-1) // 2
        return t * cos + torch.cat([-t[..., h:], t[..., :h]], -1) * sin

    outs = []
    for h in range(c.n_head):
        g = h // c.q_per_kv
        q = rope(x @ W[q_rows[h]].T + b[q_rows[h]])
        k = rope(x @ W[k_rows[g]].T + b[k_rows[g]])
        v = x @ W[v_rows[g]].T + b[v_rows[g]]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(c.head_size)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        outs.append(F.softmax(scores, -1) @ v)
    return torch.cat(outs, -1) @ attn.proj.weight.T


def test_fused_qkv_matches_an_independent_computation(model):
    attn = model.transformer.h[0].attn
    x = torch.randn(1, 9, TINY.n_embd)
    cos, sin = model.rope()
    with torch.no_grad():
        mask = attention_mask(TINY.q_per_kv, 0, 9, 9, x.device)
        ours = attn(x, (cos[:9], sin[:9]), [(slice(0, 1), None, 0, mask)])
        ref = reference_attention(attn, x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_cached_incremental_decoding_equals_a_full_forward(model):
    torch.manual_seed(1)
    idx = torch.randint(0, TINY.padded_vocab_size, (2, 8, 12))
    feats = torch.randn(2, 4, TINY.whisper_adapter_dim)
    with torch.no_grad():
        full = model(idx, audio_features=feats)  # no cache, causal over all 12
        cache = model.new_cache(2, 16)
        steps = [model(idx[..., :5], 0, audio_features=feats, cache=cache)]
        for t in range(5, 12):
            steps.append(model(idx[..., t:t + 1], t, cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.lm_head(torch.cat(steps, dim=1)), model.lm_head(full), rtol=1e-4, atol=1e-4)


def test_whole_cache_span_gives_the_filled_span_result(model):
    """The official code attends over the whole preallocated cache (masked): same result, higher cost."""
    torch.manual_seed(3)
    idx = torch.randint(0, TINY.padded_vocab_size, (1, 8, 7))
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        filled = [model(idx[..., :4], 0, cache=cache)] + [model(idx[..., t:t + 1], t, cache=cache) for t in range(4, 7)]
        cache = model.new_cache(1, 16, full_span=True)
        assert cache[0].span(5) == 16
        whole = [model(idx[..., :4], 0, cache=cache)] + [model(idx[..., t:t + 1], t, cache=cache) for t in range(4, 7)]
    torch.testing.assert_close(torch.cat(whole, 1), torch.cat(filled, 1), rtol=1e-5, atol=1e-5)


def test_audio_features_replace_audio_streams_only(model):
    idx = torch.randint(0, TINY.padded_vocab_size, (1, 8, 6))
    feats = torch.randn(1, 3, TINY.whisper_adapter_dim)
    with torch.no_grad():
        x = model.embed(idx, feats)
        e = model.transformer.wte(idx)[0]
        a = model.whisper_adapter(feats)[0]
    for t in range(6):
        audio = a[t - 1] * 7 if 1 <= t <= 3 else e[:7, t].sum(0)
        torch.testing.assert_close(x[0, t], (audio + e[7, t]) / 8, rtol=1e-5, atol=1e-5)


def test_a_cache_refuses_positions_beyond_its_length(model):
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.zeros(1, 8, 5, dtype=torch.long), 0, cache=cache)
    with pytest.raises(ValueError, match="block size"):
        model.new_cache(1, TINY.block_size + 1)


def test_a_cache_costs_memory_per_position(model):
    cache = model.new_cache(2, 16)
    assert cache.rows == 2 and cache.max_len == 16
    # keys and values, every layer, both rows, one head per query group, fp32
    assert cache.bytes_per_position() == 2 * TINY.n_layer * 2 * TINY.n_query_groups * TINY.head_size * 4


def test_requests_at_different_positions_share_a_step(model):
    """`run` with one segment per request gives each request's rows what it gets alone."""
    torch.manual_seed(4)
    a = torch.randint(0, TINY.padded_vocab_size, (2, 8, 9))
    b = torch.randint(0, TINY.padded_vocab_size, (1, 8, 5))
    with torch.no_grad():
        alone = []
        for prompt in (a, b):
            cache = model.new_cache(prompt.size(0), 16)
            model(prompt[..., :-1], 0, cache=cache)
            alone.append(model(prompt[..., -1:], prompt.size(-1) - 1, cache=cache))
        caches = [model.new_cache(p.size(0), 16) for p in (a, b)]
        for prompt, cache in zip((a, b), caches):
            model(prompt[..., :-1], 0, cache=cache)
        x = model.embed(torch.cat([a[..., -1:], b[..., -1:]]))
        together = model.run(x, [Segment(slice(0, 2), caches[0], 8), Segment(slice(2, 3), caches[1], 4)])
    torch.testing.assert_close(together[:2], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[2:], alone[1], rtol=1e-5, atol=1e-5)


def test_shared_chunked_prefill_equals_the_official_one(model):
    """The batch-of-two prompt's shared part runs once, in chunks, and its cache is copied to row 1:
    the same logits and cache as both rows through every position at once (the official cost)."""
    from omni.generate import OFFICIAL_COST, Sequence, SpeechDecoder
    from omni.sampling import GenerationConfig

    torch.manual_seed(2)
    row = torch.randint(0, TINY.padded_vocab_size, (1, 8, 9))
    prompt = row.repeat(2, 1, 1)
    prompt[1, :7, -1] = 152000 + 4097  # the rows differ only in their last audio tokens, as in A1A2
    feats = torch.randn(1, 4, TINY.whisper_adapter_dim).expand(2, -1, -1)
    cfg = GenerationConfig(max_tokens=16)
    with torch.no_grad():
        shared = Sequence(model, prompt, SpeechDecoder(batch=True), cfg, feats)
        chunks = sum(1 for _ in shared.prefill(chunk=3))
        official = Sequence(model, prompt, SpeechDecoder(batch=True), cfg, feats, cost=OFFICIAL_COST)
        assert sum(1 for _ in official.prefill()) == 0  # one piece
    assert chunks == 3  # 8 shared positions in chunks of 3, then the last position of both rows
    assert shared.first == official.first
    torch.testing.assert_close(shared.cache[1].k[:, :, :9], official.cache[1].k[:, :, :9], rtol=1e-5, atol=1e-5)
