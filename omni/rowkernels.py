"""Few-row products by this project's own C kernels (`csrc/`), built on first use: a decode step's shapes.

BLAS and fbgemm are built for many rows. A decode step multiplies every weight by 1 to a few rows, and
there they stream the weights at a fraction of what the memory delivers and slow with the row count
(fbgemm's int8 linear 2x from 2 to 9 rows, MKL's fp32 few-row products 3-10x below the memory's speed
on the AMD EPYC). These kernels read each weight once per call from a layout made for it (blocks of 16
rows stored as one sequential run) and compute every output the same way whatever else is in the call,
so a row's numbers never depend on its batch:
- `q8rows` (AVX512-VNNI): int8 weights, one scale per row; input rows quantized one by one; exact int32
  sums (fast mode). The same numbers, bit for bit, on other CPUs: `q8avx2` (AVX2, `vpmaddubsw` fed
  so that its int16 pairs cannot saturate), `q8avxvnni` (the same source built for AVX-VNNI's 256-bit
  `vpdpbusd`) and `q8neon` (ARM64 with the dot-product extension, `sdot`). `Q8_KERNELS` lists them,
  the fastest first.
- `f32rows` (AVX-512): fp32 weights, fp32 sums in a fixed order (exact mode).
Their tables have a row lookup, so the tied head and the embedding share one copy.

A kernel is compiled with the system C compiler (`$CC`, `cc` or `gcc`) into the cache directory (about a
second, once per source, flags and compiler binary) and loaded with ctypes. It links the OpenMP runtime
torch has already loaded, so both share one thread pool. Where the CPU lacks the instructions, `load()`
returns None and `why_not()` says why; where no compiler is found or the build fails, it also warns once,
naming the reason. Either way the modes keep their library kernels.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear import HEAD_PARTS, SPLIT_PARTS, by_part, int8_rows
from .machine import cache_dir, cpu_flags

SOURCES = Path(__file__).with_name("csrc")
BUILD_TIMEOUT_S = 120
BLOCK_ROWS = 16  # weight rows per block, every kernel
Q8_CHUNK = 64  # int8 kernels: bytes per chunk (one vpdpbusd of q8rows)
F32_CHUNK = 4  # f32rows: partial sums per output


@dataclass(frozen=True)
class Kernel:
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags (ARM: features) it needs
    compile_flags: tuple[str, ...]
    signature: tuple  # ctypes argument types of its entry point `<source>_linear`
    source: str  # csrc/<source>.c
    pass_rows: int = BLOCK_ROWS  # int8 kernels: the weight rows one pass over a block reads together


_P, _I = ctypes.c_void_p, ctypes.c_int
_COMMON = ("-O3", "-std=c11", "-fopenmp", "-shared", "-fPIC")
_Q8 = _COMMON + ("-ffp-contract=off",)  # a multiply then an add, never fused: every q8 kernel rounds alike
_Q8_SIGNATURE = (_P, _I, _I, _P, _P, _P, _P, _I, _P, _P, _P)
KERNELS = {
    "q8rows": Kernel(("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
                     _Q8 + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"), _Q8_SIGNATURE, "q8rows"),
    "q8avxvnni": Kernel(("avx2", "avx_vnni"), _Q8 + ("-mavx2", "-mavxvnni"), _Q8_SIGNATURE, "q8avx2", 4),
    "q8avx2": Kernel(("avx2",), _Q8 + ("-mavx2",), _Q8_SIGNATURE, "q8avx2", 4),
    "q8neon": Kernel(("asimddp",), _Q8 + ("-march=armv8.2-a+dotprod",), _Q8_SIGNATURE, "q8neon", 4),
    "f32rows": Kernel(("avx512f",), _COMMON + ("-mavx512f",), (_P, _I, _I, _P, _P, _I, _P), "f32rows"),
}
# The int8 kernels, the same numbers; on a CPU with several, the first is the fastest.
Q8_KERNELS = ("q8rows", "q8avxvnni", "q8avx2", "q8neon")

_loaded: dict[str, ctypes.CDLL | None] = {}
_entries: dict[str, ctypes._CFuncPtr] = {}  # each loaded kernel's `<source>_linear`
_why_not: dict[str, str] = {}


def load(name: str, cache: Path | None = None) -> ctypes.CDLL | None:
    """Kernel `name`'s library (built now into `cache`, default `cache_dir()`, if needed), or None:
    see `why_not(name)`. Decided once per process."""
    if name in _loaded:
        return _loaded[name]
    kernel = KERNELS[name]
    missing = [f for f in kernel.cpu_flags if f not in cpu_flags()]
    lib = None
    if missing:
        _why_not[name] = f"the CPU lacks {', '.join(missing)}"
    else:
        try:
            lib = ctypes.CDLL(str(_build(kernel, cache or cache_dir())))
            entry = getattr(lib, f"{kernel.source}_linear")
            entry.argtypes, entry.restype = list(kernel.signature), None
            _entries[name] = entry
        except (OSError, AttributeError, subprocess.SubprocessError, RuntimeError) as e:
            _why_not[name], lib = f"the kernel did not build: {e}", None
            warnings.warn(f"the {name} kernel is unavailable ({_why_not[name]}); using the library kernels",
                          stacklevel=2)
    _loaded[name] = lib
    return lib


def why_not(name: str) -> str | None:
    load(name)
    return _why_not.get(name)


def _compiler() -> tuple[str, str]:
    """The C compiler, and what identifies its build without running it: its resolved path, size and
    modification time (a compiler upgrade changes them, so the kernel is rebuilt)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    path = shutil.which(cc) if cc else None
    if path is None:
        raise RuntimeError(f"no C compiler ({cc or 'cc, gcc'}) on PATH")
    real = Path(path).resolve()
    stat = real.stat()
    return cc, f"{real}:{stat.st_size}:{stat.st_mtime_ns}"


