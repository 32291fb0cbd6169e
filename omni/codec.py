"""SNAC codec: the 7 staggered audio streams <-> SNAC's 3 code levels <-> 24 kHz PCM (docs/model.md §6).

Frame `k` of the answer takes layer `j`'s token from decode position `k + j + 1` (layer j starts
j + 1 steps after the text). A frame's 7 tokens are SNAC's codes in depth-first order:
level 0 gets [t0], level 1 gets [t1, t4], level 2 gets [t2, t3, t5, t6].

An answer's audio is streamed by `SnacCodec.stream`: "gapless" joins carry SNAC's context from chunk to
chunk (snac_stream.py), so the chunks join into the whole-answer decode; "official" joins decode each
chunk on its own, as the official code does, with a click at every join (docs/joins.png).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import warnings
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from .audio import OUTPUT_SAMPLE_RATE, float_to_pcm
from .errors import CheckpointError
from .sampling import GAPLESS_JOINS, JOINS, OFFICIAL_JOINS
from .snac_stream import DecoderState, StreamingDecoder
from .tokens import AUDIO_CODES, N_AUDIO_LAYERS

SAMPLES_PER_FRAME = 2048  # hop 512 x 4 level-2 codes: 85.3 ms of audio per decode step
SECONDS_PER_FRAME = SAMPLES_PER_FRAME / OUTPUT_SAMPLE_RATE  # real time needs a decode step (and its SNAC) under this
LEVEL_OF_SLOT = (0, 1, 2, 2, 1, 2, 2)  # which SNAC level each of a frame's 7 tokens belongs to
N_LEVELS = 3
# Decode steps before frame 0 is complete: layer 6 lags the prefill token by 7 positions.
FRAME_LAG = N_AUDIO_LAYERS
SNAC_HUB_REPO = "hubertsiuzdak/snac_24khz"
SNAC_CONFIG = "config.json"
SNAC_WEIGHTS = "pytorch_model.bin"
# torch's two spellings of a weight-normed weight: legacy hooks and parametrizations.
LEGACY_NORM_KEYS = ("weight_g", "weight_v")
PARAM_NORM_KEYS = ("parametrizations.weight.original0", "parametrizations.weight.original1")
# Frames of codes the gapless stream waits for past the first chunk's last sample. SNAC's decoder needs
# 2.32 frames (4757 samples) for exact audio; the first chunk's last 661 samples are previewed instead
# (within -78 dB of the final audio), so first audio leaves a decode step sooner. Later chunks wait for
# the exact look-ahead: previewing at every join costs +49% SNAC compute at stride 4 on the full-size
# decoder, exact joins cost no more than the official chunks (utils/bench_codec.py, docs/performance.md).
LOOKAHEAD_FRAMES = 2

Frame = tuple[int, ...]  # 7 local audio codes


def frames_to_codes(frames: list[Frame], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """n frames -> SNAC codes `[(1, n), (1, 2n), (1, 4n)]`."""
    levels: list[list[int]] = [[] for _ in range(N_LEVELS)]
    for frame in frames:
        for slot, code in enumerate(frame):
            levels[LEVEL_OF_SLOT[slot]].append(code)
    return [torch.tensor(level, dtype=torch.long, device=device).unsqueeze(0) for level in levels]


def codes_to_frames(codes: list[torch.Tensor]) -> list[Frame]:
    """Inverse of `frames_to_codes`."""
    flat = [level.reshape(-1).tolist() for level in codes]
    frames = []
    for k in range(len(flat[0])):
        taken = [0] * N_LEVELS
        frame = []
        for level in LEVEL_OF_SLOT:
            frame.append(flat[level][k * (1 << level) + taken[level]])
            taken[level] += 1
        frames.append(tuple(frame))
    return frames


def streams_to_frames(streams: list[list[int]]) -> list[Frame]:
    """7 per-layer token lists (from the prefill token on) -> the complete frames."""
    n = min(len(s) - layer - 1 for layer, s in enumerate(streams[:N_AUDIO_LAYERS]))
    return [tuple(streams[j][k + j + 1] for j in range(N_AUDIO_LAYERS)) for k in range(max(n, 0))]


def frames_to_streams(frames: list[Frame], fill: int) -> list[list[int]]:
    """Inverse of `streams_to_frames`: re-apply the stagger, `fill` where a layer has no frame yet."""
    return [[fill] * (j + 1) + [f[j] for f in frames] + [fill] * (N_AUDIO_LAYERS - 1 - j)
            for j in range(N_AUDIO_LAYERS)]


class FrameScheduler:
    """Collects per-step audio tokens and hands out frames on the official streaming schedule.

    The first chunk is due once `first_stride` frames are complete (official: `stride`, i.e. 10
    decode steps at stride 4), then one every `stride` steps; `flush()` returns the tail the
    official code drops.
    """

    def __init__(self, stride: int, first_stride: int | None = None) -> None:
        self.stride = stride
        self.first_stride = first_stride or stride
        self.streams: list[list[int]] = [[] for _ in range(N_AUDIO_LAYERS)]
        self.emitted = 0

    def push(self, audio: Frame) -> list[Frame]:
        for layer, token in enumerate(audio):
            self.streams[layer].append(token)
        due = self.first_stride if self.emitted == 0 else self.stride
        if len(self.streams[0]) - FRAME_LAG - self.emitted < due:
            return []
        return self.flush()

    def flush(self) -> list[Frame]:
        frames = streams_to_frames(self.streams)[self.emitted:]
        self.emitted += len(frames)
        return frames


def _remap_weight_norm(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Rename weight-norm keys between torch's legacy and parametrization spellings as needed."""
    out = {}
    for key, value in state.items():
        if key not in expected:
            for old, new in (*zip(LEGACY_NORM_KEYS, PARAM_NORM_KEYS), *zip(PARAM_NORM_KEYS, LEGACY_NORM_KEYS)):
                if key.endswith(old) and key[: -len(old)] + new in expected:
                    key = key[: -len(old)] + new
                    break
        out[key] = value
    return out


