"""Linear layers, head and embedding as parts chosen once at load (STYLE: a runtime choice is an object).

- `DenseLinear` / `DenseHead`: fp32 (or the model dtype) with a `Products` plan: how the few-row
  products of a decode step (1 row to a batch of several requests' rows) are written. `F.linear`
  (`x @ W.T`, the official formulation, MKL), `W @ x.T` (MKL) and oneDNN's linear are the same sums
  in another rounding order, but they stream W at very different speeds, and which one wins depends
  on the CPU, the library build and the row count (2.5x either way between two x86 servers; MKL's
  few-row kernels are slow on AMD CPUs). `tune_products` times them on the real weights.
- `Int8Linear` / `Int8Head` / `Int8Embedding`: int8 weights with one scale per output channel;
  activations quantized per row (per token), so a row's result never depends on its batch.

`install(module, make)` swaps every `nn.Linear` of a module for the part `make` builds from it.
"""
from __future__ import annotations

import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tokens import PADDED_TEXT_VOCAB, PADDED_VOCAB

HEAD_PARTS = {"text": slice(0, PADDED_TEXT_VOCAB), "audio": slice(PADDED_TEXT_VOCAB, PADDED_VOCAB),
              "all": slice(0, PADDED_VOCAB)}
SPLIT_PARTS = ("text", "audio")  # "all" is both, in this order
INT8_MAX = 127
ANCHOR = (1.0, -1.0)  # Int8Linear's extra input row: pins the kernel's one quantization range to [-1, 1]
# "linear" first: the official formulation wins ties. "f32rows" is this project's kernel (omni.rowkernels): its
# weights live in a layout of their own, so a weight group takes it for every row count or not at all.
FORMULATIONS = ("linear", "wxt", "onednn", "f32rows")
KERNEL_FORMULATION = "f32rows"
# Row counts measured: one request (1 or 2 rows), a batch of requests (4, 8) and a prefill chunk (32, the
# PREFILL_CHUNK of generate.py); n rows use the plan of the smallest measured count >= n, more use F.linear.
TUNED_ROWS = (1, 2, 4, 8, 32)
TUNE_BYTES = 48 << 20  # weights read per timing pass and group: more than a big L3 cache, so it measures DRAM
TUNE_ROUNDS = 4  # interleaved passes per candidate; the fastest pass counts (other load only slows one)
TIE_MARGIN = 1.03  # a candidate must beat "linear" by 3% to replace it
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")  # int8 dot products without int16 overflow
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 dot products in hardware (oneDNN emulates them elsewhere, slowly)
PRODUCTS_FILE = "products.json"  # the measured choices, in cache_dir()


@dataclass(frozen=True)
class Products:
    """How a product with few rows is computed: `by_rows[n - 1]` for n rows, F.linear beyond.

    "wxt" computes `W @ x.T` with x's transpose as a view (BLAS then streams W row-major); one
    row is doubled first, since a 1-column `W @ x.T` is a plain (slow) matrix-vector product.
    """

    by_rows: tuple[str, ...] = ("linear",) * len(TUNED_ROWS)  # one formulation per TUNED_ROWS entry
    head: str = "parts"  # "parts": each row multiplies its own head slice; "full": all rows the whole head

    @property
    def kernel(self) -> bool:
        """Whether the group's weights go to the f32rows kernel (`omni.rowkernels`, its own layout)."""
        return KERNEL_FORMULATION in self.by_rows

    def formulation(self, n: int) -> str:
        for count, formulation in zip(TUNED_ROWS, self.by_rows):
            if n <= count:
                return formulation
        return "linear"

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        n = rows.size(0)
        formulation = self.formulation(n) if x.device.type == "cpu" else "linear"
        if formulation == "linear":
            return F.linear(x, weight, bias)
        if formulation == KERNEL_FORMULATION:
            raise RuntimeError("f32rows products run on an F32Table, the kernel's own weight layout")
        if formulation == "onednn":
            out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
            return out.reshape(*x.shape[:-1], weight.size(0))
        cols = (rows if n > 1 else rows.repeat(2, 1)).t()  # a view: (K, n), column-major
        # contiguous: a transposed result would pass its strides on and send the next product down a slow path
        out = torch.mm(weight, cols).t()[:n].contiguous()
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], weight.size(0))


