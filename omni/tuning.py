"""Choices made by measurement on this machine, cached per machine, or forced by the user.

The engine decides its speed choices once, at load: each is measured on the real (or same-shaped)
weights the first time and kept in `cache_dir()` (keyed by the CPU, torch and what was measured),
unless an `Overrides` forces it. This module chooses the exact mode's products (`tune_products`, batch-invariant plans only);
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

from .linear import BLOCK_ROWS, KERNEL_FORMULATION, TUNED_ROWS, Products
from . import machine, rowkernels

# "linear" first: the official formulation wins ties.
FORMULATIONS = ("linear", "wxt", "onednn", KERNEL_FORMULATION)
TUNE_BYTES = 48 << 20  # weights read per timing pass and group: more than a big L3 cache, so it measures DRAM
TUNE_ROUNDS = 4  # interleaved passes per candidate; the fastest pass counts (other load only slows one)
TIE_MARGIN = 1.03  # timings within 3% are a tie
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
    products: str | None = None  # MINI_OMNI_PRODUCTS: exact mode's products, one of FORMULATIONS (block measured)
    cache: Path = field(default_factory=machine.cache_dir)  # measured choices and built kernels (MINI_OMNI_CACHE)

    @classmethod
    def from_env(cls) -> Overrides:
        """The overrides the environment sets (unset or empty variables force nothing)."""
        return cls(**{name: os.environ.get(var) or None for name, var in ENV.items()}, cache=machine.cache_dir())


def available_formulations(cache: Path | None = None, dtype: torch.dtype = torch.float32) -> tuple[str, ...]:
    """The formulations this machine offers for weights of `dtype`: oneDNN's linear needs a torch build
    with it (and, for bf16, a CPU its oneDNN runs bf16 on), f32rows fp32 weights, an AVX-512 CPU and a C compiler
    (`omni.rowkernels`, built into `cache`)."""
    onednn = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
              and (dtype != torch.bfloat16 or machine.onednn_bf16()))
    f32rows = dtype == torch.float32 and rowkernels.load(KERNEL_FORMULATION, cache) is not None
    have = {"onednn": onednn, KERNEL_FORMULATION: f32rows}
    return tuple(f for f in FORMULATIONS if have.get(f, True))


Candidate = tuple[str, int | None]  # (formulation, block): a `Products` plan of the exact mode
OFFICIAL: Candidate = ("linear", None)  # the official products, timed as the reference
ONE_BY_ONE: Candidate = ("linear", 1)  # each row alone: batch invariant on any machine, the fallback


def candidates(formulations: Sequence[str]) -> list[Candidate]:
    """Every plan to check: each library formulation in each of BLOCK_ROWS, the kernel whole."""
    return [(f, None) if f == KERNEL_FORMULATION else (f, block) for f in formulations
            for block in ((None,) if f == KERNEL_FORMULATION else BLOCK_ROWS)]


def batch_invariant(candidate: Candidate, weight: torch.Tensor) -> bool:
    """Whether each row's result under `candidate` is the same at every place in a block and beside any
    rows (zero padding included), on `weight`'s shape. f32rows sums each row in a fixed order by design."""
    formulation, block = candidate
    if block is None:
        return formulation == KERNEL_FORMULATION
    plan = Products(formulation, block)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(block, weight.size(1), generator=generator, dtype=weight.dtype)
    ref = plan(x, weight)
    if not torch.equal(plan(x[:1], weight)[0], ref[0]):
        return False
    return all(torch.equal(plan(x.roll(shift, 0), weight), ref.roll(shift, 0)) for shift in range(1, block))


def _pass_seconds(candidate: Candidate, rows: int, weights: Sequence, x: torch.Tensor) -> float:
    """One pass over `weights` (for f32rows: its tables) at `rows` rows."""
    start = time.perf_counter()
    if candidate[0] == KERNEL_FORMULATION:
        for table, part in weights:
            table.multiply(x[:rows], part)
    else:
        plan = Products(*candidate)
        for w in weights:
            plan(x[:rows], w)
    return time.perf_counter() - start


