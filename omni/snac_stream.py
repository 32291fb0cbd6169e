"""SNAC's decoder run as a stream: latent steps in as frames arrive, audio out once its context is in.

SNAC's decoder is non-causal: every convolution pads both sides, so a sample depends on codes before
and after it. Run whole, each layer sees zeros only at the answer's two ends. Run as a stream, each
layer that looks across time keeps what it has seen in a per-answer state (its last inputs, or for a
transposed convolution the overlap it still owes) and holds back the outputs whose right context has
not arrived yet, so the committed audio is the whole decode's, up to float rounding. The held-back
width, summed over layers, is the decoder's look-ahead (`StreamingDecoder.lookahead`: 4757 samples,
2.32 frames, for SNAC 24 kHz). Audio further ahead can be *previewed*: the held-back outputs computed
as if the answer ended where the codes end, without touching the state; SNAC's receptive field fades
fast enough that a preview 661 samples deep (what a look-ahead of 2 frames leaves short) is within
about -78 dB of the final audio on the tiny checkpoint. Exact streaming needs no approximation in any
layer; only the wish to wait 2 frames rather than 2.32 is met by previewing.

Three kinds of operation cover every decoder layer:
- `Pointwise`: Snake, Tanh, 1x1 convolutions, the noise blocks: no context, no state.
- `Windowed`: a convolution (or a residual unit around one) with `a` samples of left and `b` of right
  context, computed over valid positions only; its state is its last `a + b` inputs.
- `Upsample`: a transposed convolution; its state is the overlap (`kernel - stride` samples) that the
  inputs so far add to outputs not yet final.
Each operation answers three questions in plain integers before any tensor is touched: how many outputs
the new inputs commit (`commits`), how many more the answer's end would add (`tail`), and how many
previewed inputs a given number of previewed outputs needs (`needs`); so a preview computes only the
samples asked for, at every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LATENT_STEPS_PER_FRAME = 4  # SNAC's finest level: 4 codes, one latent step each, per frame


class Pointwise:
    """A time-local layer: as many outputs as inputs, nothing carried."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def new_state(self) -> dict:
        return {}

    def commits(self, st: dict, n: int) -> int:
        return n

    def tail(self, st: dict, n: int, up: int) -> int:
        return up

    def needs(self, st: dict, n: int, want: int, up: int) -> int:
        return want

    def run(self, st: dict, x: torch.Tensor, n: int, want: int) -> torch.Tensor:
        return self.fn(x, st) if x.shape[-1] else x


class Windowed:
    """`fn` maps `L` inputs to `L - a - b` outputs (valid positions); the stream starts and ends with zeros,
    as a convolution's padding does. State: the last `a + b` inputs (`a` zeros at the start)."""

    def __init__(self, fn, a: int, b: int, channels: int) -> None:
        self.fn, self.a, self.b, self.channels = fn, a, b, channels

    def new_state(self) -> dict:
        return {"hist": torch.zeros(1, self.channels, self.a)}

    def commits(self, st: dict, n: int) -> int:
        return max(0, st["hist"].shape[-1] + n - self.a - self.b)

    def tail(self, st: dict, n: int, up: int) -> int:
        return st["hist"].shape[-1] + n + up - self.a - self.commits(st, n)

    def needs(self, st: dict, n: int, want: int, up: int) -> int:
        return min(up, max(0, self.commits(st, n) + want + self.a + self.b - st["hist"].shape[-1] - n))

    def run(self, st: dict, x: torch.Tensor, n: int, want: int) -> torch.Tensor:
        hist = st["hist"].to(x)
        out = self.commits(st, n) + want
        buf = torch.cat([hist, x, x.new_zeros(1, x.shape[1], self.b)], dim=-1)[..., : out + self.a + self.b]
        st["hist"] = torch.cat([hist, x[..., :n]], dim=-1)[..., -(self.a + self.b):]
        return self.fn(buf) if out > 0 else x[..., :0]