class DenseLinear(nn.Module):
    """A Linear whose few-row products follow a measured `Products` plan; same parameter names."""

    def __init__(self, linear: nn.Linear, products: Products) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.products = products

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.products(x, self.weight, self.bias)


class DenseHead(nn.Module):
    """The 181,120 x 896 output head (tied to the embedding) read per batch row.

    A row read only for its audio (or text) logits needs only that slice of the head. Whether the
    rows then multiply their slices one by one or all rows the whole head at once is `products.head`.
    """

    def __init__(self, weight: nn.Parameter, products: Products = Products()) -> None:
        super().__init__()
        self.weight = weight
        self.products = products

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All logits, `(..., C)` -> `(..., 181120)`."""
        return self.products(x, self.weight)

    def rows(self, x: torch.Tensor, parts: Sequence[str]) -> list[torch.Tensor]:
        """`x (B, C)`, one part name per row -> one `(width,)` logits tensor per row."""
        if self.products.head == "full" and len(parts) > 1:
            logits = self.products(x, self.weight)  # (B, V)
            return [logits[row, HEAD_PARTS[part]] for row, part in enumerate(parts)]
        return by_part(x, parts, lambda rows, part: self.products(rows, self.weight[HEAD_PARTS[part]]))


def by_part(x: torch.Tensor, parts: Sequence[str], multiply: Callable[[torch.Tensor, str], torch.Tensor]
            ) -> list[torch.Tensor]:
    """Each row's logits for its head part, `x (B, C)` -> B tensors, with one product per part for
    all the rows that read it: a batch of many requests reads each part of the head once. A row read
    for "all" joins both the text and the audio product."""
    wanted = {part: [row for row, p in enumerate(parts) if p in (part, "all")] for part in SPLIT_PARTS}
    logits = {part: multiply(x[rows], part) for part, rows in wanted.items() if rows}
    out = []
    for row, part in enumerate(parts):
        mine = [logits[p][wanted[p].index(row)] for p in SPLIT_PARTS if part in (p, "all")]
        out.append(mine[0] if len(mine) == 1 else torch.cat(mine))
    return out


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: `(N, K)` -> int8 `(N, K)` and fp32 scales `(N,)`."""
    scale = weight.detach().float().abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
    return torch.round(weight.detach().float() / scale[:, None]).to(torch.int8), scale


