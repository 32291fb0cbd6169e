"""Choices made by measurement on this machine, cached per machine, or forced by the user.

The engine decides its speed choices once, at load: each is measured on the real (or same-shaped)
weights the first time and kept in `cache_dir()` (keyed by the CPU, torch and what was measured),
unless an `Overrides` forces it. This module chooses the exact mode's products (`tune_products`);
`omni.runtime` chooses fast mode's kernels through the same `measured_once`.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .linear import KERNEL_FORMULATION, TUNED_ROWS, Products
from . import machine, rowkernels

# "linear" first: the official formulation wins ties.
FORMULATIONS = ("linear", "wxt", "onednn", KERNEL_FORMULATION)
TUNE_BYTES = 48 << 20  # weights read per timing pass and group: more than a big L3 cache, so it measures DRAM
TUNE_ROUNDS = 4  # interleaved passes per candidate; the fastest pass counts (other load only slows one)
TIE_MARGIN = 1.03  # a candidate must beat "linear" by 3% to replace it
PRODUCTS_FILE = "products.json"  # the measured choices, in the cache directory
ENV = {"encoder": "MINI_OMNI_ENCODER", "int8": "MINI_OMNI_INT8", "products": "MINI_OMNI_PRODUCTS"}


@dataclass(frozen=True)
class Overrides:
    """Speed choices forced instead of measured, and where measured ones are kept; decided once at load.

    Each forced choice is checked where it is used; its error names the environment variable that
    sets it by default (`from_env`).
    """

    encoder: str | None = None  # MINI_OMNI_ENCODER: fast mode's Whisper kind, "int8" or "bf16"
    int8: str | None = None  # MINI_OMNI_INT8: fast mode's int8 products, one of runtime.INT8_KERNELS
    products: str | None = None  # MINI_OMNI_PRODUCTS: exact mode's products, one of FORMULATIONS everywhere
    cache: Path = field(default_factory=machine.cache_dir)  # measured choices and built kernels (MINI_OMNI_CACHE)

    @classmethod
    def from_env(cls) -> Overrides:
        """The overrides the environment sets (unset or empty variables force nothing)."""
        return cls(**{name: os.environ.get(var) or None for name, var in ENV.items()}, cache=machine.cache_dir())


def available_formulations(cache: Path | None = None, dtype: torch.dtype = torch.float32) -> tuple[str, ...]:
    """The formulations this machine offers for weights of `dtype`: oneDNN's linear needs a torch build
    with it (and, for bf16, a CPU its oneDNN runs bf16 on), f32rows an AVX-512 CPU and a C compiler
    (`omni.rowkernels`, built into `cache`)."""
    onednn = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
              and (dtype != torch.bfloat16 or machine.onednn_bf16()))
    have = {"onednn": onednn, KERNEL_FORMULATION: rowkernels.load(KERNEL_FORMULATION, cache) is not None}
    return tuple(f for f in FORMULATIONS if have.get(f, True))


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


def measure_products(weights: Sequence[torch.Tensor]) -> dict[str, dict[int, float]]:
    """Fastest pass (seconds) of each formulation at each of TUNED_ROWS over `weights`, interleaved."""
    x = torch.randn(max(TUNED_ROWS), weights[0].size(1), dtype=weights[0].dtype)
    formulations = available_formulations(dtype=weights[0].dtype)
    inputs = {f: weights for f in formulations}
    if KERNEL_FORMULATION in formulations and weights[0].dtype == torch.float32:
        inputs[KERNEL_FORMULATION] = [(t, t.part(slice(None))) for t in map(rowkernels.F32Table, weights)]
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


def tune_products(groups: dict[str, Sequence[torch.Tensor]], overrides: Overrides) -> dict[str, Products]:
    """A `Products` plan per group of same-shaped weights, for this machine: from the cache, or
    measured on a sample of the real weights (a few tenths of a second in all) and cached.

    `overrides.products` (MINI_OMNI_PRODUCTS) forces one formulation everywhere (head layout "parts").
    """
    forced = overrides.products
    if forced:
        formulations = available_formulations(overrides.cache)
        if forced not in formulations:
            raise ValueError(f"{ENV['products']}={forced!r}; choose one of {formulations}")
        dtypes = {str(w.dtype).removeprefix("torch.") for ws in groups.values() for w in ws}
        if forced == KERNEL_FORMULATION and dtypes != {"float32"}:
            raise ValueError(f"{ENV['products']}={forced} computes in fp32; this model's weights are {sorted(dtypes)}")
        return {name: Products((forced,) * len(TUNED_ROWS)) for name in groups}
    samples = {name: _sample(ws) for name, ws in groups.items()}
    shapes = {n: [list(s[0].shape), len(s), str(s[0].dtype)] for n, s in samples.items()}
    dtype = next(iter(samples.values()))[0].dtype
    what = {"rows": TUNED_ROWS, "formulations": available_formulations(overrides.cache, dtype), "groups": shapes}
    chosen = measured_once(what, lambda: {name: _as_json(choose_products(measure_products(s)))
                                          for name, s in samples.items()}, overrides.cache)
    return {name: Products(tuple(entry["by_rows"]), entry["head"]) for name, entry in chosen.items() if name in groups}


def measured_once(what: dict, measure: Callable[[], dict], cache: Path) -> dict:
    """`measure()`'s choice for `what` on this machine: from the cache in `cache`, or measured now and cached.

    The key is `what` plus the CPU model and flags, the torch version and its thread count.
    """
    # machine.cpu_info looked up at each call: the one probe, which a test may stand in for
    key = json.dumps({**machine.cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(), **what},
                     sort_keys=True)
    path = cache / PRODUCTS_FILE
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