def measure_products(weights: Sequence[torch.Tensor], plans: Sequence[Candidate], rows: Sequence[int]
                     ) -> dict[Candidate, dict[int, float]]:
    """Fastest pass (seconds) of each plan at each row count over `weights`, interleaved."""
    x = torch.randn(max(rows), weights[0].size(1), dtype=weights[0].dtype)
    inputs = {c: weights for c in plans}
    if (KERNEL_FORMULATION, None) in inputs:
        inputs[KERNEL_FORMULATION, None] = [(t, t.part(slice(None))) for t in map(rowkernels.F32Table, weights)]
    best = {c: {n: float("inf") for n in rows} for c in inputs}
    for _ in range(TUNE_ROUNDS):
        for n in rows:
            for c in best:
                best[c][n] = min(best[c][n], _pass_seconds(c, n, inputs[c], x))
    return best


def choose_products(weights: Sequence[torch.Tensor], formulations: Sequence[str],
                    lone: Candidate = ONE_BY_ONE) -> Products:
    """The batch-invariant plan for `weights`: among those no slower (within TIE_MARGIN) than the
    official products at 1 row and, separately, at 2 rows (one request of either task kind), the one
    with the least time summed over TUNED_ROWS. One row at a time (`lone`: ONE_BY_ONE, at 1 row the
    official call itself) is always a candidate; if no plan keeps up at both counts, those keeping up at 1 row
    compete on 2 rows alone. Only the plans kept by the first timing are timed at more rows."""
    if weights[0].dtype != torch.float32:
        formulations = [f for f in formulations if f != KERNEL_FORMULATION]
    plans = [c for c in candidates(formulations) if batch_invariant(c, weights[0])] + [lone]
    solo = measure_products(weights, [OFFICIAL, *plans], TUNED_ROWS[:2])

    def keeps_up(c: Candidate, n: int) -> bool:
        return solo[c][n] <= solo[OFFICIAL][n] * TIE_MARGIN

    one, two = TUNED_ROWS[:2]
    kept = [c for c in plans if keeps_up(c, one) and keeps_up(c, two)]
    if not kept:
        return Products(*min([c for c in plans if keeps_up(c, one)] or plans, key=lambda c: solo[c][two]))
    more = measure_products(weights, kept, TUNED_ROWS[2:]) if len(kept) > 1 else {kept[0]: {}}
    # ties go to the earlier plan: the official formulation, the smaller block
    return Products(*min(kept, key=lambda c: sum(solo[c].values()) + sum(more[c].values())))


def tune_products(groups: dict[str, Sequence[torch.Tensor]], overrides: Overrides) -> dict[str, Products]:
    """A batch-invariant `Products` plan per group of same-shaped weights, for this machine: from the
    cache, or checked and measured on a sample of the real weights (a few seconds in all) and cached.

    `overrides.products` (MINI_OMNI_PRODUCTS) forces one formulation everywhere (its block still measured).
    """
    forced = overrides.products
    samples = {name: _sample(ws) for name, ws in groups.items()}
    dtype = next(iter(samples.values()))[0].dtype
    formulations = available_formulations(overrides.cache, dtype)
    if forced:
        if forced not in available_formulations(overrides.cache):
            raise ValueError(f"{ENV['products']}={forced!r}; choose one of {available_formulations(overrides.cache)}")
        if forced not in formulations:
            raise ValueError(f"{ENV['products']}={forced} computes in fp32; this model's weights are {dtype}")
        formulations = (forced,)
    # one row at a time, the fallback: a forced library formulation's own rows one by one, so that it is forced
    lone = (forced, 1) if forced and forced != KERNEL_FORMULATION else ONE_BY_ONE
    shapes = {n: [list(s[0].shape), len(s), str(s[0].dtype)] for n, s in samples.items()}
    what = {"rows": TUNED_ROWS, "blocks": BLOCK_ROWS, "formulations": formulations, "groups": shapes}
    chosen = measured_once(what, lambda: {name: _as_json(choose_products(s, formulations, lone))
                                          for name, s in samples.items()}, overrides.cache)
    return {name: Products(entry["formulation"], entry["block"]) for name, entry in chosen.items() if name in groups}


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
    return {"formulation": plan.formulation, "block": plan.block}


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
