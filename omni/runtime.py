"""How the engine computes: the exact mode (the default), a fast mode, and the official cost.

- `exact`: fp32, token-identical to the official algorithm, with only exact rewrites (each batch
  row reads only the head slice it needs; attention spans only the filled cache; the prompt rows'
  shared part is prefilled once; decode-step products in the formulation measured fastest on this
  machine, which includes the official one, so it is never slower than the official products).
- `fast` (opt-in): on CPU, int8 linear layers with per-row activation scales (language model,
  head) and an int8 embedding; Whisper, compute-bound, as the kind measured fastest on this CPU:
  int8 blocks, or bf16 throughout on CPUs with bf16 units (AVX512-BF16, AMX). Tokens may differ
  from the exact mode.
- `baseline`: the official implementation's cost structure (`F.linear` products, full head on
  every row, attention over the whole 2048-long cache, both prompt rows prefilled), so benchmarks
  can report the official cost measured in the same run.

Each choice is made once, here, at load: `resolve_mode` turns a mode name and the `Overrides` into a
`Runtime`, `prepare_lm` installs the language model's parts and `load_whisper` loads the encoder as
the chosen kind; the `Runtime`'s `CostPlan` is how much work every request does.
"""
from __future__ import annotations

import copy
import ctypes
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from . import rowkernels
from .generate import EXACT_COST, OFFICIAL_COST, CostPlan
from .linear import DenseHead, DenseLinear, Int8Embedding, Int8Head, Int8Linear, Products, install
from .machine import has_bf16, has_vnni
from .model import OmniLM, SwiGLU
from .rowkernels import F32Table, Q8Table, RowsEmbedding, RowsHead, RowsLinear, RowsSwiGLU
from .tuning import ENV, TIE_MARGIN, TUNE_ROUNDS, Overrides, measured_once, tune_products
from .whisper import EncoderBlock, RowChunks, WhisperEncoder, encoder_shape, load_whisper_encoder

# How fast mode's Whisper encoder computes: int8 blocks (fbgemm, any x86 CPU; convolutions and
# attention in fp32) or bf16 throughout (oneDNN on the CPU's bf16 units). The first is the fallback.
ENCODER_KINDS = ("int8", "bf16")
ENCODER_DTYPES = {"fp32": torch.float32, "int8": torch.float32, "bf16": torch.bfloat16}
MEASURE_WEIGHT_STD = 0.02  # the random block timed for the choice: weights of a trained model's scale
# Fast mode's int8 products: torch's quantized linear (the fallback; named for fbgemm, its x86 engine, it
# runs whatever `torch.backends.quantized.engine` is, qnnpack on ARM) or one of this project's kernels
# (`rowkernels.Q8_KERNELS`: AVX512-VNNI, AVX-VNNI, AVX2, ARM64 dot products).
LIBRARY_INT8 = "fbgemm"
INT8_KERNELS = (LIBRARY_INT8, *rowkernels.Q8_KERNELS)
INT8_TUNED_ROWS = (2, 4)  # a decode step of one A1A2 answer, of two (the default batch on a CPU)
INT8_TUNE_BYTES = 24 << 20  # int8 weights per timing pass: more than a big L3 cache, so it measures DRAM
# int8 encoder MLP positions per chunk: 512 x 3072 fp32 hidden (6 MB) stays in cache; 1.25x faster than the
# whole 1500-position window on the AMD EPYC, same bits (int8 rows are independent), a third of the transient.
INT8_MLP_ROWS = 512


@dataclass(frozen=True)
class Mode:
    """What a mode computes with."""

    linear: str  # "tuned": fp32, products measured at load; "official": F.linear; "int8"
    cost: CostPlan  # how much work each request's decoding does


MODES = {
    "exact": Mode(linear="tuned", cost=EXACT_COST),
    "fast": Mode(linear="int8", cost=EXACT_COST),
    "baseline": Mode(linear="official", cost=OFFICIAL_COST),
}
# The --mode choices of every entry point; the first is the engine's and inference.py's default. AUTO_MODE
# (the live surfaces' default) is not a mode of its own: the engine resolves it to one of MODES at load
# (`omni.auto`).
AUTO_MODE = "auto"
MODE_NAMES = (*MODES, AUTO_MODE)
DEFAULT_MODE = MODE_NAMES[0]


