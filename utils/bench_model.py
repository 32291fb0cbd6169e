"""bench.py's look inside a loaded engine: what one decode step reads (the memory floor) and which parts
the engine chose at load. A developer's tool: it reads the engine's internals on purpose."""
from __future__ import annotations

import time

import torch

from omni.linear import DenseHead, DenseLinear, Int8Head, Int8Linear
from omni.rowkernels import F32Table, Q8Table, RowsHead, RowsLinear

PROBE_PASSES = 5  # streaming reads of a step's tensors; the fastest counts


def step_tensors(engine, positions: int) -> list:
    """What one A1A2 decode step reads: every block's weights, the whole head (row 0 its audio part,
    row 1 its text part, or both rows all of it) and `positions` of the KV cache, as tensors or,
    for packed int8 weights, byte counts."""
    model = engine.model
    reads: list = []
    for module in model.transformer.h.modules():
        if isinstance(module, (Int8Linear, RowsLinear)):
            reads.append(module.weight_bytes)
        for param in module.parameters(recurse=False):
            reads.append(param.detach())
    head = model.lm_head
    if isinstance(head, DenseHead):
        reads.append(head.weight.detach())
    elif isinstance(head, Int8Head):
        reads += [part.weight_bytes for part in head.parts.values()]
    elif isinstance(head, RowsHead):
        reads.append(head.weight_bytes)
    span = model.config.block_size if engine.runtime.cost.full_span else positions  # full span: the whole cache
    c = model.config
    kv_bytes = 2 * 2 * c.n_query_groups * span * c.head_size * torch.finfo(engine.dtype).bits // 8
    reads += [kv_bytes] * c.n_layer
    return reads


def memory_floor(engine, positions: int) -> dict:
    """Bytes a decode step reads, and the machine's streaming bandwidth measured on those tensors
    (fresh buffers of the same sizes where the weights are packed)."""
    reads = step_tensors(engine, positions)
    probe = [t if isinstance(t, torch.Tensor) else torch.ones(max(1, t // 8), dtype=torch.int64) for t in reads]
    probe = [t.reshape(-1).view(torch.int64) if t.numel() * t.element_size() % 8 == 0 else t.reshape(-1) for t in probe]
    total = sum(t.numel() * t.element_size() for t in probe)
    best = float("inf")
    for _ in range(PROBE_PASSES):
        start = time.perf_counter()
        for t in probe:
            t.sum()
        best = min(best, time.perf_counter() - start)
    return {"step_bytes_mb": total / 1e6, "bandwidth_gbs": total / best / 1e9, "floor_ms": best * 1000}


def _plan_name(plan) -> str:
    """"wxt/4": W @ x.T in blocks of 4 rows; "linear": all rows at once (the official products)."""
    return plan.formulation if plan.block is None else f"{plan.formulation}/{plan.block}"


def products_summary(engine) -> dict:
    """The product formulations chosen at load, per weight shape of a block and for the head, and the encoder's kind."""
    model = engine.model
    plans = {"x".join(map(str, m.weight.shape)): _plan_name(m.products)
             for m in model.transformer.h[0].modules() if isinstance(m, DenseLinear)}
    plans.update({f"{m.out_features}x{m.in_features}": "f32rows" for m in model.transformer.h[0].modules()
                  if isinstance(m, RowsLinear) and isinstance(m.table, F32Table)})
    if hasattr(model.lm_head, "products"):
        plans["head"] = f"{_plan_name(model.lm_head.products)} {model.lm_head.products.head}"
    elif isinstance(model.lm_head, RowsHead) and isinstance(model.lm_head.table, F32Table):
        plans["head"] = "f32rows"
    tables = {m.kernel for m in model.modules() if isinstance(m, Q8Table)}
    if tables:
        plans["int8"] = "/".join(sorted(tables))
    elif any(isinstance(m, Int8Linear) for m in model.modules()):
        plans["int8"] = f"fbgemm (torch engine {torch.backends.quantized.engine})"
    int8 = any(isinstance(m, Int8Linear) for m in engine.whisper.modules())
    plans["whisper"] = "int8" if int8 else str(engine.whisper.dtype).removeprefix("torch.")
    return plans
