import math

import pytest
import torch
import torch.nn.functional as F

from omni.config import ModelConfig
from omni.model import OmniLM

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
        ours = attn(x, cos[:9], sin[:9], None)
        ref = reference_attention(attn, x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_cached_incremental_decoding_equals_a_full_forward(model):
    torch.manual_seed(1)
    idx = torch.randint(0, TINY.padded_vocab_size, (2, 8, 12))
    feats = torch.randn(2, 4, TINY.whisper_adapter_dim)
    with torch.no_grad():
        full = model(idx, audio_features=feats)  # no cache, causal over all 12
        model.setup_cache(2, 16)
        steps = [model(idx[..., :5], 0, audio_features=feats)]
        for t in range(5, 12):
            steps.append(model(idx[..., t:t + 1], t))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.lm_head(torch.cat(steps, dim=1)), model.lm_head(full), rtol=1e-4, atol=1e-4)


def test_whole_cache_span_gives_the_filled_span_result(model):
    """The official code attends over the whole preallocated cache (masked): same result, higher cost."""
    torch.manual_seed(3)
    idx = torch.randint(0, TINY.padded_vocab_size, (1, 8, 7))
    with torch.no_grad():
        model.setup_cache(1, 16)
        filled = [model(idx[..., :4], 0)] + [model(idx[..., t:t + 1], t) for t in range(4, 7)]
        model.setup_cache(1, 16, full_span=True)
        assert model.transformer.h[0].attn.kv_cache.span(5) == 16
        whole = [model(idx[..., :4], 0)] + [model(idx[..., t:t + 1], t) for t in range(4, 7)]
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


def test_forward_with_cache_needs_setup(model):
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(torch.zeros(1, 8, 2, dtype=torch.long), 0)


def test_setup_cache_reuses_a_big_enough_cache(model):
    model.setup_cache(1, 32)
    cache = model.transformer.h[0].attn.kv_cache
    model.setup_cache(1, 16)
    assert model.transformer.h[0].attn.kv_cache is cache
    model.clear_cache()
    assert model.transformer.h[0].attn.kv_cache is None


def test_shared_prefill_equals_the_batched_one(model):
    from omni.generate import prefill

    torch.manual_seed(2)
    row = torch.randint(0, TINY.padded_vocab_size, (1, 8, 9))
    prompt = row.repeat(2, 1, 1)
    prompt[1, :7, -1] = 152000 + 4097  # the rows differ only in their last audio tokens, as in A1A2
    feats = torch.randn(1, 4, TINY.whisper_adapter_dim).expand(2, -1, -1)
    with torch.no_grad():
        model.setup_cache(2, 16)
        shared = prefill(model, prompt, feats, ("all", "all"))
        shared_k = model.transformer.h[1].attn.kv_cache.k[:, :, :9].clone()
        # the official way: both rows through every position
        batched = prefill(model, prompt, feats, ("all", "all"), share=False)
        batched_k = model.transformer.h[1].attn.kv_cache.k[:, :, :9]
    for a, b in zip(shared, batched):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared_k, batched_k, rtol=1e-5, atol=1e-5)
