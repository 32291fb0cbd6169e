"""How the engine computes: the exact mode (the default), a fast mode, and the official baseline.

- `exact`: fp32, token-identical to the official algorithm, with only exact rewrites (each batch
  row computes only the head slice it is read for; attention spans only the filled cache; the
  prompt rows' shared part is prefilled once; decode-step products run as `W @ x.T`).
- `fast` (opt-in): on CPU, dynamic int8 linear layers (language model, head, embedding, Whisper
  blocks). Tokens may differ from the exact mode (see the README).
- `baseline`: the official implementation's cost structure (full head on every row, attention over
  the whole 2048-long cache), kept so benchmarks can report speed-ups measured in the same run.
"""
from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from .model import HEAD_PARTS, OmniLM
from .whisper import WhisperEncoder

INT8_MAX = 127


@dataclass(frozen=True)
class Runtime:
    name: str
    full_head: bool  # every batch row computes all 181,120 logits (official)
    full_span: bool  # attention over the whole preallocated cache (official)
    int8: bool  # dynamic int8 linear layers (CPU only)


MODES = {
    "exact": Runtime("exact", full_head=False, full_span=False, int8=False),
    "fast": Runtime("fast", full_head=False, full_span=False, int8=True),
    "baseline": Runtime("baseline", full_head=True, full_span=True, int8=False),
}


def resolve_mode(mode: str, device: torch.device) -> Runtime:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
    runtime = MODES[mode]
    if runtime.int8 and device.type != "cpu":
        # int8 dynamic quantization has CPU kernels only; on a GPU fast mode keeps fp weights.
        runtime = replace(runtime, int8=False)
    return runtime


def _quantize(module: nn.Module) -> nn.Module:
    """Dynamic int8 for every Linear inside `module`: per-channel int8 weights, activations quantized per call."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch 2.13 marks its quantized tensors deprecated; they still run
        warnings.simplefilter("ignore")
        return quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one fp32 scale each (4x smaller than fp32)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
        self.register_buffer("q", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.float())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.q[idx].float() * self.scale[idx].unsqueeze(-1)


def _head_part(weight: torch.Tensor, part: str) -> nn.Module:
    linear = nn.Linear(weight.size(1), 1, bias=False)
    linear.weight = nn.Parameter(weight[HEAD_PARTS[part]], requires_grad=False)
    return _quantize(nn.Sequential(linear))[0]


def _detach_vectors(module: nn.Module) -> None:
    """Copy the 1-D tensors (biases, norm weights), which int8 layers keep as they are, so that none
    of them keeps the memory-mapped checkpoint alive."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.dim() == 1:
                setattr(sub, name, nn.Parameter(param.detach().clone(), requires_grad=False))


def quantize_lm(model: OmniLM) -> None:
    """int8 blocks, adapters, head (its text and audio parts) and embedding, in place.

    Afterwards no tensor refers to the memory-mapped fp32 checkpoint, so its pages leave memory.
    """
    weight = model.transformer.wte.weight.detach()
    model.quantized_head = nn.ModuleDict({part: _head_part(weight, part) for part in ("text", "audio")})
    model.transformer.wte = Int8Embedding(weight)
    model.lm_head = None  # its values live on in the int8 head
    _detach_vectors(model)
    for block in model.transformer.h:
        _quantize(block)
    _quantize(model.whisper_adapter)
    if model.config.vision_adapter_dim:
        _quantize(model.vision_adapter)
    gc.collect()  # the swapped-out fp32 modules sit in reference cycles that hold the file's mapping


def quantize_whisper(encoder: WhisperEncoder) -> None:
    for block in encoder.blocks:
        _quantize(block)
