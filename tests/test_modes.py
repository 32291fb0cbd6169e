"""The engine's modes: exact (default), fast (int8 + trimmed encoder) and the official baseline."""
import pytest
import torch

from omni import rowkernels
from omni.audio import feature_frames, load_audio, log_mel, pad_or_trim, trimmed_length
from omni.generate import OFFICIAL_COST, Step
from omni.linear import DenseHead, DenseLinear, Int8Head, Int8Linear, Products
from omni.rowkernels import Q8_KERNELS, RowsHead, RowsLinear
from omni.runtime import MODES, resolve_mode
from omni.tokens import Task
from omni_engine import OmniEngine
from utils.bench_model import products_summary
from utils.fidelity import teacher_forced_agreement

MAX = 140


@pytest.fixture(scope="module")
def fast_engine(tiny_ckpt):
    return OmniEngine(tiny_ckpt, device="cpu", mode="fast")


def test_baseline_costs_more_but_gives_the_exact_tokens(tiny_ckpt, engine, sample_wav):
    baseline = OmniEngine(tiny_ckpt, device="cpu", mode="baseline")
    assert baseline.runtime.cost == OFFICIAL_COST
    official = baseline.model.transformer.h[0].mlp.fc_1.products  # F.linear, as nn.Linear computes
    assert official == Products() and baseline.model.lm_head.products.head == "full"
    assert baseline.run(sample_wav, max_tokens=MAX).streams == engine.run(sample_wav, max_tokens=MAX).streams
    text = dict(text="What is your name?", task="T1T2", max_tokens=60)
    assert baseline.run(**text).streams == engine.run(**text).streams


def test_fast_mode_streams_on_the_same_schedule(fast_engine, engine, sample_wav):
    fast = list(fast_engine.stream(sample_wav, max_tokens=MAX))
    exact = list(engine.stream(sample_wav, max_tokens=MAX))
    assert [len(c.steps) for c in fast] == [len(c.steps) for c in exact]
    assert [len(c.pcm) for c in fast] == [len(c.pcm) for c in exact]
    assert fast_engine.mode == "fast" and isinstance(fast_engine.model.lm_head, (Int8Head, RowsHead))
    assert isinstance(fast_engine.model.transformer.h[0].attn.attn, (Int8Linear, RowsLinear))
    assert isinstance(engine.model.lm_head, (DenseHead, RowsHead))
    assert isinstance(engine.model.transformer.h[0].attn.attn, (DenseLinear, RowsLinear))


def test_fast_mode_cache_matches_a_full_forward(fast_engine):
    """int8 activations are quantized per row (per token), so a cached step quantizes each token as
    the full forward does; only float rounding elsewhere differs."""
    model = fast_engine.model
    torch.manual_seed(0)
    idx = torch.randint(0, model.config.padded_vocab_size, (2, 8, 10))
    with torch.inference_mode():
        full = model.lm_head(model(idx))
        cache = model.new_cache(2, 16)
        steps = [model(idx[..., :4], 0, cache=cache)] + [model(idx[..., t:t + 1], t, cache=cache) for t in range(4, 10)]
        cached = model.lm_head(torch.cat(steps, 1))
    cosine = torch.nn.functional.cosine_similarity(cached, full, dim=-1)
    assert cosine.min() > 0.999, cosine.min()
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() >= 0.95


def test_fast_mode_rows_do_not_depend_on_their_batch(fast_engine):
    """A row's hidden states are the same alone or next to another row (per-row activation scales)."""
    model = fast_engine.model
    torch.manual_seed(1)
    idx = torch.randint(0, model.config.padded_vocab_size, (2, 8, 6))
    idx[1] = idx[1] * 0 + 5  # a very different neighbour: scales shared per batch would change row 0
    with torch.inference_mode():
        together = model(idx)
        alone = model(idx[:1])
    torch.testing.assert_close(together[:1], alone, rtol=1e-6, atol=1e-6)