class Int8Linear(nn.Module):
    """int8 weights (per output channel) times int8 activations quantized per row.

    fbgemm's dynamic kernel quantizes its input with one range for the whole tensor. Each row is
    scaled to unit max-abs and an anchor row holding +1 and -1 is appended, so that range is
    always [-1, 1]: every row gets its own scale, and its result is bit-identical whatever
    else is in the batch. The output rows are scaled back.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, reduce_range: bool) -> None:
        super().__init__()
        q, scale = int8_rows(weight)
        zero = torch.zeros(q.size(0), dtype=torch.long)
        with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated; fbgemm still runs them
            warnings.simplefilter("ignore")
            packed = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
            self._packed = torch.ops.quantized.linear_prepack(packed, None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = weight.size(1), weight.size(0)
        anchor = torch.zeros(self.in_features)
        anchor[:len(ANCHOR)] = torch.tensor(ANCHOR)
        self.register_buffer("anchor", anchor, persistent=False)
        # Without VNNI, fbgemm multiplies u8 x s8 pairs into int16, which full-range inputs can overflow.
        self.reduce_range = reduce_range

    @property
    def weight_bytes(self) -> int:
        return self.in_features * self.out_features + 4 * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Few ops, each one pass: a decode step makes ~120 of these calls, the encoder's are 1500 rows long.
        rows = x.reshape(-1, self.in_features).float()
        n = rows.size(0)
        amax = rows.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)  # (n, 1); 4x faster than vector_norm(inf)
        scaled = rows.new_empty(n + 1, self.in_features)  # the rows at unit max-abs, then the anchor row
        torch.div(rows, amax, out=scaled[:n])
        scaled[n] = self.anchor
        out = torch.ops.quantized.linear_dynamic(scaled, self._packed, self.reduce_range)[:n].mul_(amax)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8Head(nn.Module):
    """The head as two int8 parts (text, audio), each row multiplying only the part it is read for."""

    def __init__(self, weight: torch.Tensor, reduce_range: bool) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({part: Int8Linear(weight[HEAD_PARTS[part]], None, reduce_range)
                                    for part in ("text", "audio")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.parts["text"](x), self.parts["audio"](x)], dim=-1)

    def rows(self, x: torch.Tensor, parts: Sequence[str]) -> list[torch.Tensor]:
        return by_part(x, parts, lambda rows, part: self.parts[part](rows))


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one fp32 scale each (4x smaller than fp32)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        q, scale = int8_rows(weight)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.q[idx].float() * self.scale[idx].unsqueeze(-1)


def install(module: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace every `nn.Linear` inside `module` by `make(linear)`, in place."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, make(child))
        else:
            install(child, make)


# ---- choosing the products by measurement --------------------------------------------------------

def _read_cpuinfo() -> tuple[str, set[str]]:
    """The CPU model and all its flags, from /proc/cpuinfo (elsewhere: the platform's name, no flags)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, flags


def cpu_flags() -> set[str]:
    """Every instruction-set flag the CPU reports."""
    return _read_cpuinfo()[1]


def cpu_info() -> dict[str, object]:
    """CPU model and the instruction-set flags that decide which kernels are fast."""
    model, flags = _read_cpuinfo()
    return {"model": model, "flags": [flag for flag in CPU_FLAGS if flag in flags]}


def has_vnni() -> bool:
    return any(f in cpu_info()["flags"] for f in VNNI_FLAGS)


def has_bf16() -> bool:
    """Whether bf16 products run on the CPU's own bf16 units (AVX512-BF16 or AMX) through oneDNN."""
    return (any(f in cpu_info()["flags"] for f in BF16_FLAGS) and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cache_dir() -> Path:
    """Where per-machine choices are kept: $MINI_OMNI_CACHE, else the user's cache directory."""
    if os.environ.get("MINI_OMNI_CACHE"):
        return Path(os.environ["MINI_OMNI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mini-omni"


def _pass_seconds(formulation: str, rows: int, weights: Sequence, x: torch.Tensor) -> float:
    """One pass over `weights` (for f32rows: its tables) at `rows` rows."""
    if formulation == KERNEL_FORMULATION:
        start = time.perf_counter()
        for table, part in weights:
            table.multiply(x[:rows], part)
        return time.perf_counter() - start
    plan = Products(by_rows=(formulation,) * len(TUNED_ROWS))
    start = time.perf_counter()
    for w in weights:
        plan(x[:rows], w)
    return time.perf_counter() - start


def available_formulations() -> tuple[str, ...]:
    """The formulations this machine offers: oneDNN's linear needs a torch build with it, f32rows an
    AVX-512 CPU and a C compiler (`omni.rowkernels`)."""
    from . import rowkernels  # imported here: rowkernels builds on this module

    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    have = {"onednn": onednn, KERNEL_FORMULATION: rowkernels.load(KERNEL_FORMULATION) is not None}
    return tuple(f for f in FORMULATIONS if have.get(f, True))


def measure_products(weights: Sequence[torch.Tensor]) -> dict[str, dict[int, float]]:
    """Fastest pass (seconds) of each formulation at each of TUNED_ROWS over `weights`, interleaved."""
    x = torch.randn(max(TUNED_ROWS), weights[0].size(1), dtype=weights[0].dtype)
    formulations = available_formulations()
    inputs = {f: weights for f in formulations}
    if KERNEL_FORMULATION in formulations and weights[0].dtype == torch.float32:
        from .rowkernels import F32Table  # see available_formulations

        inputs[KERNEL_FORMULATION] = [(t, t.part(slice(None))) for t in map(F32Table, weights)]
    else:
        inputs.pop(KERNEL_FORMULATION, None)
    best = {f: {n: float("inf") for n in TUNED_ROWS} for f in inputs}
    for _ in range(TUNE_ROUNDS):
        for n in TUNED_ROWS:
            for f in best:
                best[f][n] = min(best[f][n], _pass_seconds(f, n, inputs[f], x))
    return best


def choose_products(times: dict[str, dict[int, float]]) -> Products:
    """The fastest formulation per row count ("linear" unless beaten by TIE_MARGIN), and the head layout
    whose rows stream faster: both layouts read the same bytes, at 1-row or at 2-row speed. f32rows
    takes every row count if its summed time beats that plan's by TIE_MARGIN."""
    library = {f: t for f, t in times.items() if f != KERNEL_FORMULATION}
    by_rows = tuple(min(library, key=lambda f: library[f][n] * (1 if f == "linear" else TIE_MARGIN))
                    for n in TUNED_ROWS)
    one, two = (times[by_rows[i]][n] for i, n in enumerate(TUNED_ROWS[:2]))
    plan = Products(by_rows, head="full" if two < one else "parts")
    if KERNEL_FORMULATION in times:
        planned = sum(times[f][n] for f, n in zip(by_rows, TUNED_ROWS))
        if sum(times[KERNEL_FORMULATION].values()) * TIE_MARGIN < planned:
            return Products((KERNEL_FORMULATION,) * len(TUNED_ROWS))
    return plan


def tune_products(groups: dict[str, Sequence[torch.Tensor]]) -> dict[str, Products]:
    """A `Products` plan per group of same-shaped weights, for this machine: from the cache, or
    measured on a sample of the real weights (a few tenths of a second in all) and cached.

    `MINI_OMNI_PRODUCTS=linear|wxt|onednn` forces one formulation everywhere (head layout "parts").
    """
    forced = os.environ.get("MINI_OMNI_PRODUCTS")
    if forced:
        if forced not in available_formulations():
            raise ValueError(f"MINI_OMNI_PRODUCTS={forced!r}; choose one of {available_formulations()}")
        dtypes = {str(w.dtype).removeprefix("torch.") for ws in groups.values() for w in ws}
        if forced == KERNEL_FORMULATION and dtypes != {"float32"}:
            raise ValueError(f"MINI_OMNI_PRODUCTS={forced} computes in fp32; this model's weights are {sorted(dtypes)}")
        return {name: Products((forced,) * len(TUNED_ROWS)) for name in groups}
    samples = {name: _sample(ws) for name, ws in groups.items()}
    shapes = {n: [list(s[0].shape), len(s), str(s[0].dtype)] for n, s in samples.items()}
    what = {"rows": TUNED_ROWS, "formulations": available_formulations(), "groups": shapes}
    chosen = measured_once(what, lambda: {name: _as_json(choose_products(measure_products(s)))
                                          for name, s in samples.items()})
    return {name: Products(tuple(entry["by_rows"]), entry["head"]) for name, entry in chosen.items() if name in groups}


def measured_once(what: dict, measure: Callable[[], dict]) -> dict:
    """`measure()`'s choice for `what` on this machine: from the cache, or measured now and cached.

    The key is `what` plus the CPU model and flags, the torch version and its thread count.
    """
    key = json.dumps({**cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(), **what},
                     sort_keys=True)
    path = cache_dir() / PRODUCTS_FILE
    cached = _read_json(path)
    if key not in cached:
        start = time.perf_counter()
        cached[key] = measure()
        cached[key]["seconds"] = round(time.perf_counter() - start, 3)  # what measuring cost, for the record
        _write_json(path, cached)
    return {name: value for name, value in cached[key].items() if name != "seconds"}


def _as_json(plan: Products) -> dict:
    return {"by_rows": list(plan.by_rows), "head": plan.head}


def _sample(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Distinct weights (or row blocks of one big weight), up to TUNE_BYTES, in the order a step reads them."""
    out, size = [], 0
    for w in weights:
        w = w.detach()
        rows = max(1, min(w.size(0), (TUNE_BYTES - size) // (w.size(1) * w.element_size())))
        for start in range(0, w.size(0) - rows + 1, rows):
            if size >= TUNE_BYTES:
                return out
            out.append(w[start:start + rows])
            size += out[-1].numel() * w.element_size()
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    """Write atomically; a read-only cache directory only costs the next load a new measurement."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError as e:
        warnings.warn(f"could not cache the measured products in {path}: {e}", stacklevel=3)
