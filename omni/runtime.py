"""How the engine computes: the exact mode (the default), a fast mode, and the official cost.

- `exact`: fp32, token-identical to the official algorithm, with only exact rewrites (each batch
  row reads only the head slice it needs; attention spans only the filled cache; the prompt rows'
  shared part is prefilled once; decode-step products in the formulation measured fastest on this
  machine, which includes the official one, so it is never slower than the official products).
- `fast` (opt-in): on CPU, int8 linear layers with per-row activation scales (language model,
  head, Whisper blocks) and an int8 embedding. Tokens may differ from the exact mode.
- `baseline`: the official implementation's cost structure (`F.linear` products, full head on
  every row, attention over the whole 2048-long cache, both prompt rows prefilled), so benchmarks
  can report the official cost measured in the same run.

Each choice is made once, here, at load: `prepare_lm` / `prepare_whisper` install the parts.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from .linear import (DenseHead, DenseLinear, Int8Embedding, Int8Head, Int8Linear, Products, has_vnni, install,
                     tune_products)
from .model import OmniLM
from .whisper import WhisperEncoder


@dataclass(frozen=True)
class Runtime:
    name: str
    linear: str  # "tuned": fp32, products measured at load; "official": F.linear; "int8"
    official_cost: bool  # full head on every row, whole-cache attention, no shared prefill

    @property
    def int8(self) -> bool:
        return self.linear == "int8"


MODES = {
    "exact": Runtime("exact", linear="tuned", official_cost=False),
    "fast": Runtime("fast", linear="int8", official_cost=False),
    "baseline": Runtime("baseline", linear="official", official_cost=True),
}


def resolve_mode(mode: str, device: torch.device) -> Runtime:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
    runtime = MODES[mode]
    if runtime.int8 and device.type != "cpu":
        # the int8 kernels are CPU-only; on a GPU fast mode keeps the exact mode's parts.
        runtime = replace(runtime, linear="tuned")
    return runtime


def prepare_lm(model: OmniLM, runtime: Runtime) -> None:
    """Install the runtime's linear layers, head and embedding into a loaded model, in place."""
    if runtime.int8:
        _install_int8(model)
        return
    head = model.lm_head.weight
    if runtime.linear == "tuned":
        plans = _plans(model)
        head_plan = plans.get("head", Products())
    else:  # nn.Linear's F.linear everywhere, all rows through the whole head at once
        plans, head_plan = {}, Products(head="full")
    install(model, lambda linear: DenseLinear(linear, plans.get(_group(linear.weight), Products())))
    model.lm_head = DenseHead(head, head_plan)


def prepare_whisper(encoder: WhisperEncoder, runtime: Runtime) -> None:
    if runtime.int8:
        reduce_range = not has_vnni()
        for block in encoder.blocks:
            install(block, lambda linear: Int8Linear(linear.weight, linear.bias, reduce_range))


def _group(weight: torch.Tensor) -> str:
    return "x".join(map(str, weight.shape))


def _plans(model: OmniLM) -> dict[str, Products]:
    """Products plans for the decode step's weights, by shape, and for the head (on CPU: measured)."""
    if model.lm_head.weight.device.type != "cpu":
        return {}
    groups: dict[str, list[torch.Tensor]] = {}
    for block in model.transformer.h:
        for linear in (m for m in block.modules() if type(m) is nn.Linear):
            groups.setdefault(_group(linear.weight), []).append(linear.weight)
    groups["head"] = [model.lm_head.weight]
    return tune_products(groups)


def _detach_vectors(module: nn.Module) -> None:
    """Copy the 1-D tensors (biases, norm weights), so that none of them keeps the memory-mapped
    checkpoint alive."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.dim() == 1:
                setattr(sub, name, nn.Parameter(param.detach().clone(), requires_grad=False))


def _install_int8(model: OmniLM) -> None:
    """int8 blocks, adapters, head (its text and audio parts) and embedding.

    Afterwards no tensor refers to the memory-mapped fp32 checkpoint, so its pages leave memory.
    """
    reduce_range = not has_vnni()
    weight = model.transformer.wte.weight.detach()
    model.lm_head = Int8Head(weight, reduce_range)
    model.transformer.wte = Int8Embedding(weight)
    del weight
    _detach_vectors(model)
    install(model, lambda linear: Int8Linear(linear.weight, linear.bias, reduce_range))
    gc.collect()  # the swapped-out fp32 modules sit in reference cycles that hold the file's mapping