@dataclass(frozen=True)
class Runtime:
    """How the engine computes, decided once at load: a mode on a device, with the user's overrides."""

    name: str
    linear: str  # as in `Mode`, after the device: "int8" only on a CPU
    cost: CostPlan
    overrides: Overrides  # speed choices forced instead of measured

    @property
    def int8(self) -> bool:
        return self.linear == "int8"


def resolve_mode(mode: str, device: torch.device, overrides: Overrides | None = None) -> Runtime:
    """Mode `mode` on `device`, with `overrides` (default: the environment's, `Overrides.from_env()`)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
    linear, cost = MODES[mode].linear, MODES[mode].cost
    if linear == "int8" and device.type != "cpu":
        linear = "tuned"  # the int8 kernels are CPU-only; on a GPU fast mode keeps the exact mode's parts
    return Runtime(mode, linear, cost, overrides if overrides is not None else Overrides.from_env())


def prepare_lm(model: OmniLM, runtime: Runtime) -> None:
    """Install the runtime's linear layers, head and embedding into a loaded model, in place."""
    if runtime.int8:
        _install_int8(model, runtime.overrides)
        return
    head = model.lm_head.weight
    if runtime.linear == "tuned":
        plans = _plans(model, runtime.overrides)
        head_plan = plans.get("head", Products())
    else:  # nn.Linear's F.linear everywhere, all rows through the whole head at once
        plans, head_plan = {}, Products(head="full")

    def dense(linear: nn.Linear) -> nn.Module:
        plan = plans.get(_group(linear.weight), Products())
        return RowsLinear(F32Table(linear.weight), linear.bias) if plan.kernel else DenseLinear(linear, plan)

    install(model, dense)
    if head_plan.kernel:
        table = F32Table(head)
        model.lm_head, model.transformer.wte = RowsHead(table), RowsEmbedding(table)
    else:
        model.lm_head = DenseHead(head, head_plan)
    if any(plan.kernel for plan in plans.values()):
        _detach_params(model)  # the kernels hold copies; let the checkpoint's mapped pages go


def load_whisper(path: str | Path, device: torch.device, runtime: Runtime) -> WhisperEncoder:
    """Whisper's encoder as the runtime computes it: fp32, or in fast mode the kind chosen for this CPU."""
    kind = encoder_kind(runtime, encoder_shape(path))
    encoder = load_whisper_encoder(path, device, ENCODER_DTYPES[kind])
    if kind == "int8":
        for block in encoder.blocks:
            _int8_block(block)
    return encoder


def encoder_kinds() -> tuple[str, ...]:
    """The kinds this CPU can run well: bf16 only where bf16 products run on its own units."""
    return ENCODER_KINDS if has_bf16() else ENCODER_KINDS[:1]


def encoder_kind(runtime: Runtime, shape: dict[str, int]) -> str:
    """fp32 outside fast mode (and so on a GPU); in it, the fastest of `encoder_kinds()` on one encoder
    block of `shape`, measured once per machine and cached (`overrides.encoder`, MINI_OMNI_ENCODER=int8|bf16,
    forces one)."""
    if not runtime.int8:
        return "fp32"
    forced = runtime.overrides.encoder
    if forced:
        if forced not in ENCODER_KINDS:
            raise ValueError(f"{ENV['encoder']}={forced!r}; choose one of {ENCODER_KINDS}")
        return forced
    kinds = encoder_kinds()
    if len(kinds) == 1:
        return kinds[0]
    return measured_once({"encoder": shape, "kinds": list(kinds)},
                         lambda: {"kind": choose_encoder_kind(measure_encoder_kinds(shape, kinds))},
                         runtime.overrides.cache)["kind"]


def choose_encoder_kind(seconds: dict[str, float]) -> str:
    """The fastest kind; on a tie (within TIE_MARGIN) the fallback, int8, whose weights take half the memory."""
    fallback = ENCODER_KINDS[0]
    return min(seconds, key=lambda kind: seconds[kind] * (1 if kind == fallback else TIE_MARGIN))


