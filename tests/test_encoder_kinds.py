"""Fast mode's Whisper encoder kinds (int8 blocks, bf16 throughout), chosen per CPU; exact mode keeps fp32."""
import math

import pytest
import torch
import torch.nn as nn

import omni.machine as machine
import omni.runtime as runtime
from omni.audio import load_audio, log_mel, pad_or_trim, N_SAMPLES
from omni.checkpoint import WHISPER_FILE
from omni.linear import Int8Linear
from omni.runtime import choose_encoder_kind, encoder_kind, encoder_kinds, load_whisper, resolve_mode
from omni.whisper import EncoderBlock, RowChunks, encoder_shape, load_whisper_encoder

NO_BF16 = {"model": "a CPU without bf16 units", "flags": ["avx2", "avx512f", "avx512_vnni"]}
CPU = torch.device("cpu")
BF16 = {"model": "a CPU with bf16 units", "flags": ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]}


@pytest.fixture(scope="module")
def mel(sample_wav):
    return log_mel(pad_or_trim(load_audio(sample_wav), N_SAMPLES)).unsqueeze(0)  # (1, 80, 3000)


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """Fake the CPU behind the capability probe, with its own cache of measured choices."""
    monkeypatch.setenv("MINI_OMNI_CACHE", str(tmp_path))
    monkeypatch.delenv("MINI_OMNI_ENCODER", raising=False)

    def as_cpu(info):
        monkeypatch.setattr(machine, "cpu_info", lambda: info)
        monkeypatch.setattr(machine, "onednn_bf16", lambda: True)  # what torch's oneDNN says of that CPU
    return as_cpu


@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_each_kind_gives_features_close_to_fp32(tiny_ckpt, mel, monkeypatch, kind):
    monkeypatch.setenv("MINI_OMNI_ENCODER", kind)
    path = tiny_ckpt / WHISPER_FILE
    encoder = load_whisper(path, torch.device("cpu"), resolve_mode("fast", CPU))
    assert any(isinstance(m, Int8Linear) for m in encoder.modules()) == (kind == "int8")
    assert encoder.dtype == (torch.bfloat16 if kind == "bf16" else torch.float32)
    with torch.inference_mode():
        reference = load_whisper_encoder(path, torch.device("cpu"))(mel)
        features = encoder(mel)
    assert features.dtype == torch.float32 and features.shape == reference.shape
    error = (features - reference).norm() / reference.norm()
    assert error < 0.05, error
    assert nn.functional.cosine_similarity(features, reference, dim=-1).min() > 0.99


def test_exact_mode_keeps_the_fp32_encoder_whatever_is_forced(tiny_ckpt, mel, monkeypatch, cpu):
    cpu(BF16)
    monkeypatch.setenv("MINI_OMNI_ENCODER", "bf16")  # fast mode only
    path = tiny_ckpt / WHISPER_FILE
    for mode in ("exact", "baseline"):
        encoder = load_whisper(path, torch.device("cpu"), resolve_mode(mode, CPU))
        assert encoder.dtype == torch.float32
        assert all(type(m) is not Int8Linear for m in encoder.modules())
        with torch.inference_mode():
            assert torch.equal(encoder(mel), load_whisper_encoder(path, torch.device("cpu"))(mel))


def test_without_bf16_units_fast_mode_falls_back_to_int8_unmeasured(tiny_ckpt, cpu, monkeypatch):
    cpu(NO_BF16)

    def no_measuring(*args):
        raise AssertionError("nothing to choose between: no measuring")

    monkeypatch.setattr(runtime, "measure_encoder_kinds", no_measuring)
    assert not machine.has_bf16()
    assert encoder_kinds() == ("int8",)
    assert encoder_kind(resolve_mode("fast", CPU), encoder_shape(tiny_ckpt / WHISPER_FILE)) == "int8"
    encoder = load_whisper(tiny_ckpt / WHISPER_FILE, torch.device("cpu"), resolve_mode("fast", CPU))
    assert encoder.dtype == torch.float32 and any(isinstance(m, Int8Linear) for m in encoder.modules())


def test_with_bf16_units_the_kind_is_measured_once_then_cached(tiny_ckpt, cpu, monkeypatch):
    cpu(BF16)
    assert encoder_kinds() == ("int8", "bf16")
    shape = encoder_shape(tiny_ckpt / WHISPER_FILE)
    calls = []

    def measured(shape, kinds):
        calls.append(kinds)
        return {"int8": 1.0, "bf16": 0.5}

    monkeypatch.setattr(runtime, "measure_encoder_kinds", measured)
    assert encoder_kind(resolve_mode("fast", CPU), shape) == "bf16"
    assert encoder_kind(resolve_mode("fast", CPU), shape) == "bf16"
    assert calls == [("int8", "bf16")]
    cpu(NO_BF16)  # another machine: its own choice
    assert encoder_kind(resolve_mode("fast", CPU), shape) == "int8"


def test_the_real_measurement_times_every_kind(tiny_ckpt):
    seconds = runtime.measure_encoder_kinds(encoder_shape(tiny_ckpt / WHISPER_FILE), ("int8", "bf16"))
    assert set(seconds) == {"int8", "bf16"} and all(0 < s < math.inf for s in seconds.values())


def test_int8_wins_ties():
    assert choose_encoder_kind({"int8": 1.0, "bf16": 0.99}) == "int8"
    assert choose_encoder_kind({"int8": 1.0, "bf16": 0.9}) == "bf16"
    assert choose_encoder_kind({"int8": 1.0}) == "int8"


def test_a_kind_can_be_forced_and_is_checked(monkeypatch, cpu):
    cpu(NO_BF16)
    shape = {"n_audio_ctx": 8, "n_audio_state": 8, "n_audio_head": 2, "n_audio_layer": 1}
    monkeypatch.setenv("MINI_OMNI_ENCODER", "bf16")
    assert encoder_kind(resolve_mode("fast", CPU), shape) == "bf16"
    monkeypatch.setenv("MINI_OMNI_ENCODER", "fp16")
    with pytest.raises(ValueError, match="MINI_OMNI_ENCODER"):
        encoder_kind(resolve_mode("fast", CPU), shape)


def test_int8_mlp_in_row_chunks_gives_the_same_bits():
    """int8 rows are quantized one by one, so the MLP may run a few positions at a time (for the cache)."""
    torch.manual_seed(4)
    block = EncoderBlock(32, 2).eval()
    runtime._int8_block(block)
    assert isinstance(block.mlp, RowChunks)
    x = torch.randn(1, 2 * runtime.INT8_MLP_ROWS + 7, 32)  # chunks of unequal length
    with torch.inference_mode():
        assert torch.equal(block.mlp(x), block.mlp.module(x))
