"""The streaming SNAC decoder: streamed audio equals the whole answer decoded at once (issue 21)."""
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from omni.checkpoint import SNAC_DIR
from omni.codec import LOOKAHEAD_FRAMES, SAMPLES_PER_FRAME, FrameScheduler, SnacCodec, streams_to_frames
from omni.sampling import GenerationConfig
from utils.bench_codec import join_window, snr_db

GOLDEN = json.loads((Path(__file__).parent / "golden" / "official_tokens.json").read_text())
MIN_SNR_DB = 60.0  # the bound, overall and within 20 ms of every join
EXACT_SNR_DB = 100.0  # float rounding only (the previewed first chunk is at about 80 dB)
BYTES_PER_FRAME = SAMPLES_PER_FRAME * 2
SHORT = 67  # steps of the answer for the tests that stream it many times: 60 frames, 5 s


@pytest.fixture(scope="module")
def codec(tiny_ckpt) -> SnacCodec:
    return SnacCodec.from_dir(tiny_ckpt / SNAC_DIR, torch.device("cpu"))


@pytest.fixture(scope="module")
def answer() -> tuple[list, list]:
    """A long answer (130 frames, 11 s): the official code's A1A2 streams on the tiny checkpoint."""
    streams = GOLDEN["checkpoints"]["tiny"]["streams"]["A1A2"]
    return list(zip(*streams[:7])), streams_to_frames(streams)


def streamed(codec, steps, stride, **options) -> list[bytes]:
    stream = codec.stream(stride, **options)
    return [stream.push(step) for step in steps] + [stream.flush()]


def wave(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, "<i2").astype(np.float64)


@pytest.mark.parametrize("lookahead", [LOOKAHEAD_FRAMES, None])
def test_a_long_answer_streamed_equals_it_decoded_whole(codec, answer, lookahead):
    steps, frames = answer
    whole = wave(codec.decode(frames, noise=False))
    chunks = streamed(codec, steps, 4, noise=False, lookahead=lookahead)
    got = wave(b"".join(chunks))
    assert got.size == whole.size == len(frames) * SAMPLES_PER_FRAME  # the tail flushed, nothing dropped
    joins = np.cumsum([len(c) // 2 for c in chunks if c])[:-1]
    at_joins = join_window(joins, got.size)
    assert snr_db(got, whole) >= MIN_SNR_DB and snr_db(got[at_joins], whole[at_joins]) >= MIN_SNR_DB
    official = wave(b"".join(streamed(codec, steps, 4, noise=False, joins="official")))
    assert snr_db(official[at_joins], whole[at_joins]) < 30  # what the seams cost


def test_only_the_first_join_is_previewed(codec, answer):
    """After the first chunk every chunk waits for the decoder's whole look-ahead: its audio is final."""
    steps, frames = answer
    steps = steps[:SHORT]
    whole = wave(codec.decode(streams_to_frames([list(s) for s in zip(*steps)]), noise=False))
    chunks = [c for c in streamed(codec, steps, 4, noise=False) if c]
    got, first = wave(b"".join(chunks)), len(chunks[0]) // 2
    assert snr_db(got[first:], whole[first:]) >= EXACT_SNR_DB > snr_db(got[:first], whole[:first])


def test_chunk_size_is_a_free_choice(codec, answer):
    steps = answer[0][:SHORT]
    exact = {stride: wave(b"".join(streamed(codec, steps, stride, noise=False, lookahead=None)))
             for stride in (1, 2, 4, 7)}
    assert all(np.abs(exact[s] - exact[1]).max() <= 1 for s in exact)  # the same audio, to float rounding
    for stride in (1, 2, 4, 7):
        chunks = streamed(codec, steps, stride, noise=False)
        assert all(len(c) == stride * BYTES_PER_FRAME for c in [c for c in chunks if c][:-1])
        assert snr_db(wave(b"".join(chunks)), exact[1]) >= MIN_SNR_DB


def test_audio_leaves_after_its_frames_plus_two_frames_of_look_ahead(codec, answer):
    steps, _ = answer
    for first in (1, 4):
        stream = codec.stream(4, first, noise=False)
        at = next(i for i, step in enumerate(steps) if stream.push(step))
        assert at == first + LOOKAHEAD_FRAMES + 6  # the 7-step stagger: frame f completes at step f + 6
    assert LOOKAHEAD_FRAMES * SAMPLES_PER_FRAME < codec.streaming.lookahead < (LOOKAHEAD_FRAMES + 1) * SAMPLES_PER_FRAME


def test_the_official_switch_decodes_each_chunk_alone(codec, answer):
    """joins="official" is the official stream: chunks on the official schedule, each decoded on its own
    with SNAC's noise seeded per chunk, then the tail."""
    steps, _ = answer
    schedule, expected, seed = FrameScheduler(4), [], 5
    for step in steps:
        if frames := schedule.push(step):
            expected.append(codec.decode(frames, noise_seed=seed + len(expected)))
    expected.append(codec.decode(schedule.flush(), noise_seed=seed + len(expected)))
    assert [c for c in streamed(codec, steps, 4, joins="official", noise_seed=seed) if c] == expected


def test_the_engine_streams_gapless_by_default_and_official_on_request(engine, sample_wav):
    gapless = engine.run(sample_wav, max_tokens=120)
    frames = streams_to_frames(gapless.streams)
    chunks = [c.pcm for c in engine.stream(sample_wav, max_tokens=120, joins="official") if c.pcm]
    official, seed = [], GenerationConfig().seed
    for i in range(len(chunks) - 1):
        official.append(engine.codec.decode(frames[4 * i: 4 * i + 4], noise_seed=seed + i))
    official.append(engine.codec.decode(frames[4 * len(official):], noise_seed=seed + len(official)))
    assert chunks == official  # the official bytes
    assert len(gapless.pcm) == len(frames) * BYTES_PER_FRAME and gapless.pcm != b"".join(official)


def test_answers_never_share_decoder_state(codec, answer):
    """Two answers streamed at once, their pushes interleaved on two threads, each equal their solo bytes."""
    steps = answer[0][:SHORT]
    solo = [streamed(codec, steps, 4, noise_seed=seed) for seed in (0, 1)]
    streams = [codec.stream(4, noise_seed=seed) for seed in (0, 1)]
    together: list[list[bytes]] = [[], []]

    def speak(row: int) -> None:
        together[row] = [streams[row].push(step) for step in steps] + [streams[row].flush()]

    threads = [threading.Thread(target=speak, args=(row,)) for row in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == solo and solo[0] != solo[1]


def test_noise_is_seeded_per_answer(codec, answer):
    steps = answer[0][:SHORT]
    assert streamed(codec, steps, 4, noise_seed=3) == streamed(codec, steps, 4, noise_seed=3)
    assert streamed(codec, steps, 4, noise_seed=3) != streamed(codec, steps, 4, noise=False)


def test_an_answer_without_frames_flushes_nothing(codec):
    assert codec.stream(4).flush() == b"" and codec.stream(4, joins="official").flush() == b""


def test_joins_is_validated():
    with pytest.raises(ValueError, match="joins"):
        GenerationConfig(joins="smooth")
    assert GenerationConfig().joins == "gapless"
