"""Fast mode's int8 products alone: each int8 kernel this machine runs, on a decode step's weight shapes.

    python -m utils.bench_int8 [--layers 8] [--rows 1,2,4,8] [--rounds 7] [--json out.json]

Per kernel (`omni.runtime.available_int8_kernels`: torch's int8 linear, "fbgemm", and this project's
kernels the CPU runs) and row count: the fastest pass over `--layers` transformer blocks of distinct
random weights (Qwen2-0.5B's shapes, more bytes than a cache holds, so memory is read as in a step),
in ms and as the weights' GB/s. The kernels take turns in every round, so other load slows them alike.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from omni.runtime import MEASURE_WEIGHT_STD, available_int8_kernels, int8_layer

# One transformer block's weights (out, in) in a decode step of the full-size model: attention's fused
# q/k/v and output projections, the MLP's two inputs and its output (omni/model.py).
BLOCK_SHAPES = ((1152, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864))


def measure(layers: int, rows: list[int], rounds: int) -> dict[str, dict[int, float]]:
    """Fastest pass (seconds) of each kernel at each row count."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(*shape, generator=generator) * MEASURE_WEIGHT_STD
               for _ in range(layers) for shape in BLOCK_SHAPES]
    kernels = {k: [int8_layer(k, w) for w in weights] for k in available_int8_kernels()}
    inputs = {shape[1]: torch.randn(max(rows), shape[1], generator=generator) for shape in BLOCK_SHAPES}
    best = {k: {n: float("inf") for n in rows} for k in kernels}
    with torch.inference_mode():
        for _ in range(rounds):
            for n in rows:
                for kernel, mods in kernels.items():
                    start = time.perf_counter()
                    for mod in mods:
                        mod(inputs[mod.in_features][:n])
                    best[kernel][n] = min(best[kernel][n], time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="transformer blocks of distinct weights per pass")
    ap.add_argument("--rows", type=lambda v: [int(n) for n in v.split(",")], default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    best = measure(args.layers, args.rows, args.rounds)
    weight_bytes = args.layers * sum(n * k for n, k in BLOCK_SHAPES)
    print(f"{weight_bytes / 1e6:.0f} MB of int8 weights per pass, {torch.get_num_threads()} threads")
    print(f"{'kernel':10}" + "".join(f"{f'{n} rows (ms, GB/s)':>22}" for n in args.rows))
    for kernel, times in best.items():
        print(f"{kernel:10}" + "".join(f"{t * 1e3:>14.2f}{weight_bytes / t / 1e9:>8.1f}" for t in times.values()))
    if args.json:
        args.json.write_text(json.dumps({"weight_bytes": weight_bytes, "seconds": best}, indent=1))


if __name__ == "__main__":
    main()