@contextlib.contextmanager
def seeded_rng(seed: int | None, device: torch.device):
    """torch's global RNG seeded with `seed` inside the block and restored on exit (no-op for None).

    For code that draws from the global RNG and takes no generator (SNAC's noise blocks).
    """
    if seed is None:
        yield
        return
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def fold_weight_norms(model: torch.nn.Module) -> None:
    """Compute each weight-normed weight (`g * v / |v|`) once and keep it as a plain weight: SNAC's
    parametrizations recompute all of them on every decode (~20 ms of an ~90 ms chunk on the AMD EPYC).
    The stored weight is the value every forward computed, so the audio is bit-identical."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def snac_class() -> type[torch.nn.Module]:
    """The `snac` package's model class, imported quietly."""
    with warnings.catch_warnings():  # snac 1.2.1 uses torch.jit.script, deprecated in torch 2.13
        warnings.simplefilter("ignore", DeprecationWarning)
        from snac import SNAC
    return SNAC


class SnacCodec:
    """Decodes frames to PCM with a SNAC 24 kHz model."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.streaming = StreamingDecoder(model)  # the layers' streaming view; each answer has its own state

    @classmethod
    def from_dir(cls, snac_dir: str | Path, device: torch.device) -> "SnacCodec":
        SNAC = snac_class()
        snac_dir = Path(snac_dir)
        try:
            config = json.loads((snac_dir / SNAC_CONFIG).read_text())
            state = torch.load(snac_dir / SNAC_WEIGHTS, map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot read the SNAC model in {snac_dir} ({SNAC_CONFIG} + {SNAC_WEIGHTS}): {e}") from e
        model = SNAC(**config)
        expected = set(model.state_dict())
        state = _remap_weight_norm(state, expected)
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise CheckpointError(f"SNAC weights in {snac_dir} do not match its config: "
                                  f"missing {missing[:5]}, unexpected {extra[:5]}")
        model.load_state_dict(state)
        del model.encoder  # answers are only decoded: SNAC's encoder (a third of its weights) never runs
        fold_weight_norms(model)
        return cls(model.to(device).eval(), device)

    def codes(self, frames: list[Frame]) -> list[torch.Tensor]:
        """Frames -> SNAC codes on the codec's device. A slot holding a special token (>= 4096; a trained
        model never puts one inside a frame) is decoded as code 0 rather than failing."""
        return [c.masked_fill(c >= AUDIO_CODES, 0) for c in frames_to_codes(frames, self.device)]

    @torch.inference_mode()
    def decode(self, frames: list[Frame], noise_seed: int | None = None, noise: bool = True) -> bytes:
        """Frames -> int16 LE mono PCM at 24 kHz, 2048 samples per frame, decoded together.

        SNAC's decoder adds noise drawn from torch's global RNG; with `noise_seed` it is drawn from that
        seed and the global state is restored after. `noise=False` leaves the noise blocks out.
        """
        if not frames:
            return b""
        with seeded_rng(noise_seed, self.device):
            wave = self.model.decode(self.codes(frames)) if noise else self._decode_quiet(self.codes(frames))
        return float_to_pcm(wave.reshape(-1).float().cpu().numpy())

    def _decode_quiet(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """SNAC's decode, layer by layer, without its noise blocks: `(1, 1, samples)`."""
        from snac.layers import DecoderBlock, NoiseBlock

        x = self.model.quantizer.from_codes(codes)
        for layer in self.model.decoder.model:
            for part in layer.block if isinstance(layer, DecoderBlock) else (layer,):
                x = x if isinstance(part, NoiseBlock) else part(x)
        return x

    def stream(self, stride: int, first_stride: int | None = None, joins: str = GAPLESS_JOINS,
               noise_seed: int | None = None, noise: bool = True,
               lookahead: int | None = LOOKAHEAD_FRAMES) -> AnswerAudio:
        """One answer's audio decoder: `push(step_audio) -> bytes` per decode step, `flush() -> bytes` at the end.

        Args:
            stride: frames per chunk after the first; first_stride: frames in the first (None = stride).
            joins: "gapless" (one decode of the whole answer, streamed) or "official" (each chunk alone).
            noise_seed: seeds SNAC's noise (official: seed, seed + 1, ... per chunk); None draws from torch's
                global RNG. noise: False leaves SNAC's noise blocks out (for measuring).
            lookahead: gapless only: frames of codes waited for past the first chunk's end (its last samples
                previewed); None waits for all the decoder needs (2.32 frames for SNAC 24 kHz), as every
                later chunk does, so all audio after the first chunk is exact.
        """
        if joins not in JOINS:
            raise ValueError(f"joins must be one of {JOINS}, got {joins!r}")
        if joins == OFFICIAL_JOINS:
            return OfficialStream(self, stride, first_stride, noise_seed, noise)
        return GaplessStream(self, stride, first_stride, noise_seed, noise, lookahead)


