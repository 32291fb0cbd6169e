import json

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from omni.audio import float_to_pcm
from omni.codec import (
    FrameScheduler, SnacCodec, codes_to_frames, frames_to_codes, frames_to_streams, streams_to_frames,
)
from omni.checkpoint import SNAC_DIR
from omni.tokens import EOA


def random_frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(int(x) for x in rng.integers(0, 4096, 7)) for _ in range(n)]


def test_frame_to_snac_levels():
    codes = frames_to_codes([(0, 1, 2, 3, 4, 5, 6), (10, 11, 12, 13, 14, 15, 16)])
    assert [c.tolist() for c in codes] == [[[0, 10]], [[1, 4, 11, 14]], [[2, 3, 5, 6, 12, 13, 15, 16]]]


def test_seven_streams_round_trip_through_three_levels():
    frames = random_frames(9)
    assert codes_to_frames(frames_to_codes(frames)) == frames
    streams = frames_to_streams(frames, fill=EOA)
    assert [len(s) for s in streams] == [len(frames) + 7] * 7
    assert streams_to_frames(streams) == frames


def test_stagger_matches_the_official_get_snac_indexing():
    streams = [[100 * layer + pos for pos in range(20)] for layer in range(7)]
    # official get_snac(list, index=10, stride=4): frame f, layer j -> position 10 - 4 - 5 + j + f
    expected = [tuple(streams[j][1 + j + f] for j in range(7)) for f in range(4)]
    assert streams_to_frames(streams)[:4] == expected


def test_schedule_first_chunk_after_ten_decode_steps_then_every_stride():
    sched = FrameScheduler(stride=4)
    emitted_at = {}
    for position, frame in enumerate(random_frames(30)):  # position 0 is the prefill token
        ready = sched.push(frame)
        if ready:
            emitted_at[position] = len(ready)
    assert emitted_at == {10: 4, 14: 4, 18: 4, 22: 4, 26: 4}
    assert len(sched.flush()) == 30 - 7 - 20  # the tail the official code drops


def test_a_smaller_first_chunk_starts_sooner():
    sched = FrameScheduler(stride=4, first_stride=1)
    emitted_at = {}
    for position, frame in enumerate(random_frames(20)):
        if ready := sched.push(frame):
            emitted_at[position] = len(ready)
    assert emitted_at == {7: 1, 11: 4, 15: 4, 19: 4}  # the first frame right after the 7-step lag


def test_pcm_clips_instead_of_wrapping():
    pcm = np.frombuffer(float_to_pcm(np.array([1.0, -1.0, 0.5, 2.0])), "<i2")
    assert pcm.tolist() == [32767, -32768, 16384, 32767]


def _resave(src, dst, rename):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save({rename(k): v for k, v in state.items()}, dst / "pytorch_model.bin")


def test_snac_loads_legacy_and_parametrized_weight_norm_keys(tiny_ckpt, tmp_path):
    snac_dir = tiny_ckpt / SNAC_DIR
    legacy = SnacCodec.from_dir(snac_dir, torch.device("cpu"))
    new = tmp_path / "param"
    _resave(snac_dir, new, lambda k: k.replace("weight_g", "parametrizations.weight.original0")
            .replace("weight_v", "parametrizations.weight.original1"))
    modern = SnacCodec.from_dir(new, torch.device("cpu"))
    for a, b in zip(legacy.model.state_dict().values(), modern.model.state_dict().values()):
        assert torch.equal(a, b)
    frames = random_frames(3)
    torch.manual_seed(0)
    pcm = legacy.decode(frames)
    torch.manual_seed(0)
    assert pcm == modern.decode(frames) and len(pcm) == 3 * 2048 * 2


def test_snac_refuses_foreign_weights(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad"
    _resave(tiny_ckpt / SNAC_DIR, bad, lambda k: "x." + k)
    from omni.errors import CheckpointError
    with pytest.raises(CheckpointError, match="missing"):
        SnacCodec.from_dir(bad, torch.device("cpu"))


def test_special_tokens_in_a_frame_do_not_crash(tiny_ckpt):
    codec = SnacCodec.from_dir(tiny_ckpt / SNAC_DIR, torch.device("cpu"))
    assert len(codec.decode([(EOA, 1, 2, 3, 4, 5, 4159)])) == 2048 * 2


def test_the_codec_keeps_only_what_decoding_needs(engine):
    """SNAC's encoder never runs (answers are decoded, not encoded), so it is not kept in memory."""
    assert not hasattr(engine.codec.model, "encoder")
    assert engine.codec.model.decoder is not None and engine.codec.model.quantizer is not None


def test_folded_weight_norms_decode_the_same_bytes(tiny_ckpt):
    """The codec computes SNAC's weight-normed weights once at load; the snac package recomputes them on
    every decode. The audio is the same, bit for bit."""
    from omni.codec import snac_class

    snac_dir = tiny_ckpt / SNAC_DIR
    codec = SnacCodec.from_dir(snac_dir, torch.device("cpu"))
    assert not any(parametrize.is_parametrized(m) for m in codec.model.modules())
    package = snac_class()(**json.loads((snac_dir / "config.json").read_text()))
    package.load_state_dict(torch.load(snac_dir / "pytorch_model.bin", weights_only=True))
    assert any(parametrize.is_parametrized(m) for m in package.decoder.modules())
    unfolded = SnacCodec(package.eval(), torch.device("cpu"))
    frames = random_frames(4)
    assert codec.decode(frames, noise_seed=7) == unfolded.decode(frames, noise_seed=7)
