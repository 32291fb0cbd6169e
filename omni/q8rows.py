"""Few-row int8 products on AVX512-VNNI CPUs: a small C kernel (`kernels/q8rows.c`), built on first use.

fbgemm's dynamic int8 linear streams a decode step's weights at about half the memory's bandwidth and
slows with the row count (2x from 2 to 9 rows on the AMD EPYC). This kernel reads each weight byte once
per call whatever the row count (up to its row block) and takes the weights as plain int8 rows with one
scale each, the layout of the int8 embedding: the tied head and the embedding share one table.

The library is compiled with the system C compiler into the cache directory (about a second, once per
source and compiler) and loaded with ctypes. It links the OpenMP runtime torch has already loaded, so
both share one thread pool. Where the CPU lacks AVX512-VNNI, no compiler is found or the build fails,
`load()` returns None with the reason and fast mode keeps fbgemm.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear import HEAD_PARTS, SPLIT_PARTS, by_part, cache_dir, int8_rows

SOURCE = Path(__file__).with_name("kernels") / "q8rows.c"
NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
COMPILE_FLAGS = ("-O3", "-std=c11", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni",
                 "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120
BLOCK_ROWS = 16  # the kernel's weight rows per block
CHUNK = 64  # bytes per vpdpbusd

_lib: ctypes.CDLL | None = None
_why_not: str | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load() -> ctypes.CDLL | None:
    """The kernel library (built now if needed), or None: see `why_not()`."""
    global _lib, _why_not
    if _lib is not None or _why_not is not None:
        return _lib
    missing = [f for f in NEEDED_FLAGS if f not in _cpu_flags()]
    if missing:
        _why_not = f"the CPU lacks {', '.join(missing)}"
        return None
    try:
        _lib = _bind(ctypes.CDLL(str(_build())))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        _why_not = f"the kernel did not build: {e}"
    return _lib


def why_not() -> str | None:
    load()
    return _why_not


def _build() -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S).stdout
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), version, *COMPILE_FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"q8rows-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([cc, *COMPILE_FLAGS, str(SOURCE), "-o", str(tmp), "-lm"],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"{cc} failed")
    tmp.replace(target)
    return target


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.q8rows_linear.argtypes = [p, i, i, p, p, p, p, i, p, p, p]
    lib.q8rows_linear.restype = None
    return lib


class Q8Table(nn.Module):
    """int8 rows `(N, K)` with one fp32 scale per row, in the kernel's layout: blocks of BLOCK_ROWS rows,
    each stored chunk by chunk (`(N / 16, K / 64, 16, 64)`), zero-padded to whole blocks and chunks."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        if load() is None:
            raise RuntimeError(f"the q8rows kernel is not available: {why_not()}")
        q, scale = int8_rows(weight)
        N, K = q.shape
        Np, Kp = -(-N // BLOCK_ROWS) * BLOCK_ROWS, -(-K // CHUNK) * CHUNK
        padded = torch.zeros(Np, Kp, dtype=torch.int8)
        padded[:N, :K] = q
        self.register_buffer("blocks", padded.view(Np // BLOCK_ROWS, BLOCK_ROWS, Kp // CHUNK, CHUNK)
                             .transpose(1, 2).contiguous())
        self.register_buffer("scale", torch.cat([scale, scale.new_zeros(Np - N)]))
        self.register_buffer("qsum", padded.sum(dim=1, dtype=torch.int32))
        self.n_rows, self.n_cols = N, K

    def part(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Rows `rows` (block-aligned) as `multiply` takes them."""
        start, stop, _ = rows.indices(self.n_rows)
        if start % BLOCK_ROWS or (stop % BLOCK_ROWS and stop != self.n_rows):
            raise ValueError(f"rows {start}..{stop} do not start and end on {BLOCK_ROWS}-row blocks")
        blocks = slice(start // BLOCK_ROWS, -(-stop // BLOCK_ROWS))
        return self.blocks[blocks], self.scale[start:], self.qsum[start:], stop - start

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` dequantized: the embedding."""
        rows = self.blocks[idx // BLOCK_ROWS, :, idx % BLOCK_ROWS].reshape(*idx.shape, -1)[..., :self.n_cols]
        return rows.float() * self.scale[idx].unsqueeze(-1)


def multiply(x: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor, qsum: torch.Tensor, n_out: int,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x (..., K)` fp32 times the table's rows: `(..., n_out)`."""
    Kp, Np = blocks.size(1) * CHUNK, blocks.size(0) * BLOCK_ROWS
    rows = x.reshape(-1, x.size(-1)).float()
    if rows.size(1) != Kp:
        rows = F.pad(rows, (0, Kp - rows.size(1)))
    rows = rows.contiguous()
    M = rows.size(0)
    out = torch.empty(M, Np)
    xq = torch.empty(M * Kp, dtype=torch.uint8)
    xs = torch.empty(M)
    _lib.q8rows_linear(rows.data_ptr(), M, Kp, blocks.data_ptr(), scale.data_ptr(), qsum.data_ptr(),
                       None if bias is None else bias.data_ptr(), Np, out.data_ptr(), xq.data_ptr(), xs.data_ptr())
    if Np != n_out:
        out = out[:, :n_out]
    return out.reshape(*x.shape[:-1], n_out)


class Q8Linear(nn.Module):
    """An `nn.Linear` as an int8 table, multiplied by the kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.table = Q8Table(weight)
        self.in_features, self.out_features = weight.size(1), weight.size(0)
        padded = None if bias is None else F.pad(bias.detach().float(), (0, self.table.scale.numel() - bias.numel()))
        self.register_buffer("bias", padded)

    @property
    def weight_bytes(self) -> int:
        return self.table.blocks.numel() + 8 * self.table.scale.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return multiply(x, *self.table.part(slice(None)), self.bias).to(x.dtype)


class Q8Head(nn.Module):
    """The tied head over the embedding's own int8 table: each row multiplies only its part's rows."""

    def __init__(self, table: Q8Table) -> None:
        super().__init__()
        self.table = table
        self.parts = {part: table.part(HEAD_PARTS[part]) for part in SPLIT_PARTS}  # checks the alignment now

    @property
    def weight_bytes(self) -> int:
        return self.table.blocks.numel() + 8 * self.table.scale.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return multiply(x, *self.table.part(HEAD_PARTS["all"]))

    def rows(self, x: torch.Tensor, parts: Sequence[str]) -> list[torch.Tensor]:
        return by_part(x, parts, lambda rows, part: multiply(rows, *self.parts[part]))


class Q8Embedding(nn.Module):
    """The embedding as the same int8 table (the same values as `Int8Embedding`)."""

    def __init__(self, table: Q8Table) -> None:
        super().__init__()
        self.table = table

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table.lookup(idx)