def test_trimmed_encoder_reads_exactly_the_frames_the_prompt_needs(tiny_ckpt, engine, sample_wav):
    samples = load_audio(sample_wav)
    mel = log_mel(pad_or_trim(samples, trimmed_length(samples.size)))
    with torch.inference_mode():
        feats = engine.whisper(mel.unsqueeze(0))
    assert feats.shape == (1, feature_frames(samples.size), engine.config.whisper_adapter_dim)
    trimmed = OmniEngine(tiny_ckpt, device="cpu", trim_encoder=True)
    chunks = list(trimmed.stream(sample_wav, max_tokens=MAX))
    assert sum(len(c.steps) for c in chunks) == MAX - feature_frames(samples.size) - 3


def test_int8_language_model_agrees_with_exact_under_teacher_forcing(tiny_ckpt, engine, sample_wav):
    """The int8 LM, given the exact mode's features and fed its tokens: its greedy picks mostly agree."""
    reference = engine.run(sample_wav, max_tokens=MAX).streams
    steps = [Step(tuple(s[i] for s in reference[:7]), reference[7][i]) for i in range(len(reference[7]))]
    inputs = engine.prepare(Task.A1A2, load_audio(sample_wav), None)
    args = inputs.prompt, inputs.decoder, steps, inputs.audio_features
    assert teacher_forced_agreement(engine.model, *args) == [1.0] * 8
    int8 = OmniEngine(tiny_ckpt, device="cpu", mode="fast")
    agreement = teacher_forced_agreement(int8.model, *args)
    assert min(agreement) >= 0.5, agreement


def test_mode_resolution():
    with pytest.raises(ValueError, match="unknown mode"):
        resolve_mode("turbo", torch.device("cpu"))
    assert resolve_mode("fast", torch.device("cpu")).int8
    assert not resolve_mode("fast", torch.device("cuda")).int8  # int8 kernels are CPU-only
    assert set(MODES) == {"exact", "fast", "baseline"}


def test_speed_overrides_are_arguments_with_the_environment_as_default(monkeypatch, tmp_path):
    from omni.runtime import encoder_kind
    from omni.tuning import Overrides

    monkeypatch.setenv("MINI_OMNI_ENCODER", "bf16")
    monkeypatch.setenv("MINI_OMNI_CACHE", str(tmp_path))
    assert Overrides.from_env() == Overrides(encoder="bf16", cache=tmp_path)
    assert resolve_mode("fast", torch.device("cpu")).overrides.encoder == "bf16"
    chosen = resolve_mode("fast", torch.device("cpu"), Overrides(encoder="int8"))
    assert encoder_kind(chosen, {}) == "int8"  # the argument, not the environment
    with pytest.raises(ValueError, match="MINI_OMNI_ENCODER"):
        encoder_kind(resolve_mode("fast", torch.device("cpu"), Overrides(encoder="fp16")), {})


@pytest.mark.skipif("qnnpack" not in torch.backends.quantized.supported_engines, reason="torch built without qnnpack")
def test_fast_mode_falls_back_to_torchs_int8_engine_without_fbgemm(tiny_ckpt, engine, sample_wav, monkeypatch):
    """Where fbgemm is absent (ARM64) and no kernel of ours runs, fast mode computes with the quantized
    engine torch has: qnnpack here, chosen by hand, with every kernel of ours made unavailable."""
    for kind in Q8_KERNELS:
        monkeypatch.setitem(rowkernels._loaded, kind, None)
        monkeypatch.setitem(rowkernels._why_not, kind, "the CPU lacks it")
    monkeypatch.setattr(torch.backends.quantized, "engine", "qnnpack")
    fast = OmniEngine(tiny_ckpt, device="cpu", mode="fast")
    assert isinstance(fast.model.lm_head, Int8Head) and isinstance(fast.model.transformer.h[0].attn.attn, Int8Linear)
    chunks = list(fast.stream(sample_wav, max_tokens=MAX))
    exact = list(engine.stream(sample_wav, max_tokens=MAX))
    assert [len(c.steps) for c in chunks] == [len(c.steps) for c in exact]
    assert products_summary(fast)["int8"] == "fbgemm (torch engine qnnpack)"
