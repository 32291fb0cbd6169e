"""Linear layers, head and embedding as parts chosen once at load (STYLE: a runtime choice is an object).

- `DenseLinear` / `DenseHead`: fp32 (or the model dtype) with a `Products` plan: how the products
  of a decode step (1 row to a batch of several requests' rows) are written, in blocks of a fixed
  row count so that a request's numbers do not depend on its company (batch invariance). `F.linear`
  (`x @ W.T`, the official formulation, MKL), `W @ x.T` (MKL) and oneDNN's linear are the same sums
  in another rounding order, but they stream W at very different speeds, and which one wins depends
  on the CPU, the library build and the row count (2.5x either way between two x86 servers; MKL's
  few-row kernels are slow on AMD CPUs). `omni.tuning` times them on the real weights.
- `Int8Linear` / `Int8Head` / `Int8Embedding`: int8 weights with one scale per output channel;
  activations quantized per row (per token), so a row's result never depends on its batch.

`install(module, make)` swaps every `nn.Linear` of a module for the part `make` builds from it.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tokens import PADDED_TEXT_VOCAB, PADDED_VOCAB

HEAD_PARTS = {"text": slice(0, PADDED_TEXT_VOCAB), "audio": slice(PADDED_TEXT_VOCAB, PADDED_VOCAB),
              "all": slice(0, PADDED_VOCAB)}
SPLIT_PARTS = ("text", "audio")  # "all" is both, in this order
INT8_MAX = 127
ANCHOR = (1.0, -1.0)  # Int8Linear's extra input row: pins the kernel's one quantization range to [-1, 1]
# This project's kernel (omni.rowkernels): its weights live in a layout of their own, so a weight group
# takes it for every row count or not at all. It sums each row in a fixed order: batch invariant as it is.
KERNEL_FORMULATION = "f32rows"
# Row counts timed: one request (1 or 2 rows), a batch of requests (4, 8) and a prefill chunk (32, the
# PREFILL_CHUNK of generate.py).
TUNED_ROWS = (1, 2, 4, 8, 32)
# Block sizes a library formulation may run its products in (`Products.block`). One row at a time (block
# 1) is batch invariant everywhere and is the official call at 1 row, but reads the weights once per row:
# `omni.tuning` times it beside these, with F.linear only.
BLOCK_ROWS = (2, 4, 8)


@dataclass(frozen=True)
class Products:
    """How products are computed: one `formulation` for every row count, in blocks of `block` rows.

    BLAS sums a row in another order at another row count (its kernels differ by row count and by
    a row's place among the remainder rows), so a product of all the rows at once gives a request
    other numbers in other company. With `block`, n rows run as ceil(n / block) products of exactly
    `block` rows each (the last one padded with zero rows): a row's numbers then come from the same
    call whatever shares its step, which is batch invariant where the formulation's result does not
    depend on the row's place in the block (`omni.tuning` checks that at load, and keeps only those).
    `block` None: all rows in one product, as the official code does (batch dependent).

    "wxt" computes `W @ x.T` with x's transpose as a view (BLAS then streams W row-major); one
    row is doubled first, since a 1-column `W @ x.T` is a plain (slow) matrix-vector product.
    """

    formulation: str = "linear"
    block: int | None = None
    head: str = "parts"  # "parts": each row multiplies its own head slice; "full": all rows the whole head

    @property
    def kernel(self) -> bool:
        """Whether the group's weights go to the f32rows kernel (`omni.rowkernels`, its own layout)."""
        return self.formulation == KERNEL_FORMULATION

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        if x.device.type != "cpu":
            return F.linear(x, weight, bias)
        if self.kernel:
            raise RuntimeError("f32rows products run on an F32Table, the kernel's own weight layout")
        if self.block is None:
            out = _product(self.formulation, rows, weight, bias)
        else:
            out = torch.cat([_product(self.formulation, block, weight, bias)[:count]
                             for block, count in _blocks(rows, self.block)])
        return out.reshape(*x.shape[:-1], weight.size(0))


def _blocks(rows: torch.Tensor, size: int) -> list[tuple[torch.Tensor, int]]:
    """`rows (n, K)` as blocks of exactly `size` rows, each a tensor of its own (the same alignment
    for every block), the last one padded with zero rows; with the count of real rows in each."""
    out = []
    for start in range(0, rows.size(0), size):
        count = min(size, rows.size(0) - start)
        if count == size:
            block = rows[start:start + size].contiguous()
        else:
            block = rows.new_zeros(size, rows.size(1))
            block[:count] = rows[start:start + count]
        out.append((block, count))
    return out


def _product(formulation: str, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`rows (n, K)` times `weight (N, K)`.T (+ bias) -> `(n, N)`, as `formulation` computes it."""
    n = rows.size(0)
    if formulation == "linear":
        return F.linear(rows, weight, bias)
    if formulation == "onednn":
        return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    cols = (rows if n > 1 else rows.repeat(2, 1)).t()  # a view: (K, n), column-major
    # contiguous: a transposed result would pass its strides on and send the next product down a slow path
    out = torch.mm(weight, cols).t()[:n].contiguous()
    return out if bias is None else out + bias


class DenseLinear(nn.Module):
    """A Linear whose products follow a measured `Products` plan; same parameter names."""

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