def measure_encoder_kinds(shape: dict[str, int], kinds: tuple[str, ...]) -> dict[str, float]:
    """Fastest pass (seconds) of one random encoder block of `shape`, over a whole window, per kind, interleaved."""
    generator = torch.Generator().manual_seed(0)  # the values do not matter; torch's global RNG stays untouched
    with torch.device("meta"):
        fp32 = EncoderBlock(shape["n_audio_state"], shape["n_audio_head"])
    fp32 = fp32.to_empty(device="cpu").eval()
    for param in fp32.parameters():
        param.data.normal_(0, MEASURE_WEIGHT_STD, generator=generator)
    x = torch.randn(1, shape["n_audio_ctx"], shape["n_audio_state"], generator=generator)
    blocks = {kind: _block_as(fp32, kind) for kind in kinds}
    best = {kind: float("inf") for kind in kinds}
    inputs = {kind: x.to(ENCODER_DTYPES[kind]) for kind in kinds}
    with torch.inference_mode():
        for _ in range(TUNE_ROUNDS):
            for kind, block in blocks.items():
                start = time.perf_counter()
                block(inputs[kind])
                best[kind] = min(best[kind], time.perf_counter() - start)
    return best


def _block_as(block: EncoderBlock, kind: str) -> nn.Module:
    block = copy.deepcopy(block).to(ENCODER_DTYPES[kind])
    if kind == "int8":
        _int8_block(block)
    return block


def _int8_block(block: EncoderBlock) -> None:
    """An encoder block's linears as int8, its MLP run in chunks of positions."""
    _int8_linears(block)
    block.mlp = RowChunks(block.mlp, INT8_MLP_ROWS)


def _int8_linears(module: nn.Module) -> None:
    """Every `nn.Linear` of `module` as an `Int8Linear`."""
    reduce_range = not has_vnni()  # decided here once for the whole module
    install(module, lambda linear: Int8Linear(linear.weight, linear.bias, reduce_range))


def _group(weight: torch.Tensor) -> str:
    return "x".join(map(str, weight.shape))


def _plans(model: OmniLM, overrides: Overrides) -> dict[str, Products]:
    """Products plans for the decode step's weights, by shape, and for the head (on CPU: measured)."""
    if model.lm_head.weight.device.type != "cpu":
        return {}
    groups: dict[str, list[torch.Tensor]] = {}
    for block in model.transformer.h:
        for linear in (m for m in block.modules() if type(m) is nn.Linear):
            groups.setdefault(_group(linear.weight), []).append(linear.weight)
    groups["head"] = [model.lm_head.weight]
    return tune_products(groups, overrides)


def _detach_vectors(module: nn.Module) -> None:
    """Copy the 1-D tensors (biases, norm weights), so that none of them keeps the memory-mapped
    checkpoint alive."""
    _detach_params(module, max_dim=1)


def _detach_params(module: nn.Module, max_dim: int = 2) -> None:
    """Copy the parameters of up to `max_dim` dimensions, so that none of them keeps the memory-mapped
    checkpoint alive (the tied head and embedding stay one Parameter)."""
    copies: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.dim() <= max_dim:
                if id(param) not in copies:
                    copies[id(param)] = nn.Parameter(param.detach().clone(), requires_grad=False)
                setattr(sub, name, copies[id(param)])


def _install_int8(model: OmniLM, overrides: Overrides) -> None:
    """int8 blocks, adapters, head (its text and audio parts) and embedding, with the kernel chosen for
    this CPU (`int8_kernel`); with one of this project's kernels the head and the embedding are one table.

    Afterwards no tensor refers to the memory-mapped fp32 checkpoint, so its pages leave memory.
    """
    weight = model.transformer.wte.weight.detach()
    kernel = int8_kernel(model.config.intermediate_size, model.config.n_embd, overrides)
    if kernel != LIBRARY_INT8:
        table = Q8Table(weight, kernel)
        model.lm_head, model.transformer.wte = RowsHead(table), RowsEmbedding(table)
    else:
        model.lm_head = Int8Head(weight, reduce_range=not has_vnni())
        model.transformer.wte = Int8Embedding(weight)
    del weight
    _detach_vectors(model)
    if kernel != LIBRARY_INT8:
        _fuse_mlps(model, lambda weight: Q8Table(weight, kernel))
        install(model, lambda linear: RowsLinear(Q8Table(linear.weight, kernel), linear.bias))
    else:
        _int8_linears(model)
    gc.collect()  # the swapped-out fp32 modules sit in reference cycles that hold the file's mapping


def _fuse_mlps(module: nn.Module, table: Callable[[torch.Tensor], Q8Table]) -> None:
    """Every SwiGLU inside `module` as a `RowsSwiGLU` over `table(weight)`s: its two input products one call."""
    for name, child in list(module.named_children()):
        if isinstance(child, SwiGLU):
            setattr(module, name, RowsSwiGLU(child, table))
        else:
            _fuse_mlps(child, table)