class OfficialStream:
    """The official chunks: each decoded on its own, on the official schedule, plus the tail it drops."""

    def __init__(self, codec: SnacCodec, stride: int, first_stride: int | None, noise_seed: int | None,
                 noise: bool) -> None:
        self.codec, self.noise = codec, noise
        self.frames = FrameScheduler(stride, first_stride)
        self.noise_seeds = itertools.count(noise_seed) if noise_seed is not None else itertools.repeat(None)

    def push(self, audio: Frame) -> bytes:
        return self._decode(self.frames.push(audio))

    def flush(self) -> bytes:
        return self._decode(self.frames.flush())

    def _decode(self, frames: list[Frame]) -> bytes:
        return self.codec.decode(frames, next(self.noise_seeds), self.noise) if frames else b""


class GaplessStream:
    """One decode of the whole answer, streamed. The first chunk leaves once the frames `lookahead` past
    its end are in, its last samples (whose context is still short of what the decoder needs) previewed
    (`StreamingDecoder.step`); every later chunk waits for the decoder's whole look-ahead and is final."""

    def __init__(self, codec: SnacCodec, stride: int, first_stride: int | None, noise_seed: int | None,
                 noise: bool, lookahead: int | None) -> None:
        self.codec, self.decoder = codec, codec.streaming
        self.stride, self.first_stride = stride, first_stride or stride
        generator = torch.Generator(codec.device).manual_seed(noise_seed) if noise_seed is not None else None
        self.state: DecoderState = self.decoder.new_state(noise, generator)
        self.first_wait = self.decoder.lookahead if lookahead is None else lookahead * SAMPLES_PER_FRAME
        self.frames = FrameScheduler(1)  # hands out each frame as soon as it is complete
        self.pending: list[Frame] = []
        self.complete = 0  # frames in
        self.sent = 0  # samples out
        self.final = torch.zeros(0)  # final samples from `sent` on, not sent yet

    def push(self, audio: Frame) -> bytes:
        new = self.frames.push(audio)
        self.pending += new
        self.complete += len(new)
        due, wait = (self.first_stride, self.first_wait) if self.sent == 0 else (self.stride, self.decoder.lookahead)
        target = self.sent + due * SAMPLES_PER_FRAME
        if self.complete * SAMPLES_PER_FRAME - wait < target:
            return b""
        return self._emit(target, end=False)

    def flush(self) -> bytes:
        """The rest of the answer, decoded to its end."""
        self.pending += self.frames.flush()
        return self._emit(None, end=True)

    @torch.inference_mode()
    def _emit(self, target: int | None, end: bool) -> bytes:
        before = self.state.committed
        final, preview = self.decoder.step(self.state, self.codec.codes(self.pending), target or 0, end)
        self.pending = []
        after = self.state.committed
        # Final samples from `sent` on (those before it went out already, previewed), then the preview.
        known = torch.cat([self.final.to(final), final[max(0, self.sent - before):]])
        audio = torch.cat([known, preview[max(0, self.sent - after):]])
        count = audio.numel() if end else target - self.sent
        assert audio.numel() >= count, f"{audio.numel()} samples decoded for a chunk of {count}"
        self.final = known[count:]
        self.sent += count
        return float_to_pcm(audio[:count].float().cpu().numpy())


AnswerAudio = OfficialStream | GaplessStream  # what `SnacCodec.stream` returns