class Upsample:
    """A transposed convolution (stride `s`, kernel `k`, cropping `p` each side, `op` extra at the end),
    computed by overlap-add: input `i` adds to uncropped outputs `[i*s, i*s + k)`, so after `T` inputs the
    uncropped outputs below `T*s` are final. State: inputs taken, and the overlap owed to the next ones."""

    def __init__(self, conv: nn.ConvTranspose1d) -> None:
        (self.s,), (self.k,), (self.p,), (self.op,) = conv.stride, conv.kernel_size, conv.padding, conv.output_padding
        assert conv.groups == 1 and conv.dilation == (1,), f"unsupported transposed conv {conv}"
        self.conv = conv

    def new_state(self) -> dict:
        return {"taken": 0, "overlap": torch.zeros(1, self.conv.out_channels, self.k - self.s)}

    def _total(self, inputs: int) -> int:
        """Cropped outputs of the whole decode of `inputs` inputs (torch's ConvTranspose1d length)."""
        return (inputs - 1) * self.s - 2 * self.p + self.k + self.op if inputs else 0

    def _done(self, inputs: int) -> int:
        return max(0, inputs * self.s - self.p)

    def commits(self, st: dict, n: int) -> int:
        return self._done(st["taken"] + n) - self._done(st["taken"])

    def tail(self, st: dict, n: int, up: int) -> int:
        return self._total(st["taken"] + n + up) - self._done(st["taken"] + n)

    def needs(self, st: dict, n: int, want: int, up: int) -> int:
        last = self._done(st["taken"] + n) + want - 1 + self.p  # the last wanted output, uncropped
        return min(up, max(0, last // self.s + 1 - st["taken"] - n)) if want else 0

    def _spread(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.conv.weight, None, self.s)  # (1, C, len*s + k - s), no bias

    def run(self, st: dict, x: torch.Tensor, n: int, want: int) -> torch.Tensor:
        taken, owed = st["taken"], st["overlap"].to(x)
        parts = []
        if n:
            spread = self._spread(x[..., :n])
            spread[..., : owed.shape[-1]] += owed
            parts.append(spread[..., : n * self.s])
            owed = spread[..., n * self.s:].clone()
        st["taken"], st["overlap"] = taken + n, owed
        if x.shape[-1] > n:  # previewed inputs: their spread plus what the committed ones owe
            spread = self._spread(x[..., n:])
            spread[..., : owed.shape[-1]] += owed
            owed = spread
        out = torch.cat([*parts, owed], dim=-1)
        start = max(0, self.p - taken * self.s)  # the first `p` uncropped outputs are cropped away
        count = self.commits({"taken": taken}, n) + want
        return out[..., start: start + count] + self.conv.bias.view(1, -1, 1)


def _valid_conv(conv: nn.Conv1d):
    return lambda x: F.conv1d(x, conv.weight, conv.bias, dilation=conv.dilation, groups=conv.groups)


def _residual_unit(unit: nn.Module) -> Windowed:
    """SNAC's ResidualUnit: x + conv1x1(snake(dilated_conv(snake(x)))); snake(0) = 0, so zeros before the
    first snake are the dilated conv's own zero padding."""
    snake1, conv, snake2, pointwise = unit.block
    (pad,) = conv.padding
    inner = _valid_conv(conv)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x[..., pad: x.shape[-1] - pad] + pointwise(snake2(inner(snake1(x))))

    return Windowed(fn, pad, pad, conv.in_channels)


def _noise(block: nn.Module) -> Pointwise:
    """SNAC's NoiseBlock: x + noise * linear(x), the noise from the answer's own generator (or none)."""
    def fn(x: torch.Tensor, st: dict) -> torch.Tensor:
        if not st["noise"]:
            return x
        noise = torch.randn((1, 1, x.shape[-1]), generator=st["generator"], device=x.device, dtype=x.dtype)
        return x + noise * block.linear(x)

    return Pointwise(fn)


def build_ops(layers: list[nn.Module]) -> list:
    """The streaming operation of each decoder layer, in order (DecoderBlocks unrolled)."""
    from snac.layers import DecoderBlock, NoiseBlock, ResidualUnit

    ops = []
    for layer in layers:
        if isinstance(layer, DecoderBlock):
            ops += build_ops(list(layer.block))
        elif isinstance(layer, ResidualUnit):
            ops.append(_residual_unit(layer))
        elif isinstance(layer, NoiseBlock):
            ops.append(_noise(layer))
        elif isinstance(layer, nn.ConvTranspose1d):
            ops.append(Upsample(layer))
        elif isinstance(layer, nn.Conv1d) and layer.kernel_size == (1,):
            ops.append(Pointwise(lambda x, st, conv=layer: conv(x)))
        elif isinstance(layer, nn.Conv1d):
            (pad,), (dilation,), (kernel,) = layer.padding, layer.dilation, layer.kernel_size
            assert 2 * pad == dilation * (kernel - 1), f"not a centred convolution: {layer}"
            ops.append(Windowed(_valid_conv(layer), pad, pad, layer.in_channels))
        elif isinstance(layer, (nn.Tanh,)) or type(layer).__name__ == "Snake1d":
            ops.append(Pointwise(lambda x, st, fn=layer: fn(x)))
        else:
            raise ValueError(f"cannot stream SNAC decoder layer {type(layer).__name__}: it is neither pointwise "
                             f"nor a convolution (local attention needs whole windows; the 24 kHz model has none)")
    return ops


@dataclass
class DecoderState:
    """One answer's carried decoder state. Never shared between answers."""

    layers: list[dict]  # each layer's carried samples and counts; the noise blocks' switch and generator
    committed: int = 0  # output samples final so far
    ended: bool = False


class StreamingDecoder:
    """SNAC's decoder (a model with plain or weight-normed convolutions) as streaming operations."""

    def __init__(self, model: nn.Module) -> None:
        self.quantizer = model.quantizer
        self.ops = build_ops(list(model.decoder.model))
        out_proj = self.quantizer.quantizers[0].out_proj
        self._no_latent = out_proj.weight.new_zeros(1, out_proj.out_channels, 0)  # a step that brings no frames
        self.samples_per_latent = 1
        for op in self.ops:
            if isinstance(op, Upsample):
                self.samples_per_latent *= op.s
        probe = 8 * LATENT_STEPS_PER_FRAME  # enough latent steps that no layer is still filling its window
        self.lookahead = probe * self.samples_per_latent - self._commits([op.new_state() for op in self.ops], probe)[-1]

    def new_state(self, noise: bool = True, generator: torch.Generator | None = None) -> DecoderState:
        states = [op.new_state() for op in self.ops]
        for st in states:
            st.update(noise=noise, generator=generator)
        return DecoderState(states)

    def _commits(self, states: list[dict], n: int) -> list[int]:
        counts = []
        for op, st in zip(self.ops, states):
            n = op.commits(st, n)
            counts.append(n)
        return counts

    def _wants(self, state: DecoderState, n: int, until: int, end: bool) -> list[int]:
        """Previewed outputs each layer must make so that the last reaches sample `until` (the end, with `end`)."""
        commits = self._commits(state.layers, n)
        ahead = max(0, until - state.committed - commits[-1])
        ins = [n] + commits[:-1]
        tails, up = [], 0
        for op, st, m in zip(self.ops, state.layers, ins):
            up = op.tail(st, m, up)
            tails.append(up)
        want = tails[-1] if end else min(ahead, tails[-1])
        wants = [want]
        for op, st, m, tail_in in zip(self.ops[:0:-1], state.layers[:0:-1], ins[:0:-1], tails[-2::-1]):
            want = op.needs(st, m, want, tail_in)
            wants.append(want)
        return wants[::-1]

    def step(self, state: DecoderState, codes: list[torch.Tensor], until: int = 0,
             end: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the next frames' codes `[(1, n), (1, 2n), (1, 4n)]` (n may be 0) and return
        `(final, preview)`: the newly final samples `(S,)`, then the samples after them up to sample `until`
        of the answer, computed as if it ended here. With `end`, the preview is the rest of the answer and
        the state is spent."""
        assert not state.ended, "this answer's decoder state was flushed already"
        n = codes[0].shape[-1] * LATENT_STEPS_PER_FRAME
        x = self.quantizer.from_codes(codes) if n else self._no_latent
        for op, st, want in zip(self.ops, state.layers, self._wants(state, n, until, end)):
            committed = op.commits(st, n)
            x = op.run(st, x, n, want)
            n = committed
        state.committed += n
        state.ended = end
        wave = x.reshape(-1)
        return wave[:n], wave[n:]