def int8_kernel(n_out: int, n_in: int, overrides: Overrides) -> str:
    """Fast mode's int8 products for the language model: torch's quantized linear, or the fastest of this
    project's kernels that the CPU runs, if it beats the library on a decode step's row counts; measured
    once per machine (and quantized engine) on random `(n_out, n_in)` weights and cached
    (`overrides.int8`, MINI_OMNI_INT8, one of INT8_KERNELS, forces one)."""
    forced, have = overrides.int8, available_int8_kernels(overrides.cache)
    if forced:
        if forced not in INT8_KERNELS:
            raise ValueError(f"{ENV['int8']}={forced!r}; choose one of {INT8_KERNELS}")
        if forced not in have:
            raise ValueError(f"{ENV['int8']}={forced}, but {rowkernels.why_not(forced)}")
        return forced
    if have == (LIBRARY_INT8,):
        return LIBRARY_INT8
    what = {"int8": [n_out, n_in], "kernels": list(have), "rows": list(INT8_TUNED_ROWS),
            "engine": torch.backends.quantized.engine}
    return measured_once(what, lambda: {"kernel": choose_int8_kernel(measure_int8_kernels(n_out, n_in, have))},
                         overrides.cache)["kernel"]


def available_int8_kernels(cache: Path | None = None) -> tuple[str, ...]:
    """The library's int8 linear and each of this project's int8 kernels that runs here (built into `cache`)."""
    return (LIBRARY_INT8, *(k for k in rowkernels.Q8_KERNELS if rowkernels.load(k, cache) is not None))


def choose_int8_kernel(seconds: dict[str, float]) -> str:
    """The fastest of this project's kernels unless the library beats it by TIE_MARGIN (a kernel of ours
    also keeps one table for head and embedding)."""
    ours = min((k for k in seconds if k != LIBRARY_INT8), key=seconds.__getitem__)
    return LIBRARY_INT8 if seconds[LIBRARY_INT8] * TIE_MARGIN < seconds[ours] else ours


def int8_layer(kernel: str, weight: torch.Tensor) -> nn.Module:
    """A bias-free linear over `weight` through `kernel` (one of INT8_KERNELS), as fast mode builds it."""
    if kernel == LIBRARY_INT8:
        return Int8Linear(weight, None, reduce_range=not has_vnni())
    return RowsLinear(Q8Table(weight, kernel), None)


def measure_int8_kernels(n_out: int, n_in: int, kernels: tuple[str, ...]) -> dict[str, float]:
    """Per kernel, the sum over INT8_TUNED_ROWS of the fastest pass over distinct random weights, interleaved."""
    generator = torch.Generator().manual_seed(0)  # the values do not matter; torch's global RNG stays untouched
    count = max(1, INT8_TUNE_BYTES // (n_out * n_in))
    weights = [torch.randn(n_out, n_in, generator=generator) * MEASURE_WEIGHT_STD for _ in range(count)]
    layers = {kernel: [int8_layer(kernel, w) for w in weights] for kernel in kernels}
    del weights
    x = torch.randn(max(INT8_TUNED_ROWS), n_in, generator=generator)
    best = {(kernel, rows): float("inf") for kernel in layers for rows in INT8_TUNED_ROWS}
    with torch.inference_mode():
        for _ in range(TUNE_ROUNDS):
            for rows in INT8_TUNED_ROWS:
                for kernel, mods in layers.items():
                    start = time.perf_counter()
                    for mod in mods:
                        mod(x[:rows])
                    best[kernel, rows] = min(best[kernel, rows], time.perf_counter() - start)
    return {kernel: sum(best[kernel, rows] for rows in INT8_TUNED_ROWS) for kernel in layers}


def release_freed_memory() -> None:
    """After loading: collect the swapped-out modules, then give the heap pages freed on the way (the
    int8 conversion's temporaries, the fp16 -> fp32 copies) back to the OS."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Return the heap's free pages to the OS (glibc keeps them until asked; ~10 ms). A no-op elsewhere.

    Called holding the GIL (PyDLL): a daemon thread that released it here could be torn down mid-call
    by the interpreter's exit, which aborts the process.
    """
    try:
        trim = ctypes.PyDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)