def _build(kernel: Kernel, cache: Path) -> Path:
    cc, identity = _compiler()
    source = SOURCES / f"{kernel.source}.c"
    digest = hashlib.sha256("\0".join([source.read_text(), identity, *kernel.compile_flags]).encode()).hexdigest()
    target = cache / "kernels" / f"{kernel.source}-{digest[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([cc, *kernel.compile_flags, str(source), "-o", str(tmp)],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"{cc} failed")
    tmp.replace(target)
    return target


def _require(name: str) -> ctypes.CDLL:
    lib = load(name)
    if lib is None:
        raise RuntimeError(f"the {name} kernel is not available: {why_not(name)}")
    return lib


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """`x (..., K)` as contiguous fp32 rows of the table's width (zero-padded): `x` itself where it
    already is, as every torch call costs a few microseconds and a decode step makes ~100 kernel calls."""
    if x.dtype == torch.float32 and x.size(-1) == width and x.is_contiguous():
        return x
    rows = x.reshape(-1, x.size(-1)).float()
    if rows.size(1) != width:
        rows = F.pad(rows, (0, width - rows.size(1)))
    return rows.contiguous()


_scratch = threading.local()  # per thread: ctypes lets go of the GIL, so two threads may multiply at once


def _scratch_ptr(nbytes: int) -> int:
    """The address of this thread's scratch memory for a kernel call, at least `nbytes` (kept and reused)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _scratch.buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf.data_ptr()


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Table(nn.Module):
    """A weight `(N, K)` in a kernel's layout: blocks of BLOCK_ROWS rows, zero-padded to whole blocks.
    Each kind (`Q8Table`, `F32Table`) has `part(rows)`, which cuts block-aligned rows (the head's
    parts), `multiply(x, part)`, which runs its kernel, and `lookup(idx)`, which reads rows back (the
    embedding)."""

    n_rows: int
    n_cols: int
    blocks: torch.Tensor

    @property
    def padded_rows(self) -> int:
        return self.blocks.size(0) * BLOCK_ROWS

    @property
    def weight_bytes(self) -> int:
        """What one pass over the table reads (weights, scales, sums)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def _blocks_of(self, rows: slice) -> tuple[slice, int, int]:
        start, stop, _ = rows.indices(self.n_rows)
        if start % BLOCK_ROWS or (stop % BLOCK_ROWS and stop != self.n_rows):
            raise ValueError(f"rows {start}..{stop} do not start and end on {BLOCK_ROWS}-row blocks")
        return slice(start // BLOCK_ROWS, _padded(stop, BLOCK_ROWS) // BLOCK_ROWS), start, stop


def _out(x: torch.Tensor, Np: int) -> torch.Tensor:
    """The kernel's result, `(..., padded rows)` (contiguous: `(M, Np)` to the kernel)."""
    return torch.empty(*x.shape[:-1], Np)


def _cut(out: torch.Tensor, n_out: int) -> torch.Tensor:
    """The result without the padding rows' outputs."""
    return out if out.size(-1) == n_out else out[..., :n_out]


def q8_layout(weight: torch.Tensor, pass_rows: int = BLOCK_ROWS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`weight (N, K)` in an int8 kernel's layout: blocks `(Np / 16, 16 / pass_rows, Kp / 64, pass_rows,
    64)` int8 (each block as its passes, each pass chunk by chunk, so that a pass reads one sequential
    run), scales `(Np,)` and row sums `(Np,)` int32, N and K zero-padded to whole blocks and chunks."""
    q, scale = int8_rows(weight)
    N, K = q.shape
    Np, Kp = _padded(N, BLOCK_ROWS), _padded(K, Q8_CHUNK)
    padded = torch.zeros(Np, Kp, dtype=torch.int8)
    padded[:N, :K] = q
    blocks = padded.view(Np // BLOCK_ROWS, BLOCK_ROWS // pass_rows, pass_rows, Kp // Q8_CHUNK, Q8_CHUNK)
    return blocks.transpose(2, 3).contiguous(), torch.cat([scale, scale.new_zeros(Np - N)]), \
        padded.sum(dim=1, dtype=torch.int32)


class Q8Table(Table):
    """int8 rows with one fp32 scale each, for `kernel` (one of Q8_KERNELS), in its layout (`q8_layout`):
    q8rows reads a block's 16 rows together, the 256-bit and NEON kernels 4 at a time."""

    def __init__(self, weight: torch.Tensor, kernel: str = "q8rows") -> None:
        super().__init__()
        if kernel not in Q8_KERNELS:
            raise ValueError(f"{kernel!r} is not an int8 kernel; choose one of {Q8_KERNELS}")
        _require(kernel)
        self.kernel = kernel
        blocks, scale, qsum = q8_layout(weight, KERNELS[kernel].pass_rows)
        self.register_buffer("blocks", blocks)
        self.register_buffer("scale", scale)
        self.register_buffer("qsum", qsum)
        self.n_rows, self.n_cols = weight.shape

    def part(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        blocks, start, stop = self._blocks_of(rows)
        return self.blocks[blocks], self.scale[start:], self.qsum[start:], stop - start

    def multiply(self, x: torch.Tensor, part: tuple, bias: torch.Tensor | None = None) -> torch.Tensor:
        blocks, scale, qsum, n_out = part
        Kp, Np = blocks.size(2) * Q8_CHUNK, blocks.size(0) * BLOCK_ROWS
        rows = _rows(x, Kp)
        M = rows.numel() // Kp
        out = _out(x, Np)
        xq = _scratch_ptr(M * Kp + 4 * M)  # the quantized rows (M * Kp bytes), then their scales (M floats)
        _entries[self.kernel](rows.data_ptr(), M, Kp, blocks.data_ptr(), scale.data_ptr(), qsum.data_ptr(),
                              None if bias is None else bias.data_ptr(), Np, out.data_ptr(), xq, xq + M * Kp)
        return _cut(out, n_out)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` dequantized (the same values as `Int8Embedding`)."""
        row, pass_rows = idx % BLOCK_ROWS, self.blocks.size(3)
        rows = self.blocks[idx // BLOCK_ROWS, row // pass_rows, :, row % pass_rows]
        return rows.reshape(*idx.shape, -1)[..., :self.n_cols].float() * self.scale[idx].unsqueeze(-1)


class F32Table(Table):
    """fp32 rows for f32rows: each block transposed (`(N / 16, K, 16)`), K zero-padded to a multiple of
    F32_CHUNK."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        _require("f32rows")
        w = weight.detach().float()
        N, K = w.shape
        Np, Kp = _padded(N, BLOCK_ROWS), _padded(K, F32_CHUNK)
        if (Np, Kp) != (N, K):
            w = F.pad(w, (0, Kp - K, 0, Np - N))
        self.register_buffer("blocks", w.reshape(Np // BLOCK_ROWS, BLOCK_ROWS, Kp).transpose(1, 2).contiguous())
        self.n_rows, self.n_cols = N, K

    def part(self, rows: slice) -> tuple[torch.Tensor, int]:
        blocks, start, stop = self._blocks_of(rows)
        return self.blocks[blocks], stop - start

    def multiply(self, x: torch.Tensor, part: tuple, bias: torch.Tensor | None = None) -> torch.Tensor:
        blocks, n_out = part
        Kp, Np = blocks.size(1), blocks.size(0) * BLOCK_ROWS
        rows = _rows(x, Kp)
        out = _out(x, Np)
        _entries["f32rows"](rows.data_ptr(), rows.numel() // Kp, Kp, blocks.data_ptr(),
                            None if bias is None else bias.data_ptr(), Np, out.data_ptr())
        return _cut(out, n_out)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx`: the stored values exactly."""
        return self.blocks[idx // BLOCK_ROWS, :, idx % BLOCK_ROWS][..., :self.n_cols]


class RowsLinear(nn.Module):
    """An `nn.Linear` as a table, multiplied by its kernel."""

    def __init__(self, table: Table, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.table = table
        self.in_features, self.out_features = table.n_cols, table.n_rows
        padded = None if bias is None else F.pad(bias.detach().float(), (0, table.padded_rows - bias.numel()))
        self.register_buffer("bias", padded)
        self.args = table.part(slice(None))  # cut once: a decode step makes ~120 of these calls

    @property
    def weight_bytes(self) -> int:
        return self.table.weight_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.table.multiply(x, self.args, self.bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)


class RowsHead(nn.Module):
    """The tied head over the embedding's own table: each row multiplies only its part's rows."""

    def __init__(self, table: Table) -> None:
        super().__init__()
        self.table = table
        self.parts = {part: table.part(HEAD_PARTS[part]) for part in (*SPLIT_PARTS, "all")}  # checks alignment

    @property
    def weight_bytes(self) -> int:
        return self.table.weight_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table.multiply(x, self.parts["all"])

    def rows(self, x: torch.Tensor, parts: Sequence[str]) -> list[torch.Tensor]:
        return by_part(x, parts, lambda rows, part: self.table.multiply(rows, self.parts[part]))


class RowsEmbedding(nn.Module):
    """The embedding as the same table."""

    def __init__(self, table: Table) -> None:
        super().__init__()
        self.table = table

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table.lookup(idx)


class RowsSwiGLU(nn.Module):
    """A SwiGLU (`proj(silu(fc_1 x) * fc_2 x)`) whose two products of the same input are one table: one
    kernel call and one quantization of x instead of two, the same numbers bit for bit (each output row is
    computed on its own, from its own weight row and scale).

    `table(weight)` makes a table of a kernel; `mlp` is the SwiGLU to copy (its `fc_1`, `fc_2`, `proj`).
    """

    def __init__(self, mlp: nn.Module, table: Callable[[torch.Tensor], Table]) -> None:
        super().__init__()
        self.hidden = mlp.fc_1.out_features
        self.fc_12 = RowsLinear(table(torch.cat([mlp.fc_1.weight.detach(), mlp.fc_2.weight.detach()])), None)
        self.proj = RowsLinear(table(mlp.proj.weight), mlp.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = self.fc_12(x)  # (..., 2 * hidden)
        gate = both[..., :self.hidden]
        # silu sees gate laid out as an unfused fc_1's output (contiguous, or rows cut from whole blocks), so
        # torch splits it into the same vector runs and scalar tails (its scalar exp may round unlike its
        # vector exp); the product is exact whatever the layout.
        if self.hidden % BLOCK_ROWS == 0:
            gate = gate.contiguous()
        return self.proj(F.silu(gate) * both[..., self.hidden:])
